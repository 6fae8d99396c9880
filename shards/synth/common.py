"""What both synthetic generators share."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from pipeline.errors import UserError
from shards.manifest import SYNTHETIC_MARK

_MARK_TEXT = ("Synthetic data written by deepfake-gan's generators (shards/synth), in the layout of the real\n"
              "dataset: not CelebA, not Celeb-DF. Figures measured on it are not results on those datasets.\n")


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Build a dataset in a hidden sibling folder and rename it to `out` only once it is complete.

    A synthetic dataset therefore either exists whole or not at all, and an existing folder is
    never overwritten. It gets SYNTHETIC_MARK in its root.
    """
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists: choose a new folder or delete it to generate again.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        (tmp / SYNTHETIC_MARK).write_text(_MARK_TEXT)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
