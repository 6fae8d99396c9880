"""The self-blend recipe in the trainer, as users run it: real torchrun with 2 gloo processes on the CPU."""

import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_data import _rewrite

from pipeline.config import DataConfig, load_config
from pipeline.data.common import load_split
from pipeline.dist import DistInfo
from pipeline.errors import UserError
from pipeline.trainer import Trainer

pytestmark = pytest.mark.slow


def _overrides(shards, runs, name, *extra):
    return [f"data.shards=[{','.join(map(str, shards))}]", "data.batch_size=4", "model.ngf=16", "model.ndf=16",
            f"train.runs_dir={runs}", f"train.name={name}", "train.log_every_steps=1", "train.ckpt_every_steps=2",
            "log.wandb=disabled", *extra]


def train(nproc, overrides, timeout_s=300):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    command = [*launcher, "launch/train.py", "--config", "configs/sbi-smoke.yaml", *overrides]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)


def _state(run_dir, step):
    return torch.load(run_dir / "checkpoints" / f"step-{step:08d}.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def shards(celeba_shards, celebdf_shards):
    return [celeba_shards.out_dir, celebdf_shards.out_dir]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("sbi-runs")


@pytest.fixture(scope="module")
def sbi_run(shards, runs):
    # Validation at every checkpoint: the resumed half must calibrate on what the whole run's second one did.
    result = train(2, _overrides(shards, runs, "whole", "train.max_steps=4", "train.val_every_steps=2"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return runs / "whole", result


def test_d_learns_from_reals_gs_samples_and_self_blends_and_calibrates_a_threshold(sbi_run, shards):
    run_dir, result = sbi_run
    blend = [float(v) for v in re.findall(r"D\(blend\) (\S+)", result.stdout)]
    assert len(blend) == 4 and all(0 < v < 1 for v in blend) and "D(G(z))" in result.stdout
    assert re.findall(r"step (\d+): parameters identical on all 2 ranks", result.stdout) == ["2", "4"]
    state = _state(run_dir, 4)
    assert "gan_head.weight" in state["D"]  # with G and self-blends, D gives G's samples their own logit
    calibration = state["calibration"]
    assert 0 < state["threshold"] < 1 and calibration["step"] == 4 and calibration["split"] == "val"
    assert calibration["reals"] > 0 and calibration["blends"] > 0 and 0 <= calibration["auc"] <= 1
    # Every val face once on two ranks (parts of 9, in batches of 4, 4 and 1 and padding), not the 16 of drop_last.
    assert calibration["reals"] == load_split(DataConfig(shards=[str(s) for s in shards], split="val", real_only=True)).samples
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    for tag in ("D/blend", "D/real_gan", "sbi/valid", "val/sbi_auc", "val/sbi_eer", "val/threshold"):
        assert tag in events.Tags()["scalars"], tag
    assert events.Scalars("val/threshold")[-1].value == pytest.approx(state["threshold"])


def test_resume_with_self_blends_matches_an_uninterrupted_run(sbi_run, shards, runs):
    for steps in (2, 4):
        result = train(2, _overrides(shards, runs, "halves", f"train.max_steps={steps}", "train.val_every_steps=2"))
        assert result.returncode == 0, result.stderr[-3000:]
    whole, halves = _state(sbi_run[0], 4), _state(runs / "halves", 4)
    for name in ("G", "D", "G_ema", "D_ema"):
        for key, value in whole[name].items():
            assert torch.equal(value, halves[name][key]), f"{name}.{key}"
    assert whole["threshold"] == halves["threshold"]


def test_d_alone_learns_reals_against_self_blends_without_g(shards, runs):
    result = train(1, _overrides(shards, runs, "no-G", "train.max_steps=3", "train.gan_weight=0"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "D(blend)" in result.stdout and "D(G(z))" not in result.stdout
    state = _state(runs / "no-G", 3)
    assert "gan_head.weight" not in state["D"]  # one task, one logit
    G0 = torch.load(runs / "no-G" / "checkpoints" / "step-00000002.pt", weights_only=True)["G"]
    assert all(torch.equal(v, G0[k]) for k, v in state["G"].items())  # G never steps
    assert not all(torch.equal(v, G0[k]) for k, v in state["D"].items() if v.is_floating_point())
    assert state["opt_G"]["state"] == {} and 0 < state["threshold"] < 1


def test_faces_with_unusable_landmarks_train_as_reals_only(shards, runs, tmp_path):
    celeba = tmp_path / "celeba"
    shutil.copytree(shards[0], celeba)

    def spoil(samples):  # NaN, one point repeated, and points far outside the crop
        bad = [np.full((68, 2), np.nan), np.full((68, 2), 0.5), np.full((68, 2), 7.0)]
        for s, points in zip(samples, bad * len(samples)):
            s.fields["lmk"] = points.astype("<f4").tobytes()
        return samples

    for tar in sorted(celeba.glob("train-*.tar")):
        _rewrite(tar, spoil)
    result = train(2, _overrides([celeba, shards[1]], runs, "spoiled", "train.max_steps=3"))
    assert result.returncode == 0, result.stderr[-3000:]
    events = EventAccumulator(str(runs / "spoiled"), size_guidance={"scalars": 0})
    events.Reload()
    valid = [e.value for e in events.Scalars("sbi/valid")]
    assert len(valid) == 3 and all(v < 1 for v in valid)  # the Celeb-DF frames' landmarks are usable
    state = _state(runs / "spoiled", 3)
    assert all(torch.isfinite(v).all() for v in state["D"].values() if v.is_floating_point())


def test_blends_of_unusable_landmarks_weigh_nothing_in_ds_loss(shards, runs):
    from pipeline.config import load_config
    from pipeline.dist import DistInfo
    from pipeline.trainer import Trainer

    cfg = load_config(REPO / "configs" / "sbi-smoke.yaml", _overrides(shards, runs, "in-process", "train.gan_weight=0"))
    trainer = Trainer(cfg, DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")))
    try:
        batch = next(iter(trainer.loader))
        batch.landmarks[1:] = float("nan")  # one usable face, three unusable
        stats = trainer.train_step(batch)
        assert stats["sbi/valid"] == 0.25 and torch.isfinite(stats["loss/D"])
        with torch.no_grad():
            valid = trainer.step_fn.make_inputs(batch).valid
        assert valid.tolist() == [True, False, False, False]
        batch.landmarks[:] = float("nan")
        stats = trainer.train_step(batch)
        assert stats["sbi/valid"] == 0 and stats["D/blend"] == 0  # no usable blend: D learns the reals only
    finally:
        trainer.close()


def test_the_recipe_also_trains_on_celeba_alone(shards, runs):
    result = train(1, _overrides([shards[0]], runs, "celeba-only", "train.max_steps=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert 0 < _state(runs / "celeba-only", 2)["threshold"] < 1


@pytest.mark.parametrize("extra, message", [
    (["data.crop=center"], "train.sbi_weight needs the face crops and their landmarks: set data.crop=face."),
    (["train.sbi_weight=0", "train.gan_weight=0"], "must be >= 0 and not both 0"),
    (["model.d_norm=layer"], "model.d_norm 'layer' is not one of"),
])
def test_recipe_settings_that_cannot_work_are_refused(shards, runs, extra, message):
    # In-process: launch/train.py turns a UserError from the trainer into its sentence and exit code (test_train.py's
    # refused resume and diverging runs go through that path).
    cfg = load_config(REPO / "configs" / "sbi-smoke.yaml", _overrides([shards[0]], runs, "bad", *extra))
    with pytest.raises(UserError, match=re.escape(message)):
        Trainer(cfg, DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")))
    assert not (runs / "bad").exists()  # refused before anything is written
