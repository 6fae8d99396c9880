"""The discriminator as a deepfake detector, scored on Celeb-DF the way the field does (DeepfakeBench).

D was trained to give real faces a positive logit, so a frame's fake score is sigmoid(-logit). A
video's score is the mean of its frames' scores. Frames are read with the DALI loader and the training
preprocessing; with several ranks each frame is scored exactly once (DALI's pad copies share their
source's key and are dropped). Reported: frame and video AUC, EER, average precision, accuracy at the
threshold calibrated at training time (the checkpoint's; 0.5 for checkpoints without one) and at 0.5,
and, given CelebA shards, the share of CelebA test images (all real) called fake.
"""

from __future__ import annotations

import csv
import io
import logging
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import dist, metrics
from pipeline.config import DataConfig, config_from_dict
from pipeline.data import build_loader
from pipeline.data.dali import SCORING_HW_DECODER_LOAD
from pipeline.errors import UserError
from pipeline.fsutil import write_bytes_atomic, write_json_atomic
from pipeline.models import Discriminator, fake_score, has_gan_head

log = logging.getLogger(__name__)


@dataclass
class Scores:
    keys: list[str]  # "<shard>/<sample key>", sorted
    labels: np.ndarray  # 1 = fake
    scores: np.ndarray  # P(fake) = sigmoid(-logit), float64


def load_discriminator(checkpoint: Path, device: torch.device) -> tuple[Discriminator, dict]:
    """The detector (in eval mode) and the checkpoint's config, step and calibrated threshold. The detector is
    D_ema, the average of D's weights, where the run kept one (train.d_ema_beta), else D."""
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        cfg, step = state["config"], state["step"]
        key = "D_ema" if "D_ema" in state else "D"
        weights = state[key]
        # Checkpoints from before model.d_norm existed hold the paper's BatchNorm D.
        D = Discriminator(cfg["model"]["ndf"], cfg["data"]["image_size"], cfg["model"].get("d_norm", "batch"),
                          gan_head=has_gan_head(weights), blocks=cfg["model"].get("d_blocks", 0))
        D.load_state_dict(weights)
    except FileNotFoundError:
        raise UserError(f"checkpoint {checkpoint} does not exist: pass a file from <run>/checkpoints/.") from None
    except Exception as e:
        raise UserError(f"checkpoint {checkpoint} does not load as a training checkpoint ({e}): pass another one.") from None
    broken = [name for name, value in weights.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if broken:  # its scores would be NaN, and an AUC of NaN scores is a silent 0.5
        raise UserError(f"checkpoint {checkpoint} holds non-finite weights in {key} ({', '.join(broken[:3])}): it cannot score "
                        "anything; pass an earlier checkpoint of the run.")
    return D.to(device).eval(), {"config": cfg, "step": step, "wandb_run_id": state.get("wandb_run_id"),
                                 "threshold": state.get("threshold"), "calibration": state.get("calibration") or {},
                                 "faces": state.get("faces")}


def verdict_threshold(meta: dict, checkpoint: Path) -> tuple[float, str | None]:
    """The checkpoint's calibrated threshold on P(fake), or 0.5; and a note where its verdicts need one."""
    if meta.get("threshold") is None:
        return 0.5, (f"checkpoint {checkpoint} has no calibrated threshold (trained on centre crops, or "
                     "written before calibration existed): using 0.5, which may call every face fake or real")
    # A checkpoint saved where validation did not run (another clock, or a stop on a signal) carries the threshold of
    # the last validation's weights.
    calibrated_at = meta["calibration"].get("step")
    if calibrated_at is not None and calibrated_at != meta["step"]:
        return float(meta["threshold"]), (
            f"checkpoint {checkpoint} is of step {meta['step']}, but its threshold was calibrated on the weights of step "
            f"{calibrated_at}: verdicts near it may be wrong; the run's last checkpoint, or one saved at a validation "
            "step (train.val_every_steps), carries its own")
    return float(meta["threshold"]), None


@torch.no_grad()
def score_split(D, shards: str, split: str, image_size: int, device: torch.device, rank: int = 0, world_size: int = 1,
                batch_size: int = 64, loader: str = "dali", threads: int = 4, progress: bool = False,
                should_stop=None) -> Scores | None:
    """Every sample of the split scored once, gathered on every rank; `progress`: a bar of this rank's batches.

    `should_stop` (a collective every rank calls alike), asked before each batch that every rank has, stops the
    scoring: None."""
    from tqdm import tqdm

    cfg = DataConfig(shards=str(shards), split=split, loader=loader, batch_size=batch_size, image_size=image_size,
                     hw_decoder_load=SCORING_HW_DECODER_LOAD,
                     crop="face", flip=False, shuffle=False, with_meta=True, drop_last=False, threads=threads)
    mine: dict[str, tuple[int, float]] = {}
    with build_loader(cfg, rank, world_size, device) as data:
        expected = data.split.samples
        common = data.common_batches()  # the collective `should_stop` is asked on these alone
        for i, batch in enumerate(tqdm(data, desc=f"scoring {Path(str(shards)).name} {split}", unit="batch", disable=not progress,
                               mininterval=1.0, file=sys.stderr)):
            if should_stop is not None and i < common and should_stop():
                return None
            fake = fake_score(D(batch.images.float())).cpu().tolist()
            mine.update(zip(batch.keys, zip(batch.labels.cpu().tolist(), fake)))
    merged: dict[str, tuple[int, float]] = {}
    for part in dist.all_gather_objects(mine):
        merged.update(part)
    if len(merged) != expected:  # figures over fewer samples than the split holds, without a sign
        raise UserError(f"{shards} split {split} holds {expected} samples, but {len(merged)} distinct keys were scored (two "
                        "samples share a key, or the loader skipped some): write the shards again with `python -m shards`.")
    keys = sorted(merged)
    bad = [k for k in keys if not np.isfinite(merged[k][1])]
    if bad:
        raise UserError(f"D gave non-finite scores to {len(bad)} of {len(keys)} samples of {shards} split {split} (the first: "
                        f"{bad[0]}): its checkpoint is broken; pass an earlier one.")
    return Scores(keys, np.array([merged[k][0] for k in keys]), np.array([merged[k][1] for k in keys]))


def video_of(key: str) -> str:
    """'test-000000.tar/Celeb-synthesis_id0_id16_0000_0042' -> 'Celeb-synthesis_id0_id16_0000'."""
    return key.split("/", 1)[1].rsplit("_", 1)[0]


def per_video(frames: Scores, threshold: float = 0.5) -> list[dict]:
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(frames.keys):
        groups.setdefault(video_of(key), []).append(i)
    rows = []
    for video, idx in sorted(groups.items()):
        score = float(frames.scores[idx].mean())
        rows.append({"video": video, "label": int(frames.labels[idx[0]]), "frames": len(idx), "score": score,
                     "verdict": "fake" if score > threshold else "real"})
    return rows


def _block(labels, scores, threshold: float) -> dict[str, float]:
    return {"auc": metrics.auc(labels, scores), "accuracy": metrics.accuracy(labels, scores, threshold),
            "accuracy_at_0.5": metrics.accuracy(labels, scores), "eer": metrics.eer(labels, scores),
            "ap": metrics.average_precision(labels, scores)}


def summarize(frames: Scores, videos: list[dict], celeba: Scores | None = None, threshold: float = 0.5) -> dict:
    """Metrics as the field reports them; `accuracy` is at `threshold` (the calibrated one), beside accuracy at 0.5."""
    v_labels = np.array([v["label"] for v in videos])
    v_scores = np.array([v["score"] for v in videos])
    out = {
        "threshold": threshold,
        "frame": _block(frames.labels, frames.scores, threshold), "video": _block(v_labels, v_scores, threshold),
        "counts": {"frames": len(frames.keys), "videos": len(videos), "real_videos": int((v_labels == 0).sum()),
                   "fake_videos": int((v_labels == 1).sum()), "real_frames": int((frames.labels == 0).sum()),
                   "fake_frames": int((frames.labels == 1).sum())},
    }
    if celeba is not None:
        out["celeba"] = {"images": len(celeba.keys), "false_positive_rate": float((celeba.scores > threshold).mean())}
    return out


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def plots(frames: Scores, videos: list[dict]) -> dict[str, bytes]:
    """roc.png (frame and video ROC) and hist.png (frame scores, real against fake), as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    v_labels, v_scores = [v["label"] for v in videos], [v["score"] for v in videos]
    for name, labels, scores in (("frames", frames.labels, frames.scores), ("videos", v_labels, v_scores)):
        if len(set(labels)) == 2:
            fpr, tpr, _ = metrics.roc_curve(labels, scores)
            ax.plot(fpr, tpr, label=f"{name} (AUC {metrics.auc(labels, scores):.3f})")
    ax.plot([0, 1], [0, 1], "k:", label="chance")
    ax.set_xlabel("false-positive rate (real called fake)")
    ax.set_ylabel("true-positive rate (fake called fake)")
    ax.legend(loc="lower right")
    roc = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0, 1, 41)
    for label, name in ((0, "real"), (1, "fake")):
        ax.hist(frames.scores[frames.labels == label], bins=bins, alpha=0.6, label=f"{name} frames")
    ax.set_xlabel("fake score = sigmoid(-logit of D)")
    ax.set_ylabel("frames")
    ax.legend()
    hist = _png(fig)
    plt.close(fig)
    return {"roc.png": roc, "hist.png": hist}


def _json_ready(value):
    """NaN (the AUC of a split with one class) as null: bare NaN is not JSON, and jq or a browser refuse it."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_ready(v) for v in value]
    return None if isinstance(value, float) and not np.isfinite(value) else value


def write_report(out: Path, summary: dict, videos: list[dict], images: dict[str, bytes]) -> None:
    """The report's files, each written whole; metrics.json last, so that it never sits beside an older report's rest."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["video", "label", "frames", "score", "verdict"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(videos)
        write_bytes_atomic(out / "videos.csv", buf.getvalue().encode())
        for name, data in images.items():
            write_bytes_atomic(out / name, data)
        write_json_atomic(out / "metrics.json", _json_ready(summary))
    except OSError as e:
        raise UserError(f"cannot write the report to {out} ({e.strerror or e}): pass a writable folder as --out.") from None


def check_shards(celebdf: str, celeba: str | None, faces: dict | None) -> dict:
    """The Celeb-DF shards' manifest, after refusing shards of the wrong dataset (swapped --shards and --celeba
    score every image as real, and exit 0); a warning where the Celeb-DF shards' faces were cropped unlike the
    training shards' (detect crops as training did)."""
    from shards.manifest import detection_geometry, load_manifest

    manifests = []
    for folder, want, option in ((celebdf, "celebdf", "--shards"), (celeba, "celeba", "--celeba")):
        if folder is None:
            continue
        manifests.append(load_manifest(folder))
        if (got := manifests[-1].get("dataset")) != want:
            raise UserError(f"{folder} holds {got} shards, and {option} takes {want}'s: pass Celeb-DF's shards as --shards "
                            "and CelebA's as --celeba.")
    if faces is not None and (theirs := detection_geometry([celebdf])) != faces:
        log.warning("the faces of %s were cropped with %s, and the checkpoint's training faces with %s: these figures "
                    "then do not measure what pipeline.detect does (it crops as training did)", celebdf, theirs, faces)
    return manifests[0]  # Celeb-DF's


def missing_videos(videos: list[dict], expected: dict[str, int]) -> dict[str, int]:
    """Per folder, how many of the test list's videos have no scored frame (sharding found no face in any, or
    could not read them): the video metrics are over the others."""
    scored = Counter(v["video"].split("_", 1)[0] for v in videos)  # <folder>_<stem>
    return {f: n - scored[f] for f, n in sorted(expected.items()) if n > scored[f]}


def listed_video_block(videos: list[dict], missing: dict[str, int], threshold: float) -> dict[str, float]:
    """The video metrics over every video of the test list, those without a scored frame at P(fake) 0.5, as SBI's
    inference scores a video where no face is found: the set its reported AUC (0.93 on Celeb-DF v2) is over."""
    from shards.celebdf import FOLDERS

    labels = [v["label"] for v in videos] + [FOLDERS[folder] for folder, n in missing.items() for _ in range(n)]
    scores = [v["score"] for v in videos] + [0.5] * sum(missing.values())
    return _block(np.array(labels), np.array(scores), threshold)


def tag_prefix(split: str) -> str:
    """Where a Celeb-DF split's metrics go in TensorBoard and wandb: `celebdf/` for the test split, which
    runs are compared on, `celebdf-<split>/` for any other, so that neither overwrites the other."""
    return "celebdf" if split == "test" else f"celebdf-{split}"


def celebdf_scalars(summary: dict, split: str) -> dict[str, float]:
    """A summary's metrics as TensorBoard and wandb scalars, under the split's tag prefix: frame and video, the
    threshold their accuracies are at, and where videos had no scored frame, how many, and the video metrics over
    every listed video (`video_all_listed`, the set SBI's figures are over)."""
    prefix = tag_prefix(split)
    levels = [level for level in ("frame", "video", "video_all_listed") if level in summary]
    values = {f"{prefix}/{level}_{name}": v for level in levels for name, v in summary[level].items()}
    values[f"{prefix}/threshold"] = summary["threshold"]
    if missing := summary["counts"].get("missing_videos"):
        values[f"{prefix}/missing_videos"] = sum(missing.values())
    return values


def report_folder(run_dir: Path, step: int, split: str) -> Path:
    """launch/evaluate.py's default --out: `<run>/eval-step-N/`, with `-<split>` for splits other than test."""
    return run_dir / (f"eval-step-{step:08d}" + ("" if split == "test" else f"-{split}"))


def log_to_run(run_dir: Path, meta: dict, summary: dict, images: dict[str, bytes]) -> None:
    """The metrics and plots into the run's TensorBoard events and its wandb run, at the checkpoint's step."""
    from PIL import Image

    from pipeline.loggers import RunLogger

    cfg = config_from_dict(meta["config"], f"the config saved in the checkpoint of {run_dir}")
    logger = RunLogger(run_dir, cfg, meta["config"], meta["wandb_run_id"], resumed=True)
    try:
        prefix = tag_prefix(summary["split"])
        values = celebdf_scalars(summary, summary["split"])
        if "celeba" in summary:
            values["celeba/false_positive_rate"] = summary["celeba"]["false_positive_rate"]
        logger.scalars(values, meta["step"])
        for name, data in images.items():
            array = np.array(Image.open(io.BytesIO(data)).convert("RGB"))  # a writable copy for torch
            logger.image(f"{prefix}/{name[:-4]}", torch.from_numpy(array).permute(2, 0, 1).float() / 255, meta["step"])
    finally:
        logger.close()
