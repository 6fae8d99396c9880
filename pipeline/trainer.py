"""The distributed DCGAN trainer: DDP, AMP, EMA, validation, exact checkpoints, signals, logging.

D learns from three kinds of input: real faces (real), G's samples (fake, weighted by train.gan_weight)
and self-blends of the real batch (fake, weighted by train.sbi_weight; pipeline/sbi.py), made on the
training device inside the step. Reals and blends then get the same random quality degradations, so
that image quality never tells them apart. Validation also scores the val reals against their
self-blends and keeps the equal-error threshold, which the checkpoint carries to evaluate and detect.

Every rank runs the same steps; decisions that must agree (skip a non-finite step, stop on a signal)
are all-reduced, so no rank ever waits in a collective the others have left.

DDP wraps G and D separately without buffer syncing before each forward (`broadcast_buffers=False`,
called `forward_sync_buffers=False` from torch 2.15): D runs forward twice before its backward
(real, then fake), and broadcasting BatchNorm's running statistics in between is an in-place write to
tensors autograd still needs. Train-mode BatchNorm normalizes with the batch's own statistics, so the
running statistics only matter in eval mode; each rank keeps its own, and checkpoints hold rank 0's.
SyncBatchNorm would instead all-reduce statistics in every BatchNorm layer of every forward: one
collective per layer per pass, for per-GPU batches (128) that are large enough on their own.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import logging
import random
import resource
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.utils import make_grid, save_image

from pipeline import dist
from pipeline.checkpoint import CheckpointManager
from pipeline.config import Config, flat_dict, to_dict
from pipeline.data import build_loader
from pipeline.data.common import load_split
from pipeline.dist import DistInfo
from pipeline.errors import UserError
from pipeline.fsutil import write_bytes_atomic
from pipeline.loggers import RunLogger, new_run_id
from pipeline.metrics import auc, eer, eer_threshold
from pipeline.models import D_NORMS, SIZES, build_models
from pipeline.progress import Meter, hms
from pipeline.sbi import degrade, self_blend

log = logging.getLogger(__name__)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SAMPLE_GRID = 64  # fixed-noise images in a sample grid


class TrainingDiverged(UserError):
    exit_code = 3


def _check(cfg: Config) -> None:
    t = cfg.train
    if t.precision not in PRECISIONS:
        raise UserError(f"train.precision {t.precision!r} is not one of {sorted(PRECISIONS)}: choose one of those.")
    if cfg.data.image_size not in SIZES:
        raise UserError(f"data.image_size {cfg.data.image_size} is not one of {SIZES}: the DCGAN is built for those.")
    if t.precision == "fp16" and not torch.cuda.is_available():
        log.warning("train.precision fp16 on a CPU is slow and gains nothing; bf16 is the CPU's half precision")
    if t.eval_every_epochs and not t.eval_shards:
        raise UserError("train.eval_every_epochs is set but train.eval_shards is not: name the Celeb-DF shards folder.")
    if t.sbi_weight < 0 or t.gan_weight < 0 or t.sbi_weight + t.gan_weight == 0:
        raise UserError(f"train.sbi_weight {t.sbi_weight} and train.gan_weight {t.gan_weight} must be >= 0 and not both 0: "
                        "D needs something fake to learn from.")
    if t.sbi_weight and cfg.data.crop != "face":
        raise UserError("train.sbi_weight needs the face crops and their landmarks: set data.crop=face.")
    if cfg.model.d_norm not in D_NORMS:
        raise UserError(f"model.d_norm {cfg.model.d_norm!r} is not one of {D_NORMS}: choose one of those.")
    for key in ("epochs", "log_every_steps", "sample_every_steps", "ckpt_every_steps", "ckpt_keep_last", "max_nonfinite_steps"):
        if getattr(t, key) < 1:
            raise UserError(f"train.{key} is {getattr(t, key)}: it must be at least 1.")


def _rng_state(noise: torch.Generator, device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "noise": noise.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], noise: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    noise.set_state(state["noise"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class Trainer:
    def __init__(self, cfg: Config, info: DistInfo):
        _check(cfg)
        self.cfg, self.info, self.device = cfg, info, info.device
        t = cfg.train
        self.run_dir = Path(t.runs_dir) / t.name
        random.seed(t.seed * 1000 + info.rank)
        torch.manual_seed(t.seed * 1000 + info.rank)
        self.noise = torch.Generator(device=self.device).manual_seed(t.seed * 1000 + info.rank)
        self.step = self.nimg = 0
        self.saved_step = -1
        self.nonfinite_in_row = self.nonfinite_total = 0
        self._stop_signal = 0
        self.sbi = t.sbi_weight > 0
        # Any D scored on face crops gets a threshold: val reals against their self-blends need only landmarks.
        self.calibrates = cfg.data.crop == "face"
        self.threshold: float | None = None  # the calibrated verdict threshold on P(fake); set by validate()
        self.calibration: dict[str, float] = {}
        self.logger: RunLogger | None = None
        self.init_models()
        self.init_data()
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", t.ckpt_keep_last)
        run_id = self.load_checkpoint()
        self.init_logging(run_id)
        # Preemption and time limits: save, then stop. The previous handlers come back in close().
        self._previous_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}

    # ------------------------------------------------------------------ init
    def init_models(self) -> None:
        m, t, info = self.cfg.model, self.cfg.train, self.info
        G, D = build_models(m.nz, m.ngf, m.ndf, self.cfg.data.image_size, torch.Generator().manual_seed(t.seed), m.d_norm)
        layout = torch.channels_last if t.channels_last else torch.contiguous_format
        self.G_raw = G.to(self.device, memory_format=layout)
        self.D_raw = D.to(self.device, memory_format=layout)
        self.G_ema = copy.deepcopy(self.G_raw).eval().requires_grad_(False)
        self.opt_G = torch.optim.Adam(G.parameters(), lr=t.lr_G, betas=tuple(t.betas))
        self.opt_D = torch.optim.Adam(D.parameters(), lr=t.lr_D, betas=tuple(t.betas))
        fp16 = t.precision == "fp16"
        self.scaler_G = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.scaler_D = torch.amp.GradScaler(self.device.type, enabled=fp16)
        dtype = PRECISIONS[t.precision]
        self.autocast = lambda: torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)  # noqa: E731
        if info.distributed:
            self.G, self.D_ddp = self._ddp(self.G_raw), self._ddp(self.D_raw)
            self.D = self.D_ddp
        else:
            self.G, self.D, self.D_ddp = self.G_raw, self.D_raw, None
        if t.compile:
            self.G, self.D = torch.compile(self.G), torch.compile(self.D)

    def _ddp(self, module: torch.nn.Module) -> DDP:
        ids = [self.info.local_rank] if self.device.type == "cuda" else None
        renamed = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
        no_buffer_sync = {"forward_sync_buffers": False} if renamed else {"broadcast_buffers": False}
        return DDP(module, device_ids=ids, **no_buffer_sync)

    def init_data(self) -> None:
        t, info = self.cfg.train, self.info
        d = replace(self.cfg.data, with_landmarks=self.sbi)
        self.loader = build_loader(d, info.rank, info.world_size, self.device)
        self.val_loader = None
        if t.val_every_epochs:
            # A val split smaller than world x batch still validates, in smaller batches.
            val = replace(d, split=t.val_split, shuffle=False, flip=False, with_meta=False, with_landmarks=self.calibrates)
            split = load_split(val)
            n_val = split.samples
            split.close()
            val = replace(val, batch_size=max(1, min(d.batch_size, n_val // info.world_size)))
            self.val_loader = build_loader(val, info.rank, info.world_size, self.device)
        self.global_batch = d.batch_size * info.world_size
        total = t.epochs * len(self.loader)
        self.total_steps = min(total, t.max_steps) if t.max_steps else total
        fixed = torch.Generator().manual_seed(t.seed)  # the same grid noise on every rank and every run
        self.fixed_noise = torch.randn(SAMPLE_GRID, self.cfg.model.nz, 1, 1, generator=fixed).to(self.device)

    def init_logging(self, run_id: str | None) -> None:
        resumed = run_id is not None
        if self.info.is_main:
            run_id = run_id or new_run_id()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            import yaml

            write_bytes_atomic(self.run_dir / "config.yaml", yaml.safe_dump(to_dict(self.cfg), sort_keys=False).encode())
            self.logger = RunLogger(self.run_dir, self.cfg, to_dict(self.cfg), run_id, resumed)
        self.run_id = dist.broadcast_object(run_id)

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The whole training state; a collective (it gathers every rank's RNG state)."""
        return {
            "G": self.G_raw.state_dict(), "D": self.D_raw.state_dict(), "G_ema": self.G_ema.state_dict(),
            "opt_G": self.opt_G.state_dict(), "opt_D": self.opt_D.state_dict(),
            "scaler_G": self.scaler_G.state_dict(), "scaler_D": self.scaler_D.state_dict(),
            "step": self.step, "nimg": self.nimg, "epoch": self.loader.epoch, "loader": self.loader.state_dict(),
            "rng": dist.all_gather_objects(_rng_state(self.noise, self.device)),
            "nonfinite_total": self.nonfinite_total, "config": to_dict(self.cfg),
            "threshold": self.threshold, "calibration": self.calibration,
            "wandb_run_id": self.run_id, "world_size": self.info.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("G", "D", "G_ema"):
            getattr(self, f"{name}_raw" if name != "G_ema" else name).load_state_dict(state[name])
        for name in ("opt_G", "opt_D", "scaler_G", "scaler_D"):
            getattr(self, name).load_state_dict(state[name])
        for opt, lr in ((self.opt_G, self.cfg.train.lr_G), (self.opt_D, self.cfg.train.lr_D)):
            for group in opt.param_groups:
                group["lr"] = lr  # the config, not the checkpoint, says the learning rate
        self.step, self.nimg, self.nonfinite_total = state["step"], state["nimg"], state["nonfinite_total"]
        self.threshold, self.calibration = state.get("threshold"), state.get("calibration", {})
        self.loader.load_state_dict(state["loader"])
        rank = self.info.rank
        if state["world_size"] == self.info.world_size:
            _set_rng_state(state["rng"][rank], self.noise, self.device)
        else:  # other ranks than were saved: fresh, reproducible streams
            self.noise.manual_seed(self.cfg.train.seed * 1000 + rank + 7919 * self.step)

    def load_checkpoint(self) -> str | None:
        """Resume as train.resume says; rank 0 chooses the file so that all ranks load the same one."""
        path = self.ckpt.find(self.cfg.train.resume) if self.info.is_main else None
        path = dist.broadcast_object(str(path) if path else None)
        if path is None:
            return None
        state = CheckpointManager.load(Path(path))
        self.load_state_dict(state)
        if self.info.is_main:
            log.info("resumed from %s: step %d, epoch %d, batch %d (saved by %d ranks, now %d)", path, self.step,
                     self.loader.epoch, self.loader.batch, state["world_size"], self.info.world_size)
        return state["wandb_run_id"]

    def check_replicas(self) -> None:
        """Every rank must hold the same G and D; a difference means DDP was bypassed somewhere."""
        digest = hashlib.sha256()
        for module in (self.G_raw, self.D_raw):
            for p in module.parameters():
                digest.update(p.detach().cpu().numpy().tobytes())
        digests = dist.all_gather_objects(digest.hexdigest())
        if len(set(digests)) != 1:
            raise RuntimeError(f"step {self.step}: G and D differ between ranks (parameter digests {digests})")
        if self.info.is_main and self.info.distributed:
            log.info("step %d: parameters identical on all %d ranks (%s)", self.step, self.info.world_size, digests[0][:12])

    def save(self) -> None:
        if self.saved_step == self.step:
            return  # an epoch's end that is also a checkpoint step
        if self.nonfinite_in_row:
            if self.info.is_main:
                log.warning("step %d: no checkpoint while losses are not finite; the last good one stays the newest", self.step)
            return
        self.saved_step = self.step
        self.check_replicas()
        state = self.state_dict()
        if self.info.is_main:
            path = self.ckpt.save(state, self.step)
            log.info("checkpoint %s", path)
        dist.barrier()

    # ------------------------------------------------------------------ steps
    def _no_sync_D(self):
        return self.D_ddp.no_sync() if self.D_ddp is not None else contextlib.nullcontext()

    def _agree(self, *flags: float) -> list[float]:
        """Flags OR-ed over all ranks (as a maximum), so that every rank takes the same branch."""
        agreed = dist.all_reduce_(torch.tensor(flags, device=self.device), op=torch.distributed.ReduceOp.MAX)
        return agreed.tolist()

    @torch.no_grad()
    def make_inputs(self, batch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(reals, self-blends, which blends are usable) for D; without self-blends, the batch as it is."""
        if not self.sbi:
            return batch.images, None, None
        p = self.cfg.train.degrade_prob
        pairs = self_blend(batch.images, batch.landmarks, self.noise)
        layout = torch.channels_last if self.cfg.train.channels_last else torch.contiguous_format
        real = degrade(pairs.real, self.noise, p).to(batch.images.dtype, memory_format=layout)
        blend = degrade(pairs.fake, self.noise, p).to(batch.images.dtype, memory_format=layout)
        return real, blend, pairs.valid

    def train_step(self, batch) -> tuple[dict[str, torch.Tensor], bool]:
        """One D update, then one G update; returns detached statistics and whether any rank must stop."""
        t = self.cfg.train
        real, blend, valid = self.make_inputs(batch)
        with_G = t.gan_weight > 0
        z = torch.randn(real.shape[0], self.cfg.model.nz, 1, 1, device=self.device, generator=self.noise) if with_G else None
        stats: dict[str, torch.Tensor] = {}

        # (1) Update D: log D(x) + log(1 - D(G(z))) + log(1 - D(blend)), with G's output detached.
        self.opt_D.zero_grad(set_to_none=True)
        with self.autocast():
            logits_real = self.D(real)
            loss_D = F.softplus(-logits_real).mean()
            stats["D/real"] = torch.sigmoid(logits_real.detach().float()).mean()
            if with_G:
                fake = self.G(z)
                logits_fake = self.D(fake.detach())
                loss_D = loss_D + t.gan_weight * F.softplus(logits_fake).mean()
                stats["D/fake"] = torch.sigmoid(logits_fake.detach().float()).mean()
            if blend is not None:
                # Blends whose landmarks were unusable equal their real: they weigh nothing here.
                logits_blend = self.D(blend)
                weight = valid.float() / valid.sum().clamp(min=1)
                loss_D = loss_D + t.sbi_weight * (F.softplus(logits_blend.float()) * weight).sum()
                stats["D/blend"] = (torch.sigmoid(logits_blend.detach().float()) * weight).sum()
                stats["sbi/valid"] = valid.float().mean()
        self.scaler_D.scale(loss_D).backward()
        (bad_D,) = self._agree(float(not torch.isfinite(loss_D)))
        if not bad_D:
            self.scaler_D.step(self.opt_D)
            self.scaler_D.update()

        # (2) Update G: log D(G(z)). D's gradients from this pass are discarded, so DDP need not sum them.
        loss_G = torch.zeros((), device=self.device)
        if with_G:
            self.opt_G.zero_grad(set_to_none=True)
            with self._no_sync_D():
                with self.autocast():
                    loss_G = F.softplus(-self.D(fake)).mean()
                self.scaler_G.scale(loss_G).backward()
        bad_G, stop = self._agree(float(not torch.isfinite(loss_G)), float(self._stop_signal != 0))
        if not (bad_D or bad_G) and with_G:
            self.scaler_G.step(self.opt_G)
            self.scaler_G.update()
            self._update_ema()
        self._count_nonfinite(bad_D or bad_G, loss_D, loss_G)
        stats.update({"loss/D": loss_D.detach(), "loss/G": loss_G.detach()})
        return stats, bool(stop)

    @torch.no_grad()
    def _update_ema(self) -> None:
        # Warm-up: early on G_ema follows G closely, or short runs would show their random initial weights.
        beta = min(self.cfg.train.ema_beta, (1 + self.step) / (10 + self.step))
        torch._foreach_lerp_(list(self.G_ema.parameters()), list(self.G_raw.parameters()), 1 - beta)
        for b_ema, b in zip(self.G_ema.buffers(), self.G_raw.buffers()):
            b_ema.copy_(b)

    def _count_nonfinite(self, bad: bool, loss_D: torch.Tensor, loss_G: torch.Tensor) -> None:
        if not bad:
            self.nonfinite_in_row = 0
            return
        self.nonfinite_in_row += 1
        self.nonfinite_total += 1
        if self.info.is_main:
            log.warning("step %d: non-finite loss (D %s, G %s); step skipped, %d in a row", self.step + 1,
                        loss_D.item(), loss_G.item(), self.nonfinite_in_row)
        if self.nonfinite_in_row >= self.cfg.train.max_nonfinite_steps:
            newest = self.ckpt.existing()
            raise TrainingDiverged(
                f"{self.nonfinite_in_row} steps in a row had a non-finite loss (the last was step {self.step + 1}), so the "
                f"run stopped; its last good checkpoint is {newest[0] if newest else 'none'}: lower train.lr_D and "
                "train.lr_G, or use train.precision fp32 or bf16."
            )

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """D's accuracy on real val images and on G_ema's images, and D's loss, over all ranks.

        On face crops, also D's AUC on the val reals against their self-blends, and the threshold on P(fake)
        at their equal-error point, which becomes the detector's verdict threshold.
        """
        self.D_raw.eval()
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed * 7919 + self.info.rank)
        sums = torch.zeros(4, device=self.device)  # right on real, right on fake, loss, images
        real_scores, blend_scores = [], []
        for batch in self.val_loader:
            z = torch.randn(batch.images.shape[0], self.cfg.model.nz, 1, 1, device=self.device, generator=gen)
            # The blends are data: made in float32 outside autocast (CPU half precision is slow there).
            pairs = self_blend(batch.images, batch.landmarks, gen) if self.calibrates else None
            with self.autocast():
                real, fake = self.D_raw(batch.images).float(), self.D_raw(self.G_ema(z)).float()
                if pairs is not None:
                    blend = self.D_raw(pairs.fake.to(batch.images.dtype)).float()[pairs.valid]
                    real_scores.append(torch.sigmoid(-real))
                    blend_scores.append(torch.sigmoid(-blend))
            loss = F.softplus(-real).sum() + F.softplus(fake).sum()
            sums += torch.stack([(real > 0).sum(), (fake < 0).sum(), loss, torch.tensor(real.numel(), device=self.device)])
        self.D_raw.train()
        right_real, right_fake, loss, n = dist.all_reduce_(sums).tolist()
        metrics = {"val/D_acc_real": right_real / n, "val/D_acc_fake": right_fake / n, "val/loss_D": loss / n}
        if self.calibrates:
            metrics.update(self._calibrate(real_scores, blend_scores))
        return metrics

    def _calibrate(self, real_scores: list[torch.Tensor], blend_scores: list[torch.Tensor]) -> dict[str, float]:
        """The threshold at the equal-error point of val reals against their self-blends, from every rank's scores."""
        mine = [torch.cat(s).cpu().numpy() if s else np.zeros(0) for s in (real_scores, blend_scores)]
        parts = dist.all_gather_objects(mine)
        reals = np.concatenate([p[0] for p in parts])
        blends = np.concatenate([p[1] for p in parts])
        if not len(reals) or not len(blends):
            return {}
        labels = np.r_[np.zeros(len(reals)), np.ones(len(blends))]
        scores = np.r_[reals, blends]
        self.threshold = eer_threshold(labels, scores)
        self.calibration = {"split": self.cfg.train.val_split, "reals": int(len(reals)), "blends": int(len(blends)),
                            "auc": auc(labels, scores), "eer": eer(labels, scores), "step": self.step}
        return {"val/sbi_auc": self.calibration["auc"], "val/sbi_eer": self.calibration["eer"], "val/threshold": self.threshold}

    def evaluate_detector(self) -> None:
        """D as a deepfake detector on the configured Celeb-DF split (every rank scores its part)."""
        from pipeline.evaluate import per_video, score_split, summarize

        t, info = self.cfg.train, self.info
        self.D_raw.eval()
        frames = score_split(self.D_raw, t.eval_shards, t.eval_split, self.cfg.data.image_size, self.device, info.rank,
                             info.world_size, batch_size=self.cfg.data.batch_size, loader=self.cfg.data.loader,
                             threads=self.cfg.data.threads)
        self.D_raw.train()
        if self.logger is not None:
            threshold = 0.5 if self.threshold is None else self.threshold
            summary = summarize(frames, per_video(frames, threshold), threshold=threshold)
            values = {f"celebdf/{level}_{name}": v for level in ("frame", "video") for name, v in summary[level].items()}
            self.logger.scalars(values, self.step)
            log.info("epoch %d: Celeb-DF %s frame AUC %.3f, video AUC %.3f", self.loader.epoch, t.eval_split,
                     summary["frame"]["auc"], summary["video"]["auc"])

    @torch.no_grad()
    def samples(self) -> None:
        with self.autocast():
            images = self.G_ema(self.fixed_noise).float()
        if self.logger is not None:
            grid = make_grid(images, nrow=8, normalize=True, value_range=(-1, 1))
            self.logger.image("samples/G_ema", grid, self.step)
            (self.run_dir / "samples").mkdir(exist_ok=True)
            save_image(grid, self.run_dir / "samples" / f"step-{self.step:08d}.png")

    # ------------------------------------------------------------------ loop
    def train(self) -> str:
        """Run to the end (or to max_steps, or to a signal); returns why it stopped."""
        t = self.cfg.train
        if self.info.is_main:
            log.info("training %s: %d ranks x batch %d = global batch %d, %d steps an epoch, %d steps in all, run folder %s",
                     t.name, self.info.world_size, self.cfg.data.batch_size, self.global_batch, len(self.loader),
                     self.total_steps, self.run_dir)
        meter = Meter(self.info.world_size)
        while self.loader.epoch < t.epochs:
            for batch in self.loader:
                stats, stop = self.train_step(batch)
                self.step += 1
                self.nimg += self.global_batch
                meter.add(stats)
                if self.step % t.log_every_steps == 0:
                    self._log(meter)
                if self.step % t.sample_every_steps == 0:
                    self.samples()
                done = t.max_steps is not None and self.step >= t.max_steps
                if done and self.calibrates and self.val_loader is not None:
                    self._validate_and_log()  # the last checkpoint carries a threshold calibrated on its own D
                if stop or done or self.step % t.ckpt_every_steps == 0:
                    self.save()
                if stop:
                    if self.info.is_main:
                        log.info("stopping at step %d on a signal; resume with the same command", self.step)
                    return "signal"
                if done:
                    return "max_steps"
            last_epoch = self.loader.epoch == t.epochs
            if self.val_loader is not None and (self.loader.epoch % t.val_every_epochs == 0 or (last_epoch and self.calibrates)):
                self._validate_and_log()
            if t.eval_every_epochs and self.loader.epoch % t.eval_every_epochs == 0:
                self.evaluate_detector()
            self.samples()
            self.save()
        if self.logger is not None:
            last = meter.last or {}
            self.logger.hparams(flat_dict(to_dict(self.cfg)), {f"hparam/{k}": v for k, v in last.items()})
        return "done"

    def _validate_and_log(self) -> None:
        metrics = self.validate()
        if self.logger is not None:
            self.logger.scalars(metrics, self.step)
            log.info("epoch %d: %s", self.loader.epoch, "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))

    def _log(self, meter: Meter) -> None:
        values, seconds = meter.flush()
        if self.logger is None:
            return
        step_s = seconds / self.cfg.train.log_every_steps
        values.update({
            "perf/img_per_s": self.global_batch / step_s, "perf/step_s": step_s,
            "perf/mem_gb": _memory_gb(self.device), "lr/D": self.opt_D.param_groups[0]["lr"],
            "lr/G": self.opt_G.param_groups[0]["lr"], "train/nonfinite_steps": self.nonfinite_total,
        })
        self.logger.scalars(values, self.step)
        eta = (self.total_steps - self.step) * step_s
        outputs = "  ".join(f"{name} {values[key]:.3f}" for name, key in
                            (("D(x)", "D/real"), ("D(G(z))", "D/fake"), ("D(blend)", "D/blend")) if key in values)
        log.info("step %d/%d epoch %d  loss/D %.3f  loss/G %.3f  %s  %.0f img/s  %.0f ms/step  eta %s",
                 self.step, self.total_steps, self.loader.epoch, values["loss/D"], values["loss/G"], outputs,
                 values["perf/img_per_s"], step_s * 1000, hms(eta))

    def close(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self.loader.close()
        if self.val_loader is not None:
            self.val_loader.close()
        if self.logger is not None:
            self.logger.close()
