"""`python -m shards celeba ...` whose worker process kills itself with SIGKILL, as the out-of-memory killer would,
on reaching the image named by DIE_AT, once the manifest DIE_AFTER lists the shard DIE_AFTER_SHARD (for test_build.py).

    DIE_AT=000041.jpg DIE_AFTER=OUT/celeba/manifest.json DIE_AFTER_SHARD=train-000001.tar \
        python tests/shard_with_a_dying_worker.py celeba --root ... --out OUT --workers 2
"""

import os
import signal
import sys
import time
from pathlib import Path

import shards.celeba
from shards import cli
from shards.manifest import read_previous


class DyingCelebA(shards.celeba.CelebASource):
    def process(self, item):
        if item[2]["file"] == os.environ["DIE_AT"]:
            manifest, deadline = Path(os.environ["DIE_AFTER"]), time.monotonic() + 60
            while time.monotonic() < deadline and os.environ["DIE_AFTER_SHARD"] not in _written(manifest.parent):
                time.sleep(0.05)  # the other worker goes on; the run writes what comes back in order
            os.kill(os.getpid(), signal.SIGKILL)
        return super().process(item)


def _written(dataset_dir: Path) -> set[str]:
    return {e["file"] for e in (read_previous(dataset_dir) or {}).get("shards", [])}  # (it is replaced whole)


if __name__ == "__main__":
    shards.celeba.CelebASource = DyingCelebA  # what the command line builds
    sys.exit(cli.main())
