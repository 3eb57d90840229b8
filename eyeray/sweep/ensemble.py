"""The top K trials of a sweep together on the test split: averaged probabilities and majority
vote (eyeray.decision.ensemble.combine, as batch scoring uses it), against the single best model.

Every trial split the same data the same way, so they share one test split; each bundle sees it
at its own input size, and rows are matched by file path.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from eyeray.tasks import TaskSpec

REPORTED = ("accuracy", "macro_f1", "auc")


def _probabilities(loaded, records: list[dict]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """path -> probabilities, path -> label, for one bundle over the test records."""
    from eyeray.data.records import decoded, decoded_dataset

    probs, labels = {}, {}
    ds = decoded_dataset(records, loaded.image_size).filter(expr=decoded())
    for batch in ds.iter_batches(batch_size=32):
        for path, label, p in zip(batch["path"], batch["label"], loaded.predict(batch["image"])):
            probs[str(path)], labels[str(path)] = p, label
    return probs, labels


def _summary(spec: TaskSpec, y: np.ndarray, scores: np.ndarray, thresholds=None) -> dict[str, Any]:
    from eyeray.evaluation.metrics import compute_metrics

    m = compute_metrics(spec, y, scores, thresholds=thresholds if spec.multi_label else None)
    return {key: m.get(key) for key in dict.fromkeys((spec.selection_metric, *REPORTED))}


def _vote_scores(spec: TaskSpec, shares: np.ndarray, labels: list[list[str]]) -> tuple[np.ndarray, list | None]:
    """Vote shares as scores, nudged so the metrics decide exactly as `combine` did (its tie-break
    for single-label; "more than half" for multi-label). Single-label: no thresholds (argmax)."""
    if spec.multi_label:
        return shares, [0.5 + 1e-6] * spec.num_classes
    scores = shares.copy()
    for row, chosen in enumerate(labels):
        scores[row, spec.class_index(chosen[0])] += 1e-6
    return scores, None


def evaluate_top(rows: list[dict[str, Any]], cfg, spec: TaskSpec, data: str, layout=None) -> dict[str, Any]:
    """Test-split figures of the top `cfg.ensemble_top` finished trials, alone and combined.
    `layout`: `data`'s layout as the sweep's preflight read it (None: read here)."""
    from eyeray.data.layouts import read_layout
    from eyeray.decision.ensemble import combine
    from eyeray.model import bundle

    top = [r for r in rows if r["status"] == "finished"][: cfg.ensemble_top]
    out: dict[str, Any] = {"k": cfg.ensemble_top, "metric": spec.selection_metric}
    if len(top) < 2:
        return {
            **out,
            "members": [{"trial_id": r["trial_id"]} for r in top],
            "note": f"only {len(top)} trial(s) finished: an ensemble needs 2",
        }
    if layout is None:
        layout = read_layout(spec, data, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction)
    records = layout.splits["test"]
    loaded = [bundle.load(r["bundle"]) for r in top]
    outputs = [_probabilities(b, records) for b in loaded]
    paths = sorted(set.intersection(*(set(p) for p, _ in outputs)))
    y = np.stack([outputs[0][1][p] for p in paths])
    probs = [np.stack([p[path] for path in paths]) for p, _ in outputs]
    manifests = [b.manifest for b in loaded]

    members = [
        {"trial_id": r["trial_id"], **_summary(spec, y, p, m["thresholds"])} for r, p, m in zip(top, probs, manifests)
    ]
    mean_scores = combine(manifests, probs, "mean").probabilities
    mean_thresholds = np.mean([m["thresholds"] for m in manifests], axis=0).tolist()
    vote = combine(manifests, probs, "vote")
    shares, voted = vote.probabilities, vote.labels
    vote_scores, vote_thresholds = _vote_scores(spec, shares, voted)
    best = members[0][spec.selection_metric]
    out.update(
        members=members,
        n_test=len(paths),
        best_single=best,
        mean=_summary(spec, y, mean_scores, mean_thresholds),
        vote=_summary(spec, y, vote_scores, vote_thresholds),
    )
    for method in ("mean", "vote"):
        value = out[method][spec.selection_metric]
        out[f"{method}_beats_best"] = bool(value is not None and best is not None and value > best)
    return out
