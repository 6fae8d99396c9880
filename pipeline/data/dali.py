"""The DALI loader: `fn.readers.webdataset` with the index files, JPEG decoding on the GPU.

One pipeline per epoch: it is built with the epoch's seed and tar order, reads this rank's part
(`shard_id=rank`, `num_shards=world_size`), yields exactly the epoch's batch count and is then
dropped. Building costs well under a second, which buys an order that changes every epoch yet is a
pure function of (seed, epoch, rank), and a fresh reader that emits each of its samples at most once.
Resuming inside an epoch replays the epoch's pipeline and drops the batches already seen.
"""

from __future__ import annotations

import logging
from typing import Iterator

import torch

from pipeline.config import DataConfig
from pipeline.data.common import Batch, ShardLoader, epoch_rng, find_undecodable, finish_images, finish_landmarks
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


def _build_pipeline(cfg: DataConfig, tars, indexes, rank, world_size, device_id, seed, center_crop, image_ext):
    from nvidia.dali import fn, pipeline_def, types

    on_gpu = device_id is not None
    extra = ["lmk"] if cfg.with_landmarks else []

    @pipeline_def(batch_size=cfg.batch_size, num_threads=cfg.threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=2)
    def pipeline():
        jpg, cls, *lmk = fn.readers.webdataset(
            paths=tars, index_paths=indexes, ext=[image_ext, "cls", *extra], missing_component_behavior="error",
            random_shuffle=cfg.shuffle, initial_fill=cfg.shuffle_buffer, shard_id=rank, num_shards=world_size,
            pad_last_batch=not cfg.drop_last, name="reader",
        )
        decoder = {"device": "mixed", "hw_decoder_load": cfg.hw_decoder_load} if on_gpu else {"device": "cpu"}
        mirror = fn.random.coin_flip(probability=0.5) if cfg.flip else fn.constant(idata=0, dtype=types.INT32)
        images = image_ops(jpg, cfg.image_size, decoder, center_crop,
                           types.FLOAT16 if cfg.dtype == "float16" else types.FLOAT,
                           "HWC" if cfg.channels_last else "CHW", mirror)
        labels = fn.cast(cls, dtype=types.INT64) - ord("0")  # `.cls` holds the label as ASCII text
        return (images, labels, *lmk, mirror) if lmk else (images, labels)

    pipe = pipeline()
    pipe.build()
    return pipe


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
    def __init__(self, cfg: DataConfig, rank: int, world_size: int, device: torch.device):
        super().__init__(cfg, rank, world_size, device)
        self.device_id = device.index if device.type == "cuda" else None
        if device.type == "cuda" and self.device_id is None:
            self.device_id = torch.cuda.current_device()
        self._pipe = None

    def _epoch(self, epoch: int, start: int) -> Iterator[Batch]:
        rng = epoch_rng(self.cfg.seed, epoch)
        order = rng.permutation(len(self.split.shards)) if self.cfg.shuffle else range(len(self.split.shards))
        tars = [str(self.split.shards[i][0]) for i in order]
        indexes = [str(self.split.shards[i][1]) for i in order]
        seed = (int(rng.integers(2**31 - 1)) + self.rank) % (2**31 - 1)  # flips differ per rank, reproducibly
        self.close()
        self._pipe = _build_pipeline(self.cfg, tars, indexes, self.rank, self.world_size, self.device_id, seed,
                                     self.center_crop, self.image_member)
        try:
            for b in range(self.batches):
                images, labels, *landmarks = self._run()
                if b < start:
                    continue  # replaying up to the saved position
                batch = Batch(finish_images(_to_torch(images, self.device), self.cfg, self.device, self.cfg.channels_last))
                if landmarks:
                    cpu = torch.device("cpu")
                    batch.landmarks = finish_landmarks(_to_torch(landmarks[0], cpu), _to_torch(landmarks[1], cpu), self.device)
                if self.cfg.with_meta:
                    batch.labels = _to_torch(labels, torch.device("cpu")).reshape(-1).to(self.device)
                    batch.keys = [_key(images[i].source_info()) for i in range(len(images))]
                yield batch
        finally:
            self.close()

    def _run(self):
        try:
            return self._pipe.run()
        except RuntimeError as e:
            # DALI's messages name neither the shard nor the sample (nor always the word "decode"):
            # look for a broken JPEG ourselves, and pass any other failure on as it is.
            bad = find_undecodable(self.split, self.image_member)
            if bad is None:
                raise
            raise UserError(f"{bad[0]} holds sample {bad[1]}, whose JPEG does not decode: remove it or write the shard again with `python -m shards`.") from e

    def close(self) -> None:
        if self._pipe is not None:
            del self._pipe  # DALI stops its threads when the pipeline is freed
            self._pipe = None


def _key(source_info: str) -> str:
    """'<tar path>:<offset>:<member>' -> '<tar file>/<sample key>'."""
    path, _, member = source_info.rsplit(":", 2)
    return f"{path.rsplit('/', 1)[-1]}/{member.split('.', 1)[0]}"
