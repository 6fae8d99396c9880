"""A batch's self-blends and degradations alone: eager against compiled, and on GPUs each replayed from a
CUDA graph too, side by side in one process.

    python -m bench.blends --device cuda --size 64 128 --batch 128 256   # bench/gpu.sh
    python -m bench.blends --device cpu --size 64 --batch 32             # make bench
    python -m bench.blends --device cuda --size 128 --batch 128 --profile 12   # and where the time goes

They are the step's own (`GANStep.make_inputs`, pipeline/step.py) with train.compile_inputs and
train.graph_inputs set per variant; G and D do not run. For each variant: the first call's seconds (where
torch.compile compiles), ms per batch after the warm-up, and on GPUs the kernels one batch launches (the
profiler's count); with --profile N, also the N kernels (on a CPU: operators) that take the most time.
Batches are face-like random images with a template's landmarks
(`pipeline.sbi.template_batch`). Writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import add_device_args, cuda_kernels, keep_row, open_device, sync
from pipeline.config import load_config
from pipeline.data import Batch
from pipeline.fastpaths import resolve
from pipeline.sbi import template_batch
from pipeline.step import GANStep

REPO = Path(__file__).resolve().parents[1]
PROFILED_CALLS = 5


def variants(device: torch.device, compiled: tuple[bool, ...] = (False, True)) -> list[tuple[bool, bool]]:
    """(compiled, graphed) pairs: CUDA graphs exist on GPUs only."""
    graphed = (False, True) if device.type == "cuda" else (False,)
    return list(itertools.product(compiled, graphed))


def measure(cfg, device: torch.device, compiled: bool, graphed: bool, warmup: int, iters: int, top: int = 0) -> dict:
    fast = dataclasses.replace(resolve(cfg.train, cfg.model, device), compile=False, compile_inputs=compiled,
                               graph_inputs=graphed)
    gen = torch.Generator(device=device).manual_seed(0)
    size, batch_size = cfg.data.image_size, cfg.data.batch_size
    images, landmarks = template_batch(size, batch_size, gen)
    batch = Batch(images.contiguous(memory_format=fast.layout), landmarks=landmarks)
    torch._dynamo.reset()  # each variant compiles afresh, as a run would
    step = GANStep(cfg, fast, device, gen)
    t0 = time.perf_counter()
    step.make_inputs(batch)
    sync(device)
    first_s = time.perf_counter() - t0
    for _ in range(warmup):  # the graph is captured in here
        step.make_inputs(batch)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step.make_inputs(batch)
    sync(device)
    ms = (time.perf_counter() - t0) / iters * 1000
    kernels, heaviest = None, []
    if device.type == "cuda" or top:
        activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
        with profile(activities=activities) as prof:
            for _ in range(PROFILED_CALLS):
                step.make_inputs(batch)
            sync(device)
        kernels = cuda_kernels(prof, PROFILED_CALLS) if device.type == "cuda" else None
        heaviest = heaviest_work(prof, device, PROFILED_CALLS, top)
    return {"image_size": size, "batch": batch_size, "compiled": compiled, "graphed": graphed,
            "first_call_s": round(first_s, 2), "ms": round(ms, 3), "img_per_s": round(batch_size / ms * 1000, 1),
            "kernels": kernels, "heaviest": heaviest}


def heaviest_work(prof: profile, device: torch.device, calls: int, top: int) -> list[dict]:
    """The `top` GPU kernels (on a CPU: operators) that take the most time, per call: where a batch's
    milliseconds go once their number no longer matters."""
    if device.type == "cuda":
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        self_us = lambda e: e.self_device_time_total  # noqa: E731
    else:
        events = list(prof.key_averages())
        self_us = lambda e: e.self_cpu_time_total  # noqa: E731
    events.sort(key=self_us, reverse=True)
    return [{"name": e.key[:120], "ms": round(self_us(e) / calls / 1000, 3), "count": e.count / calls}
            for e in events[:top]]


def table(rows: list[dict]) -> str:
    lines = ["| size | batch | compiled | graphed | first call s | ms/batch | img/s | against eager | kernels |",
             "| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    eager = {(r["image_size"], r["batch"]): r["ms"] for r in rows if not r["compiled"] and not r["graphed"]}
    for r in rows:
        base = eager.get((r["image_size"], r["batch"]))
        ratio = f"{base / r['ms']:.2f}x" if base else "n/a"
        lines.append(f"| {r['image_size']} | {r['batch']} | {r['compiled']} | {r['graphed']} | {r['first_call_s']:.1f} | "
                     f"{r['ms']:.2f} | {r['img_per_s']:.0f} | {ratio} | {r['kernels'] or 'n/a'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_args(parser)
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls after the first (a CUDA graph is captured here)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--compiled", nargs="+", type=int, choices=(0, 1), default=[0, 1],
                        help="1: compiled variants, 0: eager ones (the first call of a compiled one takes minutes on a CPU)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also list the N kernels (on a CPU: operators) that take the most time in each variant")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.degrade_prob=1")
    args = parser.parse_args()
    device, name = open_device(args.device)
    report = {"benchmark": "blends", "device": name, "torch": torch.__version__, "warmup": args.warmup,
              "iters": args.iters, "overrides": args.overrides, "rows": []}
    path = args.out / f"blends-{args.device}.json"
    for size, batch in itertools.product(args.size, args.batch):
        cfg = load_config(REPO / "configs" / "sbi.yaml", [f"data.image_size={size}", f"data.batch_size={batch}",
                                                          *args.overrides])
        for compiled, graphed in variants(device, tuple(map(bool, args.compiled))):
            row = measure(cfg, device, compiled, graphed, args.warmup, args.iters, args.profile)
            keep_row(report, path, row, table)
            for work in row["heaviest"]:
                print(f"    {work['ms']:8.3f} ms {work['count']:6.1f}x  {work['name']}", flush=True)
    print(table(report["rows"]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
