"""Post-hoc calibration of a trained classifier's probabilities, fitted on the validation split.

Deep networks trained to low loss are over-confident (Guo et al. 2017): a "0.99" is right far
less often than 99 % of the time, which is what a clinician reading the number assumes. Fixes that
keep the model's ranking (so AUC and the argmax stay the same):

- single-label (softmax): temperature scaling, `softmax(log p / T)`; one T for all classes.
  `log p` equals the logits up to a per-row constant, which softmax ignores, so this works from
  the probabilities the bundle outputs.
- multi-label (sigmoid): Platt scaling per label, `sigmoid(a_k * logit(p_k) + b_k)`, with Platt's
  smoothed targets, which keep a label with few positives from being pushed to 0 or 1. A label
  with only one outcome in the validation data stays as it is (and is named in `notes`).

Parameters are plain JSON for the bundle manifest. ECE uses `ECE_BINS` (15, as Guo et al.)
equal-width confidence bins.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import minimize, minimize_scalar

TEMPERATURE_BOUNDS = (0.05, 20.0)
SLOPE_BOUNDS = (1e-3, 100.0)  # a > 0: calibration never reverses a label's ranking
EPS = 1e-12
ECE_BINS = 15  # equal-width confidence bins, as Guo et al. 2017
IDENTITY: dict[str, Any] = {"method": "none"}


def _log_probs(probs) -> np.ndarray:
    return np.log(np.clip(np.asarray(probs, np.float64), EPS, 1.0))


def _logit(probs) -> np.ndarray:
    p = np.clip(np.asarray(probs, np.float64), EPS, 1.0 - EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow warnings for large |z|


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(y_true, probs, multi_label: bool) -> float:
    """Mean negative log-likelihood: categorical (single-label) or binary summed over labels."""
    y = np.asarray(y_true, np.float64)
    if multi_label:
        p = np.clip(np.asarray(probs, np.float64), EPS, 1.0 - EPS)
        return float(-np.mean(np.sum(y * np.log(p) + (1 - y) * np.log1p(-p), axis=1)))
    return float(-np.mean(np.sum(y * _log_probs(probs), axis=1)))


# ---------------------------------------------------------------------------------------------
# Fit and apply


def smoothed_targets(y_true) -> np.ndarray:
    """Platt's targets, generalised to K classes: a case's true class gets (n_c + 1) / (n_c + 2),
    n_c the validation count of that class, the other classes share the rest. For two classes this
    is exactly Platt (1999). Without it, perfectly separated validation data (a few dozen easy
    cases) drives T to 0 and every probability to exactly 0 or 1."""
    y = np.asarray(y_true, np.float64)
    counts = y.sum(axis=0)
    top = (y @ ((counts + 1) / (counts + 2)))[:, None]
    return y * top + (1 - y) * (1 - top) / max(y.shape[1] - 1, 1)


def fit_temperature(y_true, probs) -> float:
    """The T minimising the cross-entropy of softmax(log p / T) against the smoothed validation
    targets (a bounded 1-D search over log T)."""
    y = smoothed_targets(y_true)
    log_p = _log_probs(probs)

    def loss(log_t: float) -> float:
        return nll(y, _softmax(log_p / math.exp(log_t)), multi_label=False)

    lo, hi = (math.log(b) for b in TEMPERATURE_BOUNDS)
    return float(math.exp(minimize_scalar(loss, bounds=(lo, hi), method="bounded").x))


def fit_platt(y, probs) -> tuple[float, float]:
    """Slope and intercept of sigmoid(a * logit(p) + b) for one label (Platt 1999, smoothed targets)."""
    y = np.asarray(y, np.float64)
    z = _logit(probs)
    target = smoothed_targets(np.stack([1 - y, y], axis=1))[:, 1]

    def loss(ab: np.ndarray) -> tuple[float, np.ndarray]:
        q = np.clip(_sigmoid(ab[0] * z + ab[1]), EPS, 1 - EPS)
        value = -np.mean(target * np.log(q) + (1 - target) * np.log1p(-q))
        residual = (q - target) / len(z)
        return float(value), np.array([np.sum(residual * z), np.sum(residual)])

    result = minimize(loss, x0=np.array([1.0, 0.0]), jac=True, method="L-BFGS-B", bounds=[SLOPE_BOUNDS, (None, None)])
    return float(result.x[0]), float(result.x[1])


def fit(y_true, probs, multi_label: bool, labels: Sequence[str] | None = None) -> dict[str, Any]:
    """Calibration parameters fitted on (validation) labels and probabilities, as a JSON-ready dict."""
    y = np.asarray(y_true, np.float64)
    p = np.asarray(probs, np.float64)
    if y.shape != p.shape or y.ndim != 2 or len(y) == 0:
        raise ValueError(f"y_true and probs must both be (n, classes) with n >= 1; got {y.shape} and {p.shape}")
    if not multi_label:
        params: dict[str, Any] = {"method": "temperature", "temperature": fit_temperature(y, p)}
    else:
        params = _fit_platt_per_label(y, p, labels or [str(k) for k in range(y.shape[1])])
    after = apply(params, p)
    return {
        **params,
        "fitted_on": "validation",
        "n": len(y),
        "nll_before": nll(y, p, multi_label),
        "nll_after": nll(y, after, multi_label),
    }


def _fit_platt_per_label(y: np.ndarray, p: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    slopes, intercepts, notes = [], [], {}
    for k, name in enumerate(labels):
        if y[:, k].min() == y[:, k].max():
            notes[name] = "left uncalibrated: only one outcome in the validation data"
            a, b = 1.0, 0.0
        else:
            a, b = fit_platt(y[:, k], p[:, k])
        slopes.append(a)
        intercepts.append(b)
    params: dict[str, Any] = {"method": "platt", "slopes": slopes, "intercepts": intercepts}
    return {**params, "notes": notes} if notes else params


def apply(params: dict[str, Any] | None, probs) -> np.ndarray:
    """Calibrated probabilities (n, classes) float32 from the model's probabilities and `fit`'s params."""
    p = np.asarray(probs, np.float64)
    method = (params or IDENTITY)["method"]
    if method == "none":
        out = p
    elif method == "temperature":
        out = _softmax(_log_probs(p) / float(params["temperature"]))
    elif method == "platt":
        out = _sigmoid(np.asarray(params["slopes"]) * _logit(p) + np.asarray(params["intercepts"]))
    else:
        raise ValueError(f"unknown calibration method {method!r}; known: none, temperature, platt")
    return out.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Measuring it


def reliability(y_true, probs, multi_label: bool, bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Per equal-width bin: mean confidence, observed frequency, count.

    Single-label: the top class's probability vs whether the top class is right (Guo et al.).
    Multi-label: every (image, label) probability vs whether that label is present.
    """
    y = np.asarray(y_true, np.float64)
    p = np.asarray(probs, np.float64)
    if multi_label:
        confidence, correct = p.ravel(), y.ravel()
    else:
        top = p.argmax(axis=1)
        confidence, correct = p[np.arange(len(p)), top], y[np.arange(len(y)), top]
    which = np.clip(np.digitize(confidence, np.linspace(0, 1, bins + 1)[1:-1]), 0, bins - 1)
    count = np.bincount(which, minlength=bins).astype(np.float64)
    safe = np.maximum(count, 1)
    return {
        "confidence": np.bincount(which, confidence, bins) / safe,
        "frequency": np.bincount(which, correct, bins) / safe,
        "count": count,
        "edges": np.linspace(0, 1, bins + 1),
    }


def expected_calibration_error(y_true, probs, multi_label: bool, bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean |frequency - confidence| over `bins` equal-width bins."""
    r = reliability(y_true, probs, multi_label, bins)
    return float(np.sum(r["count"] * np.abs(r["frequency"] - r["confidence"])) / max(r["count"].sum(), 1))


def summary(y_true, before, after, multi_label: bool, bins: int = ECE_BINS) -> dict[str, Any]:
    """ECE and NLL before and after calibration on one split (for the report)."""
    return {
        "n": len(np.asarray(y_true)),
        "ece_bins": bins,
        "ece_before": expected_calibration_error(y_true, before, multi_label, bins),
        "ece_after": expected_calibration_error(y_true, after, multi_label, bins),
        "nll_before": nll(y_true, before, multi_label),
        "nll_after": nll(y_true, after, multi_label),
    }
