"""Ensembles of bundles: averaged probabilities and majority vote, and what may be combined."""

from __future__ import annotations

import numpy as np
import pytest

from eyeray.decision import ensemble
from eyeray.model.bundle import BundleError, check_compatible
from eyeray.score.pipeline import version_key


def combine(manifests, probabilities, method):
    """(ensemble probabilities, labels per row) of the ensemble's Decision."""
    decision = ensemble.combine(manifests, probabilities, method)
    return decision.probabilities, decision.labels


def manifest(version: str, classes=("CNV", "DME", "DRUSEN", "NORMAL"), multi_label=False, thresholds=None):
    return {
        "task": "odir" if multi_label else "oct",
        "classes": list(classes),
        "multi_label": multi_label,
        "version": version,
        "thresholds": thresholds or [0.5] * len(classes),
    }


P1 = np.array([[0.6, 0.3, 0.05, 0.05], [0.1, 0.2, 0.3, 0.4]], np.float32)
P2 = np.array([[0.1, 0.7, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4]], np.float32)
P3 = np.array([[0.2, 0.5, 0.2, 0.1], [0.7, 0.1, 0.1, 0.1]], np.float32)


def test_mean_averages_then_decides():
    ms = [manifest("a"), manifest("b"), manifest("c")]
    scores, labels = combine(ms, [P1, P2, P3], "mean")
    np.testing.assert_allclose(scores, (P1 + P2 + P3) / 3, rtol=1e-6)
    assert labels == [["DME"], ["NORMAL"]]


def test_vote_takes_the_majority_and_reports_vote_shares():
    ms = [manifest("a"), manifest("b"), manifest("c")]
    scores, labels = combine(ms, [P1, P2, P3], "vote")
    assert labels == [["DME"], ["NORMAL"]]  # row 0: CNV, DME, DME; row 1: NORMAL, NORMAL, CNV
    np.testing.assert_allclose(scores[0], [1 / 3, 2 / 3, 0, 0])


def test_vote_tie_goes_to_the_higher_mean_probability():
    ms = [manifest("a"), manifest("b")]
    _, labels = combine(ms, [P1[:1], P2[:1]], "vote")  # CNV (0.6) vs DME (0.7): one vote each
    assert labels == [["DME"]]  # mean DME 0.5 > mean CNV 0.35


def test_multi_label_vote_needs_more_than_half_and_mean_uses_mean_thresholds():
    classes = ("N", "D", "G")
    ms = [
        manifest("a", classes, True, [0.5, 0.5, 0.5]),
        manifest("b", classes, True, [0.5, 0.3, 0.5]),
        manifest("c", classes, True, [0.5, 0.5, 0.5]),
    ]
    p = [np.array([[0.9, 0.4, 0.1]]), np.array([[0.2, 0.4, 0.6]]), np.array([[0.8, 0.1, 0.6]])]
    _, voted = combine(ms, p, "vote")
    assert voted == [["N", "G"]]  # N: 2 of 3; D: 1 of 3 (only b's lower threshold); G: 2 of 3
    scores, mean = combine(ms, p, "mean")
    assert mean == [["N"]]  # mean G 0.433 < 0.5; mean D 0.3 < its mean threshold 0.433
    np.testing.assert_allclose(scores[0], [0.633333, 0.3, 0.433333], rtol=1e-5)


def test_one_bundle_is_itself():
    scores, labels = combine([manifest("a")], [P1], "vote")
    np.testing.assert_array_equal(scores, P1)
    assert labels == [["CNV"], ["NORMAL"]] and version_key([manifest("a")], "vote") == "a"


def test_version_key_names_members_and_method_not_order():
    a, b = manifest("a"), manifest("b")
    assert version_key([a, b], "mean") == version_key([b, a], "mean") != version_key([a, b], "vote")
    assert version_key([a, b], "mean").startswith("ens-")


def test_incompatible_or_repeated_bundles_are_refused():
    with pytest.raises(BundleError, match="different tasks or classes"):
        check_compatible([manifest("a"), manifest("b", classes=("RG", "NRG"))])
    with pytest.raises(BundleError, match="more than once"):
        check_compatible([manifest("a"), manifest("a")])
    with pytest.raises(ValueError, match="unknown ensemble method"):
        combine([manifest("a"), manifest("b")], [P1, P2], "median")
