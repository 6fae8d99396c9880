"""train.sbatch and sweep.sbatch on a real one-node SLURM cluster (slurmctld, slurmd, munged) started here."""

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from test_train import _overrides, _state, train
from wandb_records import run_info

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("apt-get"),
                       reason="the local SLURM cluster needs root (it writes /etc/slurm and /run/munge) and apt-get"),
]


@pytest.fixture(scope="module")
def cluster():
    started = subprocess.run(["bash", "launch/slurm/local-cluster.sh", "start"], cwd=REPO, capture_output=True, text=True)
    assert started.returncode == 0, started.stdout + started.stderr
    yield
    subprocess.run(["bash", "launch/slurm/local-cluster.sh", "stop", "--purge"], cwd=REPO, capture_output=True)


def sbatch(script, logs, env, *args):
    logs.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=2", f"--output={logs}/%x-%j.out", *args, script],
                            cwd=REPO, env={**os.environ, "GPUS_PER_NODE": "2", **env}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def wait_until_gone(job, timeout_s=300):
    deadline = time.monotonic() + timeout_s
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, f"job {job} still queued after {timeout_s} s"
        time.sleep(0.5)
    return subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout


def _torchrun_of(job: str) -> bool:
    """Whether the job's torchrun process has started: `--rdzv_id <job>` in a command line that is not srun's."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_text().split("\0")
        except OSError:  # a process that ended meanwhile
            continue
        if Path(args[0]).name != "srun" and f"\0--rdzv_id\0{job}\0" in "\0".join(args):
            return True
    return False


def srun_args(step: str, what: str = "cmdline") -> list[str]:
    """The command line (or `what`: environ) of the srun that started a step (`scontrol show step` names its host and
    pid: this one)."""
    pid = re.search(r"SrunHost:Pid=\S+:(\d+)", step).group(1)
    return Path(f"/proc/{pid}/{what}").read_text().split("\0")


def preempt_at_step_3(env, logs, signal="USR1", *sbatch_args):
    """Submit train.sbatch, send `signal` to its batch shell once rank 0 logged step 3 (USR1: what
    --signal=B:USR1@180 does), and wait for the job to end: (scontrol's job record, the job's log path)."""
    job = sbatch("launch/slurm/train.sbatch", logs, env, *sbatch_args)
    log_path = logs / f"dcgan-{job}.out"
    deadline = time.monotonic() + 120
    while not (log_path.exists() and "[rank 0] step 3/" in log_path.read_text()):
        assert time.monotonic() < deadline, log_path.read_text() if log_path.exists() else "no log"
        time.sleep(0.1)
    step = subprocess.run(["scontrol", "show", "step", f"{job}.0"], capture_output=True, text=True).stdout
    # torchrun's step has every CPU the job asked for (sbatch --cpus-per-task=2), not srun's default of one.
    assert re.search(r"\bCPUs=2\b", step), step
    subprocess.run(["scancel", f"--signal={signal}", "--batch", job], check=True)
    return wait_until_gone(job, timeout_s=300), log_path


def _tiny(shards, runs, name, *extra):
    return " ".join(_overrides(shards, runs, name, "train.val_every_epochs=0", *extra))


def test_train_sbatch_runs_the_smoke_config_with_two_processes(cluster, celeba_shards, tmp_path):
    # No GPUS_PER_NODE: the processes per node come from the GPUs the job may use, not from nvidia-smi's
    # list of the node's GPUs (none here; with CUDA_VISIBLE_DEVICES 0,1 torch still finds no GPU: gloo).
    env = {"CONFIG": "configs/smoke.yaml", "OVERRIDES": _tiny(celeba_shards.out_dir, tmp_path, "sbatch", "train.max_steps=4", "log.wandb=disabled"),
           "GPUS_PER_NODE": "", "CUDA_VISIBLE_DEVICES": "0,1"}
    job = sbatch("launch/slurm/train.sbatch", tmp_path / "logs", env)
    info = wait_until_gone(job)
    assert "JobState=COMPLETED" in info and "ExitCode=0:0" in info, info
    log = (tmp_path / "logs" / f"dcgan-{job}.out").read_text()
    assert "1 node(s) x 2" in log and "[rank 0] step 4/4" in log and "training ended with status 0" in log
    assert _state(tmp_path / "sbatch", 4)["world_size"] == 2


def test_a_preempted_job_requeues_resumes_and_ends_like_an_uninterrupted_run(cluster, celeba_shards, tmp_path):
    # 18 steps, 6 an epoch: a stop before step 12 leaves the resumed part an epoch's end to cross.
    extra = ("model.ngf=32", "model.ndf=32", "train.epochs=100", "train.max_steps=18", "train.ckpt_every_steps=1000", "train.val_every_epochs=0")
    reference = train(2, _overrides(celeba_shards.out_dir, tmp_path, "reference", *extra, "log.wandb=disabled"))
    assert reference.returncode == 0, reference.stderr[-2000:]

    # train.resume=never: the requeued job still goes on from its checkpoint (SLURM_RESTART_COUNT), or it would start over.
    env = {"CONFIG": "configs/smoke.yaml",
           "OVERRIDES": " ".join(_overrides(celeba_shards.out_dir, tmp_path, "preempted", *extra, "train.resume=never"))}
    info, log_path = preempt_at_step_3(env, tmp_path / "logs")
    assert "JobState=COMPLETED" in info and "Restarts=1" in info, info

    log = log_path.read_text()
    stopped = int(re.search(r"stopping at step (\d+) on a signal", log).group(1))
    assert 3 <= stopped < 12
    checkpoint = tmp_path / "preempted" / "checkpoints" / f"step-{stopped:08d}.pt"
    assert f"ranks stopped cleanly; requeueing to resume from {checkpoint}" in log and "(restart 1)" in log
    assert f"resumed from {checkpoint}" in log
    whole, resumed = _state(tmp_path / "reference", 18), _state(tmp_path / "preempted", 18)
    for name in ("G", "D", "G_ema", "D_ema"):
        for key, value in whole[name].items():
            assert torch.equal(value, resumed[name][key]), f"{name}.{key}"
    runs = sorted((tmp_path / "preempted").glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 2 and {run_info(r).run_id for r in runs} == {resumed["wandb_run_id"]}


def _repo_with(tmp_path, launch_train: Path) -> Path:
    """A copy of the repository, of links, whose launch/train.py is `launch_train`."""
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    for entry in REPO.iterdir():
        if entry.name != "launch":
            (repo / entry.name).symlink_to(entry)
    for entry in (REPO / "launch").iterdir():
        (repo / "launch" / entry.name).symlink_to(launch_train if entry.name == "train.py" else entry)
    return repo


def test_sigterm_stops_ranks_no_signal_reaches_with_a_checkpoint_and_does_not_requeue(cluster, celeba_shards, tmp_path):
    # SIGTERM (scancel, or preemption's grace time) must not end the batch shell at once, killing the ranks mid-save.
    # And it must stop ranks that the signal the shell passes on never reaches, as when srun drops it while still
    # starting the tasks: these ignore it (tests/deaf_ranks.py), so train.stop_request alone can stop them (torchrun
    # would SIGKILL them 150 s on, and the job would end as failed).
    extra = ("train.epochs=100", "train.max_steps=60", "train.ckpt_every_steps=1000", "train.val_every_epochs=0",
             "log.wandb=disabled")
    env = {"CONFIG": "configs/smoke.yaml", "REPO": str(_repo_with(tmp_path, REPO / "tests" / "deaf_ranks.py")),
           "OVERRIDES": " ".join(_overrides(celeba_shards.out_dir, tmp_path, "termed", *extra))}
    info, log_path = preempt_at_step_3(env, tmp_path / "logs", "TERM")
    log = log_path.read_text()
    assert "JobState=FAILED" in info and "ExitCode=143:0" in info and "Restarts=0" in info, info + log[-3000:]
    stopped = int(re.search(r"stopping at step (\d+) on a signal", log).group(1))
    checkpoint = tmp_path / "termed" / "checkpoints" / f"step-{stopped:08d}.pt"
    assert checkpoint.is_file() and f"ranks stopped cleanly on SIGTERM; newest checkpoint: {checkpoint}; not requeued" in log
    job = log_path.stem.split("-")[1]
    assert stopped < 30 and not [name for name in (f".stopped-{job}", f".started-{job}", f".stop-{job}")
                                 if (tmp_path / "repo" / name).exists()]  # and the job's files are gone


@pytest.mark.parametrize("moment", ["setup", "rendezvous"])
def test_a_stop_signal_before_the_ranks_start_ends_the_job_cleanly(cluster, celeba_shards, tmp_path, moment):
    # A preemption soon after a start or a requeue can come while SETUP or the environment's activation runs: it must
    # neither end the batch shell (its default action) nor reach torchruns that have no handler for it yet. Or it comes
    # once srun runs, before torchrun's rendezvous, after which it handles signals: the USR1 the shell passes on kills
    # it, but no rank had trained (rank 0 had not written train.start_marker).
    env = {"CONFIG": "configs/smoke.yaml",
           "OVERRIDES": _tiny(celeba_shards.out_dir, tmp_path, "early", "train.max_steps=4", "log.wandb=disabled")}
    if moment == "setup":
        env["SETUP"] = "echo IN SETUP; sleep 4"
    job = sbatch("launch/slurm/train.sbatch", tmp_path / "logs", env)
    log_path = tmp_path / "logs" / f"dcgan-{job}.out"

    def arrived() -> bool:
        if moment == "setup":
            return log_path.exists() and "IN SETUP" in log_path.read_text()
        return _torchrun_of(job)

    deadline = time.monotonic() + 60
    while not arrived():
        assert time.monotonic() < deadline, log_path.read_text() if log_path.exists() else "no log"
        time.sleep(0.05)
    if moment == "rendezvous":
        # srun passes a signal on only once it has heard that the task started, a moment after it did; torchrun, which
        # imports torch first, has no handler for seconds yet.
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=TERM", "--batch", job], check=True)
    info, log = wait_until_gone(job), log_path.read_text()
    assert "JobState=FAILED" in info and "ExitCode=143:0" in info and "Restarts=0" in info, info + log[-3000:]
    if moment == "rendezvous" and "on a signal, before training" in log:
        # srun dropped the signal after all (see above): the stop request file stopped the ranks before their first step.
        assert "ranks stopped cleanly on SIGTERM; newest checkpoint: no checkpoint: the start; not requeued" in log
    else:
        assert "the stop came before the ranks started: nothing new to save" in log and "not requeued" in log
    assert "step 1/" not in log and not (tmp_path / "early" / "checkpoints").exists()


def test_a_job_slurm_will_not_requeue_fails_with_its_checkpoint_named(cluster, celeba_shards, tmp_path):
    # sbatch --no-requeue: the requeue is refused, and the job must say so and fail, not end COMPLETED half-trained.
    extra = ("train.epochs=100", "train.max_steps=60", "train.ckpt_every_steps=1000", "train.val_every_epochs=0",
             "log.wandb=disabled")
    env = {"CONFIG": "configs/smoke.yaml", "OVERRIDES": " ".join(_overrides(celeba_shards.out_dir, tmp_path, "pinned", *extra))}
    info, log_path = preempt_at_step_3(env, tmp_path / "logs", "USR1", "--no-requeue")
    log = log_path.read_text()
    assert "JobState=FAILED" in info and "Restarts=0" in info, info
    assert "scontrol requeue failed: submit the same job again to resume" in log, log[-3000:]


def test_a_job_asking_for_a_task_per_gpu_still_runs_one_torchrun_a_node(cluster, celeba_shards, tmp_path):
    # sbatch --ntasks-per-node=2 (one task per GPU, a common habit) sets SLURM_NTASKS=2, which srun would follow.
    # The override holds a glob that a file in the job's folder matches: it must reach the trainer as written.
    repo = _repo_with(tmp_path, REPO / "launch" / "train.py")
    (repo / "log.group=run-X").write_text("")
    env = {"CONFIG": "configs/smoke.yaml", "REPO": str(repo),
           "OVERRIDES": _tiny(celeba_shards.out_dir, tmp_path, "tasks", "train.max_steps=2", "log.wandb=disabled", "log.group=run-?")}
    job = sbatch("launch/slurm/train.sbatch", tmp_path / "logs", env, "--ntasks-per-node=2", "--cpus-per-task=1")
    deadline = time.monotonic() + 60
    while "StepId" not in (step := subprocess.run(["scontrol", "show", "step", f"{job}.0"], capture_output=True, text=True).stdout):
        assert time.monotonic() < deadline, "no step 0"
        time.sleep(0.1)
    assert re.search(r"\bCPUs=2\b", step) and re.search(r"\bTasks=1\b", step), step  # the job's CPUs, one task
    # Slurm 22.05.8 here gives the step every CPU of the job either way; later versions may give only what srun asks.
    assert "--cpus-per-task=2" in srun_args(step)  # the job's 2 CPUs on the node, not SLURM_CPUS_PER_TASK's 1
    # torchrun's grace before SIGKILL, passed in the environment (a torchrun without --shutdown-timeout keeps going).
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=150" in srun_args(step, "environ")
    info = wait_until_gone(job)
    log = (tmp_path / "logs" / f"dcgan-{job}.out").read_text()
    assert "JobState=COMPLETED" in info and log.count("[rank 0] step 2/2") == 1, log[-3000:]
    state = _state(tmp_path / "tasks", 2)
    assert state["world_size"] == 2 and state["config"]["log"]["group"] == "run-?"


def test_a_job_whose_ranks_fail_after_the_preemption_signal_is_not_requeued(cluster, celeba_shards, tmp_path):
    # The checkpoint folder's name is taken by a file: the save on USR1 fails, as a full or broken disk would.
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "checkpoints").write_text("not a folder")
    extra = ("train.epochs=100", "train.max_steps=60", "train.ckpt_every_steps=1000", "train.ckpt_every_epochs=0",
             "train.val_every_epochs=0", "log.wandb=disabled")
    env = {"CONFIG": "configs/smoke.yaml", "OVERRIDES": " ".join(_overrides(celeba_shards.out_dir, tmp_path, "broken", *extra))}
    info, log_path = preempt_at_step_3(env, tmp_path / "logs")
    log = log_path.read_text()
    assert "Restarts=0" in info and "JobState=FAILED" in info, info
    assert "ranks failed after the stop signal" in log and "not requeued" in log and "requeueing" not in log


def test_the_sweep_array_runs_every_task_in_its_own_folder_and_one_wandb_group(cluster, celeba_shards, tmp_path):
    # A list value keeps its commas: train.betas=[0.5,0.99] is one override.
    # Two tasks, which the node's 2 CPUs run one after the other (each asks for both).
    configs = " ".join(f"configs/smoke.yaml@train.lr_G={lr},train.betas=[0.5,0.99]" for lr in ("1e-4", "4e-4"))
    overrides = _tiny(celeba_shards.out_dir, tmp_path, "ignored", "train.max_steps=2")
    job = sbatch("launch/slurm/sweep.sbatch", tmp_path / "logs", {"CONFIGS": configs, "SWEEP": "lr-sweep", "OVERRIDES": overrides},
                 "--array=0-1")
    wait_until_gone(job, timeout_s=400)
    for task, lr in enumerate((1e-4, 4e-4)):
        run = tmp_path / "lr-sweep" / f"smoke-{task}"
        state = _state(run, 2)
        assert state["config"]["train"]["lr_G"] == lr and state["config"]["log"]["group"] == "lr-sweep"
        assert state["config"]["train"]["betas"] == [0.5, 0.99]
        (run_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
        info = run_info(run_file)
        assert (info.run_group, info.job_type) == ("lr-sweep", "sweep")
