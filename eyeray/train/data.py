"""The data stage of a training run: the layout read (or the embedded default generated), every
split decoded once into Ray's object store, and the datasets the trainer streams."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from eyeray.data import synthetic
from eyeray.data.layouts import Layout
from eyeray.data.records import Decoded
from eyeray.tasks import TaskSpec
from eyeray.train import features
from eyeray.train.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    source: str  # what --data named, or the generated embedded default
    layout: Layout
    decoded: dict[str, Decoded]  # split -> its decoded images

    @property
    def train_labels(self) -> np.ndarray:
        return np.stack([np.asarray(r["label"]) for r in self.layout.splits["train"]])

    def images(self, split: str):
        return self.decoded[split].images

    def report(self) -> dict[str, Any]:
        """The report's data section: where the images came from and what was set aside."""
        return {
            "source": self.source,
            "counts": self.layout.counts(),
            "notes": self.layout.notes,
            "skipped": self.layout.skipped,
            "decode_errors": {split: d.errors for split, d in self.decoded.items()},
        }


def prepare(spec: TaskSpec, cfg: TrainConfig, layout: Layout | None = None) -> TrainingData:
    """Read the layout (patient-level splits; `layout`: as preflight read it, None: the demo's
    dataset, generated here), say early when the validation split is too small for the operating
    point's target, and decode every split; a split left empty fails here."""
    from eyeray.data.layouts import read_layout
    from eyeray.data.records import decode_split
    from eyeray.decision import operating_points

    data = cfg.data if cfg.data is not None else synthetic.demo_dataset(spec, cfg.output, cfg.seed)
    if layout is None:
        layout = read_layout(spec, data, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction)
    log.info(layout.summary())
    y_val = np.array([r["label"] for r in layout.splits["validation"]])
    shortfall = operating_points.validation_shortfall(spec, y_val, cfg.threshold_confidence or None, cfg.val_fraction)
    if shortfall:
        log.warning(f"operating point: {shortfall}")
    decoded = {
        split: decode_split(records, cfg.image_size, seed=cfg.seed if split == "train" else None)
        for split, records in layout.splits.items()
    }
    for split, d in decoded.items():
        for e in d.errors:
            log.warning(f"skipped undecodable {split} image {e['path']}: {e['error']}")
        if d.count == 0:
            raise ValueError(f"no usable images in the {split} split of {data} ({len(d.errors)} failed to decode)")
    return TrainingData(cfg.data or "synthetic (embedded default)", layout, decoded)


def trainer_datasets(
    cfg: TrainConfig, data: TrainingData, resumed_epoch: int = 0
) -> tuple[dict, features.CachedFeatures | None]:
    """The trainer's datasets: the images when a phase runs on images (the training ones augmented
    here when --augment-on resolves to data, by the workers otherwise), and the train and validation
    splits' pooled features when the head trains on them (eyeray.train.features), computed here,
    before `fit()`, so the stage has the cluster to itself. A run resumed after its head phase
    (`resumed_epoch` >= --epochs) needs no features."""
    from eyeray.data.augment import training_stream

    datasets, cached = {}, None
    if features.head_on_features(cfg) and resumed_epoch >= cfg.epochs:
        log.info(f"resuming after epoch {resumed_epoch}: the head phase is done, so no feature cache")
    elif features.head_on_features(cfg):
        cached = features.cache_features(cfg, {split: data.images(split) for split in features.DATASETS})
        datasets = {features.DATASETS[split]: ds for split, ds in cached.datasets.items()}
        train = features.DATASETS["train"]
        datasets[train] = datasets[train].randomize_block_order()
    if cached is None or cfg.fine_tune_epochs:
        augment = cfg.augmentation() if cfg.augment_site == "data" else None  # else the workers augment
        datasets.update(train=training_stream(data.images("train"), augment), validation=data.images("validation"))
    return datasets, cached


def samples(spec: TaskSpec, ds, per_class: int = 6) -> dict[str, list[np.ndarray]]:
    """A few training images per class, for the report's sample grid."""
    rows = ds.take(min(400, ds.count()))
    grid: dict[str, list[np.ndarray]] = {c: [] for c in spec.classes}
    for row in rows:
        for i in np.flatnonzero(np.asarray(row["label"]) > 0.5):
            if len(grid[spec.classes[i]]) < per_class:
                grid[spec.classes[i]].append(row["image"])
    return grid
