"""Progress between log lines: statistics summed on the device, averaged over ranks, and an ETA."""

from __future__ import annotations

import math
import time

import torch

from pipeline import dist


class Meter:
    """Sums statistics on the device between log lines (no host sync per step); averages over ranks."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.sums, self.n, self.t0, self.last = None, 0, time.perf_counter(), None

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        values = torch.stack([v.float() for v in stats.values()])
        self.keys = list(stats)
        self.sums = values if self.sums is None else self.sums + values
        self.n += 1

    def flush(self) -> tuple[dict[str, float], float]:
        """The statistics' means since the last flush, over steps and ranks, and the seconds a step took. The steps
        are counted, not assumed: after a resume at a step between two log lines, the first interval is shorter."""
        sums = dist.all_reduce_(self.sums.clone())
        self.last = {k: v / (self.n * self.world_size) for k, v in zip(self.keys, sums.tolist())}
        now = time.perf_counter()
        step_s, self.t0, self.sums, self.n = (now - self.t0) / self.n, now, None, 0
        return dict(self.last), step_s


def hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
