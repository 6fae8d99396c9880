"""One training step: self-blends, D's update, G's update, G's EMA; and nothing that waits for the host.

D learns from three kinds of input: real faces (real), G's samples (fake, weighted by train.gan_weight)
and self-blends of the real batch (fake, weighted by train.sbi_weight; pipeline/sbi.py), made on the
training device inside the step. Reals and blends get the same random quality degradations, so that
image quality never tells them apart. G then learns to make D call its samples real. With self-blends and
G both, G's samples get D's own GAN logit, whose loss trains only its head (pipeline/models.py): D's layers,
the detector's, learn from reals and blends alone.

No host round trip: a step with non-finite gradients is skipped on the device. Every optimizer has a
GradScaler (scale 1 and fixed in fp32 and bf16, dynamic in fp16), and fused Adam reads the scaler's
inf flag in its own kernel. DDP has all-reduced the gradients before that, so every rank sees the same
non-finite values and skips the same step. Adam does not count a skipped update, so comparing its
step counter with the steps attempted tells, on the device, how many were skipped and how many in a
row; the trainer reads those only at its logging boundaries.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from pipeline.config import Config
from pipeline.fastpaths import FastPaths, adam, float32_products
from pipeline.graphs import GraphedFunction
from pipeline.models import build_models
from pipeline.sbi import BlendDraws, DegradeDraws, blend_draws, blend_with, degrade_draws, degrade_with, jpeg_constants


def d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor | None, logits_blend: torch.Tensor | None,
           valid: torch.Tensor | None, gan_weight: float, sbi_weight: float,
           logits_real_gan: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """D's loss, -log D(x) - w_gan log(1 - D(G(z))) - w_sbi log(1 - D(blend)), and its detached statistics.

    Where D has its own GAN logit, `logits_fake` are that logit's, and `logits_real_gan` the reals' (its own
    -log D(x) term, so this loss is then the two heads' added); otherwise one logit does both, and the reals
    count once. D/real and D/blend are the detector's, D/fake and D/real_gan the GAN logit's."""
    loss = F.softplus(-logits_real.float()).mean()
    stats = {"D/real": torch.sigmoid(logits_real.detach().float()).mean()}
    if logits_real_gan is not None:
        loss = loss + F.softplus(-logits_real_gan.float()).mean()
        stats["D/real_gan"] = torch.sigmoid(logits_real_gan.detach().float()).mean()
    if logits_fake is not None:
        loss = loss + gan_weight * F.softplus(logits_fake.float()).mean()
        stats["D/fake"] = torch.sigmoid(logits_fake.detach().float()).mean()
    if logits_blend is not None:
        # Blends whose landmarks were unusable equal their real: they weigh nothing here.
        weight = valid.float() / valid.sum().clamp(min=1)
        loss = loss + sbi_weight * (F.softplus(logits_blend.float()) * weight).sum()
        stats["D/blend"] = (torch.sigmoid(logits_blend.detach().float()) * weight).sum()
        stats["sbi/valid"] = valid.float().mean()
    return loss, stats


def g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """G's non-saturating loss, -log D(G(z))."""
    return F.softplus(-logits_fake.float()).mean()


@dataclass
class Inputs:
    real: torch.Tensor  # [B, 3, S, S]: the real faces (degraded like the blends, with self-blends)
    blend: torch.Tensor | None = None  # [B, 3, S, S]: their self-blends
    valid: torch.Tensor | None = None  # [B] bool: which blends had usable landmarks


# One graph (a break would split the fusion and read back to Python), for the batch's one shape: a short last batch
# compiles once more.
PAIRS_COMPILE = dict(fullgraph=True, dynamic=False)


class GANStep:
    """G, D, G_ema, D_ema, their optimizers and loss scalers, and the step that updates them.

    `G`, `D` are what the step calls (DDP-wrapped with several ranks, compiled with train.compile);
    `G_raw`, `D_raw` are the modules themselves, whose weights checkpoints hold. `detector` is what scores
    faces: D_ema, the average of D's weights (train.d_ema_beta), or D_raw itself where that is 0.
    """

    def __init__(self, cfg: Config, fast: FastPaths, device: torch.device, noise: torch.Generator, wrap=None):
        m, t = cfg.model, cfg.train
        self.cfg, self.fast, self.device, self.noise = cfg, fast, device, noise
        # D's own GAN logit only where it has two tasks: self-blends and G's samples (pipeline/models.py).
        gan_head = m.d_gan_head == "own" and t.sbi_weight > 0 and t.gan_weight > 0
        G, D = build_models(m.nz, m.ngf, m.ndf, cfg.data.image_size, torch.Generator().manual_seed(t.seed), m.d_norm,
                            gan_head, m.d_blocks)
        self.G_raw = G.to(device, memory_format=fast.layout)
        self.D_raw = D.to(device, memory_format=fast.layout)
        self.G_ema = copy.deepcopy(self.G_raw).eval().requires_grad_(False)
        self.D_ema = copy.deepcopy(self.D_raw).eval().requires_grad_(False) if t.d_ema_beta > 0 else None
        self.detector = self.D_ema if self.D_ema is not None else self.D_raw
        betas = tuple(t.betas)
        self.opt_G = adam(self.G_raw.parameters(), t.lr_G, betas, fast.fused_adam, "G")
        self.opt_D = adam(self.D_raw.parameters(), t.lr_D, betas, fast.fused_adam, "D")
        fp16 = fast.precision == "fp16"
        # A scaler in every precision, so that fused Adam skips non-finite steps on the device; only fp16 scales.
        scaler = dict(init_scale=2.0**16) if fp16 else dict(init_scale=1.0)
        self.scaler_G = torch.amp.GradScaler(device.type, **scaler)
        self.scaler_D = torch.amp.GradScaler(device.type, **scaler)
        self._new_scale = None if fp16 else 1.0  # update(1.0) keeps the scale fixed without reading found_inf
        self.with_G = t.gan_weight > 0
        self.sbi = t.sbi_weight > 0
        # The averages each step updates: (average, model, beta, whether its BatchNorm statistics are averaged too).
        # G_ema takes G's statistics as they are, as StyleGAN2-ADA's does. D_ema, which scores faces in eval mode,
        # averages them (model.d_norm batch): statistics of D's newest weights would not fit its own.
        self._averages = ([(self.G_ema, self.G_raw, t.ema_beta, False)] if self.with_G else []) + \
                         ([(self.D_ema, self.D_raw, t.d_ema_beta, True)] if self.D_ema is not None else [])
        self.G, self.D = (wrap(self.G_raw), wrap(self.D_raw)) if wrap else (self.G_raw, self.D_raw)
        self.D_for_G = self.D_raw  # G's pass needs no gradient sync for D: no DDP, no gradients for D's weights
        if fast.compile:
            self.G, self.D = torch.compile(self.G, mode=fast.compile_mode), torch.compile(self.D, mode=fast.compile_mode)
            self.D_for_G = torch.compile(self.D_raw, mode=fast.compile_mode)
        # reduce-overhead and max-autotune replay CUDA graphs from one memory pool, and each compiled call with no
        # backward pending starts a new generation that may reuse what earlier ones made: D_for_G's call, after D's
        # backward, freed G's samples and saved activations (an error on an H200). Marking where each step begins
        # keeps one generation per step. G's samples are also copied out, as in the run measured there. G's .grad
        # comes from a graph too: read it within the step (Adam does), never after the next step's G forward.
        self.cuda_graphs = fast.cuda_graphs and device.type == "cuda"
        # One forward of reals, fakes and blends together: GroupNorm makes each score independent of the
        # batch, so this equals three forwards in a third of the launches. BatchNorm's D keeps them apart.
        self.one_forward = m.d_norm == "group"
        # Skipped-step accounting on the device: [D, G]. `attempted` counts steps taken, Adam counts updates.
        self.watch = torch.tensor([True, self.with_G], device=device)
        self.attempted = torch.zeros(2, device=device)
        self.in_row = torch.zeros((), device=device)  # steps skipped in a row up to now (in fp16: with a non-finite
        # loss on this rank; the trainer agrees on the maximum over ranks)
        self.worst_in_row = torch.zeros((), device=device)  # the most in a row since the trainer last looked
        self._applied_before = self.applied()
        # The self-blends are two parts: the random numbers, drawn eagerly from the step's generator (torch.compile
        # cannot take a generator), and a pure function of them, whose ~800 small kernels torch.compile fuses
        # (train.compile_inputs; bench/blends.py counts them on a GPU). Its own mode is always the default: the CUDA
        # graph around both is GraphedFunction's.
        self._pairs = self._pairs_eager
        if fast.compile_inputs and self.sbi:
            jpeg_constants(device)  # cached before the first trace, which would otherwise compile twice
            self._pairs = torch.compile(self._pairs_eager, **PAIRS_COMPILE)
        self._blends = GraphedFunction(self._draw_and_blend, noise) if fast.graph_inputs and self.sbi else self._draw_and_blend

    def autocast(self):
        dtype = self.fast.autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    # ------------------------------------------------------------------ inputs
    @torch.no_grad()
    def make_inputs(self, batch) -> Inputs:
        """D's real faces and, with self-blends, their blends (made in float32, TF32 off: data, not model; eager,
        captured in a CUDA graph or compiled alike)."""
        if not self.sbi:
            return Inputs(batch.images)
        with float32_products():
            return Inputs(*self._blends(batch.images, batch.landmarks))

    def _draw_and_blend(self, images: torch.Tensor, landmarks: torch.Tensor) -> tuple[torch.Tensor, ...]:
        draws = blend_draws(images, self.noise), degrade_draws(images, self.noise), degrade_draws(images, self.noise)
        return self._pairs(images, landmarks, *draws)

    def _pairs_eager(self, images: torch.Tensor, landmarks: torch.Tensor, blend: BlendDraws, real_draws: DegradeDraws,
                     fake_draws: DegradeDraws) -> tuple[torch.Tensor, ...]:
        """(real, blend, valid): the self-blends of a batch and both degraded, from numbers already drawn."""
        p = self.cfg.train.degrade_prob
        pairs = blend_with(images, landmarks, blend)
        real = degrade_with(pairs.real, real_draws, p).to(images.dtype, memory_format=self.fast.layout)
        fake = degrade_with(pairs.fake, fake_draws, p).to(images.dtype, memory_format=self.fast.layout)
        return real, fake, pairs.valid

    def _score(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """D's [n, 2] logits of each part: the detector's and the GAN's."""
        if self.one_forward and len(parts) > 1:
            return list(self.D(torch.cat(parts), gan=True).split([len(p) for p in parts]))
        return [self.D(p, gan=True) for p in parts]

    # ------------------------------------------------------------------ the step
    def __call__(self, batch, step: int) -> dict[str, torch.Tensor]:
        """One D update, then one G update; returns detached statistics (device tensors, never read here).

        `step` is the number of steps done before this one (G_ema's warm-up uses it).
        """
        t = self.cfg.train
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with record_function("step/inputs"):  # named ranges: bench/step.py times each part with the profiler
            x = self.make_inputs(batch)
        fake = None

        # (1) D: reals are real; G's samples (detached) and self-blends are fake.
        with record_function("step/D"):
            self.opt_D.zero_grad(set_to_none=True)
            with self.autocast():
                if self.with_G:
                    z = torch.randn(x.real.shape[0], self.cfg.model.nz, 1, 1, device=self.device, generator=self.noise)
                    fake = self.G(z)
                    if self.cuda_graphs:
                        fake = fake.clone()
                parts = [x.real] + ([fake.detach()] if fake is not None else []) + ([x.blend] if x.blend is not None else [])
                loss_D, stats = self._loss_D(parts, x.valid)
            self.scaler_D.scale(loss_D).backward()
            losses = loss_D.detach()  # what the skip accounting checks (fp16 counts a skip only where one is non-finite)
            if t.d_sam_rho > 0:
                losses = losses + self._sharpness_aware(parts, x.valid)
            self.scaler_D.step(self.opt_D)
            self.scaler_D.update(self._new_scale)

        # (2) G: make D call G's samples real. D's weights need no gradients here.
        loss_G = torch.zeros((), device=self.device)
        if self.with_G:
            with record_function("step/G"):
                self.opt_G.zero_grad(set_to_none=True)
                self.D_raw.requires_grad_(False)
                try:
                    with self.autocast():
                        loss_G = g_loss(self.D_for_G(fake, gan=True)[:, 1])
                    self.scaler_G.scale(loss_G).backward()
                finally:
                    self.D_raw.requires_grad_(True)
                self.scaler_G.step(self.opt_G)
                self.scaler_G.update(self._new_scale)
        if self._averages:
            with record_function("step/ema"):
                self._update_ema(step)
        self._count_skips(losses + loss_G.detach())
        stats.update({"loss/D": loss_D.detach(), "loss/G": loss_G.detach()})
        return stats

    def _loss_D(self, parts: list[torch.Tensor], valid) -> tuple[torch.Tensor, dict]:
        """D's loss on [reals, G's samples if any, self-blends if any]."""
        t = self.cfg.train
        logits = self._score(parts)  # the detector's logit [:, 0] for reals and blends, the GAN's [:, 1] for G's
        logits_fake = logits[1][:, 1] if self.with_G else None
        logits_blend = logits[-1][:, 0] if self.sbi else None
        real_gan = logits[0][:, 1] if self.D_raw.gan_head is not None else None
        return d_loss(logits[0][:, 0], logits_fake, logits_blend, valid, t.gan_weight, t.sbi_weight, real_gan)

    def _sharpness_aware(self, parts: list[torch.Tensor], valid) -> torch.Tensor:
        """SAM (Foret et al. 2021), as SBI trains its detector: D's gradients are taken again at the weights moved
        train.d_sam_rho along the first gradient's direction, and the step uses those, which favours flat minima.
        With model.d_norm batch the second pass updates BatchNorm's running statistics once more. Returns the loss
        at the moved weights."""
        t = self.cfg.train
        params = [p for p in self.D_raw.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))  # the loss scale cancels in g/|g|
        # A non-finite gradient moves nothing, and the step after skips as usual.
        scale = torch.where(torch.isfinite(norm), t.d_sam_rho / (norm + 1e-12), 0.0)
        with torch.no_grad():
            weights = [p.detach().clone() for p in params]  # put back exactly, not by subtracting the move
            torch._foreach_add_(params, [torch.nan_to_num(g * scale, nan=0.0, posinf=0.0, neginf=0.0) for g in grads])
        self.opt_D.zero_grad(set_to_none=True)
        with self.autocast():
            loss, _ = self._loss_D(parts, valid)
        self.scaler_D.scale(loss).backward()
        with torch.no_grad():
            torch._foreach_copy_(params, weights)
        return loss.detach()

    @torch.no_grad()
    def _update_ema(self, step: int) -> None:
        for ema, raw, beta, average_buffers in self._averages:
            # Warm-up: early on the average follows closely, or short runs would keep their random initial weights.
            beta = min(beta, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(ema.parameters()), list(raw.parameters()), 1 - beta)
            for b_ema, b in zip(ema.buffers(), raw.buffers()):
                if average_buffers and b.is_floating_point():
                    b_ema.lerp_(b, 1 - beta)
                else:
                    b_ema.copy_(b)

    # ------------------------------------------------------------------ skipped steps
    def applied(self) -> torch.Tensor:
        """[D, G]: updates Adam has applied (its step counter, which a skipped step does not advance)."""
        counts = []
        for opt in (self.opt_D, self.opt_G):
            state = opt.state.get(opt.param_groups[0]["params"][0])
            counts.append(state["step"].to(self.device, torch.float32, non_blocking=True) if state
                          else torch.zeros((), device=self.device))
        return torch.stack(counts)

    @torch.no_grad()
    def _count_skips(self, losses: torch.Tensor) -> None:
        self.attempted += self.watch
        now = self.applied()
        skipped = ((now == self._applied_before) & self.watch).any()
        self._applied_before = now
        if self.fast.precision == "fp16":  # fp16's loss scale overflows now and then by design: that is no divergence
            skipped = skipped & ~torch.isfinite(losses)
        self.in_row = (self.in_row + 1) * skipped
        torch.maximum(self.worst_in_row, self.in_row, out=self.worst_in_row)

    def skipped(self) -> torch.Tensor:
        """Steps skipped since the run began, D's and G's added (a device tensor)."""
        return (self.attempted - self.applied()).sum()

    def restore_skips(self, skipped_total: int) -> None:
        """After loading the optimizers: the attempted steps are the applied ones plus those skipped."""
        applied = self.applied()
        self.attempted = applied.clone()
        self.attempted[0] += skipped_total  # which optimizer skipped is not saved; the total is what is reported
        self._applied_before = applied

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        state = {"G": self.G_raw.state_dict(), "D": self.D_raw.state_dict(), "G_ema": self.G_ema.state_dict(),
                 "opt_G": self.opt_G.state_dict(), "opt_D": self.opt_D.state_dict(),
                 "scaler_G": self.scaler_G.state_dict(), "scaler_D": self.scaler_D.state_dict(),
                 "precision": self.fast.precision}
        if self.D_ema is not None:  # the detector that evaluation, `detect` and the app load (pipeline/evaluate.py)
            state["D_ema"] = self.D_ema.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.G_raw.load_state_dict(state["G"])
        self.D_raw.load_state_dict(state["D"])
        self.G_ema.load_state_dict(state["G_ema"])
        if self.D_ema is not None:  # a checkpoint from before D_ema, or of a run without it: the average starts at D
            self.D_ema.load_state_dict(state.get("D_ema", state["D"]))
        # The config, not the checkpoint, says the optimizers' settings (learning rate, betas, fused or foreach): the
        # saved groups' would come back with their moments (a resume with train.betas or train.fused_adam changed kept
        # the old ones while config.yaml showed the new). Put in before loading, so that the step counters land where
        # the new settings keep them (on the device for fused Adam, on the CPU for foreach). `defaults` are what this
        # run built each optimizer with.
        for opt, saved in ((self.opt_G, state["opt_G"]), (self.opt_D, state["opt_D"])):
            opt.load_state_dict({**saved, "param_groups": [{**group, **opt.defaults} for group in saved["param_groups"]]})
        # The loss scalers only from a run of the same precision: fp32's and bf16's are fixed at 1, from which fp16's
        # would take some 32,000 steps to double back to its 2^16, its small gradients underflowing meanwhile.
        if state.get("precision", self.fast.precision) == self.fast.precision:
            for name in ("scaler_G", "scaler_D"):
                if state[name]:  # empty: saved by a disabled scaler (fp32/bf16 before every optimizer had one)
                    getattr(self, name).load_state_dict(state[name])
