"""Deterministic WebDataset tar shards and their DALI index files.

A sample is a key plus named fields; each field becomes the tar member `<key>.<field>`. Members carry
fixed metadata (mtime 0, uid/gid 0, mode 0444, no user names), so the same samples always give the same
bytes. We write tars with `tarfile` rather than `webdataset.TarWriter`, which stamps the current time.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.fsutil import atomic_path

INDEX_VERSION = "v1.2"  # the format DALI's wds2idx writes and fn.readers.webdataset reads


@dataclass
class Sample:
    key: str  # no dots: WebDataset splits member names at the first dot
    fields: dict[str, bytes]  # extension -> bytes, e.g. {"jpg": ..., "cls": b"0", "json": ...}
    label: int

    def __post_init__(self):
        # The index separates its fields with spaces, so a key must have none (`key_of` makes one from a name).
        if "." in self.key or "/" in self.key or not self.key or any(c.isspace() for c in self.key):
            raise ValueError(f"sample key {self.key!r} must be non-empty and contain no '.', '/' or whitespace")


def key_of(name: str) -> str:
    """A sample key from a file name: '.', '/' and whitespace (`id0_0000 (1).mp4`, a browser's copy) become '_'."""
    return re.sub(r"[./\s]", "_", name)


@dataclass
class ShardInfo:
    """What the manifest records of one written shard."""

    file: str
    index: str
    samples: int
    bytes: int
    sha256: str
    labels: dict[str, int] = field(default_factory=dict)


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def tar_bytes(samples: list[Sample]) -> bytes:
    """The tar archive for `samples`, fields of a sample in sorted order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            for ext in sorted(s.fields):
                data = s.fields[ext]
                tar.addfile(_member(f"{s.key}.{ext}", len(data)), io.BytesIO(data))
    return buf.getvalue()


def index_text(tar_data: bytes) -> str:
    """The DALI index of a tar archive, as wds2idx writes it.

    Line 1 is `v1.2 <samples>`; then one line a sample with `<ext> <data offset> <size> <member name>`
    for each of its members, in archive order. Members that share the text before the first dot of
    their base name form one sample.
    """
    lines: list[list[str]] = []
    last_key = None
    with tarfile.open(fileobj=io.BytesIO(tar_data), mode="r") as tar:
        for m in tar:
            if not m.isreg():
                continue
            base_start = m.name.rfind("/") + 1
            dot = m.name.find(".", base_start)
            key, ext = m.name[:dot], m.name[dot + 1 :]
            entry = f"{ext} {m.offset_data} {m.size} {m.name}"
            if key != last_key:
                lines.append([entry])
                last_key = key
            else:
                lines[-1].append(entry)
    return f"{INDEX_VERSION} {len(lines)}\n" + "".join(" ".join(l) + "\n" for l in lines)


def index_path_for(tar_path: Path) -> Path:
    return tar_path.with_suffix(".idx")


def write_shard(tar_path: Path, samples: list[Sample]) -> ShardInfo:
    """Write the tar and its index; each appears under its final name only once complete.

    The index goes first: a tar on disk therefore always has its index beside it.
    """
    data = tar_bytes(samples)
    idx_path = index_path_for(tar_path)
    with atomic_path(idx_path) as tmp:
        tmp.write_text(index_text(data))
    with atomic_path(tar_path) as tmp:
        tmp.write_bytes(data)
    labels: dict[str, int] = {}
    for s in samples:
        labels[str(s.label)] = labels.get(str(s.label), 0) + 1
    return ShardInfo(
        file=tar_path.name,
        index=idx_path.name,
        samples=len(samples),
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        labels=dict(sorted(labels.items())),
    )


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
