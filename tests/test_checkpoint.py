"""The checkpoint folder's rules: the newest k kept, and a run that went on from an older checkpoint."""

import errno
import os
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import SUPERSEDED, CheckpointManager
from pipeline.errors import UserError


def test_a_run_resumed_from_an_older_checkpoint_keeps_its_own_and_auto_resumes_it(tmp_path):
    ckpt = CheckpointManager(tmp_path, keep_last=2)
    for step in (1000, 2000, 3000):
        ckpt.save({"step": step}, step)
    assert [p.name for p in ckpt.existing()] == ["step-00003000.pt", "step-00002000.pt"]
    # train.resume=<step-2000 file>, then the new branch saves at 2500: the old branch's 3000 must not win.
    path = ckpt.save({"step": 2500}, 2500)
    assert path.is_file() and ckpt.find("auto") == path
    assert [p.name for p in ckpt.existing()] == ["step-00002500.pt", "step-00002000.pt"]
    (aside,) = (tmp_path / SUPERSEDED).iterdir()
    assert [p.name for p in aside.iterdir()] == ["step-00003000.pt"]
    # Back again, to before every checkpoint kept: the new one is the only one left, and nothing is lost.
    path = ckpt.save({"step": 1500}, 1500)
    assert ckpt.existing() == [path] and ckpt.find("auto") == path
    moved = sorted(p.name for p in (tmp_path / SUPERSEDED).glob("*/*.pt"))
    assert moved == ["step-00002000.pt", "step-00002500.pt", "step-00003000.pt"]


def _aside(folder):
    return sorted(p.name for p in (folder / SUPERSEDED).glob("*/*.pt"))


def test_a_job_started_again_goes_on_from_its_own_newest_checkpoint_whatever_train_resume_says(tmp_path):
    # torchrun (--max-restarts) and SLURM (a requeue) start a job again with the same command, and so the same
    # train.resume: `never` or a file would start it over at every restart, and a job that always meets its time
    # limit would never end.
    folder = tmp_path / "run"
    ckpt = CheckpointManager(folder, keep_last=5)
    for step in (1000, 2000):  # an earlier run of the same name
        ckpt.save({"step": step}, step)
    # A new start with never: afresh, and the earlier run's checkpoints move aside, so that a restart cannot take them.
    assert ckpt.start("never", restarted=None) is None and ckpt.existing() == []
    assert _aside(folder) == ["step-00001000.pt", "step-00002000.pt"]
    assert ckpt.start("never", "torchrun's restart 1") is None  # started again before its first checkpoint: afresh
    mine = ckpt.save({"step": 10}, 10)
    assert ckpt.start("never", "SLURM's restart 1") == mine

    # From a file of another run: this folder's checkpoints move aside; a restart goes on from its own, once it has one.
    other = tmp_path / "other.pt"
    shutil.copy(mine, other)
    assert ckpt.start(str(other), restarted=None) == other and ckpt.existing() == []
    assert ckpt.start(str(other), "torchrun's restart 1") == other
    mine = ckpt.save({"step": 20}, 20)
    assert ckpt.start(str(other), "torchrun's restart 2") == mine

    # From one of its own: only the newer ones move aside.
    for step in (30, 40):
        ckpt.save({"step": step}, step)
    start = ckpt.path(30)
    assert ckpt.start(str(start), restarted=None) == start
    assert [p.name for p in ckpt.existing()] == ["step-00000030.pt", "step-00000020.pt"]
    assert "step-00000040.pt" in _aside(folder)
    assert ckpt.start("auto", "SLURM's restart 3") == start  # auto is auto


def test_only_a_run_going_on_from_its_own_newest_checkpoint_continues_its_history(tmp_path):
    # `continues` decides whether the run keeps its W&B run: another run's checkpoint would write into that run, and a
    # branch from an older one of its own would have W&B drop every step up to the last it logged.
    folder = tmp_path / "run"
    ckpt = CheckpointManager(folder, keep_last=5)
    assert ckpt.start("auto", None) is None and not ckpt.continues  # nothing yet
    for step in (10, 20, 30):
        ckpt.save({"step": step}, step)
    assert ckpt.start("auto", None) == ckpt.path(30) and ckpt.continues
    assert ckpt.start(str(ckpt.path(30)), None) == ckpt.path(30) and ckpt.continues  # its newest, by name
    other = tmp_path / "other.pt"
    shutil.copy(ckpt.path(20), other)
    assert ckpt.start(str(ckpt.path(20)), None) == ckpt.path(20) and not ckpt.continues  # a branch: 30 moved aside
    assert ckpt.start("never", "SLURM's restart 1") == ckpt.path(20) and ckpt.continues  # a restart goes on
    assert ckpt.start(str(other), None) == other and not ckpt.continues  # another run's
    assert ckpt.start("never", None) is None and not ckpt.continues


def test_a_copy_under_another_name_in_the_run_folder_resumes_by_the_step_it_holds(tmp_path):
    # `cp step-N.pt best.pt` beside the others, then train.resume=.../best.pt (evaluation wants a checkpoint inside
    # the run's checkpoints/ folder): resumed, with the checkpoints past its step moved aside, not an AttributeError.
    ckpt = CheckpointManager(tmp_path, keep_last=5)
    for step in (10, 20, 30):
        ckpt.save({"step": step}, step)
    best = tmp_path / "best.pt"
    shutil.copy(ckpt.path(20), best)
    assert ckpt.start(str(best), None) == best and not ckpt.continues
    assert [p.name for p in ckpt.existing()] == ["step-00000020.pt", "step-00000010.pt"] and _aside(tmp_path) == ["step-00000030.pt"]


@pytest.mark.parametrize("listable", [True, False])
def test_a_checkpoint_folder_that_cannot_be_written_is_one_sentence(tmp_path, monkeypatch, listable):
    (tmp_path / "checkpoints").write_text("a file where the folder should be")
    if not listable:  # the folder cannot even be listed for the message: still the one sentence, not a second error
        monkeypatch.setattr(CheckpointManager, "existing", lambda self: (_ for _ in ()).throw(PermissionError(13, "denied")))
    with pytest.raises(UserError, match=r"checkpoint .*step-00000003.pt cannot be written \(.*\): make .* a writable folder, "
                                        r"then run the same command again; it resumes from the start"):
        CheckpointManager(tmp_path / "checkpoints", keep_last=2).save({"step": 3}, 3)


def test_a_checkpoint_the_storage_cannot_read_stops_the_resume_instead_of_starting_over(tmp_path, monkeypatch):
    # A damaged file is skipped for the one before; an I/O error (NFS, a failing disk) is the storage's, and skipping
    # every checkpoint for it would start the run over and set the good ones aside at its first save.
    ckpt = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2):
        ckpt.save({"step": step, "weights": torch.ones(100_000)}, step)
    whole = ckpt.path(2).read_bytes()
    for cut in (100, 5000, len(whole) - 1):  # torch.load of a file cut at 5000 bytes raises OSError (EINVAL) itself
        ckpt.path(2).write_bytes(whole[:cut])
        assert ckpt.find("auto") == ckpt.path(1), cut

    real_read = Path.read_bytes

    def unreadable(self):
        if self.name.startswith("step-"):
            raise OSError(errno.EIO, "Input/output error")
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", unreadable)
    with pytest.raises(UserError, match=r"checkpoint .*step-00000002.pt cannot be read \(Input/output error\): fix the storage"):
        ckpt.find("auto")


def test_a_checkpoint_is_durable_once_saved_its_folder_fsynced_after_the_rename(tmp_path, monkeypatch):
    import stat

    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)), fsync(fd)))
    CheckpointManager(tmp_path, keep_last=1).save({"step": 1}, 1)
    assert synced == [False, True]  # the file's bytes, then the folder's entry for its new name


def test_a_folder_the_file_system_cannot_fsync_still_takes_checkpoints(tmp_path, monkeypatch):
    import stat

    fsync = os.fsync

    def no_folder_sync(fd):  # as some FUSE and CIFS mounts answer
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", no_folder_sync)
    ckpt = CheckpointManager(tmp_path, keep_last=1)
    assert ckpt.save({"step": 1}, 1) == ckpt.path(1) and ckpt.find("auto") == ckpt.path(1)
