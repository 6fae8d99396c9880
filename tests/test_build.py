"""The sharding driver's own failures: a worker that dies, two runs into one folder, a run killed while it tidies."""

import errno
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, run_shards, shard_bytes, small_disk

from pipeline.errors import UserError
from shards.build import LOCK_FILE, SHARD_FILE, build
from shards.celeba import CelebASource


def test_a_worker_killed_mid_run_stops_it_with_a_sentence_and_a_rerun_reuses_what_was_written(tmp_path, celeba_root):
    train = CelebASource(celeba_root, maxcount=16).plan()[0]["train"]
    assert len(train) > 40
    # The worker that takes item 40 dies once train-000000 and -000001 (items 0-31) are written.
    args = ["celeba", "--root", str(celeba_root), "--out", str(tmp_path), "--maxcount", "16", "--workers", "2", "--no-progress"]
    died = subprocess.run([sys.executable, "tests/shard_with_a_dying_worker.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=90, env={**os.environ, "DIE_AT": train[40][2]["file"], "DIE_AFTER_SHARD":
                                                      "train-000001.tar", "DIE_AFTER": str(tmp_path / "celeba" / "manifest.json")})
    assert died.returncode == 3, died.stderr
    assert died.stderr.strip().splitlines()[-1] == (
        f"error: a worker process died while sharding {celeba_root} (killed by SIGKILL; SIGKILL is most often the system's "
        "out-of-memory killer): run the same command again with fewer --workers; the shards already written are kept.")
    manifest = json.loads((tmp_path / "celeba" / "manifest.json").read_text())
    assert not manifest["complete"] and {"train-000000.tar", "train-000001.tar"} <= {e["file"] for e in manifest["shards"]}

    again = run_shards(*args)
    assert again.returncode == 0, again.stderr
    assert f", {len(manifest['shards'])} reused" in again.stdout


def test_a_second_run_into_a_folder_being_written_is_refused_and_deletes_nothing(tmp_path, celeba_root):
    out = tmp_path / "celeba"
    out.mkdir()
    in_progress = out / ".train-000000.tar.tmp-12345"  # the first run's shard being written
    in_progress.write_bytes(b"half a tar")
    with open(out / LOCK_FILE, "a+") as first_run:
        fcntl.flock(first_run, fcntl.LOCK_EX)
        with pytest.raises(UserError) as error:
            build(CelebASource(celeba_root, maxcount=16), tmp_path, progress=False)
    assert str(error.value) == (f"another run of `python -m shards` is writing {out} (it holds {out / LOCK_FILE}): wait "
                                "for it to end, or stop it, then run this command again.")
    assert in_progress.read_bytes() == b"half a tar" and not (out / "manifest.json").exists()


def test_a_folder_that_cannot_hold_the_lock_is_written_unguarded_with_a_warning(tmp_path, celeba_root, celeba_shards, caplog):
    # As on Lustre mounted without flock (ENOSYS), or beside another user's lock file: here the lock's name is a folder.
    out = tmp_path / "celeba"
    shutil.copytree(celeba_shards.out_dir, out)
    (out / LOCK_FILE).unlink()
    (out / LOCK_FILE).mkdir()
    report = build(CelebASource(celeba_root, maxcount=16), tmp_path, progress=False)
    assert report.manifest["complete"] and report.shards_reused == len(report.manifest["shards"])
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"cannot lock {out / LOCK_FILE} (Is a directory): a second run into {out} at the same time would not be refused"]


class Killed(BaseException):
    pass


def test_a_run_killed_while_removing_old_shards_leaves_no_manifest_that_lists_them(tmp_path, celeba_root, celeba_shards,
                                                                                     monkeypatch):
    out = tmp_path / "celeba"
    shutil.copytree(celeba_shards.out_dir, out)
    unlink = type(out).unlink

    def killed_at_the_first_shard(path, *args, **kwargs):
        if SHARD_FILE.match(path.name):
            raise Killed
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(type(out), "unlink", killed_at_the_first_shard)
    with pytest.raises(Killed):  # 32 images a shard: fewer shards, so some of the 16-image ones go
        build(CelebASource(celeba_root, maxcount=32), tmp_path, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"]
    assert all((out / e["file"]).is_file() for e in manifest["shards"])


def test_a_shard_whose_every_item_is_now_skipped_leaves_no_old_file_behind(tmp_path, celeba_root, celeba_shards):
    root, out = tmp_path / "celeba-root", tmp_path / "shards" / "celeba"
    shutil.copytree(celeba_root, root)  # copy2: the same modification times, so every other shard is reused
    shutil.copytree(celeba_shards.out_dir, out)
    test = CelebASource(root, maxcount=16).plan()[0]["test"]
    assert 0 < len(test) <= 16 and (out / "test-000000.tar").is_file()
    for path, *_ in test:
        with open(path, "wb") as f:
            f.write(b"not a JPEG any more")
    report = build(CelebASource(root, maxcount=16), tmp_path / "shards", progress=False)
    assert report.shards_written == 1
    assert [e["samples"] for e in report.manifest["shards"] if e["file"] == "test-000000.tar"] == [0]
    assert not (out / "test-000000.tar").exists() and not (out / "test-000000.idx").exists()


def test_a_full_disk_or_an_out_through_a_file_is_one_sentence_and_a_rerun_goes_on(tmp_path, celeba_root, celeba_shards):
    args = ["celeba", "--root", str(celeba_root), "--maxcount", "16", "--workers", "1", "--no-progress"]
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    through_a_file = run_shards(*args, "--out", str(tmp_path / "notes.txt" / "shards"))
    assert through_a_file.returncode == 2 and through_a_file.stderr.strip().splitlines()[-1] == (
        f"error: cannot write {tmp_path / 'notes.txt' / 'shards' / 'celeba'} (Not a directory): pass an --out folder you can write to.")

    with small_disk(tmp_path / "disk", "1m") as disk:
        full = run_shards(*args, "--out", str(disk))  # the shards take 1.7 MB
        out = disk / "celeba"
        assert full.returncode == 2, full.stderr[-2000:]
        last = full.stderr.strip().splitlines()[-1]
        assert re.fullmatch(rf"error: no space left to write {re.escape(str(out))}(/\w[-\w.]*\.(tar|idx|json))? \(No space left "
                            r"on device\): free some and run the same command again \(it reuses the shards written so "
                            r"far\), or pass another --out\.", last), full.stderr[-2000:]  # the folder: a write() names no file
        manifest = json.loads((out / "manifest.json").read_text())
        written = {e["file"] for e in manifest["shards"]}
        assert written and not manifest["complete"] and not [p for p in out.iterdir() if ".tmp-" in p.name]
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)  # a read-only mount: no lock, no shard
        read_only = run_shards(*args, "--out", str(disk))
        assert read_only.returncode == 2 and read_only.stderr.strip().splitlines()[-1] == (
            f"error: cannot write {out / '.shards.lock'} (Read-only file system): pass an --out folder you can write to.")
        subprocess.run(["mount", "-o", "remount,rw,size=8m", str(disk)], check=True)
        again = run_shards(*args, "--out", str(disk))
        assert again.returncode == 0 and f", {len(written)} reused" in again.stdout, again.stderr[-2000:]
        assert shard_bytes(out) == shard_bytes(celeba_shards.out_dir)


def test_a_write_failure_names_the_file_being_made_and_leaves_other_errors_alone(tmp_path):
    from shards.build import _write_failure

    out = tmp_path / "celeba"
    temporary = out / ".manifest.json.tmp-4242"  # atomic_path's name, gone by the time the sentence is read
    assert _write_failure(OSError(errno.EROFS, "Read-only file system", str(temporary)), out) == (
        f"cannot write {out / 'manifest.json'} (Read-only file system): pass an --out folder you can write to.")
    assert _write_failure(OSError(errno.EACCES, "Permission denied", str(tmp_path / "dataset" / "1.jpg")), out) is None
    assert _write_failure(BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable"), out) is None  # a worker's start
