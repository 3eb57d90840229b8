"""The configuration of a training run, and what a finished run returns."""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any

from eyeray.tasks import get_task

RUN_NAME = "ray_train"  # Ray Train's run folder inside --output (checkpoints, run state)


@dataclass
class TrainConfig:
    """Every knob of a training run. None means "the default": the demo's when `data` is None."""

    task: str = "oct"
    data: str | None = None
    output: str | None = None
    backbone: str | None = None
    weights: str | None = None  # "imagenet" | "none" | path or s3:// URI of a weights file
    image_size: int | None = None
    epochs: int | None = None  # phase 1 (head; or the whole net when not pretrained)
    fine_tune_epochs: int | None = None  # phase 2 (top blocks unfrozen)
    batch_size: int | None = None
    learning_rate: float | None = None
    # 1/10: at 1/100 (1e-5) Adam moves the unfrozen conv weights too little in the few hundred
    # steps a small dataset gives (bench/real_transfer.py: fine-tuning at 1e-4 took real OCT from 0.65 to 0.90)
    fine_tune_lr_factor: float = 0.1
    fine_tune_layers: int | None = None
    dropout: float = 0.3
    augment: bool = True
    augment_strength: float = 1.0  # scales the task's augmentation ranges (eyeray.data.augment.scaled)
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float | None = None
    resume: bool = False
    max_failures: int = 2
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0

    @property
    def is_demo(self) -> bool:
        return self.data is None

    def resolved(self) -> TrainConfig:
        """Fill unset fields: the demo configuration without data, the task's defaults with it."""
        spec = get_task(self.task)
        demo = spec.demo
        defaults = (
            dict(
                backbone=demo.backbone,
                weights="none",
                image_size=demo.image_size,
                epochs=demo.epochs,
                fine_tune_epochs=0,
                batch_size=demo.batch_size,
                learning_rate=demo.learning_rate,
            )
            if self.is_demo
            else dict(
                backbone=spec.backbone,
                weights="imagenet",
                image_size=spec.image_size,
                epochs=10,
                fine_tune_epochs=10,
                batch_size=32,
                learning_rate=1e-3,
            )
        )
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        defaults["output"] = os.path.join("runs", f"{spec.name}-{'demo-' if self.is_demo else ''}{stamp}")
        given = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        return replace(self, **{**defaults, **given})


@dataclass
class TrainResult:
    output: str
    bundle: str
    report: str
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_after: list[int] = field(default_factory=list)
