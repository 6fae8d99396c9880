"""Preemption signals (SIGTERM, SIGUSR1), recorded from the process's first moment and acted on where
every rank can agree.

`launch/train.py` installs the handler before it imports torch, so a signal during start-up is never
the default handler's death with exit code 143 and no checkpoint. The handler only records the signal;
the trainer asks `requested()` between steps (at logging boundaries), between validation and
evaluation batches, and after set-up and resume, and all-reduces the answer so that all ranks stop at
the same point.

A job script may also name a file whose appearance asks for the same stop (`watch`): Slurm drops a signal that srun
is to pass on while it is still starting the tasks, and a preemption then went unheard until the job's end.
"""

from __future__ import annotations

import os
import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received = 0
_previous: dict[int, object] = {}
_request_file: str | None = None


def _record(signum, frame) -> None:
    global _received
    _received = signum


def install() -> None:
    """Record SIGTERM and SIGUSR1 from now on (the main thread only, as Python requires)."""
    for signum in SIGNALS:
        previous = signal.signal(signum, _record)
        _previous.setdefault(signum, previous)


def uninstall() -> None:
    for signum, handler in _previous.items():
        signal.signal(signum, handler)
    _previous.clear()


def watch(path: str | None) -> None:
    """Take the appearance of the file `path` as a SIGUSR1 from now on (None: stop watching)."""
    global _request_file
    _request_file = path


def requested_by_file() -> bool:
    """Whether the watched file, and no signal, asks for a stop."""
    return not _received and bool(_request_file) and os.path.exists(_request_file)


def requested() -> int:
    """The last signal received, SIGUSR1 where only the watched file asks for a stop (0: none)."""
    return signal.SIGUSR1 if requested_by_file() else _received
