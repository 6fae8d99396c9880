"""The one exception type for mistakes a user can cause and fix."""


class UserError(Exception):
    """A bad input, path or option. The message is one sentence naming the file or key and the fix.

    Command-line tools print it without a traceback and exit with `exit_code`.
    """

    exit_code = 2
