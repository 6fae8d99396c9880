"""Deterministic output, and runs that continue where an interrupted one stopped."""

import json
import os
import signal
import subprocess
import sys
import time

from conftest import CELEBDF_ARGS, REPO, shard_bytes

from shards.build import build
from shards.celeba import CelebASource
from shards.celebdf import CelebDFSource


def test_two_runs_give_byte_identical_shards_whatever_the_workers(tmp_path, celeba_root, celeba_shards):
    again = build(CelebASource(celeba_root, maxcount=16), tmp_path, workers=2, progress=False)
    assert shard_bytes(again.out_dir) == shard_bytes(celeba_shards.out_dir)


def test_celebdf_shards_are_deterministic(tmp_path, celebdf_root, celebdf_shards):
    again = build(CelebDFSource(celebdf_root, **CELEBDF_ARGS), tmp_path, workers=1, progress=False)
    assert shard_bytes(again.out_dir) == shard_bytes(celebdf_shards.out_dir)


def test_a_rerun_keeps_intact_shards_and_redoes_damaged_ones(tmp_path, celeba_root, celeba_shards):
    first = build(CelebASource(celeba_root, maxcount=16), tmp_path, progress=False)
    out = first.out_dir
    damaged = out / "train-000001.tar"
    data = bytearray(damaged.read_bytes())
    data[2000] ^= 0xFF
    damaged.write_bytes(bytes(data))
    (out / "test-000000.tar").unlink()
    untouched_mtime = (out / "train-000000.tar").stat().st_mtime_ns

    second = build(CelebASource(celeba_root, maxcount=16), tmp_path, progress=False)
    assert (second.shards_written, second.shards_reused) == (2, len(first.manifest["shards"]) - 2)
    assert (out / "train-000000.tar").stat().st_mtime_ns == untouched_mtime
    assert shard_bytes(out) == shard_bytes(celeba_shards.out_dir)


def test_changed_arguments_rewrite_every_shard_and_drop_stale_ones(tmp_path, celeba_root):
    build(CelebASource(celeba_root, maxcount=8), tmp_path, progress=False)
    report = build(CelebASource(celeba_root, maxcount=16), tmp_path, progress=False)
    assert report.shards_reused == 0
    on_disk = sorted(p.name for p in report.out_dir.glob("*.tar"))
    assert on_disk == sorted(e["file"] for e in report.manifest["shards"])


def test_an_interrupted_run_continues_to_the_same_result(tmp_path, celebdf_root, celebdf_shards):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "shards", "celebdf", "--root", str(celebdf_root), "--out", str(out), "--workers", "1",
           "--frames-per-video", str(CELEBDF_ARGS["frames_per_video"]), "--face-size", str(CELEBDF_ARGS["face_size"]),
           "--maxcount", str(CELEBDF_ARGS["maxcount"]), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / "celebdf" / "manifest.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if manifest.exists() and json.loads(manifest.read_text())["shards"]:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up, as with a preempted node
    proc.wait()
    killed = json.loads(manifest.read_text())
    assert not killed["complete"], "the run finished before it could be interrupted"
    done = {e["file"] for e in killed["shards"]}
    on_disk = {p.name for p in (out / "celebdf").glob("*.tar")}
    assert {f for f in done if f in on_disk} == done  # what the manifest lists is on disk, whole

    resumed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f", {len(killed['shards'])} reused" in resumed.stdout
    assert shard_bytes(out / "celebdf") == shard_bytes(celebdf_shards.out_dir)
    assert not [p for p in (out / "celebdf").iterdir() if p.name.startswith(".")]
