"""The one decision layer: a model's probabilities -> calibrated probabilities, labels, referral,
confidence and the review flag, by the bundle's manifest, and no answer at all where the gate
(`eyeray.decision.gate`) declines the image. Training's report, batch scoring, serving, `eyeray
explain`, ensembles and sweeps all decide through `decide`, so one case gets the same answer on
every route."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from eyeray.decision import calibration
from eyeray.decision.gate import Verdict
from eyeray.decision.operating_points import (
    decisions,
    fixed_point,
    referral,
    summary,
    with_override,
)

DEFAULT_REVIEW_BELOW = 0.6  # a calibrated confidence below this sends the case to human review


def confidence(probs, multi_label: bool) -> np.ndarray:
    """How sure the calibrated model is of its whole answer, per case (n,): the top class's
    probability (single-label); for multi-label, its least sure label, min_k max(p_k, 1 - p_k),
    since one uncertain label makes the case uncertain."""
    p = np.asarray(probs, np.float64)
    if len(p) == 0:
        return np.zeros(0, np.float64)
    return np.maximum(p, 1.0 - p).min(axis=1) if multi_label else p.max(axis=1)


@dataclass
class Decision:
    probabilities: np.ndarray  # (n, classes) calibrated when the manifest has a calibration
    labels: list[list[str]]  # class names decided per case; none where the gate declined
    referral: np.ndarray | None  # bool (n,), False where declined; None: the task has no referral rule
    operating_point: dict[str, Any] | None  # the point used (with any override), for the output rows
    multi_label: bool = False
    review_below: float = DEFAULT_REVIEW_BELOW
    gate: Verdict | None = field(default=None)  # None: no verdict asked for (the same as "no gate")

    def __post_init__(self):
        if self.gate is None:
            self.gate = Verdict.absent(len(self.labels))

    @property
    def declined(self) -> np.ndarray:
        """bool (n,): the gate declined the image (out of distribution or ungradable): no answer."""
        return self.gate.declined

    def confidence(self) -> np.ndarray:
        return confidence(self.probabilities, self.multi_label)

    def needs_review(self) -> np.ndarray:
        """Unsure answers and declined images: both go to a person."""
        return (self.confidence() < self.review_below) | self.declined

    def answer(self, i: int, classes: Sequence[str]) -> dict[str, Any]:
        """Case `i` as JSON: what the API, `eyeray explain` and the scoring rows all say. A declined
        case has status "declined", no labels, probabilities, confidence or referral, and the gate's reason."""
        gate = self.gate.answer(i)
        if self.declined[i]:
            return {
                "status": "declined",
                "labels": [],
                "label": None,
                "probabilities": {},
                "referral": None,
                "confidence": None,
                "needs_review": True,
                "operating_point": summary(self.operating_point),
                "gate": gate,
            }
        sure = float(self.confidence()[i])
        return {
            "status": "ok",
            "labels": list(self.labels[i]),
            "label": None if self.multi_label else (self.labels[i][0] if self.labels[i] else None),
            "probabilities": {c: float(p) for c, p in zip(classes, self.probabilities[i])},
            "referral": None if self.referral is None else bool(self.referral[i]),
            "confidence": sure,
            "needs_review": sure < self.review_below,
            "operating_point": summary(self.operating_point),
            "gate": gate,
        }


def gated(decision: Decision, verdict: Verdict | None) -> Decision:
    """`decision` with the gate's `verdict` applied: a declined case keeps no label and no referral."""
    if verdict is None:
        return decision
    keep = ~verdict.declined
    labels = [row if k else [] for row, k in zip(decision.labels, keep)]
    refer = None if decision.referral is None else decision.referral & keep
    return replace(decision, labels=labels, referral=refer, gate=verdict)


def decide(
    manifest: dict[str, Any],
    probs,
    thresholds=None,
    review_below: float = DEFAULT_REVIEW_BELOW,
    verdict: Verdict | None = None,
) -> Decision:
    """The model's probabilities (n, classes) -> a Decision, by the manifest's calibration and
    operating point, with `thresholds` (a user override) when given; the cases the gate's `verdict`
    declines get no label and no referral.

    A bundle without an operating point (trained before there were any) decides at
    `operating_points.fixed_point`: argmax, or its per-label thresholds.
    """
    calibrated = calibration.apply(manifest.get("calibration"), probs)
    chosen, multi = manifest.get("operating_point"), bool(manifest["multi_label"])
    if chosen is None and thresholds is not None:
        raise ValueError("this bundle has no operating point, so it has no thresholds to override")
    op = (
        with_override(chosen, thresholds)
        if chosen is not None
        else fixed_point(
            manifest["classes"],
            multi,
            manifest.get("referral_classes") or (),
            manifest["thresholds"] if multi else None,
        )
    )
    labels = [[c for c, hit in zip(manifest["classes"], row) if hit] for row in decisions(op, calibrated)]
    decision = Decision(calibrated, labels, referral(op, calibrated), op if chosen else None, multi, review_below)
    return gated(decision, verdict)


def explained_class(decision, row: int, classes: Sequence[str]) -> int:
    """The decided label the model is most sure of; with none decided, its most probable class."""
    probs = decision.probabilities[row]
    decided = [list(classes).index(c) for c in decision.labels[row]]
    return max(decided, key=lambda k: probs[k]) if decided else int(np.argmax(probs))


def referral_by_label(manifest: dict[str, Any], labels: list[list[str]]) -> np.ndarray | None:
    """Refer when a decided label is one of the manifest's referral classes; None: no such classes."""
    refer = set(manifest.get("referral_classes") or [])
    return np.array([bool(refer & set(row)) for row in labels], bool) if refer else None
