"""Sharding throughput: CelebA images/s and Celeb-DF frames/s, for each worker count, in one run.

    python -m bench.shards --out bench/results              # what `make bench` runs
    python -m bench.shards --out bench/results --images 20000 --videos 48 --workers 1 2 4 8

The inputs are the synthetic datasets (CelebA-sized JPEGs; videos at 320x240 and at Celeb-DF's
942x500), so the numbers say how fast the tool runs on this machine, not what the real datasets hold.
Each worker count shards the same input into a fresh folder; dataset generation is not timed.
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

import cv2
import dlib
import numpy as np

from shards.build import build
from shards.celeba import CelebASource
from shards.celebdf import CelebDFSource
from shards.synth.celeba import write_celeba
from shards.synth.celebdf import write_celebdf

VIDEO_SIZES = {"320x240": (320, 240), "942x500": (942, 500)}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _time_build(source, out: Path, workers: int) -> dict:
    t0 = time.perf_counter()
    report = build(source, out, workers=workers, progress=False)
    seconds = time.perf_counter() - t0
    samples = sum(s["samples"] for s in report.manifest["splits"].values())
    return {"workers": workers, "seconds": round(seconds, 3), "items": report.items_processed, "samples": samples,
            "items_per_s": round(report.items_processed / seconds, 2), "samples_per_s": round(samples / seconds, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--frames-per-video", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    args = parser.parse_args()

    results: dict = {
        "benchmark": "shards",
        "machine": {"cpus": os.cpu_count(), "cpu": _cpu_model(), "python": platform.python_version()},
        "versions": {"opencv": cv2.__version__, "dlib": dlib.__version__, "numpy": np.__version__},
        "note": "synthetic inputs: tool throughput on this machine, not a property of CelebA or Celeb-DF",
        "celeba": [], "celebdf": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        celeba = write_celeba(tmp / "celeba", args.images)
        for w in args.workers:
            r = _time_build(CelebASource(celeba), tmp / f"celeba-out-{w}", w)
            results["celeba"].append(r)
            print(f"celeba  {args.images} images, {w} workers: {r['samples_per_s']:.0f} images/s", flush=True)
        for name, size in VIDEO_SIZES.items():
            root = write_celebdf(tmp / f"celebdf-{name}", args.videos, frame_size=size)
            runs = results["celebdf"][name] = []
            for w in args.workers:
                source = CelebDFSource(root, frames_per_video=args.frames_per_video)
                r = _time_build(source, tmp / f"celebdf-out-{name}-{w}", w)
                runs.append(r)
                print(f"celebdf {name} {r['items']} videos, {w} workers: {r['samples_per_s']:.1f} frames/s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "shards.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
