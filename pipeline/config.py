"""Configuration: dataclass defaults <- an experiment's YAML <- dotted overrides (`data.batch_size=64`).

One section per concern, one comment per field. Unknown keys and values of the wrong type are errors
that name the file or the override, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import UserError


@dataclass
class DataConfig:
    shards: str | list[str] = "demo/shards/celeba"  # a dataset folder written by `python -m shards` (it holds
    # manifest.json), or a list of them read as one split: [/s/celeba, /s/celebdf]
    split: str = "train"  # train | val | test
    loader: str = "dali"  # dali | baseline (webdataset-format shards, torch DataLoader workers, PIL decoding)
    batch_size: int = 128  # per rank
    image_size: int = 64  # side of the square images the model sees
    crop: str = "face"  # face: the shards' dlib face crops (what the detector is scored on) | center: CelebA's
    # centre square of the original image, the classic DCGAN preprocessing
    real_only: bool = False  # keep only samples labelled real (cls 0): Celeb-DF's real frames join CelebA's faces
    with_landmarks: bool = False  # also return the 68 landmarks (the self-blends need them; the trainer sets it)
    flip: bool = True  # random horizontal flips
    shuffle: bool = True  # a new seeded order every epoch
    shuffle_buffer: int = 4096  # DALI's shuffle buffer (samples); the baseline permutes the whole split
    shuffle_chunk: int = 128  # DALI, shuffled: the reader reads the split as runs of this many consecutive samples
    # in a seeded random order over all shards and datasets, so that its buffer mixes ~32 runs, not one
    # 10,000-sample shard of one dataset; 0 reads whole shards
    seed: int = 0  # order and flips are a function of (seed, epoch, rank)
    threads: int = 4  # DALI CPU threads, or the baseline's DataLoader worker processes
    dtype: str = "float32"  # float32 | float16 | bfloat16
    channels_last: bool = False  # NHWC memory layout (the tensor stays N, C, H, W)
    with_meta: bool = False  # also return labels and sample keys (evaluation needs them)
    drop_last: bool = True  # training: equal batch counts on all ranks. False (evaluation): every sample of
    # the rank's part once; DALI pads the last batch with copies of its last sample, which carry its key
    hw_decoder_load: float = 0.65  # share of JPEGs for the A100/H100 hardware decoder on GPUs (DALI); training only:
    # scoring decodes all on the CUDA decoder (pipeline.data.dali.SCORING_HW_DECODER_LOAD)


@dataclass
class ModelConfig:
    nz: int = 100  # length of the noise vector z
    ngf: int = 64  # generator width: channels of its last hidden layer
    ndf: int = 64  # discriminator width: channels of its first layer
    d_blocks: int = 0  # residual 3x3 blocks in D after each downsampling (models.Residual); 0: the DCGAN's D. 1 reached
    # about the same AUC in a third fewer steps, so no better in equal CPU time (2.4x D's multiply-adds; BENCHMARKS.md)
    d_norm: str = "group"  # group: a face's score is the same alone or in any batch, in train and eval mode |
    # batch: the DCGAN paper's BatchNorm (checkpoints written before d_norm existed)
    d_gan_head: str = "own"  # with self-blends and G both (train.sbi_weight and gan_weight > 0): own: G's samples get
    # D's second logit, whose loss never trains D's layers (the detector's) | shared: one logit for both
    # The image side is data.image_size (64, 128 or 256): one number, so model and data cannot disagree.


@dataclass
class TrainConfig:
    name: str = "dcgan"  # the run folder: <runs_dir>/<name>/
    runs_dir: str = "runs"
    epochs: int = 10
    max_steps: int | None = None  # stop (with a checkpoint) after this many steps; None: run all epochs
    lr_D: float = 2e-4
    lr_G: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])  # Adam's, as in the DCGAN paper
    # The fast paths (pipeline/fastpaths.py): auto is on with CUDA and off on CPUs; where one cannot work
    # here, the run falls back with a warning line at set-up.
    precision: str = "auto"  # auto (bf16 on GPUs, fp32 on CPUs) | fp32 | bf16 | fp16 (with a dynamic loss scale)
    channels_last: str | bool = "auto"  # models and batches in NHWC memory layout
    compile: str | bool = "auto"  # torch.compile G and D
    # torch.compile's mode: auto is reduce-overhead (CUDA graphs of G's and D's passes) on one GPU, and the default
    # mode under DDP, on CPUs, in fp16 and with d_sam_rho, where those graphs have never run.
    compile_mode: str = "auto"
    graph_inputs: str | bool = "auto"  # the self-blends replayed from one CUDA graph (pipeline/graphs.py)
    # torch.compile the self-blends and degradations into fused kernels. Off: on an H200 at 128 px it gained 1.08x
    # over graph_inputs' CUDA graph, after 76 s of compiling (BENCHMARKS.md); on 2 CPU cores it was 0.88x eager at
    # batch 32. auto: on with CUDA.
    compile_inputs: str | bool = False
    fused_adam: bool = True  # one kernel per update, which skips non-finite steps on the device
    tf32: bool = True  # TF32 matmuls and convolutions on GPUs that have it (G and D; the self-blends stay float32)
    ema_beta: float = 0.999  # G_ema <- beta * G_ema + (1 - beta) * G; beta warms up as (1 + step) / (10 + step)
    # The detector is D_ema, D's weights averaged in the same way (0: D's own weights). Averaged weights scored the
    # swaps of people never seen better than the last step's did, in the same runs (BENCHMARKS.md).
    d_ema_beta: float = 0.999
    # > 0: D steps by SAM's gradient at this distance (sharpness-aware minimization, as SBI trains its detector with
    # 0.05), for a second pass of D a step. Off: at 8 CPU minutes 0.05 scored the swaps lower (BENCHMARKS.md).
    d_sam_rho: float = 0.0
    seed: int = 0  # weights and noise derive from (seed, rank); the data's order and flips from data.seed
    # Periodic work, each on its own clock: every N steps and/or every N epochs (0 is off), and at the end.
    # The step defaults keep it under 2% of training time at full scale, where an epoch takes seconds.
    log_every_steps: int = 50  # status line and scalars; the host learns skipped steps and signals only here
    sample_every_steps: int = 1000  # G_ema sample grids from fixed noise
    sample_every_epochs: int = 0
    ckpt_every_steps: int = 2000  # and at the end, and on SIGTERM or SIGUSR1 (with a replica check)
    ckpt_every_epochs: int = 0
    ckpt_keep_last: int = 3
    resume: str = "auto"  # auto: newest intact checkpoint of the run, if any | never | a checkpoint path
    stop_marker: str | None = None  # a file rank 0 writes once every rank saved and stopped on a signal, holding
    # the newest checkpoint's path (launch/slurm/torchrun.sh requeues only then, as torchrun itself exits non-zero
    # after passing a signal on, and says which checkpoint the job will resume from)
    start_marker: str | None = None  # a file rank 0 writes once every rank has started, before the first step: a stop
    # signal that killed torchrun before then (it handles signals only once it starts its ranks) cost no training, so
    # launch/slurm/torchrun.sh ends (or requeues) the job as stopped cleanly
    stop_request: str | None = None  # a file whose appearance stops every rank as SIGUSR1 does: launch/slurm/torchrun.sh
    # writes it with the signal it passes on, which Slurm drops while srun is still starting the tasks
    max_nonfinite_steps: int = 20  # the run stops after this many skipped steps in a row (non-finite
    # gradients), checked every log_every_steps
    sbi_weight: float = 0.0  # weight in D's loss of self-blended pseudo-fakes of the real batch (pipeline/sbi.py);
    # 0 keeps the plain GAN discriminator. Needs face-crop shards with landmarks (data.crop face)
    gan_weight: float = 1.0  # weight in D's loss of G's samples; 0 trains D on reals and self-blends alone, without G
    degrade_prob: float = 0.5  # with self-blends: chance of each quality degradation (downscale, blur, noise, JPEG),
    # drawn per image for reals and blends alike, so that image quality is never the cue
    val_every_steps: int = 2000  # D's accuracy and loss on data.val_split, and the detector's calibration
    val_every_epochs: int = 0
    val_split: str = "val"
    eval_every_epochs: int = 0  # score D as a deepfake detector on eval_shards (Celeb-DF) every N epochs; 0: never
    eval_shards: str | None = None  # Celeb-DF shards, e.g. /data/shards/celebdf
    eval_split: str = "val"  # keep Celeb-DF's test split for the final evaluation (launch/evaluate.py)


@dataclass
class LogConfig:
    tensorboard: bool = True  # event files in the run folder
    wandb: str = "offline"  # offline | online | disabled; `wandb sync` uploads offline runs later
    project: str = "deepfake-gan"
    group: str | None = None  # W&B group, e.g. a sweep's name
    job_type: str = "train"
    tags: list[str] = field(default_factory=list)
    # At the end, ranks 1..n-1 wait this long for rank 0 to close its logs (an online wandb run uploads what is left
    # then), where any other wait for a rank ends after the process group's 600 s.
    close_timeout_s: int = 1800


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)  # what the loader reads and how
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)


def _allowed(hint: Any) -> tuple[type, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(hint) for t in _allowed(arg))
    if typing.get_origin(hint) is list:
        return (list,)
    return (type(None),) if hint is type(None) else (hint,)


def _item_hint(hint: Any) -> Any:
    """The item type of the list a hint allows (list[float] -> float), or None."""
    for arg in typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,):
        if typing.get_origin(arg) is list:
            return typing.get_args(arg)[0]
    return None


def _check(value: Any, hint: Any, key: str, source: str) -> Any:
    allowed = _allowed(hint)
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if float in allowed and isinstance(value, str):
        try:
            value = float(value)  # PyYAML reads 5e-4 (no dot) as text; everyone writes learning rates so
        except ValueError:
            pass
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{source}: {key} must be a finite number, not {value!r}: fix that value.")
    # bool is an int to isinstance; a flag given as 1, or a count given as true, is a mistake.
    ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
    if not ok:
        names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        quote = " (quote a text value, as in 'no')" if str in allowed else ""
        raise UserError(f"{source}: {key} must be {names}, not {value!r}: fix that value{quote}.")
    if isinstance(value, list) and (item := _item_hint(hint)) is not None:
        value = [_check(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    return value


def _merge(obj: Any, values: dict, source: str, prefix: str = "") -> None:
    """Set the fields of dataclass `obj` from a nested dict, checking keys and types."""
    if not isinstance(values, dict):
        raise UserError(f"{source}: {prefix.rstrip('.') or 'the top level'} must be a mapping of keys to values.")
    hints = typing.get_type_hints(type(obj))
    for key, value in values.items():
        if key not in hints:
            known = ", ".join(prefix + f.name for f in dataclasses.fields(obj))
            raise UserError(f"{source}: unknown key {prefix}{key}; the keys here are {known}.")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, {} if value is None else value, source, f"{prefix}{key}.")  # `train:` with no keys: nothing
        else:
            setattr(obj, key, _check(value, hints[key], prefix + key, source))


def parse_override(text: str, text_field: bool = False) -> dict:
    """`data.batch_size=64` -> {"data": {"batch_size": 64}}; the value is read as YAML.

    A `text_field` keeps its text where YAML reads another scalar: train.name=no is "no", not false (and =123
    not a number, =2024-05-01 not a date); a run named so is meant."""
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"override {text!r} is not key=value: write it like data.batch_size=64.")
    try:
        nested: Any = yaml.safe_load(value) if value else ""
    except yaml.YAMLError as e:
        raise UserError(f"override {text!r}: its value is not valid YAML ({str(e).splitlines()[0]}): close its brackets, "
                        f"or quote it as text, as in {key}='{value}'.") from None
    if text_field and not isinstance(nested, (str, type(None), list, dict)):
        nested = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


def _merge_file(cfg: Config, path: Path, seen: tuple[Path, ...] = ()) -> None:
    """Merge a YAML file, after the file its `inherit:` key names (relative to it)."""
    if not path.is_file():
        if seen:
            raise UserError(f"{seen[-1]} inherits from {path}, which does not exist: fix its inherit line.")
        raise UserError(f"config file {path} does not exist: pass one of the files in configs/.")
    if path.resolve() in seen:
        raise UserError(f"{path} inherits from itself through {seen[-1]}: remove that inherit line.")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML ({str(e).splitlines()[0]}): fix its syntax.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"config file {path} cannot be read ({getattr(e, 'strerror', None) or e}): pass a readable "
                        "UTF-8 text file.") from None
    if isinstance(values, dict) and "inherit" in values:
        parent = values.pop("inherit")
        if not isinstance(parent, str):
            raise UserError(f"{path}: inherit must name one file, not {parent!r}: fix its inherit line.")
        _merge_file(cfg, path.parent / parent, seen + (path.resolve(),))
    _merge(cfg, values, str(path))


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    cfg = Config()
    if path is not None:
        _merge_file(cfg, Path(path))
    for text in overrides:
        _merge(cfg, parse_override(text, _text_field(cfg, text.partition("=")[0])), f"override {text!r}")
    return cfg


def _text_field(cfg: Config, key: str) -> bool:
    """Whether the dotted key names a field that holds text only (str, or str or null)."""
    *sections, name = key.split(".")
    obj: Any = cfg
    for section in sections:
        obj = getattr(obj, section, None)
    hint = typing.get_type_hints(type(obj)).get(name) if dataclasses.is_dataclass(obj) else None
    return hint is not None and _allowed(hint) in ((str,), (str, type(None)))


def config_from_dict(values: dict, source: str) -> Config:
    """A Config from a saved dict (a checkpoint's), checked like a YAML file."""
    cfg = Config()
    _merge(cfg, values, source)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def flat_dict(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr_G": 2e-4}} -> {"train.lr_G": 2e-4}, for hyperparameter tables."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_dict(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out
