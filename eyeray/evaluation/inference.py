"""One split as a model sees it, streamed by Ray Data: labels, outputs, pooled features and the
quality statistics the gate checks. Training infers the validation split (calibration, operating
point, gate threshold), the training split (the gate's reference) and the test split (the report)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from eyeray.data import quality


@dataclass
class Inferred:
    labels: np.ndarray
    probs: np.ndarray
    features: np.ndarray
    stats: dict[str, np.ndarray]
    # (n,) patient id of each row ("": unknown; all "" when the dataset has no patient column)
    patients: np.ndarray | None = None

    @property
    def pair(self) -> tuple[np.ndarray, np.ndarray]:
        return self.labels, self.probs


def infer(model: Callable, ds, batch_size: int, limit: int | None = None, watch: Callable | None = None) -> Inferred:
    """Ray Data streams decoded batches of one split (its first `limit` rows) to `model` (uint8
    images -> (outputs, pooled features): `Bundle.infer`, or a two-output `CompiledModel`).
    `watch(images, labels, outputs)` sees every batch (the model card keeps its worst few). The
    rows' patient ids come from the dataset's `patient` column ("" for every row without one)."""
    parts: dict[str, list] = {"labels": [], "probs": [], "features": [], "patients": []}
    stats: list[dict[str, np.ndarray]] = []
    for batch in (ds.limit(limit) if limit else ds).iter_batches(batch_size=batch_size):
        probs, features = model(batch["image"])
        parts["labels"].append(batch["label"])
        parts["probs"].append(np.asarray(probs, np.float32))
        parts["features"].append(np.asarray(features, np.float32))
        ids = batch["patient"] if "patient" in batch else [""] * len(batch["label"])
        parts["patients"].append(np.asarray([str(i) for i in ids], dtype=object))
        if watch is not None:
            watch(batch["image"], batch["label"], parts["probs"][-1])
        stats.append(quality.statistics(batch["image"], batch["height"], batch["width"]))
    return Inferred(
        *(np.concatenate(parts[k]) for k in ("labels", "probs", "features")),
        {k: np.concatenate([s[k] for s in stats]) for k in stats[0]},
        np.concatenate(parts["patients"]),
    )
