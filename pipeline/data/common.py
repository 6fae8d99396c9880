"""What both loaders share: the split's shards, the epoch plan, positions, and input checks.

Epoch plan: every rank yields exactly `(N // world_size) // batch_size` batches per epoch, whatever
the shard sizes, because DDP hangs when one rank runs a step the others do not. The samples past that
are dropped for the epoch; which ones changes with the epoch's order.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pipeline.config import DataConfig
from pipeline.errors import UserError
from shards.manifest import load_manifest, shard_paths

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, S, S] in [-1, 1], on the loader's device
    labels: torch.Tensor | None = None  # [B] int64, 1 = fake; with `with_meta`
    keys: list[str] | None = None  # "<shard file>/<sample key>"; with `with_meta`


@dataclass(frozen=True)
class IndexEntry:
    """One sample of a shard, from its DALI index file."""

    key: str
    members: dict[str, tuple[int, int]]  # extension -> (data offset, size)


def read_index(tar: Path, idx: Path) -> list[IndexEntry]:
    """Parse a DALI v1.2 index, naming the shard in any error a user can fix."""
    if not idx.is_file():
        raise UserError(f"{tar} has no index file {idx.name}: write the shards again with `python -m shards`, or run `wds2idx {tar}`.")
    lines = idx.read_text().splitlines()
    if not lines or not lines[0].startswith("v1.2 "):
        raise UserError(f"{idx} is not a DALI v1.2 index: write it again with `wds2idx {tar}`.")
    entries = []
    for line in lines[1:]:
        fields = line.split()
        members = {fields[i]: (int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields), 4)}
        name = fields[3]
        entries.append(IndexEntry(name[: name.find(".", name.rfind("/") + 1)], members))
    return entries


def check_samples(tar: Path, entries: list[IndexEntry], required: tuple[str, ...] = ("jpg", "cls")) -> None:
    for e in entries:
        missing = [ext for ext in required if ext not in e.members]
        if missing:
            raise UserError(f"sample {e.key} in {tar} has no {'/'.join(missing)}: every sample needs {' and '.join(required)}; fix or rewrite that shard.")


@dataclass(frozen=True)
class SplitInfo:
    dataset: str  # "celeba" or "celebdf"
    shards: list[tuple[Path, Path]]  # (tar, index)
    entries: list[list[IndexEntry]]  # per shard, from its index: what DALI's reader will read

    @property
    def samples(self) -> int:
        return sum(len(e) for e in self.entries)


def load_split(cfg: DataConfig) -> SplitInfo:
    manifest = load_manifest(cfg.shards)
    pairs = shard_paths(cfg.shards, cfg.split)
    entries = []
    for tar, idx in pairs:
        if not tar.is_file():
            raise UserError(f"{tar} is listed in {Path(cfg.shards) / 'manifest.json'} but missing: run `python -m shards` again to rewrite it.")
        entries.append(read_index(tar, idx))
        check_samples(tar, entries[-1])
    return SplitInfo(manifest["dataset"], pairs, entries)


def batches_per_epoch(samples: int, world_size: int, batch_size: int, where: str = "") -> int:
    n = (samples // world_size) // batch_size
    if n == 0:
        raise UserError(
            f"{where} has {samples} samples, fewer than world size {world_size} x batch_size {batch_size}: "
            "lower data.batch_size or use fewer ranks."
        )
    return n


def wants_center_crop(cfg: DataConfig, dataset: str) -> bool:
    """CelebA's usual DCGAN preprocessing crops the centre square; face crops are square already."""
    return cfg.center_crop if cfg.center_crop is not None else dataset == "celeba"


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The same on every rank: it orders the split; rank-dependent draws add the rank themselves."""
    return np.random.default_rng([seed, epoch])


def find_undecodable(split: SplitInfo) -> tuple[Path, str] | None:
    """(shard, key) of the first JPEG that does not decode; slow, for error messages only."""
    from PIL import Image

    for (tar, _), entries in zip(split.shards, split.entries):
        with open(tar, "rb") as f:
            for e in entries:
                offset, size = e.members["jpg"]
                f.seek(offset)
                try:
                    with Image.open(io.BytesIO(f.read(size))) as im:
                        im.load()
                except Exception:
                    return tar, e.key
    return None


class ShardLoader:
    """The epoch and position bookkeeping of both loaders; subclasses yield one epoch's batches."""

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, device: torch.device):
        if cfg.dtype not in DTYPES:
            raise UserError(f"data.dtype {cfg.dtype!r} is not one of {sorted(DTYPES)}: choose one of those.")
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.split = load_split(cfg)
        if cfg.drop_last:
            self.batches = batches_per_epoch(self.split.samples, world_size, cfg.batch_size, f"{cfg.shards} split {cfg.split!r}")
        else:
            self.batches = -(-len(self.part()) // cfg.batch_size)
        self.center_crop = wants_center_crop(cfg, self.split.dataset)
        self.epoch = 0
        self.batch = 0  # the next batch of the epoch to yield

    def __len__(self) -> int:
        return self.batches

    def part(self) -> range:
        """This rank's contiguous share of the split's sample positions, as DALI's reader cuts it."""
        n = self.split.samples
        return range(n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size)

    def __iter__(self) -> Iterator[Batch]:
        """The rest of the current epoch; the epoch then advances."""
        for batch in self._epoch(self.epoch, self.batch):
            self.batch += 1  # before yielding: a state saved while this batch trains points past it
            yield batch
        self.epoch, self.batch = self.epoch + 1, 0

    def _epoch(self, epoch: int, start: int) -> Iterator[Batch]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "world_size": self.world_size,
                "batch_size": self.cfg.batch_size, "seed": self.cfg.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = state["epoch"], state["batch"]
        if (state["world_size"], state["batch_size"]) != (self.world_size, self.cfg.batch_size):
            # Another shape of run sees other batches; keep the epoch and the share of it already seen.
            seen = state["batch"] * state["world_size"] * state["batch_size"]
            self.batch = min(self.batches, seen // (self.world_size * self.cfg.batch_size))
            log.warning("loader resumed with world size %d x batch %d (saved: %d x %d): epoch %d continues at batch %d, "
                        "in a different order", self.world_size, self.cfg.batch_size, state["world_size"],
                        state["batch_size"], self.epoch, self.batch)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def finish_images(images: torch.Tensor, cfg: DataConfig, device: torch.device, hwc: bool) -> torch.Tensor:
    """To the configured dtype and layout on the device; `hwc` says the input is [B, H, W, C]."""
    images = images.to(device, non_blocking=True)
    if hwc:
        images = images.permute(0, 3, 1, 2)  # a view: NCHW shape with channels-last strides
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    return images.to(DTYPES[cfg.dtype]).contiguous(memory_format=layout)
