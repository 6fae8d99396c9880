"""`python -m shards celeba ...` whose worker process kills itself with SIGKILL, as the out-of-memory killer would,
on reaching the image named by DIE_AT, once the manifest DIE_AFTER lists the shard DIE_AFTER_SHARD (for test_build.py).

    DIE_AT=000041.jpg DIE_AFTER=OUT/celeba/manifest.json DIE_AFTER_SHARD=train-000001.tar \
        python tests/shard_with_a_dying_worker.py celeba --root ... --out OUT --workers 2
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import shards.celeba
from shards import cli


class DyingCelebA(shards.celeba.CelebASource):
    def process(self, item):
        if item[2]["file"] == os.environ["DIE_AT"]:
            manifest, deadline = Path(os.environ["DIE_AFTER"]), time.monotonic() + 60
            while time.monotonic() < deadline and os.environ["DIE_AFTER_SHARD"] not in _written(manifest):
                time.sleep(0.05)  # the other worker goes on; the run writes what comes back in order
            os.kill(os.getpid(), signal.SIGKILL)
        return super().process(item)


def _written(manifest: Path) -> set[str]:
    try:
        return {e["file"] for e in json.loads(manifest.read_text())["shards"]}
    except (OSError, ValueError):  # not yet written (it is replaced whole, never read half-written)
        return set()


if __name__ == "__main__":
    shards.celeba.CelebASource = DyingCelebA  # what the command line builds
    sys.exit(cli.main())
