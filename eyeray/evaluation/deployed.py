"""The test split as deployed, for the report: what calibration and the operating point fitted on
validation data do on the test split, the exported bundle's own decisions scored with the same
metrics as the argmax figures, what its gate answers, and bootstrap intervals.

`exported` is the bundle loaded back from disk (`eyeray.model.bundle.Bundle`): the report
describes what scoring and serving do, not the model in training memory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eyeray.decision import calibration, operating_points
from eyeray.decision.fitting import Decisions
from eyeray.evaluation import bootstrap
from eyeray.evaluation.inference import Inferred
from eyeray.evaluation.metrics import compute_metrics
from eyeray.evaluation.plots import DEPLOYED_CONFUSION_PNG, RELIABILITY_PNG, plot_confusion, plot_reliability
from eyeray.tasks import TaskSpec

Plot = Callable[[Path], None]


@dataclass
class Evaluation:
    """The report's decision-support sections and plots, and the deployed test metrics."""

    deployed: dict[str, Any]
    sections: dict[str, Any] = field(default_factory=dict)
    plots: dict[str, Plot] = field(default_factory=dict)


def evaluate(
    spec: TaskSpec,
    exported,
    validation: Inferred,
    test: Inferred,
    decisions: Decisions,
    gate: dict[str, Any] | None,
    seed: int = 0,
) -> Evaluation:
    """The report's view of the test split; `gate`: the manifest's gate section (None: no gate)."""
    sections, plots = decision_sections(spec, decisions, validation.pair, test.pair)
    deployed, deployed_plots = at_operating_point(spec, exported, *test.pair, patients=test.patients)
    sections["at_operating_point"] = deployed
    sections["gate"] = gate_section(spec, exported, test, gate)
    sections["bootstrap"] = bootstrap.confidence_intervals(spec, *test.pair, seed=seed)
    return Evaluation(deployed, sections, {**plots, **deployed_plots})


def decision_sections(
    spec: TaskSpec,
    decisions: Decisions,
    validation: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
) -> tuple[dict[str, Any], dict[str, Plot]]:
    """What calibration and the operating point do on validation and test (report sections) and
    the reliability diagram."""
    (y_val, p_val), (y_test, p_test) = validation, test
    params, op = decisions.calibration, decisions.operating_point
    val_cal, test_cal = calibration.apply(params, p_val), calibration.apply(params, p_test)
    sections: dict[str, Any] = {
        "calibration": {
            **params,
            "validation": calibration.summary(y_val, p_val, val_cal, spec.multi_label),
            "test": calibration.summary(y_test, p_test, test_cal, spec.multi_label),
        }
    }
    if op is None:
        sections["operating_point"] = {"rule": spec.operating_point, "note": decisions.note}
    else:
        sections["operating_point"] = {**op, "test": operating_points.achieved(op, y_test, test_cal)}

    def reliability(path: Path) -> None:
        title = f"{spec.title}\ntest split; calibration fitted on the validation split"
        plot_reliability(y_test, p_test, test_cal, spec.multi_label, path, title)

    return sections, {RELIABILITY_PNG: reliability}


def at_operating_point(
    spec: TaskSpec, exported, y_true: np.ndarray, raw: np.ndarray, patients: np.ndarray | None = None
) -> tuple[dict, dict[str, Plot]]:
    """Test metrics as deployed: the exported bundle's `decide` (calibrated probabilities, labels
    at its operating point) scored with the same metrics as the argmax figures (per patient too,
    given the rows' `patients`), the referral figures of `operating_points.achieved` (of the
    argmax's referrals for a bundle whose validation data chose no point), and the confusion matrix
    of those decisions."""
    decision = exported.decide(raw)
    decided = np.array([[c in row for c in spec.classes] for row in decision.labels], int)
    op = decision.operating_point
    thresholds = op.get("thresholds") if op is not None and spec.multi_label else None
    metrics = compute_metrics(spec, y_true, decision.probabilities, thresholds, decided=decided, patients=patients)
    metrics["decided_by"] = exported.manifest["decision"]
    if decision.referral is not None and op is not None:
        achieved = operating_points.achieved(op, y_true, decision.probabilities)
    elif decision.referral is not None:  # no point chosen on validation: the bundle refers by its argmax
        referable = np.asarray(y_true)[:, [spec.classes.index(c) for c in spec.referral_classes]].any(axis=1)
        achieved = operating_points.referral_rates(referable, decision.referral)
    if decision.referral is not None:
        metrics.update({f"referral_{k}": achieved[k] for k in ("sensitivity", "specificity")})
        metrics.update({k: achieved[k] for k in ("referred", "referable")})

    def confusion(path: Path) -> None:
        plot_confusion(spec, y_true, decided, path, 0.5 if spec.multi_label else None)

    return metrics, {DEPLOYED_CONFUSION_PNG: confusion}


def gate_section(spec: TaskSpec, exported, test: Inferred, section: dict[str, Any] | None) -> dict[str, Any]:
    """What the gate does on the test split: the share answered, the declined by reason, and the
    accuracy of the argmax on all test images and on the answered ones (the gate should not lower it)."""
    if section is None:
        return {"method": "none"}
    verdict = exported.gate.verdict(test.features, test.stats)
    answered = ~verdict.declined
    reasons = [f"{v}: {r}" if r else str(v) for v, r in zip(verdict.verdict[~answered], verdict.reason[~answered])]
    report = {
        **{k: v for k, v in section.items() if k not in ("quality", "file", "sha256")},
        "test_images": len(answered),
        "test_answered": float(answered.mean()) if len(answered) else None,
        "test_declined_by_reason": {r: reasons.count(r) for r in sorted(set(reasons))},
    }
    if not spec.multi_label:
        correct = test.labels.argmax(axis=1) == test.probs.argmax(axis=1)
        report["test_accuracy_all"] = float(correct.mean())
        report["test_accuracy_answered"] = float(correct[answered].mean()) if answered.any() else None
    return report
