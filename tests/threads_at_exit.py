"""For the launch wrappers in tests/: print this process's threads at exit, for test_train.py to read.

At atexit (after main, before the interpreter's teardown) it prints "THREADS AT EXIT rank R: name, ...".
Gloo's threads still running there sometimes ended a rank in std::terminate during teardown.
"""

import atexit
import os
import sys
from pathlib import Path


def _names() -> list[str]:
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # a thread that ended while we listed them
            pass
    return sorted(names)


@atexit.register
def _report() -> None:
    # One write of the whole line: the ranks share one stdout, and print() under `python -u` writes the
    # text and its newline separately, so two ranks' lines could interleave.
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), f"THREADS AT EXIT rank {os.environ.get('RANK', 0)}: {', '.join(_names())}\n".encode())
