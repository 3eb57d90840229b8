"""Combining several bundles of one task: averaged probabilities or majority vote.

The glaucoma seed's "average" ensemble is `mean`; its majority vote is `vote`. Both work on the
bundles' outputs (not their features), so any trained bundles of the same task combine, whatever
their backbone or input size. Shared by batch scoring and the model-selection sweep.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from eyeray.bundle import BundleError, decide

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


def version_key(manifests: list[dict[str, Any]], method: str) -> str:
    """What identifies a scoring result: the bundle's version, or for an ensemble a hash of its
    members' versions and the method (so a re-run with the same bundles resumes, other ones do not)."""
    if len(manifests) == 1:
        return manifests[0]["version"]
    members = ",".join(sorted(m["version"] for m in manifests))
    return "ens-" + hashlib.sha1(f"{method}:{members}".encode()).hexdigest()[:12]


def combine(manifests: list[dict[str, Any]], probabilities: list[np.ndarray], method: str = "mean"
            ) -> tuple[np.ndarray, list[list[str]]]:  # fmt: skip
    """Per-model probabilities (each n x classes) -> (ensemble scores, labels per row).

    mean: the average probability, decided like a single bundle (multi-label: the members' mean
    thresholds). vote: each member decides by its own rule and thresholds; the scores are vote
    shares; single-label picks the most votes (ties: the higher mean probability), multi-label
    keeps a label when more than half of the members predict it.
    """
    if method not in METHODS:
        raise ValueError(f"unknown ensemble method {method!r}: choose one of {', '.join(METHODS)}")
    probs = [np.asarray(p, np.float32) for p in probabilities]
    if len(probs) == 1:
        return probs[0], decide(manifests[0], probs[0])
    classes = list(manifests[0]["classes"])
    mean = np.mean(probs, axis=0)
    if method == "mean":
        thresholds = np.mean([m["thresholds"] for m in manifests], axis=0)
        return mean, decide({**manifests[0], "thresholds": thresholds.tolist()}, mean)
    votes = np.zeros_like(mean)
    for manifest, p in zip(manifests, probs):
        for row, labels in enumerate(decide(manifest, p)):
            votes[row, [classes.index(label) for label in labels]] += 1
    share = votes / len(probs)
    if manifests[0]["multi_label"]:
        return share, [[c for c, s in zip(classes, row) if s > 0.5] for row in share]
    # Shares move in steps of 1/k; the mean probability (at most 1) scaled below that step breaks ties only.
    winner = np.argmax(share + mean / (2 * len(probs)), axis=1)
    return share, [[classes[int(i)]] for i in winner]
