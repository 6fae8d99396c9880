"""The distributed DCGAN trainer, in three parts that can be read one at a time:

1. Set-up (`Trainer.__init__`): the fast paths, the step with its models and optimizers
   (pipeline/step.py), the data, and the resume from the newest checkpoint.
2. The step (`GANStep.__call__` in pipeline/step.py): self-blends, D's and G's updates, G's EMA, with no
   host round trip.
3. The loop (`Trainer.train`) and the periodic work on its own clocks (pipeline/periodic.py): logging,
   validation with the detector's calibration, sample grids, evaluation, checkpoints with replica checks.

The host learns what the device did only at logging boundaries (`train.log_every_steps`): one
all-reduce there carries the statistics, and another the stop signal and the skipped-step counts, so
every rank takes the same decision at the same step, and no rank waits in a collective the others left.

DDP wraps G and D separately without buffer syncing before each forward (`broadcast_buffers=False`,
called `forward_sync_buffers=False` from torch 2.15): broadcasting BatchNorm's running statistics in the
middle of a step is an in-place write to tensors autograd still needs. Train-mode BatchNorm (G, and D
with `model.d_norm=batch`) normalizes with the batch's own statistics; the running statistics matter
only in eval mode. Each rank keeps its own: checkpoints hold rank 0's in the modules' state and every
rank's under "buffers", and a resume with the same world size gives every rank its own back.
"""

from __future__ import annotations

import inspect
import logging
import random
import resource
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline import dist, periodic, signals
from pipeline.checkpoint import CheckpointManager
from pipeline.config import Config, DataConfig, flat_dict, to_dict
from pipeline.data import build_loader
from pipeline.data.dali import SCORING_HW_DECODER_LOAD
from pipeline.data.common import fake_samples, load_split, shard_folders
from pipeline.dist import DistInfo
from pipeline.evaluate import tag_prefix
from pipeline.errors import UserError
from pipeline.fastpaths import resolve
from pipeline.fsutil import write_bytes_atomic
from pipeline.loggers import WANDB_MODES, RunLogger, new_run_id
from pipeline.models import D_GAN_HEADS, D_NORMS, SIZES, has_gan_head
from pipeline.periodic import Calibration, Every
from pipeline.progress import Meter, hms
from pipeline.step import GANStep
from shards.manifest import detection_geometry, synthetic

log = logging.getLogger(__name__)
SAMPLE_GRID = 64  # fixed-noise images in a sample grid


class TrainingDiverged(UserError):
    exit_code = 3


def _check(cfg: Config) -> None:
    t = cfg.train
    if cfg.data.image_size not in SIZES:
        raise UserError(f"data.image_size {cfg.data.image_size} is not one of {SIZES}: the DCGAN is built for those.")
    if not 0 <= t.d_ema_beta < 1:
        raise UserError(f"train.d_ema_beta {t.d_ema_beta} is not in [0, 1): give the average's beta (0.999), or 0 to "
                        "detect with D's own weights.")
    if t.d_sam_rho < 0:
        raise UserError(f"train.d_sam_rho {t.d_sam_rho} is negative: give SAM's distance (SBI's 0.05), or 0 for plain steps.")
    if t.eval_every_epochs and not t.eval_shards:
        raise UserError("train.eval_every_epochs is set but train.eval_shards is not: name the Celeb-DF shards folder.")
    if t.sbi_weight < 0 or t.gan_weight < 0 or t.sbi_weight + t.gan_weight == 0:
        raise UserError(f"train.sbi_weight {t.sbi_weight} and train.gan_weight {t.gan_weight} must be >= 0 and not both 0: "
                        "D needs something fake to learn from.")
    if t.sbi_weight and cfg.data.crop != "face":
        raise UserError("train.sbi_weight needs the face crops and their landmarks: set data.crop=face.")
    if cfg.model.d_norm not in D_NORMS:
        raise UserError(f"model.d_norm {cfg.model.d_norm!r} is not one of {D_NORMS}: choose one of those.")
    if cfg.model.d_blocks < 0:
        raise UserError(f"model.d_blocks is {cfg.model.d_blocks}: give the number of residual blocks per resolution "
                        "(e.g. 1), or 0 for the DCGAN's D.")
    if cfg.model.d_gan_head not in D_GAN_HEADS:
        raise UserError(f"model.d_gan_head {cfg.model.d_gan_head!r} is not one of {D_GAN_HEADS}: choose one of those.")
    if not cfg.data.drop_last:
        raise UserError("data.drop_last is false: ranks would then take different numbers of steps and wait for each other "
                        "for ever; training needs true (evaluation reads every sample whatever it says).")
    if t.max_steps is not None and t.max_steps < 1:
        raise UserError(f"train.max_steps is {t.max_steps}: it must be at least 1, or null to run every epoch.")
    if cfg.log.close_timeout_s < 1:
        raise UserError(f"log.close_timeout_s is {cfg.log.close_timeout_s}: give the seconds ranks may wait at the end for "
                        "rank 0 to close its logs (at least 1; 1800 by default).")
    if cfg.log.wandb not in WANDB_MODES:
        raise UserError(f"log.wandb {cfg.log.wandb!r} is not one of {WANDB_MODES}: choose one of those.")
    for key in ("epochs", "log_every_steps", "ckpt_keep_last", "max_nonfinite_steps"):
        if getattr(t, key) < 1:
            raise UserError(f"train.{key} is {getattr(t, key)}: it must be at least 1.")
    for key in ("val_every_steps", "val_every_epochs", "sample_every_steps", "sample_every_epochs", "ckpt_every_steps",
                "ckpt_every_epochs", "eval_every_epochs"):
        if getattr(t, key) < 0:
            raise UserError(f"train.{key} is {getattr(t, key)}: it must be 0 (off) or more.")


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
    # ------------------------------------------------------------------ 1. set-up
    def __init__(self, cfg: Config, info: DistInfo):
        _check(cfg)
        self.cfg, self.info, self.device = cfg, info, info.device
        t = cfg.train
        self.run_dir = Path(t.runs_dir) / t.name
        random.seed(t.seed * 1000 + info.rank)
        torch.manual_seed(t.seed * 1000 + info.rank)
        self.noise = torch.Generator(device=self.device).manual_seed(t.seed * 1000 + info.rank)
        self.step = self.nimg = 0
        signals.watch(t.stop_request)
        self._interrupted = False  # a periodic job stopped early on a signal
        self.finished = False  # the end-of-training work (validation, evaluation, samples, checkpoint) is done
        self.fast = resolve(t, cfg.model, self.device, info.distributed)
        if self.fast.cuda_graphs and info.distributed:
            raise UserError(f"train.compile_mode {t.compile_mode} replays CUDA graphs, which have run on one GPU only, "
                            "never under DDP: set train.compile_mode=default to train on several ranks.")
        if self.fast.cuda_graphs and t.d_sam_rho > 0:
            raise UserError(f"train.d_sam_rho calls D twice a step, which has not run under train.compile_mode "
                            f"{t.compile_mode}'s CUDA graphs: set train.compile_mode=default, or train.d_sam_rho=0.")
        if self.fast.autocast_dtype is None and cfg.data.dtype != "float32":
            raise UserError(f"data.dtype {cfg.data.dtype} needs autocast, but train.precision is {self.fast.precision} here: "
                            "set data.dtype=float32, or train.precision=bf16 (fp16 for float16 data).")
        self.step_fn = GANStep(cfg, self.fast, self.device, self.noise, self._ddp if info.distributed else None)
        # Any D scored on face crops gets a threshold: val reals against their self-blends need only landmarks.
        self.calibrates = cfg.data.crop == "face"
        self.calibration = Calibration()
        self.clocks = {"val": Every(t.val_every_steps, t.val_every_epochs),
                       "samples": Every(t.sample_every_steps, t.sample_every_epochs),
                       "eval": Every(0, t.eval_every_epochs),
                       "ckpt": Every(t.ckpt_every_steps, t.ckpt_every_epochs)}
        self._last_done: dict[str, int] = {}  # job -> the step it last ran at, so that no job runs twice at a step
        self._completed: dict[str, int] = {}  # job -> the step it last ran to its end at (not stopped by a signal)
        self.logger: RunLogger | None = None
        self.init_data()
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", t.ckpt_keep_last)
        self.resumed_from: Path | None = None  # the checkpoint this run went on from (load_checkpoint)
        run_id = self.load_checkpoint()
        self.init_logging(run_id, resumed=self.resumed_from is not None)

    def _ddp(self, module: torch.nn.Module) -> DDP:
        ids = [self.info.local_rank] if self.device.type == "cuda" else None
        renamed = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
        no_buffer_sync = {"forward_sync_buffers": False} if renamed else {"broadcast_buffers": False}
        return DDP(module, device_ids=ids, **no_buffer_sync)

    def init_data(self) -> None:
        t, info = self.cfg.train, self.info
        # The loader hands over batches in the layout the models use.
        d = replace(self.cfg.data, with_landmarks=self.step_fn.sbi, channels_last=self.fast.channels_last)
        if not d.real_only:  # D would learn fake faces as real ones, and the detector be calibrated on them as such
            for split in [d.split] + ([t.val_split] if self.clocks["val"].on else []):
                if found := fake_samples(replace(d, split=split)):
                    raise UserError(f"{found[0]} holds {found[1]} fake samples (label 1) in split {split!r}, which training "
                                    "would take as real faces: set data.real_only=true to keep only its real ones.")
        self.loader = build_loader(d, info.rank, info.world_size, self.device)
        self.val_loader = None
        if self.clocks["eval"].on:  # checked now, not an epoch into the run
            try:
                load_split(DataConfig(shards=t.eval_shards, split=t.eval_split, crop="face"))
            except UserError as e:
                raise UserError(f"train.eval_shards: {e}") from None
        if self.clocks["val"].on:
            # A val split smaller than world x batch still validates, in smaller batches (`fit_batch`), and every sample
            # counts once, whatever the number of ranks (no drop_last: a part's last batch is padded, `Batch.valid`).
            # The faces as evaluation and detection read them: every JPEG on one decoder, pixels in float32.
            val = replace(d, split=t.val_split, shuffle=False, flip=False, with_meta=False, with_landmarks=self.calibrates,
                          hw_decoder_load=SCORING_HW_DECODER_LOAD, dtype="float32", drop_last=False)
            self.val_loader = build_loader(val, info.rank, info.world_size, self.device, fit_batch=True)
        # How the training faces were cropped, saved with every checkpoint: detection must crop alike.
        folders = shard_folders(d)
        self.face_geometry = detection_geometry(folders) if d.crop == "face" else None
        if info.is_main and (made_up := [f for f in folders if synthetic(f)]):  # the configs' default shards
            log.warning("data.shards %s %s synthetic data (shards/synth, as `make demo` writes it), not CelebA or "
                        "Celeb-DF: set data.shards to your own shards for a real run", ", ".join(made_up),
                        "holds" if len(made_up) == 1 else "hold")
        self.global_batch = d.batch_size * info.world_size
        total = t.epochs * len(self.loader)
        self.total_steps = min(total, t.max_steps) if t.max_steps else total
        fixed = torch.Generator().manual_seed(t.seed)  # the same grid noise on every rank and every run
        self.fixed_noise = torch.randn(SAMPLE_GRID, self.cfg.model.nz, 1, 1, generator=fixed).to(self.device)

    def init_logging(self, run_id: str | None, resumed: bool) -> None:
        """`run_id`: the W&B run to go on with (this run's own, from its newest checkpoint), or None for a new one."""

        def start() -> str:  # on rank 0; a failure (wandb.init, a full disk) stops every rank, not rank 0 alone
            import yaml

            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                write_bytes_atomic(self.run_dir / "config.yaml", yaml.safe_dump(to_dict(self.cfg), sort_keys=False).encode())
            except OSError as e:  # a runs_dir on a read-only mount, through a file, or on a full disk
                raise UserError(f"cannot write the run folder {self.run_dir} ({e.strerror or e}): set train.runs_dir to a "
                                "folder you can write to, with room for checkpoints.") from None
            self.logger = RunLogger(self.run_dir, self.cfg, to_dict(self.cfg), run_id or new_run_id(), run_id is not None,
                                    purge_step=self.step + 1 if resumed else None)  # what the checkpoint's step logged stays
            return self.logger.run_id

        self.run_id = dist.on_main(start, self.info.is_main)

    def stop_agreed(self) -> bool:
        """Whether any rank received SIGTERM or SIGUSR1, or saw train.stop_request (pipeline/signals.py); a collective, so
        all agree."""
        flag = torch.tensor(float(signals.requested() != 0), device=self.device)
        return bool(dist.all_reduce_(flag, op=torch.distributed.ReduceOp.MAX).item())

    # ------------------------------------------------------------------ state
    @property
    def threshold(self) -> float | None:
        return self.calibration.threshold

    def state_dict(self) -> dict[str, Any]:
        """The whole training state; a collective (it gathers every rank's RNG and loader state)."""
        return {
            **self.step_fn.state_dict(),
            "step": self.step, "nimg": self.nimg, "epoch": self.epochs_done, "finished": self.finished,
            "loader": dist.all_gather_objects(self.loader.state_dict()),
            "rng": dist.all_gather_objects(_rng_state(self.noise, self.device)),
            # Each rank's own BatchNorm running statistics (G's; D's with d_norm batch), which DDP does not sync.
            "buffers": dist.all_gather_objects(self._buffers()),
            "nonfinite_total": int(self.step_fn.skipped()), "config": to_dict(self.cfg),
            "threshold": self.calibration.threshold, "calibration": self.calibration.info, "faces": self.face_geometry,
            "wandb_run_id": self.run_id, "world_size": self.info.world_size,
            # The periodic work done at this step: a signal stops validation and evaluation and skips the samples,
            # which the resumed run then does at this step. The checkpoint itself is being written.
            "jobs_done": sorted({job for job, step in self._completed.items() if step == self.step} | {"ckpt"}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_fn.load_state_dict(state)
        self.step, self.nimg = state["step"], state["nimg"]
        self.finished = state.get("finished", False)
        self.step_fn.restore_skips(state["nonfinite_total"])
        self.calibration = Calibration(state.get("threshold"), state.get("calibration") or {})
        rank, same_world = self.info.rank, state["world_size"] == self.info.world_size
        loaders = state["loader"] if isinstance(state["loader"], list) else [state["loader"]]  # one, before format 2
        self.loader.load_state_dict(loaders[rank] if same_world and len(loaders) > rank else loaders[0])
        # The step's noise generator lives on the training device, and its state differs by kind (the CPU's 5,056
        # bytes, CUDA's 16): a run resumed on another kind of device takes fresh streams, as one with other ranks does.
        same_device = len(state["rng"][rank if same_world else 0]["noise"]) == len(self.noise.get_state())
        if same_world and same_device:
            _set_rng_state(state["rng"][rank], self.noise, self.device)
        else:  # other ranks than were saved, or another kind of device: fresh, reproducible streams
            if not same_device and self.info.is_main:
                log.warning("the checkpoint was saved on another kind of device than %s: its random streams start afresh "
                            "(the weights, optimizers and data position are resumed as saved)", self.device.type)
            self.noise.manual_seed(self.cfg.train.seed * 1000 + rank + 7919 * self.step)
        if same_world and "buffers" in state:  # else (older checkpoints) every rank starts from rank 0's statistics
            self._load_buffers(state["buffers"][rank])
        # The periodic work of the resumed step that ran before it was saved (older checkpoints: all of it).
        self._last_done = {job: self.step for job in state.get("jobs_done", self.clocks)}
        self._completed = dict(self._last_done)

    def _buffers(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: {k: v.detach().cpu() for k, v in getattr(self.step_fn, name).named_buffers()}
                for name in ("G_raw", "D_raw", "G_ema", "D_ema") if getattr(self.step_fn, name) is not None}

    def _load_buffers(self, buffers: dict[str, dict[str, torch.Tensor]]) -> None:
        if self.step_fn.D_ema is not None and "D_ema" not in buffers:  # saved without the average: it starts at D,
            buffers = {**buffers, "D_ema": buffers["D_raw"]}  # with this rank's own statistics
        for name, values in buffers.items():
            module = getattr(self.step_fn, name)
            if module is None:  # D_ema, saved by a run that kept one, and this one keeps none
                continue
            for key, buf in module.named_buffers():
                buf.copy_(values[key])

    def load_checkpoint(self) -> str | None:
        """Resume as train.resume says (after a restart: from this run's newest checkpoint); rank 0 chooses the
        file so that all ranks load the same one. Returns the W&B run id to go on with: the checkpoint's where it
        is this run's newest, else None (a new W&B run: another run's checkpoint would have written into that
        run, and a branch from an older one of its own would have its steps dropped, W&B keeping only steps past
        the last it logged)."""
        path, continues = dist.on_main(lambda: (self.ckpt.start(self.cfg.train.resume, dist.restarted()),
                                                self.ckpt.continues), self.info.is_main)
        if path is None:
            return None
        self.resumed_from = path
        state = CheckpointManager.load(path)
        try:
            self.load_state_dict(state)
        except RuntimeError as e:  # the models' shapes differ: another model.* or data.image_size
            saved = state.get("config", {})
            saved_head, head = has_gan_head(state["D"]), self.step_fn.D_raw.gan_head is not None
            if saved_head != head:  # the one difference model.* does not show: D's own GAN logit, or none
                raise UserError(
                    f"checkpoint {path} holds a D " + ("with its own logit for G's samples (model.d_gan_head own, with G and "
                    "self-blends both), and this run's D has one logit: resume it with model.d_gan_head=own and "
                    "train.gan_weight and train.sbi_weight above 0" if saved_head else "with one logit for G's samples and "
                    "self-blends (model.d_gan_head shared, or written before it existed), and this run's D has two: resume "
                    "it with model.d_gan_head=shared") + ", or start afresh under another train.name.") from None
            raise UserError(f"checkpoint {path} holds another model (saved with model {saved.get('model')}, image size "
                            f"{saved.get('data', {}).get('image_size')}; {str(e).splitlines()[0]}): give this run a new "
                            "train.name, or set train.resume=never to start it afresh.") from None
        if self.info.is_main:
            log.info("resumed from %s: step %d, epoch %d, batch %d (saved by %d ranks, now %d)%s", path, self.step,
                     self.loader.epoch, self.loader.batch, state["world_size"], self.info.world_size,
                     "" if continues else "; a new W&B run, not the checkpoint's")
        return state["wandb_run_id"] if continues else None

    def save(self) -> None:
        in_row = dist.all_reduce_(self.step_fn.in_row.clone(), op=torch.distributed.ReduceOp.MAX)
        if in_row.item():  # a host sync, at checkpoint time only
            if self.info.is_main:
                log.warning("step %d: no checkpoint while steps are being skipped; the last good one stays the newest", self.step)
            return
        periodic.check_replicas(self.step_fn, self.step, self.info.world_size)
        state = self.state_dict()
        path = dist.on_main(lambda: self.ckpt.save(state, self.step), self.info.is_main)  # every rank waits for it
        if self.info.is_main:
            log.info("checkpoint %s", path)

    # ------------------------------------------------------------------ 3. the loop and the periodic work
    def train_step(self, batch) -> dict[str, torch.Tensor]:
        """One step (pipeline/step.py) and its counters; what benchmarks and tests call."""
        stats = self.step_fn(batch, self.step)
        self.step += 1
        self.nimg += self.global_batch
        return stats

    def train(self) -> str:
        """Run to the end (or to max_steps, or to a signal); returns why it stopped."""
        t = self.cfg.train
        if self.info.is_main:
            log.info("training %s: %d ranks x batch %d = global batch %d, %d steps an epoch, %d steps in all, run folder %s; "
                     "%s", t.name, self.info.world_size, self.cfg.data.batch_size, self.global_batch, len(self.loader),
                     self.total_steps, self.run_dir, self.fast)
        if self.stop_agreed():  # during start-up or resume: nothing new to save since the last checkpoint
            return self._stop_on_signal(", before training", save=False)
        meter, start = Meter(self.info.world_size), self.step
        if t.max_steps is not None and self.step >= t.max_steps:  # resumed at the end: not one step more
            if self.info.is_main:
                log.info("%s is at step %d, train.max_steps %d: nothing left to train", self.run_dir, self.step, t.max_steps)
            return self._finish(meter, "max_steps", start)
        # The saved step's work that a signal stopped (validation, samples); at the last epoch's end, _finish does it.
        if self.resumed_from is not None and self._epoch_ended() != t.epochs:
            self.run_periodic(self._due, final=False)
            if self._interrupted:
                return self._stop_on_signal()
        while self.loader.epoch < t.epochs:
            for batch in self.loader:
                meter.add(self.train_step(batch))
                stop = self._log(meter) if self.step % t.log_every_steps == 0 else False
                max_steps = t.max_steps is not None and self.step >= t.max_steps
                # One call for both clocks: validation then runs before any checkpoint of the same step.
                self.run_periodic(self._due, final=max_steps or self._epoch_ended() == t.epochs)
                if stop or self._interrupted:
                    return self._stop_on_signal()
                if max_steps:
                    return self._finish(meter, "max_steps", start)
        return self._finish(meter, "done", start)

    def _epoch_ended(self) -> int | None:
        """The epoch (counted from 1) that this step ended, if it ended one: the loader counts a batch before
        yielding it, so none is left."""
        return self.loader.epoch + 1 if self.loader.batch == len(self.loader) else None

    def _due(self, clock: Every) -> bool:
        """Whether `clock`'s work falls due at this step: by its steps, or at the end of an epoch."""
        ended = self._epoch_ended()
        return clock.at_step(self.step) or (ended is not None and clock.at_epoch_end(ended))

    def _finish(self, meter: Meter, why: str, start: int) -> str:
        """The end of training (not a stop on a signal): the hyperparameters with the last statistics.

        A run resumed from a checkpoint that a signal wrote at its last step, in the middle of the final work,
        does that work now (the resume had marked every job done at this step)."""
        finishing = not self.finished
        if finishing:
            self._last_done.clear()
            self.run_periodic(lambda clock: False, final=True)
            if self._interrupted:
                return self._stop_on_signal()
        if self.logger is not None and (self.step > start or finishing):  # a rerun of a finished run logs nothing again
            last = meter.last or {}
            self.logger.hparams(flat_dict(to_dict(self.cfg)), {f"hparam/{k}": v for k, v in last.items()})
        # A signal after the last logging boundary, which no later boundary (nor, with validation off, the final work)
        # saw: training is complete, and the job script must read a clean stop, not ranks that failed on it.
        if self.stop_agreed():
            if self.info.is_main:
                log.info("a stop signal came after the last logging boundary: training is complete at step %d", self.step)
            self._leave_stop_marker()
        return why

    def _leave_stop_marker(self) -> None:
        """train.stop_marker for the job script (rank 0): the checkpoint a requeued job would resume from, this step's,
        or an older one where the save was skipped (steps being skipped) or there is none."""
        marker = self.cfg.train.stop_marker
        if marker and self.info.is_main:
            write_bytes_atomic(Path(marker), f"{self.ckpt.newest() or 'no checkpoint: the start'}\n".encode())

    def _stop_on_signal(self, when: str = "", save: bool = True) -> str:
        """Save (once at this step), say so, and leave train.stop_marker for the job script: a clean stop."""
        if save:
            self._run("ckpt", self.save)
        if self.info.is_main:
            resume = self.cfg.train.resume
            # train.resume never or a file would start afresh, or from that file, again: only a restart goes on.
            how = "the same command" if resume == "auto" else f"train.resume=auto in place of train.resume={resume}"
            # A stop request left behind (a batch shell killed outright) would stop every run given this path: say so.
            cause = f" (the file {self.cfg.train.stop_request}, train.stop_request)" if signals.requested_by_file() else ""
            log.info("stopping at step %d on a signal%s%s; resume with %s", self.step, when, cause, how)
        self._leave_stop_marker()
        return "signal"

    def run_periodic(self, due, final: bool) -> None:
        """The jobs whose clock is `due`; at the end of training, every job that is on, and a checkpoint.

        Validation comes before the checkpoint, which then carries the threshold calibrated on its own D, and before an
        evaluation, which it calibrates too: the evaluation's accuracies are then at this step's threshold.
        """
        evaluates = due(self.clocks["eval"]) or (final and self.clocks["eval"].on)
        if self.val_loader is not None and (due(self.clocks["val"]) or final or (evaluates and self.calibrates)):
            self._run("val", self._validate_and_log)
        if evaluates and not self._interrupted:
            self._run("eval", self._evaluate_and_log)
        if self._interrupted:
            return  # on a signal: straight to the checkpoint
        if due(self.clocks["samples"]) or final:
            self._run("samples", self._samples)
        self.finished = final  # before the checkpoint, which then records it
        if due(self.clocks["ckpt"]) or final:
            self._run("ckpt", self.save)

    def _run(self, job: str, work) -> None:
        if self._last_done.get(job) != self.step:
            self._last_done[job] = self.step
            work()
            if not self._interrupted:
                self._completed[job] = self.step

    def validate(self) -> dict[str, float] | None:
        """The validation metrics, or None if a signal stopped it (the calibration then stays as it was)."""
        t = self.cfg.train
        return periodic.validate(self.step_fn, self.val_loader, self.calibrates, t.seed, self.info.rank, t.val_split,
                                 self.step, self.calibration, should_stop=self.stop_agreed)

    @property
    def epochs_done(self) -> int:
        """Whole epochs trained: the loader's epoch counts up only when the next one starts."""
        return self.loader.epoch + (self.loader.batch == len(self.loader))

    def _validate_and_log(self) -> None:
        metrics = self.validate()
        self._interrupted = metrics is None
        if metrics is not None and self.logger is not None:
            self.logger.scalars(metrics, self.step)
            log.info("step %d, %d epochs done: %s", self.step, self.epochs_done, "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))

    def _evaluate_and_log(self) -> None:
        values = periodic.evaluate_detector(self.step_fn, self.cfg, self.info.rank, self.info.world_size, self.threshold,
                                            should_stop=self.stop_agreed)
        self._interrupted = values is None
        if values is not None and self.logger is not None:
            self.logger.scalars(values, self.step)
            split = self.cfg.train.eval_split
            log.info("step %d: Celeb-DF %s frame AUC %.3f, video AUC %.3f", self.step, split,
                     values[f"{tag_prefix(split)}/frame_auc"], values[f"{tag_prefix(split)}/video_auc"])

    def _samples(self) -> None:
        if self.logger is None:
            return
        grid = periodic.sample_grid(self.step_fn, self.fixed_noise)
        self.logger.image("samples/G_ema", grid, self.step)
        periodic.save_grid(grid, self.run_dir / "samples", self.step)

    def _log(self, meter: Meter) -> bool:
        """Statistics, skipped steps and the stop signal reach the host; returns whether every rank stops."""
        values, step_s = meter.flush()
        health = torch.stack([torch.tensor(float(signals.requested() != 0), device=self.device), self.step_fn.worst_in_row])
        stop, worst_in_row = dist.all_reduce_(health, op=torch.distributed.ReduceOp.MAX).tolist()
        skipped = int(self.step_fn.skipped())
        self.step_fn.worst_in_row.copy_(self.step_fn.in_row)
        if worst_in_row >= self.cfg.train.max_nonfinite_steps:
            raise TrainingDiverged(
                f"{int(worst_in_row)} steps in a row had a non-finite loss or gradients (up to step {self.step}), so the "
                f"run stopped; its last good checkpoint is {self.ckpt.newest() or 'none'}: lower train.lr_D and "
                "train.lr_G, or use train.precision fp32 or bf16.")
        if self.logger is not None:
            values.update({
                "perf/img_per_s": self.global_batch / step_s, "perf/step_s": step_s,
                "perf/mem_gb": _memory_gb(self.device), "lr/D": self.step_fn.opt_D.param_groups[0]["lr"],
                "lr/G": self.step_fn.opt_G.param_groups[0]["lr"], "train/nonfinite_steps": skipped,
            })
            self.logger.scalars(values, self.step)
            eta = (self.total_steps - self.step) * step_s
            outputs = "  ".join(f"{name} {values[key]:.3f}" for name, key in
                                (("D(x)", "D/real"), ("D(G(z))", "D/fake"), ("D(blend)", "D/blend")) if key in values)
            log.info("step %d/%d epoch %d  loss/D %.3f  loss/G %.3f  %s  %.0f img/s  %.0f ms/step  eta %s%s",
                     self.step, self.total_steps, self.loader.epoch, values["loss/D"], values["loss/G"], outputs,
                     values["perf/img_per_s"], step_s * 1000, hms(eta),
                     f"  skipped {skipped} non-finite steps so far" if skipped else "")
        return bool(stop)

    def close(self) -> None:
        signals.watch(None)
        self.loader.close()
        if self.val_loader is not None:
            self.val_loader.close()
        if self.logger is not None:
            self.logger.close()
