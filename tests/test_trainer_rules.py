"""The trainer's clocks and guards, in one process on the CPU: what the final checkpoint holds, what a rerun
does, and settings refused before the first step rather than an epoch into the run."""

import contextlib
import io
import json
import os
import re
import shutil
import signal
import sys

import pytest
import torch
from conftest import REPO

from pipeline import signals
from pipeline.config import load_config
from pipeline.dist import DistInfo
from pipeline.errors import UserError
from pipeline.trainer import Trainer

ONE_CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def _config(celeba_shards, runs, name, *extra):
    return load_config(REPO / "configs" / "sbi-smoke.yaml", [
        f"data.shards={celeba_shards.out_dir}", "data.batch_size=4", "data.threads=1", "model.ngf=16", "model.ndf=16",
        f"train.runs_dir={runs}", f"train.name={name}", "log.wandb=disabled", "log.tensorboard=false", *extra])


def _train(cfg) -> tuple[str, int]:
    trainer = Trainer(cfg, ONE_CPU)
    try:
        return trainer.train(), trainer.step
    finally:
        trainer.close()


def _newest(runs, name) -> dict:
    path = sorted((runs / name / "checkpoints").glob("step-*.pt"))[-1]
    return torch.load(path, map_location="cpu", weights_only=True)


def test_the_checkpoint_at_an_epochs_last_step_carries_that_epochs_calibration(celeba_shards, tmp_path):
    # A checkpoint every step and a validation at every epoch's end: both fall due at an epoch's last step,
    # and the checkpoint must come after the validation, holding the threshold it calibrated.
    cfg = _config(celeba_shards, tmp_path, "epoch", "train.epochs=2", "train.max_steps=null", "train.ckpt_every_steps=1",
                  "train.ckpt_keep_last=1000", "train.val_every_steps=0", "train.val_every_epochs=1", "train.sample_every_steps=0")
    why, last = _train(cfg)
    assert why == "done" and last % 2 == 0 and last > 2
    for step, epochs in ((last // 2, 1), (last, 2)):  # the first epoch's end, then the last's
        state = torch.load(tmp_path / "epoch" / "checkpoints" / f"step-{step:08d}.pt", map_location="cpu", weights_only=True)
        assert state["threshold"] is not None and state["calibration"]["step"] == step and state["epoch"] == epochs


def test_calibration_reads_faces_as_scoring_does_where_training_shares_or_rounds_them(celeba_shards, tmp_path):
    # On an A100/H100 the hardware decoder's pixels differ from the CUDA decoder's, and it takes the first share of a
    # batch: calibration, like evaluation and detection, decodes every face on the one (the gpu tests check the pixels),
    # and reads it in float32, as they do, where training may take bf16 pixels.
    cfg = _config(celeba_shards, tmp_path, "decoders", "train.max_steps=1", "data.dtype=bfloat16", "train.precision=bf16")
    trainer = Trainer(cfg, ONE_CPU)
    try:
        assert trainer.loader.cfg.hw_decoder_load == trainer.cfg.data.hw_decoder_load > 0
        assert trainer.val_loader.cfg.hw_decoder_load == 0
        assert (trainer.loader.cfg.dtype, trainer.val_loader.cfg.dtype) == ("bfloat16", "float32")
    finally:
        trainer.close()


def test_the_threshold_is_calibrated_on_float32_scores_of_unaugmented_blends_in_any_precision(celeba_shards, tmp_path,
                                                                                                monkeypatch):
    # Evaluation and detection score faces in float32: a threshold from bf16 scores would be off by their rounding.
    # Its blends are SBI's validation blends, without the pair's colour jitter and JPEG (test_sbi checks what that is).
    import contextlib

    from pipeline import periodic

    augmented, self_blend = [], periodic.self_blend
    monkeypatch.setattr(periodic, "self_blend", lambda *args, **kwargs: augmented.append(kwargs.get("augment", True))
                        or self_blend(*args, **kwargs))  # watched, not replaced
    cfg = _config(celeba_shards, tmp_path, "bf16", "train.precision=bf16", "train.max_steps=1")
    trainer = Trainer(cfg, ONE_CPU)
    try:
        assert trainer.fast.autocast_dtype == torch.bfloat16
        trainer.validate()
        assert augmented and not any(augmented)
        in_bf16 = trainer.threshold
        trainer.step_fn.autocast = contextlib.nullcontext  # the same validation with no autocast at all
        trainer.validate()
        assert trainer.threshold == in_bf16 and in_bf16 is not None
    finally:
        trainer.close()


def test_a_job_torchrun_started_again_resumes_whatever_train_resume_says(celeba_shards, tmp_path, monkeypatch):
    first = _config(celeba_shards, tmp_path, "again", "train.max_steps=2", "train.resume=never")
    assert _train(first) == ("max_steps", 2)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # as torchrun sets it in a restarted worker
    again = Trainer(_config(celeba_shards, tmp_path, "again", "train.max_steps=3", "train.resume=never"), ONE_CPU)
    try:
        assert again.step == 2
    finally:
        again.close()


def test_a_resume_across_ds_gan_logit_settings_names_the_setting(celeba_shards, tmp_path):
    assert _train(_config(celeba_shards, tmp_path, "logits", "train.max_steps=1", "model.d_gan_head=shared"))[1] == 1
    with pytest.raises(UserError, match=r"holds a D with one logit for G's samples and self-blends .* resume it with "
                                        r"model.d_gan_head=shared, or start afresh"):
        Trainer(_config(celeba_shards, tmp_path, "logits", "train.max_steps=2"), ONE_CPU)  # the default: own


def test_validation_reports_the_gans_accuracy_on_its_own_logit(celeba_shards, tmp_path):
    trainer = Trainer(_config(celeba_shards, tmp_path, "val-gan", "train.max_steps=1"), ONE_CPU)
    try:
        D = trainer.step_fn.D_raw
        torch.nn.init.normal_(D.gan_head.weight, 0.0, 0.5)  # the two logits now call the reals differently
        metrics = trainer.validate()
        D.eval()
        with torch.no_grad():
            logits = torch.cat([D(batch.images, gan=True)[:batch.valid] for batch in trainer.val_loader])
        D.train()
        assert metrics["val/D_acc_real"] == pytest.approx((logits[:, 1] > 0).float().mean().item())
        assert (logits[:, 1] > 0).float().mean() != (logits[:, 0] > 0).float().mean()
    finally:
        trainer.close()


def test_validation_counts_every_val_face_once_in_batches_that_do_not_divide_them(celeba_shards, tmp_path):
    # With drop_last, a split's remainder went unscored (at 32 ranks, 17.5% of CelebA's val): a part's last batch is
    # now padded, and the padding left out of every figure.
    trainer = Trainer(_config(celeba_shards, tmp_path, "val-all", "train.max_steps=1"), ONE_CPU)
    try:
        faces = trainer.val_loader.split.samples
        assert faces % trainer.val_loader.cfg.batch_size  # a part of a batch at the end (6 faces, batches of 4)
        metrics = trainer.validate()
        assert trainer.calibration.info["reals"] == faces >= trainer.calibration.info["blends"] > 0
        D = trainer.step_fn.D_raw
        D.eval()
        with torch.no_grad():
            logits = torch.cat([D(batch.images, gan=True)[:batch.valid] for batch in trainer.val_loader])
        D.train()
        assert len(logits) == faces
        assert metrics["val/D_acc_real"] == pytest.approx((logits[:, 1] > 0).float().mean().item())
    finally:
        trainer.close()


def test_calibration_keeps_confident_scores_apart(celeba_shards, tmp_path):
    # In float32, sigmoid(-logit) is exactly 1 below a logit of -16.6: the val faces would all tie, and the
    # threshold and the AUC of calibration would mean nothing.
    trainer = Trainer(_config(celeba_shards, tmp_path, "confident", "train.max_steps=1"), ONE_CPU)
    try:
        plain = trainer.validate()
        trainer.step_fn.detector.register_forward_hook(lambda module, inputs, logits: logits - 25)  # all called fake
        confident = trainer.validate()
        assert confident["val/sbi_auc"] == pytest.approx(plain["val/sbi_auc"], abs=1e-6)
        # The scores are 1 - O(e^-25), and the threshold lies among them: not 1e-6 below a tie at exactly 1.
        assert 0 < 1 - confident["val/threshold"] < 1e-9
    finally:
        trainer.close()


@contextlib.contextmanager
def _sigterm_after_step(trainer, step: int):
    """SIGTERM to this process once `trainer` has taken `step` steps (0: at once), received by the handler that
    launch/train.py installs; then the trainer closed and the handler put back."""
    train_step = trainer.train_step

    def step_then_sigterm(batch):
        stats = train_step(batch)
        if trainer.step == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return stats

    trainer.train_step = step_then_sigterm
    signals.install()
    try:
        if step == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        yield
    finally:
        trainer.close()
        signals.uninstall()
        signals._received = 0


def test_a_signal_during_the_final_work_leaves_that_work_to_the_rerun(celeba_shards, tmp_path):
    cfg = _config(celeba_shards, tmp_path, "signal", "train.max_steps=2", "train.log_every_steps=1")
    trainer = Trainer(cfg, ONE_CPU)
    with _sigterm_after_step(trainer, 2):  # with the last step: the final validation stops at once
        assert trainer.train() == "signal"
    state = _newest(tmp_path, "signal")
    assert state["step"] == 2 and not state["finished"] and state["threshold"] is None
    assert _train(cfg) == ("max_steps", 2)  # the same command again: the final work, and not one step more
    state = _newest(tmp_path, "signal")
    assert state["finished"] and state["calibration"]["step"] == 2


def test_the_work_a_signal_stopped_at_its_step_is_done_when_the_run_resumes(celeba_shards, tmp_path, caplog):
    # Validation and the sample grid fall due at step 2, where the signal is seen: validation stops at once and the
    # samples are skipped, straight to the checkpoint. The resumed run does them at step 2, before step 3.
    cfg = _config(celeba_shards, tmp_path, "due", "train.max_steps=4", "train.log_every_steps=2", "train.val_every_steps=2",
                  "train.sample_every_steps=2", "train.ckpt_every_steps=2")
    trainer = Trainer(cfg, ONE_CPU)
    with _sigterm_after_step(trainer, 2):
        assert trainer.train() == "signal"
    samples = tmp_path / "due" / "samples"
    assert _newest(tmp_path, "due")["jobs_done"] == ["ckpt"] and not (samples / "step-00000002.png").exists()
    with caplog.at_level("INFO", logger="pipeline.trainer"):
        assert _train(cfg) == ("max_steps", 4)
    assert (samples / "step-00000002.png").exists()
    assert any(r.getMessage().startswith("step 2, 0 epochs done: val/") for r in caplog.records)
    rerun = Trainer(cfg, ONE_CPU)  # done at step 4, with its work: nothing is redone
    try:
        assert rerun._completed == {job: 4 for job in ("val", "samples", "ckpt")}
    finally:
        rerun.close()


def test_a_signal_says_how_to_resume_a_run_that_train_resume_would_start_over(celeba_shards, tmp_path, caplog):
    # "resume with the same command" is true for train.resume=auto only: never (or a file) would start afresh again.
    for resume, how in (("auto", "resume with the same command"),
                        ("never", "resume with train.resume=auto in place of train.resume=never")):
        trainer = Trainer(_config(celeba_shards, tmp_path, f"signal-{resume}", "train.max_steps=3", "train.log_every_steps=1",
                                  f"train.resume={resume}"), ONE_CPU)
        with _sigterm_after_step(trainer, 0), caplog.at_level("INFO", logger="pipeline.trainer"):
            assert trainer.train() == "signal"
        assert any(how in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_a_signal_after_the_last_logging_boundary_still_leaves_the_stop_marker(celeba_shards, tmp_path):
    # With validation off, nothing after the last boundary asks for the signal: the run finished and exited 0 with no
    # marker, and the SLURM script, seeing torchrun's non-zero exit after the signal it passed on, called it failed.
    marker = tmp_path / "stopped"
    trainer = Trainer(_config(celeba_shards, tmp_path, "late", "train.max_steps=2", "train.log_every_steps=5",
                              "train.val_every_steps=0", "train.val_every_epochs=0", f"train.stop_marker={marker}"), ONE_CPU)
    with _sigterm_after_step(trainer, 1):
        assert trainer.train() == "max_steps" and trainer.step == 2
    assert marker.read_text().strip().endswith("step-00000002.pt")


def test_the_stop_request_file_stops_the_run_as_a_signal_does(celeba_shards, tmp_path, caplog):
    # launch/slurm/torchrun.sh writes it with the signal it passes on, which srun drops while it still starts the tasks.
    request, marker = tmp_path / "stop-request", tmp_path / "stopped"
    trainer = Trainer(_config(celeba_shards, tmp_path, "requested", "train.max_steps=6", "train.log_every_steps=1",
                              f"train.stop_request={request}", f"train.stop_marker={marker}"), ONE_CPU)
    train_step = trainer.train_step

    def step_then_request(batch):
        stats = train_step(batch)
        if trainer.step == 2:
            request.write_text("TERM\n")
        return stats

    trainer.train_step = step_then_request
    try:
        with caplog.at_level("INFO", logger="pipeline.trainer"):
            assert trainer.train() == "signal" and trainer.step == 2
    finally:
        trainer.close()
    assert marker.read_text().strip().endswith("step-00000002.pt")
    assert any(f"stopping at step 2 on a signal (the file {request}, train.stop_request)" in r.getMessage()
               for r in caplog.records)
    assert not signals.requested()  # closed: no later code of this process reads the file


def test_a_run_keeps_its_wandb_run_only_going_on_from_its_own_newest_checkpoint(celeba_shards, tmp_path):
    def run(name, *extra):
        trainer = Trainer(_config(celeba_shards, tmp_path, name, "train.ckpt_every_steps=1", "train.ckpt_keep_last=10",
                                  *extra), ONE_CPU)
        try:
            trainer.train()
            return trainer.run_id, trainer.step
        finally:
            trainer.close()

    first, _ = run("a", "train.max_steps=2")
    assert run("a", "train.max_steps=3") == (first, 3)  # auto: its own newest, the same W&B run
    older = tmp_path / "a" / "checkpoints" / "step-00000001.pt"
    other, steps = run("b", f"train.resume={older}", "train.max_steps=2")
    assert steps == 2 and other != first  # another run's checkpoint: its W&B run is not this run's
    branch, steps = run("a", f"train.resume={older}", "train.max_steps=2")
    assert steps == 2 and branch not in (first, other)  # a branch of its own, whose steps W&B would drop


def test_a_resume_takes_the_optimizers_settings_from_the_config_not_the_checkpoint(celeba_shards, tmp_path):
    assert _train(_config(celeba_shards, tmp_path, "adam", "train.max_steps=1", "train.fused_adam=true")) == ("max_steps", 1)
    trainer = Trainer(_config(celeba_shards, tmp_path, "adam", "train.max_steps=2", "train.fused_adam=false",
                              "train.betas=[0.0,0.99]", "train.lr_D=3e-4"), ONE_CPU)
    try:
        assert trainer.step == 1
        for opt, lr in ((trainer.step_fn.opt_D, 3e-4), (trainer.step_fn.opt_G, trainer.cfg.train.lr_G)):
            group = opt.param_groups[0]
            assert (group["betas"], group["lr"], group["fused"], group["foreach"]) == ((0.0, 0.99), lr, None, True)
            assert opt.state[group["params"][0]]["step"].item() == 1  # the moments came back with their step
        assert trainer.train() == "max_steps" and trainer.step == 2
    finally:
        trainer.close()


def test_a_resume_in_fp16_from_a_fixed_scale_run_starts_its_loss_scale_afresh(celeba_shards, tmp_path):
    # A run in fp32 (or bf16) saves loss scalers fixed at 1; fp16 resumed from them would double back to 2^16 only
    # every 2,000 clean steps.
    assert _train(_config(celeba_shards, tmp_path, "scale", "train.max_steps=1", "train.precision=fp32")) == ("max_steps", 1)
    trainer = Trainer(_config(celeba_shards, tmp_path, "scale", "train.max_steps=2", "train.precision=fp16"), ONE_CPU)
    try:
        assert trainer.step == 1
        assert trainer.step_fn.scaler_D.get_scale() == trainer.step_fn.scaler_G.get_scale() == 2.0**16
    finally:
        trainer.close()


def test_rerunning_a_finished_run_trains_no_further_step(celeba_shards, tmp_path):
    cfg = _config(celeba_shards, tmp_path, "finished", "train.max_steps=2")
    assert _train(cfg) == ("max_steps", 2)
    assert _train(cfg) == ("max_steps", 2)
    assert [p.name for p in (tmp_path / "finished" / "checkpoints").glob("step-*.pt")] == ["step-00000002.pt"]



def test_a_run_resumes_with_or_without_the_average_of_ds_weights_whatever_its_checkpoint_holds(celeba_shards, tmp_path):
    batch_norm = "model.d_norm=batch"  # statistics per rank
    assert _train(_config(celeba_shards, tmp_path, "kept", "train.max_steps=1", batch_norm)) == ("max_steps", 1)  # D_ema
    assert _train(_config(celeba_shards, tmp_path, "kept", "train.max_steps=2", batch_norm, "train.d_ema_beta=0")) == (
        "max_steps", 2)
    path = sorted((tmp_path / "kept" / "checkpoints").glob("step-*.pt"))[-1]
    state = torch.load(path, weights_only=True)
    assert "D_ema" not in state and "D_ema" not in state["buffers"][0]
    own = state["buffers"][0]["D_raw"]  # as another rank's own statistics would differ from D's (a new tensor: the
    own["main.3.running_mean"] = own["main.3.running_mean"] + 1  # saved one may share its storage with D's)
    torch.save(state, path)
    trainer = Trainer(_config(celeba_shards, tmp_path, "kept", "train.max_steps=3", batch_norm), ONE_CPU)  # an average
    try:  # it starts from D's weights, and from this rank's statistics
        step = trainer.step_fn
        assert all(torch.equal(p, q) for p, q in zip(step.D_raw.parameters(), step.D_ema.parameters()))
        assert all(torch.equal(b, own[k]) for k, b in step.D_ema.named_buffers()) and len(own) == 9
    finally:
        trainer.close()


def test_a_deeper_d_trains_and_its_checkpoint_loads_as_the_detector(celeba_shards, tmp_path):
    from pipeline.evaluate import load_discriminator
    from pipeline.models import Residual

    trainer = Trainer(_config(celeba_shards, tmp_path, "deep", "train.max_steps=2", "model.d_blocks=1"), ONE_CPU)
    try:
        assert trainer.train() == "max_steps"
        trained = trainer.step_fn.detector
    finally:
        trainer.close()
    assert sum(isinstance(m, Residual) for m in trained.modules()) == 4  # one after each downsampling, at 64 px
    assert all(m.gain != 0 for m in trained.modules() if isinstance(m, Residual))  # they learnt: the blocks count
    path = sorted((tmp_path / "deep" / "checkpoints").glob("step-*.pt"))[-1]
    D, _ = load_discriminator(path, torch.device("cpu"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(D(x), trained(x))


def test_resuming_with_another_model_names_the_checkpoint_and_the_fix(celeba_shards, tmp_path):
    assert _train(_config(celeba_shards, tmp_path, "shape", "train.max_steps=1")) == ("max_steps", 1)
    with pytest.raises(UserError, match=r"checkpoint .*shape/checkpoints/step-00000001.pt holds another model .*"
                                        r"give this run a new train.name, or set train.resume=never"):
        Trainer(_config(celeba_shards, tmp_path, "shape", "train.max_steps=2", "model.ndf=32"), ONE_CPU)


def test_a_checkpoint_saved_on_another_kind_of_device_resumes_with_fresh_random_streams(celeba_shards, tmp_path, caplog):
    # A GPU run resumed on the CPU, or the reverse: the step's noise generator has another state there (CUDA's is 16
    # bytes: its seed and offset), which set_state refused, and the trainer called it "another model".
    assert _train(_config(celeba_shards, tmp_path, "moved", "train.max_steps=1")) == ("max_steps", 1)
    path = tmp_path / "moved" / "checkpoints" / "step-00000001.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    for rank_state in state["rng"]:
        rank_state["noise"] = torch.arange(16, dtype=torch.uint8)  # as a CUDA generator's get_state() gives
    torch.save(state, path)
    with caplog.at_level("WARNING", logger="pipeline.trainer"):
        assert _train(_config(celeba_shards, tmp_path, "moved", "train.max_steps=2")) == ("max_steps", 2)
    assert any("saved on another kind of device than cpu: its random streams start afresh" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("extra, message", [
    (["train.eval_every_epochs=1", "train.eval_shards=/nonexistent/celebdf"], r"train.eval_shards: .*/nonexistent/celebdf"),
    (["data.dtype=bfloat16", "train.precision=fp32"], r"data.dtype bfloat16 needs autocast, but train.precision is fp32"),
    (["train.d_ema_beta=1"], r"train.d_ema_beta 1.0 is not in \[0, 1\): give the average's beta \(0.999\), or 0"),
    (["model.d_blocks=-1"], r"model.d_blocks is -1: give the number of residual blocks per resolution \(e.g. 1\), or 0 for the DCGAN's D."),
    (["train.d_sam_rho=-0.05"], r"train.d_sam_rho -0.05 is negative: give SAM's distance \(SBI's 0.05\), or 0"),
    (["train.d_sam_rho=0.05", "train.compile=true", "train.compile_mode=reduce-overhead"],
     r"train.d_sam_rho calls D twice a step, which has not run under train.compile_mode reduce-overhead's CUDA graphs: "
     r"set train.compile_mode=default, or train.d_sam_rho=0."),
    (["log.close_timeout_s=0"], r"log.close_timeout_s is 0: give the seconds ranks may wait at the end for rank 0 to close "
                                r"its logs \(at least 1; 1800 by default\).$"),
])
def test_settings_that_would_fail_later_are_refused_at_start_up(celeba_shards, tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        Trainer(_config(celeba_shards, tmp_path, "refused", *extra), ONE_CPU)


def test_shards_with_fakes_are_refused_unless_real_only_keeps_their_real_faces(celeba_shards, celebdf_shards, tmp_path):
    # Celeb-DF's fakes read as real faces would teach D the opposite of detection, and calibrate it on them.
    both = f"data.shards=[{celeba_shards.out_dir},{celebdf_shards.out_dir}]"
    fakes = celebdf_shards.manifest["splits"]["train"]["labels"]["1"]
    with pytest.raises(UserError, match=rf"^{celebdf_shards.out_dir} holds {fakes} fake samples \(label 1\) in split 'train', "
                                        r"which training would take as real faces: set data.real_only=true"):
        Trainer(_config(celeba_shards, tmp_path, "fakes", both, "data.real_only=false"), ONE_CPU)
    # The validation split too, whose reals calibrate the detector: a copy whose training split is all real.
    copy = tmp_path / "celebdf"
    shutil.copytree(celebdf_shards.out_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["splits"]["train"]["labels"] = {"0": manifest["splits"]["train"]["labels"]["0"]}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=rf"^{copy} holds \d+ fake samples \(label 1\) in split 'val'"):
        Trainer(_config(celeba_shards, tmp_path, "fakes", f"data.shards={copy}", "data.real_only=false"), ONE_CPU)


def test_a_log_interval_is_timed_by_the_steps_it_holds(monkeypatch):
    # After a resume between two log lines the first interval holds fewer than train.log_every_steps steps.
    from types import SimpleNamespace

    import pipeline.progress as progress

    clock = iter([0.0, 6.0])
    monkeypatch.setattr(progress, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    meter = progress.Meter(1)
    for _ in range(3):
        meter.add({"loss/D": torch.tensor(1.0)})
    assert meter.flush() == ({"loss/D": 1.0}, 2.0)  # 3 steps in 6 s


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch cannot use CUDA")
@pytest.mark.parametrize("ranks", [False, True])
def test_a_driver_older_than_torchs_cuda_is_one_sentence_not_training_on_the_cpu(monkeypatch, ranks):
    # With a driver older than torch's CUDA, torch.cuda.is_available() is False after one warning line, and the run
    # trained on the CPU at a hundredth of the speed. No such machine is lent: torch's answer on one is put in its
    # place (its wording, from torch's CUDAFunctions.cpp); on this machine torch cannot use CUDA for real.
    from pipeline import dist

    def too_old():
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 12080). Please update your GPU "
                           "driver by downloading and installing a new version from the URL: "
                           "http://www.nvidia.com/Download/index.aspx Alternatively, go to: https://pytorch.org to "
                           "install a PyTorch version that has been compiled with your version of the CUDA driver.")

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert dist.init_distributed().device == torch.device("cpu")  # this machine has no driver: the CPU, silently
    if ranks:  # under torchrun: refused before any process group
        for key, value in {"RANK": 0, "WORLD_SIZE": 2, "LOCAL_RANK": 0}.items():
            monkeypatch.setenv(key, str(value))
    monkeypatch.setattr(torch.cuda, "init", too_old)
    with pytest.raises(UserError, match=r"^torch .* cannot use this machine's GPUs \(The NVIDIA driver on your system is "
                                        r"too old \(found version 12080\)\), so this would run on the CPU, many times slower: update "
                                        r"the NVIDIA driver .*CUDA_VISIBLE_DEVICES= \(empty\) to run on the CPU on "
                                        r"purpose.$"):
        dist.init_distributed()
    monkeypatch.delenv("RANK", raising=False)
    for cpu in ("", "-1"):  # the CPU on purpose
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", cpu)
        assert dist.init_distributed().device == torch.device("cpu")


@pytest.mark.gpu
def test_a_local_rank_beyond_the_gpus_it_sees_is_one_sentence(monkeypatch):
    # sbatch --gpus-per-task=1 gives srun's one task a node one GPU while torchrun starts one worker per GPU of the
    # node: ranks 1..n-1 failed in torch.cuda.set_device with "invalid device ordinal".
    from pipeline.dist import init_distributed

    n = torch.cuda.device_count()
    for key, value in {"RANK": n, "WORLD_SIZE": n + 1, "LOCAL_RANK": n, "LOCAL_WORLD_SIZE": n + 1}.items():
        monkeypatch.setenv(key, str(value))
    with pytest.raises(UserError, match=f"local rank {n} has no GPU: this process sees {n}, and torchrun started {n + 1} "
                                        "processes a node"):
        init_distributed()


@pytest.mark.gpu
def test_reduce_overhead_validates_samples_checkpoints_and_resumes_as_the_default_mode_trains(celeba_shards, tmp_path):
    # train.compile_mode=reduce-overhead gave 1.74x end to end on an H200 (BENCHMARKS.md), but only the step had run
    # under it: its CUDA graphs own their outputs until the next replay, and the trainer's work between steps
    # (validation and calibration, sample grids, checkpoints) and a resume must hold before it can be the default.
    from torch._dynamo.utils import counters

    gpu = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cuda"))

    def run(name, mode, max_steps):
        cfg = _config(celeba_shards, tmp_path, name, "train.compile=true", f"train.compile_mode={mode}",
                      f"train.max_steps={max_steps}", "train.log_every_steps=2", "train.val_every_steps=3",
                      "train.sample_every_steps=3", "train.ckpt_every_steps=3")
        trainer = Trainer(cfg, gpu)
        try:
            assert trainer.step_fn.cuda_graphs is (mode == "reduce-overhead")
            start = {k: v.detach().to("cpu", copy=True) for k, v in trainer.step_fn.D_raw.state_dict().items()}
            return trainer.train(), trainer.step, start
        finally:
            trainer.close()

    status, steps, start = run("plain", "default", 8)
    assert (status, steps) == ("max_steps", 8)
    counters.clear()
    assert run("graphs", "reduce-overhead", 4)[:2] == ("max_steps", 4)
    assert run("graphs", "reduce-overhead", 8)[:2] == ("max_steps", 8)  # resumed at step 4
    assert counters["inductor"]["cudagraph_skips"] == 0  # no part fell back to running without its graph
    plain, graphs = _newest(tmp_path, "plain"), _newest(tmp_path, "graphs")
    assert graphs["calibration"]["step"] == plain["calibration"]["step"] == 8
    assert 0 < graphs["threshold"] < 1
    assert len(list((tmp_path / "graphs" / "samples").glob("step-*.png"))) >= 2
    # The same training: D's weights moved alike (a run of other weights would differ by about as much as they moved).
    moved = sum((plain["D"][k].float() - start[k].float()).square().sum() for k in start)
    apart = sum((graphs["D"][k].float() - plain["D"][k].float()).square().sum() for k in start)
    assert apart < 0.05 * moved, (apart, moved)


def test_a_run_folder_or_a_wandb_run_that_cannot_start_is_one_sentence(celeba_shards, tmp_path, monkeypatch):
    # Both fail on rank 0 alone, which on_main turns into every rank's error: a UserError there is a sentence on each.
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    cfg = _config(celeba_shards, tmp_path / "notes.txt", "through-a-file", "train.max_steps=1")
    with pytest.raises(UserError) as error:
        Trainer(cfg, ONE_CPU)
    assert str(error.value) == (f"cannot write the run folder {tmp_path / 'notes.txt' / 'through-a-file'} (Not a "
                                "directory): set train.runs_dir to a folder you can write to, with room for checkpoints.")

    # A compute node where nobody ran `wandb login`: no key in the environment or in ~/.netrc, and no terminal to ask.
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO())
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    cfg = _config(celeba_shards, tmp_path, "online", "train.max_steps=1", "log.wandb=online", "log.tensorboard=true")
    with pytest.raises(UserError) as error:
        Trainer(cfg, ONE_CPU)
    sentence = str(error.value)  # wandb's own words in the middle, which its versions word differently
    assert re.match(r"wandb could not start the run in log.wandb=online mode \((UsageError|AuthenticationError): .*api.?key",
                    sentence, re.IGNORECASE), sentence
    assert sentence.endswith("): log in where the run starts (`wandb login`, or WANDB_API_KEY), or set log.wandb=offline "
                             "and `wandb sync` its folder later, or log.wandb=disabled.")

    # Offline, logging in is no fix: a wandb whose service cannot start here (put in its place) has another.
    import wandb

    from pipeline.loggers import RunLogger

    def service_down(**kwargs):
        raise wandb.Error("wandb-core could not start")

    monkeypatch.setattr(wandb, "init", service_down)
    with pytest.raises(UserError, match=r"^wandb could not start the run in log.wandb=offline mode \(Error: wandb-core could "
                                        r"not start\): set log.wandb=disabled to train without it\.$"):
        RunLogger(tmp_path / "offline", _config(celeba_shards, tmp_path, "offline", "log.wandb=offline"), {}, "run", False)


def test_training_on_synthetic_shards_says_so(celeba_shards, tmp_path, caplog):
    # The configs' data.shards point at `make demo`'s folder: a cluster job without data.shards would train on it.
    real = tmp_path / "celeba"
    shutil.copytree(celeba_shards.out_dir, real)
    manifest = json.loads((real / "manifest.json").read_text())
    manifest["source"]["synthetic"] = False  # as the real CelebA's manifest says
    (real / "manifest.json").write_text(json.dumps(manifest))
    warned = []
    for shards in (celeba_shards.out_dir, real):
        caplog.clear()
        with caplog.at_level("WARNING", logger="pipeline.trainer"):
            Trainer(_config(celeba_shards, tmp_path, "synthetic", "train.max_steps=1", f"data.shards={shards}"), ONE_CPU).close()
        warned.append([r.getMessage() for r in caplog.records if "synthetic data" in r.getMessage()])
    assert warned == [[f"data.shards {celeba_shards.out_dir} holds synthetic data (shards/synth, as `make demo` writes it), "
                       "not CelebA or Celeb-DF: set data.shards to your own shards for a real run"], []]
