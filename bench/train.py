"""Training throughput: images/s of the trainer's own step, fed by the DALI loader or by a batch
already on the device (so the loader's cost shows), across precision, channels-last, torch.compile and
the self-blends (`--sbi 1`: the step also makes self-blends and degradations of the batch on the device).

    python -m bench.train --device cpu --batch 32 --steps 10            # what the CPU table used
    python -m bench.train --device cuda --batch 128 --steps 200 --compile 0 1 --sbi 0 1

One process, one rank: multiply by the GPUs for a node only if the loader keeps up (see bench.loader).
Without --shards it trains on 4,000 synthetic CelebA images it makes first. Writes JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.data import Batch
from pipeline.dist import DistInfo
from pipeline.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


def measure(shards: str, runs: str, device: str, batch: int, ngf: int, precision: str, channels_last: bool,
            compile_: bool, compile_mode: str, inputs: str, sbi: bool, graph_inputs: bool, warmup: int,
            steps: int) -> dict:
    overrides = [
        f"data.shards={shards}", f"data.batch_size={batch}", f"data.channels_last={channels_last}",
        f"data.threads={os.cpu_count()}", f"model.ngf={ngf}", f"model.ndf={ngf}", f"train.precision={precision}",
        f"train.channels_last={channels_last}", f"train.compile={compile_}", f"train.compile_mode={compile_mode}",
        "train.val_every_epochs=0", f"train.runs_dir={runs}", "train.resume=never", "train.epochs=1000",
        "log.wandb=disabled", "log.tensorboard=false", f"train.sbi_weight={float(sbi)}", f"train.graph_inputs={graph_inputs}",
    ]
    cfg = load_config(REPO / "configs" / "base.yaml", overrides)
    trainer = Trainer(cfg, DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device(device)))
    try:
        if inputs == "tensors":
            first = next(iter(trainer.loader))  # real faces and landmarks, then the same batch again and again
            batches = itertools.repeat(Batch(first.images.clone(), landmarks=first.landmarks))
        else:
            batches = (b for _ in itertools.count() for b in trainer.loader)
        for _ in range(warmup):
            trainer.train_step(next(batches))
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(next(batches))
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    finally:
        trainer.close()
    return {"precision": precision, "channels_last": channels_last, "compile": compile_, "compile_mode": compile_mode,
            "inputs": inputs, "sbi": sbi, "graph_inputs": graph_inputs, "seconds": round(seconds, 3),
            "images_per_s": round(steps * batch / seconds, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", help="a CelebA shards folder (default: synthetic ones)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--ngf", type=int, default=64, help="model width (ngf = ndf)")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--channels-last", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--compile", nargs="+", type=int, default=[0])
    parser.add_argument("--compile-mode", nargs="+", default=["default"],
                        help="torch.compile's modes, with --compile 1 (reduce-overhead: CUDA graphs of D's and G's passes)")
    parser.add_argument("--inputs", nargs="+", default=["tensors", "dali"])
    parser.add_argument("--sbi", nargs="+", type=int, default=[0, 1], help="0: plain GAN step; 1: with self-blends")
    parser.add_argument("--graph-inputs", nargs="+", type=int, default=[0], help="1: self-blends from a CUDA graph")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"{os.cpu_count()} CPUs"
    results = {"benchmark": "train", "device": device_name, "torch": torch.__version__, "batch": args.batch,
               "ngf": args.ngf, "image_size": 64, "steps": args.steps, "warmup": args.warmup, "runs": []}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"train-{args.device}.json"
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards
        if shards is None:
            from shards.build import build
            from shards.celeba import CelebASource
            from shards.synth.celeba import write_celeba

            root = write_celeba(Path(tmp) / "celeba", 4000)
            shards = str(build(CelebASource(root), Path(tmp) / "shards", workers=os.cpu_count() or 1, progress=False).out_dir)
        runs = results["runs"]
        grid = itertools.product(args.precision, args.channels_last, args.compile, args.compile_mode, args.inputs, args.sbi,
                                 args.graph_inputs)
        for precision, cl, comp, mode, inputs, sbi, graph in grid:
            if graph and not sbi:
                continue  # the graph holds the self-blends: nothing to graph without them
            if mode != "default" and not comp:
                continue  # a mode of a compiler that is off
            r = measure(shards, tmp, args.device, args.batch, args.ngf, precision, bool(cl), bool(comp), mode, inputs,
                        bool(sbi), bool(graph), args.warmup, args.steps)
            runs.append(r)
            shown = f"compile={comp}" + (f" {mode}" if mode != "default" else "")
            print(f"{precision} channels_last={cl} {shown} {inputs:7s} sbi={sbi} graph_inputs={graph}: "
                  f"{r['images_per_s']:8.1f} images/s", flush=True)
            path.write_text(json.dumps(results, indent=2) + "\n")  # after each row: a run cut short keeps its rows
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
