"""`python -m shards celeba ...` whose worker process kills itself with SIGKILL, as the out-of-memory killer would,
on reaching the image named by DIE_AT (for test_build.py).

    DIE_AT=000041.jpg python tests/shard_with_a_dying_worker.py celeba --root ... --out ... --workers 2
"""

import os
import signal
import sys

import shards.celeba
from shards import cli


class DyingCelebA(shards.celeba.CelebASource):
    def process(self, item):
        if item[2]["file"] == os.environ["DIE_AT"]:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().process(item)


if __name__ == "__main__":
    shards.celeba.CelebASource = DyingCelebA  # what the command line builds
    sys.exit(cli.main())
