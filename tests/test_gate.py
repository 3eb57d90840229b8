"""The gate (eyeray.decision.gate): out-of-distribution distance and image quality, fitted, carried
in the bundle, and applied by the one decision layer; declined images get no answer on every route."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from bundles import make_bundle, with_gate
from PIL import Image, ImageFilter

from eyeray.data import quality
from eyeray.decision import ensemble, gate
from eyeray.decision.decide import decide
from eyeray.decision.options import DecisionOptions
from eyeray.model import bundle
from eyeray.score import shards
from eyeray.score.predictor import BundlePredictor

SIDE = 400  # the originals' height and width: large enough to grade


def textured(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    """uint8 images (n, size, size, 3): coarse colour blocks of varying contrast plus fine grain."""
    rng = np.random.default_rng(seed)
    blocks = rng.uniform(-1, 1, (n, 4, 4, 3)) * rng.uniform(60, 90, (n, 1, 1, 1))
    coarse = blocks.repeat(size // 4, axis=1).repeat(size // 4, axis=2)
    return np.clip(128 + coarse + rng.normal(0, 5, (n, size, size, 1)), 0, 255).astype(np.uint8)


def stats(images: np.ndarray, side: int = SIDE) -> dict[str, np.ndarray]:
    return quality.statistics(images, [side] * len(images), [side] * len(images))


def features(n: int, centre: np.ndarray, seed: int) -> np.ndarray:
    return centre + np.random.default_rng(seed).normal(0, 1, (n, len(centre)))


NEAR, FAR = np.r_[np.full(4, 5.0), np.zeros(4)], np.r_[np.zeros(4), np.full(4, 5.0)]  # knn needs a direction


@pytest.mark.parametrize("method", gate.METHODS)
def test_fit_keeps_its_share_of_held_out_images_declines_far_points_and_round_trips(method):
    train_stats = stats(textured(50))
    fitted = gate.fit(features(400, NEAR, 0), features(200, NEAR, 1), train_stats, method=method, keep=0.9)
    validation = fitted.distance(features(200, NEAR, 1))
    # the threshold is the 90 % quantile of 600 held-out distances: the validation images' and the
    # training images' own, cross-fitted; the same distribution, so validation alone keeps about as many
    assert fitted.kept_on_validation == np.mean(validation <= fitted.threshold) >= 0.85
    assert (fitted.train_images, fitted.validation_images, fitted.threshold_images) == (400, 200, 600)
    few = gate.fit(features(10, NEAR, 0), features(5, NEAR, 1), train_stats, method=method, keep=0.9)
    assert few.threshold_images == 5  # too few training images to fold: validation alone
    near = fitted.verdict(features(200, NEAR, 2), stats(textured(200, seed=2)))
    far = fitted.verdict(features(50, FAR, 3), stats(textured(50, seed=3)))
    assert np.mean(near.verdict == gate.PASSED) >= 0.8 and not near.declined.all()
    assert set(far.verdict) == {gate.OUT_OF_DISTRIBUTION} and far.declined.all() and (far.score > 1).all()
    assert set(far.reason) == {""} and np.array_equal(near.declined, near.score > 1)

    data = fitted.to_bytes()
    section = fitted.section(hashlib.sha256(data).hexdigest())
    loaded = gate.Gate.from_bytes(section, data)
    probe = features(100, (NEAR + FAR) / 2, 4)
    np.testing.assert_array_equal(loaded.distance(probe), fitted.distance(probe))
    assert (loaded.method, loaded.threshold, loaded.quality) == (method, fitted.threshold, fitted.quality)
    with pytest.raises(ValueError, match="sha256"):
        gate.Gate.from_bytes({**section, "sha256": "0" * 64}, data)
    with pytest.raises(ValueError, match="keep"):
        gate.fit(features(10, NEAR, 0), features(5, NEAR, 1), train_stats, method=method, keep=1.0)


def test_quality_problems_name_what_is_wrong_with_an_image():
    accepted = quality.ranges(stats(textured(200)))
    normal = textured(20, seed=5)
    blurred = np.stack([np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(2))) for x in normal[:3]])
    cases = {
        "": normal,
        "blank or flat image": np.stack([np.full((32, 32, 3), 128, np.uint8), np.zeros((32, 32, 3), np.uint8)]),
        "too dark": (normal[:3] * 0.25).astype(np.uint8),
        "over-exposed": np.clip(normal[:3].astype(int) + 150, 0, 255).astype(np.uint8),
        "blurred": blurred,
        "noisy": np.random.default_rng(6).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8),
    }
    for reason, images in cases.items():
        assert quality.problems(stats(images), accepted).tolist() == [reason] * len(images), reason
    assert quality.problems(stats(normal[:3], side=16), accepted).tolist() == ["too small"] * 3


MANIFEST = {"classes": ["CNV", "DME", "DRUSEN", "NORMAL"], "multi_label": False, "thresholds": [0.5] * 4}
MANIFEST["referral_classes"] = ["CNV", "DME"]
PROBS = np.array([[0.9, 0.05, 0.03, 0.02], [0.1, 0.7, 0.1, 0.1], [0.8, 0.1, 0.05, 0.05], [0.1, 0.1, 0.1, 0.7]])
VERDICT = gate.Verdict(
    np.array([gate.PASSED, gate.UNGRADABLE, gate.OUT_OF_DISTRIBUTION, gate.PASSED], dtype=object),
    np.array(["", "blurred", "", ""], dtype=object),
    np.array([0.5, 0.8, 3.0, 0.9]),
)


def assert_gated(gated, plain, classes) -> None:
    """Rows 1 and 2 declined (no label, referral, probabilities or confidence), rows 0 and 3 as without a gate."""
    assert gated.declined.tolist() == [False, True, True, False]
    assert all(plain.labels[i] for i in (1, 2)) and plain.referral[1:3].all()  # the gate took them away
    assert [gated.labels[i] for i in (1, 2)] == [[], []] and gated.referral.tolist() == [True, False, False, False]
    assert gated.needs_review()[1:3].all()
    for i in (1, 2):
        answer = gated.answer(i, classes)
        assert answer["status"] == "declined" and answer["labels"] == [] and answer["label"] is None
        assert answer["probabilities"] == {} and answer["confidence"] is None and answer["referral"] is None
        assert answer["needs_review"] is True and answer["gate"]["verdict"] == VERDICT.verdict[i]
    assert gated.answer(1, classes)["gate"] == {"verdict": "ungradable", "reason": "ungradable: blurred", "score": 0.8}
    for i in (0, 3):
        answer, before = gated.answer(i, classes), plain.answer(i, classes)
        assert answer.pop("gate") == {"verdict": "passed", "reason": "", "score": VERDICT.score[i]}
        assert before.pop("gate")["verdict"] == gate.NO_GATE and answer == before and answer["status"] == "ok"
        assert gated.labels[i] == plain.labels[i] and gated.needs_review()[i] == plain.needs_review()[i]
    np.testing.assert_array_equal(gated.probabilities, plain.probabilities)


def test_decide_and_ensembles_give_declined_rows_no_answer():
    assert_gated(decide(MANIFEST, PROBS, verdict=VERDICT), decide(MANIFEST, PROBS), MANIFEST["classes"])
    members = [{**MANIFEST, "version": v} for v in "ab"]
    other = PROBS[:, [0, 1, 3, 2]] * 0.9 + 0.025  # the members disagree a little
    for method in ensemble.METHODS:
        plain = ensemble.combine(members, [PROBS, other], method)
        assert_gated(ensemble.combine(members, [PROBS, other], method, verdict=VERDICT), plain, MANIFEST["classes"])


def test_gate_combine_declines_when_any_member_declines():
    passed = gate.Verdict(np.full(4, gate.PASSED, dtype=object), np.full(4, "", dtype=object), np.full(4, 0.2))
    both = gate.combine([passed, VERDICT])
    assert both.verdict.tolist() == VERDICT.verdict.tolist() and both.declined.tolist() == [False, True, True, False]
    assert both.reason[1] == "blurred" and both.score.tolist() == [0.5, 0.8, 3.0, 0.9]
    absent = gate.combine([gate.Verdict.absent(2), gate.Verdict.absent(2)])
    assert set(absent.verdict) == {gate.NO_GATE} and np.isnan(absent.score).all() and not absent.declined.any()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """An OCT bundle made before the gate (no "gate" key) and a copy with a gate fitted on its own features."""
    root = tmp_path_factory.mktemp("gate")
    plain = make_bundle(root / "plain", decision=True)
    return plain, with_gate(plain, textured(200, seed=10), textured(100, seed=11), root / "gated")


def test_a_bundle_carries_its_gate_and_one_made_before_says_no_gate(bundles):
    plain, gated = bundles
    assert "gate" not in json.loads((Path(plain) / "manifest.json").read_text())
    old, new = bundle.load(plain), bundle.load(gated)
    assert old.gate is None and new.gate is not None and new.manifest["gate"]["method"] == gate.DEFAULT_METHOD
    images = np.concatenate([textured(40, seed=12), np.full((2, 32, 32, 3), 90, np.uint8)])
    sides = [SIDE] * len(images)
    probs, feats = new.infer(images)
    np.testing.assert_array_equal(probs, new.predict(images))
    verdict = new.verdict(images, feats, sides, sides)
    assert np.mean(verdict.verdict[:40] == gate.PASSED) >= 0.8 and (verdict.verdict[:40] != gate.UNGRADABLE).all()
    assert verdict.verdict[40:].tolist() == [gate.UNGRADABLE] * 2
    assert verdict.reason[40:].tolist() == ["blank or flat image"] * 2
    assert set(new.verdict(images, feats, sides, sides, use_gate=False).verdict) == {gate.OFF}
    assert set(old.verdict(images, old.infer(images)[1], sides, sides).verdict) == {gate.NO_GATE}
    decision = new.decide(probs, verdict=verdict)
    assert decision.answer(40, new.classes)["status"] == "declined" and decision.labels[40] == []


@pytest.mark.parametrize("damage", ["missing", "tampered"])
def test_a_gate_file_missing_or_not_matching_its_hash_is_refused(bundles, tmp_path, damage):
    copy = tmp_path / "copy"
    shutil.copytree(bundles[1], copy)
    if damage == "missing":
        (copy / gate.FILE).unlink()
    else:
        (copy / gate.FILE).write_bytes((copy / gate.FILE).read_bytes() + b"\0")
    with pytest.raises(bundle.BundleError, match="not there" if damage == "missing" else "sha256"):
        bundle.load(str(copy))


def test_batch_scoring_declines_a_flat_image_and_its_row_has_no_answer(bundles):
    predictor = BundlePredictor([bundles[1]], explain="none")
    images = np.concatenate([textured(5, seed=13), np.full((1, 32, 32, 3), 128, np.uint8)])
    batch = {
        "path": np.array([f"scan-{i}.png" for i in range(7)], dtype=object),
        "image": np.concatenate([images, np.zeros((1, 32, 32, 3), np.uint8)]),
        "error": np.array([""] * 6 + ["corrupt image"], dtype=object),
        "height": np.array([SIDE] * 6 + [0]),
        "width": np.array([SIDE] * 6 + [0]),
    }
    out = predictor(batch)
    assert out["gate"][5] == gate.UNGRADABLE and out["gate_reason"][5] == "blank or flat image"
    assert out["label"][5] == "" and out["gate"][6] == "" and out["needs_review"][5]
    manifest = predictor.manifests[0]
    rows = shards.shard_table(out, manifest, manifest["version"], [manifest["version"]]).to_pylist()
    flat = rows[5]
    assert (flat["status"], flat["gate"], flat["gate_reason"]) == ("declined", "ungradable", "blank or flat image")
    assert (flat["label"], flat["confidence"], flat["probabilities"], flat["referral"]) == (None, None, None, None)
    assert flat["needs_review"] is True and flat["gate_score"] is not None
    assert rows[6]["status"] == "error" and rows[6]["gate"] is None and rows[6]["gate_score"] is None
    for row in rows[:5]:
        assert row["status"] == ("ok" if row["gate"] == gate.PASSED else "declined")
    answered = [r for r in rows[:5] if r["status"] == "ok"]
    assert len(answered) >= 3 and all(r["label"] in manifest["classes"] and r["confidence"] for r in answered)


def test_eyeray_explain_says_what_the_gate_says(bundles, tmp_path):
    from eyeray.model.gradcam import explain_files

    plain, gated = bundles
    flat = tmp_path / "flat.png"
    Image.new("RGB", (200, 200), (90, 90, 90)).save(flat)
    row = explain_files(gated, [str(flat)], output=str(tmp_path / "out"))[0]
    assert row["error"] == "" and row["status"] == "declined" and row["labels"] == [] and row["confidence"] is None
    assert row["gate"]["reason"] == "ungradable: blank or flat image"
    off = explain_files(gated, [str(flat)], output=str(tmp_path / "off"), decision=DecisionOptions(gate=False))[0]
    assert off["status"] == "ok" and off["gate"]["verdict"] == gate.OFF and off["labels"]
    assert explain_files(plain, [str(flat)], output=str(tmp_path / "plain"))[0]["gate"]["verdict"] == gate.NO_GATE
