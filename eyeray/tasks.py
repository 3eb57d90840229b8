"""Task specifications: the one place where `oct`, `glaucoma` and `odir` differ.

Everything else (readers, models, training, metrics, scoring, serving) reads a `TaskSpec` and
never branches on a task name, so adding a task is adding one spec here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class AugmentSpec:
    """Training-only augmentation strengths (0 turns one off)."""

    hflip: bool = True
    vflip: bool = False
    rotation_deg: float = 10.0
    zoom: float = 0.1
    brightness: float = 0.1  # fraction of the 0..255 range
    contrast: float = 0.1  # factor range 1 +- contrast


@dataclass(frozen=True)
class DemoSpec:
    """The embedded default: what a job trains on when no `--data` is given."""

    modality: str  # "oct" | "fundus": which synthetic generator draws the images
    backbone: str = "small_cnn"
    image_size: int = 64
    epochs: int = 15
    batch_size: int = 16
    learning_rate: float = 2e-3
    images_per_class: int = 120


@dataclass(frozen=True)
class TaskSpec:
    name: str
    title: str
    classes: tuple[str, ...]
    multi_label: bool
    layout: str  # a key of eyeray.data.layouts.LAYOUTS
    backbone: str  # default backbone (a key of eyeray.model.build.BACKBONES, or "a+b" for a concat ensemble)
    image_size: int
    # Regex with one group that extracts the patient id from a file name (no directory), so
    # that flat layouts are split by patient. None: split by a stable hash of the file name.
    patient_id_pattern: str | None
    demo: DemoSpec
    # Classes whose presence means "refer" (OCT: CNV or DME is urgent); empty: no referral rule.
    referral_classes: tuple[str, ...] = ()
    positive_class: str | None = None  # binary tasks: the class whose probability is the score
    extra_metrics: tuple[str, ...] = ()  # keys of eyeray.evaluation.metrics.EXTRA_METRICS
    # The validation metric that ranks epochs and trials in model selection (higher is better):
    # a key of eyeray.evaluation.metrics.compute_metrics, reported every epoch as "val_<key>".
    selection_metric: str = "macro_f1"
    # How decision thresholds are chosen on validation data: "RULE:TARGET" or "RULE", RULE a key
    # of eyeray.decision.operating_points.RULES; "": none (argmax, or 0.5 per label).
    operating_point: str = ""
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    dataset_hint: str = ""  # shown in layout errors: what the reader expected
    # DICOM Modality values of this task's images: a routed scoring run sends a DICOM file whose
    # header names another modality to none of this task's bundles (eyeray.score.routing).
    dicom_modalities: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def activation(self) -> str:
        return "sigmoid" if self.multi_label else "softmax"

    @property
    def loss(self) -> str:
        return "binary_crossentropy" if self.multi_label else "categorical_crossentropy"

    def class_index(self, name: str) -> int:
        return self.classes.index(name)


OCT = TaskSpec(
    name="oct",
    title="OCT B-scan classification (Kermany 2018)",
    classes=("CNV", "DME", "DRUSEN", "NORMAL"),
    multi_label=False,
    layout="class_folders",
    backbone="vgg16",
    image_size=224,
    patient_id_pattern=r"^[A-Za-z]+-(\d+)-\d+",
    referral_classes=("CNV", "DME"),
    extra_metrics=("urgent_referral_auc",),
    operating_point="referral_sensitivity:0.95",  # Kermany et al.: urgent referral (CNV or DME)
    augment=AugmentSpec(hflip=True, rotation_deg=5.0, zoom=0.1),
    demo=DemoSpec(modality="oct"),
    dicom_modalities=("OPT",),  # Ophthalmic Tomography
    dataset_hint="Kaggle kermany2018: train/ test/ [val/] each with CNV/ DME/ DRUSEN/ NORMAL/, or one folder per class",
)

GLAUCOMA = TaskSpec(
    name="glaucoma",
    title="Referable glaucoma from fundus photographs (EyePACS-AIROGS-light)",
    classes=("NRG", "RG"),
    multi_label=False,
    layout="class_folders",
    backbone="xception",
    image_size=299,
    patient_id_pattern=r"^(\d+)_(?:left|right)",
    referral_classes=("RG",),
    positive_class="RG",
    extra_metrics=("pauc_90_100", "sens_at_95_spec"),
    selection_metric="pauc_90_100",  # AIROGS alpha: partial AUC at 90-100 % specificity
    operating_point="referral_specificity:0.95",  # the AIROGS screening operating point
    augment=AugmentSpec(hflip=True, rotation_deg=15.0, zoom=0.1),
    demo=DemoSpec(modality="fundus"),
    dicom_modalities=("OP", "XC"),  # Ophthalmic Photography; External-camera Photography
    dataset_hint="EyePACS-AIROGS-light: train/ validation/ test/ each with RG/ NRG/, or one folder per class",
)

ODIR = TaskSpec(
    name="odir",
    title="Ocular disease recognition, multi-label (ODIR-5K)",
    classes=("N", "D", "G", "C", "A", "H", "M", "O"),
    multi_label=True,
    layout="odir_sheet",
    backbone="vgg16",
    image_size=224,
    patient_id_pattern=r"^(\d+)_(?:left|right)",
    extra_metrics=("odir_score", "kappa", "f1"),
    selection_metric="odir_score",  # the ODIR-2019 final score
    operating_point="per_label_f1",
    augment=AugmentSpec(hflip=True, rotation_deg=15.0, zoom=0.1),
    demo=DemoSpec(modality="fundus", images_per_class=40),
    dicom_modalities=("OP", "XC"),
    dataset_hint="ODIR-5K: a sheet (data.csv or data.xlsx) with ID, Left-Fundus, Right-Fundus, "
    "N D G C A H M O columns, and the images in a folder beside it",
)

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (OCT, GLAUCOMA, ODIR)}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None
