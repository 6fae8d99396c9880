import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from PIL import Image
from test_train import _overrides, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_runs(celeba_shards, tmp_path_factory):
    runs = tmp_path_factory.mktemp("lr-runs")
    for lr in ("1e-4", "1e-3"):
        result = train(1, _overrides(celeba_shards.out_dir, runs, f"lr-{lr}", f"train.lr_G={lr}", "train.max_steps=6",
                                     "log.wandb=disabled"))
        assert result.returncode == 0, result.stderr[-2000:]
    return runs


def test_compare_tabulates_what_differs_and_plots_it(two_runs, tmp_path):
    (two_runs / "lr-notes.txt").write_text("")  # runs/lr-* also matches what is not a run
    for i, run in enumerate(sorted(two_runs.glob("lr-*/config.yaml"))):  # as SLURM jobs: each its own markers
        text = run.read_text().replace("stop_marker: null", f"stop_marker: /repo/.stopped-{i}")
        text = text.replace("stop_request: null", f"stop_request: /repo/.stop-{i}")
        run.write_text(text.replace("start_marker: null", f"start_marker: /repo/.started-{i}"))
    result = subprocess.run([sys.executable, "-m", "pipeline.compare", str(two_runs / "lr-*"), "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = lines[0].split()
    assert header[:2] == ["run", "train.lr_G"]
    rows = {line.split()[0]: line.split() for line in lines[2:4]}
    assert {name: row[1] for name, row in rows.items()} == {"lr-1e-4": "0.0001", "lr-1e-3": "0.001"}
    assert {row[2] for row in rows.values()} == {"6"}  # steps
    assert len({row[3] for row in rows.values()}) == 2  # the final D losses differ with G's learning rate
    assert "configs differ in: train.lr_G\n" in result.stdout and f"skipping {two_runs / 'lr-notes.txt'}" in result.stderr
    for name, size in (("losses.png", (1200, 400)), ("d_outputs.png", (1200, 400))):
        assert Image.open(tmp_path / name).size == size
    strip = Image.open(tmp_path / "samples.png")
    assert strip.width > 2 * 500 and strip.height > 500


def test_compare_names_a_folder_that_is_not_a_run(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline.compare", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "is not a run folder" in result.stderr


def test_training_time_leaves_out_a_requeued_jobs_time_in_the_queue():
    from pipeline.compare import Run

    logged = [(1, 0.5, 100.0), (2, 0.5, 101.0), (3, 0.5, 102.0), (4, 0.5, 7302.0), (5, 0.5, 7303.0)]  # 2 h queued
    assert Run(Path("r"), {}, {"loss/D": logged}, None).wall_s == 3.0
