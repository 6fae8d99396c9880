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
from shards.synth.photos import load_people, split_people


def write_photo_datasets(data: Path, images_per_person: int = 10, seed: int = 0, test_fraction: float = 0.3) -> tuple[Path, Path]:
    """`data/celeba` and `data/celebdf`, each written unless it exists; returns both roots."""
    celeba, celebdf = Path(data) / "celeba", Path(data) / "celebdf"
    if celeba.exists() and celebdf.exists():
        return celeba, celebdf
    people = load_people()  # fetched into a cache on first use
    train, test = split_people(people, test_fraction=test_fraction, seed=seed)
    if not celeba.exists():
        print(f"generating a CelebA-layout dataset of {len(train)} real people ...", flush=True)
        write_celeba_photos(celeba, train, seed=seed, images_per_person=images_per_person)
    if not celebdf.exists():
        print(f"generating a Celeb-DF-layout dataset: {len(train)} training people, {len(test)} test people ...", flush=True)
        write_celebdf_photos(celebdf, train, test, seed=seed)
    return celeba, celebdf
