"""The main job, end to end, on the synthetic default: datasets, shards, training, evaluation, detection.

    python launch/demo.py --out demo            # what `make demo` runs
    python launch/demo.py --out demo --images 20000 --videos 60 --workers 8

Re-running reuses what exists: datasets are generated once, finished shards are checked and kept, and
training continues from its checkpoint (a finished smoke run starts again in a fresh run folder).
"""

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.data import build_loader
from pipeline.errors import UserError
from shards.build import build, format_report
from shards.celeba import CelebASource
from shards.celebdf import CelebDFSource
from shards.synth.celeba import write_celeba
from shards.synth.celebdf import write_celebdf


REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "base.yaml"


def read_one_epoch(shards: Path, threads: int) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = load_config(BASE_CONFIG, [f"data.shards={shards}", f"data.threads={threads}"]).data
    with build_loader(cfg, rank=0, world_size=1, device=device) as loader:
        t0 = time.perf_counter()
        shapes = {tuple(batch.images.shape) for batch in loader}
        seconds = time.perf_counter() - t0
    print(f"DALI loader ({device}): {len(loader)} batches of {sorted(shapes)[0]} in [-1, 1], "
          f"{len(loader) * cfg.batch_size / seconds:.0f} images/s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo"))
    parser.add_argument("--images", type=int, default=2000, help="synthetic CelebA images")
    parser.add_argument("--videos", type=int, default=24, help="synthetic Celeb-DF videos")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    args = parser.parse_args()
    data, shards_dir = args.out / "data", args.out / "shards"
    try:
        if not (data / "celeba").exists():
            print(f"generating {args.images} synthetic CelebA images ...", flush=True)
            write_celeba(data / "celeba", args.images)
        if not (data / "celebdf").exists():
            print(f"generating {args.videos} synthetic Celeb-DF videos ...", flush=True)
            write_celebdf(data / "celebdf", args.videos)
        for source in (CelebASource(data / "celeba"), CelebDFSource(data / "celebdf")):
            report = build(source, shards_dir, workers=args.workers, arguments={"demo": True})
            print(format_report(report, source.item_unit), flush=True)
        read_one_epoch(shards_dir / "celeba", args.workers)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    run = args.out / "runs" / "smoke"
    if returncode := train_smoke(shards_dir / "celeba", args.out / "runs"):
        return returncode
    checkpoint = sorted((run / "checkpoints").glob("step-*.pt"))[-1]
    for step in (["launch/evaluate.py", "--checkpoint", str(checkpoint), "--shards", str(shards_dir / "celebdf"),
                  "--celeba", str(shards_dir / "celeba"), "--log-to-run"],
                 ["-m", "pipeline.detect", str(sorted((data / "celebdf" / "Celeb-synthesis").glob("*.mp4"))[0]),
                  "--checkpoint", str(checkpoint), "--frames", "4"]):
        print("running:", " ".join(step), flush=True)
        if returncode := subprocess.call([sys.executable, *step], cwd=REPO):
            return returncode
    print(f"\nsynthetic datasets (not CelebA or Celeb-DF): {data}/celeba, {data}/celebdf")
    print(f"shards, index files and manifests: {shards_dir}/celeba, {shards_dir}/celebdf")
    print(f"checkpoints: {run}/checkpoints   sample grids: {run}/samples   resolved config: {run}/config.yaml")
    print(f"TensorBoard: tensorboard --logdir {run}")
    print(f"wandb offline run: {sorted(run.glob('wandb/offline-run-*'))[-1]} (upload with: wandb sync <that folder>)")
    print(f"Celeb-DF evaluation (synthetic data: the numbers mean nothing): {run}/eval-step-{int(checkpoint.stem[5:]):08d}/")
    print(f"the web app: python -m pipeline.app --checkpoint {checkpoint}   (then open http://127.0.0.1:5000)")
    return 0


def train_smoke(shards: Path, runs: Path) -> int:
    """The smoke config under torchrun with 2 CPU processes, as users launch training."""
    if (runs / "smoke" / "checkpoints").is_dir():
        shutil.rmtree(runs / "smoke")  # a finished smoke run would only resume and stop at once
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "launch/train.py",
               "--config", "configs/smoke.yaml", f"data.shards={shards}", f"train.runs_dir={runs}"]
    print("training:", " ".join(command[2:]), flush=True)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the demo's 2 processes run on the CPU, with gloo
    return subprocess.call(command, cwd=REPO, env=env)


if __name__ == "__main__":
    sys.exit(main())
