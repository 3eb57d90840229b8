"""Label matrices and ROC operating points: the arithmetic that choosing thresholds (here, in
`eyeray.decision`) and measuring them (`eyeray.evaluation`) share, all scikit-learn's."""

from __future__ import annotations

import sys

import numpy as np
from sklearn.metrics import roc_curve

from eyeray.tasks import TaskSpec

DEFAULT_THRESHOLD = 0.5  # per-label threshold without an operating point, as in the ODIR-2019 evaluation
TARGET_SPECIFICITY = 0.95  # AIROGS beta: sensitivity at 95 % specificity


class UndefinedMetric(ValueError):
    """The data cannot define this metric (e.g. only one class in y_true); the message says why."""


def check_labels(spec: TaskSpec, y_true, probs) -> tuple[np.ndarray, np.ndarray]:
    """Validate (n, C) label and score matrices early, with messages that name the task."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=float)
    want = spec.num_classes
    if y.ndim != 2 or p.ndim != 2 or y.shape != p.shape or y.shape[1] != want or len(y) == 0:
        raise ValueError(
            f"{spec.name}: y_true and probs must both be (n, {want}) with n >= 1 "
            f"(classes {', '.join(spec.classes)}); got {y.shape} and {p.shape}"
        )
    if not np.isfinite(p).all():
        raise ValueError(f"{spec.name}: probs contain NaN or infinity (did training diverge?)")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"{spec.name}: y_true must be 0/1 (one-hot or multi-hot)")
    y = y.astype(int)
    if not spec.multi_label and not (y.sum(axis=1) == 1).all():
        raise ValueError(f"{spec.name}: single-label y_true rows must be one-hot")
    return y, p


def referral_case(spec: TaskSpec, y_true, probs) -> tuple[np.ndarray, np.ndarray]:
    """'Any referral class present' vs the rest, scored by the summed referral probability."""
    if not spec.referral_classes:
        raise ValueError(f"{spec.name} has no referral_classes, so it has no referral metric")
    y, p = check_labels(spec, y_true, probs)
    cols = [spec.class_index(c) for c in spec.referral_classes]
    return y[:, cols].max(axis=1), p[:, cols].sum(axis=1)


def require_both_classes(y: np.ndarray, what: str) -> None:
    positives = int(np.sum(y))
    if positives in (0, len(y)):
        raise UndefinedMetric(
            f"{what} needs positive and negative cases in y_true; it has {positives} positive of {len(y)}"
        )


def roc_point_at_specificity(y: np.ndarray, score: np.ndarray, specificity: float) -> tuple[float, float, float]:
    """(threshold, sensitivity, specificity) of the most sensitive ROC operating point whose
    specificity is >= `specificity`; cases with `score >= threshold` are positive.

    No interpolation between operating points: this is the AIROGS evaluation's
    `screening_sens_at_spec` (github.com/qurAI-amsterdam/airogs-evaluation, evaluation.py), which
    takes the last `roc_curve(drop_intermediate=False)` point with 1 - fpr >= spec - machine eps.
    The threshold is infinite when only "nobody positive" reaches the specificity.
    """
    require_both_classes(y, "sensitivity at specificity")
    fpr, tpr, thresholds = roc_curve(y, score, drop_intermediate=False)
    i = np.flatnonzero((1 - fpr) >= specificity - sys.float_info.epsilon)[-1]  # fpr[0] == 0: always one
    return float(thresholds[i]), float(tpr[i]), float(1 - fpr[i])


def roc_point_at_sensitivity(y: np.ndarray, score: np.ndarray, sensitivity: float) -> tuple[float, float, float]:
    """(threshold, sensitivity, specificity) of the most specific ROC operating point whose
    sensitivity is >= `sensitivity` (the mirror image of `roc_point_at_specificity`)."""
    require_both_classes(y, "specificity at sensitivity")
    fpr, tpr, thresholds = roc_curve(y, score, drop_intermediate=False)
    i = np.flatnonzero(tpr >= sensitivity - sys.float_info.epsilon)[0]  # tpr[-1] == 1: always one
    return float(thresholds[i]), float(tpr[i]), float(1 - fpr[i])
