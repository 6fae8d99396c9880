import csv
import json
import math
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline import metrics
from pipeline.errors import UserError
from pipeline.evaluate import load_discriminator, score_split, video_of
from shards.manifest import load_manifest


# ---------------------------------------------------------------- metrics, against values worked by hand

def test_metrics_on_a_small_case_worked_by_hand():
    labels, scores = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    # Of the 4 (fake, real) pairs, 3 rank the fake higher: AUC 3/4.
    assert metrics.auc(labels, scores) == 0.75
    # Ranked: 0.8 (fake) 0.4 (real) 0.35 (fake) 0.1 (real): precision 1 at recall 1/2, 2/3 at recall 1.
    assert metrics.average_precision(labels, scores) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    fpr, tpr, thresholds = metrics.roc_curve(labels, scores)
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1] and tpr.tolist() == [0, 0.5, 0.5, 1, 1]
    assert thresholds[1:].tolist() == [0.8, 0.4, 0.35, 0.1]
    # At threshold 0.4 one real of two is called fake and one fake of two is missed: EER 1/2.
    assert metrics.eer(labels, scores) == 0.5
    assert metrics.accuracy(labels, scores) == 0.75  # 0.4 and 0.35 are below 0.5: one fake missed


def test_metrics_at_the_extremes():
    assert metrics.auc([0, 0, 1], [0.1, 0.2, 0.9]) == 1.0 and metrics.eer([0, 0, 1], [0.1, 0.2, 0.9]) == 0.0
    assert metrics.auc([0, 1], [0.9, 0.1]) == 0.0 and metrics.eer([0, 1], [0.9, 0.1]) == 1.0
    assert metrics.auc([0, 1, 0, 1], [0.5] * 4) == 0.5  # ties count half
    assert math.isnan(metrics.auc([1, 1], [0.2, 0.3])) and math.isnan(metrics.eer([0, 0], [0.2, 0.3]))
    # A vertical ROC step: between (fpr 1/3, fnr 1/2) and (fpr 1/3, fnr 0) the rates meet at 1/3.
    assert metrics.eer([0, 0, 0, 1, 1], [0.1, 0.2, 0.6, 0.5, 0.9]) == pytest.approx(1 / 3)
    # A tie of a real and a fake makes a diagonal segment, (fpr 0, fnr 1/2) to (fpr 1/2, fnr 0): they meet at 1/4.
    assert metrics.eer([0, 1, 0, 1], [0.2, 0.5, 0.5, 0.9]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="0 .real. or 1"):
        metrics.auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="1 scores are NaN or infinite"):  # not a silent 0.5
        metrics.auc([0, 1, 0, 1], [0.1, float("nan"), 0.2, 0.9])


def test_a_video_is_named_by_its_key_without_the_frame():
    assert video_of("test-000000.tar/Celeb-synthesis_id0_id16_0000_0042") == "Celeb-synthesis_id0_id16_0000"


def test_confident_fakes_keep_their_order(smoke_checkpoint, celebdf_shards):
    # In float32, sigmoid(-logit) is exactly 1 below a logit of -16.6: every confident fake would tie, and AUC
    # counts ties as half.
    D, meta = load_discriminator(smoke_checkpoint, torch.device("cpu"))
    args = dict(image_size=meta["config"]["data"]["image_size"], device=torch.device("cpu"), batch_size=16, threads=1)
    plain = score_split(D, celebdf_shards.out_dir, "test", **args)
    D.register_forward_hook(lambda module, inputs, logits: logits - 25)  # every face called fake, confidently
    confident = score_split(D, celebdf_shards.out_dir, "test", **args)
    assert confident.keys == plain.keys and confident.scores.max() < 1
    assert np.all(np.diff(confident.scores[np.argsort(plain.scores, kind="stable")]) >= 0)  # the same order


def test_a_loader_that_misses_a_sample_fails_the_scoring_rather_than_shrink_it(smoke_checkpoint, celebdf_shards, monkeypatch):
    from pipeline.data.common import ShardLoader

    D, meta = load_discriminator(smoke_checkpoint, torch.device("cpu"))
    part = ShardLoader.part
    monkeypatch.setattr(ShardLoader, "part", lambda self, index=None: part(self, index)[:-1])  # a loader's bug
    n = load_manifest(celebdf_shards.out_dir)["splits"]["test"]["samples"]
    with pytest.raises(UserError, match=re.escape(f"{celebdf_shards.out_dir} split test holds {n} samples, but {n - 1} "
                                                  "distinct keys were scored (two samples share a key, or the loader")):
        score_split(D, celebdf_shards.out_dir, "test", meta["config"]["data"]["image_size"], torch.device("cpu"),
                    batch_size=16, loader="baseline", threads=1)


@pytest.mark.gpu
def test_a_faces_pixels_do_not_depend_on_the_batch_it_is_decoded_in_on_a_gpu(celeba_shards):
    # DALI gives the first hw_decoder_load of a GPU batch to the A100/H100 hardware JPEG decoder, whose pixels differ
    # from the CUDA decoder's: a face's score would follow its place in the batch, so the batch size and the ranks.
    # What D is given is compared (its arithmetic may round apart between batch sizes by itself); any D and faces show
    # it (the GPU machine has no wandb for the smoke checkpoint, no scikit-image for the synthetic Celeb-DF's photos).
    from pipeline.models import build_models

    D = build_models(100, 16, 16, 64, torch.Generator().manual_seed(0))[1].to("cuda").eval()
    seen = []
    D.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].cpu()))
    inputs = []
    for batch in (1, 32):
        seen.clear()
        scores = score_split(D, celeba_shards.out_dir, "test", 64, torch.device("cuda"), batch_size=batch, threads=1)
        inputs.append(torch.cat(seen)[:len(scores.keys)])  # in the reader's order; the last batch's padding dropped
    assert torch.equal(inputs[0], inputs[1])


def test_the_detector_loaded_is_the_average_of_ds_weights_where_the_run_kept_one(smoke_checkpoint, tmp_path):
    state = torch.load(smoke_checkpoint, weights_only=True)
    D, _ = load_discriminator(smoke_checkpoint, torch.device("cpu"))
    assert all(torch.equal(v, state["D_ema"][k]) for k, v in D.state_dict().items())
    assert not all(torch.equal(v, state["D"][k]) for k, v in D.state_dict().items())
    del state["D_ema"]  # a checkpoint of a run with train.d_ema_beta=0, or from before D_ema existed
    torch.save(state, tmp_path / "plain.pt")
    D, _ = load_discriminator(tmp_path / "plain.pt", torch.device("cpu"))
    assert all(torch.equal(v, state["D"][k]) for k, v in D.state_dict().items())


# ---------------------------------------------------------------- the command

def evaluate(nproc, *args):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    return subprocess.run([*launcher, "launch/evaluate.py", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_evaluation_scores_every_test_frame_and_writes_its_report(smoke_checkpoint, celebdf_shards, celeba_shards, tmp_path):
    result = evaluate(1, "--checkpoint", smoke_checkpoint, "--shards", celebdf_shards.out_dir, "--celeba", celeba_shards.out_dir,
                      "--out", tmp_path, "--batch", 8, "--log-to-run")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "scoring celebdf test: 100%" in result.stderr and "scoring celeba test: 100%" in result.stderr  # progress
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["synthetic_data"] is True and "the figures are not results on Celeb-DF" in result.stdout
    test = load_manifest(celebdf_shards.out_dir)["splits"]["test"]
    assert summary["counts"]["frames"] == test["samples"]
    assert (summary["counts"]["real_frames"], summary["counts"]["fake_frames"]) == (test["labels"]["0"], test["labels"]["1"])
    assert summary["counts"]["videos"] == summary["counts"]["real_videos"] + summary["counts"]["fake_videos"]
    for level in ("frame", "video"):
        assert set(summary[level]) == {"auc", "accuracy", "accuracy_at_0.5", "eer", "ap"}
        assert all(0 <= v <= 1 for v in summary[level].values())
    assert summary["celeba"]["images"] == load_manifest(celeba_shards.out_dir)["splits"]["test"]["samples"]
    threshold = torch.load(smoke_checkpoint, weights_only=True)["threshold"]  # a plain GAN's D is calibrated too
    assert summary["threshold"] == pytest.approx(threshold) and "no calibrated threshold" not in result.stderr
    rows = list(csv.DictReader((tmp_path / "videos.csv").open()))
    assert len(rows) == summary["counts"]["videos"] and sum(int(r["frames"]) for r in rows) == test["samples"]
    for r in rows:
        assert r["label"] == ("1" if r["video"].startswith("Celeb-synthesis") else "0")
        assert r["verdict"] == ("fake" if float(r["score"]) > threshold else "real")
    for name in ("roc.png", "hist.png"):
        assert Image.open(tmp_path / name).size[0] >= 500
    events = EventAccumulator(str(smoke_checkpoint.parent.parent))
    events.Reload()
    assert events.Scalars("celebdf/video_auc")[-1].value == pytest.approx(summary["video"]["auc"])
    assert "celebdf/roc" in events.Tags()["images"]


def test_reports_on_two_splits_go_to_two_folders_and_two_sets_of_tags(smoke_checkpoint, celebdf_shards, tmp_path):
    checkpoint = tmp_path / "run" / "checkpoints" / smoke_checkpoint.name
    checkpoint.parent.mkdir(parents=True)
    shutil.copy(smoke_checkpoint, checkpoint)
    for split in ("test", "val"):
        result = evaluate(1, "--checkpoint", checkpoint, "--shards", celebdf_shards.out_dir, "--split", split, "--batch", 8,
                          "--log-to-run")
        assert result.returncode == 0, result.stderr[-2000:]
    test = json.loads((tmp_path / "run" / "eval-step-00000002" / "metrics.json").read_text())
    val = json.loads((tmp_path / "run" / "eval-step-00000002-val" / "metrics.json").read_text())
    assert (test["split"], val["split"]) == ("test", "val") and test["counts"] != val["counts"]
    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    assert events.Scalars("celebdf/video_auc")[-1].value == pytest.approx(test["video"]["auc"])
    assert events.Scalars("celebdf-val/video_auc")[-1].value == pytest.approx(val["video"]["auc"])


def test_two_ranks_score_every_frame_exactly_once_and_alike(smoke_checkpoint, celebdf_shards, tmp_path):
    one = evaluate(1, "--checkpoint", smoke_checkpoint, "--shards", celebdf_shards.out_dir, "--out", tmp_path / "one", "--batch", 5)
    two = evaluate(2, "--checkpoint", smoke_checkpoint, "--shards", celebdf_shards.out_dir, "--out", tmp_path / "two", "--batch", 5)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    a, b = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("one", "two"))
    assert a["counts"] == b["counts"]
    rows = [{r["video"]: (r["frames"], float(r["score"])) for r in csv.DictReader((tmp_path / n / "videos.csv").open())}
            for n in ("one", "two")]
    assert rows[0].keys() == rows[1].keys()
    for video, (frames, score) in rows[0].items():
        assert rows[1][video][0] == frames and rows[1][video][1] == pytest.approx(score, abs=1e-5)
    assert b["frame"]["auc"] == pytest.approx(a["frame"]["auc"], abs=1e-6)


def test_the_eer_threshold_sits_at_the_equal_error_point():
    labels, scores = [0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.6, 0.5, 0.7, 0.9]
    # Going down the scores, the false-positive rate first meets the false-negative rate at 0.6 (1/3 each);
    # the threshold is the midpoint between that score and the next lower one, 0.5.
    assert metrics.eer_threshold(labels, scores) == pytest.approx(0.55)
    assert metrics.accuracy(labels, scores, 0.55) == pytest.approx(4 / 6)  # one real called fake, one fake missed
    assert metrics.eer_threshold([0, 1], [0.2, 0.8]) == pytest.approx(0.5)
    assert metrics.eer_threshold([0, 0], [0.2, 0.8]) == 0.5  # one class: nothing to calibrate on
    # A saturated D: the equal-error score and the next lower one are adjacent doubles, whose midpoint rounds up.
    lo = 0.9999999999999
    hi = float(np.nextafter(lo, 2))
    labels, scores = np.array([0, 0, 0, 1, 1, 1]), np.array([0.1, 0.2, lo, hi, hi, hi])
    threshold = metrics.eer_threshold(labels, scores)
    assert list(scores > threshold) == [False, False, False, True, True, True]


def test_evaluation_uses_the_checkpoints_calibrated_threshold(sbi_checkpoint, celebdf_shards, tmp_path):
    threshold = torch.load(sbi_checkpoint, weights_only=True)["threshold"]
    result = evaluate(1, "--checkpoint", sbi_checkpoint, "--shards", celebdf_shards.out_dir, "--out", tmp_path, "--batch", 8)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["threshold"] == pytest.approx(threshold) and summary["calibration"]["reals"] > 0
    for r in csv.DictReader((tmp_path / "videos.csv").open()):
        assert r["verdict"] == ("fake" if float(r["score"]) > threshold else "real")
    assert f"at the threshold {threshold:.3f}" in result.stdout


def test_a_file_that_is_not_a_checkpoint_is_a_clear_error(celebdf_shards, tmp_path):
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    result = evaluate(1, "--checkpoint", tmp_path / "x.pt", "--shards", celebdf_shards.out_dir)
    assert result.returncode == 2 and "does not load as a training checkpoint" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch cannot use CUDA")
def test_a_driver_too_old_for_torch_is_one_sentence_from_evaluate_too(celebdf_shards, tmp_path, monkeypatch, capsys):
    # No such machine is lent: torch's answer on one is put in its place (as test_trainer_rules does for training).
    import runpy

    def too_old():
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 12080). Please update your GPU driver.")

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "13.0")  # a CUDA build of torch, as installed
    monkeypatch.setattr(torch.cuda, "init", too_old)
    monkeypatch.setattr(sys, "argv", ["launch/evaluate.py", "--checkpoint", str(tmp_path / "step-1.pt"), "--shards",
                                      str(celebdf_shards.out_dir)])
    assert runpy.run_path(str(REPO / "launch" / "evaluate.py"))["main"]() == 2
    assert re.fullmatch(r"error: torch .* cannot use this machine's GPUs \(The NVIDIA driver on your system is too old "
                        r"\(found version 12080\)\), so this would run on the CPU, many times slower: .*\n", capsys.readouterr().err)


def test_training_can_evaluate_the_detector_every_epoch(celeba_shards, celebdf_shards, tmp_path):
    # Validation on a clock of its own that never falls due here: an evaluation calibrates before it scores, so that
    # its accuracies are at the threshold of its own step (not 0.5, nor an older step's).
    overrides = [f"data.shards={celeba_shards.out_dir}", "data.batch_size=4", "data.threads=1", "model.ngf=16", "model.ndf=16",
                 f"train.runs_dir={tmp_path}", "train.name=with-eval", "train.epochs=2", "log.wandb=disabled",
                 "train.val_every_epochs=0", "train.val_every_steps=1000",
                 "train.eval_every_epochs=1", f"train.eval_shards={celebdf_shards.out_dir}", "train.eval_split=val"]
    result = subprocess.run([sys.executable, "launch/train.py", "--config", "configs/smoke.yaml", *overrides],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Celeb-DF val frame AUC" in result.stdout
    events = EventAccumulator(str(tmp_path / "with-eval"))
    events.Reload()
    values = events.Scalars("celebdf-val/video_auc")  # not celebdf/: the test split's tags
    assert [e.step for e in values] == [12, 24]  # an epoch is 48 images at batch 4 in one process
    thresholds = {e.step: e.value for e in events.Scalars("val/threshold")}
    assert [(e.step, e.value) for e in events.Scalars("celebdf-val/threshold")] == [(s, thresholds[s]) for s in (12, 24)]
    table = subprocess.run([sys.executable, "-m", "pipeline.compare", str(tmp_path / "with-eval"), "--out", str(tmp_path / "cmp")],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0 and f"{values[-1].value:.4g} (val)" in table.stdout, table.stdout + table.stderr


@pytest.mark.parametrize("detector", ["D_ema", "D"])  # D: a checkpoint without the average (train.d_ema_beta=0)
def test_a_checkpoint_with_non_finite_weights_is_refused_by_name(smoke_checkpoint, celebdf_shards, tmp_path, detector):
    state = torch.load(smoke_checkpoint, weights_only=True)
    if detector == "D":
        del state["D_ema"]
    first = next(k for k, v in state[detector].items() if v.is_floating_point())
    state[detector][first] = torch.full_like(state[detector][first], float("nan"))
    broken = tmp_path / "broken.pt"
    torch.save(state, broken)
    result = evaluate(1, "--checkpoint", broken, "--shards", celebdf_shards.out_dir, "--out", tmp_path / "out")
    assert result.returncode == 2 and f"checkpoint {broken} holds non-finite weights in {detector} ({first})" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
    # Finite weights that overflow: the scores are NaN, and evaluation says so instead of reporting 0.5.
    state[detector][first] = torch.load(smoke_checkpoint, weights_only=True)[detector][first] * 1e38
    torch.save(state, broken)
    result = evaluate(1, "--checkpoint", broken, "--shards", celebdf_shards.out_dir, "--out", tmp_path / "out")
    assert result.returncode == 2 and "D gave non-finite scores to" in result.stderr and "pass an earlier one" in result.stderr


def test_shards_of_the_wrong_dataset_or_a_checkpoint_outside_a_run_are_refused(smoke_checkpoint, celebdf_shards, celeba_shards,
                                                                               tmp_path):
    swapped = evaluate(1, "--checkpoint", smoke_checkpoint, "--shards", celeba_shards.out_dir, "--celeba", celebdf_shards.out_dir,
                       "--out", tmp_path / "swapped")
    assert swapped.returncode == 2 and f"{celeba_shards.out_dir} holds celeba shards, and --shards takes celebdf's" in swapped.stderr
    assert "Traceback" not in swapped.stderr and not (tmp_path / "swapped").exists()
    loose = tmp_path / "downloaded.pt"  # not in <run>/checkpoints/: its run, and so the default --out, is unknown
    shutil.copy(smoke_checkpoint, loose)
    for extra in ([], ["--out", tmp_path / "out", "--log-to-run"]):
        result = evaluate(1, "--checkpoint", loose, "--shards", celebdf_shards.out_dir, *extra)
        assert result.returncode == 2 and f"checkpoint {loose} is not in a run's checkpoints/ folder" in result.stderr
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["downloaded.pt"]
    (tmp_path / "a-file").write_text("")
    result = evaluate(1, "--checkpoint", loose, "--shards", celebdf_shards.out_dir, "--out", tmp_path / "a-file")
    assert result.returncode == 2 and f"cannot write the report to {tmp_path / 'a-file'}" in result.stderr
    assert "Traceback" not in result.stderr


def test_test_videos_without_a_scored_frame_and_other_crops_are_reported(sbi_checkpoint, celebdf_shards, tmp_path):
    shards = tmp_path / "celebdf"
    shutil.copytree(celebdf_shards.out_dir, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["source"]["test_videos"]["Celeb-real"] += 2  # as if sharding found no face in three listed videos
    manifest["source"]["test_videos"]["Celeb-synthesis"] += 1
    manifest["faces"]["face_scale"] = 1.5  # cropped unlike the training shards
    (shards / "manifest.json").write_text(json.dumps(manifest))
    checkpoint = tmp_path / "run" / "checkpoints" / sbi_checkpoint.name  # a run of its own, for --log-to-run
    checkpoint.parent.mkdir(parents=True)
    shutil.copy(sbi_checkpoint, checkpoint)
    result = evaluate(1, "--checkpoint", checkpoint, "--shards", shards, "--out", tmp_path / "out", "--batch", 8, "--log-to-run")
    assert result.returncode == 0, result.stderr[-2000:]
    total = sum(manifest["source"]["test_videos"].values())
    assert f"warning: 3 of {total} test videos have no scored frame (2 of Celeb-real, 1 of Celeb-synthesis;" in result.stderr
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert summary["counts"]["missing_videos"] == {"Celeb-real": 2, "Celeb-synthesis": 1}
    # Over every listed video, the three at 0.5 as SBI scores a video without a face: the set its 0.93 is over.
    rows = list(csv.DictReader((tmp_path / "out" / "videos.csv").open()))
    labels = [int(r["label"]) for r in rows] + [0, 0, 1]
    scores = [float(r["score"]) for r in rows] + [0.5, 0.5, 0.5]
    assert summary["video_all_listed"]["auc"] == pytest.approx(metrics.auc(labels, scores))
    assert f"`video_all_listed` scores those at 0.5, as SBI does (video AUC {summary['video_all_listed']['auc']:.4f})" in result.stderr
    events = EventAccumulator(str(tmp_path / "run"))  # TensorBoard and wandb say so too, not only metrics.json
    events.Reload()
    assert events.Scalars("celebdf/video_all_listed_auc")[-1].value == pytest.approx(summary["video_all_listed"]["auc"])
    assert events.Scalars("celebdf/missing_videos")[-1].value == 3
    assert events.Scalars("celebdf/threshold")[-1].value == pytest.approx(summary["threshold"])
    assert "do not measure what pipeline.detect does" in result.stderr and "'face_scale': 1.5" in result.stderr


def test_videos_without_a_scored_frame_count_at_one_half_over_the_whole_test_list():
    from pipeline.evaluate import listed_video_block

    videos = [{"label": 0, "score": 0.3}, {"label": 0, "score": 0.45}, {"label": 1, "score": 0.7}, {"label": 1, "score": 0.55}]
    block = listed_video_block(videos, {"Celeb-real": 1, "Celeb-synthesis": 2, "YouTube-real": 1}, threshold=0.4)
    labels, scores = [0, 0, 1, 1, 0, 1, 1, 0], [0.3, 0.45, 0.7, 0.55, 0.5, 0.5, 0.5, 0.5]
    assert metrics.auc(labels, scores) == pytest.approx(14 / 16)
    assert block["auc"] == pytest.approx(metrics.auc(labels, scores))
    assert block["accuracy"] == pytest.approx(metrics.accuracy(labels, scores, 0.4))


def test_an_undefined_metric_is_null_in_the_report(tmp_path):
    # One class (a split of reals only) has no AUC: NaN, which is not JSON.
    from pipeline.evaluate import write_report

    write_report(tmp_path, {"frame": {"auc": float("nan"), "accuracy": 1.0}}, [], {})
    assert json.loads((tmp_path / "metrics.json").read_text(), parse_constant=pytest.fail) == {"frame": {"auc": None, "accuracy": 1.0}}
