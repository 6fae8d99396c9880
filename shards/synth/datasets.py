"""Both synthetic datasets of real photos at once, with identity-disjoint people: what the demo and the
detector benchmark train and score on.

The CelebA layout holds the training people; Celeb-DF's training pool holds their real clips (and
fakes among them), and its test list holds only the other people, with face swaps among them, so a
detector is scored on faces it never saw.
"""

from __future__ import annotations

from pathlib import Path

from shards.synth.celeba import write_celeba_photos
from shards.synth.celebdf import write_celebdf_photos
from shards.synth.photos import load_people, pick_people, split_people


def write_photo_datasets(data: Path, images_per_person: int = 4, seed: int = 0, test_fraction: float = 0.3,
                         people: int | None = None, frames_per_video: int = 24) -> tuple[Path, Path]:
    """`data/celeba` and `data/celebdf`, each written unless it exists; returns both roots.

    `people` draws that many of the photos' people (default: all, about 930); `frames_per_video` is the
    length of each Celeb-DF video. With everyone, writing both takes about 2 minutes on 2 cores.
    """
    celeba, celebdf = Path(data) / "celeba", Path(data) / "celebdf"
    if celeba.exists() and celebdf.exists():
        return celeba, celebdf
    chosen = pick_people(load_people(), people, seed)  # fetched into a cache on first use
    train, test = split_people(chosen, test_fraction=test_fraction, seed=seed)
    if not celeba.exists():
        print(f"generating a CelebA-layout dataset of {len(train)} real people ...", flush=True)
        write_celeba_photos(celeba, train, seed=seed, images_per_person=images_per_person)
    if not celebdf.exists():
        print(f"generating a Celeb-DF-layout dataset: {len(train)} training people, {len(test)} test people ...", flush=True)
        write_celebdf_photos(celebdf, train, test, seed=seed, frames_per_video=frames_per_video)
    return celeba, celebdf
