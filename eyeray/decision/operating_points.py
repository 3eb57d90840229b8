"""Operating points: decision thresholds chosen on validation data and stored in the bundle.

A screening model is used at a threshold, not at "argmax": AIROGS judges glaucoma referral at
95 % specificity, Kermany et al. report OCT urgent referral (CNV or DME) at high sensitivity, and
a flat 0.5 per label wastes a multi-label model whose rare labels never reach 0.5. Which rule a
task uses is data (`TaskSpec.operating_point`, "RULE:TARGET"); the rules are `RULES`.

A rate target is chosen *with a stated confidence* (`CONFIDENCE`): the threshold is the most
specific (sensitivity rules) or most sensitive (specificity rules) one whose one-sided
Clopper-Pearson lower bound on the validation data meets the target, not the one whose point
estimate does. Why: 34 referable validation images at 34 of 34 only show sensitivity >= 0.92 with
95 % confidence, and a threshold chosen on the point estimate missed 95 % on new patients in two of
two real runs (issue 25). Where no threshold can certify the target, the rule takes the most
conservative one (every validation case of the guarded class on the safe side) and says so in the
manifest's `certified` section: the bound it does certify and the counts behind it.
`confidence=None` is the earlier point-estimate rule (benchmarks compare the two).

The chosen point is a JSON dict for the manifest (`choose`), read back by `referral` and
`decisions`, which also take a user override. Thresholds apply to *calibrated* probabilities
(`eyeray.decision.calibration.apply` first; `decide` does both). A stored threshold sits halfway between
the last validation score it refers and the next lower one, so `>=` and `>` agree on the data it
was chosen on, and the numbers in `achieved` are those of the stored threshold itself.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import precision_recall_curve, precision_recall_fscore_support, roc_curve

from eyeray.decision import roc
from eyeray.tasks import TaskSpec

APPLIES_TO = "calibrated probabilities (apply the manifest's calibration first)"
CONFIDENCE = 0.95  # one-sided confidence that a chosen threshold meets its rate target
DEFAULT_LABEL_THRESHOLD = roc.DEFAULT_THRESHOLD


@dataclass(frozen=True)
class Rule:
    """A parsed `TaskSpec.operating_point`: "referral_specificity:0.95" -> ("referral_specificity", 0.95)."""

    name: str
    target: float | None = None

    @classmethod
    def parse(cls, text: str) -> Rule | None:
        if not text:
            return None
        name, _, target = text.partition(":")
        if name not in RULES:
            raise ValueError(f"unknown operating-point rule {name!r}; known: {', '.join(RULES)}")
        return cls(name, float(target) if target else None)


# ---------------------------------------------------------------------------------------------
# Choosing, on validation data


def _cut(score: np.ndarray, lowest_referred: float) -> float:
    """A threshold that refers exactly `score >= lowest_referred`, with `>=` as with `>`."""
    below = score[score < lowest_referred]
    if not math.isfinite(lowest_referred):  # the rule refers nobody
        return float(np.nextafter(np.float32(score.max()), np.float32(np.inf)))
    if below.size == 0:  # the rule refers everybody
        return float(np.nextafter(np.float32(lowest_referred), np.float32(-np.inf)))
    return float((lowest_referred + below.max()) / 2)


# the rate each referral rule guards: (metric, who it counts, the ROC point of the point-estimate rule)
_GUARDED = {
    "referral_sensitivity": ("sensitivity", "referable", roc.roc_point_at_sensitivity),
    "referral_specificity": ("specificity", "non-referable", roc.roc_point_at_specificity),
}


def lower_bound(successes: int, trials: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Clopper-Pearson lower confidence bound of a binomial proportion: with this
    confidence, the true rate is at least this, having seen `successes` of `trials`."""
    from scipy.stats import beta

    if not 0 <= successes <= trials or trials < 1:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes} of {trials}")
    return 0.0 if successes == 0 else float(beta.ppf(1 - confidence, successes, trials - successes + 1))


def interval(successes: int, trials: int, confidence: float = CONFIDENCE) -> list[float] | None:
    """Two-sided Clopper-Pearson interval of a proportion (None without trials): the report's test figures."""
    from scipy.stats import binomtest

    if trials < 1:
        return None
    ci = binomtest(successes, trials).proportion_ci(confidence_level=confidence, method="exact")
    return [float(ci.low), float(ci.high)]


def cases_needed(target: float, confidence: float = CONFIDENCE) -> int:
    """The fewest cases that can certify `target` at all: n of n must have a lower bound >= target."""
    return math.ceil(math.log(1 - confidence) / math.log(target))


def validation_shortfall(spec: TaskSpec, y_val, confidence: float | None, val_fraction: float) -> str | None:
    """Before training: a warning when the validation split has too few cases of the guarded group
    to certify the task's rate target at `confidence`, with a validation share that would; None when
    it has enough (or the task has no rate target, or confidence is None)."""
    rule = Rule.parse(spec.operating_point)
    if confidence is None or rule is None or rule.name not in _GUARDED:
        return None
    target = rule.target if rule.target is not None else DEFAULT_TARGETS[rule.name]
    metric, who, _ = _GUARDED[rule.name]
    y = np.asarray(y_val)
    referable = y[:, [spec.class_index(c) for c in spec.referral_classes]].any(axis=1) if len(y) else np.zeros(0, bool)
    guarded = int(referable.sum() if metric == "sensitivity" else (~referable).sum())
    needed = cases_needed(target, confidence)
    if guarded >= needed:
        return None
    most = lower_bound(guarded, guarded, confidence) if guarded else 0.0
    share = f" (--val-fraction about {min(0.5, val_fraction * needed / guarded):.2f})" if guarded else ""
    return (
        f"the validation split holds {guarded} {who} images: they certify at most {most:.3f} {metric} at "
        f"{confidence:.0%} confidence, and {needed} (none missed) are needed for the target {target}. "
        f"The operating point will be the most conservative threshold; a larger validation split{share} "
        "would let it certify the target, at the cost of training images"
    )


def _certified_point(name: str, y: np.ndarray, score: np.ndarray, target: float, confidence: float):
    """(lowest referred score, certified section) of the certified rule `name` (see the module doc)."""
    metric, who, _ = _GUARDED[name]
    roc.require_both_classes(y, f"{metric} at a certified threshold")
    fpr, tpr, thresholds = roc_curve(y, score, drop_intermediate=False)
    guarded = int(y.sum()) if metric == "sensitivity" else int(len(y) - y.sum())
    hits = np.rint((tpr if metric == "sensitivity" else 1 - fpr) * guarded).astype(int)
    from scipy.stats import beta

    # lower_bound at every point of the curve at once (thousands of validation images: thousands of points)
    bounds = np.where(hits > 0, beta.ppf(1 - confidence, np.maximum(hits, 1), guarded - hits + 1), 0.0)
    ok = np.flatnonzero(bounds >= target)
    # sensitivity grows along the curve (take the first point that certifies), specificity falls (the last);
    # none certifies: the same end of the points with the best bound (all of the guarded group safe)
    candidates = ok if ok.size else np.flatnonzero(bounds == bounds.max())
    i = candidates[0] if metric == "sensitivity" else candidates[-1]
    bound = float(bounds[i])
    certified = {
        "metric": metric,
        "confidence": confidence,
        "method": "one-sided Clopper-Pearson lower bound on the validation split",
        "bound": bound,
        "successes": int(hits[i]),
        "trials": guarded,
        "meets_target": bool(ok.size),
        "statement": (
            f"{hits[i]} of {guarded} {who} validation images: {metric} >= {bound:.3f} "
            f"at {confidence:.0%} confidence (target {target})"
            if ok.size
            else f"{guarded} {who} validation images certify at most {bound:.3f} {metric} at {confidence:.0%} "
            f"confidence, short of the target {target}: the most conservative threshold was taken"
        ),
    }
    return float(thresholds[i]), certified


def _referral_rule(name: str) -> Callable[..., dict[str, Any]]:
    """A rule on the summed probability of `spec.referral_classes`, cut where its guarded rate is
    certified at `confidence` (or, with confidence None, where its point estimate meets the target)."""

    def choose(spec: TaskSpec, y_true, probs, target: float, confidence: float | None = CONFIDENCE) -> dict[str, Any]:
        truth, score = roc.referral_case(spec, y_true, probs)
        out = {
            "score": " + ".join(f"P({c})" for c in spec.referral_classes),
            "score_columns": [spec.class_index(c) for c in spec.referral_classes],
        }
        if confidence is None:
            lowest_referred, _, _ = _GUARDED[name][2](truth, score, target)
            return {**out, "threshold": _cut(score, lowest_referred)}
        lowest_referred, certified = _certified_point(name, truth, score, target, confidence)
        return {**out, "threshold": _cut(score, lowest_referred), "certified": certified}

    return choose


def _per_label_f1(spec: TaskSpec, y_true, probs, target: float | None = None, confidence=None) -> dict[str, Any]:
    """Per label, the threshold with the highest validation F1 (ties: the lower, more sensitive one).
    A label without positives in the validation data keeps the default 0.5 (named in `notes`).
    F1 has no binomial bound, so `confidence` does not apply; `positives` says how many validation
    cases each threshold rests on."""
    y, p = roc.check_labels(spec, y_true, probs)
    thresholds, notes = [], {}
    for k, name in enumerate(spec.classes):
        if y[:, k].min() == y[:, k].max():
            thresholds.append(DEFAULT_LABEL_THRESHOLD)
            notes[name] = f"kept {DEFAULT_LABEL_THRESHOLD}: only one outcome in the validation data"
            continue
        precision, recall, candidates = precision_recall_curve(y[:, k], p[:, k])
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        thresholds.append(_cut(p[:, k], float(candidates[int(np.argmax(f1[:-1]))])))
    out: dict[str, Any] = {
        "labels": list(spec.classes),
        "thresholds": thresholds,
        "referral_columns": [spec.class_index(c) for c in spec.referral_classes],
        "positives": {c: int(v) for c, v in zip(spec.classes, y.sum(axis=0))},
    }
    return {**out, "notes": notes} if notes else out


RULES: dict[str, Callable[..., dict[str, Any]]] = {
    "referral_specificity": _referral_rule("referral_specificity"),
    "referral_sensitivity": _referral_rule("referral_sensitivity"),
    "per_label_f1": _per_label_f1,
}
DEFAULT_TARGETS = {"referral_specificity": roc.TARGET_SPECIFICITY, "referral_sensitivity": 0.95}


def choose(
    spec: TaskSpec, y_true, probs, rule: str | None = None, confidence: float | None = CONFIDENCE
) -> dict[str, Any] | None:
    """The operating point of `spec` (or `rule`, "RULE:TARGET"), chosen on these (validation)
    labels and calibrated probabilities; None when the task has no rule. A rate target is met
    with `confidence` (None: on the point estimate, the rule before certification).

    Raises roc.UndefinedMetric when the data cannot define it (e.g. no referable case).
    """
    parsed = Rule.parse(spec.operating_point if rule is None else rule)
    if parsed is None:
        return None
    target = parsed.target if parsed.target is not None else DEFAULT_TARGETS.get(parsed.name)
    op = {
        "rule": parsed.name,
        **({"target": target} if target is not None else {}),
        **RULES[parsed.name](spec, y_true, probs, target, confidence),
        "classes": list(spec.classes),
        "applies_to": APPLIES_TO,
        "chosen_on": "validation",
        "n": len(np.asarray(y_true)),
    }
    op["achieved"] = achieved(op, y_true, probs)
    return op


# ---------------------------------------------------------------------------------------------
# Using it


def _per_label(op: dict[str, Any]) -> bool:
    return "thresholds" in op


def fixed_point(
    classes: Sequence[str],
    multi_label: bool,
    referral_classes: Sequence[str] = (),
    thresholds: float | Sequence[float] | None = None,
) -> dict[str, Any]:
    """The point of a model without a chosen one: argmax (single-label), or per label
    `p >= thresholds` (0.5 unless given); referral when a decided label is a referral class."""
    classes = list(classes)
    referral_columns = [classes.index(c) for c in referral_classes]
    if not multi_label:
        if thresholds is not None:
            raise ValueError(
                "a single-label model decides by argmax: thresholds do not apply without an operating point"
            )
        return {"rule": "argmax", "classes": classes, "referral_columns": referral_columns}
    values = np.broadcast_to(
        np.asarray(DEFAULT_LABEL_THRESHOLD if thresholds is None else thresholds, np.float64), (len(classes),)
    )
    return {
        "rule": "fixed",
        "labels": classes,
        "thresholds": [float(t) for t in values],
        "referral_columns": referral_columns,
    }


def with_override(op: dict[str, Any], thresholds: float | Sequence[float] | dict[str, float] | None) -> dict[str, Any]:
    """`op` with user thresholds: one number (referral rules), a list with one per label, or
    {label: threshold} for some labels. The validation figures no longer apply and are dropped."""
    if thresholds is None:
        return op
    if op["rule"] == "argmax":
        raise ValueError("this model decides by argmax (no operating point), so it has no thresholds to override")
    out = {k: v for k, v in op.items() if k not in ("achieved", "chosen_on", "n", "certified")}
    out["chosen_on"] = "user override"
    if not _per_label(op):
        values = np.ravel(np.asarray(thresholds, np.float64)) if not isinstance(thresholds, dict) else []
        if len(values) != 1:
            raise ValueError(f"{op['rule']} takes one threshold on {op['score']}, got {thresholds!r}")
        return {**out, "threshold": float(values[0])}
    labels = op["labels"]
    if isinstance(thresholds, dict):
        unknown = set(thresholds) - set(labels)
        if unknown:
            raise ValueError(f"unknown labels {sorted(unknown)}; labels are {', '.join(labels)}")
        return {**out, "thresholds": [float(thresholds.get(c, t)) for c, t in zip(labels, op["thresholds"])]}
    values = np.broadcast_to(np.asarray(thresholds, np.float64), (len(labels),))
    return {**out, "thresholds": [float(v) for v in values]}


def referral_score(op: dict[str, Any], probs) -> np.ndarray:
    """The score a referral rule thresholds, e.g. P(CNV) + P(DME), in float64."""
    return np.asarray(probs, np.float64)[:, op["score_columns"]].sum(axis=1)


def decisions(op: dict[str, Any], probs, thresholds=None) -> np.ndarray:
    """0/1 (n, classes) labels at the operating point: the one rule from probabilities to labels.

    Per-label points: `p >= threshold` per label. Argmax: the most probable class. Referral
    rules: a referred case gets the most probable referral class, any other the most probable
    of the rest, so the label always agrees with the referral (glaucoma: RG exactly when
    P(RG) >= threshold).
    """
    op = with_override(op, thresholds)
    p = np.asarray(probs, np.float64)
    if _per_label(op):
        return (p >= np.asarray(op["thresholds"], np.float64)).astype(int)
    if op["rule"] == "argmax":
        return np.eye(p.shape[1], dtype=int)[p.argmax(axis=1)] if len(p) else np.zeros(p.shape, int)
    refer = referral_score(op, p) >= op["threshold"]
    in_group = np.zeros(p.shape[1], bool)
    in_group[op["score_columns"]] = True
    rest = ~in_group if (~in_group).any() else in_group
    masked = np.where(np.where(refer[:, None], in_group, rest), p, -np.inf)
    return np.eye(p.shape[1], dtype=int)[masked.argmax(axis=1)]


def referral(op: dict[str, Any], probs, thresholds=None) -> np.ndarray | None:
    """Bool (n,): refer this case. None when the point defines no referral (no referral classes)."""
    op = with_override(op, thresholds)
    if "score_columns" in op:
        return referral_score(op, probs) >= op["threshold"]
    columns = op.get("referral_columns") or []
    return decisions(op, probs)[:, columns].any(axis=1).astype(bool) if columns else None


def _rate(hits: np.ndarray, of: np.ndarray) -> float | None:
    return float(hits[of].mean()) if of.any() else None


def referral_rates(truth: np.ndarray, refer: np.ndarray) -> dict[str, Any]:
    """Sensitivity and specificity of the referrals `refer` (bool (n,)) against the referable
    cases `truth`, with their counts and 95 % intervals."""
    truth, refer = np.asarray(truth, bool), np.asarray(refer, bool)
    caught, cleared = int((refer & truth).sum()), int((~refer & ~truth).sum())
    return {
        "sensitivity": _rate(refer, truth),
        "specificity": _rate(~refer, ~truth),
        "referred": int(refer.sum()),
        "referable": int(truth.sum()),
        "n": len(truth),
        "referable_referred": caught,
        "non_referable_cleared": cleared,
        "sensitivity_ci95": interval(caught, int(truth.sum())),
        "specificity_ci95": interval(cleared, int((~truth).sum())),
    }


def achieved(op: dict[str, Any], y_true, probs) -> dict[str, Any]:
    """What the operating point does on labelled data (validation when chosen; test in the report)."""
    y = np.asarray(y_true).astype(bool)
    if not _per_label(op):
        return referral_rates(y[:, op["score_columns"]].any(axis=1), referral(op, probs))
    d = decisions(op, probs)
    default = (np.asarray(probs, np.float64) >= DEFAULT_LABEL_THRESHOLD).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        precision, recall, f1, _ = precision_recall_fscore_support(y, d, zero_division=0)
        f1_default = precision_recall_fscore_support(y, default, zero_division=0)[2]
    labels = op["labels"]
    return {
        "f1": _by_label(labels, f1),
        "precision": _by_label(labels, precision),
        "recall": _by_label(labels, recall),
        f"f1_at_{DEFAULT_LABEL_THRESHOLD}": _by_label(labels, f1_default),
        "n": len(y),
    }


def _by_label(labels: Sequence[str], values) -> dict[str, float]:
    return {c: float(v) for c, v in zip(labels, values)}


def mean_operating_point(manifests: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The operating point of an averaging ensemble: the members' rule with their thresholds
    averaged (the members' validation figures do not carry over). None unless all members have
    the same rule."""
    ops = [m.get("operating_point") for m in manifests]
    if any(op is None for op in ops) or len({op["rule"] for op in ops}) != 1:
        return None
    out = {k: v for k, v in ops[0].items() if k not in ("achieved", "n", "notes", "certified", "positives")}
    out["chosen_on"] = "mean of the members' validation thresholds"
    key = "thresholds" if _per_label(ops[0]) else "threshold"
    out[key] = np.mean([np.asarray(op[key], np.float64) for op in ops], axis=0).tolist()
    return out


def summary(op: dict[str, Any] | None) -> dict[str, Any] | None:
    """The operating point as scoring rows and API answers carry it: rule, target, threshold(s)
    and where they come from (validation, or a user override); no validation tables."""
    if op is None:
        return None
    keep = ("rule", "target", "score", "threshold", "chosen_on", "members")
    out = {k: op[k] for k in keep if k in op}
    if _per_label(op):
        out["thresholds"] = _by_label(op["labels"], op["thresholds"])
    return out


def parse_thresholds(text: str | None) -> float | list[float] | dict[str, float] | None:
    """A threshold override as users type it (CLI flag, query parameter): "0.3" (referral rules),
    "0.3,0.4,..." (one per label) or "D=0.3,G=0.2" (some labels); None or "" for none."""
    if text is None or not str(text).strip():
        return None
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    try:
        if all("=" in x for x in items):
            pairs = [x.split("=", 1) for x in items]
            out: float | list[float] | dict[str, float] = {k.strip(): float(v) for k, v in pairs}
            values = list(out.values())
        elif any("=" in x for x in items):
            raise ValueError("mixes label=value and plain values")
        else:
            values = [float(x) for x in items]
            out = values[0] if len(values) == 1 else values
    except ValueError as exc:
        raise ValueError(f"thresholds {text!r}: {exc}; write 0.3, 0.3,0.4,... or LABEL=0.3,LABEL=0.2") from None
    if not all(0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"thresholds {text!r}: every threshold must be between 0 and 1")
    return out
