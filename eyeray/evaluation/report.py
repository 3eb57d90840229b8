"""The training report: `metrics.json` plus the PNGs there are inputs for, written atomically
(metrics.json last) to a local folder or s3://, so a reader that sees it sees the whole report."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eyeray import storage
from eyeray.evaluation.metrics import compute_metrics
from eyeray.evaluation.plots import (
    CONFUSION_PNG,
    CURVES_PNG,
    ROC_PNG,
    SAMPLES_PNG,
    plot_confusion,
    plot_history,
    plot_roc,
    plot_samples,
)
from eyeray.tasks import TaskSpec

METRICS_FILE = "metrics.json"


def jsonable(obj: Any) -> Any:
    """numpy scalars/arrays to plain Python, NaN/inf to None, so json.dump(allow_nan=False) works."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
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


def _write_local(
    spec: TaskSpec, out: Path, *, y_true, probs, history, samples, extra, thresholds, sections, extra_plots, patients
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    metrics = compute_metrics(spec, y_true, probs, thresholds, patients=patients)
    plot_confusion(spec, y_true, probs, out / CONFUSION_PNG, thresholds)
    plot_roc(spec, y_true, probs, out / ROC_PNG)
    plots = [CONFUSION_PNG, ROC_PNG]
    if history:
        plot_history(history, out / CURVES_PNG)
        plots.append(CURVES_PNG)
        metrics["history"] = jsonable(history)
    samples = _ordered_samples(spec, samples or {})
    if samples:
        plot_samples(samples, out / SAMPLES_PNG)
        plots.append(SAMPLES_PNG)
    for name, draw in (extra_plots or {}).items():
        draw(out / name)
        plots.append(name)
    metrics.update(jsonable(sections or {}))
    if extra:
        metrics["run"] = jsonable(extra)
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
    patients: Sequence[str] | np.ndarray | None = None,
) -> dict:
    """Write metrics.json plus the PNGs there are inputs for into `out_dir` (local or s3://).

    metrics.json is compute_metrics' dict plus `history` (if given), the top-level `sections`
    (e.g. calibration), `run` (= `extra`, as given) and `plots` (the PNG names written, including
    `extra_plots`: file name -> a function that draws that PNG at the path it is given). It is
    written last, so a reader that sees it sees the whole report. `patients`: the rows' patient
    ids, for the per-patient ODIR-2019 figures (`compute_metrics`). Returns that dict.
    """
    kwargs = dict(
        y_true=y_true,
        probs=probs,
        history=history,
        samples=samples,
        extra=extra,
        thresholds=thresholds,
        sections=sections,
        extra_plots=extra_plots,
        patients=patients,
    )
    if not storage.is_remote(str(out_dir)):
        return _write_local(spec, Path(str(out_dir).removeprefix("file://")), **kwargs)
    with tempfile.TemporaryDirectory(prefix="eyeray-report-") as tmp:
        metrics = _write_local(spec, Path(tmp), **kwargs)
        storage.publish_dir(tmp, str(out_dir), commit_file=METRICS_FILE)
    return metrics
