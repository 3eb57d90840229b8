"""Metrics for a trained classifier: what `metrics.json` holds, all scikit-learn arithmetic.

Everything here reads a `TaskSpec`: single- vs multi-label, the positive and referral classes,
and which challenge metrics (`spec.extra_metrics`, keys of `EXTRA_METRICS`) a task reports.
All metric arithmetic is scikit-learn's; this module only selects columns, thresholds
probabilities and turns undefined values (a class absent from `y_true`, ...) into `None` with a
note in `metrics["notes"]`, so a small or unbalanced test set never crashes a report.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from eyeray.decision import operating_points
from eyeray.decision.roc import (
    DEFAULT_THRESHOLD,
    TARGET_SPECIFICITY,
    UndefinedMetric,
    check_labels,
    referral_case,
    require_both_classes,
    roc_point_at_specificity,
)
from eyeray.evaluation import patients as patient_rows
from eyeray.tasks import TaskSpec

PAUC_MAX_FPR = 0.1  # AIROGS alpha: partial AUC over 90-100 % specificity


# ---------------------------------------------------------------------------------------------
# Inputs and decisions


def label_thresholds(spec: TaskSpec, thresholds: Sequence[float] | float | None) -> np.ndarray:
    """Per-label thresholds (multi-label only: single-label tasks decide by argmax)."""
    if not spec.multi_label:
        if thresholds is not None:
            raise ValueError(f"{spec.name} is single-label (argmax decisions): thresholds do not apply")
        return np.array([])
    if thresholds is None:
        thresholds = DEFAULT_THRESHOLD
    t = np.broadcast_to(np.asarray(thresholds, dtype=float), (spec.num_classes,))
    return t.copy()


def decisions(spec: TaskSpec, probs, thresholds: Sequence[float] | float | None = None) -> np.ndarray:
    """0/1 (n, C) labels of the model itself (argmax, or per label `p >= threshold`), by the one
    rule every route decides with (`eyeray.decision.operating_points.decisions`)."""
    point = operating_points.fixed_point(spec.classes, spec.multi_label, spec.referral_classes, thresholds)
    return operating_points.decisions(point, probs)


def positive_index(spec: TaskSpec) -> int:
    """The score column of a binary task: spec.positive_class, else the last class."""
    return spec.class_index(spec.positive_class) if spec.positive_class else spec.num_classes - 1


def _positive_case(spec: TaskSpec, y_true, probs) -> tuple[np.ndarray, np.ndarray]:
    y, p = check_labels(spec, y_true, probs)
    k = positive_index(spec)
    return y[:, k], p[:, k]


def _flat_case(spec: TaskSpec, y_true, probs, thresholds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The n*C flattened labels, scores and decisions the ODIR-2019 score is computed on. The
    decisions are the official evaluation's `pr > th` (ODIR_evaluation.py, `ODIR_Metrics`), not
    eyeray's `>=`: they differ on a probability of exactly the threshold (a zero logit gives 0.5)."""
    y, p = check_labels(spec, y_true, probs)
    return y.ravel(), p.ravel(), (p > label_thresholds(spec, thresholds)).astype(int).ravel()


# ---------------------------------------------------------------------------------------------
# Binary building blocks (all scikit-learn)


def binary_auc(y: np.ndarray, score: np.ndarray, what: str = "AUC") -> float:
    require_both_classes(y, what)
    return float(roc_auc_score(y, score))


def sensitivity_at_specificity(y: np.ndarray, score: np.ndarray, specificity: float) -> float:
    """Highest sensitivity among ROC operating points whose specificity is >= `specificity`."""
    return roc_point_at_specificity(y, score, specificity)[1]


# ---------------------------------------------------------------------------------------------
# Task-level extra metrics: the keys a TaskSpec lists in `extra_metrics`.
# Each takes (spec, y_true, probs, thresholds=None) and raises UndefinedMetric when the data
# cannot define it; compute_metrics turns that into None plus a note.


def urgent_referral_auc(spec: TaskSpec, y_true, probs, thresholds=None) -> float:
    """ROC AUC of 'refer' (any of spec.referral_classes) vs the rest (Kermany et al. 2018)."""
    return binary_auc(*referral_case(spec, y_true, probs), what="referral AUC")


def pauc_90_100(spec: TaskSpec, y_true, probs, thresholds=None) -> float:
    """AIROGS alpha: McClish-standardised partial AUC over FPR 0..0.1 (90-100 % specificity).

    Matches the AIROGS evaluation, `metrics.roc_auc_score(y_true, y_pred, max_fpr=1 - 0.9)`
    (github.com/qurAI-amsterdam/airogs-evaluation, evaluation.py `screening_partial_auc`):
    0.5 is chance and 1 perfect, not the raw area (which would be at most 0.1).
    """
    y, score = _positive_case(spec, y_true, probs)
    require_both_classes(y, "partial AUC")
    return float(roc_auc_score(y, score, max_fpr=PAUC_MAX_FPR))


def sens_at_95_spec(spec: TaskSpec, y_true, probs, thresholds=None) -> float:
    """AIROGS beta: sensitivity at 95 % specificity of the positive class (no interpolation)."""
    return sensitivity_at_specificity(*_positive_case(spec, y_true, probs), TARGET_SPECIFICITY)


def odir_kappa(spec: TaskSpec, y_true, probs, thresholds=None) -> float:
    """ODIR-2019: Cohen's kappa of the flattened label matrix vs the thresholded predictions."""
    y, _, d = _flat_case(spec, y_true, probs, thresholds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        kappa = float(cohen_kappa_score(y, d))
    if math.isnan(kappa):
        raise UndefinedMetric("kappa is undefined: labels and predictions are one and the same constant")
    return kappa


def odir_f1(spec: TaskSpec, y_true, probs, thresholds=None) -> float:
    """ODIR-2019 'F1': `f1_score(gt, pr > th, average='micro')` on the flattened matrix.

    Micro-averaged over both label values, so it equals the flattened accuracy; kept as the
    official evaluation code computes it (`>` included). The challenge scored one row per patient
    (both eyes); on per-eye rows this is the same formula on other rows, not a leaderboard figure.
    """
    y, _, d = _flat_case(spec, y_true, probs, thresholds)
    return float(f1_score(y, d, average="micro"))


def odir_auc(spec: TaskSpec, y_true, probs, thresholds=None) -> float:
    """ODIR-2019 AUC: `roc_auc_score` on the flattened label and probability matrices."""
    y, p, _ = _flat_case(spec, y_true, probs, thresholds)
    return binary_auc(y, p, what="flattened AUC")


def odir_score(spec: TaskSpec, y_true, probs, thresholds=None) -> float:
    """ODIR-2019 final score: the mean of kappa, F1 and AUC."""
    parts = (odir_kappa, odir_f1, odir_auc)
    return float(np.mean([f(spec, y_true, probs, thresholds) for f in parts]))


# The ODIR-2019 figures recomputed on one row per patient (`eyeray.evaluation.patients`), as the
# challenge scored them; reported beside the per-eye figures of a task whose extra_metrics include
# odir_score, when compute_metrics is given the rows' patient ids.
PER_PATIENT_METRICS: dict[str, Callable[..., float]] = {
    "odir_score_per_patient": odir_score,
    "kappa_per_patient": odir_kappa,
    "f1_per_patient": odir_f1,
    "auc_per_patient": odir_auc,
}

EXTRA_METRICS: dict[str, Callable[..., float]] = {
    "urgent_referral_auc": urgent_referral_auc,
    "pauc_90_100": pauc_90_100,
    "sens_at_95_spec": sens_at_95_spec,
    "odir_score": odir_score,
    "kappa": odir_kappa,
    "f1": odir_f1,
}


# ---------------------------------------------------------------------------------------------
# compute_metrics


def _finite(value: float, path: str, reason: str, notes: dict[str, str]) -> float | None:
    """A plain float, or None with `notes[path] = reason` when the metric is NaN."""
    value = float(value)
    if math.isfinite(value):
        return value
    notes[path] = reason
    return None


def _guarded(path: str, notes: dict[str, str], fn: Callable[..., float], *args, **kwargs) -> float | None:
    try:
        value = fn(*args, **kwargs)
    except UndefinedMetric as exc:
        notes[path] = str(exc)
        return None
    return _finite(value, path, "undefined for this data", notes)


def _single_label_auc(spec: TaskSpec, y: np.ndarray, p: np.ndarray) -> float:
    """Binary: AUC of the positive class; more classes: one-vs-rest macro AUC."""
    if spec.num_classes == 2:
        return binary_auc(*_positive_case(spec, y, p))
    absent = [c for c, count in zip(spec.classes, y.sum(axis=0)) if count == 0]
    if absent:
        raise UndefinedMetric(f"one-vs-rest AUC needs every class in y_true; absent: {', '.join(absent)}")
    # the mean of the per-class binary AUCs: scikit-learn's multi_class="ovr" macro AUC, which
    # refuses scores whose rows do not sum to 1 (an ensemble's votes, logits, rounded outputs)
    return float(np.mean([roc_auc_score(y[:, k], p[:, k]) for k in range(spec.num_classes)]))


def _accuracy(spec: TaskSpec, y, d) -> float:
    """Single-label: of the decided class; multi-label: label-wise (the flattened matrix)."""
    if spec.multi_label:
        return float(accuracy_score(y.ravel(), d.ravel()))
    return float(accuracy_score(y.argmax(axis=1), d.argmax(axis=1)))


def _auc(spec: TaskSpec, y, p, thresholds, notes) -> float | None:
    """Multi-label: the ODIR flattened AUC; single-label: `_single_label_auc`."""
    if spec.multi_label:
        return _guarded("auc", notes, odir_auc, spec, y, p, thresholds)
    return _guarded("auc", notes, _single_label_auc, spec, y, p)


def _summary(spec: TaskSpec, y, p, d, thresholds, mcm, notes) -> dict[str, Any]:
    """accuracy, auc and confusion_matrix: the part that differs between single and multi-label."""
    out = {"accuracy": _accuracy(spec, y, d), "auc": _auc(spec, y, p, thresholds, notes)}
    if spec.multi_label:
        return {
            **out,
            "confusion_matrix": mcm.tolist(),  # per label [[tn, fp], [fn, tp]], spec.classes order
            "thresholds": [float(t) for t in label_thresholds(spec, thresholds)],
        }
    true_idx, pred_idx = y.argmax(axis=1), d.argmax(axis=1)
    return {**out, "confusion_matrix": confusion_matrix(true_idx, pred_idx, labels=range(spec.num_classes)).tolist()}


def _macro_f1(spec: TaskSpec, y, d, notes) -> float | None:
    """Mean per-class F1 over the classes where F1 is defined (present or predicted)."""
    per_class = f1_score(y, d, average=None, zero_division=np.nan)
    skipped = [c for c, f in zip(spec.classes, per_class) if math.isnan(f)]
    if len(skipped) == spec.num_classes:
        notes["macro_f1"] = "undefined: no class is in y_true or predicted"
        return None
    if skipped:
        notes["macro_f1"] = f"averaged without {', '.join(skipped)} (absent from y_true and never predicted)"
    return float(f1_score(y, d, average="macro", zero_division=np.nan))


_UNDEFINED_REASON = {
    "precision": "no case was predicted as {c}",
    "recall": "no {c} case in y_true",
    "sensitivity": "no {c} case in y_true",
    "specificity": "every case in y_true is {c}",
    "f1": "{c} is neither in y_true nor predicted",
}


def _per_class(spec: TaskSpec, y, p, d, mcm, notes) -> dict[str, dict[str, Any]]:
    """One-vs-rest precision/recall/F1/support, sensitivity/specificity and AUC per class."""
    precision, recall, f1, support = precision_recall_fscore_support(
        y, d, labels=range(spec.num_classes), zero_division=np.nan
    )
    out = {}
    for k, name in enumerate(spec.classes):
        (tn, fp), _ = mcm[k]
        raw = {
            "precision": precision[k],
            "recall": recall[k],
            "f1": f1[k],
            "sensitivity": recall[k],  # sensitivity is one-vs-rest recall
            "specificity": tn / (tn + fp) if tn + fp else math.nan,
        }
        row: dict[str, Any] = {
            key: _finite(v, f"per_class.{name}.{key}", _UNDEFINED_REASON[key].format(c=name), notes)
            for key, v in raw.items()
        }
        row["support"] = int(support[k])
        row["auc"] = _guarded(f"per_class.{name}.auc", notes, binary_auc, y[:, k], p[:, k], f"{name} AUC")
        out[name] = row
    return out


def _per_patient(spec: TaskSpec, y, p, patients: Sequence[str] | np.ndarray, thresholds, notes) -> dict[str, Any]:
    """`PER_PATIENT_METRICS` on the per-patient rows, and `n_patients`; {} (and a note why) when
    a row has no patient id. {} for a task without the ODIR-2019 score."""
    if "odir_score" not in spec.extra_metrics:
        return {}
    if not patient_rows.known(patients):
        missing = sum(1 for i in patients if not str(i))
        notes["odir_score_per_patient"] = (
            f"omitted: {missing} of {len(y)} images have no patient id (the layout gave none), so the "
            "images cannot be grouped into the patients the ODIR-2019 challenge scored"
        )
        return {}
    rows = patient_rows.by_patient(y, p, patients)
    out: dict[str, Any] = {"n_patients": len(rows.ids)}
    for key, fn in PER_PATIENT_METRICS.items():
        out[key] = _guarded(key, notes, fn, spec, rows.labels, rows.probs, thresholds=thresholds)
    return out


def compute_metrics(
    spec: TaskSpec,
    y_true,
    probs,
    thresholds: Sequence[float] | float | None = None,
    decided=None,
    *,
    patients: Sequence[str] | np.ndarray | None = None,
) -> dict[str, Any]:
    """All metrics for one evaluation set, as a JSON-serialisable dict (the metrics.json body).

    y_true: (n, C) one-hot or multi-hot; probs: (n, C) model outputs. `thresholds` (per label,
    or one for all) only applies to multi-label tasks; single-label tasks decide by argmax.
    `decided`: (n, C) 0/1 decisions made elsewhere (a bundle's operating point) to score instead
    of those; the ranking metrics (AUCs) still come from `probs`.
    `patients`: the rows' (n,) patient ids, for the ODIR-2019 figures on one row per patient
    (`PER_PATIENT_METRICS`, for a task that reports odir_score), as the challenge scored them;
    where a row's id is "" they are left out and `notes["odir_score_per_patient"]` says why.
    Undefined values are None, and `notes[<key path>]` says why.
    """
    y, p = check_labels(spec, y_true, probs)
    d = decisions(spec, p, thresholds) if decided is None else np.asarray(decided, int)
    if d.shape != y.shape:
        raise ValueError(f"{spec.name}: decided must be {y.shape}; got {d.shape}")
    notes: dict[str, str] = {}
    with warnings.catch_warnings():  # undefined cases are reported in notes instead
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        mcm = multilabel_confusion_matrix(y, d)
        out: dict[str, Any] = {
            "task": spec.name,
            "classes": list(spec.classes),
            "multi_label": spec.multi_label,
            "n": len(y),
            **_summary(spec, y, p, d, thresholds, mcm, notes),
            "macro_f1": _macro_f1(spec, y, d, notes),
            "per_class": _per_class(spec, y, p, d, mcm, notes),
        }
        for key in spec.extra_metrics:
            out[key] = _guarded(key, notes, EXTRA_METRICS[key], spec, y, p, thresholds=thresholds)
        if patients is not None:
            out.update(_per_patient(spec, y, p, patients, thresholds, notes))
    out["notes"] = notes
    return out


def scalar_metrics(
    spec: TaskSpec, y_true, probs, thresholds: Sequence[float] | float | None = None
) -> dict[str, float | None]:
    """accuracy, macro_f1, auc and the task's `extra_metrics`, computed as `compute_metrics` computes
    them (None: undefined for this data), without the per-class tables and notes: what a bootstrap
    (eyeray.evaluation.bootstrap) recomputes on every resample."""
    y, p = check_labels(spec, y_true, probs)
    d = decisions(spec, p, thresholds)
    notes: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        out = {
            "accuracy": _accuracy(spec, y, d),
            "macro_f1": _macro_f1(spec, y, d, notes),
            "auc": _auc(spec, y, p, thresholds, notes),
        }
        for key in spec.extra_metrics:
            out[key] = _guarded(key, notes, EXTRA_METRICS[key], spec, y, p, thresholds=thresholds)
    return out
