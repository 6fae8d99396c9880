"""launch/train.py with D's loss made NaN on one rank at one step, for the skip test in test_train.py.

    INJECT_NAN_RANK=1 INJECT_NAN_STEP=3 torchrun ... tests/inject_nan.py --config ... (overrides)

The fault is injected where a real one appears, in the loss that pipeline/step.py computes.
"""

import os
import runpy
import sys
from pathlib import Path

from pipeline import step as step_module

RANK, AT_STEP = int(os.environ["INJECT_NAN_RANK"]), int(os.environ["INJECT_NAN_STEP"])
_d_loss = step_module.d_loss
_calls = 0


def d_loss(*args, **kwargs):
    global _calls
    _calls += 1
    loss, stats = _d_loss(*args, **kwargs)
    if _calls == AT_STEP and int(os.environ.get("RANK", 0)) == RANK:
        loss = loss * float("nan")
    return loss, stats


step_module.d_loss = d_loss
script = Path(__file__).resolve().parents[1] / "launch" / "train.py"
sys.argv = [str(script), *sys.argv[1:]]
runpy.run_path(str(script), run_name="__main__")
