"""Loader throughput: images/s of DALI and of the baseline over the same shards, side by side.

    python -m bench.loader                                  # CPU, on 12,000 synthetic CelebA images (make bench)
    python -m bench.loader --shards /data/shards/celeba --device cuda --threads 8 --batch 256

Each loader runs `--warmup` batches untimed, then `--batches` timed ones (across epochs if needed),
with the training preprocessing: decode the face crops (data.crop face), resize to 64, flip,
normalize, to the device. Writes JSON and prints one line with the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.data import DataConfig, build_loader


def _batches(loader):
    while True:
        yield from loader


def measure(cfg: DataConfig, device: torch.device, warmup: int, batches: int) -> dict:
    with build_loader(cfg, 0, 1, device) as loader:
        stream = _batches(loader)
        for _ in range(warmup):
            next(stream)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(batches):
            batch = next(stream)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        stream.close()
    assert batch.images.shape[0] == cfg.batch_size
    return {"loader": cfg.loader, "seconds": round(seconds, 3), "images": batches * cfg.batch_size,
            "images_per_s": round(batches * cfg.batch_size / seconds, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", help="a dataset folder written by python -m shards (default: make synthetic ones)")
    parser.add_argument("--synthetic-images", type=int, default=12_000, help="size of the synthetic CelebA without --shards")
    parser.add_argument("--split", default="train")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="DALI threads and baseline workers")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--hw-decoder-load", type=float, default=0.65)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.shards is None:
            from shards.build import build
            from shards.celeba import CelebASource
            from shards.synth.celeba import write_celeba

            root = write_celeba(Path(tmp) / "celeba", args.synthetic_images)
            args.shards = str(build(CelebASource(root), Path(tmp) / "shards", workers=os.cpu_count() or 1, progress=False).out_dir)
        return run(args)


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    results = {
        "benchmark": "loader", "shards": args.shards, "split": args.split, "batch": args.batch,
        "threads": args.threads, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpus": os.cpu_count(), "torch": torch.__version__, "runs": [],
    }
    try:
        import nvidia.dali

        results["dali"] = nvidia.dali.__version__
    except ImportError:
        pass
    for loader in ("dali", "baseline"):
        cfg = DataConfig(shards=args.shards, split=args.split, loader=loader, batch_size=args.batch,
                         threads=args.threads, image_size=args.image_size, hw_decoder_load=args.hw_decoder_load)
        results["runs"].append(measure(cfg, device, args.warmup, args.batches))
    dali, baseline = (r["images_per_s"] for r in results["runs"])
    results["ratio_dali_over_baseline"] = round(dali / baseline, 2)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"loader-{args.device}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{args.device} batch {args.batch} threads {args.threads}: DALI {dali:.0f} images/s, "
          f"baseline {baseline:.0f} images/s, ratio {dali / baseline:.2f} ({path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
