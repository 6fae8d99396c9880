"""The one-call GPU scripts' own checks of their arguments, which run before anything needs a GPU."""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(*args):
    return subprocess.run(["bash", *args], cwd=REPO, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script", ["bench/gpu.sh", "bench/gpu-detector.sh"])
def test_without_out_a_gpu_script_stops_with_its_usage(script, tmp_path):
    result = _run(script)
    assert result.returncode == 2 and result.stderr.startswith(f"usage: {script} OUT")


@pytest.mark.parametrize("seconds", ["1.5", "data.image_size=256"])
def test_gpu_detector_takes_whole_seconds_only(seconds, tmp_path):
    result = _run("bench/gpu-detector.sh", str(tmp_path / "out"), seconds)
    assert result.returncode == 2 and f"SECONDS is {seconds}: give a whole number of seconds" in result.stderr
    assert not (tmp_path / "out").exists()  # stopped before it wrote anything


@pytest.mark.parametrize("script", ["bench/gpu.sh", "bench/gpu-detector.sh"])
def test_without_the_staged_wheels_a_gpu_script_stops_before_measuring(script, tmp_path):
    if Path("/tmp/site/.installed").exists():
        pytest.skip("this machine has the staged wheels installed (/tmp/site)")
    result = _run(script, str(tmp_path / "out"))
    assert result.returncode == 3 and "the staged wheels in /tmp/parts are missing or did not install" in result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # not one part ran


@pytest.mark.parametrize("script", ["bench/gpu.sh", "bench/gpu-detector.sh"])
def test_a_deadline_that_is_not_whole_seconds_is_refused(script, tmp_path):
    result = subprocess.run(["bash", script, str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "DEADLINE_S": "9m"})
    assert result.returncode == 2 and "DEADLINE_S is 9m: give a whole number of seconds" in result.stderr
    assert not (tmp_path / "out").exists()
