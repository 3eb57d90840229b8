"""Confidence intervals of the test metrics: the test sets are small, so a point estimate alone
overstates what is known (an accuracy of 0.95 on 40 images is anywhere from about 0.88 to 1.0).

A percentile bootstrap over the test images: draw the images with replacement as often as there
are, recompute every scalar metric (`eyeray.evaluation.metrics.scalar_metrics`, the same arithmetic
as metrics.json) and take the 2.5th and 97.5th percentiles. A resample on which a metric is
undefined (no positive case drawn for an AUC) is skipped for that metric, and the number of
resamples each interval rests on is reported with it. Seeded, so a report is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from eyeray.decision.roc import check_labels
from eyeray.evaluation.metrics import scalar_metrics
from eyeray.tasks import TaskSpec

RESAMPLES = 1000
CONFIDENCE = 0.95


def confidence_intervals(
    spec: TaskSpec,
    y_true,
    probs,
    thresholds: Sequence[float] | float | None = None,
    *,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> dict[str, Any]:
    """Point estimates and percentile-bootstrap intervals of `scalar_metrics` on one labelled set.

    Returns the metrics.json section: the method, its settings, `n` and per metric `{"value",
    "low", "high", "resamples"}` (`resamples`: how many resamples defined the metric; `low` and
    `high` are None when none did)."""
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"need resamples >= 1 and 0 < confidence < 1; got {resamples} and {confidence}")
    y, p = check_labels(spec, y_true, probs)
    point = scalar_metrics(spec, y, p, thresholds)
    draws: dict[str, list[float]] = {key: [] for key in point}
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        rows = rng.integers(0, len(y), len(y))
        for key, value in scalar_metrics(spec, y[rows], p[rows], thresholds).items():
            if value is not None:
                draws[key].append(value)
    tail = 100 * (1 - confidence) / 2
    metrics = {}
    for key, value in point.items():
        low, high = np.percentile(draws[key], [tail, 100 - tail]) if draws[key] else (None, None)
        metrics[key] = {
            "value": value,
            "low": None if low is None else float(low),
            "high": None if high is None else float(high),
            "resamples": len(draws[key]),
        }
    return {
        "method": "percentile bootstrap over test images",
        "confidence": confidence,
        "resamples": resamples,
        "seed": seed,
        "n": len(y),
        "metrics": metrics,
    }
