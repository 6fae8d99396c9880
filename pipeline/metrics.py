"""Detection metrics as the field reports them on Celeb-DF (DeepfakeBench): labels 1 = fake, scores = P(fake).

Plain numpy, with the same definitions as scikit-learn's roc_auc_score, roc_curve and
average_precision_score, so that numbers compare with published tables.
"""

from __future__ import annotations

import numpy as np


def _check(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    labels, scores = np.asarray(labels, dtype=np.int64), np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError("labels and scores must be 1-d and of one length")
    if not ((labels == 0) | (labels == 1)).all():
        raise ValueError("labels must be 0 (real) or 1 (fake)")
    if not np.isfinite(scores).all():  # NaN sorts anywhere: the curve would be meaningless, not an error
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} scores are NaN or infinite")
    return labels, scores


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates, thresholds), thresholds descending, from (0, 0)."""
    labels, scores = _check(labels, scores)
    order = np.argsort(-scores, kind="mergesort")
    labels, scores = labels[order], scores[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), labels.size - 1]  # a threshold per distinct score
    tps = np.cumsum(labels)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    tpr = np.r_[0.0, tps / max(1, labels.sum())]
    fpr = np.r_[0.0, fps / max(1, (1 - labels).sum())]
    return fpr, tpr, np.r_[np.inf, scores[last_of_tie]]


def auc(labels, scores) -> float:
    """Area under the ROC curve; nan when only one class is present."""
    labels, _ = _check(labels, scores)
    if labels.min() == labels.max():
        return float("nan")
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(np.trapezoid(tpr, fpr))


def eer(labels, scores) -> float:
    """Equal error rate: where the false-positive rate meets the false-negative rate, interpolated along the ROC segment
    that crosses (the brentq/interp1d convention). DeepfakeBench takes the nearest ROC point instead, which differs by
    under 0.003 at Celeb-DF's 518 test videos (simulated)."""
    labels, _ = _check(labels, scores)
    if labels.min() == labels.max():
        return float("nan")
    fpr, tpr, _ = roc_curve(labels, scores)
    fnr = 1 - tpr
    i = int(np.flatnonzero(fpr >= fnr)[0])  # the first point past the crossing; fpr - fnr rises along the curve
    if i == 0:
        return float(fpr[0])
    d0, d1 = fnr[i - 1] - fpr[i - 1], fpr[i] - fnr[i]  # both >= 0
    t = d0 / (d0 + d1) if d0 + d1 > 0 else 0.0
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def eer_threshold(labels, scores) -> float:
    """The score threshold at the equal-error point: call a score fake above it.

    At the first ROC point where the false-positive rate reaches the false-negative rate, the scores at
    or above that point's score are called fake; the threshold is the midpoint between that score and
    the next lower one, so that `scores > threshold` makes exactly that call.
    """
    labels, scores = _check(labels, scores)
    if labels.min() == labels.max():
        return 0.5
    fpr, tpr, thresholds = roc_curve(labels, scores)
    i = int(np.flatnonzero(fpr >= 1 - tpr - 1e-12)[0])  # >= 1: fpr starts at 0, fnr at 1; 1 - 2/3 > 1/3 in floats
    lower = thresholds[i + 1] if i + 1 < len(thresholds) else thresholds[i] - 1e-6
    middle = (thresholds[i] + lower) / 2
    # Between two adjacent doubles (a saturated D's scores near 1) the midpoint rounds onto the upper one, and
    # `> threshold` would then call none of its scores fake; no score lies between the two, so the lower one calls alike.
    return float(middle if middle < thresholds[i] else lower)


def average_precision(labels, scores) -> float:
    """Sum over thresholds of (recall step) x precision, as scikit-learn defines it."""
    labels, scores = _check(labels, scores)
    if labels.sum() == 0:
        return float("nan")
    _, tpr, _ = roc_curve(labels, scores)
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_labels = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), labels.size - 1]
    precision = np.cumsum(sorted_labels)[last_of_tie] / (last_of_tie + 1)
    return float(np.sum(np.diff(tpr) * precision))


def accuracy(labels, scores, threshold: float = 0.5) -> float:
    labels, scores = _check(labels, scores)
    return float(((scores > threshold).astype(np.int64) == labels).mean())
