"""The main job, end to end, on the synthetic default: datasets, shards, training, evaluation, detection.

    python launch/demo.py --out demo            # what `make demo` runs
    python launch/demo.py --out demo --people 200 --images 10 --workers 8

The datasets are made from real face photos fetched at run time (shards/synth/photos.py): the CelebA
layout holds the training people, and Celeb-DF's test list holds people the detector never sees, with
face swaps among them. The detector trains with the self-blend recipe (configs/sbi-smoke.yaml) under
torchrun with 2 CPU processes, on CelebA's faces and Celeb-DF's real training frames.

Re-running reuses what exists: datasets are generated once, finished shards are checked and kept, and
a finished run starts again in a fresh run folder.
"""

import argparse
import json
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
from shards.synth.datasets import write_photo_datasets
from shards.synth.photos import MIN_PEOPLE


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
    parser.add_argument("--people", type=int, default=None, help="a seeded draw of this many people (default: all, about 930)")
    parser.add_argument("--images", type=int, default=4, help="synthetic CelebA images per person")
    parser.add_argument("--frames-per-video", type=int, default=8, help="Celeb-DF frames sharded per video")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    args = parser.parse_args()
    if args.people is not None and args.people < MIN_PEOPLE:
        parser.error(f"--people {args.people} is too few: the train and the test side need at least 2 people each")
    out = args.out.resolve()  # training and evaluation run from the repository, wherever this was started
    data, shards_dir = out / "data", out / "shards"
    try:
        write_photo_datasets(data, args.images, people=args.people)
        sources = (CelebASource(data / "celeba"), CelebDFSource(data / "celebdf", frames_per_video=args.frames_per_video))
        for source in sources:
            report = build(source, shards_dir, workers=args.workers, arguments={"demo": True})
            print(format_report(report, source.item_unit), flush=True)
        read_one_epoch(shards_dir / "celeba", args.workers)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    run = out / "runs" / "sbi-smoke"
    if returncode := train_smoke([shards_dir / "celeba", shards_dir / "celebdf"], out / "runs"):
        return returncode
    checkpoint = sorted((run / "checkpoints").glob("step-*.pt"))[-1]
    for step in (["launch/evaluate.py", "--checkpoint", str(checkpoint), "--shards", str(shards_dir / "celebdf"),
                  "--celeba", str(shards_dir / "celeba"), "--log-to-run"],
                 ["-m", "pipeline.detect", str(sorted((data / "celebdf" / "Celeb-synthesis").glob("*.mp4"))[0]),
                  "--checkpoint", str(checkpoint), "--frames", "4"]):
        print("running:", " ".join(step), flush=True)
        if returncode := subprocess.call([sys.executable, *step], cwd=REPO):
            return returncode
    summary = json.loads((run / f"eval-step-{int(checkpoint.stem[5:]):08d}" / "metrics.json").read_text())
    f, v = summary["frame"], summary["video"]
    print(f"\ndetector on the synthetic Celeb-DF test split (people it never saw; synthetic data, not Celeb-DF): "
          f"frame AUC {f['auc']:.3f}, video AUC {v['auc']:.3f}, video accuracy {v['accuracy']:.3f} at the calibrated "
          f"threshold {summary['threshold']:.3f}, CelebA-test false positives {summary['celeba']['false_positive_rate']:.3f}")
    print(f"synthetic datasets (not CelebA or Celeb-DF): {data}/celeba, {data}/celebdf")
    print(f"shards, index files and manifests: {shards_dir}/celeba, {shards_dir}/celebdf")
    print(f"checkpoints: {run}/checkpoints   sample grids: {run}/samples   resolved config: {run}/config.yaml")
    print(f"TensorBoard: tensorboard --logdir {run}")
    print(f"wandb offline run: {sorted(run.glob('wandb/offline-run-*'))[-1]} (upload with: wandb sync <that folder>)")
    print(f"Celeb-DF evaluation (synthetic data): {run}/eval-step-{int(checkpoint.stem[5:]):08d}/")
    print(f"the web app: python -m pipeline.app --checkpoint {checkpoint}   (then open http://127.0.0.1:5000)")
    return 0


def train_smoke(shards: list[Path], runs: Path) -> int:
    """The self-blend smoke config under torchrun with 2 CPU processes, as users launch training."""
    if (runs / "sbi-smoke" / "checkpoints").is_dir():
        shutil.rmtree(runs / "sbi-smoke")  # a finished run would only resume and stop at once
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "launch/train.py",
               "--config", "configs/sbi-smoke.yaml", f"data.shards=[{','.join(map(str, shards))}]", f"train.runs_dir={runs}"]
    print("training:", " ".join(command[2:]), flush=True)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the demo's 2 processes run on the CPU, with gloo
    return subprocess.call(command, cwd=REPO, env=env)


if __name__ == "__main__":
    sys.exit(main())
