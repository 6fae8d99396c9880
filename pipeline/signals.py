"""Preemption signals (SIGTERM, SIGUSR1), recorded from the process's first moment and acted on where
every rank can agree.

`launch/train.py` installs the handler before it imports torch, so a signal during start-up is never
the default handler's death with exit code 143 and no checkpoint. The handler only records the signal;
the trainer asks `requested()` between steps (at logging boundaries), between validation and
evaluation batches, and after set-up and resume, and all-reduces the answer so that all ranks stop at
the same point.
"""

from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received = 0
_previous: dict[int, object] = {}


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


def requested() -> int:
    """The last signal received (0: none)."""
    return _received
