"""TensorBoard and Weights & Biases behind one small interface, used by rank 0 alone.

Named `loggers`, not `logging`, so that no reader mistakes it for the standard library module.
wandb is imported only when enabled: it starts a service process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError

WANDB_MODES = ("offline", "online", "disabled")  # log.wandb; wandb.init's own modes, less its aliases


def new_run_id() -> str:
    import secrets

    return secrets.token_hex(4)


class RunLogger:
    def __init__(self, run_dir: Path, cfg: Any, config_dict: dict, run_id: str, resumed: bool, purge_step: int | None = None):
        """`purge_step`: training resumed before this step, so TensorBoard drops what the run logged from it on
        before (a resume from an older checkpoint, or steps past the last checkpoint): one curve, not two that zigzag."""
        self.run_id = run_id
        self._tb = None
        self._wandb = None
        if cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir), purge_step=purge_step)
        if cfg.log.wandb != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            try:
                self._wandb = wandb.init(
                    project=cfg.log.project, group=cfg.log.group, name=cfg.train.name, job_type=cfg.log.job_type,
                    tags=list(cfg.log.tags), config=config_dict, dir=str(run_dir), mode=cfg.log.wandb,
                    id=run_id, resume="allow" if resumed else None,
                )
            except (wandb.Error, TimeoutError) as e:  # no API key on a compute node, no route to wandb's servers
                self.close()
                why = (str(e).strip().splitlines() or [""])[0]
                fix = ("log in where the run starts (`wandb login`, or WANDB_API_KEY), or set log.wandb=offline and "
                       "`wandb sync` its folder later, or log.wandb=disabled" if cfg.log.wandb == "online" else
                       "set log.wandb=disabled to train without it")
                raise UserError(f"wandb could not start the run in log.wandb={cfg.log.wandb} mode ({type(e).__name__}: "
                                f"{why}): {fix}.") from None

    @property
    def wandb_dir(self) -> str | None:
        return self._wandb.dir if self._wandb is not None else None

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def image(self, tag: str, grid: torch.Tensor, step: int) -> None:
        """`grid`: [3, H, W] floats in [0, 1]."""
        if self._tb is not None:
            self._tb.add_image(tag, grid, step)
        if self._wandb is not None:
            import wandb

            array = (grid.permute(1, 2, 0).clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()
            self._wandb.log({tag: wandb.Image(array)}, step=step)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        if self._tb is not None:
            clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
            self._tb.add_hparams(clean, metrics, run_name=".")  # in the run's own folder, not a subfolder

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
