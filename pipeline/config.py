"""Configuration as dataclasses: one section per concern, one comment per field."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    shards: str = "demo/shards/celeba"  # a dataset folder written by `python -m shards` (it holds manifest.json)
    split: str = "train"  # train | val | test
    loader: str = "dali"  # dali | baseline (webdataset-format shards, torch DataLoader workers, PIL decoding)
    batch_size: int = 128  # per rank
    image_size: int = 64  # side of the square images the model sees
    center_crop: bool | None = None  # square centre crop before resizing; None: on for CelebA, off for face crops
    flip: bool = True  # random horizontal flips
    shuffle: bool = True  # a new seeded order every epoch
    shuffle_buffer: int = 4096  # DALI's shuffle buffer (samples); the baseline permutes the whole split
    seed: int = 0  # order and flips are a function of (seed, epoch, rank)
    threads: int = 4  # DALI CPU threads, or the baseline's DataLoader worker processes
    dtype: str = "float32"  # float32 | float16 | bfloat16
    channels_last: bool = False  # NHWC memory layout (the tensor stays N, C, H, W)
    with_meta: bool = False  # also return labels and sample keys (evaluation needs them)
    hw_decoder_load: float = 0.65  # share of JPEGs for the A100/H100 hardware decoder on GPUs (DALI)
