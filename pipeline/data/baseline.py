"""The baseline loader: the same shards through torch DataLoader workers and PIL/torchvision decoding.

For machines without DALI, and as the point of comparison. Samples are read by the offsets in the
shards' index files, so any sample is one seek away: each epoch is a seeded permutation of the whole
split cut into equal parts per rank, which gives the same guarantees as the DALI loader (equal batch
counts, each sample at most once per epoch) and makes resuming free (skip indices, decode nothing).
webdataset's streaming reader splits by shard, which cannot give every rank the same count.
"""

from __future__ import annotations

import io
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import signal
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from pipeline.config import DataConfig
from pipeline.data.common import Batch, ShardLoader, SplitInfo, epoch_rng, finish_images, finish_landmarks
from pipeline.errors import UserError
from pipeline.signals import SIGNALS as STOP_SIGNALS


class IndexedShards(Dataset):
    """Sample i of a split, decoded and transformed; the flip is decided by the sampler."""

    def __init__(self, split: SplitInfo, image_size: int, center_crop: bool, image_member: str, landmarks: bool):
        self.entries = [(tar, e) for (tar, _), entries in zip(split.shards, split.entries) for e in entries]
        self.image_size, self.center_crop, self.image_member = image_size, center_crop, image_member
        self.landmarks = landmarks

    def __len__(self) -> int:
        return len(self.entries)

    def read(self, i: int, ext: str) -> bytes:
        tar, entry = self.entries[i]
        offset, size = entry.members[ext]
        with open(tar, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def __getitem__(self, item: tuple[int, bool]):
        i, flip = item
        tar, entry = self.entries[i]
        try:
            image = Image.open(io.BytesIO(self.read(i, self.image_member))).convert("RGB")
        except Exception as e:
            raise UserError(f"{tar} holds sample {entry.key}, whose JPEG does not decode: remove it or write the shard again with `python -m shards`.") from e
        if self.center_crop:
            image = v2.functional.center_crop(image, min(image.size))
        image = v2.functional.resize(image, [self.image_size, self.image_size], antialias=True)
        x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # [3, S, S] uint8
        if flip:
            x = x.flip(-1)
        x = x.float().sub_(127.5).div_(127.5)
        label = int(self.read(i, "cls"))
        raw = torch.frombuffer(bytearray(self.read(i, "lmk")), dtype=torch.uint8) if self.landmarks else torch.zeros(0, dtype=torch.uint8)
        return x, label, f"{tar.name}/{entry.key}", raw, flip


def worker_context():
    """Where DataLoader workers start: a forkserver, never a fork of this process. A fork copies the locks that
    this process's other threads (DALI's, torch's pools) hold at that moment, and a worker that needs one waits
    forever: it happened in the test suite, right after a DALI loader. The server imports this module once, so
    a worker starts without importing torch again.

    The server and its workers never take the stop signals: torchrun passes one on to each rank's whole process
    group (os.killpg), and they died of it, failing the rank's next batch before it could save (the trainer
    records the signal and stops at its next logging boundary). The server starts with them blocked, a mask that
    it and the workers it forks inherit; this process blocks them only while it starts the server, and receives
    any that came meanwhile after. (A worker that hangs, which DataLoader would end with SIGTERM, then lasts until
    this process ends, when the server does and its workers with it: torch gives them PR_SET_PDEATHSIG.)"""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    # The server's own helper first: starting it unblocks SIGTERM (SIG_UNBLOCK, not the mask it found).
    multiprocessing.resource_tracker.ensure_running()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        multiprocessing.forkserver.ensure_running()  # started once; again only if it has died
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return context


class BaselineLoader(ShardLoader):
    def __init__(self, cfg: DataConfig, rank: int, world_size: int, device: torch.device, fit_batch: bool = False):
        super().__init__(cfg, rank, world_size, device, fit_batch)
        self.dataset = IndexedShards(self.split, self.cfg.image_size, self.center_crop, self.image_member, self.cfg.with_landmarks)
        self._workers = None  # the epoch's DataLoader iterator, which owns the worker processes

    def _indices(self, epoch: int) -> list[tuple[int, bool]]:
        """This rank's (sample, flip) pairs for the epoch, in order."""
        n = len(self.dataset)
        rng = epoch_rng(self.cfg.seed, epoch)
        order = rng.permutation(n) if self.cfg.shuffle else np.arange(n)
        if self.cfg.drop_last:
            per_rank = self.batches * self.cfg.batch_size
            mine = order[self.rank * (n // self.world_size):][:per_rank]
        else:
            mine = order[self.part().start:self.part().stop]
            per_rank = len(mine)
        flips = np.random.default_rng([self.cfg.seed, epoch, self.rank]).random(per_rank) < 0.5
        return [(int(i), bool(f) and self.cfg.flip) for i, f in zip(mine, flips)]

    def _epoch(self, epoch: int, start: int) -> Iterator[Batch]:
        items = self._indices(epoch)[start * self.cfg.batch_size:]
        loader = DataLoader(
            self.dataset, batch_size=self.cfg.batch_size, sampler=items, num_workers=self.cfg.threads,
            pin_memory=self.device.type == "cuda", drop_last=self.cfg.drop_last, persistent_workers=False,
            multiprocessing_context=worker_context() if self.cfg.threads > 0 else None,
        )
        self._workers = iter(loader)
        try:
            for images, labels, keys, landmarks, flips in self._workers:
                batch = Batch(finish_images(images, self.cfg, self.device, hwc=False))
                if self.cfg.with_landmarks:
                    batch.landmarks = finish_landmarks(landmarks, flips, self.device)
                if self.cfg.with_meta:
                    batch.labels, batch.keys = labels.to(self.device), list(keys)
                yield batch
        except UserError as e:
            raise UserError(_worker_message(str(e))) from None
        finally:
            self.close()

    def close(self) -> None:
        # An epoch left half-way would otherwise keep its workers until garbage collection.
        shutdown = getattr(self._workers, "_shutdown_workers", None)  # absent with threads=0
        if shutdown is not None:
            shutdown()
        self._workers = None


def _worker_message(text: str) -> str:
    """A worker's error as DataLoader re-raises it ("Caught UserError in DataLoader worker process 0." and the
    worker's traceback) -> the worker's own one sentence; any other text as it is."""
    if not text.startswith("Caught "):
        return text
    _, _, message = text.rstrip().splitlines()[-1].partition(": ")  # "pipeline.errors.UserError: <message>"
    return message or text
