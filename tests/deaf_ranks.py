"""launch/train.py with ranks that no stop signal reaches: SIGTERM and SIGUSR1 are ignored from the process's first
moment, as if srun had dropped them (it does while it is still starting the tasks). A stop can then come only through
train.stop_request. Run in place of launch/train.py (test_slurm.py links it there in a copy of the repository).
"""

import runpy
import signal
import sys
from pathlib import Path

from pipeline import signals


def _deaf() -> None:
    for signum in signals.SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


signals.install = _deaf  # what launch/train.py calls first
script = Path(__file__).resolve().parents[1] / "launch" / "train.py"
sys.argv = [str(script), *sys.argv[1:]]
runpy.run_path(str(script), run_name="__main__")
