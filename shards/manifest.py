"""`<out>/<dataset>/manifest.json`: what a dataset's shards hold, and the record that resumption trusts.

The manifest is rewritten (atomically) after every finished shard, so an interrupted run leaves a
manifest that lists exactly the shards that are complete.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from shards.tarwriter import file_sha256

# 2: both datasets hold dlib face crops (`jpg`) and 68 landmarks (`lmk`); CelebA keeps its file as `orig.jpg`.
FORMAT_VERSION = 2
GEOMETRY = {
    "jpg": "the largest face dlib's HOG detector finds, a square 1.3x its box (zero-padded), resized to face_size",
    "lmk": "dlib's 68 landmarks as 68 x 2 float32 (x, y), little-endian, in [0, 1] of the crop; NaN where none",
    "orig.jpg": "CelebA only: the original image file, for the DCGAN's centre crop",
}
MANIFEST_NAME = "manifest.json"
# In the root of every dataset that shards/synth writes. Sharding records it in the manifest
# (`source.synthetic`), so that no figure measured on those data passes for one on CelebA or Celeb-DF.
SYNTHETIC_MARK = "SYNTHETIC.txt"

log = logging.getLogger(__name__)


def manifest_path(dataset_dir: Path) -> Path:
    return Path(dataset_dir) / MANIFEST_NAME


def read_previous(dataset_dir: Path) -> dict[str, Any] | None:
    """The manifest a previous run left, or None; an unreadable one is ignored with a warning."""
    path = manifest_path(dataset_dir)
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {manifest.get('format_version')!r}")
        return manifest
    except (ValueError, OSError) as e:
        log.warning("ignoring unreadable %s (%s): every shard will be written again", path, e)
        return None


def shard_is_intact(dataset_dir: Path, entry: dict[str, Any]) -> bool:
    """True when the shard that `entry` describes is on disk with its index, size and checksum."""
    if entry["samples"] == 0:
        return True  # every item of this shard was skipped; nothing was written for it
    tar = Path(dataset_dir) / entry["file"]
    idx = Path(dataset_dir) / entry["index"]
    return (
        tar.is_file()
        and idx.is_file()
        and tar.stat().st_size == entry["bytes"]
        and file_sha256(tar) == entry["sha256"]
    )


def load_manifest(dataset_dir: str | Path) -> dict[str, Any]:
    """A finished dataset's manifest, for readers of the shards."""
    path = manifest_path(Path(dataset_dir))
    if not path.is_file():
        raise UserError(f"{path} does not exist: point to a folder written by `python -m shards`.")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e}): write the shards again with `python -m shards`.") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        dataset = manifest.get("dataset", "<celeba|celebdf>")
        root = manifest.get("source", {}).get("root", "<dataset root>")
        raise UserError(
            f"{path} is shard format {manifest.get('format_version')}, and this version reads format {FORMAT_VERSION} "
            f"(face crops with landmarks in every sample): write the shards again with "
            f"`python -m shards {dataset} --root {root} --out {Path(dataset_dir).resolve().parent}`."
        )
    if not manifest.get("complete"):
        raise UserError(f"{path} describes an unfinished run: run the same `python -m shards` command again to finish it.")
    return manifest


def synthetic(*dataset_dirs: str | Path) -> bool | None:
    """True if any of these shards were made from shards/synth's data, False if none, None if a manifest
    predates the record (sharded before `source.synthetic` existed)."""
    flags = [load_manifest(d)["source"].get("synthetic") for d in dataset_dirs]
    return True if True in flags else (None if None in flags else False)


def _face_geometry(manifest: dict[str, Any]) -> dict[str, Any]:
    """How these shards' face crops were made: the crop's side (px), its scale over dlib's box, and dlib's
    upsampling. Manifests from before the record: the tool's defaults, unless the sharding command's
    arguments say otherwise."""
    from pipeline.faces import DEFAULT_GEOMETRY

    if "faces" in manifest:
        return dict(manifest["faces"])
    args = manifest.get("arguments") or {}
    return {k: args.get(k, default) for k, default in DEFAULT_GEOMETRY.items()}  # the CLI has no face_scale


def detection_geometry(dataset_dirs: list[str]) -> dict[str, Any]:
    """The face geometry that detection must repeat for a model trained on these shards: Celeb-DF's (video
    frames, as detection meets them), else the first folder's; a warning where the folders differ."""
    found = [(m["dataset"], _face_geometry(m)) for m in map(load_manifest, dataset_dirs)]
    chosen = next((g for dataset, g in found if dataset == "celebdf"), found[0][1])
    if any(g != chosen for _, g in found):
        log.warning("the shards' face crops differ (%s): detection will crop as %s", ", ".join(
            f"{d}: {g}" for d, (_, g) in zip(dataset_dirs, found)), chosen)
    return chosen


def shard_paths(dataset_dir: str | Path, split: str) -> list[tuple[Path, Path]]:
    """(tar, index) paths of one split's non-empty shards, in order."""
    dataset_dir = Path(dataset_dir)
    manifest = load_manifest(dataset_dir)
    entries = [e for e in manifest["shards"] if e["split"] == split and e["samples"] > 0]
    if not entries:
        raise UserError(f"{manifest_path(dataset_dir)} lists no samples in split {split!r}: choose one of {sorted(manifest['splits'])}.")
    return [(dataset_dir / e["file"], dataset_dir / e["index"]) for e in entries]
