"""eyeray.evaluation.metrics against hand-checked values (the arithmetic is in the comments)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eyeray.evaluation.metrics import EXTRA_METRICS, compute_metrics
from eyeray.evaluation.patients import by_patient
from eyeray.evaluation.report import write_report
from eyeray.tasks import GLAUCOMA, OCT, ODIR, TASKS

TOL = 1e-9

# --------------------------------------------------------------------------------------------
# OCT, 8 B-scans, 2 per class. Columns: CNV, DME, DRUSEN, NORMAL.
OCT_TRUE = np.eye(4)[[0, 0, 1, 1, 2, 2, 3, 3]]
OCT_PROBS = np.array(
    [
        [0.60, 0.30, 0.05, 0.05],  # CNV    -> CNV     referral score .90
        [0.20, 0.40, 0.20, 0.20],  # CNV    -> DME     .60
        [0.10, 0.70, 0.10, 0.10],  # DME    -> DME     .80
        [0.20, 0.50, 0.20, 0.10],  # DME    -> DME     .70
        [0.05, 0.05, 0.80, 0.10],  # DRUSEN -> DRUSEN  .10
        [0.10, 0.10, 0.30, 0.50],  # DRUSEN -> NORMAL  .20
        [0.31, 0.31, 0.00, 0.38],  # NORMAL -> NORMAL  .62
        [0.10, 0.20, 0.10, 0.60],  # NORMAL -> NORMAL  .30
    ]
)


def test_oct_counts_accuracy_and_per_class():
    m = compute_metrics(OCT, OCT_TRUE, OCT_PROBS)
    # rows = true class: one CNV called DME, one DRUSEN called NORMAL, the rest right
    assert m["confusion_matrix"] == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 1, 1], [0, 0, 0, 2]]
    assert m["n"] == 8
    assert m["accuracy"] == pytest.approx(6 / 8, abs=TOL)
    # CNV: tp 1, fp 0, fn 1, tn 6 -> P 1, R 1/2, F1 2/3, spec 6/6
    # DME: tp 2, fp 1, fn 0, tn 5 -> P 2/3, R 1, F1 4/5, spec 5/6 (DRUSEN, NORMAL mirror them)
    expected = {
        "CNV": dict(precision=1, recall=0.5, f1=2 / 3, sensitivity=0.5, specificity=1, support=2),
        "DME": dict(precision=2 / 3, recall=1, f1=0.8, sensitivity=1, specificity=5 / 6, support=2),
        "DRUSEN": dict(precision=1, recall=0.5, f1=2 / 3, sensitivity=0.5, specificity=1, support=2),
        "NORMAL": dict(precision=2 / 3, recall=1, f1=0.8, sensitivity=1, specificity=5 / 6, support=2),
    }
    for name, values in expected.items():
        for key, value in values.items():
            assert m["per_class"][name][key] == pytest.approx(value, abs=TOL), (name, key)
    # macro F1 = (2/3 + 4/5 + 2/3 + 4/5) / 4 = 11/15
    assert m["macro_f1"] == pytest.approx(11 / 15, abs=TOL)
    assert m["notes"] == {}


def test_oct_auc_one_vs_rest_and_urgent_referral():
    m = compute_metrics(OCT, OCT_TRUE, OCT_PROBS)
    # CNV column: positives .60 (beats all 6 negatives) and .20 (beats .10 .05 .10 .10, ties .20,
    # loses to .31) -> (6 + 4.5) / 12.  DME and DRUSEN: positives above every negative -> 1.
    # NORMAL column: .60 beats all 6, .38 loses only to .50 -> 11/12.
    per_class = {"CNV": 10.5 / 12, "DME": 1.0, "DRUSEN": 1.0, "NORMAL": 11 / 12}
    for name, auc in per_class.items():
        assert m["per_class"][name]["auc"] == pytest.approx(auc, abs=TOL), name
    # one-vs-rest macro = mean of the four = 45.5 / 48
    assert m["auc"] == pytest.approx(45.5 / 48, abs=TOL)
    # referral = CNV or DME, score p(CNV)+p(DME): positives .9 .6 .8 .7, negatives .1 .2 .62 .3;
    # the only inverted pair is (.6, .62) -> 15/16
    assert m["urgent_referral_auc"] == pytest.approx(15 / 16, abs=TOL)


def test_missing_class_gives_none_with_a_note():
    y = np.eye(4)[[0, 0, 1, 1, 3, 3]]  # no DRUSEN in y_true
    probs = OCT_PROBS[[0, 1, 2, 3, 6, 7]]  # and none predicted
    m = compute_metrics(OCT, y, probs)
    drusen = m["per_class"]["DRUSEN"]
    for key in ("recall", "sensitivity", "precision", "f1", "auc"):
        assert drusen[key] is None, key
        assert "DRUSEN" in m["notes"][f"per_class.DRUSEN.{key}"]
    assert drusen["support"] == 0 and drusen["specificity"] == 1.0
    assert m["auc"] is None and "DRUSEN" in m["notes"]["auc"]
    # F1 of DRUSEN is undefined, so macro F1 averages the other three. CNV 2/3, DME 4/5 as above;
    # NORMAL is now perfect (the DRUSEN scan called NORMAL is gone): (2/3 + 4/5 + 1) / 3 = 37/45
    assert m["macro_f1"] == pytest.approx(37 / 45, abs=TOL)
    assert "DRUSEN" in m["notes"]["macro_f1"]
    assert m["accuracy"] == pytest.approx(5 / 6, abs=TOL)
    assert m["confusion_matrix"][2] == [0, 0, 0, 0]
    json.dumps(m, allow_nan=False)


# --------------------------------------------------------------------------------------------
# Glaucoma: positive class RG (column 1).


def _glaucoma(p_rg, rg):
    p_rg = np.asarray(p_rg, dtype=float)
    return np.eye(2)[np.asarray(rg)], np.stack([1 - p_rg, p_rg], axis=1)


def test_glaucoma_auc_one_inverted_pair_and_pauc():
    # RG .9 .8 .4 vs NRG .1 .2 .55: of the 9 pairs only (.4, .55) is inverted -> AUC 8/9
    y, probs = _glaucoma([0.9, 0.8, 0.4, 0.1, 0.2, 0.55], [1, 1, 1, 0, 0, 0])
    m = compute_metrics(GLAUCOMA, y, probs)
    assert m["auc"] == pytest.approx(8 / 9, abs=TOL)
    # argmax: .9 .8 -> RG, .4 -> NRG, .55 -> RG  => rows (NRG, RG): [[2, 1], [1, 2]]
    assert m["confusion_matrix"] == [[2, 1], [1, 2]]
    assert m["accuracy"] == pytest.approx(4 / 6, abs=TOL)
    # ROC: (0,0) -> (0,2/3) -> (1/3,2/3) -> ...; over FPR 0..0.1 the TPR is 2/3, raw area 1/15.
    # AIROGS = sklearn max_fpr=0.1 (McClish): 1/2 (1 + (A - 0.1^2/2) / (0.1 - 0.1^2/2))
    #   = 1/2 (1 + (1/15 - 1/200) / (19/200)) = 1/2 (1 + 37/57) = 47/57
    assert m["pauc_90_100"] == pytest.approx(47 / 57, abs=TOL)
    # 3 negatives: spec >= 95 % means no false positive at all; best TPR there is 2/3
    assert m["sens_at_95_spec"] == pytest.approx(2 / 3, abs=TOL)


def test_sens_at_95_spec_exact_operating_point():
    # 20 NRG, 10 RG. Threshold 0.8 flags 9 of 10 RG and 1 of 20 NRG (the .85): spec exactly 95 %,
    # sens 0.9. The next threshold (.6) reaches sens 1.0 only at spec 90 %.
    rg = [0.9] * 8 + [0.8, 0.6]
    nrg = [0.85, 0.7] + [0.1] * 18
    y, probs = _glaucoma(rg + nrg, [1] * 10 + [0] * 20)
    assert compute_metrics(GLAUCOMA, y, probs)["sens_at_95_spec"] == pytest.approx(0.9, abs=TOL)


def test_sens_at_95_spec_does_not_interpolate_across_a_tie():
    # 10 NRG, 2 RG; one RG and one NRG tie at .5. Thresholds: > .5 gives sens .5 at spec 1.0;
    # >= .5 gives sens 1.0 at spec .9. No threshold reaches 95 % spec with more than .5 sensitivity
    # (interpolating the diagonal ROC segment at FPR .05 would claim .75; AIROGS reports .5).
    y, probs = _glaucoma([0.9, 0.5, 0.5] + [0.1] * 9, [1, 1] + [0] * 10)
    assert compute_metrics(GLAUCOMA, y, probs)["sens_at_95_spec"] == pytest.approx(0.5, abs=TOL)


def test_glaucoma_one_class_only_is_none_with_notes():
    y, probs = _glaucoma([0.1, 0.7, 0.2], [0, 0, 0])
    m = compute_metrics(GLAUCOMA, y, probs)
    for key in ("auc", "pauc_90_100", "sens_at_95_spec"):
        assert m[key] is None and "0 positive of 3" in m["notes"][key], key
    assert m["per_class"]["RG"]["recall"] is None
    assert m["accuracy"] == pytest.approx(2 / 3, abs=TOL)
    json.dumps(m, allow_nan=False)


def test_positive_class_defaults_to_last_class():
    spec = replace(GLAUCOMA, positive_class=None)
    y, probs = _glaucoma([0.9, 0.8, 0.4, 0.1, 0.2, 0.55], [1, 1, 1, 0, 0, 0])
    assert compute_metrics(spec, y, probs)["auc"] == pytest.approx(8 / 9, abs=TOL)


# --------------------------------------------------------------------------------------------
# ODIR: 2 patients x 8 labels (N D G C A H M O).
ODIR_TRUE = np.array([[1, 0, 0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0, 1]])  # N ; D + O
ODIR_PROBS = np.array(
    [
        [0.9, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.6],  # > .5: N, O
        [0.3, 0.7, 0.1, 0.1, 0.1, 0.1, 0.1, 0.4],  # > .5: D
    ]
)


def test_odir_official_score_by_hand():
    m = compute_metrics(ODIR, ODIR_TRUE, ODIR_PROBS)
    # Flattened 16 cells: TP 2 (1-N, 2-D), FP 1 (1-O), FN 1 (2-O), TN 12.
    assert m["accuracy"] == pytest.approx(14 / 16, abs=TOL)
    # official F1 = f1_score(gt, pr > th, average="micro") over both values = accuracy
    assert m["f1"] == pytest.approx(14 / 16, abs=TOL)
    # kappa: po = 224/256, pe = (3*3 + 13*13)/256 = 178/256 -> (224-178)/(256-178) = 46/78
    assert m["kappa"] == pytest.approx(23 / 39, abs=TOL)
    # AUC: positives .9 .7 .4 vs 13 negatives (max .6): only (.4, .6) inverted -> 38/39
    assert m["auc"] == pytest.approx(38 / 39, abs=TOL)
    # final = (23/39 + 7/8 + 38/39) / 3 = 761/936
    assert m["odir_score"] == pytest.approx(761 / 936, abs=TOL)
    assert m["thresholds"] == [0.5] * 8
    # per label: N and D perfect, O: tp 0 fp 1 fn 1 -> F1 0; G C A H M absent and never predicted
    assert m["per_class"]["N"]["f1"] == 1 and m["per_class"]["O"]["f1"] == 0
    assert m["per_class"]["N"]["auc"] == 1 and m["per_class"]["O"]["auc"] == 0
    assert m["macro_f1"] == pytest.approx(2 / 3, abs=TOL)
    for name in "GCAHM":
        assert m["per_class"][name]["auc"] is None and f"per_class.{name}.auc" in m["notes"]
    # per-label 2x2 [[tn, fp], [fn, tp]]: N [[1,0],[0,1]], O [[0,1],[1,0]], G [[2,0],[0,0]]
    assert m["confusion_matrix"][0] == [[1, 0], [0, 1]]
    assert m["confusion_matrix"][7] == [[0, 1], [1, 0]]
    assert m["confusion_matrix"][2] == [[2, 0], [0, 0]]
    json.dumps(m, allow_nan=False)


def test_oct_metrics_take_scores_whose_rows_do_not_sum_to_one():
    """Logits, votes or rounded outputs: the one-vs-rest macro AUC needs no normalised rows; on
    probabilities it equals scikit-learn's multi_class="ovr" (which refuses anything else)."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    y = np.eye(4)[np.arange(40) % 4]
    probs = rng.dirichlet(np.ones(4), 40) * 0.5 + 0.5 * y
    m = compute_metrics(OCT, y, probs)
    want = roc_auc_score(y.argmax(axis=1), probs, multi_class="ovr", average="macro")
    assert m["auc"] == pytest.approx(want, abs=1e-12)
    scaled = probs * np.array([2.0, 3.0, 0.5, 7.0])  # rows no longer sum to 1; each column's order kept
    assert compute_metrics(OCT, y, scaled)["auc"] == pytest.approx(want, abs=1e-12)


def official_odir_metrics(gt_data, pr_data):
    """ODIR-2019's `ODIR_Metrics`, as the organisers' ODIR_evaluation.py has it (th = 0.5, `pr > th`)."""
    from sklearn import metrics

    th = 0.5
    gt = gt_data.flatten()
    pr = pr_data.flatten()
    kappa = metrics.cohen_kappa_score(gt, pr > th)
    f1 = metrics.f1_score(gt, pr > th, average="micro")
    auc = metrics.roc_auc_score(gt, pr)
    final_score = (kappa + f1 + auc) / 3.0
    return kappa, f1, auc, final_score


@pytest.mark.parametrize("seed", range(200))
def test_odir_scores_equal_the_official_evaluation_code(seed):
    """Random cases, and adversarial ones: probabilities of exactly 0.5 (a zero logit), which the
    official code counts as negative, and a few distinct values only (many ties)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    y = (rng.random((n, 8)) < rng.uniform(0.1, 0.6)).astype(int)
    y[0, 0], y[1, 0] = 1, 0  # both outcomes, so the AUC is defined
    kind = seed % 3
    p = rng.random((n, 8)) if kind == 0 else rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], (n, 8))
    if kind == 2:
        p[rng.random((n, 8)) < 0.5] = 0.5
    m = compute_metrics(ODIR, y, p)
    want = official_odir_metrics(y, p)
    got = (m["kappa"], m["f1"], m["auc"], m["odir_score"])
    if any(v is None for v in got):  # eyeray: None + a note where kappa is undefined (official: NaN)
        assert np.isnan(want[0]) and m["notes"], (got, want)
        return
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_odir_thresholds_change_predictions():
    # O threshold 0.65: patient 1's O (.6) is no longer positive.
    # Flattened: TP 2, FP 0, FN 1, TN 13. po = 240/256, pe = (3*2 + 13*14)/256 = 188/256
    # kappa = (240-188)/(256-188) = 13/17; accuracy = F1 = 15/16; AUC unchanged 38/39.
    thresholds = [0.5] * 7 + [0.65]
    m = compute_metrics(ODIR, ODIR_TRUE, ODIR_PROBS, thresholds=thresholds)
    assert m["confusion_matrix"][7] == [[1, 0], [1, 0]]
    assert m["kappa"] == pytest.approx(13 / 17, abs=TOL)
    assert m["f1"] == pytest.approx(15 / 16, abs=TOL)
    assert m["auc"] == pytest.approx(38 / 39, abs=TOL)
    assert m["thresholds"] == thresholds
    # one threshold for all labels: 0.35 also flags patient 2's O (.4) -> TP 3, FP 1, TN 12
    # po = 240/256, pe = (3*4 + 13*12)/256 = 168/256 -> kappa 72/88 = 9/11
    assert compute_metrics(ODIR, ODIR_TRUE, ODIR_PROBS, thresholds=0.35)["kappa"] == pytest.approx(9 / 11, abs=TOL)


# --------------------------------------------------------------------------------------------
# ODIR per patient: the challenge scored one row per patient (both eyes). 2 patients x 2 eyes;
# every eye carries its patient's labels, as the ODIR-5K sheet gives them.
EYE_PATIENTS = ["a", "a", "b", "b"]
EYE_TRUE = np.array([[0, 1, 0, 0, 0, 0, 0, 1]] * 2 + [[1, 0, 0, 0, 0, 0, 0, 0]] * 2)  # a: D + O; b: N
EYE_PROBS = np.array(
    [
        [0.1, 0.8, 0.1, 0.1, 0.1, 0.1, 0.1, 0.3],  # a left:  D seen, O not
        [0.1, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.7],  # a right: O seen, D not
        [0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1],  # b left:  N
        [0.4, 0.6, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1],  # b right: N missed, D a false positive
    ]
)


def test_odir_per_patient_score_by_hand_differs_from_per_eye():
    m = compute_metrics(ODIR, EYE_TRUE, EYE_PROBS, patients=EYE_PATIENTS)
    # Per eye, 32 cells: TP 3 (a-l D, a-r O, b-l N), FN 3 (a-l O .3, a-r D .2, b-r N .4), FP 1
    # (b-r D .6), TN 25. F1 = accuracy = 28/32; pe = (6*4 + 26*28)/1024 = 752/1024 ->
    # kappa = (896-752)/(1024-752) = 9/17; AUC: of 6*26 pairs, .3 .2 .4 each lose to .6 -> 153/156.
    assert m["f1"] == pytest.approx(7 / 8, abs=TOL)
    assert m["kappa"] == pytest.approx(9 / 17, abs=TOL)
    assert m["auc"] == pytest.approx(51 / 52, abs=TOL)
    assert m["odir_score"] == pytest.approx((9 / 17 + 7 / 8 + 51 / 52) / 3, abs=TOL)
    # Per patient (max over the eyes), 16 cells: a = D .8, O .7; b = N .9, D .6 (still a false
    # positive). TP 3, FP 1, TN 12: F1 = 15/16; pe = (3*4 + 13*12)/256 = 168/256 ->
    # kappa = (240-168)/(256-168) = 9/11; AUC 1 (positives .9 .8 .7 above every negative, max .6).
    assert m["n"] == 4 and m["n_patients"] == 2
    assert m["f1_per_patient"] == pytest.approx(15 / 16, abs=TOL)
    assert m["kappa_per_patient"] == pytest.approx(9 / 11, abs=TOL)
    assert m["auc_per_patient"] == pytest.approx(1.0, abs=TOL)
    assert m["odir_score_per_patient"] == pytest.approx((9 / 11 + 15 / 16 + 1) / 3, abs=TOL)
    assert m["odir_score_per_patient"] > m["odir_score"] + 0.1
    json.dumps(m, allow_nan=False)


def test_patient_rows_take_the_max_over_the_eyes():
    rows = by_patient(EYE_TRUE, EYE_PROBS, EYE_PATIENTS)
    assert rows.ids == ["a", "b"] and rows.images.tolist() == [2, 2]
    np.testing.assert_array_equal(rows.labels, EYE_TRUE[[0, 2]])
    np.testing.assert_allclose(rows.probs[0], [0.1, 0.8, 0.1, 0.1, 0.1, 0.1, 0.1, 0.7])
    np.testing.assert_allclose(rows.probs[1], [0.9, 0.6, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    # labels too are the union (max) over the eyes where the eyes disagree; rows in id order
    rows = by_patient([[1, 0], [0, 1], [0, 0]], [[0.2, 0.9], [0.7, 0.1], [0.3, 0.3]], ["z", "z", "y"])
    assert rows.ids == ["y", "z"]
    np.testing.assert_array_equal(rows.labels, [[0, 0], [1, 1]])
    np.testing.assert_allclose(rows.probs, [[0.3, 0.3], [0.7, 0.9]])
    # a mean over a's eyes would give D .5 and O .5, both negative at the official `p > 0.5`
    # (F1 14/16 on those rows); the max keeps both findings (15/16)
    mean = np.array([EYE_PROBS[:2].mean(axis=0), EYE_PROBS[2:].mean(axis=0)])
    assert compute_metrics(ODIR, EYE_TRUE[[0, 2]], mean)["f1"] == pytest.approx(14 / 16, abs=TOL)
    m = compute_metrics(ODIR, EYE_TRUE, EYE_PROBS, patients=EYE_PATIENTS)
    assert m["f1_per_patient"] == pytest.approx(15 / 16, abs=TOL)
    with pytest.raises(ValueError, match="disagree"):
        by_patient(EYE_TRUE, EYE_PROBS, EYE_PATIENTS[:3])


@pytest.mark.parametrize("seed", range(60))
def test_odir_per_patient_scores_equal_the_official_code_on_patient_rows(seed):
    """The official ODIR_Metrics on per-patient rows built here, independently, by a loop."""
    rng = np.random.default_rng(1000 + seed)
    n_patients = int(rng.integers(3, 30))
    y_patient = (rng.random((n_patients, 8)) < rng.uniform(0.1, 0.6)).astype(int)
    y_patient[0, 0], y_patient[1, 0] = 1, 0  # both outcomes, so the AUC is defined
    eyes = rng.integers(1, 3, n_patients)  # one or two eye images per patient
    ids = np.repeat([f"p{i}" for i in range(n_patients)], eyes)
    y = np.repeat(y_patient, eyes, axis=0)  # every eye carries its patient's labels
    p = rng.random(y.shape) if seed % 2 else rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], y.shape)
    order = rng.permutation(len(y))  # eyes of a patient need not be adjacent
    y, p, ids = y[order], p[order], ids[order]
    m = compute_metrics(ODIR, y, p, patients=ids)
    gt = np.array([y[ids == i].max(axis=0) for i in sorted(set(ids))])
    pr = np.array([p[ids == i].max(axis=0) for i in sorted(set(ids))])
    want = official_odir_metrics(gt, pr)
    got = (m["kappa_per_patient"], m["f1_per_patient"], m["auc_per_patient"], m["odir_score_per_patient"])
    assert m["n_patients"] == n_patients
    if any(v is None for v in got):  # None + a note where kappa is undefined (official: NaN)
        assert np.isnan(want[0]) and "kappa_per_patient" in m["notes"], (got, want)
        return
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_per_patient_figures_need_every_patient_id_and_an_odir_task():
    m = compute_metrics(ODIR, EYE_TRUE, EYE_PROBS, patients=["a", "a", "", "b"])
    assert not [k for k in m if k.endswith("_per_patient")] and "n_patients" not in m
    assert m["notes"]["odir_score_per_patient"].startswith("omitted: 1 of 4 images have no patient id")
    assert "odir_score_per_patient" not in compute_metrics(ODIR, EYE_TRUE, EYE_PROBS)["notes"]  # not asked
    assert "n_patients" not in compute_metrics(OCT, OCT_TRUE, OCT_PROBS, patients=list("aabbccdd"))


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="thresholds do not apply"):
        compute_metrics(OCT, OCT_TRUE, OCT_PROBS, thresholds=[0.5] * 4)
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        compute_metrics(OCT, OCT_TRUE[:, :3], OCT_PROBS[:, :3])
    with pytest.raises(ValueError, match="NaN"):
        compute_metrics(OCT, OCT_TRUE, np.full_like(OCT_PROBS, np.nan))
    with pytest.raises(ValueError, match="one-hot"):
        compute_metrics(OCT, OCT_TRUE + np.eye(4)[[1] * 8], OCT_PROBS)


def test_every_task_extra_metric_is_registered():
    for spec in TASKS.values():
        assert set(spec.extra_metrics) <= set(EXTRA_METRICS), spec.name


# --------------------------------------------------------------------------------------------
# write_report


def _fake_oct(n_per_class=15, seed=0):
    """A realistic-looking 4-class result: mostly right, some DRUSEN/NORMAL and CNV/DME mix-ups."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(4), n_per_class)
    logits = rng.normal(size=(len(labels), 4)) + 2.2 * np.eye(4)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return np.eye(4)[labels], probs


HISTORY = [
    {
        "epoch": e,
        "phase": "head" if e <= 3 else "fine_tune",
        "loss": 1.3 / e,
        "accuracy": 0.5 + 0.06 * e,
        "val_loss": 1.4 / e + 0.05,
        "val_accuracy": 0.45 + 0.055 * e,
    }
    for e in range(1, 8)
]


def _check_png(path, min_side=300):
    assert path.is_file() and path.stat().st_size > 5_000, path
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert min_side <= min(img.size) and max(img.size) <= 4000, img.size


def test_write_report_oct(tmp_path):
    y, probs = _fake_oct()
    rng = np.random.default_rng(1)
    samples = {
        c: [rng.integers(0, 255, (48, 96, 3), dtype=np.uint8) for _ in range(k)]
        for c, k in zip(OCT.classes, (7, 3, 6, 1))
    }
    extra = {"backbone": "vgg16", "epochs": np.int64(7), "lr": np.float32(1e-3), "bad": float("nan")}
    m = write_report(OCT, tmp_path / "report", y_true=y, probs=probs, history=HISTORY, samples=samples, extra=extra)
    out = tmp_path / "report"
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == m
    for key in (
        "accuracy",
        "macro_f1",
        "auc",
        "confusion_matrix",
        "per_class",
        "n",
        "urgent_referral_auc",
        "notes",
        "history",
        "run",
        "plots",
    ):
        assert key in on_disk, key
    assert on_disk["run"] == {"backbone": "vgg16", "epochs": 7, "lr": pytest.approx(1e-3), "bad": None}
    assert set(on_disk["per_class"]) == set(OCT.classes)
    for name in ("curves.png", "confusion_matrix.png", "roc.png", "samples.png"):
        _check_png(out / name)
    assert sorted(on_disk["plots"]) == sorted(["curves.png", "confusion_matrix.png", "roc.png", "samples.png"])


def test_write_report_multilabel_and_binary_without_optional_inputs(tmp_path):
    rng = np.random.default_rng(2)
    y = (rng.random((30, 8)) < 0.25).astype(int)
    probs = np.clip(0.6 * y + rng.random((30, 8)) * 0.5, 0, 1)
    m = write_report(ODIR, tmp_path / "odir", y_true=y, probs=probs, thresholds=0.55)
    for key in ("kappa", "f1", "auc", "odir_score", "accuracy", "macro_f1", "per_class", "confusion_matrix"):
        assert key in m
    assert m["thresholds"] == [0.55] * 8 and len(m["confusion_matrix"]) == 8
    assert sorted(p.name for p in (tmp_path / "odir").iterdir()) == ["confusion_matrix.png", "metrics.json", "roc.png"]
    _check_png(tmp_path / "odir" / "confusion_matrix.png")

    y, probs = _glaucoma(rng.random(40), rng.integers(0, 2, 40))
    m = write_report(GLAUCOMA, str(tmp_path / "glaucoma"), y_true=y, probs=probs, history=HISTORY[:2])
    assert {"pauc_90_100", "sens_at_95_spec"} <= set(m)
    _check_png(tmp_path / "glaucoma" / "curves.png")


def test_write_report_remote_uploads_a_finished_directory(tmp_path, monkeypatch):
    published = {}

    def fake_publish(local_dir, uri, commit_file=None):
        published.update(uri=uri, commit_file=commit_file, files=sorted(p.name for p in Path(local_dir).iterdir()))

    monkeypatch.setattr("eyeray.storage.publish_dir", fake_publish)
    y, probs = _fake_oct(n_per_class=5)
    write_report(OCT, "s3://bucket/runs/1/eval", y_true=y, probs=probs)
    assert published == {
        "uri": "s3://bucket/runs/1/eval",
        "commit_file": "metrics.json",
        "files": ["confusion_matrix.png", "metrics.json", "roc.png"],
    }


class _Batches:
    """A stand-in for a decoded Ray Dataset: `iter_batches` over fixed batches."""

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def iter_batches(self, batch_size: int):
        yield from self.batches


def _eye_batch(ids: list[str] | None, labels: np.ndarray) -> dict:
    n = len(labels)
    batch = {"image": np.zeros((n, 8, 8, 3), np.uint8), "label": labels, "height": [8] * n, "width": [8] * n}
    return batch if ids is None else {**batch, "patient": np.array(ids, dtype=object)}


def test_inferred_test_split_carries_patient_ids_to_the_report(tmp_path):
    """The driver's path: infer() keeps each row's patient id beside its label and probabilities,
    write_report() puts the per-patient ODIR-2019 figures beside the per-eye ones."""
    from eyeray.evaluation.inference import infer

    probs = iter([EYE_PROBS[:3], EYE_PROBS[3:]])

    def model(images):
        return next(probs), np.zeros((len(images), 2))

    ds = _Batches([_eye_batch(EYE_PATIENTS[:3], EYE_TRUE[:3]), _eye_batch(EYE_PATIENTS[3:], EYE_TRUE[3:])])
    test = infer(model, ds, batch_size=3)
    assert test.patients.tolist() == EYE_PATIENTS
    m = write_report(ODIR, tmp_path / "odir", y_true=test.labels, probs=test.probs, patients=test.patients)
    on_disk = json.loads((tmp_path / "odir" / "metrics.json").read_text())
    assert on_disk["odir_score"] == pytest.approx(m["odir_score"]) == pytest.approx((9 / 17 + 7 / 8 + 51 / 52) / 3)
    assert on_disk["odir_score_per_patient"] == pytest.approx((9 / 11 + 15 / 16 + 1) / 3, abs=TOL)
    assert on_disk["n_patients"] == 2 and on_disk["n"] == 4
    # a dataset without a patient column: every id "", so the per-patient figures are omitted, with a note
    probs = iter([EYE_PROBS])
    test = infer(model, _Batches([_eye_batch(None, EYE_TRUE)]), batch_size=4)
    assert test.patients.tolist() == [""] * 4
    m = write_report(ODIR, tmp_path / "none", y_true=test.labels, probs=test.probs, patients=test.patients)
    assert "odir_score_per_patient" not in m and "no patient id" in m["notes"]["odir_score_per_patient"]
