"""The trainer's periodic work, each on its own clock: validation with calibration, sample grids,
detector evaluation, replica checks. Each job is a function of the step's models and a loader; none
touches the optimizers or the step itself.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from pipeline import dist
from pipeline.metrics import auc, eer, eer_threshold
from pipeline.models import fake_score
from pipeline.sbi import self_blend

log = logging.getLogger(__name__)


@dataclass
class Every:
    """A clock: due every `steps` steps and at the end of every `epochs`-th epoch (0 turns either off)."""

    steps: int = 0
    epochs: int = 0

    def at_step(self, step: int) -> bool:
        return self.steps > 0 and step % self.steps == 0

    def at_epoch_end(self, epoch: int) -> bool:
        return self.epochs > 0 and epoch % self.epochs == 0

    @property
    def on(self) -> bool:
        return self.steps > 0 or self.epochs > 0


@dataclass
class Calibration:
    """The detector's verdict threshold on P(fake), at the equal-error point of val reals and their blends."""

    threshold: float | None = None
    info: dict = field(default_factory=dict)


@torch.no_grad()
def validate(step, val_loader, calibrates: bool, seed: int, rank: int, val_split: str, at_step: int,
             calibration: Calibration, should_stop=None) -> dict[str, float] | None:
    """D's accuracy on real val images and on G_ema's images, and D's loss, over all ranks: the GAN's, on its own
    logit where D has one (else on its only logit).

    On face crops (`calibrates`), also D's AUC on the val reals against their self-blends, and the threshold
    on P(fake) at their equal-error point, which becomes the detector's verdict threshold (in `calibration`).
    `should_stop` (a collective every rank calls alike) is asked before every batch that every rank has; if it says
    so, the validation stops there and returns None, leaving `calibration` as it was.
    """
    D, detector, device, nz = step.D_raw, step.detector, step.device, step.cfg.model.nz
    D.eval()
    gen = torch.Generator(device=device).manual_seed(seed * 7919 + rank)
    sums = torch.zeros(4, device=device)  # right on real, right on fake, loss, images
    real_scores, blend_scores = [], []
    # Every sample is read once, so a rank may have one batch more than another. (From an epoch's start: a validation
    # stopped by a signal leaves the loader mid-epoch, and the trainer then stops.)
    common = val_loader.common_batches()
    for i, batch in enumerate(val_loader):
        if should_stop is not None and i < common and should_stop():
            D.train()
            return None
        # Whole batches go through G, D and the self-blends, whose shapes then never change (no recompilation, the same
        # CUDA graphs); the padding of a part's last batch (`Batch.valid`) is dropped from what is counted.
        size = batch.images.shape[0]
        n = size if batch.valid is None else batch.valid
        z = torch.randn(size, nz, 1, 1, device=device, generator=gen)
        # The blends are data: made in float32 outside autocast (CPU half precision is slow there). Without the pair's
        # colour jitter and JPEG, which training needs so that neither is a cue: as SBI validates, and the reals are
        # scored as they come, as the test faces are.
        pairs = self_blend(batch.images, batch.landmarks, gen, augment=False) if calibrates else None
        with step.autocast():
            fake = D(step.G_ema(z), gan=True)[:n, 1].float()  # the GAN's logit: D's own for G's samples, where it has one
        # The faces in float32, as evaluation and detection score them: the threshold calibrated here is theirs
        # (a bf16 score is off by up to 2e-3, and ties).
        real_both = D(batch.images.float(), gan=True).float()[:n]
        if pairs is not None:
            real = real_both[:, 0] if detector is D else detector(batch.images.float()).float()[:n]
            blend = detector(pairs.fake).float()[:n][pairs.valid[:n]]
            real_scores.append(fake_score(real))
            blend_scores.append(fake_score(blend))
        # The GAN's loss and accuracies on its own logit: reals and G_ema's samples (one logit: the detector's).
        real_gan = real_both[:, 1]
        loss = F.softplus(-real_gan).sum() + F.softplus(fake).sum()
        sums += torch.stack([(real_gan > 0).sum(), (fake < 0).sum(), loss, torch.tensor(real_both.shape[0], device=device)])
    D.train()
    right_real, right_fake, loss, n = dist.all_reduce_(sums).tolist()
    metrics = {"val/D_acc_real": right_real / n, "val/D_acc_fake": right_fake / n, "val/loss_D": loss / n}
    if calibrates:
        metrics.update(_calibrate(real_scores, blend_scores, val_split, at_step, calibration))
    return metrics


def _calibrate(real_scores: list[torch.Tensor], blend_scores: list[torch.Tensor], val_split: str, at_step: int,
               calibration: Calibration) -> dict[str, float]:
    """The threshold at the equal-error point of val reals against their self-blends, from every rank's scores."""
    mine = [torch.cat(s).cpu().numpy() if s else np.zeros(0) for s in (real_scores, blend_scores)]
    parts = dist.all_gather_objects(mine)
    reals = np.concatenate([p[0] for p in parts])
    blends = np.concatenate([p[1] for p in parts])
    if not len(reals) or not len(blends):
        return {}
    labels = np.r_[np.zeros(len(reals)), np.ones(len(blends))]
    scores = np.r_[reals, blends]
    calibration.threshold = eer_threshold(labels, scores)
    calibration.info = {"split": val_split, "reals": int(len(reals)), "blends": int(len(blends)),
                        "auc": auc(labels, scores), "eer": eer(labels, scores), "step": at_step}
    return {"val/sbi_auc": calibration.info["auc"], "val/sbi_eer": calibration.info["eer"],
            "val/threshold": calibration.threshold}


def evaluate_detector(step, cfg, rank: int, world_size: int, threshold: float | None, should_stop=None) -> dict[str, float] | None:
    """D as a deepfake detector on the configured Celeb-DF split (every rank scores its part); None if stopped."""
    from pipeline.evaluate import celebdf_scalars, per_video, score_split, summarize

    t = cfg.train
    step.D_raw.eval()  # (D_ema is always in eval mode)
    frames = score_split(step.detector, t.eval_shards, t.eval_split, cfg.data.image_size, step.device, rank, world_size,
                         batch_size=cfg.data.batch_size, loader=cfg.data.loader, threads=cfg.data.threads,
                         should_stop=should_stop)
    step.D_raw.train()
    if frames is None:
        return None
    threshold = 0.5 if threshold is None else threshold
    summary = summarize(frames, per_video(frames, threshold), threshold=threshold)
    return celebdf_scalars(summary, t.eval_split)


@torch.no_grad()
def sample_grid(step, fixed_noise: torch.Tensor) -> torch.Tensor:
    """G_ema's images from fixed noise, as one grid image."""
    with step.autocast():
        images = step.G_ema(fixed_noise).float()
    return make_grid(images, nrow=8, normalize=True, value_range=(-1, 1))


def save_grid(grid: torch.Tensor, folder: Path, at_step: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_image(grid, folder / f"step-{at_step:08d}.png")


def check_replicas(step, at_step: int, world_size: int) -> None:
    """Every rank must hold the same G and D; a difference means DDP was bypassed somewhere."""
    digest = hashlib.sha256()
    for module in (step.G_raw, step.D_raw):
        for p in module.parameters():
            digest.update(p.detach().cpu().numpy().tobytes())
    digests = dist.all_gather_objects(digest.hexdigest())
    if len(set(digests)) != 1:
        raise RuntimeError(f"step {at_step}: G and D differ between ranks (parameter digests {digests})")
    if world_size > 1:
        log.info("step %d: parameters identical on all %d ranks (%s)", at_step, world_size, digests[0][:12])
