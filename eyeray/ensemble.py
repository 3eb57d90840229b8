"""Combining several bundles of one task: averaged probabilities or majority vote.

The glaucoma seed's "average" ensemble is `mean`; its majority vote is `vote`. Both work on the
bundles' outputs (not their features), so any trained bundles of the same task combine, whatever
their backbone or input size. Each member is calibrated by its own manifest first, so members
speak the same probability scale before they are averaged. Shared by batch scoring and the
model-selection sweep.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from eyeray import calibration, operating_points
from eyeray.bundle import BundleError
from eyeray.operating_points import Decision

METHODS = ("mean", "vote")


def check_compatible(manifests: list[dict[str, Any]]) -> None:
    """Bundles combine only if they answer the same question: same task, same classes in order."""
    if not manifests:
        raise BundleError("no bundle given")
    first = manifests[0]
    for m in manifests[1:]:
        if (m["task"], list(m["classes"]), m["multi_label"]) != (first["task"], list(first["classes"]), first["multi_label"]):
            raise BundleError(
                f"bundles of different tasks or classes cannot be combined: {first['task']} {first['classes']} "
                f"(bundle {first['version']}) vs {m['task']} {m['classes']} (bundle {m['version']})"
            )
    versions = [m["version"] for m in manifests]
    if len(set(versions)) != len(versions):
        raise BundleError(f"the same bundle is given more than once: versions {versions}")


def version_key(manifests: list[dict[str, Any]], method: str, options: dict[str, Any] | None = None) -> str:
    """What identifies a scoring result: the bundle's version, or for an ensemble a hash of its
    members' versions and the method (so a re-run with the same bundles resumes, other ones do not).
    Non-default decision `options` (threshold override, TTA, review level) add a hash of their own:
    they change the rows, so rows made without them are not reused."""
    if len(manifests) == 1:
        key = manifests[0]["version"]
    else:
        members = ",".join(sorted(m["version"] for m in manifests))
        key = "ens-" + hashlib.sha1(f"{method}:{members}".encode()).hexdigest()[:12]
    if options:
        key += "-" + hashlib.sha1(json.dumps(options, sort_keys=True).encode()).hexdigest()[:8]
    return key


def decide(manifests: list[dict[str, Any]], probabilities: list[np.ndarray], method: str = "mean",
           thresholds=None) -> Decision:  # fmt: skip
    """Per-model probabilities (each n x classes, as the models output them) -> one Decision.

    mean: the average of the members' calibrated probabilities, decided at the members' averaged
    operating point (`operating_points.mean_operating_point`; without one, at the mean thresholds).
    vote: each member decides at its own operating point; the probabilities are vote shares;
    single-label picks the most votes (ties: the higher mean probability), multi-label keeps a
    label more than half of the members predict; referral follows the voted labels.
    `thresholds` overrides the operating point (of every member, for vote).
    """
    if method not in METHODS:
        raise ValueError(f"unknown ensemble method {method!r}: choose one of {', '.join(METHODS)}")
    if len(probabilities) == 1:
        return operating_points.decide(manifests[0], probabilities[0], thresholds)
    first, multi = manifests[0], bool(manifests[0]["multi_label"])
    calibrated = [calibration.apply(m.get("calibration"), p) for m, p in zip(manifests, probabilities)]
    mean = np.mean(calibrated, axis=0).astype(np.float32)
    if method == "mean":
        merged = {**first, "calibration": calibration.IDENTITY,
                  "thresholds": np.mean([m["thresholds"] for m in manifests], axis=0).tolist(),
                  "operating_point": operating_points.mean_operating_point(manifests)}  # fmt: skip
        return operating_points.decide(merged, mean, thresholds)
    classes = list(first["classes"])
    members = [operating_points.decide(m, p, thresholds) for m, p in zip(manifests, probabilities)]
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
    return Decision(share, labels, operating_points.referral_by_label(first, labels), op, multi)


def combine(manifests: list[dict[str, Any]], probabilities: list[np.ndarray], method: str = "mean"
            ) -> tuple[np.ndarray, list[list[str]]]:  # fmt: skip
    """(ensemble scores, labels per row) of `decide`, at the stored operating points."""
    decision = decide(manifests, probabilities, method)
    return decision.probabilities, decision.labels
