"""Synthetic datasets in the real layouts, and their shards, made once per test session."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from shards.build import build
from shards.celeba import CelebASource
from shards.celebdf import CelebDFSource
from shards.synth.celeba import write_celeba
from shards.synth.celebdf import write_celebdf

REPO = Path(__file__).resolve().parents[1]
CELEBA_IMAGES = 60
CELEBDF_VIDEOS = 12
CELEBDF_ARGS = dict(frames_per_video=6, face_size=128, maxcount=12)  # two videos a shard


def pytest_collection_modifyitems(config, items):
    if not any("gpu" in item.keywords for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 just now, for a server or a rendezvous a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def small_disk(folder: Path, size: str):
    """A tmpfs of `size` (mount's words: 1m, 24m) mounted on `folder`, made here, to be filled; the test is skipped
    where this process cannot mount one."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here to fill ({mounted.stderr.strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def run_shards(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    """`python -m shards ARGS` as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "shards", *map(str, args)], capture_output=True, text=True, timeout=timeout_s, cwd=REPO
    )


@pytest.fixture(scope="session", autouse=True)
def subprocess_tmpdir(tmp_path_factory) -> Path:
    """TMPDIR for every process the tests start: a folder of this session's, which pytest deletes with its
    older sessions. torchrun leaves a torchelastic_* folder of its logs in the temporary directory at every
    launch, and a `make test` launches some 35."""
    tmp = tmp_path_factory.mktemp("tmpdir")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(tmp))
        yield tmp


@pytest.fixture
def tf32_on():
    """TF32 products allowed, as train.tf32 leaves them on a GPU; put back after (a global switch, which
    monkeypatch cannot restore)."""
    import torch

    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture(scope="session")
def celeba_root(tmp_path_factory) -> Path:
    return write_celeba(tmp_path_factory.mktemp("data") / "celeba", CELEBA_IMAGES, seed=1)


@pytest.fixture(scope="session")
def celebdf_root(tmp_path_factory) -> Path:
    return write_celebdf(tmp_path_factory.mktemp("data") / "celebdf", CELEBDF_VIDEOS, seed=1)


@pytest.fixture(scope="session")
def celeba_shards(celeba_root, tmp_path_factory):
    """The BuildReport of sharding the synthetic CelebA, 16 images a shard."""
    return build(CelebASource(celeba_root, maxcount=16), tmp_path_factory.mktemp("shards"), workers=1, progress=False)


@pytest.fixture(scope="session")
def celebdf_shards(celebdf_root, tmp_path_factory):
    return build(CelebDFSource(celebdf_root, **CELEBDF_ARGS), tmp_path_factory.mktemp("shards"), workers=2, progress=False)


def shard_bytes(dataset_dir: Path) -> dict[str, bytes]:
    """Every tar and index file of a dataset folder, by name."""
    return {p.name: p.read_bytes() for p in sorted(dataset_dir.iterdir()) if p.suffix in (".tar", ".idx")}


@pytest.fixture(scope="session")
def smoke_checkpoint(celeba_shards, tmp_path_factory):
    """A checkpoint after 2 training steps of a small DCGAN on the synthetic CelebA (one process)."""
    runs = tmp_path_factory.mktemp("smoke-runs")
    overrides = [f"data.shards={celeba_shards.out_dir}", "data.batch_size=4", "data.threads=1", "model.ngf=16",
                 "model.ndf=16", f"train.runs_dir={runs}", "train.name=smoke", "train.max_steps=2", "log.wandb=offline"]
    result = subprocess.run([sys.executable, "launch/train.py", "--config", "configs/smoke.yaml", *overrides],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return runs / "smoke" / "checkpoints" / "step-00000002.pt"


@pytest.fixture(scope="session")
def sbi_checkpoint(celeba_shards, celebdf_shards, tmp_path_factory):
    """A checkpoint after 2 steps of the self-blend recipe on CelebA plus Celeb-DF's real frames (one process)."""
    runs = tmp_path_factory.mktemp("sbi-runs")
    shards = f"data.shards=[{celeba_shards.out_dir},{celebdf_shards.out_dir}]"
    overrides = [shards, "data.batch_size=4", "model.ngf=16", "model.ndf=16", f"train.runs_dir={runs}",
                 "train.max_steps=2", "log.wandb=disabled"]
    result = subprocess.run([sys.executable, "launch/train.py", "--config", "configs/sbi-smoke.yaml", *overrides],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return runs / "sbi-smoke" / "checkpoints" / "step-00000002.pt"


@pytest.fixture(scope="session")
def uncalibrated_checkpoint(smoke_checkpoint, tmp_path_factory):
    """The smoke checkpoint as one written before thresholds were calibrated: without `threshold`."""
    import torch

    state = torch.load(smoke_checkpoint, map_location="cpu", weights_only=True)
    del state["threshold"], state["calibration"]
    path = tmp_path_factory.mktemp("old-checkpoint") / "step-00000002.pt"
    torch.save(state, path)
    return path
