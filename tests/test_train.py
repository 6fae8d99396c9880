"""The trainer, as users run it: real torchrun with 2 gloo processes on the CPU (and plain python for 1)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, free_port, small_disk
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb_records import history, run_info

STEPS_PER_EPOCH = 6  # 48 training images, 2 ranks, batch 4
pytestmark = pytest.mark.slow


def _overrides(shards, runs, name, *extra):
    return [f"data.shards={shards}", "data.batch_size=4", "data.threads=1", "model.ngf=16", "model.ndf=16",
            f"train.runs_dir={runs}", f"train.name={name}", "train.log_every_steps=1", "train.ckpt_every_steps=2",
            "train.sample_every_steps=4", *extra]


def _command(nproc, overrides, script="launch/train.py"):
    """`script` (launch/train.py or a wrapper of it in tests/) as users launch it: torchrun for 2+ processes."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    return [*launcher, script, "--config", "configs/smoke.yaml", *overrides]


def train(nproc, overrides, timeout_s=300):
    return subprocess.run(_command(nproc, overrides), cwd=REPO, capture_output=True, text=True, timeout=timeout_s)


def _state(run_dir, step):
    return torch.load(run_dir / "checkpoints" / f"step-{step:08d}.pt", map_location="cpu", weights_only=True)


def _wandb_files(run_dir):
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def full_run(celeba_shards, runs):
    """8 steps with 2 ranks, crossing the end of the first epoch (6 steps)."""
    result = train(2, _overrides(celeba_shards.out_dir, runs, "full", "train.max_steps=8"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return runs / "full", result


def test_a_smoke_run_finishes_with_finite_losses_and_checkpoints(full_run):
    run_dir, result = full_run
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"step-{s:08d}.pt" for s in (4, 6, 8)]
    state = _state(run_dir, 8)
    assert (state["step"], state["nimg"], state["world_size"]) == (8, 8 * 8, 2)
    positions = [{k: loader[k] for k in ("epoch", "batch", "world_size", "batch_size", "reader_epoch", "reader_batch")}
                 for loader in state["loader"]]  # one per rank, each with its own DALI checkpoint
    assert positions == [{"epoch": 1, "batch": 2, "world_size": 2, "batch_size": 4, "reader_epoch": 1, "reader_batch": 2}] * 2
    assert all(loader["dali"] for loader in state["loader"])
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["noise"], state["rng"][1]["noise"])
    for name in ("G", "D", "G_ema", "D_ema"):
        assert all(torch.isfinite(v).all() for v in state[name].values() if v.is_floating_point())
    losses = [float(m) for m in re.findall(r"loss/D (\S+)", result.stdout)]
    assert len(losses) == 8 and all(0 < v < 100 for v in losses)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["name"] == "full"
    grids = sorted(p.name for p in (run_dir / "samples").iterdir())  # every 4 steps, and at the epoch's end
    assert grids == ["step-00000004.png", "step-00000006.png", "step-00000008.png"]


def test_parameters_are_identical_across_ranks(full_run):
    _, result = full_run
    checks = re.findall(r"step (\d+): parameters identical on all 2 ranks", result.stdout)
    assert checks == ["2", "4", "6", "8"]


def test_tensorboard_event_files_hold_the_scalars_and_sample_grids(full_run):
    run_dir, _ = full_run
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("loss/D", "loss/G", "D/real", "D/fake", "lr/D", "lr/G", "perf/img_per_s", "perf/step_s", "perf/mem_gb",
                "val/D_acc_real", "val/D_acc_fake", "val/loss_D"):
        assert tag in tags["scalars"], tag
    assert [e.step for e in events.Scalars("loss/D")] == list(range(1, 9))
    assert [e.value for e in events.Scalars("lr/G")] == [pytest.approx(2e-4)] * 8
    # At the epoch's end, and at max_steps: the last checkpoint's threshold is calibrated on its own D.
    assert [e.step for e in events.Scalars("val/D_acc_real")] == [STEPS_PER_EPOCH, 8]
    assert [e.step for e in events.Scalars("val/threshold")] == [STEPS_PER_EPOCH, 8]
    assert "samples/G_ema" in tags["images"]
    # The run ended at train.max_steps, before its last epoch: the hyperparameters are logged all the same.
    assert "hparam/loss/D" in tags["scalars"] and events.PluginTagToContent("hparams")
    image = events.Images("samples/G_ema")[0]
    assert (image.width, image.height) == (8 * 66 + 2, 8 * 66 + 2)  # 8x8 grid of 64 px with 2 px padding


def test_the_wandb_offline_run_holds_the_metrics_and_the_config(full_run):
    run_dir, _ = full_run
    (run_file,) = _wandb_files(run_dir)
    rows = [r for r in history(run_file) if "loss/D" in r]
    assert [r["_step"] for r in rows] == list(range(1, 9))
    assert all(0 < r["loss/D"] < 100 for r in rows)
    info = run_info(run_file)
    assert (info.project, info.display_name, info.job_type, list(info.tags)) == ("deepfake-gan", "full", "train", ["smoke"])
    assert info.run_id == _state(run_dir, 8)["wandb_run_id"]
    config = {item.key: json.loads(item.value_json) for item in info.config.update}
    assert config["data"]["batch_size"] == 4 and config["train"]["name"] == "full"


def test_resume_matches_an_uninterrupted_run(full_run, celeba_shards, runs):
    first = train(2, _overrides(celeba_shards.out_dir, runs, "halves", "train.max_steps=4"))
    assert first.returncode == 0, first.stderr[-3000:]
    second = train(2, _overrides(celeba_shards.out_dir, runs, "halves", "train.max_steps=8"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "step 4, epoch 0, batch 4" in second.stdout
    whole, halves = _state(full_run[0], 8), _state(runs / "halves", 8)
    for name in ("G", "D", "G_ema", "D_ema"):
        for key, value in whole[name].items():
            assert torch.equal(value, halves[name][key]), f"{name}.{key}"
    assert whole["opt_G"]["state"][0]["exp_avg"].equal(halves["opt_G"]["state"][0]["exp_avg"])
    # Each rank's own BatchNorm running statistics came back (rank 1's would be rank 0's otherwise).
    assert not torch.equal(whole["buffers"][0]["G_raw"]["main.1.running_mean"], whole["buffers"][1]["G_raw"]["main.1.running_mean"])
    for rank in (0, 1):
        for module, values in whole["buffers"][rank].items():
            assert all(torch.equal(v, halves["buffers"][rank][module][k]) for k, v in values.items()), (rank, module)
    ids = {p.parent.name.rsplit("-", 1)[-1] for p in _wandb_files(runs / "halves")}
    assert len(_wandb_files(runs / "halves")) == 2 and ids == {halves["wandb_run_id"]}  # the same W&B run continues


def test_a_nan_on_one_rank_is_skipped_at_that_step_on_both(celeba_shards, runs):
    overrides = _overrides(celeba_shards.out_dir, runs, "nan", "train.max_steps=5", "train.ckpt_every_steps=1",
                           "train.ckpt_keep_last=10", "train.log_every_steps=5", "log.wandb=disabled")
    env = {**os.environ, "INJECT_FAULT": "nan", "INJECT_RANK": "1", "INJECT_STEP": "3"}
    result = subprocess.run(_command(2, overrides, "tests/inject_fault.py"), cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "parameters identical on all 2 ranks" in result.stdout  # checked at every checkpoint
    # Step 3 was skipped for D on both ranks: Adam applied one update fewer, and no checkpoint was taken then.
    saved = sorted(int(p.stem.split("-")[1]) for p in (runs / "nan" / "checkpoints").iterdir())
    assert saved == [1, 2, 4, 5] and "step 3: no checkpoint while steps are being skipped" in result.stdout
    adam_steps = {k: (_state(runs / "nan", k)["opt_D"]["state"][0]["step"].item(),
                      _state(runs / "nan", k)["opt_G"]["state"][0]["step"].item()) for k in (2, 4, 5)}
    assert adam_steps == {2: (2, 2), 4: (3, 4), 5: (4, 5)}
    assert _state(runs / "nan", 5)["nonfinite_total"] == 1 and "skipped 1 non-finite steps so far" in result.stdout


@pytest.mark.parametrize("every, newest", [(2, "step-00000002.pt"), (100, None)])
def test_a_stop_while_steps_are_skipped_names_the_checkpoint_a_requeue_resumes_from(celeba_shards, runs, tmp_path, every,
                                                                                    newest):
    # No checkpoint is saved while steps are being skipped: the stop marker (which launch/slurm/torchrun.sh prints
    # and requeues on) must name the newest checkpoint there is, not the step the ranks stopped at, or say there is none.
    name = f"skipping-{every}"
    overrides = _overrides(celeba_shards.out_dir, runs, name, "train.max_steps=20", "train.max_nonfinite_steps=100",
                           f"train.ckpt_every_steps={every}", f"train.stop_marker={tmp_path / 'stopped'}", "log.wandb=disabled")
    env = {**os.environ, "INJECT_FAULT": "nan-on", "INJECT_RANK": "1", "INJECT_STEP": "3", "INJECT_SIGNAL_STEP": "5"}
    result = subprocess.run(_command(2, overrides, "tests/inject_fault.py"), cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert "stopping at step 5 on a signal" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    assert "step 5: no checkpoint while steps are being skipped" in result.stdout
    expected = runs / name / "checkpoints" / newest if newest else "no checkpoint: the start"
    assert (tmp_path / "stopped").read_text() == f"{expected}\n"


def test_a_run_that_diverges_on_one_rank_stops_both_with_code_3_and_leaves_no_gloo_thread(celeba_shards, runs):
    overrides = _overrides(celeba_shards.out_dir, runs, "diverged", "train.max_steps=20", "train.max_nonfinite_steps=2",
                           "log.wandb=disabled")
    env = {**os.environ, "INJECT_FAULT": "nan-on", "INJECT_RANK": "1", "INJECT_STEP": "3"}
    result = subprocess.run(_command(2, overrides, "tests/inject_fault.py"), cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert "failed (exitcode: 3)" in result.stderr, result.stdout[-3000:] + result.stderr[-3000:]  # torchrun's own: 1
    assert result.stderr.count("2 steps in a row had a non-finite loss or gradients (up to step 4)") == 2
    _assert_no_gloo_thread_at_exit(result.stdout)


def _copy_run(full_run, runs, name):
    shutil.copytree(full_run[0], runs / name)
    shutil.rmtree(runs / name / "wandb")
    return runs / name


def test_two_ranks_resume_as_one(full_run, celeba_shards, runs):
    run_dir = _copy_run(full_run, runs, "as-one")
    result = train(1, _overrides(celeba_shards.out_dir, runs, "as-one", "train.max_steps=10", "log.wandb=disabled"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 8, epoch 1, batch 4 (saved by 2 ranks, now 1)" in result.stdout
    assert _state(run_dir, 10)["world_size"] == 1


def test_a_resume_from_an_older_checkpoint_leaves_one_curve_in_tensorboard(full_run, celeba_shards, runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = _copy_run(full_run, runs, "branch")
    older = run_dir / "checkpoints" / "step-00000004.pt"
    result = train(1, _overrides(celeba_shards.out_dir, runs, "branch", f"train.resume={older}", "train.max_steps=6",
                                 "log.wandb=disabled"))
    assert result.returncode == 0, result.stderr[-3000:]
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss/D")] == [1, 2, 3, 4, 5, 6]  # not 1-8 and then 5-6 again


def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(full_run, celeba_shards, runs):
    run_dir = _copy_run(full_run, runs, "corrupt")
    newest = run_dir / "checkpoints" / "step-00000008.pt"
    newest.write_bytes(newest.read_bytes()[:5000])
    result = train(1, _overrides(celeba_shards.out_dir, runs, "corrupt", "train.max_steps=7", "log.wandb=disabled"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipping checkpoint {newest}, which does not load" in result.stdout + result.stderr
    assert "resumed from " + str(run_dir / "checkpoints" / "step-00000006.pt") in result.stdout


def test_a_resume_only_rank_0_can_refuse_stops_every_rank_with_its_sentence(celeba_shards, runs):
    # Rank 0 alone chooses the checkpoint; the other ranks must not wait for it at the next collective.
    result = train(2, _overrides(celeba_shards.out_dir, runs, "nope", "train.resume=nope.pt", "log.wandb=disabled"),
                   timeout_s=120)
    assert result.returncode != 0
    assert result.stderr.count("train.resume nope.pt does not exist: pass a checkpoint file, auto or never.") == 2, result.stderr[-3000:]


def test_a_diverging_run_stops_clearly_and_keeps_its_last_good_checkpoint(full_run, celeba_shards, runs):
    run_dir = _copy_run(full_run, runs, "diverge")
    result = train(1, _overrides(celeba_shards.out_dir, runs, "diverge", "train.lr_D=1e30", "train.lr_G=1e30",
                                 "train.max_nonfinite_steps=2", "train.max_steps=30", "log.wandb=disabled"))
    assert result.returncode == 3, result.stderr[-3000:]
    newest = run_dir / "checkpoints" / "step-00000008.pt"
    assert "steps in a row had a non-finite loss or gradients" in result.stderr and str(newest) in result.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir())[-1] == newest.name


def _workers(parent_pid):
    """{rank: pid} of torchrun's worker processes."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = dict(kv.split("=", 1) for kv in (entry / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent_pid and "RANK" in env:
            out[int(env["RANK"])] = int(entry.name)
    return out


def _start_and_wait_for_step(overrides, log_path, step):
    log = open(log_path, "w")
    proc = subprocess.Popen(_command(2, overrides), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while f"step {step}/" not in log_path.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.05)
    return proc


def test_sigterm_to_one_rank_saves_a_checkpoint_and_exits_0(celeba_shards, runs, tmp_path):
    overrides = _overrides(celeba_shards.out_dir, runs, "sigterm", "train.epochs=1000", "train.ckpt_every_steps=1000",
                           "log.wandb=disabled")
    proc = _start_and_wait_for_step(overrides, tmp_path / "log", 3)
    os.kill(_workers(proc.pid)[1], signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, (tmp_path / "log").read_text()[-3000:]
    output = (tmp_path / "log").read_text()
    stopped = int(re.search(r"stopping at step (\d+) on a signal", output).group(1))
    (ckpt,) = (runs / "sigterm" / "checkpoints").iterdir()
    assert ckpt.name == f"step-{stopped:08d}.pt" and _state(runs / "sigterm", stopped)["step"] == stopped


def test_sigterm_to_torchrun_stops_ranks_whose_loader_has_worker_processes(celeba_shards, runs, tmp_path):
    # torchrun passes a signal on to each rank's whole process group (os.killpg), as SLURM's scancel and a
    # preemption reach the ranks (launch/slurm/torchrun.sh): the baseline loader's worker processes and their
    # forkserver are in it, and died of it, failing the rank's next batch before it could save.
    overrides = _overrides(celeba_shards.out_dir, runs, "pgroup", "data.loader=baseline", "data.batch_size=2",
                           "train.epochs=1000", "train.ckpt_every_steps=1000", "log.wandb=offline", "train.log_every_steps=6")
    # 12 steps an epoch: the next boundary, step 12, is 6 batches on, more than the 2 a worker has ready
    proc = _start_and_wait_for_step(overrides, tmp_path / "log", 6)
    os.kill(proc.pid, signal.SIGTERM)  # the agent, which signals each rank's process group
    proc.wait(timeout=120)  # torchrun exits non-zero whenever it passed a signal on
    output = (tmp_path / "log").read_text()
    assert "DataLoader worker" not in output, output[-3000:]
    stopped = int(re.search(r"stopping at step (\d+) on a signal", output).group(1))
    (ckpt,) = (runs / "pgroup" / "checkpoints").iterdir()
    assert ckpt.name == f"step-{stopped:08d}.pt" and _state(runs / "pgroup", stopped)["step"] == stopped


def _signal_at(moment, overrides, log_path, **env):
    """Run 2 ranks through tests/inject_pause.py, SIGTERM rank 1 while it pauses at `moment`; the exit code."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(_command(2, overrides, "tests/inject_pause.py"), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "INJECT_PAUSE": moment, **env})
    deadline = time.monotonic() + 180
    while f"PAUSED {moment}" not in log_path.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.05)
    os.kill(_workers(proc.pid)[1], signal.SIGTERM)
    code = proc.wait(timeout=120)
    if code == 0:
        _assert_no_gloo_thread_at_exit(log_path.read_text())
    return code


def _assert_no_gloo_thread_at_exit(output):
    """No rank leaves its process group's threads to the interpreter's teardown (std::terminate there)."""
    threads = re.findall(r"THREADS AT EXIT rank \d: (.*)", output)  # tests/threads_at_exit.py
    assert len(threads) == 2 and not [t for t in threads if "gloo" in t], threads


@pytest.mark.parametrize("moment", ["startup", "resume"])
def test_sigterm_during_startup_or_resume_stops_cleanly_before_training(full_run, celeba_shards, runs, tmp_path, moment):
    name = f"signal-{moment}"
    extra = ("train.epochs=1000", "log.wandb=disabled")
    if moment == "resume":
        _copy_run(full_run, runs, name)  # 8 steps, saved at 4, 6 and 8
    # Rank 0 closes 2 s late: under `srun -K` (launch/slurm/torchrun.sh) the first task to exit non-zero (torchrun, after
    # passing a signal on) has the others killed, so no rank may leave before rank 0 has left its marker and closed.
    # Closing an online wandb run uploads what is left, which may take longer than a collective may wait (the process
    # group's 600 s, cut to 1 s here once closed): the last barrier has its own limit, log.close_timeout_s.
    code = _signal_at(moment, _overrides(celeba_shards.out_dir, runs, name, "train.max_steps=20", *extra), tmp_path / "log",
                      SLOW_CLOSE_S="2", PG_TIMEOUT_S="1")
    output = (tmp_path / "log").read_text()
    assert code == 0, output[-3000:]
    assert output.index("CLOSED rank 0") < output.index("THREADS AT EXIT rank 1"), output[-2000:]
    step = 8 if moment == "resume" else 0
    assert f"stopping at step {step} on a signal, before training" in output and f"step {step + 1}/" not in output
    saved = sorted(p.name for p in (runs / name / "checkpoints").iterdir()) if moment == "resume" else []
    assert saved == ([f"step-{s:08d}.pt" for s in (4, 6, 8)] if moment == "resume" else [])  # nothing new, nothing lost


def test_a_rank_0_closing_for_longer_than_log_close_timeout_s_stops_every_rank_with_a_sentence(celeba_shards, runs):
    overrides = _overrides(celeba_shards.out_dir, runs, "close-late", "train.max_steps=2", "log.wandb=disabled",
                           "log.close_timeout_s=1")
    result = subprocess.run(_command(2, overrides, "tests/inject_pause.py"), cwd=REPO, env={**os.environ, "SLOW_CLOSE_S": "3"},
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and _state(runs / "close-late", 2)["step"] == 2, output[-3000:]  # the run is saved
    assert re.search(r"rank 1 stopped waiting for rank 0 at the run's last barrier \(Timed out waiting [^)]*\), which waits "
                     r"up to log.close_timeout_s \(1 s\) for rank 0 to close its logs: the run itself is saved;", output)
    assert "the other ranks had stopped waiting for rank 0 at the run's last barrier (Connection closed by peer" in output


@pytest.mark.parametrize("moment", ["validation", "evaluation"])
def test_sigterm_during_validation_or_evaluation_stops_it_and_saves(celeba_shards, celebdf_shards, runs, tmp_path, moment):
    name = f"signal-{moment}"
    extra = ["train.epochs=1000", "log.wandb=disabled", "train.ckpt_every_steps=1000", "train.ckpt_every_epochs=0",
             "train.sample_every_epochs=0"]
    if moment == "evaluation":  # evaluation alone at the first epoch's end (6 steps): validation, which calibrates
        # before an evaluation, off
        extra += ["train.val_every_epochs=0", "train.val_every_steps=0", "train.eval_every_epochs=1",
                  f"train.eval_shards={celebdf_shards.out_dir}"]
    code = _signal_at(moment, _overrides(celeba_shards.out_dir, runs, name, *extra), tmp_path / "log")
    output = (tmp_path / "log").read_text()
    assert code == 0, output[-3000:]
    assert "stopping at step 6 on a signal" in output  # at the epoch's end, where the job was stopped
    assert "val/D_acc_real" not in output and "Celeb-DF val frame AUC" not in output  # the job did not finish
    assert [p.name for p in (runs / name / "checkpoints").iterdir()] == ["step-00000006.pt"]


def test_kill_9_of_one_rank_then_resume_auto_loses_at_most_k_steps(celeba_shards, runs, tmp_path):
    k = 2
    overrides = _overrides(celeba_shards.out_dir, runs, "killed", "train.epochs=1000", f"train.ckpt_every_steps={k}",
                           "log.wandb=disabled")
    proc = _start_and_wait_for_step(overrides, tmp_path / "log", 5)
    os.kill(_workers(proc.pid)[1], signal.SIGKILL)
    assert proc.wait(timeout=120) != 0
    last_logged = max(int(s) for s in re.findall(r"step (\d+)/", (tmp_path / "log").read_text()))
    resumed = train(2, overrides[:-2] + ["log.wandb=disabled", f"train.max_steps={last_logged + 2}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    step = int(re.search(r"resumed from \S+: step (\d+)", resumed.stdout).group(1))
    assert last_logged - k <= step <= last_logged


def test_kill_9_in_the_middle_of_writing_a_checkpoint_loses_nothing_older(celeba_shards, runs, tmp_path):
    overrides = _overrides(celeba_shards.out_dir, runs, "cut", "train.epochs=1000", "train.max_steps=20",
                           "train.ckpt_every_epochs=0", "log.wandb=disabled")
    log_path = tmp_path / "log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "tests/inject_slow_save.py", "--config", "configs/smoke.yaml", *overrides],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "SLOW_SAVE_AT": "2"})
    deadline = time.monotonic() + 180
    while "SAVING" not in log_path.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.05)
    folder = runs / "cut" / "checkpoints"
    before = (folder / "step-00000002.pt").read_bytes()
    proc.kill()  # SIGKILL, half of step 4 written under its temporary name
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert [p.name for p in folder.iterdir() if not p.name.startswith(".")] == ["step-00000002.pt"]
    resumed = train(1, overrides[:-3] + ["train.max_steps=6", "train.ckpt_every_epochs=0", "log.wandb=disabled"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {folder / 'step-00000002.pt'}" in resumed.stdout and "cut short" in resumed.stdout + resumed.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000002.pt", "step-00000004.pt", "step-00000006.pt"]
    assert (folder / "step-00000002.pt").read_bytes() == before


def test_a_full_disk_while_writing_a_checkpoint_is_a_clear_error_and_loses_nothing(celeba_shards, tmp_path):
    with small_disk(tmp_path / "disk", "24m") as disk:
        common = ("train.epochs=1000", "train.ckpt_every_epochs=0", "train.sample_every_epochs=0", "log.wandb=disabled",
                  "log.tensorboard=false")
        first = train(1, _overrides(celeba_shards.out_dir, disk, "full", "train.max_steps=2", *common))
        assert first.returncode == 0, first.stderr[-3000:]
        folder = disk / "full" / "checkpoints"
        before = (folder / "step-00000002.pt").read_bytes()
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\0" * (free - (len(before) // 2)))  # room for the sample grid, not a checkpoint
        full = train(1, _overrides(celeba_shards.out_dir, disk, "full", "train.max_steps=4", *common))
        assert full.returncode == 2, full.stdout[-2000:] + full.stderr[-2000:]
        assert f"no space left in {folder} for checkpoint step-00000004.pt" in full.stderr
        assert f"it resumes from {folder / 'step-00000002.pt'}, which is intact" in full.stderr
        assert sorted(p.name for p in folder.iterdir()) == ["step-00000002.pt"]  # no temporary file left either
        assert (folder / "step-00000002.pt").read_bytes() == before
        (disk / "filler").unlink()
        again = train(1, _overrides(celeba_shards.out_dir, disk, "full", "train.max_steps=4", *common))
        assert again.returncode == 0 and "resumed from" in again.stdout and (folder / "step-00000004.pt").is_file()


def _two_nodes(overrides, log_dir, script="launch/train.py", agent_args=(), env=None):
    """Two torchrun agents, one process each, meeting at a c10d rendezvous on 127.0.0.1, as two nodes would."""
    port, agents = free_port(), []
    for node in range(2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
                   f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes", *agent_args, script,
                   "--config", "configs/smoke.yaml", *overrides]
        with open(log_dir / f"node{node}.log", "w") as log:
            agents.append(subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True,
                                           env={**os.environ, **(env or {})}))
    return agents


def _wait_all(agents, timeout_s=300):
    """The agents' exit codes; on a timeout each agent still running gets SIGTERM, which torchrun passes on to
    its workers, then SIGKILL after 30 s, so that no process outlives the failed test."""
    try:
        return [a.wait(timeout=timeout_s) for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                a.terminate()
                try:
                    a.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    a.kill()
                    a.wait()


def test_two_agents_meet_at_a_c10d_rendezvous_and_train_as_two_nodes(celeba_shards, runs, tmp_path):
    overrides = _overrides(celeba_shards.out_dir, runs, "two-nodes", "train.epochs=1000", "train.max_steps=4", "log.wandb=disabled")
    agents = _two_nodes(overrides, tmp_path)
    assert _wait_all(agents) == [0, 0], (tmp_path / "node0.log").read_text()[-3000:]
    logs = "".join((tmp_path / f"node{i}.log").read_text() for i in range(2))
    assert "parameters identical on all 2 ranks" in logs and _state(runs / "two-nodes", 4)["world_size"] == 2


def test_an_agent_whose_worker_dies_restarts_both_nodes_from_the_last_checkpoint(celeba_shards, runs, tmp_path):
    """torchrun --max-restarts: rank 1 is killed (SIGKILL) at step 5; both nodes restart and resume from step 4."""
    overrides = _overrides(celeba_shards.out_dir, runs, "elastic", "train.epochs=1000", "train.max_steps=8", "log.wandb=disabled")
    # As the README and launch/slurm/torchrun.sh say: a fresh store per restart. Without it this failed 2 runs
    # in 5 (the restarted workers read the dead ones' addresses: pytorch/pytorch#135712).
    agents = _two_nodes(overrides, tmp_path, script="tests/inject_fault.py", agent_args=["--max-restarts=1"],
                        env={"INJECT_FAULT": "kill", "INJECT_RANK": "1", "INJECT_STEP": "5",
                             "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    codes = _wait_all(agents)
    logs = "".join((tmp_path / f"node{i}.log").read_text() for i in range(2))
    assert codes == [0, 0], logs[-4000:]
    assert "KILLED rank 1 at step 5" in logs
    folder = runs / "elastic" / "checkpoints"
    assert f"resumed from {folder / 'step-00000004.pt'}: step 4" in logs  # the restarted rank 0 (both restart)
    assert "step 8: parameters identical on all 2 ranks" in logs
    assert (_state(runs / "elastic", 8)["step"], _state(runs / "elastic", 8)["world_size"]) == (8, 2)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_runs_train_and_fp16_checkpoints_its_scalers(celeba_shards, runs, precision):
    result = train(1, _overrides(celeba_shards.out_dir, runs, precision, f"train.precision={precision}",
                                 "train.max_steps=2", "log.wandb=disabled", "train.channels_last=true"))
    assert result.returncode == 0, result.stderr[-2000:]
    state = _state(runs / precision, 2)
    assert all(torch.isfinite(v).all() for v in state["G"].values() if v.is_floating_point())
    if precision == "fp16":  # a dynamic loss scale
        assert state["scaler_D"]["scale"] > 0 and state["scaler_G"]["scale"] > 0
    else:  # every precision has a scaler, for fused Adam's on-device skips; only fp16 scales
        assert state["scaler_D"]["scale"] == state["scaler_G"]["scale"] == 1.0


def test_fp16_resumes_exactly_with_its_loss_scalers(celeba_shards, runs):
    common = ("train.precision=fp16", "log.wandb=disabled", "train.ckpt_every_steps=100")
    whole = train(1, _overrides(celeba_shards.out_dir, runs, "fp16-whole", "train.max_steps=6", *common))
    first = train(1, _overrides(celeba_shards.out_dir, runs, "fp16-halves", "train.max_steps=3", *common))
    second = train(1, _overrides(celeba_shards.out_dir, runs, "fp16-halves", "train.max_steps=6", *common))
    assert whole.returncode == first.returncode == second.returncode == 0, second.stderr[-2000:]
    a, b = _state(runs / "fp16-whole", 6), _state(runs / "fp16-halves", 6)
    assert a["scaler_D"] == b["scaler_D"] and a["scaler_G"] == b["scaler_G"]
    assert a["scaler_D"]["scale"] < 2.0**16 or a["scaler_D"]["_growth_tracker"] > 0  # the scale moved: state to restore
    for name in ("G", "D"):
        assert all(torch.equal(v, b[name][k]) for k, v in a[name].items()), name


def test_dry_run_prints_the_resolved_config_and_bad_keys_exit_2():
    result = subprocess.run([sys.executable, "launch/train.py", "--config", "configs/dcgan-20ep-lrG5e-4.yaml", "--dry-run",
                             "data.batch_size=64"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    assert (cfg["train"]["epochs"], cfg["train"]["lr_G"], cfg["train"]["lr_D"], cfg["data"]["batch_size"]) == (20, 5e-4, 2e-4, 64)
    bad = subprocess.run([sys.executable, "launch/train.py", "--config", "configs/smoke.yaml", "train.lr=1"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown key train.lr;" in bad.stderr and "Traceback" not in bad.stderr


def test_torchrun_leaves_its_log_folder_in_the_sessions_temp_dir_not_the_machines(subprocess_tmpdir):
    # Some 35 torchrun launches a `make test`, each leaving a torchelastic_* folder behind (conftest.py).
    before = set(subprocess_tmpdir.glob("torchelastic_*"))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "--no-python",
                    "true"], check=True, capture_output=True, timeout=120)
    assert len(set(subprocess_tmpdir.glob("torchelastic_*")) - before) == 1
