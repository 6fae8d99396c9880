"""Checkpoints: `<run>/checkpoints/step-NNNNNNNN.pt`, written whole by rank 0, the last k kept.

A checkpoint exists under its final name only once complete (temporary name, then rename); one that
does not load (a disk fault, a copy cut short) is skipped with a warning in favour of the one before.
A run resumed from an older checkpoint moves the newer ones to `superseded/<time>-before-step-<step>/`
at its first save: they belong to the branch it left, and `auto` must not return to it.
"""

from __future__ import annotations

import errno
import io
import logging
import re
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.fsutil import atomic_path, remove_stale_tmp

log = logging.getLogger(__name__)
NAME = re.compile(r"^step-(\d{8})\.pt$")
SUPERSEDED = "superseded"  # checkpoints of a branch that a resume from an older one left behind


class CheckpointManager:
    def __init__(self, folder: Path, keep_last: int):
        self.folder = Path(folder)
        self.keep_last = keep_last
        self.continues = False  # set by start(): the run goes on from its own newest checkpoint, history and all

    def path(self, step: int) -> Path:
        return self.folder / f"step-{step:08d}.pt"

    def existing(self) -> list[Path]:
        """Complete checkpoints, newest first."""
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir() if NAME.match(p.name)]
        return sorted(found, key=lambda p: int(NAME.match(p.name).group(1)), reverse=True)

    def newest(self) -> Path | None:
        """The newest complete checkpoint, if any."""
        found = self.existing()
        return found[0] if found else None

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Rank 0 only. Older checkpoints are removed only once the new one is complete under its name."""
        path = self.path(step)
        buffer = io.BytesIO()
        torch.save(state, buffer)  # serialized first: a failed write is then the file system's plain OSError
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                tmp.write_bytes(buffer.getbuffer())
        except OSError as e:
            try:
                newest = self.newest()
            except OSError:  # the folder is the fault: say what was asked, not a second error
                newest = None
            after = f"run the same command again; it resumes from {newest or 'the start'}, which is intact."
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise UserError(f"no space left in {self.folder} for checkpoint {path.name} ({e.strerror}): free some and "
                                + after) from None
            raise UserError(f"checkpoint {path} cannot be written ({e.strerror or e}): make {self.folder} a writable folder, "
                            "then " + after) from None
        self._set_aside_newer(step, f"checkpoint of step {step} written after newer ones (this run went on from an older "
                                    "checkpoint)")
        for old in self.existing()[self.keep_last:]:
            old.unlink(missing_ok=True)
        return path

    def _set_aside_newer(self, step: int, why: str) -> list[Path]:
        """A run resumed from an older checkpoint (train.resume=<file>) branches off: the newer checkpoints of the
        branch it left move to superseded/, so that pruning keeps the new branch and `auto` resumes it. Returns
        what moved."""
        newer = [p for p in self.existing() if int(NAME.match(p.name).group(1)) > step]
        if not newer:
            return []
        # One folder per branch left behind, so that none overwrites another's files.
        aside = self.folder / SUPERSEDED / f"{time.strftime('%Y%m%d-%H%M%S')}-before-step-{max(step, 0):08d}"
        aside.mkdir(parents=True, exist_ok=True)
        for p in newer:
            p.replace(aside / p.name)
        log.warning("%s: moved %s to %s; delete them when no longer wanted", why, ", ".join(p.name for p in newer), aside)
        return newer

    def start(self, resume: str, restarted: str | None) -> Path | None:
        """The checkpoint a run starts from.

        train.resume says it for a new start. A job started again by torchrun or SLURM (`restarted` says which)
        runs the same command, so the same train.resume: `never` or a file would then start it afresh, or from that
        file, at every restart, and a job that always meets its time limit would never end. It goes on from its own
        newest checkpoint instead. So that the checkpoints in the run folder are its own, a new start that does not
        resume `auto` first moves the folder's checkpoints past the one it starts from to superseded/.

        `continues` says whether the run goes on from its own newest checkpoint: only then does it keep its
        history's W&B run, which another run's checkpoint, or a branch of its own, would overwrite.
        """
        self.continues = False
        if resume == "auto" or restarted:
            newest = self.find("auto")
            if newest is not None:
                if resume != "auto":
                    log.warning("%s: going on from %s, this run's newest checkpoint, not train.resume=%s", restarted,
                                newest, resume)
                self.continues = True
                return newest
            if resume == "auto":
                return None
            return self.find(resume)
        path = self.find(resume)
        step = self._step_in(path) if path is not None and path.resolve().parent == self.folder.resolve() else None
        moved = self._set_aside_newer(-1 if step is None else step,
                                      f"train.resume={resume} starts this run afresh" if path is None else
                                      f"train.resume={resume} starts this run from that checkpoint")
        self.continues = step is not None and not moved
        return path

    def _step_in(self, path: Path) -> int:
        """A checkpoint's step: in its name, step-NNNNNNNN.pt, or for a copy under another name (best.pt) in it."""
        match = NAME.match(path.name)
        return int(match.group(1)) if match else int(self.load(path)["step"])

    def find(self, resume: str) -> Path | None:
        """The checkpoint to resume from: `never`, `auto` (newest that loads) or a path."""
        if resume == "never":
            return None
        if self.folder.is_dir():
            for stale in remove_stale_tmp(self.folder):  # a save cut short (kill -9, a crash) left it there
                log.warning("removed %s, a checkpoint whose writing was cut short", stale)
        if resume != "auto":
            path = Path(resume)
            if not path.is_file():
                raise UserError(f"train.resume {resume} does not exist: pass a checkpoint file, auto or never.")
            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise UserError(f"train.resume {resume} does not load ({e}): pass another checkpoint, auto or never.") from None
            return path
        for path in self.existing():
            try:
                data = path.read_bytes()
            except OSError as e:
                # The storage, not the file: skipping every checkpoint for that would start the run over, and its first
                # save would then set the good checkpoints aside.
                raise UserError(f"checkpoint {path} cannot be read ({e.strerror or e}): fix the storage, then run the same "
                                "command again; nothing was changed.") from None
            try:
                # From memory: torch.load on a file cut short can itself raise OSError (EINVAL, seeking past the end).
                torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
                return path
            except Exception as e:  # a cut-short or damaged file: RuntimeError, EOFError, ValueError, UnpicklingError
                log.warning("skipping checkpoint %s, which does not load (%s); trying the one before", path, e)
        return None

    @staticmethod
    def load(path: Path) -> dict[str, Any]:
        return torch.load(path, map_location="cpu", weights_only=True)
