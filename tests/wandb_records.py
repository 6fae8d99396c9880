"""Reads a W&B offline run file (`run-<id>.wandb`) with wandb's own record schema.

wandb 0.31 moved the reader of these files into its Go service (wandb-core); the Python package keeps
the schema (`wandb.proto.wandb_internal_pb2.Record`). The file is a LevelDB-style log: a 7-byte header
(":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of chunks: crc32c (4), length (2), type (1), data.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[pb.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            pending += chunk
        else:
            break  # zero padding at the end
        record = pb.Record()
        record.ParseFromString(pending)
        yield record


def history(path: Path) -> list[dict]:
    """Every logged row, keys to decoded values."""
    rows = []
    for r in records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append({item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in r.history.item})
    return rows


def run_info(path: Path) -> pb.RunRecord:
    for r in records(path):
        if r.WhichOneof("record_type") == "run":
            return r.run
    raise AssertionError(f"{path} has no run record")
