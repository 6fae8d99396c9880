"""The training step on batches already on the device, and the step before issue 10, side by side.

    python -m bench.step --device cuda --size 64 128 --batch 128 256     # bench/gpu.sh: the fast paths on
    python -m bench.step --device cpu --size 64 --batch 32               # make bench: new against old

For each image size and batch: ms per step and images/s of the new step (pipeline/step.py, with the
config's fast paths: on GPUs bf16, channels-last, fused Adam, torch.compile) and of the old one
(bench/legacy_step.py: host syncs, unfused Adam, separate forwards) on the same batch; the new step's
time split into its named parts (self-blends and degradations, D, G, EMA) by the profiler; and model
FLOPs utilisation: FLOPs of one step counted by torch's FlopCounterMode, over time, over the card's
dense bf16 peak. Batches are face-like random images with a template's landmarks
(`pipeline.sbi.template_batch`): the step's cost does not depend on what the faces show. Writes JSON.
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
from torch.utils.flop_counter import FlopCounterMode

from bench.common import add_device_args, cuda_kernels, keep_row, open_device, sync
from bench.legacy_step import LegacyStep
from pipeline.config import load_config
from pipeline.data import Batch
from pipeline.fastpaths import resolve
from pipeline.sbi import template_batch
from pipeline.step import GANStep

REPO = Path(__file__).resolve().parents[1]
PARTS = ("step/inputs", "step/D", "step/G", "step/ema")
# Dense bf16 tensor-core peaks from the datasheets (TFLOP/s); the card's measured matmul rate is lower.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def ms_per_step(step, batch: Batch, device: torch.device, warmup: int, steps: int) -> float:
    for i in range(warmup):
        step(batch, i)
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(batch, warmup + i)
    sync(device)
    return (time.perf_counter() - t0) / steps * 1000


def parts_ms(step, batch: Batch, device: torch.device, steps: int) -> tuple[dict[str, float], float | None]:
    """Each named part's time per step (device time on GPUs, CPU time on CPUs), and GPU kernels per step.

    A part's device time runs from its first kernel's start to its last one's end, gaps included: where
    the host cannot launch kernels as fast as the GPU runs them, the gaps are most of it."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(steps):
            step(batch, i)
        sync(device)
    out = {}
    for event in prof.key_averages():
        if event.key in PARTS:
            total_us = event.device_time_total if device.type == "cuda" else event.cpu_time_total
            out[event.key.split("/")[1]] = round(total_us / steps / 1000, 3)
    kernels = None
    if device.type == "cuda":
        kernels = cuda_kernels(prof, steps)
    return out, kernels


def step_flops(step: GANStep, batch: Batch) -> int:
    """Forward and backward FLOPs of D and G in one step (matmuls and convolutions; self-blends excluded)."""
    with FlopCounterMode(display=False) as counter:
        step(batch, 0)
    counts = counter.get_flop_counts()  # by module; the blends' blurs run outside G and D
    return int(sum(sum(counts.get(name, {}).values()) for name in ("Generator", "Discriminator")))


def measure(args, size: int, batch_size: int, mode: str, device: torch.device) -> dict:
    # One logit for both (model.d_gan_head shared), as the old step's D had: the two steps then run the same models.
    overrides = [f"data.image_size={size}", f"data.batch_size={batch_size}", "train.sbi_weight=1", "train.gan_weight=1",
                 f"model.ngf={args.width}", f"model.ndf={args.width}", "model.d_gan_head=shared",
                 f"train.compile_mode={mode}", *args.overrides]
    cfg = load_config(REPO / "configs" / "sbi.yaml", overrides)
    fast = resolve(cfg.train, cfg.model, device)
    gen = torch.Generator(device=device).manual_seed(0)
    images, landmarks = template_batch(size, batch_size, gen)
    batch = Batch(images.contiguous(memory_format=fast.layout), landmarks=landmarks)
    new = GANStep(cfg, fast, device, gen)
    row = {"image_size": size, "batch": batch_size, "fast_paths": {k: getattr(fast, k) for k in
                                                                     ("precision", "channels_last", "fused_adam", "compile",
                                                                      "compile_mode", "graph_inputs", "compile_inputs")}}
    row["new_ms"] = ms_per_step(new, batch, device, args.warmup, args.steps)
    row["parts_ms"], row["kernels_per_step"] = parts_ms(new, batch, device, min(args.steps, 10))
    plain = dataclasses.replace(fast, compile=False, graph_inputs=False, compile_inputs=False)
    row["flops_per_step"] = step_flops(GANStep(cfg, plain, device, gen), batch)
    old = LegacyStep(GANStep(cfg, plain, device, gen))
    row["old_ms"] = ms_per_step(old, batch, device, args.warmup, args.steps)
    row["new_img_per_s"] = round(batch_size / row["new_ms"] * 1000, 1)
    row["old_img_per_s"] = round(batch_size / row["old_ms"] * 1000, 1)
    row["speedup"] = round(row["old_ms"] / row["new_ms"], 3)
    peak = peak_tflops(device)
    achieved = row["flops_per_step"] / (row["new_ms"] / 1000) / 1e12
    row["model_tflops"] = round(achieved, 2)
    row["mfu"] = round(achieved / peak, 4) if peak else None
    row["new_ms"], row["old_ms"] = round(row["new_ms"], 3), round(row["old_ms"], 3)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| size | batch | compile mode | new ms/step | old ms/step | new/old speed | new img/s | inputs ms | D ms | G ms | "
             "EMA ms | MFU | kernels |",
             "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        p = r["parts_ms"]
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        lines.append(f"| {r['image_size']} | {r['batch']} | {r['fast_paths']['compile_mode']} | {r['new_ms']:.2f} | "
                     f"{r['old_ms']:.2f} | {r['speedup']:.2f}x | "
                     f"{r['new_img_per_s']:.0f} | {p.get('inputs', 0):.2f} | {p.get('D', 0):.2f} | {p.get('G', 0):.2f} | "
                     f"{p.get('ema', 0):.2f} | {mfu} | {r['kernels_per_step'] or 'n/a'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_args(parser)
    parser.add_argument("--width", type=int, default=64, help="model.ngf and model.ndf")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (torch.compile compiles here)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compile-mode", nargs="+", default=["default"],
                        help="torch.compile's modes, side by side in one process (reduce-overhead: CUDA graphs of D, G)")
    parser.add_argument("--name", help="the JSON's name under --out (default: step-DEVICE)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.compile=false")
    args = parser.parse_args()
    device, name = open_device(args.device)
    report = {"benchmark": "step", "device": name, "torch": torch.__version__, "width": args.width,
              "warmup": args.warmup, "steps": args.steps, "overrides": args.overrides, "rows": []}
    path = args.out / f"{args.name or 'step-' + args.device}.json"
    for size, batch, mode in itertools.product(args.size, args.batch, args.compile_mode):
        torch._dynamo.reset()  # each shape and mode compiles afresh and static, as a run of it would
        keep_row(report, path, measure(args, size, batch, mode, device), table)
    print(table(report["rows"]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
