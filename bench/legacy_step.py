"""The training step as it was before issue 10 (commit 692a7d9), kept to measure the new one against.

What it does that the new step (pipeline/step.py) does not: two all-reduced flag checks read on the
host every step (`.tolist()`), default (unfused) Adam with a disabled scaler in fp32/bf16, three
separate forwards of D, and a G pass through D that computes D's gradients and throws them away.
Models, inputs and losses are the same, so the two compare step for step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline import dist
from pipeline.step import GANStep


class LegacyStep:
    def __init__(self, new: GANStep):
        self.new, t = new, new.cfg.train
        self.G, self.D = new.G_raw, new.D_raw
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=t.lr_G, betas=tuple(t.betas))
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=t.lr_D, betas=tuple(t.betas))
        fp16 = new.fast.precision == "fp16"
        self.scaler_G = torch.amp.GradScaler(new.device.type, enabled=fp16)
        self.scaler_D = torch.amp.GradScaler(new.device.type, enabled=fp16)

    def _agree(self, *flags: float) -> list[float]:
        agreed = dist.all_reduce_(torch.tensor(flags, device=self.new.device), op=torch.distributed.ReduceOp.MAX)
        return agreed.tolist()

    def __call__(self, batch, step: int) -> dict[str, torch.Tensor]:
        new, t = self.new, self.new.cfg.train
        x = new.make_inputs(batch)
        z = torch.randn(x.real.shape[0], new.cfg.model.nz, 1, 1, device=new.device, generator=new.noise)
        stats: dict[str, torch.Tensor] = {}
        self.opt_D.zero_grad(set_to_none=True)
        with new.autocast():
            logits_real = self.D(x.real)
            loss_D = F.softplus(-logits_real).mean()
            fake = self.G(z)
            loss_D = loss_D + t.gan_weight * F.softplus(self.D(fake.detach())).mean()
            if x.blend is not None:
                logits_blend = self.D(x.blend)
                weight = x.valid.float() / x.valid.sum().clamp(min=1)
                loss_D = loss_D + t.sbi_weight * (F.softplus(logits_blend.float()) * weight).sum()
        self.scaler_D.scale(loss_D).backward()
        (bad_D,) = self._agree(float(not torch.isfinite(loss_D)))
        if not bad_D:
            self.scaler_D.step(self.opt_D)
            self.scaler_D.update()
        self.opt_G.zero_grad(set_to_none=True)
        with new.autocast():
            loss_G = F.softplus(-self.D(fake)).mean()
        self.scaler_G.scale(loss_G).backward()
        bad_G, _ = self._agree(float(not torch.isfinite(loss_G)), 0.0)
        if not (bad_D or bad_G):
            self.scaler_G.step(self.opt_G)
            self.scaler_G.update()
            new._update_ema(step)
        stats.update({"loss/D": loss_D.detach(), "loss/G": loss_G.detach()})
        return stats
