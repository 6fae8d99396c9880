"""What the GAN adds to the detector: three discriminators trained on the same shards for the same time.

    python -m bench.detector --minutes 4                      # make bench: synthetic real-photo datasets
    python -m bench.detector --celeba /data/shards/celeba --celebdf /data/shards/celebdf --minutes 60 --device cuda

(a) plain: D against G's samples only (the DCGAN as it was); (b) sbi: D against G's samples and
self-blends of the real batch; (c) sbi-only: the same D architecture against self-blends alone, no G.
Each trains from the same config (configs/sbi-smoke.yaml unless --config) in one process for the same
wall-clock time, is calibrated on the val split (reals against their self-blends, as training does),
and is scored on the Celeb-DF test split (people and swaps it never saw) and on CelebA's test split
(all real: the false-positive rate). Writes detector.json and prints a Markdown table. On the default
synthetic datasets the numbers say how the recipes compare here, not what they reach on Celeb-DF.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.dist import DistInfo
from pipeline.evaluate import per_video, score_split, summarize
from pipeline.trainer import Trainer
from shards.manifest import synthetic

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {  # name: (train.sbi_weight, train.gan_weight)
    "plain": (0.0, 1.0),
    "sbi": (1.0, 1.0),
    "sbi-only": (1.0, 0.0),
}


def train_for(cfg, device: str, seconds: float) -> tuple[Trainer, int]:
    """A trainer after `seconds` of steps (whole steps; the last one may end a little later)."""
    trainer = Trainer(cfg, DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device(device)))
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for batch in trainer.loader:
            trainer.train_step(batch)
            if time.perf_counter() - t0 >= seconds:
                break
    return trainer, time.perf_counter() - t0


def run_variant(name: str, args, shards: list[str], runs: str) -> dict:
    sbi_weight, gan_weight = VARIANTS[name]
    overrides = [f"data.shards=[{','.join(shards)}]", f"train.name={name}", f"train.runs_dir={runs}",
                 f"train.sbi_weight={sbi_weight}", f"train.gan_weight={gan_weight}", "train.resume=never",
                 "train.epochs=100000", "log.wandb=disabled", "log.tensorboard=false", f"data.threads={os.cpu_count()}",
                 *args.overrides]
    cfg = load_config(args.config, overrides)
    trainer, seconds = train_for(cfg, args.device, args.minutes * 60)
    try:
        trainer.validate()  # calibrates the threshold, as at the end of training
        threshold = trainer.threshold
        D, size, device = trainer.step_fn.detector.eval(), cfg.data.image_size, trainer.device
        with torch.no_grad():
            frames = score_split(D, args.celebdf, "test", size, device, threads=os.cpu_count())
            celeba = score_split(D, args.celeba, "test", size, device, threads=os.cpu_count())
        summary = summarize(frames, per_video(frames, threshold), celeba, threshold)
    finally:
        trainer.close()
    return {"variant": name, "sbi_weight": sbi_weight, "gan_weight": gan_weight, "steps": trainer.step,
            "train_seconds": round(seconds, 1), "images_seen": trainer.step * cfg.data.batch_size,
            "calibration": trainer.calibration.info, **summary}


def table(results: list[dict]) -> str:
    rows = ["| variant | steps | train s | frame AUC | video AUC | video EER | video acc. at threshold | threshold | CelebA FPR |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        f, v = r["frame"], r["video"]
        rows.append(f"| {r['variant']} | {r['steps']} | {r['train_seconds']:.0f} | {f['auc']:.3f} | {v['auc']:.3f} | "
                    f"{v['eer']:.3f} | {v['accuracy']:.3f} | {r['threshold']:.3f} | {r['celeba']['false_positive_rate']:.3f} |")
    return "\n".join(rows)


def synthetic_shards(data: Path, workers: int) -> tuple[str, str]:
    from shards.build import build
    from shards.celeba import CelebASource
    from shards.celebdf import CelebDFSource
    from shards.synth.datasets import write_photo_datasets

    celeba, celebdf = write_photo_datasets(data / "data")
    for source in (CelebASource(celeba), CelebDFSource(celebdf, frames_per_video=8)):  # as make demo
        build(source, data / "shards", workers=workers, progress=False)
    return str(data / "shards" / "celeba"), str(data / "shards" / "celebdf")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--celeba", help="CelebA shards (default: synthetic real-photo datasets made under --data)")
    parser.add_argument("--celebdf", help="Celeb-DF shards (with --celeba)")
    parser.add_argument("--data", type=Path, default=Path("bench/results/detector-data"))
    parser.add_argument("--config", default=str(REPO / "configs" / "sbi-smoke.yaml"))
    parser.add_argument("--minutes", type=float, default=4, help="training time of each variant")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--name", default="detector", help="the JSON's name under --out")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every variant")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.celeba is None:
        args.celeba, args.celebdf = synthetic_shards(args.data, os.cpu_count() or 1)
    made_up = True if args.celeba is None else synthetic(args.celeba, args.celebdf)  # ours, even from an older folder
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{os.cpu_count()} CPUs"
    results = []
    report = {"benchmark": "detector", "device": device, "torch": torch.__version__, "minutes_each": args.minutes,
              "config": args.config, "overrides": args.overrides, "synthetic_data": made_up,
              "celeba": args.celeba, "celebdf": args.celebdf, "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.name}.json"
    with tempfile.TemporaryDirectory() as runs:
        for name in args.variants:
            results.append(run_variant(name, args, [args.celeba, args.celebdf], runs))
            print(table(results[-1:]).splitlines()[-1], flush=True)
            path.write_text(json.dumps(report, indent=2) + "\n")  # after each variant: a time limit keeps those done
    print(table(results))
    note = {True: " (synthetic datasets: not a result on CelebA or Celeb-DF)", False: "",
            None: " (the shards' manifests do not say whether they are synthetic: shard them again to record it)"}
    print(f"wrote {path}{note[made_up]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
