"""Report plots: matplotlib `Figure` objects, no pyplot state, so they are safe in Ray workers
and on headless machines. Each function draws one PNG a clinician can read without the code."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    confusion_matrix,
    multilabel_confusion_matrix,
    roc_curve,
)

from eyeray.decision.calibration import (
    ECE_BINS,
    expected_calibration_error,
    reliability,
)
from eyeray.decision.roc import UndefinedMetric, check_labels, referral_case
from eyeray.evaluation.metrics import (
    binary_auc,
    decisions,
    label_thresholds,
    positive_index,
)
from eyeray.tasks import TaskSpec

CURVES_PNG = "curves.png"
CONFUSION_PNG = "confusion_matrix.png"
ROC_PNG = "roc.png"
SAMPLES_PNG = "samples.png"
RELIABILITY_PNG = "reliability.png"
# the confusion matrix of the decisions at the bundle's operating point (eyeray.train.driver draws it)
DEPLOYED_CONFUSION_PNG = "confusion_matrix_operating_point.png"
SAMPLES_PER_ROW = 6


def save_figure(fig: Figure, path: str | Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight", facecolor="white")


def series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
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
            xs, ys = series(history, key)
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
    save_figure(fig, path)


def _percent_labels(display: ConfusionMatrixDisplay, cm: np.ndarray) -> None:
    """Add each cell's share of its true-class row (a per-class sensitivity read-out)."""
    rows = cm.sum(axis=1, keepdims=True)
    for (i, j), text in np.ndenumerate(display.text_):
        share = f"\n({100 * cm[i, j] / rows[i, 0]:.0f}%)" if rows[i, 0] else ""
        text.set_text(f"{cm[i, j]}{share}")


def plot_confusion(spec: TaskSpec, y_true, probs, path: str | Path, thresholds=None) -> None:
    """Counts (and row %) per true/predicted class; a grid of 2x2 matrices for multi-label."""
    y, p = check_labels(spec, y_true, probs)
    d = decisions(spec, p, thresholds)
    if spec.multi_label:
        fig = _multilabel_confusion_figure(spec, y, d, label_thresholds(spec, thresholds))
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
    save_figure(fig, path)


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
    y, p = check_labels(spec, y_true, probs)
    fig = Figure(figsize=(7, 6.3))
    ax = fig.subplots()
    binary = spec.num_classes == 2 and not spec.multi_label
    shown = [positive_index(spec)] if binary else range(spec.num_classes)
    for k in shown:
        _roc_line(ax, y[:, k], p[:, k], spec.classes[k], linewidth=1.8)
    if len(spec.referral_classes) > 1:  # with one class it is that class's curve
        label = "Refer: " + " or ".join(spec.referral_classes)
        _roc_line(ax, *referral_case(spec, y, p), label, color="black", linestyle="--", linewidth=2.2)
    ax.plot([0, 1], [0, 1], color="lightgrey", linestyle=":", label="chance (AUC 0.500)")
    ax.set(
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
        aspect="equal",
        xlabel="False positive rate (1 \u2212 specificity)",
        ylabel="True positive rate (sensitivity)",
    )
    ax.set_title(f"ROC curves, each class vs the rest (n={len(y)})\n{spec.title}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    save_figure(fig, path)


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
    save_figure(fig, path)


def plot_reliability(
    y_true, before, after, multi_label: bool, path: str | Path, title: str = "", bins: int = ECE_BINS
) -> None:
    """Reliability diagram, model output vs calibrated, with the cases per bin underneath."""
    fig = Figure(figsize=(6.4, 8.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], color="lightgrey", linestyle=":", label="perfectly calibrated")
    width = 1.0 / bins
    for name, probs, style, shift in (("model output", before, "o--", -0.2), ("calibrated", after, "s-", 0.2)):
        r = reliability(y_true, probs, multi_label, bins)
        used = r["count"] > 0
        ece = expected_calibration_error(y_true, probs, multi_label, bins)
        top.plot(r["confidence"][used], r["frequency"][used], style, label=f"{name} (ECE {ece:.3f})", markersize=5)
        centres = r["edges"][:-1] + width / 2 + shift * width
        bottom.bar(centres, r["count"], width=0.4 * width, label=name)
    what = "label present" if multi_label else "top class correct"
    top.set(xlim=(0, 1.01), ylim=(-0.01, 1.03), ylabel=f"Observed frequency ({what})")
    top.set_title(f"Reliability diagram, {bins} equal-width bins (n={len(np.asarray(y_true))})\n{title}", fontsize=10)
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=9)
    bottom.set(xlabel="Predicted probability" if multi_label else "Confidence (top-class probability)", ylabel="Cases")
    save_figure(fig, path)
