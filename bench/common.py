"""What the benchmarks of the step and its self-blends share: the device and its name, the shapes to
measure, waiting for the device, and counting its kernels."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Callable

import torch


def add_device_args(parser: argparse.ArgumentParser) -> None:
    """--device, --size and --batch (each size and batch is a row), --out."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", nargs="+", type=int, default=[64])
    parser.add_argument("--batch", nargs="+", type=int, default=[32])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))


def open_device(name: str) -> tuple[torch.device, str]:
    """The device, and what to call it in a report; on a CPU, every core works for the benchmark."""
    device = torch.device(name)
    if device.type == "cuda":
        return device, torch.cuda.get_device_name(device)
    torch.set_num_threads(os.cpu_count() or 1)
    return device, f"{os.cpu_count()} CPUs"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_kernels(prof: torch.profiler.profile, calls: int) -> float:
    """GPU kernels per call, from a profile of `calls` calls."""
    return sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA) / calls


def keep_row(report: dict, path: Path, row: dict, table: Callable[[list[dict]], str]) -> None:
    """Add a row to the report, print its line of the table, and write the JSON again: after each row, so
    that a time limit keeps the rows done."""
    report["rows"].append(row)
    print(table([row]).splitlines()[-1], flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
