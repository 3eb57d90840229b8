"""Operating points: each task's rule meets its target on the validation data it was chosen on,
the stored thresholds decide the same way from the manifest, and users can override them."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from eyeray.decision import calibration, fitting
from eyeray.decision import operating_points as op_
from eyeray.decision.decide import confidence, decide
from eyeray.decision.roc import UndefinedMetric
from eyeray.evaluation import deployed
from eyeray.evaluation.metrics import decisions, sens_at_95_spec
from eyeray.evaluation.plots import RELIABILITY_PNG
from eyeray.evaluation.report import METRICS_FILE, write_report
from eyeray.tasks import get_task


def glaucoma_case(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rg = rng.random(n) < 0.3
    score = np.clip(rng.normal(0.35 + 0.3 * rg, 0.15), 0, 1).astype(np.float32)
    return np.eye(2)[rg.astype(int)], np.stack([1 - score, score], axis=1)


def oct_case(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.eye(4)[rng.integers(0, 4, n)]
    z = rng.normal(0, 1, (n, 4)) + 1.2 * y
    return y, (np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)).astype(np.float32)


def odir_case(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Well separated labels whose probabilities all sit below 0.5 (positives about 0.35,
    negatives about 0.1), as for rare labels: a flat 0.5 finds almost none of them."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 8)) < 0.2).astype(int)
    return y, np.clip(0.1 + 0.25 * y + rng.normal(0, 0.08, (n, 8)), 0, 1).astype(np.float32)


def test_glaucoma_threshold_gives_95_percent_specificity_on_its_validation_data():
    """The point-estimate rule (confidence None, as before certification) is AIROGS' own."""
    spec = get_task("glaucoma")
    y, p = glaucoma_case(400, seed=0)
    op = json.loads(json.dumps(op_.choose(spec, y, p, confidence=None)))  # as stored in the manifest
    assert (op["rule"], op["target"], op["score"], op["chosen_on"]) == (
        "referral_specificity",
        0.95,
        "P(RG)",
        "validation",
    )
    rg = y[:, 1] == 1
    refer = op_.referral(op, p)
    specificity, sensitivity = (~refer[~rg]).mean(), refer[rg].mean()
    print(f"glaucoma: threshold {op['threshold']:.3f}, specificity {specificity:.3f}, sensitivity {sensitivity:.3f}")
    assert specificity >= 0.95
    assert op["achieved"]["specificity"] == pytest.approx(specificity)
    # the most sensitive point with that specificity: AIROGS' sens@95%spec, from evaluate
    assert sensitivity == pytest.approx(sens_at_95_spec(spec, y, p))
    assert (p[:, 1] > op["threshold"]).tolist() == refer.tolist()  # '>' and '>=' agree on it
    decided = op_.decisions(op, p)  # the label agrees with the referral: RG exactly when referred
    assert decided[:, 1].astype(bool).tolist() == refer.tolist()


def test_oct_urgent_referral_threshold_meets_the_sensitivity():
    spec = get_task("oct")
    y, p = oct_case(400, seed=0)
    op = op_.choose(spec, y, p)
    assert op["score"] == "P(CNV) + P(DME)" and op["score_columns"] == [0, 1] and op["target"] == 0.95
    urgent = y[:, :2].any(axis=1)
    refer = op_.referral(op, p)
    print(f"OCT urgent referral: sensitivity {refer[urgent].mean():.3f}, specificity {(~refer[~urgent]).mean():.3f}")
    assert refer[urgent].mean() >= 0.95
    decided = op_.decisions(op, p)
    assert decided.sum(axis=1).tolist() == [1] * len(p)
    assert decided[:, :2].any(axis=1).tolist() == refer.tolist()  # referred cases are labelled CNV or DME
    tighter = op_.choose(spec, y, p, rule="referral_sensitivity:0.8")
    assert tighter["threshold"] > op["threshold"] and tighter["achieved"]["sensitivity"] >= 0.8


def test_odir_per_label_f1_thresholds_beat_a_flat_half():
    spec = get_task("odir")
    y_val, p_val = odir_case(400, seed=0)
    y_test, p_test = odir_case(400, seed=1)
    op = op_.choose(spec, y_val, p_val)
    assert op["rule"] == "per_label_f1" and len(op["thresholds"]) == 8
    assert op_.referral(op, p_val) is None  # ODIR defines no referral classes
    for y, p, split in ((y_val, p_val, "validation"), (y_test, p_test, "test")):
        tuned = op_.achieved(op, y, p)
        f1, flat = np.mean(list(tuned["f1"].values())), np.mean(list(tuned["f1_at_0.5"].values()))
        print(f"ODIR {split}: mean per-label F1 {flat:.3f} at 0.5 -> {f1:.3f} at the chosen thresholds")
        assert all(tuned["f1"][c] > tuned["f1_at_0.5"][c] + 0.5 for c in spec.classes)
    assert decisions(spec, p_val, op["thresholds"]).tolist() == op_.decisions(op, p_val).tolist()


def test_a_label_without_positives_keeps_the_default_threshold():
    spec = get_task("odir")
    y, p = odir_case(100, seed=2)
    y[:, 2] = 0
    op = op_.choose(spec, y, p)
    assert op["thresholds"][2] == 0.5 and list(op["notes"]) == ["G"]


@pytest.mark.parametrize("k, n", [(0, 1), (1, 1), (34, 34), (33, 34), (120, 130), (5, 9), (59, 59), (0, 40)])
def test_lower_bound_is_scipys_one_sided_exact_binomial_bound(k, n):
    from scipy.stats import binomtest

    ci = binomtest(k, n, alternative="greater").proportion_ci(confidence_level=0.95, method="exact")
    assert op_.lower_bound(k, n) == pytest.approx(ci.low, abs=1e-12)
    two_sided = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    assert op_.interval(k, n) == pytest.approx([two_sided.low, two_sided.high], abs=1e-12)
    with pytest.raises(ValueError, match="successes"):
        op_.lower_bound(n + 1, n)


def separated(positives: int, negatives: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """OCT-shaped labels and probabilities whose referral score P(CNV) + P(DME) is distinct per case
    and overlaps between the groups, so every threshold is a different (sensitivity, specificity)."""
    rng = np.random.default_rng(seed)
    refer = np.r_[np.ones(positives, bool), np.zeros(negatives, bool)]
    score = np.clip(rng.normal(np.where(refer, 0.7, 0.3), 0.15), 0.001, 0.999)
    y = np.eye(4)[np.where(refer, 0, 3)]
    return y, np.stack([score / 2, score / 2, (1 - score) / 2, (1 - score) / 2], axis=1)


def test_certified_threshold_is_the_most_specific_whose_lower_bound_meets_the_target():
    spec = get_task("oct")
    y, p = separated(300, 300)
    op = op_.choose(spec, y, p)
    point = op_.choose(spec, y, p, confidence=None)
    cert, refer, urgent = op["certified"], op_.referral(op, p), y[:, :2].any(axis=1)
    caught = int(refer[urgent].sum())
    assert cert["meets_target"] and cert["trials"] == 300 and cert["successes"] == caught
    assert cert["bound"] == pytest.approx(op_.lower_bound(caught, 300)) and cert["bound"] >= 0.95
    assert op_.lower_bound(caught - 1, 300) < 0.95  # one fewer caught would not certify: the most specific
    assert "certified" not in point and op["threshold"] < point["threshold"]  # it refers more than the old rule
    assert (
        op_.referral(point, p)[urgent].mean() >= 0.95 > op_.lower_bound(int(op_.referral(point, p)[urgent].sum()), 300)
    )
    assert "300 referable validation images: sensitivity >= 0.95" in cert["statement"].replace(f"{caught} of ", "")


def test_too_few_validation_cases_take_the_most_conservative_threshold_and_say_so():
    spec = get_task("oct")
    y, p = separated(34, 66, seed=1)
    op = op_.choose(spec, y, p)
    cert, refer, urgent = op["certified"], op_.referral(op, p), y[:, :2].any(axis=1)
    assert not cert["meets_target"] and (cert["successes"], cert["trials"]) == (34, 34)
    assert cert["bound"] == pytest.approx(0.05 ** (1 / 34)) and round(cert["bound"], 2) == 0.92
    assert cert["statement"].startswith(
        "34 referable validation images certify at most 0.916 sensitivity at 95% confidence"
    )
    score = p[:, :2].sum(axis=1)
    assert refer[urgent].all() and refer.tolist() == (score >= score[urgent].min()).tolist()  # no more than needed
    glaucoma = op_.choose(get_task("glaucoma"), *glaucoma_case(60, seed=2))  # about 40 non-referable images
    g = glaucoma["certified"]
    assert g["metric"] == "specificity" and not g["meets_target"] and g["successes"] == g["trials"]
    assert glaucoma["achieved"]["specificity"] == 1.0 and "non-referable validation images certify" in g["statement"]


def test_a_validation_split_too_small_to_certify_is_reported_before_training():
    assert op_.cases_needed(0.95) == 59 and op_.lower_bound(59, 59) >= 0.95 > op_.lower_bound(58, 58)
    spec = get_task("oct")
    y = np.eye(4)[[0] * 24 + [1] * 24 + [3] * 52]  # 48 referable
    text = op_.validation_shortfall(spec, y, 0.95, 0.15)
    assert text.startswith("the validation split holds 48 referable images: they certify at most 0.939 sensitivity")
    assert "59 (none missed) are needed for the target 0.95" in text and "--val-fraction about 0.18" in text
    assert op_.validation_shortfall(spec, np.eye(4)[[0] * 59 + [3] * 10], 0.95, 0.15) is None
    assert op_.validation_shortfall(spec, y, None, 0.15) is None  # the point-estimate rule: nothing to certify
    assert op_.validation_shortfall(get_task("odir"), np.zeros((5, 8)), 0.95, 0.15) is None  # no rate target
    glaucoma = op_.validation_shortfall(get_task("glaucoma"), np.eye(2)[[0] * 18 + [1] * 2], 0.95, 0.15)
    assert "18 non-referable images: they certify at most 0.847 specificity" in glaucoma


def test_certified_specificity_is_the_most_sensitive_threshold_whose_bound_meets_the_target():
    spec = get_task("glaucoma")
    y, p = glaucoma_case(3000, seed=7)
    op, point = op_.choose(spec, y, p), op_.choose(spec, y, p, confidence=None)
    rg, refer = y[:, 1] == 1, op_.referral(op, p)
    cleared = int((~refer[~rg]).sum())
    assert op["certified"]["meets_target"] and op["certified"]["successes"] == cleared
    assert op_.lower_bound(cleared, int((~rg).sum())) >= 0.95 > op_.lower_bound(cleared - 1, int((~rg).sum()))
    assert op["threshold"] > point["threshold"]  # refers fewer than the point-estimate rule
    a = op["achieved"]
    assert (
        a["non_referable_cleared"] == cleared and a["specificity_ci95"][0] < a["specificity"] < a["specificity_ci95"][1]
    )


def test_user_overrides_replace_thresholds_and_drop_the_validation_figures():
    y, p = glaucoma_case(200, seed=3)
    op = op_.choose(get_task("glaucoma"), y, p)
    assert op_.referral(op, p, thresholds=0.0).all() and not op_.referral(op, p, thresholds=1.01).any()
    overridden = op_.with_override(op, 0.7)
    assert (
        overridden["threshold"] == 0.7 and overridden["chosen_on"] == "user override" and "achieved" not in overridden
    )
    with pytest.raises(ValueError, match="one threshold"):
        op_.with_override(op, [0.1, 0.2])
    multi = op_.choose(get_task("odir"), *odir_case(200, seed=4))
    some = op_.with_override(multi, {"G": 0.9})["thresholds"]
    assert some[2] == 0.9 and some[:2] == multi["thresholds"][:2]
    assert op_.with_override(multi, 0.5)["thresholds"] == [0.5] * 8
    with pytest.raises(ValueError, match="unknown labels"):
        op_.with_override(multi, {"X": 0.9})


def test_decide_calibrates_then_applies_the_operating_point_or_falls_back_for_old_bundles():
    spec = get_task("glaucoma")
    y, p = glaucoma_case(300, seed=5)
    params = calibration.fit(y, p, multi_label=False)
    calibrated = calibration.apply(params, p)
    manifest = {
        "classes": list(spec.classes),
        "multi_label": False,
        "referral_classes": ["RG"],
        "thresholds": [0.5, 0.5],
        "calibration": params,
        "operating_point": op_.choose(spec, y, calibrated),
    }
    d = decide(manifest, p)
    np.testing.assert_array_equal(d.probabilities, calibrated)
    assert d.referral.tolist() == op_.referral(manifest["operating_point"], calibrated).tolist()
    assert [row == ["RG"] for row in d.labels] == d.referral.tolist()
    assert decide(manifest, p, thresholds=0.0).labels == [["RG"]] * len(p)
    before_certification = {**manifest, "operating_point": op_.choose(spec, y, calibrated, confidence=None)}
    assert "certified" not in before_certification["operating_point"]
    d_before = decide(before_certification, p)  # a bundle's stored threshold decides as it always did
    threshold = before_certification["operating_point"]["threshold"]
    assert d_before.referral.tolist() == (calibrated[:, 1] >= threshold).tolist()
    old = {k: v for k, v in manifest.items() if k not in ("calibration", "operating_point")}
    legacy = decide(old, p)  # argmax, refer when the label is a referral class
    np.testing.assert_array_equal(legacy.probabilities, p)
    assert legacy.referral.tolist() == (p[:, 1] > p[:, 0]).tolist() and legacy.operating_point is None
    with pytest.raises(ValueError, match="no operating point"):
        decide(old, p, thresholds=0.3)


def test_unknown_rule_and_undefined_data_fail_clearly():
    with pytest.raises(ValueError, match="unknown operating-point rule"):
        op_.choose(get_task("oct"), *oct_case(20, 0), rule="youden")
    _, p = glaucoma_case(20, 0)
    with pytest.raises(UndefinedMetric):
        op_.choose(get_task("glaucoma"), np.eye(2)[[0] * 20], p)


@pytest.mark.parametrize("task, case", [("oct", oct_case), ("odir", odir_case)])
def test_training_driver_fits_both_on_validation_and_reports_them_on_test(task, case, tmp_path):
    """The decision and evaluation stages of `eyeray.train.run` without Ray: validation fits, the
    report shows test figures."""
    spec = get_task(task)
    (y_val, p_val), (y_test, p_test) = case(300, seed=6), case(300, seed=7)
    fitted = fitting.fit(spec, y_val, p_val, op_.CONFIDENCE)
    params, op = fitted.calibration, fitted.operating_point
    sections, plots = deployed.decision_sections(spec, fitted, (y_val, p_val), (y_test, p_test))
    assert params["method"] == ("platt" if spec.multi_label else "temperature") and op["chosen_on"] == "validation"
    assert sections["calibration"]["test"]["ece_bins"] == calibration.ECE_BINS
    assert {"ece_before", "ece_after"} <= set(sections["calibration"]["validation"])
    assert sections["operating_point"]["test"]["n"] == 300
    metrics = write_report(spec, tmp_path, y_true=y_test, probs=p_test, sections=sections, extra_plots=plots)
    on_disk = json.loads((tmp_path / METRICS_FILE).read_text())
    assert on_disk["calibration"] == metrics["calibration"] and on_disk["operating_point"]["rule"] == op["rule"]
    assert RELIABILITY_PNG in on_disk["plots"] and (tmp_path / RELIABILITY_PNG).stat().st_size > 5000


def test_training_driver_leaves_the_operating_point_out_when_validation_cannot_define_it():
    y, p = glaucoma_case(30, seed=8)
    only_nrg = np.eye(2)[[0] * 30]
    fitted = fitting.fit(get_task("glaucoma"), only_nrg, p, op_.CONFIDENCE)
    params, op = fitted.calibration, fitted.operating_point
    sections, _ = deployed.decision_sections(get_task("glaucoma"), fitted, (only_nrg, p), (y, p))
    assert op is None and "not chosen" in sections["operating_point"]["note"] and params["method"] == "temperature"


def test_a_bundle_without_an_operating_point_is_evaluated_as_deployed_at_its_argmax():
    """A validation split that chose no point (one class only) leaves the bundle deciding by argmax:
    the test report's deployed referral figures are those of that argmax, not a crash."""
    spec = get_task("glaucoma")
    y, p = glaucoma_case(40, seed=9)
    fitted = fitting.fit(spec, np.eye(2)[[0] * 40], p, op_.CONFIDENCE)
    manifest = {
        "classes": list(spec.classes),
        "multi_label": False,
        "referral_classes": list(spec.referral_classes),
        "calibration": fitted.calibration,
        "decision": "argmax",
    }
    exported = types.SimpleNamespace(manifest=manifest, decide=lambda raw: decide(manifest, raw))
    metrics, _ = deployed.at_operating_point(spec, exported, y, p)
    refer = calibration.apply(fitted.calibration, p).argmax(axis=1) == 1  # RG, the referral class, by argmax
    truth = y[:, 1].astype(bool)
    assert metrics["referred"] == refer.sum() and metrics["referable"] == truth.sum()
    assert metrics["referral_sensitivity"] == pytest.approx((refer & truth).sum() / truth.sum())
    assert metrics["referral_specificity"] == pytest.approx((~refer & ~truth).sum() / (~truth).sum())


def test_threshold_overrides_as_typed_on_the_command_line_or_in_a_query():
    assert op_.parse_thresholds(None) is None and op_.parse_thresholds(" ") is None
    assert op_.parse_thresholds("0.3") == 0.3
    assert op_.parse_thresholds("0.1, 0.2,0.3") == [0.1, 0.2, 0.3]
    assert op_.parse_thresholds("D=0.3,G=0.2") == {"D": 0.3, "G": 0.2}
    for bad, reason in (("high", "LABEL=0.3"), ("D=0.3,0.2", "mixes"), ("1.2", "between 0 and 1"), ("D=x", "LABEL")):
        with pytest.raises(ValueError, match=reason):
            op_.parse_thresholds(bad)


def test_answer_carries_confidence_review_and_the_operating_point_used():
    spec = get_task("oct")
    y, p = oct_case(300, seed=9)
    manifest = {
        "classes": list(spec.classes),
        "multi_label": False,
        "thresholds": [0.5] * 4,
        "calibration": calibration.fit(y, p, False),
        "operating_point": op_.choose(spec, y, p),
    }
    decision = decide(manifest, p[:5], review_below=0.99)
    answer = decision.answer(0, spec.classes)
    assert answer["confidence"] == pytest.approx(max(answer["probabilities"].values()))
    assert answer["needs_review"] == (answer["confidence"] < 0.99) == decision.needs_review()[0]
    assert answer["label"] == answer["labels"][0] and answer["referral"] == (answer["label"] in ("CNV", "DME"))
    assert set(answer["operating_point"]) == {"rule", "target", "score", "threshold", "chosen_on"}
    # multi-label: the least sure label decides the confidence
    sure = confidence(np.array([[0.9, 0.05, 0.55], [0.99, 0.01, 0.0]]), multi_label=True)
    np.testing.assert_allclose(sure, [0.55, 0.99])


def test_averaging_ensemble_uses_the_members_mean_threshold():
    spec = get_task("glaucoma")
    members = []
    for seed in (0, 1):
        y, p = glaucoma_case(200, seed=seed)
        members.append({"operating_point": op_.choose(spec, y, p)})
    merged = op_.mean_operating_point(members)
    assert merged["threshold"] == pytest.approx(np.mean([m["operating_point"]["threshold"] for m in members]))
    assert "achieved" not in merged and merged["chosen_on"].startswith("mean")
    assert op_.mean_operating_point([members[0], {"operating_point": None}]) is None


def test_one_rule_from_probabilities_to_labels_on_every_route():
    """The model's own figures (evaluation), a bundle without an operating point and one with a
    per-label point all decide `p >= threshold`: a probability exactly at the threshold is positive."""
    spec = get_task("odir")
    p = np.array([[0.5, 0.2, 0.7, 0.1, 0.1, 0.1, 0.1, 0.49]])
    want = [["N", "G"]]
    manifest = {"classes": list(spec.classes), "multi_label": True, "thresholds": [0.5] * 8, "referral_classes": []}
    assert decide(manifest, p).labels == want
    point = op_.fixed_point(spec.classes, True, thresholds=0.5)
    assert decide({**manifest, "operating_point": {**point, "rule": "per_label_f1"}}, p).labels == want
    np.testing.assert_array_equal(decisions(spec, p), [[c in want[0] for c in spec.classes]])
    # single-label without an operating point: argmax, referral when the decided class is a referral class
    oct_spec = get_task("oct")
    m = {
        "classes": list(oct_spec.classes),
        "multi_label": False,
        "thresholds": [0.5] * 4,
        "referral_classes": ["CNV", "DME"],
    }
    d = decide(m, np.array([[0.1, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.7]]))
    assert d.labels == [["DME"], ["NORMAL"]] and d.referral.tolist() == [True, False] and d.operating_point is None
    with pytest.raises(ValueError, match="no operating point"):
        decide(m, np.array([[0.25] * 4]), thresholds=0.3)
