"""Deterministic output, and runs that continue where an interrupted one stopped."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import CELEBDF_ARGS, REPO, shard_bytes

from shards.build import LOCK_FILE, build
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


def test_an_input_replaced_at_the_same_size_redoes_its_shard_alone(tmp_path, celeba_root):
    # A repaired download can have the very size of the broken file: its modification time tells it apart.
    root = tmp_path / "celeba"
    shutil.copytree(celeba_root, root)  # copy2: the same modification times
    first = build(CelebASource(root, maxcount=16), tmp_path / "shards", progress=False)
    train = CelebASource(root, maxcount=16).plan()[0]["train"]
    image, other = Path(train[16][0]), Path(train[0][0]).read_bytes()  # train-000001's first image, train-000000's
    size, mtime_ns = image.stat().st_size, image.stat().st_mtime_ns
    image.write_bytes((other + bytes(size))[:size])  # another picture at the same size (cut, or padded past its end)
    os.utime(image, ns=(mtime_ns + 10**9, mtime_ns + 10**9))

    second = build(CelebASource(root, maxcount=16), tmp_path / "shards", progress=False)
    assert (second.shards_written, second.shards_reused) == (1, len(first.manifest["shards"]) - 1)
    redone = [e["file"] for e in second.manifest["shards"] if e not in first.manifest["shards"]]
    assert redone == ["train-000001.tar"]


def test_celebdf_inputs_are_known_by_size_and_modification_time(tmp_path, celebdf_root):
    root = tmp_path / "celebdf"
    shutil.copytree(celebdf_root, root)
    source = CelebDFSource(root, **CELEBDF_ARGS)
    before = [source.item_id(i) for items in source.plan()[0].values() for i in items]
    video = sorted((root / "Celeb-real").glob("*.mp4"))[0]
    mtime_ns = video.stat().st_mtime_ns
    os.utime(video, ns=(mtime_ns + 10**9, mtime_ns + 10**9))
    after = [source.item_id(i) for items in source.plan()[0].values() for i in items]
    assert [a for a, b in zip(before, after) if a != b] == [i for i in before if f"Celeb-real/{video.name} " in i]
    assert len(before) == len(after) and sum(a != b for a, b in zip(before, after)) == 1


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
    assert not [p for p in (out / "celebdf").iterdir() if p.name.startswith(".") and p.name != LOCK_FILE]
