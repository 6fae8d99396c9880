"""Configuration: dataclass defaults <- an experiment's YAML <- dotted overrides (`data.batch_size=64`).

One section per concern, one comment per field. Unknown keys and values of the wrong type are errors
that name the file or the override, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import UserError


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


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)  # what the loader reads and how


def _allowed(hint: Any) -> tuple[type, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(hint) for t in _allowed(arg))
    return (type(None),) if hint is type(None) else (hint,)


def _check(value: Any, hint: Any, key: str, source: str) -> Any:
    allowed = _allowed(hint)
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    # bool is an int to isinstance; a flag given as 1, or a count given as true, is a mistake.
    ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
    if not ok:
        names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise UserError(f"{source}: {key} must be {names}, not {value!r}: fix that value.")
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
            _merge(current, value, source, f"{prefix}{key}.")
        else:
            setattr(obj, key, _check(value, hints[key], prefix + key, source))


def parse_override(text: str) -> dict:
    """`data.batch_size=64` -> {"data": {"batch_size": 64}}; the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"override {text!r} is not key=value: write it like data.batch_size=64.")
    nested: Any = yaml.safe_load(value) if value else ""
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist: pass one of the files in configs/.")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{path} is not valid YAML ({str(e).splitlines()[0]}): fix its syntax.") from None
        _merge(cfg, values, str(path))
    for text in overrides:
        _merge(cfg, parse_override(text), f"override {text!r}")
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
