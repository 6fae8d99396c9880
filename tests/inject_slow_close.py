"""launch/train.py whose rank 0 takes SLOW_CLOSE_S seconds to close its logs, as an online wandb run's last upload
may, while every collective's timeout is cut to PG_TIMEOUT_S once training is over: for the closing tests in
test_train.py. Rank 0 prints "CLOSED <time>" when done closing; every rank prints "LEFT rank R <time>" at exit."""

import atexit
import datetime
import os
import runpy
import sys
import time
from pathlib import Path

import torch.distributed as dist

import pipeline.trainer

RANK = int(os.environ.get("RANK", 0))
_close = pipeline.trainer.Trainer.close


def close(self) -> None:
    _close(self)
    dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=float(os.environ["PG_TIMEOUT_S"])))
    if RANK == 0:
        time.sleep(float(os.environ["SLOW_CLOSE_S"]))
        print(f"CLOSED {time.time()}", flush=True)


pipeline.trainer.Trainer.close = close
atexit.register(lambda: print(f"LEFT rank {RANK} {time.time()}", flush=True))
script = Path(__file__).resolve().parents[1] / "launch" / "train.py"
sys.argv = [str(script), *sys.argv[1:]]
runpy.run_path(str(script), run_name="__main__")
