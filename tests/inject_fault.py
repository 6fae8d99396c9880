"""launch/train.py with a fault in D's loss on one rank at one step, for the fault tests in test_train.py.

    INJECT_FAULT=nan|nan-on|kill INJECT_RANK=1 INJECT_STEP=3 torchrun ... tests/inject_fault.py --config ... (overrides)

nan: the loss becomes NaN, where a real fault appears (the loss pipeline/step.py computes).
nan-on: NaN at that step and every one after it: a run that diverges.
INJECT_SIGNAL_STEP=N: also SIGUSR1 to rank 0 itself at step N (a preemption, for the stop marker's tests).
kill: the process kills itself with SIGKILL, as the OOM killer or a lost node would: no handler runs and
nothing is saved. Only in torchrun's first attempt (TORCHELASTIC_RESTART_COUNT 0): its restarts run on.
At exit it prints the process's threads (tests/threads_at_exit.py).
"""

import os
import runpy
import signal
import sys
from pathlib import Path

import threads_at_exit  # noqa: F401
from pipeline import step as step_module

FAULT, RANK, AT_STEP = os.environ["INJECT_FAULT"], int(os.environ["INJECT_RANK"]), int(os.environ["INJECT_STEP"])
if FAULT not in ("nan", "nan-on", "kill"):
    sys.exit(f"INJECT_FAULT={FAULT!r} is not nan, nan-on or kill")
_d_loss = step_module.d_loss
_calls = 0


def d_loss(*args, **kwargs):
    global _calls
    _calls += 1
    loss, stats = _d_loss(*args, **kwargs)
    if str(_calls) == os.environ.get("INJECT_SIGNAL_STEP") and int(os.environ.get("RANK", 0)) == 0:
        signal.raise_signal(signal.SIGUSR1)
    faulty = _calls >= AT_STEP if FAULT == "nan-on" else _calls == AT_STEP
    if faulty and int(os.environ.get("RANK", 0)) == RANK:
        if FAULT.startswith("nan"):
            loss = loss * float("nan")
        elif os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            print(f"KILLED rank {RANK} at step {AT_STEP}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    return loss, stats


step_module.d_loss = d_loss
script = Path(__file__).resolve().parents[1] / "launch" / "train.py"
sys.argv = [str(script), *sys.argv[1:]]
runpy.run_path(str(script), run_name="__main__")
