"""Calibration: it fixes an over-confident model, survives JSON and the bundle, and covers multi-label."""

from __future__ import annotations

import json

import numpy as np
import pytest

from eyeray.decision import calibration
from eyeray.evaluation.plots import RELIABILITY_PNG, plot_reliability
from eyeray.model import bundle
from eyeray.model.build import build_model
from eyeray.tasks import get_task


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def overconfident_single_label(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(true logits); the 'model' reports softmax(3 x true logits)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, (n, 4))
    truth = np.array([rng.choice(4, p=p) for p in softmax(logits)])
    return np.eye(4)[truth], softmax(3 * logits).astype(np.float32)


def overconfident_multi_label(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each label present with probability sigmoid(z); the 'model' reports sigmoid(3 z + 1)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-1, 2, (n, 8))
    y = (rng.random((n, 8)) < sigmoid(z)).astype(np.float32)
    return y, sigmoid(3 * z + 1).astype(np.float32)


def test_temperature_scaling_recovers_the_temperature_and_lowers_ece_on_held_out_data():
    y_val, p_val = overconfident_single_label(1000, seed=0)
    y_test, p_test = overconfident_single_label(1000, seed=1)
    params = calibration.fit(y_val, p_val, multi_label=False)
    assert params["method"] == "temperature" and params["temperature"] == pytest.approx(3.0, rel=0.1)
    after = calibration.apply(params, p_test)
    s = calibration.summary(y_test, p_test, after, multi_label=False)
    print(f"single-label ECE {s['ece_before']:.3f} -> {s['ece_after']:.3f} (T={params['temperature']:.2f})")
    assert s["ece_before"] > 0.15 and s["ece_after"] < 0.05 and s["nll_after"] < s["nll_before"]
    np.testing.assert_array_equal(after.argmax(axis=1), p_test.argmax(axis=1))  # the ranking is kept
    np.testing.assert_allclose(after.sum(axis=1), 1, atol=1e-5)


def test_per_label_platt_scaling_lowers_ece_and_leaves_a_one_outcome_label_alone():
    y_val, p_val = overconfident_multi_label(1000, seed=0)
    y_val[:, 5] = 0  # H never present in this validation set
    y_test, p_test = overconfident_multi_label(1000, seed=1)
    params = calibration.fit(y_val, p_val, multi_label=True, labels=list("NDGCAHMO"))
    assert params["method"] == "platt" and list(params["notes"]) == ["H"]
    assert (params["slopes"][5], params["intercepts"][5]) == (1.0, 0.0)
    others = [k for k in range(8) if k != 5]
    np.testing.assert_allclose(np.asarray(params["slopes"])[others], 1 / 3, rtol=0.15)  # undoes the 3x
    after = calibration.apply(params, p_test)
    s = calibration.summary(y_test[:, others], p_test[:, others], after[:, others], multi_label=True)
    print(f"multi-label ECE {s['ece_before']:.3f} -> {s['ece_after']:.3f}")
    assert s["ece_before"] > 0.1 and s["ece_after"] < 0.03
    np.testing.assert_array_equal(after[:, 5], p_test[:, 5])


def test_parameters_round_trip_through_json_and_the_bundle_manifest(tmp_path):
    y, p = overconfident_single_label(300, seed=2)
    params = calibration.fit(y, p, multi_label=False)
    assert calibration.apply(json.loads(json.dumps(params)), p).tobytes() == calibration.apply(params, p).tobytes()
    spec = get_task("oct")
    model = build_model(spec, "small_cnn", weights="none", image_size=32)
    manifest = bundle.make_manifest(
        spec, model, backbone="small_cnn", image_size=32, weights="none", calibration=params
    )
    bundle.save(model, manifest, str(tmp_path / "bundle"))
    stored = bundle.read_manifest(str(tmp_path / "bundle"))["calibration"]
    assert stored == params
    np.testing.assert_array_equal(calibration.apply(stored, p), calibration.apply(params, p))


def test_identity_and_unknown_methods():
    p = np.array([[0.2, 0.8]], np.float32)
    np.testing.assert_array_equal(calibration.apply(None, p), p)
    np.testing.assert_array_equal(calibration.apply({"method": "none"}, p), p)
    with pytest.raises(ValueError, match="unknown calibration method"):
        calibration.apply({"method": "isotonic"}, p)


def test_ece_of_a_perfectly_calibrated_and_a_maximally_wrong_model():
    y = np.eye(2)[[0, 1, 1, 0]]
    assert calibration.expected_calibration_error(y, y.astype(float), multi_label=False) == 0.0
    assert calibration.expected_calibration_error(y, 1 - y.astype(float), multi_label=False) == 1.0
    r = calibration.reliability(y, np.full((4, 2), 0.5), multi_label=True, bins=10)
    assert r["count"].sum() == 8 and r["count"][5] == 8  # 0.5 falls in the bin [0.5, 0.6)


def test_reliability_diagram_is_written(tmp_path):
    y, p = overconfident_single_label(200, seed=3)
    after = calibration.apply(calibration.fit(y, p, multi_label=False), p)
    plot_reliability(y, p, after, False, tmp_path / RELIABILITY_PNG, "OCT")
    assert (tmp_path / RELIABILITY_PNG).stat().st_size > 5000


def test_perfectly_separated_validation_data_does_not_push_probabilities_to_0_and_1():
    """35 easy cases, all right with probability 0.9999: maximum likelihood would take T to 0;
    the smoothed targets stop at what 35 cases can support (about (n_c + 1) / (n_c + 2))."""
    y = np.eye(2)[[0] * 17 + [1] * 18]
    p = np.where(y == 1, 0.9999, 0.0001)
    params = calibration.fit(y, p, multi_label=False)
    top = calibration.apply(params, p).max(axis=1)
    assert params["temperature"] > 1 and np.all((top > 0.9) & (top < 0.99))
    np.testing.assert_allclose(calibration.smoothed_targets(y)[:, 1], np.where(y[:, 1] == 1, 19 / 20, 1 / 19))
