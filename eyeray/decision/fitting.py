"""The decisions a training run fits on its validation split: calibration, then the operating
point on the calibrated outputs. The training driver hands the result on to the manifest and to
the report (eyeray.evaluation.deployed)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from eyeray.decision import calibration, operating_points
from eyeray.decision.roc import UndefinedMetric
from eyeray.tasks import TaskSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decisions:
    calibration: dict[str, Any]  # eyeray.decision.calibration parameters
    operating_point: dict[str, Any] | None  # None: the validation data could not choose one
    note: str | None = None  # why there is no operating point


def fit(spec: TaskSpec, y_val: np.ndarray, p_val: np.ndarray, confidence: float | None) -> Decisions:
    """Calibration and the operating point (its rate target met with `confidence`; None: on the
    point estimate). Data too small to choose an operating point leaves it out with a note
    instead of failing a finished run."""
    params = calibration.fit(y_val, p_val, spec.multi_label, spec.classes)
    try:
        op = operating_points.choose(spec, y_val, calibration.apply(params, p_val), confidence=confidence)
    except UndefinedMetric as exc:
        return Decisions(params, None, f"not chosen: {exc}")
    certified = op.get("certified")
    if certified:
        (log.info if certified["meets_target"] else log.warning)(f"operating point: {certified['statement']}")
    return Decisions(params, op)
