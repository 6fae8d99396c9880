"""Files that only ever appear complete: write to a temporary name in the same folder, then rename."""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path
from typing import Any, Iterator

TMP_MARKER = ".tmp-"


def tmp_name(path: Path) -> Path:
    """A hidden sibling of `path`, unique to this process, that globs such as `*.tar` do not match."""
    return path.with_name(f".{path.name}{TMP_MARKER}{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced, renamed onto `path`, and the folder fsynced.

    On an exception the temporary file is removed and `path` keeps whatever it held before.
    """
    path = Path(path)
    tmp = tmp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_folder(path.parent)  # the rename itself is durable only once the folder is: callers delete older files next
    finally:
        tmp.unlink(missing_ok=True)


def fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # some FUSE and CIFS mounts cannot sync a folder: nothing to do
            raise
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def remove_stale_tmp(folder: Path) -> list[Path]:
    """Delete temporary files that an interrupted run left behind in `folder`; return them."""
    stale = [p for p in folder.glob(f".*{TMP_MARKER}*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
