"""Metrics, `metrics.json` and report plots for a trained classifier.

Everything here reads a `TaskSpec`: single- vs multi-label, the positive and referral classes,
and which challenge metrics (`spec.extra_metrics`, keys of `EXTRA_METRICS`) a task reports.
All metric arithmetic is scikit-learn's; this module only selects columns, thresholds
probabilities and turns undefined values (a class absent from `y_true`, ...) into `None` with a
note in `metrics["notes"]`, so a small or unbalanced test set never crashes a report.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from matplotlib.figure import Figure
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from eyeray import storage
from eyeray.tasks import TaskSpec

METRICS_FILE = "metrics.json"
CURVES_PNG = "curves.png"
CONFUSION_PNG = "confusion_matrix.png"
ROC_PNG = "roc.png"
SAMPLES_PNG = "samples.png"

DEFAULT_THRESHOLD = 0.5  # multi-label decision threshold, as in the ODIR-2019 evaluation code
PAUC_MAX_FPR = 0.1  # AIROGS alpha: partial AUC over 90-100 % specificity
TARGET_SPECIFICITY = 0.95  # AIROGS beta: sensitivity at 95 % specificity
SAMPLES_PER_ROW = 6


class UndefinedMetric(ValueError):
    """The data cannot define this metric (e.g. only one class in y_true); the message says why."""


# ---------------------------------------------------------------------------------------------
# Inputs and decisions


def _check(spec: TaskSpec, y_true, probs) -> tuple[np.ndarray, np.ndarray]:
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


def _thresholds(spec: TaskSpec, thresholds: Sequence[float] | float | None) -> np.ndarray:
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
    """0/1 (n, C) predictions: argmax one-hot, or multi-label `probs > threshold`.

    Strictly greater, as the official ODIR-2019 evaluation (`pr > th`) does.
    """
    p = np.asarray(probs, dtype=float)
    t = _thresholds(spec, thresholds)
    if spec.multi_label:
        return (p > t).astype(int)
    return np.eye(spec.num_classes, dtype=int)[p.argmax(axis=1)]


def _positive_index(spec: TaskSpec) -> int:
    """The score column of a binary task: spec.positive_class, else the last class."""
    return spec.class_index(spec.positive_class) if spec.positive_class else spec.num_classes - 1


def _positive_case(spec: TaskSpec, y_true, probs) -> tuple[np.ndarray, np.ndarray]:
    y, p = _check(spec, y_true, probs)
    k = _positive_index(spec)
    return y[:, k], p[:, k]


def _referral_case(spec: TaskSpec, y_true, probs) -> tuple[np.ndarray, np.ndarray]:
    """'Any referral class present' vs the rest, scored by the summed referral probability."""
    if not spec.referral_classes:
        raise ValueError(f"{spec.name} has no referral_classes, so it has no referral metric")
    y, p = _check(spec, y_true, probs)
    cols = [spec.class_index(c) for c in spec.referral_classes]
    return y[:, cols].max(axis=1), p[:, cols].sum(axis=1)


def _flat_case(spec: TaskSpec, y_true, probs, thresholds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The n*C flattened labels, scores and decisions the ODIR-2019 score is computed on."""
    y, p = _check(spec, y_true, probs)
    return y.ravel(), p.ravel(), decisions(spec, p, thresholds).ravel()


def _require_both_classes(y: np.ndarray, what: str) -> None:
    positives = int(np.sum(y))
    if positives in (0, len(y)):
        raise UndefinedMetric(
            f"{what} needs positive and negative cases in y_true; it has {positives} positive of {len(y)}"
        )


# ---------------------------------------------------------------------------------------------
# Binary building blocks (all scikit-learn)


def binary_auc(y: np.ndarray, score: np.ndarray, what: str = "AUC") -> float:
    _require_both_classes(y, what)
    return float(roc_auc_score(y, score))


def roc_point_at_specificity(y: np.ndarray, score: np.ndarray, specificity: float) -> tuple[float, float, float]:
    """(threshold, sensitivity, specificity) of the most sensitive ROC operating point whose
    specificity is >= `specificity`; cases with `score >= threshold` are positive.

    No interpolation between operating points: this is the AIROGS evaluation's
    `screening_sens_at_spec` (github.com/qurAI-amsterdam/airogs-evaluation, evaluation.py), which
    takes the last `roc_curve(drop_intermediate=False)` point with 1 - fpr >= spec - machine eps.
    The threshold is infinite when only "nobody positive" reaches the specificity.
    """
    _require_both_classes(y, "sensitivity at specificity")
    fpr, tpr, thresholds = roc_curve(y, score, drop_intermediate=False)
    i = np.flatnonzero((1 - fpr) >= specificity - sys.float_info.epsilon)[-1]  # fpr[0] == 0: always one
    return float(thresholds[i]), float(tpr[i]), float(1 - fpr[i])


def roc_point_at_sensitivity(y: np.ndarray, score: np.ndarray, sensitivity: float) -> tuple[float, float, float]:
    """(threshold, sensitivity, specificity) of the most specific ROC operating point whose
    sensitivity is >= `sensitivity` (the mirror image of `roc_point_at_specificity`)."""
    _require_both_classes(y, "specificity at sensitivity")
    fpr, tpr, thresholds = roc_curve(y, score, drop_intermediate=False)
    i = np.flatnonzero(tpr >= sensitivity - sys.float_info.epsilon)[0]  # tpr[-1] == 1: always one
    return float(thresholds[i]), float(tpr[i]), float(1 - fpr[i])


def sensitivity_at_specificity(y: np.ndarray, score: np.ndarray, specificity: float) -> float:
    """Highest sensitivity among ROC operating points whose specificity is >= `specificity`."""
    return roc_point_at_specificity(y, score, specificity)[1]


# ---------------------------------------------------------------------------------------------
# Task-level extra metrics: the keys a TaskSpec lists in `extra_metrics`.
# Each takes (spec, y_true, probs, thresholds=None) and raises UndefinedMetric when the data
# cannot define it; compute_metrics turns that into None plus a note.


def urgent_referral_auc(spec: TaskSpec, y_true, probs, thresholds=None) -> float:
    """ROC AUC of 'refer' (any of spec.referral_classes) vs the rest (Kermany et al. 2018)."""
    return binary_auc(*_referral_case(spec, y_true, probs), what="referral AUC")


def pauc_90_100(spec: TaskSpec, y_true, probs, thresholds=None) -> float:
    """AIROGS alpha: McClish-standardised partial AUC over FPR 0..0.1 (90-100 % specificity).

    Matches the AIROGS evaluation, `metrics.roc_auc_score(y_true, y_pred, max_fpr=1 - 0.9)`
    (github.com/qurAI-amsterdam/airogs-evaluation, evaluation.py `screening_partial_auc`):
    0.5 is chance and 1 perfect, not the raw area (which would be at most 0.1).
    """
    y, score = _positive_case(spec, y_true, probs)
    _require_both_classes(y, "partial AUC")
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

    Micro-averaged over both label values, so it equals the flattened accuracy; kept exactly as
    the official evaluation code computes it so scores compare with the ODIR leaderboard.
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
    labels = list(range(spec.num_classes))
    return float(roc_auc_score(y.argmax(axis=1), p, multi_class="ovr", average="macro", labels=labels))


def _summary(spec: TaskSpec, y, p, d, thresholds, mcm, notes) -> dict[str, Any]:
    """accuracy, auc and confusion_matrix: the part that differs between single and multi-label."""
    if spec.multi_label:
        return {
            "accuracy": float(accuracy_score(y.ravel(), d.ravel())),  # label-wise (flattened)
            "auc": _guarded("auc", notes, odir_auc, spec, y, p, thresholds),
            "confusion_matrix": mcm.tolist(),  # per label [[tn, fp], [fn, tp]], spec.classes order
            "thresholds": [float(t) for t in _thresholds(spec, thresholds)],
        }
    true_idx, pred_idx = y.argmax(axis=1), d.argmax(axis=1)
    return {
        "accuracy": float(accuracy_score(true_idx, pred_idx)),
        "auc": _guarded("auc", notes, _single_label_auc, spec, y, p),
        "confusion_matrix": confusion_matrix(true_idx, pred_idx, labels=range(spec.num_classes)).tolist(),
    }


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


def compute_metrics(
    spec: TaskSpec, y_true, probs, thresholds: Sequence[float] | float | None = None, decided=None
) -> dict[str, Any]:
    """All metrics for one evaluation set, as a JSON-serialisable dict (the metrics.json body).

    y_true: (n, C) one-hot or multi-hot; probs: (n, C) model outputs. `thresholds` (per label,
    or one for all) only applies to multi-label tasks; single-label tasks decide by argmax.
    `decided`: (n, C) 0/1 decisions made elsewhere (a bundle's operating point) to score instead
    of those; the ranking metrics (AUCs) still come from `probs`.
    Undefined values are None, and `notes[<key path>]` says why.
    """
    y, p = _check(spec, y_true, probs)
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
    out["notes"] = notes
    return out


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib Figure objects, no pyplot state: safe in Ray workers and headless)


def _save(fig: Figure, path: str | Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight", facecolor="white")


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, row in enumerate(history, start=1):
        value = row.get(key)
        if value is not None and math.isfinite(float(value)):
            xs.append(float(row.get("epoch", i)))
            ys.append(float(value))
    return xs, ys


def _phase_changes(history: list[dict]) -> list[tuple[float, str]]:
    """(x between the two epochs, new phase) wherever the training phase changes."""
    changes = []
    for i in range(1, len(history)):
        before, after = history[i - 1].get("phase"), history[i].get("phase")
        if before and after and before != after:
            x0 = float(history[i - 1].get("epoch", i))
            x1 = float(history[i].get("epoch", i + 1))
            changes.append(((x0 + x1) / 2, after))
    return changes


def plot_history(history: list[dict], path: str | Path) -> None:
    """Training vs validation accuracy and loss per epoch, with phase changes marked."""
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    epochs = sorted({float(row.get("epoch", i)) for i, row in enumerate(history, start=1)})
    for ax, metric, label in ((axes[0], "accuracy", "Accuracy"), (axes[1], "loss", "Loss")):
        plotted = False
        for key, name, style in ((metric, "training", "o-"), (f"val_{metric}", "validation", "s--")):
            xs, ys = _series(history, key)
            if xs:
                ax.plot(xs, ys, style, label=name, markersize=4)
                plotted = True
        for x, phase in _phase_changes(history):
            ax.axvline(x, color="grey", linestyle=":", linewidth=1.5, label=f"{phase.replace('_', '-')} starts")
        ax.set(title=f"{label} per epoch", xlabel="Epoch", ylabel=label)
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
        if plotted:
            ax.legend(loc="best")
        else:
            ax.text(0.5, 0.5, "not reported", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("Training curves")
    _save(fig, path)


def _percent_labels(display: ConfusionMatrixDisplay, cm: np.ndarray) -> None:
    """Add each cell's share of its true-class row (a per-class sensitivity read-out)."""
    rows = cm.sum(axis=1, keepdims=True)
    for (i, j), text in np.ndenumerate(display.text_):
        share = f"\n({100 * cm[i, j] / rows[i, 0]:.0f}%)" if rows[i, 0] else ""
        text.set_text(f"{cm[i, j]}{share}")


def plot_confusion(spec: TaskSpec, y_true, probs, path: str | Path, thresholds=None) -> None:
    """Counts (and row %) per true/predicted class; a grid of 2x2 matrices for multi-label."""
    y, p = _check(spec, y_true, probs)
    d = decisions(spec, p, thresholds)
    if spec.multi_label:
        fig = _multilabel_confusion_figure(spec, y, d, _thresholds(spec, thresholds))
    else:
        cm = confusion_matrix(y.argmax(axis=1), d.argmax(axis=1), labels=range(spec.num_classes))
        size = 3 + 0.9 * spec.num_classes
        fig = Figure(figsize=(size + 1, size))
        ax = fig.subplots()
        display = ConfusionMatrixDisplay(cm, display_labels=list(spec.classes))
        display.plot(ax=ax, cmap="Blues", values_format="d", colorbar=True)
        _percent_labels(display, cm)
        ax.set(xlabel="Predicted class", ylabel="True class")
        ax.set_title(f"Confusion matrix (n={len(y)})\n{spec.title}", fontsize=10)
    _save(fig, path)


def _multilabel_confusion_figure(spec: TaskSpec, y, d, thresholds) -> Figure:
    cols = min(4, spec.num_classes)
    rows = math.ceil(spec.num_classes / cols)
    fig = Figure(figsize=(3.2 * cols, 3.1 * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for k, (ax, name, cm) in enumerate(zip(axes, spec.classes, multilabel_confusion_matrix(y, d))):
        display = ConfusionMatrixDisplay(cm, display_labels=["absent", "present"])
        display.plot(ax=ax, cmap="Blues", values_format="d", colorbar=False)
        _percent_labels(display, cm)
        ax.set_title(f"{name} (threshold {thresholds[k]:.2f})", fontsize=10)
        ax.set(xlabel="Predicted", ylabel="True")
    for ax in axes[spec.num_classes :]:
        ax.set_axis_off()
    fig.suptitle(f"Per-label confusion matrices (n={len(y)})\n{spec.title}", fontsize=11)
    return fig


def _roc_line(ax, y, score, label: str, **style) -> None:
    """One ROC curve with its AUC in the legend; an undefined curve is listed, not drawn."""
    try:
        auc = binary_auc(y, score)
    except UndefinedMetric:
        ax.plot([], [], " ", label=f"{label}: undefined (one class only)")
        return
    fpr, tpr, _ = roc_curve(y, score)
    ax.plot(fpr, tpr, label=f"{label} (AUC {auc:.3f})", **style)


def plot_roc(spec: TaskSpec, y_true, probs, path: str | Path) -> None:
    """One-vs-rest ROC per class (binary: the positive class), plus the referral curve."""
    y, p = _check(spec, y_true, probs)
    fig = Figure(figsize=(7, 6.3))
    ax = fig.subplots()
    binary = spec.num_classes == 2 and not spec.multi_label
    shown = [_positive_index(spec)] if binary else range(spec.num_classes)
    for k in shown:
        _roc_line(ax, y[:, k], p[:, k], spec.classes[k], linewidth=1.8)
    if len(spec.referral_classes) > 1:  # with one class it is that class's curve
        label = "Refer: " + " or ".join(spec.referral_classes)
        _roc_line(ax, *_referral_case(spec, y, p), label, color="black", linestyle="--", linewidth=2.2)
    ax.plot([0, 1], [0, 1], color="lightgrey", linestyle=":", label="chance (AUC 0.500)")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal",
           xlabel="False positive rate (1 \u2212 specificity)", ylabel="True positive rate (sensitivity)")
    ax.set_title(f"ROC curves, each class vs the rest (n={len(y)})\n{spec.title}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    _save(fig, path)


def _show_image(ax, image) -> None:
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None)


def plot_samples(samples: dict[str, list[np.ndarray]], path: str | Path) -> None:
    """A grid with one row per class (up to SAMPLES_PER_ROW images), class names as row labels."""
    rows = [(name, [np.asarray(img) for img in list(images)[:SAMPLES_PER_ROW]]) for name, images in samples.items()]
    if not rows or not any(images for _, images in rows):
        raise ValueError("plot_samples needs at least one image")
    cols = max(len(images) for _, images in rows)
    aspect = float(np.median([img.shape[0] / img.shape[1] for _, images in rows for img in images]))
    cell = 1.9
    fig = Figure(figsize=(cell * cols + 1, (cell * min(max(aspect, 0.4), 1.5) + 0.15) * len(rows) + 0.6))
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, (name, images) in enumerate(rows):
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images):
                _show_image(ax, images[c])
            else:
                ax.set_axis_off()
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=12, labelpad=10)
    fig.suptitle("Sample images per class")
    _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Report


def _jsonable(obj: Any) -> Any:
    """numpy scalars/arrays to plain Python, NaN/inf to None, so json.dump(allow_nan=False) works."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _ordered_samples(spec: TaskSpec, samples: dict[str, list]) -> dict[str, list]:
    """Rows in spec.classes order (then any other keys), skipping empty classes."""
    names = [c for c in spec.classes if c in samples] + [c for c in samples if c not in spec.classes]
    return {name: samples[name] for name in names if len(samples[name])}


def _write_local(spec: TaskSpec, out: Path, *, y_true, probs, history, samples, extra, thresholds, sections,
                 extra_plots) -> dict:  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    metrics = compute_metrics(spec, y_true, probs, thresholds)
    plot_confusion(spec, y_true, probs, out / CONFUSION_PNG, thresholds)
    plot_roc(spec, y_true, probs, out / ROC_PNG)
    plots = [CONFUSION_PNG, ROC_PNG]
    if history:
        plot_history(history, out / CURVES_PNG)
        plots.append(CURVES_PNG)
        metrics["history"] = _jsonable(history)
    samples = _ordered_samples(spec, samples or {})
    if samples:
        plot_samples(samples, out / SAMPLES_PNG)
        plots.append(SAMPLES_PNG)
    for name, draw in (extra_plots or {}).items():
        draw(out / name)
        plots.append(name)
    metrics.update(_jsonable(sections or {}))
    if extra:
        metrics["run"] = _jsonable(extra)
    metrics["plots"] = plots
    tmp = out / f".{METRICS_FILE}.tmp"
    tmp.write_text(json.dumps(metrics, indent=2, allow_nan=False))
    os.replace(tmp, out / METRICS_FILE)  # written last and atomically: its presence means done
    return metrics


def write_report(
    spec: TaskSpec,
    out_dir: str | Path,
    *,
    y_true,
    probs,
    history: list[dict] | None = None,
    samples: dict[str, list[np.ndarray]] | None = None,
    extra: dict | None = None,
    thresholds: Sequence[float] | float | None = None,
    sections: dict[str, Any] | None = None,
    extra_plots: dict[str, Callable[[Path], None]] | None = None,
) -> dict:
    """Write metrics.json plus the PNGs there are inputs for into `out_dir` (local or s3://).

    metrics.json is compute_metrics' dict plus `history` (if given), the top-level `sections`
    (e.g. calibration), `run` (= `extra`, as given) and `plots` (the PNG names written, including
    `extra_plots`: file name -> a function that draws that PNG at the path it is given). It is
    written last, so a reader that sees it sees the whole report. Returns that dict.
    """
    kwargs = dict(y_true=y_true, probs=probs, history=history, samples=samples, extra=extra,
                  thresholds=thresholds, sections=sections, extra_plots=extra_plots)
    if not storage.is_remote(str(out_dir)):
        return _write_local(spec, Path(str(out_dir).removeprefix("file://")), **kwargs)
    with tempfile.TemporaryDirectory(prefix="eyeray-report-") as tmp:
        metrics = _write_local(spec, Path(tmp), **kwargs)
        storage.publish_dir(tmp, str(out_dir), commit_file=METRICS_FILE)
    return metrics
