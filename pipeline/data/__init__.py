"""Loaders that read the shards and give every rank its own part: `build_loader` is the one face."""

from __future__ import annotations

import torch

from pipeline.config import DataConfig
from pipeline.data.common import Batch, ShardLoader
from pipeline.errors import UserError

__all__ = ["Batch", "DataConfig", "ShardLoader", "build_loader"]


def build_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
                 fit_batch: bool = False) -> ShardLoader:
    """A loader of `cfg.split` for one rank; batches arrive as tensors on `device`.

    DALI decodes on the GPU when `device` is CUDA and on the CPU otherwise. `fit_batch` lowers the batch
    size to what a small split (validation) can fill on every rank.
    """
    device = torch.device(device)
    if cfg.loader == "dali":
        from pipeline.data.dali import DaliLoader

        return DaliLoader(cfg, rank, world_size, device, fit_batch)
    if cfg.loader == "baseline":
        from pipeline.data.baseline import BaselineLoader

        return BaselineLoader(cfg, rank, world_size, device, fit_batch)
    raise UserError(f"data.loader {cfg.loader!r} is neither 'dali' nor 'baseline': choose one of them.")
