"""launch/train.py with a pause at one moment, so that a test can send a signal right then.

    [INJECT_PAUSE=startup|resume|validation|evaluation] [SLOW_CLOSE_S=S [PG_TIMEOUT_S=T]] torchrun ... tests/inject_pause.py --config ...

It prints "PAUSED <moment>" and sleeps INJECT_PAUSE_S seconds (default 4) the first time the moment
comes, then goes on as launch/train.py would. The signal handler is installed first, as there. At exit
it prints the process's threads (tests/threads_at_exit.py). With SLOW_CLOSE_S, rank 0 closes the trainer that much
later than the others, then prints "CLOSED rank 0"; with PG_TIMEOUT_S too, every rank cuts its process group's timeout
(600 s) to that once closed, so that a collective waiting for rank 0 would fail.
"""

import datetime
import os
import runpy
import sys
import time
from pathlib import Path

from pipeline import signals

signals.install()

import threads_at_exit  # noqa: E402, F401
import torch.distributed  # noqa: E402
import pipeline.checkpoint  # noqa: E402
import pipeline.periodic  # noqa: E402
import pipeline.trainer  # noqa: E402

MOMENT, SECONDS = os.environ.get("INJECT_PAUSE"), float(os.environ.get("INJECT_PAUSE_S", 4))
_paused = False


def _pausing(fn):
    def wrapper(*args, **kwargs):
        global _paused
        if not _paused:
            _paused = True
            print(f"PAUSED {MOMENT} rank {os.environ.get('RANK', 0)}", flush=True)
            time.sleep(SECONDS)
        return fn(*args, **kwargs)
    return wrapper


if MOMENT == "startup":
    pipeline.trainer.Trainer.init_data = _pausing(pipeline.trainer.Trainer.init_data)
elif MOMENT == "resume":
    pipeline.checkpoint.CheckpointManager.load = staticmethod(_pausing(pipeline.checkpoint.CheckpointManager.load))
elif MOMENT == "validation":
    pipeline.periodic.validate = _pausing(pipeline.periodic.validate)
elif MOMENT == "evaluation":
    pipeline.periodic.evaluate_detector = _pausing(pipeline.periodic.evaluate_detector)
elif MOMENT is not None:
    sys.exit(f"INJECT_PAUSE={MOMENT!r} is not startup, resume, validation or evaluation")
if "SLOW_CLOSE_S" in os.environ:  # rank 0 alone closes slowly (wandb.finish uploading), and says when it is done
    _close = pipeline.trainer.Trainer.close

    def _slow_close(self):
        _close(self)
        if "PG_TIMEOUT_S" in os.environ:
            timeout = datetime.timedelta(seconds=float(os.environ["PG_TIMEOUT_S"]))
            torch.distributed.distributed_c10d._set_pg_timeout(timeout)
        if self.info.is_main:
            time.sleep(float(os.environ["SLOW_CLOSE_S"]))
            print("CLOSED rank 0", flush=True)

    pipeline.trainer.Trainer.close = _slow_close
script = Path(__file__).resolve().parents[1] / "launch" / "train.py"
sys.argv = [str(script), *sys.argv[1:]]
runpy.run_path(str(script), run_name="__main__")
