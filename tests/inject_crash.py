"""launch/train.py whose rank dies by SIGKILL at one step of the first attempt, for the elastic restart test.

    INJECT_CRASH_RANK=1 INJECT_CRASH_STEP=5 torchrun --max-restarts=1 ... tests/inject_crash.py --config ... (overrides)

The process kills itself as the kernel's OOM killer or a lost node would: no handler runs, nothing is
saved. torchrun's restarts (TORCHELASTIC_RESTART_COUNT > 0) run on without the fault.
"""

import os
import runpy
import signal
import sys
from pathlib import Path

from pipeline import step as step_module

RANK, AT_STEP = int(os.environ["INJECT_CRASH_RANK"]), int(os.environ["INJECT_CRASH_STEP"])
_d_loss = step_module.d_loss
_calls = 0


def d_loss(*args, **kwargs):
    global _calls
    _calls += 1
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if _calls == AT_STEP and first_attempt and int(os.environ.get("RANK", 0)) == RANK:
        print(f"CRASH rank {RANK} at step {AT_STEP}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return _d_loss(*args, **kwargs)


step_module.d_loss = d_loss
script = Path(__file__).resolve().parents[1] / "launch" / "train.py"
sys.argv = [str(script), *sys.argv[1:]]
runpy.run_path(str(script), run_name="__main__")
