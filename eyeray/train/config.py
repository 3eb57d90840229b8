"""The configuration of a training run, and what a finished run returns."""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any

from eyeray.data.augment import scaled
from eyeray.decision import gate
from eyeray.tasks import TASKS, AugmentSpec, get_task

AUGMENT_ON = ("auto", "data", "trainer")  # --augment-on: auto = TrainConfig.augment_site
MIXED_DTYPES = ("auto", "float16", "bfloat16")  # --mixed-dtype: auto = eyeray.model.devices.mixed_precision_dtype
GATE_METHODS = (*gate.METHODS, "none")  # --gate-method: none fits no gate (every answer says "no gate")
RUN_NAME = "ray_train"  # Ray Train's run folder inside --output (checkpoints, run state)


def parse_weights(value: str) -> str:
    """A --weights value: "imagenet", a path or URI, or "none" (also spelt None, null or nothing)."""
    return value if value.lower() not in ("none", "null", "") else "none"


# The training schedule's defaults, shared by the training and sweep configs: with --data, ImageNet
# weights and EPOCHS with the backbone frozen, then FINE_TUNE_EPOCHS fine-tuning; the demo (no --data)
# trains from scratch (DEMO_WEIGHTS) for its own number of epochs, without fine-tuning.
WEIGHTS = "imagenet"
EPOCHS = 10
FINE_TUNE_EPOCHS = 10
DEMO_WEIGHTS = "none"
DEMO_FINE_TUNE_EPOCHS = 0
FRACTION = 0.15  # --val-fraction and --test-fraction


def schedule_defaults(demo: bool, demo_epochs: int) -> dict[str, Any]:
    """The defaults of `weights`, `epochs` and `fine_tune_epochs`, of the demo (with `demo_epochs`)
    or of a run with --data."""
    if demo:
        return dict(weights=DEMO_WEIGHTS, epochs=demo_epochs, fine_tune_epochs=DEMO_FINE_TUNE_EPOCHS)
    return dict(weights=WEIGHTS, epochs=EPOCHS, fine_tune_epochs=FINE_TUNE_EPOCHS)


def run_folder(name: str) -> str:
    """The default --output: runs/NAME-TIME."""
    return os.path.join("runs", f"{name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")


def task_field() -> Any:
    """The `task` setting, shared by the training and sweep configs."""
    return field(default="oct", metadata={"choices": sorted(TASKS), "help": "the task to train"})


def data_field() -> Any:
    """The `data` setting, shared by the training and sweep configs."""
    return field(
        default=None,
        metadata={"help": "dataset root: local folder or s3://bucket/prefix (absent: a generated demo dataset)"},
    )


def weights_field(note: str = "") -> Any:
    """The `weights` setting, shared by the training and sweep configs; `note` ends its help."""
    return field(
        default=None,
        metadata={
            "type": parse_weights,
            "help": f"{WEIGHTS} (download Keras' weights) | none | PATH or s3:// URI of a backbone weights file "
            f"(default {WEIGHTS}; {DEMO_WEIGHTS} for the demo{note})",
        },
    )


def epochs_field(demo: str) -> Any:
    """The `epochs` setting, shared by the training and sweep configs; `demo`: the demo's default, in words."""
    return field(
        default=None,
        metadata={
            "help": "epochs with the backbone frozen, or of the whole net when not pretrained "
            f"(default {EPOCHS}; {demo} for the demo)"
        },
    )


def fine_tune_epochs_field() -> Any:
    """The `fine_tune_epochs` setting, shared by the training and sweep configs."""
    return field(
        default=None,
        metadata={
            "help": "epochs with the top backbone layers unfrozen "
            f"(default {FINE_TUNE_EPOCHS}; {DEMO_FINE_TUNE_EPOCHS} for the demo)"
        },
    )


def fraction_field(split: str) -> Any:
    """The `val_fraction` / `test_fraction` setting, shared by the training and sweep configs."""
    return field(default=FRACTION, metadata={"help": f"share of patients for {split} when the layout has none"})


@dataclass
class TrainConfig:
    """Every knob of a training run, each a flag of `eyeray train` (eyeray.config_cli). None
    means "the default": the demo's when `data` is None."""

    task: str = task_field()
    data: str | None = data_field()
    output: str | None = field(
        default=None,
        metadata={"help": "run folder (local or s3://) for bundle/, report/ and checkpoints (default runs/TASK-TIME)"},
    )
    backbone: str | None = field(
        default=None,
        metadata={
            "help": "vgg16 | xception | inception_resnet_v2 | mobilenet_v2 | small_cnn, or A+B for a "
            "concatenation ensemble (default: the task's; small_cnn for the demo)"
        },
    )
    weights: str | None = weights_field()
    image_size: int | None = field(
        default=None, metadata={"help": "input size in pixels (default: the task's; 64 for the demo)"}
    )
    epochs: int | None = epochs_field(demo="the task's")
    fine_tune_epochs: int | None = fine_tune_epochs_field()
    batch_size: int | None = field(default=None, metadata={"help": "images per worker per step"})
    learning_rate: float | None = field(default=None, metadata={"help": "Adam learning rate of the first phase"})
    # 1/10: at 1/100 (1e-5) Adam moves the unfrozen conv weights too little in the few hundred
    # steps a small dataset gives (bench/real_transfer.py: fine-tuning at 1e-4 took real OCT from 0.65 to 0.90)
    fine_tune_lr_factor: float = field(
        default=0.1, metadata={"help": "fine-tuning learning rate = this x --learning-rate"}
    )
    fine_tune_layers: int | None = field(
        default=None, metadata={"help": "how many top backbone layers to unfreeze (default per backbone)"}
    )
    dropout: float = field(default=0.3, metadata={"help": "dropout in the classification head"})
    augment: bool = field(default=True, metadata={"help": "turn training augmentation off"})
    augment_strength: float = field(  # eyeray.data.augment.scaled
        default=1.0, metadata={"help": "scale the task's augmentation ranges (0: none)"}
    )
    augment_on: str = field(
        default="auto",
        metadata={
            "choices": AUGMENT_ON,
            "help": "where augmentation runs: data (Ray Data's CPU tasks, which scale out beside GPU workers), "
            "trainer (a background thread of each training worker: no tasks or transfers per epoch, the "
            "cheapest where the workers compute on CPUs), auto: data with --use-gpu, trainer without",
        },
    )
    # eyeray.train.features. On by default, measured (bench/results/feature_cache.json: real OCT, real
    # pretrained VGG16, 128 px, 6 head epochs, 76 test images): head phase 101 s vs 663 s on augmented
    # images (458 s un-augmented), test accuracy 0.66 vs 0.67 (one image), macro F1 0.62 vs 0.60.
    head_on_features: bool = field(
        default=True,
        metadata={
            "help": "train the head (backbone frozen) on the images themselves, augmented as configured, "
            "instead of on their pooled backbone features computed once without augmentation"
        },
    )
    mixed_precision: bool = field(
        default=False,
        metadata={
            "help": "16-bit compute with float32 weights: float16 (with loss scaling) on GPUs of compute "
            "capability 7.0 or more, bfloat16 on CPUs with AVX512-BF16 or AMX, float32 elsewhere; the head's "
            "output stays float32 and the bundle is float32"
        },
    )
    mixed_dtype: str = field(
        default="auto",
        metadata={
            "choices": MIXED_DTYPES,
            "help": "the 16-bit type of --mixed-precision: auto (as above), or float16 or bfloat16 on any "
            "hardware (bfloat16 also suits GPUs of compute capability 8.0 or more, and needs no loss scaling)",
        },
    )
    workers: int = field(default=1, metadata={"help": "Ray Train workers (data-parallel replicas)"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker"})
    cpus_per_worker: float | None = field(
        default=None, metadata={"help": "CPUs reserved per worker (default: leave one CPU for Ray Data)"}
    )
    resume: bool = field(default=False, metadata={"help": "continue the interrupted run in --output"})
    max_failures: int = field(default=2, metadata={"help": "worker-group restarts from the last checkpoint"})
    val_fraction: float = fraction_field("validation")
    test_fraction: float = fraction_field("test")
    seed: int = field(default=0, metadata={"help": "seed of the demo data and of the training order"})
    threshold_confidence: float = field(  # eyeray.decision.operating_points
        default=0.95,
        metadata={
            "help": "one-sided confidence with which the validation split must show a sensitivity or "
            "specificity target is met (Clopper-Pearson); 0: choose on the point estimate"
        },
    )
    gate_method: str = field(  # eyeray.decision.gate
        default=gate.DEFAULT_METHOD,
        metadata={
            "choices": GATE_METHODS,
            "help": "the out-of-distribution gate fitted on the training images' features: mahalanobis "
            "(Ledoit-Wolf), knn (cosine), or none",
        },
    )
    gate_keep: float = field(
        default=gate.DEFAULT_KEEP,
        metadata={
            "help": "share of held-out images (validation, and training images cross-fitted) the gate's "
            "threshold keeps (0.5 to 0.999)"
        },
    )
    gate_fit_images: int = field(
        default=2000, metadata={"help": "training images (at most) whose features the gate is fitted on"}
    )

    @property
    def is_demo(self) -> bool:
        return self.data is None

    @property
    def augment_site(self) -> str:
        """Where augmentation runs, "data" or "trainer" (--augment-on, auto resolved). Measured on CPU
        workers (bench/results/train_ingest.json): with the trainer's thread the Ray Data feed ran at
        0.95-0.98 of in-memory arrays doing the same work, with Ray Data's tasks at 0.84-0.90."""
        if self.augment_on != "auto":
            return self.augment_on
        return "data" if self.use_gpu else "trainer"

    def augmentation(self) -> AugmentSpec | None:
        """The task's training augmentation as configured (None: off)."""
        return scaled(get_task(self.task).augment, self.augment_strength) if self.augment else None

    def resolved(self) -> TrainConfig:
        """Fill unset fields: the demo configuration without data, the task's defaults with it."""
        spec = get_task(self.task)
        demo = spec.demo
        defaults = (
            dict(
                backbone=demo.backbone,
                image_size=demo.image_size,
                batch_size=demo.batch_size,
                learning_rate=demo.learning_rate,
            )
            if self.is_demo
            else dict(backbone=spec.backbone, image_size=spec.image_size, batch_size=32, learning_rate=1e-3)
        )
        defaults.update(schedule_defaults(self.is_demo, demo.epochs))
        defaults["output"] = run_folder(f"{spec.name}-demo" if self.is_demo else spec.name)
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
