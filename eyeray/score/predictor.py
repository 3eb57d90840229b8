"""The model stage of batch scoring: a Ray Data callable class that loads the bundles once per
actor and turns decoded images into decision columns (the gate's verdict, calibrated probabilities,
labels, referral, confidence, needs_review, Grad-CAM overlays). It can be called on a plain dict,
without Ray."""

from __future__ import annotations

import numpy as np

from eyeray.decision import calibration, ensemble, gate
from eyeray.decision.options import DecisionOptions
from eyeray.model.options import InferenceOptions
from eyeray.score import overlays, routing, shards
from eyeray.score.explain_plan import ExplainPlan


def image_column(size: int, primary: int) -> str:
    """The decode stage's column holding images resized for a model of input `size`."""
    return "image" if size == primary else f"image_{size}"


class BundlePredictor:
    """Ray Data callable class: loads the bundles once per actor; adds the decision columns.

    With several bundles of a task, each predicts from the image column of its own input size and
    the results combine (`eyeray.decision.ensemble`); per-model calibrated probabilities stay in the
    rows. Bundles of several tasks (`eyeray.score.routing`): each task's columns, prefixed with its
    name, for the shard writer to route by the gates. Grad-CAM models are built once per actor, on
    the first row that needs one."""

    def __init__(
        self,
        bundle_uris: list[str],
        method: str = "mean",
        primary_size: int | None = None,
        decision: DecisionOptions = DecisionOptions(),
        inference: InferenceOptions = InferenceOptions(),
        explain: str = "none",
        output: str | None = None,
        batch_size: int = 32,
    ):
        from eyeray.model import bundle
        from eyeray.model.devices import configure_gpus

        configure_gpus()  # before the first model: actors with fractional GPUs share one
        self.bundles = [bundle.load(uri, inference=inference) for uri in bundle_uris]
        self.batch_size = batch_size  # images per model call (`eyeray.model.compiled` pads up to a few sizes)
        self.manifests = [b.manifest for b in self.bundles]
        self.groups = routing.group(self.manifests, decision.gate)
        self.method, self.decision = method, decision
        self.thresholds = decision.override
        self.plan, self.output, self._cams = ExplainPlan.parse(explain), output, {}
        self.primary = primary_size or min(b.image_size for b in self.bundles)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray([e == "" for e in batch["error"]], bool)
        out = {k: v for k, v in batch.items() if not k.startswith("image")}
        if len(self.groups) == 1:
            out.update(self._task_columns(self.groups[0], batch, ok))
        else:
            for g in self.groups:
                prefix = f"{g.task}{routing.SEPARATOR}"
                out.update({prefix + k: v for k, v in self._task_columns(g, batch, ok).items()})
        return out

    def _task_columns(self, group: routing.TaskGroup, batch: dict[str, np.ndarray], ok) -> dict[str, np.ndarray]:
        """One task's decision columns for the batch: its bundles' gate and decision, combined."""
        bundles = [self.bundles[i] for i in group.members]
        classes = bundles[0].classes
        images = [batch[image_column(b.image_size, self.primary)][ok] for b in bundles]
        inferred = [b.infer(x, self.batch_size) for b, x in zip(bundles, images)]
        per_model = [probs for probs, _ in inferred]
        sizes = np.asarray(batch["height"])[ok], np.asarray(batch["width"])[ok]
        verdict = gate.combine(
            [b.verdict(x, f, *sizes, self.decision.gate) for b, x, (_, f) in zip(bundles, images, inferred)]
        )
        decision = ensemble.combine(
            group.manifests, per_model, self.method, self.thresholds, self.decision.review_below, verdict
        )
        sure, review = decision.confidence(), decision.needs_review()
        out = {
            "gate": _spread(ok, verdict.verdict, "", object),
            "gate_reason": _spread(ok, verdict.reason, "", object),
            "gate_score": _spread(ok, verdict.score, np.nan, np.float32),
            "probabilities": _spread(ok, decision.probabilities, np.nan, np.float32),
            "label": _spread(ok, [shards.LABEL_SEPARATOR.join(x) for x in decision.labels], "", object),
        }
        refer = decision.referral if decision.referral is not None else np.full(len(sure), np.nan)
        out["referral"] = _spread(ok, np.asarray(refer, np.float32), np.nan, np.float32)
        out["confidence"] = _spread(ok, sure, np.nan, np.float32)
        out["needs_review"] = _spread(ok, review, False, bool)
        if self.plan.active:
            in_volume = np.asarray(batch.get("frame", np.full(len(ok), -1)))[ok] >= 0
            maps, names = self._heatmaps(group.task, bundles, images, decision, review, in_volume)
            out[overlays.HEATMAPS] = overlays.heatmap_column(_spread_list(ok, maps, np.zeros((0, 1, 1), np.float16)))
            out[overlays.EXPLAINED] = _spread(ok, names, "", object)
        else:
            out["explanations"] = np.full(len(ok), "", dtype=object)
        if len(bundles) > 1:
            members = [calibration.apply(m.get("calibration"), p) for m, p in zip(group.manifests, per_model)]
            out["model_probabilities"] = _spread(
                ok,
                np.stack(members, axis=1) if len(sure) else np.zeros((0, len(bundles), len(classes))),
                np.nan,
                np.float32,
            )
        return out

    def _heatmaps(self, task: str, bundles, images, decision, review, in_volume) -> tuple[list[np.ndarray], list[str]]:
        """Per decoded row: the Grad-CAM maps (k, h, w) of the classes the plan selects, and those
        classes' names; the overlay stage (`eyeray.score.overlays`) draws them on the originals."""
        from eyeray.model.gradcam import GradCam, ensemble_heatmaps

        classes, n = bundles[0].classes, len(decision.labels)
        pairs = self.plan.pairs(decision, review, classes, in_volume)
        maps, names = [np.zeros((0, 1, 1), np.float32)] * n, [""] * n
        if not pairs:
            return maps, names
        if task not in self._cams:
            self._cams[task] = [GradCam(b.model) for b in bundles]
        heat = ensemble_heatmaps(self._cams[task], images, [i for i, _ in pairs], [k for _, k in pairs])
        for i in sorted({i for i, _ in pairs}):
            mine = [j for j, (row, _) in enumerate(pairs) if row == i]
            maps[i] = heat[mine]
            names[i] = shards.LABEL_SEPARATOR.join(classes[pairs[j][1]] for j in mine)
        return maps, names


def _spread_list(ok: np.ndarray, values: list, fill) -> list:
    """Like `_spread`, for per-row objects of different shapes."""
    out, found = [fill] * len(ok), iter(values)
    for i in np.flatnonzero(ok):
        out[i] = next(found)
    return out


def _spread(ok: np.ndarray, values, fill, dtype) -> np.ndarray:
    """Values of the decoded rows, placed among all rows of the batch; `fill` for error rows."""
    values = np.asarray(values, dtype=dtype) if dtype is not object else np.array(values, dtype=object)
    out = np.empty((len(ok), *values.shape[1:]), dtype=dtype)
    out[...] = fill
    out[ok] = values
    return out
