"""Both synthetic datasets of real photos at once, with identity-disjoint people: what the demo and the
detector benchmark train and score on.

The CelebA layout holds the training people; Celeb-DF's training pool holds their real clips (and
fakes among them), and its test list holds only the other people, with face swaps among them, so a
detector is scored on faces it never saw.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import UserError
from pipeline.fsutil import write_json_atomic
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
    # What made them, kept beside them: a later call asking for other datasets would otherwise get these, silently.
    settings = {"images_per_person": images_per_person, "seed": seed, "test_fraction": test_fraction, "people": people,
                "frames_per_video": frames_per_video}
    record = Path(data) / "settings.json"
    if celeba.exists() and celebdf.exists():
        made = json.loads(record.read_text()) if record.exists() else None  # none: written before the record
        if made is not None and made != settings:
            changed = ", ".join(f"{k} {made.get(k)} (now {v})" for k, v in settings.items() if made.get(k) != v)
            raise UserError(f"{data} holds synthetic datasets made with {changed}: remove that folder to make them again, "
                            "or give another output folder.")
        return celeba, celebdf
    chosen = pick_people(load_people(), people, seed)  # fetched into a cache on first use
    train, test = split_people(chosen, test_fraction=test_fraction, seed=seed)
    if not celeba.exists():
        print(f"generating a CelebA-layout dataset of {len(train)} real people ...", flush=True)
        write_celeba_photos(celeba, train, seed=seed, images_per_person=images_per_person)
    if not celebdf.exists():
        print(f"generating a Celeb-DF-layout dataset: {len(train)} training people, {len(test)} test people ...", flush=True)
        write_celebdf_photos(celebdf, train, test, seed=seed, frames_per_video=frames_per_video)
    write_json_atomic(record, settings)
    return celeba, celebdf
