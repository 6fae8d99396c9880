"""`python -m shards` (also `deepfake-shards`): CelebA and Celeb-DF to WebDataset shards.

    python -m shards celeba  --root ~/data/celeba  --out ~/data/shards --workers 8
    python -m shards celebdf --root ~/data/Celeb-DF-v2 --out ~/data/shards --workers 8
    python -m shards synth celeba  --out demo/data/celeba                  # real photos, train people
    python -m shards synth celebdf --out demo/data/celebdf                 # the same people split, same --seed
    python -m shards synth celeba  --out demo/data/celeba --faces cartoon --images 2000

Exit codes: 0 done (skipped items are listed in the manifest), 2 bad input (nothing written), 3 a worker process
died (finished shards are kept), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pipeline.errors import UserError


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is below zero")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # NaN too
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} is below zero")
    return value


def _people_split(p: argparse.ArgumentParser) -> None:
    p.add_argument("--test-fraction", type=float, default=0.3,
                   help="photos: share of the people held out as test people; the same --seed, --people and fraction give "
                        "the same split in `synth celeba` (train people only) and `synth celebdf` (default: %(default)s)")
    p.add_argument("--people", type=positive_int, default=None,
                   help="photos: a seeded draw of this many of the photos' people (default: all, about 930)")


def build_parser() -> argparse.ArgumentParser:
    default_workers = min(8, len(os.sched_getaffinity(0)))  # the CPUs this process may use (a SLURM job's), not the host's
    parser = argparse.ArgumentParser(prog="python -m shards", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--root", type=Path, required=True, help="the dataset as distributed")
        p.add_argument("--out", type=Path, required=True, help="shards go to OUT/<dataset>/")
        p.add_argument("--workers", type=positive_int, default=default_workers, help="processes (default: %(default)s)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("celeba", help="CelebA, official or Kaggle layout, as face crops with landmarks")
    common(p)
    p.add_argument("--maxcount", type=positive_int, default=10_000, help="images per shard (default: %(default)s)")
    p.add_argument("--face-size", type=positive_int, default=256, help="side of the square crops, px (default: %(default)s)")
    p.add_argument("--upsample", type=non_negative_int, default=1, help="dlib HOG upsampling (default: %(default)s)")

    p = sub.add_parser("celebdf", help="Celeb-DF v1 or v2 videos, as face crops")
    common(p)
    p.add_argument("--frames-per-video", type=positive_int, default=32, help="evenly spaced frames (default: %(default)s)")
    p.add_argument("--face-size", type=positive_int, default=256, help="side of the square crops, px (default: %(default)s)")
    p.add_argument("--maxcount", type=positive_int, default=10_000, help="most frames per shard (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the training pool's people that go to val (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the identity split (default: %(default)s)")
    p.add_argument("--upsample", type=non_negative_int, default=1, help="dlib HOG upsampling; 1 finds faces down to 40 px (default: %(default)s)")
    p.add_argument("--exclude-test-people", action="store_true",
                   help="leave every video of a person in the test list out of train and val (counted): "
                        "a test on people never seen; by default only the listed videos are left out")

    synth = sub.add_parser("synth", help="write a synthetic dataset in a real layout").add_subparsers(dest="dataset", required=True)
    p = synth.add_parser("celeba", help="real face photos (or procedural faces) in the CelebA layout")
    p.add_argument("--out", type=Path, required=True, help="the dataset root to create; must not exist")
    p.add_argument("--faces", choices=("photos", "cartoon"), default="photos",
                   help="photos: the train people of real photos fetched at run time (see --test-fraction); "
                        "cartoon: procedural faces (default: %(default)s)")
    p.add_argument("--images", type=positive_int, default=None,
                   help="photos: images per person (default 10); cartoon: images in all (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=("official", "kaggle"), default="official")
    _people_split(p)
    p = synth.add_parser("celebdf", help="videos of real photos, and face swaps, in the Celeb-DF v2 layout")
    p.add_argument("--out", type=Path, required=True, help="the dataset root to create; must not exist")
    p.add_argument("--faces", choices=("photos", "twophotos"), default="photos",
                   help="photos: about 930 real people fetched at run time, the test list holding the test people; "
                        "twophotos: two photos of installed packages (default: %(default)s)")
    p.add_argument("--videos", type=positive_int, default=None,
                   help="photos: real videos per celebrity (default 1); twophotos: videos in all (default 24)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--placement", choices=("flat", "videos"), default="flat", help="videos in the folders or in <folder>/videos/")
    _people_split(p)
    return parser


def _arguments(args: argparse.Namespace) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in sorted(vars(args).items())}


def run_synth(args: argparse.Namespace) -> None:
    if args.out.exists():  # before fetching and detecting the photos, which take a while
        raise UserError(f"{args.out} already exists: choose a new folder or delete it to generate again.")
    if args.faces in ("cartoon", "twophotos"):
        _run_procedural(args)
        return
    from shards.synth.photos import MIN_PEOPLE, load_people, pick_people, split_people

    if not 0 < args.test_fraction < 1:
        raise UserError(f"--test-fraction {args.test_fraction} must lie strictly between 0 and 1.")
    if args.people is not None and args.people < MIN_PEOPLE:
        raise UserError(f"--people {args.people} is too few: the train and the test side need at least 2 people each.")
    people = pick_people(load_people(), args.people, args.seed)
    train, test = split_people(people, args.test_fraction, args.seed)
    if args.dataset == "celeba":
        from shards.synth.celeba import write_celeba_photos

        per_person = args.images or 10
        out = write_celeba_photos(args.out, train, seed=args.seed, images_per_person=per_person, layout=args.layout)
        print(f"CelebA of real photos ({args.layout} layout, {len(train)} train people of {len(people)}, "
              f"{per_person} images each): {out}")
    else:
        from shards.synth.celebdf import write_celebdf_photos

        out = write_celebdf_photos(args.out, train, test, seed=args.seed, videos_per_person=args.videos or 1, placement=args.placement)
        print(f"Celeb-DF v2 of real photos ({len(train)} train and {len(test)} test people): {out}")


def _run_procedural(args: argparse.Namespace) -> None:
    if args.dataset == "celeba":
        from shards.synth.celeba import write_celeba

        images = args.images or 2000
        out = write_celeba(args.out, images, seed=args.seed, layout=args.layout)
        print(f"synthetic CelebA ({args.layout} layout, {images} images): {out}")
    else:
        from shards.synth.celebdf import write_celebdf

        videos = args.videos or 24
        if videos < 4:
            raise UserError("--videos must be at least 4: one of each folder plus a second real one.")
        out = write_celebdf(args.out, videos, seed=args.seed, placement=args.placement)
        print(f"synthetic Celeb-DF v2 ({videos} videos): {out}")


def run(args: argparse.Namespace) -> None:
    from shards.build import build, format_report

    if args.command == "synth":
        run_synth(args)
        return

    if args.command == "celeba":
        from shards.celeba import CelebASource

        source = CelebASource(args.root, maxcount=args.maxcount, face_size=args.face_size, upsample=args.upsample)
    else:
        from shards.celebdf import CelebDFSource

        if not 0 <= args.val_fraction < 1:
            raise UserError(f"--val-fraction {args.val_fraction} must be at least 0 and below 1.")
        source = CelebDFSource(
            args.root, frames_per_video=args.frames_per_video, face_size=args.face_size, maxcount=args.maxcount,
            val_fraction=args.val_fraction, seed=args.seed, upsample=args.upsample,
            exclude_test_people=args.exclude_test_people,
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
