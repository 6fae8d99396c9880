"""`python -m shards` (also `deepfake-shards`): CelebA and Celeb-DF to WebDataset shards.

    python -m shards celeba  --root ~/data/celeba  --out ~/data/shards --workers 8
    python -m shards celebdf --root ~/data/Celeb-DF-v2 --out ~/data/shards --workers 8
    python -m shards synth celeba  --out demo/data/celeba  --images 2000
    python -m shards synth celebdf --out demo/data/celebdf --videos 24

Exit codes: 0 done (skipped items are listed in the manifest), 2 bad input (nothing written), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pipeline.errors import UserError


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    default_workers = min(8, os.cpu_count() or 1)
    parser = argparse.ArgumentParser(prog="python -m shards", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--root", type=Path, required=True, help="the dataset as distributed")
        p.add_argument("--out", type=Path, required=True, help="shards go to OUT/<dataset>/")
        p.add_argument("--workers", type=_positive, default=default_workers, help="processes (default: %(default)s)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("celeba", help="CelebA, official or Kaggle layout")
    common(p)
    p.add_argument("--maxcount", type=_positive, default=10_000, help="images per shard (default: %(default)s)")

    p = sub.add_parser("celebdf", help="Celeb-DF v1 or v2 videos, as face crops")
    common(p)
    p.add_argument("--frames-per-video", type=_positive, default=32, help="evenly spaced frames (default: %(default)s)")
    p.add_argument("--face-size", type=_positive, default=256, help="side of the square crops, px (default: %(default)s)")
    p.add_argument("--maxcount", type=_positive, default=10_000, help="most frames per shard (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the training pool's people that go to val (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the identity split (default: %(default)s)")
    p.add_argument("--upsample", type=int, default=1, help="dlib HOG upsampling; 1 finds faces down to 40 px (default: %(default)s)")

    synth = sub.add_parser("synth", help="write a synthetic dataset in a real layout").add_subparsers(dest="dataset", required=True)
    p = synth.add_parser("celeba", help="procedural faces in the CelebA layout")
    p.add_argument("--out", type=Path, required=True, help="the dataset root to create; must not exist")
    p.add_argument("--images", type=_positive, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=("official", "kaggle"), default="official")
    p = synth.add_parser("celebdf", help="videos of real photos, and face swaps, in the Celeb-DF v2 layout")
    p.add_argument("--out", type=Path, required=True, help="the dataset root to create; must not exist")
    p.add_argument("--videos", type=_positive, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--placement", choices=("flat", "videos"), default="flat", help="videos in the folders or in <folder>/videos/")
    return parser


def _arguments(args: argparse.Namespace) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in sorted(vars(args).items())}


def run(args: argparse.Namespace) -> None:
    from shards.build import build, format_report

    if args.command == "synth":
        if args.dataset == "celeba":
            from shards.synth.celeba import write_celeba

            out = write_celeba(args.out, args.images, seed=args.seed, layout=args.layout)
            print(f"synthetic CelebA ({args.layout} layout, {args.images} images): {out}")
        else:
            from shards.synth.celebdf import write_celebdf

            if args.videos < 4:
                raise UserError("--videos must be at least 4: one of each folder plus a second real one.")
            out = write_celebdf(args.out, args.videos, seed=args.seed, placement=args.placement)
            print(f"synthetic Celeb-DF v2 ({args.videos} videos): {out}")
        return

    if args.command == "celeba":
        from shards.celeba import CelebASource

        source = CelebASource(args.root, maxcount=args.maxcount)
    else:
        from shards.celebdf import CelebDFSource

        if not 0 <= args.val_fraction < 1:
            raise UserError(f"--val-fraction {args.val_fraction} must be at least 0 and below 1.")
        source = CelebDFSource(
            args.root, frames_per_video=args.frames_per_video, face_size=args.face_size, maxcount=args.maxcount,
            val_fraction=args.val_fraction, seed=args.seed, upsample=args.upsample,
        )
    report = build(source, args.out, workers=args.workers, arguments=_arguments(args), progress=not args.no_progress)
    print(format_report(report, source.item_unit))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; run the same command again to continue", file=sys.stderr)
        return 130
    return 0
