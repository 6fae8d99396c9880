"""launch/train.py whose SLOW_SAVE_AT-th checkpoint stops half-written: it prints "SAVING <path>" and
waits, so that a test can kill -9 the process in the middle of writing a checkpoint."""

import contextlib
import os
import runpy
import sys
import time
from pathlib import Path

import pipeline.checkpoint

AT = int(os.environ["SLOW_SAVE_AT"])
_atomic_path = pipeline.checkpoint.atomic_path
_saves = 0


@contextlib.contextmanager
def atomic_path(path):
    global _saves
    _saves += 1
    with _atomic_path(path) as tmp:
        yield tmp
        if _saves == AT:
            data = tmp.read_bytes()
            tmp.write_bytes(data[: len(data) // 2])  # half of it on disk, under the temporary name
            print(f"SAVING {path}", flush=True)
            time.sleep(120)


pipeline.checkpoint.atomic_path = atomic_path
script = Path(__file__).resolve().parents[1] / "launch" / "train.py"
sys.argv = [str(script), *sys.argv[1:]]
runpy.run_path(str(script), run_name="__main__")
