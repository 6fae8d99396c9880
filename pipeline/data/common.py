"""What both loaders share: the split's shards, the epoch plan, positions, and input checks.

Epoch plan: every rank yields exactly `(N // world_size) // batch_size` batches per epoch, whatever
the shard sizes, because DDP hangs when one rank runs a step the others do not. The samples past that
are dropped for the epoch; which ones changes with the epoch's order. Without `drop_last` (validation,
evaluation) each rank reads its whole part instead, the last batch padded (`Batch.valid`), and the ranks'
batch counts differ by one at most (`ShardLoader.common_batches`).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pipeline.config import DataConfig
from pipeline.errors import UserError
from shards.manifest import load_manifest

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, S, S] in [-1, 1], on the loader's device
    labels: torch.Tensor | None = None  # [B] int64, 1 = fake; with `with_meta`
    keys: list[str] | None = None  # "<shard file>/<sample key>"; with `with_meta`
    landmarks: torch.Tensor | None = None  # [B, 68, 2] float32 (x, y) in [0, 1] of the image, flips applied;
    # NaN rows where a sample has none; with `with_landmarks`
    valid: int | None = None  # without drop_last: the first `valid` samples are the split's, the rest pad the part's last
    # batch (DALI's reader repeats the part's last sample, so that every batch keeps its shape); None: all are


@dataclass(frozen=True)
class IndexEntry:
    """One sample of a shard, from its DALI index file."""

    key: str
    members: dict[str, tuple[int, int]]  # extension -> (data offset, size)
    line: str = field(default="", compare=False)  # the index line, to write filtered indexes


def read_index(tar: Path, idx: Path) -> list[IndexEntry]:
    """Parse a DALI v1.2 index, naming the shard in any error a user can fix."""
    if not idx.is_file():
        raise UserError(f"{tar} has no index file {idx.name}: write the shards again with `python -m shards`, or run `wds2idx {tar}`.")
    lines = idx.read_text().splitlines()
    if not lines or not lines[0].startswith("v1.2 "):
        raise UserError(f"{idx} is not a DALI v1.2 index: write it again with `wds2idx {tar}`.")
    entries = []
    for n, line in enumerate(lines[1:], 2):
        fields = line.split()
        if not fields:
            continue
        try:  # each member: extension, offset, size, name
            if len(fields) % 4:
                raise ValueError
            members = {fields[i]: (int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields), 4)}
        except ValueError:
            raise UserError(f"{idx} line {n} is not '<ext> <offset> <size> <name>' per member: write it again with "
                            f"`wds2idx {tar}`, or the shards with `python -m shards`.") from None
        name = fields[3]
        entries.append(IndexEntry(name[: name.find(".", name.rfind("/") + 1)], members, line))
    return entries


def check_samples(tar: Path, entries: list[IndexEntry], required: tuple[str, ...] = ("jpg", "cls")) -> None:
    for e in entries:
        missing = [ext for ext in required if ext not in e.members]
        if "lmk" in missing:
            raise UserError(f"sample {e.key} in {tar} has no landmarks (lmk), which the self-blends need: write the "
                            f"shards again with `python -m shards`, or set train.sbi_weight=0.")
        if missing:
            raise UserError(f"sample {e.key} in {tar} has no {'/'.join(missing)}: every sample needs {' and '.join(required)}; fix or rewrite that shard.")
        if "cls" in e.members and e.members["cls"][1] != 1:  # DALI reads the label as one byte
            raise UserError(f"sample {e.key} in {tar} has a cls of {e.members['cls'][1]} bytes where the loaders read one "
                            "ASCII digit (0 real, 1 fake): rewrite that shard with `python -m shards`.")


def read_labels(tar: Path, entries: list[IndexEntry]) -> list[int]:
    """The `cls` of every entry, read by its offset: a few bytes each, without reading the images."""
    labels = []
    with open(tar, "rb") as f:
        for e in entries:
            offset, size = e.members["cls"]
            f.seek(offset)
            labels.append(int(f.read(size)))
    return labels


@dataclass
class SplitInfo:
    datasets: set[str]  # "celeba", "celebdf"
    shards: list[tuple[Path, Path | None]]  # (tar, its index file; None where real_only keeps only some of its entries)
    entries: list[list[IndexEntry]]  # per shard, what the loaders read: its index's entries, or real_only's share

    @property
    def samples(self) -> int:
        return sum(len(e) for e in self.entries)


def write_index(path: Path, entries: list[IndexEntry]) -> Path:
    """A DALI index file of some of a shard's `entries`, for its tar."""
    path.write_text(f"v1.2 {len(entries)}\n" + "".join(e.line + "\n" for e in entries))
    return path


def shard_folders(cfg: DataConfig) -> list[str]:
    return [cfg.shards] if isinstance(cfg.shards, str) else list(cfg.shards)


def fake_samples(cfg: DataConfig) -> tuple[str, int] | None:
    """The first folder of `data.shards` whose split holds samples labelled fake (cls 1), with their count (from its
    manifest); None where there are none."""
    for folder in shard_folders(cfg):
        fakes = load_manifest(folder)["splits"].get(cfg.split, {}).get("labels", {}).get("1", 0)
        if fakes:
            return folder, fakes
    return None


def required_members(cfg: DataConfig) -> tuple[str, ...]:
    return (image_member(cfg), "cls") + (("lmk",) if cfg.with_landmarks else ())


def image_member(cfg: DataConfig) -> str:
    if cfg.crop not in ("face", "center"):
        raise UserError(f"data.crop {cfg.crop!r} is neither 'face' nor 'center': choose one of them.")
    if cfg.crop == "center" and cfg.with_landmarks:
        raise UserError("data.crop center has no landmarks, which the self-blends need: use data.crop=face.")
    return "jpg" if cfg.crop == "face" else "orig.jpg"


def load_split(cfg: DataConfig) -> SplitInfo:
    """The split's shards over every folder of `data.shards`, with the entries the loaders read (real_only's share)."""
    folders = shard_folders(cfg)
    if not folders:
        raise UserError("data.shards is an empty list: name at least one folder written by `python -m shards`.")
    split = SplitInfo(set(), [], [])
    for folder in folders:
        manifest = load_manifest(folder)
        split.datasets.add(manifest["dataset"])
        if cfg.crop == "center" and manifest["dataset"] != "celeba":
            raise UserError(f"{folder} holds {manifest['dataset']} face crops, which have no centre crop: use data.crop=face.")
        for shard in manifest["shards"]:
            if shard["split"] != cfg.split or shard["samples"] == 0:
                continue
            tar, idx = Path(folder) / shard["file"], Path(folder) / shard["index"]
            if not tar.is_file():
                raise UserError(f"{tar} is listed in {Path(folder) / 'manifest.json'} but missing: run `python -m shards` again to rewrite it.")
            if "bytes" in shard and (size := tar.stat().st_size) != shard["bytes"]:
                raise UserError(f"{tar} holds {size} bytes where {Path(folder) / 'manifest.json'} records "
                                f"{shard['bytes']}: it was cut short or replaced; copy it again, or run `python -m shards` "
                                "again to rewrite it.")
            entries = read_index(tar, idx)
            check_samples(tar, entries, required_members(cfg))
            if cfg.real_only and set(shard["labels"]) != {"0"}:
                labels = read_labels(tar, entries) if "0" in shard["labels"] else [1] * len(entries)
                entries = [e for e, label in zip(entries, labels) if label == 0]
                if not entries:
                    continue
                idx = None
            split.shards.append((tar, idx))
            split.entries.append(entries)
    if not split.shards:
        where = " and ".join(folders)
        verb = "holds" if len(folders) == 1 else "hold"
        raise UserError(f"{where} {verb} no {'real ' if cfg.real_only else ''}samples in split {cfg.split!r}: choose another split"
                        + (" or set data.real_only=false." if cfg.real_only else "."))
    return split


def batches_per_epoch(samples: int, world_size: int, batch_size: int, where: str = "") -> int:
    n = (samples // world_size) // batch_size
    if n == 0:
        raise UserError(
            f"{where} has {samples} samples, fewer than world size {world_size} x batch_size {batch_size}: "
            "lower data.batch_size or use fewer ranks."
        )
    return n


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The same on every rank: it orders the split; rank-dependent draws add the rank themselves."""
    return np.random.default_rng([seed, epoch])


def find_undecodable(split: SplitInfo, member: str = "jpg") -> tuple[Path, str] | None:
    """(shard, key) of the first JPEG that does not decode; slow, for error messages only."""
    from PIL import Image

    for (tar, _), entries in zip(split.shards, split.entries):
        with open(tar, "rb") as f:
            for e in entries:
                offset, size = e.members[member]
                f.seek(offset)
                try:
                    with Image.open(io.BytesIO(f.read(size))) as im:
                        im.load()
                except Exception:
                    return tar, e.key
    return None


class ShardLoader:
    """The epoch and position bookkeeping of both loaders; subclasses yield one epoch's batches."""

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, device: torch.device, fit_batch: bool = False):
        if cfg.dtype not in DTYPES:
            raise UserError(f"data.dtype {cfg.dtype!r} is not one of {sorted(DTYPES)}: choose one of those.")
        if cfg.shuffle_chunk < 0:
            raise UserError(f"data.shuffle_chunk is {cfg.shuffle_chunk}: it must be 0 (whole shards) or more samples.")
        self.split = load_split(cfg)
        if fit_batch:  # a split smaller than world x batch (validation) is read in smaller batches
            cfg = replace(cfg, batch_size=max(1, min(cfg.batch_size, self.split.samples // world_size)))
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        where = " and ".join(shard_folders(cfg))
        if cfg.drop_last:
            self.batches = batches_per_epoch(self.split.samples, world_size, cfg.batch_size, f"{where} split {cfg.split!r}")
        elif self.split.samples < world_size:  # a rank with no sample would have no batch to read
            raise UserError(f"{where} split {cfg.split!r} has {self.split.samples} samples, fewer than the {world_size} "
                            "ranks: use fewer ranks.")
        else:
            self.batches = -(-len(self.part()) // cfg.batch_size)
        self.center_crop = cfg.crop == "center"
        self.image_member = image_member(cfg)
        self.epoch = 0
        self.batch = 0  # the next batch of the epoch to yield

    def __len__(self) -> int:
        return self.batches

    def part(self, index: int | None = None) -> range:
        """Part `index` (this rank's by default) of the split's sample positions, cut as DALI's reader cuts them."""
        n, i = self.split.samples, self.rank if index is None else index
        return range(n * i // self.world_size, n * (i + 1) // self.world_size)

    def common_batches(self) -> int:
        """The batches of an epoch that every rank has: without drop_last, the ranks' counts differ by one at most, and a
        collective asked at every batch must stop at these."""
        if self.cfg.drop_last:
            return self.batches
        return min(-(-len(self.part(r)) // self.cfg.batch_size) for r in range(self.world_size))

    def __iter__(self) -> Iterator[Batch]:
        """The rest of the current epoch; the epoch then advances."""
        for batch in self._epoch(self.epoch, self.batch):
            if not self.cfg.drop_last:
                batch.valid = min(self.cfg.batch_size, len(self.part()) - self.batch * self.cfg.batch_size)
            self.batch += 1  # before yielding: a state saved while this batch trains points past it
            yield batch
        self.epoch, self.batch = self.epoch + 1, 0

    def _epoch(self, epoch: int, start: int) -> Iterator[Batch]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "world_size": self.world_size,
                "batch_size": self.cfg.batch_size, "seed": self.cfg.seed}

    def _same_shape(self, state: dict) -> bool:
        return (state["world_size"], state["batch_size"]) == (self.world_size, self.cfg.batch_size)

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = state["epoch"], min(state["batch"], self.batches)  # at most the epoch's end (a split
        # that shrank since the save)
        if not self._same_shape(state):
            # Another shape of run sees other batches: keep the epoch and the count of samples seen (in another
            # order, so some already seen come again).
            seen = state["batch"] * state["world_size"] * state["batch_size"]
            self.batch = min(self.batches, seen // (self.world_size * self.cfg.batch_size))
            log.warning("loader resumed with world size %d x batch %d (saved: %d x %d): epoch %d continues at batch %d, "
                        "in a different order", self.world_size, self.cfg.batch_size, state["world_size"],
                        state["batch_size"], self.epoch, self.batch)

    def close(self) -> None:
        """Stop the epoch's workers; the loader can start another epoch afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def finish_landmarks(raw: torch.Tensor, flips: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The `lmk` members' bytes [B, 544] and the flips [B] -> [B, 68, 2] float32 on the device, mirrored with the image."""
    points = raw.contiguous().view(torch.float32).reshape(-1, 68, 2).to(device, non_blocking=True)
    flips = flips.reshape(-1, 1).to(device, non_blocking=True).bool()
    return torch.stack([torch.where(flips, 1 - points[..., 0], points[..., 0]), points[..., 1]], dim=-1)


def finish_images(images: torch.Tensor, cfg: DataConfig, device: torch.device, hwc: bool) -> torch.Tensor:
    """To the configured dtype and layout on the device; `hwc` says the input is [B, H, W, C]."""
    images = images.to(device, non_blocking=True)
    if hwc:
        images = images.permute(0, 3, 1, 2)  # a view: NCHW shape with channels-last strides
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    return images.to(DTYPES[cfg.dtype]).contiguous(memory_format=layout)
