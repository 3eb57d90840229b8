"""Combining several bundles of one task: averaged probabilities or majority vote.

The glaucoma seed's "average" ensemble is `mean`; its majority vote is `vote`. Both work on the
bundles' outputs (not their features), so any trained bundles of the same task combine, whatever
their backbone or input size. Each member is calibrated by its own manifest first, so members
speak the same probability scale before they are averaged. Shared by batch scoring and the
model-selection sweep.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from eyeray.decision import calibration, operating_points
from eyeray.decision.decide import (
    DEFAULT_REVIEW_BELOW,
    Decision,
    decide,
    gated,
    referral_by_label,
)
from eyeray.decision.gate import Verdict

METHODS = ("mean", "vote")


def combine(
    manifests: list[dict[str, Any]],
    probabilities: list[np.ndarray],
    method: str = "mean",
    thresholds=None,
    review_below: float = DEFAULT_REVIEW_BELOW,
    verdict: Verdict | None = None,
) -> Decision:
    """Per-model probabilities (each n x classes, as the models output them) -> one Decision,
    through `eyeray.decision.decide` (one member, or the averaged ensemble) or its members' votes.

    mean: the average of the members' calibrated probabilities, decided at the members' averaged
    operating point (`operating_points.mean_operating_point`; without one, at the mean thresholds).
    vote: each member decides at its own operating point; the probabilities are vote shares;
    single-label picks the most votes (ties: the higher mean probability), multi-label keeps a
    label more than half of the members predict; referral follows the voted labels.
    `thresholds` overrides the operating point (of every member, for vote). `verdict`: the gate's
    (`eyeray.decision.gate.combine` of the members'); what it declines gets no label.
    """
    if method not in METHODS:
        raise ValueError(f"unknown ensemble method {method!r}: choose one of {', '.join(METHODS)}")
    if len(probabilities) == 1:
        return decide(manifests[0], probabilities[0], thresholds, review_below, verdict)
    first, multi = manifests[0], bool(manifests[0]["multi_label"])
    calibrated = [calibration.apply(m.get("calibration"), p) for m, p in zip(manifests, probabilities)]
    mean = np.mean(calibrated, axis=0).astype(np.float32)
    if method == "mean":
        merged = {
            **first,
            "calibration": calibration.IDENTITY,
            "thresholds": np.mean([m["thresholds"] for m in manifests], axis=0).tolist(),
            "operating_point": operating_points.mean_operating_point(manifests),
        }
        return decide(merged, mean, thresholds, review_below, verdict)
    classes = list(first["classes"])
    members = [decide(m, p, thresholds) for m, p in zip(manifests, probabilities)]
    votes = np.zeros_like(mean)
    for member in members:
        for row, labels in enumerate(member.labels):
            votes[row, [classes.index(label) for label in labels]] += 1
    share = votes / len(members)
    if multi:
        labels = [[c for c, s in zip(classes, row) if s > 0.5] for row in share]
    else:
        # Shares move in steps of 1/k; the mean probability (at most 1) scaled below that step breaks ties only.
        labels = [[classes[int(i)]] for i in np.argmax(share + mean / (2 * len(members)), axis=1)]
    op = {"rule": "vote", "members": [operating_points.summary(m.operating_point) for m in members]}
    return gated(Decision(share, labels, referral_by_label(first, labels), op, multi, review_below), verdict)
