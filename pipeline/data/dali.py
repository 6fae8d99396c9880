"""The DALI loader: `fn.readers.webdataset` with the index files, JPEG decoding on the GPU.

One pipeline per run. The reader reads this rank's part (`shard_id=rank`, `num_shards=world_size`) of the
split. Its shuffle buffer (`data.shuffle_buffer`) holds a few thousand samples, and a shard up to 10,000 of one
dataset: read shard after shard, a rank would spend dozens of steps in one dataset. So a shuffled loader cuts
the split into runs of `data.shuffle_chunk` consecutive samples, each its own index file into its tar, and the
reader deals those out in a new order at each of its epochs (`shuffle_after_epoch`, one seed on every rank, so
the parts stay a partition of the split): the buffer then mixes some 32 runs, reads stay sequential within a
run, and the global batch at step t draws from other runs every epoch. An unshuffled loader (validation,
evaluation) reads the same part at every epoch instead (`stick_to_shard`), so what a rank validates on never
depends on how many validations came before: a resumed run calibrates on the same faces and self-blends as an
uninterrupted one. The reader's epochs end on a batch boundary (`pad_last_batch`). An epoch of ours is the
loader's batch count (`ShardLoader.batches`: equal on all ranks with drop_last, else this rank's part): the 0-2 batches the reader's epoch
holds beyond it are run and dropped, so that every epoch starts at the reader's epoch start and reads each
sample at most once. The order is a pure function of (data.seed, epoch, rank).

Resuming restores DALI's own checkpoint (`enable_checkpointing`, `Pipeline.checkpoint()`), which
holds the reader's position and every random generator's state: a resumed stream is the uninterrupted
one, without replaying a single batch. A run resumed with another world size or batch size starts a
fresh stream at the saved epoch and position, in a different order; so does one whose reader differs from
the saved one (other shards or runs of them, other members, flips or decoder), whose DALI state would not fit.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pipeline import dist
from pipeline.config import DataConfig
from pipeline.data.common import Batch, ShardLoader, find_undecodable, finish_images, finish_landmarks, write_index
from pipeline.errors import UserError

log = logging.getLogger(__name__)


def image_ops(jpg, image_size: int, decoder: dict, center_crop: bool, dtype, layout: str, mirror):
    """Encoded JPEGs -> [-1, 1] images of `image_size`: the one preprocessing that training, evaluation and
    `detect` share (a DALI graph; call inside a pipeline definition)."""
    from nvidia.dali import fn, types

    if center_crop:
        # Decode only the centre square (ROI decoding): CelebA's 178x218 becomes 178x178.
        shape = fn.peek_image_shape(jpg)
        side = fn.cast(fn.reductions.min(fn.slice(shape, 0, 2, axes=[0])), dtype=types.FLOAT)
        images = fn.decoders.image_crop(jpg, output_type=types.RGB, crop_h=side, crop_w=side, **decoder)
    else:
        images = fn.decoders.image(jpg, output_type=types.RGB, **decoder)
    images = fn.resize(images, resize_x=image_size, resize_y=image_size, antialias=True)
    return fn.crop_mirror_normalize(images, dtype=dtype, output_layout=layout, mean=[127.5] * 3, std=[127.5] * 3,
                                    mirror=mirror)  # [0, 255] -> [-1, 1]


# Where faces are scored (validation's calibration, evaluation, detection), every JPEG goes to the CUDA decoder:
# DALI hands the first hw_decoder_load of a batch to the A100/H100 hardware decoder, whose pixels differ slightly, so a
# face's score would depend on its place in the batch, and so on the batch size and the number of ranks.
SCORING_HW_DECODER_LOAD = 0.0


def decoder_args(on_gpu: bool, hw_decoder_load: float) -> dict:
    """fn.decoders.image's placement: the GPU ("mixed") with this share for the hardware decoder, else the CPU."""
    return {"device": "mixed", "hw_decoder_load": hw_decoder_load} if on_gpu else {"device": "cpu"}


def _build_pipeline(cfg: DataConfig, tars, indexes, rank, world_size, device_id, seed, center_crop, image_ext,
                    checkpoint: str | None = None):
    from nvidia.dali import fn, pipeline_def, types

    on_gpu = device_id is not None
    extra = ["lmk"] if cfg.with_landmarks else []

    @pipeline_def(batch_size=cfg.batch_size, num_threads=cfg.threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=2, enable_checkpointing=True)
    def pipeline():
        jpg, cls, *lmk = fn.readers.webdataset(
            paths=tars, index_paths=indexes, ext=[image_ext, "cls", *extra], missing_component_behavior="error",
            random_shuffle=cfg.shuffle, initial_fill=cfg.shuffle_buffer, shard_id=rank, num_shards=world_size,
            pad_last_batch=True, name="reader", **_order_args(cfg),
        )
        decoder = decoder_args(on_gpu, cfg.hw_decoder_load)
        mirror = fn.random.coin_flip(probability=0.5) if cfg.flip else fn.constant(idata=0, dtype=types.INT32)
        images = image_ops(jpg, cfg.image_size, decoder, center_crop,
                           types.FLOAT16 if cfg.dtype == "float16" else types.FLOAT,
                           "HWC" if cfg.channels_last else "CHW", mirror)
        labels = fn.cast(cls, dtype=types.INT64) - ord("0")  # `.cls` holds the label as ASCII text
        if lmk and on_gpu:  # landmarks and flips arrive on the GPU with the images: no host copy in the step
            return images, labels, lmk[0].gpu(), mirror.gpu()
        return (images, labels, *lmk, mirror) if lmk else (images, labels)

    pipe = pipeline(checkpoint=checkpoint) if checkpoint else pipeline()
    pipe.build()
    return pipe


def _order_args(cfg: DataConfig) -> dict:
    """Shuffled, the reader deals its entries (our runs) out in a new order at every epoch, the same on every rank
    (one seed), so each epoch's parts are a new partition of the split; unshuffled, a rank reads its own part."""
    if cfg.shuffle:
        return {"shuffle_after_epoch": True, "shuffle_after_epoch_seed": cfg.seed}
    return {"stick_to_shard": True}


def _to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    """A dense DALI batch as a torch tensor; GPU batches are copied on the current stream."""
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    if device.type == "cuda":
        dense = tensor_list.as_tensor()
        out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(tensor_list.as_array())


class DaliLoader(ShardLoader):
    def __init__(self, cfg: DataConfig, rank: int, world_size: int, device: torch.device, fit_batch: bool = False):
        super().__init__(cfg, rank, world_size, device, fit_batch)
        self.device_id = device.index if device.type == "cuda" else None
        if device.type == "cuda" and self.device_id is None:
            self.device_id = torch.cuda.current_device()
        self._pipe = None
        self._checkpoint: str | None = None  # DALI's, restored when the pipeline is built
        self._reader_epoch = 0  # the reader's epochs since the pipeline's stream began
        self._reader_batch = 0  # batches run in the reader's current epoch

    def _runs(self) -> list[tuple[int, int, int]]:
        """(shard, first, stop) of the entries the reader reads, in order: runs of data.shuffle_chunk samples in a
        seeded order when shuffled (whole shards with shuffle_chunk 0), else every shard whole, in order."""
        chunk = self.cfg.shuffle_chunk if self.cfg.shuffle else 0
        sizes = [len(entries) for entries in self.split.entries]
        runs = [(i, first, min(n, first + (chunk or n))) for i, n in enumerate(sizes) for first in range(0, n, chunk or n)]
        if not self.cfg.shuffle:
            return runs
        order = np.random.default_rng([self.cfg.seed]).permutation(len(runs))
        return [runs[k] for k in order]

    def _reader_files(self, runs: list[tuple[int, int, int]], folder: Path) -> tuple[list[str], list[str]]:
        """The tars and index files of `runs`: a shard read whole keeps its index, any other run (and real_only's share
        of a shard) gets its own, in `folder`."""
        tars, indexes = [], []
        for shard, first, stop in runs:
            tar, idx = self.split.shards[shard]
            if idx is None or (first, stop) != (0, len(self.split.entries[shard])):
                idx = write_index(folder / f"run-{len(indexes):06d}-{tar.stem}.idx", self.split.entries[shard][first:stop])
            tars.append(str(tar))
            indexes.append(str(idx))
        return tars, indexes

    def _fingerprint(self) -> str:
        """What the reader reads and makes, in order: a saved DALI state fits only the same."""
        runs = [(self.split.shards[i][0].name, self.split.entries[i][first].key, stop - first) for i, first, stop in self._runs()]
        what = {"runs": runs, "members": [self.image_member, "lmk" if self.cfg.with_landmarks else ""],
                "flip": self.cfg.flip, "shuffle": self.cfg.shuffle, "buffer": self.cfg.shuffle_buffer,
                "seed": self.cfg.seed, "order": _order_args(self.cfg), "gpu": self.device_id is not None,
                "image_size": self.cfg.image_size, "dtype": self.cfg.dtype, "layout": self.cfg.channels_last}
        return hashlib.sha256(json.dumps(what).encode()).hexdigest()

    def _build(self) -> None:
        # DALI reads the index files when the pipeline is built, never after: the runs' own go straight away, so
        # none is left behind by a rank that is killed (SIGKILL runs no clean-up).
        with tempfile.TemporaryDirectory(prefix="dali-runs-") as folder:
            self._build_from(*self._reader_files(self._runs(), Path(folder)))

    def _build_from(self, tars: list[str], indexes: list[str]) -> None:
        rng = np.random.default_rng([self.cfg.seed, 1])
        seed = (int(rng.integers(2**31 - 1)) + self.rank) % (2**31 - 1)  # flips differ per rank, reproducibly
        build = functools.partial(_build_pipeline, self.cfg, tars, indexes, self.rank, self.world_size, self.device_id,
                                  seed, self.center_crop, self.image_member)
        if self._checkpoint is None:
            self._pipe = build()
            return
        problem = None
        try:
            self._pipe = build(self._checkpoint)
        except RuntimeError as e:
            problem = str(e).splitlines()[0]
        # Every rank restores the saved state, or none does: a reader's part depends on its epoch, so one rank alone
        # at reader epoch 0 would read samples its neighbours read, and leave others unread, for the rest of the run.
        problems = [p for p in dist.all_gather_objects(problem) if p is not None]
        if problems:
            log.warning("the saved DALI state does not fit this pipeline on %d rank(s) (%s): epoch %d continues at "
                        "batch %d in a fresh order", len(problems), problems[0], self.epoch, self.batch)
            self._pipe = None  # freed (where the state fitted, one was built) before the fresh one is built
            self._checkpoint, self._reader_epoch, self._reader_batch = None, 0, 0
            self._pipe = build()

    def _reader_epoch_batches(self) -> int:
        """Batches in the reader's epoch: with pad_last_batch DALI pads every part to the longest part's length
        (ceil(N / world_size), its ShouldPadBatch), then to whole batches; the same on every rank and epoch."""
        longest = -(-self.split.samples // self.world_size)
        return -(-longest // self.cfg.batch_size)

    def _epoch(self, epoch: int, start: int) -> Iterator[Batch]:
        if self._pipe is None:
            self._build()
        for _ in range(start, self.batches):
            images, labels, *landmarks = self._run()
            batch = Batch(finish_images(_to_torch(images, self.device), self.cfg, self.device, self.cfg.channels_last))
            if landmarks:
                where = self.device if self.device_id is not None else torch.device("cpu")
                batch.landmarks = finish_landmarks(_to_torch(landmarks[0], where), _to_torch(landmarks[1], where), self.device)
            if self.cfg.with_meta:
                batch.labels = _to_torch(labels, torch.device("cpu")).reshape(-1).to(self.device)
                batch.keys = [_key(images[i].source_info()) for i in range(len(images))]
            yield batch
        while self._reader_batch < self._reader_epoch_batches():
            self._run()  # the reader's epoch beyond ours: dropped, so the next epoch starts at the reader's
        self._reader_epoch, self._reader_batch = self._reader_epoch + 1, 0

    def _run(self):
        try:
            out = self._pipe.run()
            self._reader_batch += 1
            return out
        except RuntimeError as e:
            # DALI names the failing operator but neither the shard nor the sample: for a decoder's failure,
            # find the broken JPEG ourselves (a full rescan, slow); anything else (the reader, memory, CUDA)
            # passes on as it is.
            if not _is_decode_error(str(e)):
                raise
            bad = find_undecodable(self.split, self.image_member)
            if bad is None:
                raise
            raise UserError(f"{bad[0]} holds sample {bad[1]}, whose JPEG does not decode: remove it or write the shard again with `python -m shards`.") from e

    def state_dict(self) -> dict:
        dali = self._pipe.checkpoint() if self._pipe is not None else self._checkpoint
        return {**super().state_dict(), "dali": dali, "reader_epoch": self._reader_epoch, "reader_batch": self._reader_batch,
                "reader": self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.close()
        same_reader = state.get("reader") == self._fingerprint()
        if self._same_shape(state) and state.get("dali") and same_reader:
            self._checkpoint, self._reader_epoch, self._reader_batch = state["dali"], state["reader_epoch"], state["reader_batch"]
        else:  # another shape of run or reader, or a checkpoint from before one pipeline per run: a fresh stream
            self._checkpoint, self._reader_epoch, self._reader_batch = None, 0, 0
            if self._same_shape(state):
                why = "another reader (shards, members, flips or decoder)" if state.get("dali") else "no DALI state"
                log.warning("loader resumed from a checkpoint with %s: epoch %d continues at batch %d, in a different "
                            "order", why, self.epoch, self.batch)

    def close(self) -> None:
        if self._pipe is not None:
            with contextlib.suppress(RuntimeError):  # a pipeline that failed has no stream to continue
                self._checkpoint = self._pipe.checkpoint()  # iterating again continues the stream where it stopped
            del self._pipe  # DALI stops its threads when the pipeline is freed
            self._pipe = None


NOT_DATA_ERRORS = ("out of memory", "cuda error", "cudaerror", "cuda_error")


def _is_decode_error(message: str) -> bool:
    """DALI's error names the operator: `fn.decoders.image` (and `image_crop`) fail on data, unless the
    failure is the device's (memory, CUDA), which no rescan of the shards would explain."""
    text = message.lower()
    return "fn.decoders.image" in text and not any(s in text for s in NOT_DATA_ERRORS)


def _key(source_info: str) -> str:
    """'<tar path>:<offset>:<member>' -> '<tar file>/<sample key>'."""
    path, _, member = source_info.rsplit(":", 2)
    return f"{path.rsplit('/', 1)[-1]}/{member.split('.', 1)[0]}"
