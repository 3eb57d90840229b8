"""The bundle manifest's schema: what `manifest.json` must hold, checked on every load (no Keras).

Format 2 makes preprocessing machine-readable; scoring and serving rebuild it from here:

    "preprocessing": {
      "decode": {"formats": ["jpeg", "png", "tiff", "bmp", "dicom"], "colour": "rgb",
                 "greyscale": "replicate", "high_bit_depth": "min-max"},
      "resize": {"size": [224, 224], "method": "bilinear", "keep_aspect": false},
      "max_pixels": 64000000,
      "normalise": "in-model: eyeray.model.build.BackbonePreprocess (vgg16)"
    }

`decode` describes `eyeray.data.imaging.decode` (the one decoder; nothing to choose yet),
`resize` is the `imaging.preprocess` call (height, width = the model input; a method of
`imaging.RESIZE_METHODS`), `max_pixels` the decoded-size limit the bundle was made with, and
`normalise` where pixel scaling happens (inside the model). Format-1 manifests, whose
preprocessing was prose, load as the defaults that prose described (bilinear, aspect ratio not
kept, their recorded max_pixels). Unknown keys are kept (extra="allow"), so a newer writer's
additions pass through; the fields consumers read are type-checked.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from eyeray.data import imaging

FORMAT_VERSION = 2
FORMATS = ("jpeg", "png", "tiff", "bmp", "dicom")
NORMALISE = "in-model: eyeray.model.build.BackbonePreprocess"


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Decode(_Open):
    formats: list[str] = Field(default_factory=lambda: list(FORMATS))
    colour: Literal["rgb"] = "rgb"  # HxWx3 uint8
    greyscale: Literal["replicate"] = "replicate"  # one channel copied to three
    high_bit_depth: Literal["min-max"] = "min-max"  # >8-bit and float images scaled into 0..255


class Resize(_Open):
    size: tuple[PositiveInt, PositiveInt]  # height, width: the model input's
    method: str = imaging.DEFAULT_RESIZE
    keep_aspect: Literal[False] = False

    @field_validator("method")
    @classmethod
    def _known(cls, method: str) -> str:
        if method not in imaging.RESIZE_METHODS:
            raise ValueError(f"unknown resize method {method!r}; one of {', '.join(imaging.RESIZE_METHODS)}")
        return method


class Preprocessing(_Open):
    decode: Decode = Field(default_factory=Decode)
    resize: Resize
    max_pixels: PositiveInt = imaging.DEFAULT_MAX_PIXELS
    normalise: str = NORMALISE


class Input(_Open):
    name: str = "image"
    shape: tuple[PositiveInt, PositiveInt, Literal[3]]  # height, width, RGB
    dtype: Literal["uint8"] = "uint8"
    value_range: tuple[int | float, int | float] = (0, 255)
    channels: list[str] = Field(default_factory=lambda: ["red", "green", "blue"])


class Output(_Open):
    shape: tuple[PositiveInt]
    dtype: str = "float32"
    value_range: tuple[int | float, int | float] = (0, 1)
    meaning: str = ""


class GateSection(_Open):
    """The gate (`eyeray.decision.gate`): its distance's method and threshold, what share of the
    validation split it kept, the feature layer it reads, the quality ranges, and the file (in the
    bundle, hash-checked) holding its arrays."""

    method: str
    threshold: float = Field(gt=0)
    keep: float = Field(gt=0, lt=1)  # the share of held-out images the threshold was chosen to keep
    kept_on_validation: float = Field(ge=0, le=1)
    feature_layer: str
    feature_dims: PositiveInt
    train_images: int = Field(ge=0)
    validation_images: int = Field(ge=0)
    threshold_images: int = Field(0, ge=0)  # held-out distances the threshold was chosen on (validation + cross-fitted)
    threshold_from: str = ""
    quality: dict[str, tuple[float, float]] = Field(default_factory=dict)  # statistic -> accepted [low, high]
    file: str
    sha256: str = Field(pattern="^[0-9a-f]{64}$")


class Certified(_Open):
    """What a rate-target operating point certifies (`eyeray.decision.operating_points`): the
    one-sided lower confidence bound of the guarded rate on the validation split, and its counts."""

    metric: Literal["sensitivity", "specificity"]
    confidence: float = Field(gt=0, lt=1)
    method: str
    bound: float = Field(ge=0, le=1)
    successes: int = Field(ge=0)
    trials: PositiveInt
    meets_target: StrictBool  # False: too few validation cases; the most conservative threshold was taken
    statement: str

    @model_validator(mode="after")
    def _at_most_trials(self) -> Certified:
        if self.successes > self.trials:
            raise ValueError(f"{self.successes} successes of {self.trials} trials")
        return self


class Manifest(_Open):
    """The manifest; required fields are those every bundle has had since format 1."""

    format_version: int
    version: str
    task: str
    classes: list[str] = Field(min_length=1)
    multi_label: StrictBool
    backbone: str
    input: Input
    preprocessing: Preprocessing
    thresholds: list[float]
    model_file: str
    model_sha256: str = Field(pattern="^[0-9a-f]{64}$")
    created_at: str
    libraries: dict[str, Any]
    # Optional: older bundles lack some; consumers read them with defaults.
    output: Output | None = None
    referral_classes: list[str] = Field(default_factory=list)
    positive_class: str | None = None
    calibration: dict[str, Any] = Field(default_factory=lambda: {"method": "none"})
    operating_point: dict[str, Any] | None = None  # its keys depend on the rule (eyeray.decision.operating_points)
    metrics: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    gate: GateSection | None = None  # None: made before the gate (every answer says "no gate")

    @field_validator("format_version")
    @classmethod
    def _readable(cls, version: int) -> int:
        if version > FORMAT_VERSION:
            raise ValueError(f"format {version} is newer than this eyeray reads ({FORMAT_VERSION}): upgrade eyeray")
        if version < 1:
            raise ValueError(f"no manifest format {version}")
        return version

    @field_validator("thresholds")
    @classmethod
    def _one_per_class(cls, thresholds: list[float], info) -> list[float]:
        classes = info.data.get("classes")
        if classes is not None and len(thresholds) != len(classes):
            raise ValueError(f"{len(thresholds)} thresholds for {len(classes)} classes")
        return thresholds

    @field_validator("preprocessing")
    @classmethod
    def _resize_to_input(cls, pre: Preprocessing, info) -> Preprocessing:
        inp = info.data.get("input")
        if inp is not None and tuple(pre.resize.size) != tuple(inp.shape[:2]):
            raise ValueError(f"resize.size {list(pre.resize.size)} is not input.shape's {list(inp.shape[:2])}")
        if pre.resize.size[0] != pre.resize.size[1]:
            raise ValueError(f"resize.size {list(pre.resize.size)}: only square inputs are supported")
        return pre

    @field_validator("output")
    @classmethod
    def _one_output_per_class(cls, output: Output | None, info) -> Output | None:
        classes = info.data.get("classes")
        if output is not None and classes is not None and output.shape[0] != len(classes):
            raise ValueError(f"shape {list(output.shape)} is not one output per class ({len(classes)})")
        return output

    @field_validator("referral_classes")
    @classmethod
    def _known_classes(cls, referral: list[str], info) -> list[str]:
        unknown = set(referral) - set(info.data.get("classes") or referral)
        if unknown:
            raise ValueError(f"not among classes: {sorted(unknown)}")
        return referral

    @field_validator("operating_point")
    @classmethod
    def _certified(cls, op: dict[str, Any] | None) -> dict[str, Any] | None:
        if op is not None and op.get("certified") is not None:
            Certified.model_validate(op["certified"])  # made before certification: no such key
        return op

    @field_validator("calibration")
    @classmethod
    def _has_method(cls, calibration: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(calibration.get("method"), str):
            raise ValueError("needs a 'method' (a string; 'none' when uncalibrated)")
        return calibration


REQUIRED_KEYS = tuple(name for name, field in Manifest.model_fields.items() if field.is_required())


def preprocessing(
    image_size: int,
    *,
    method: str = imaging.DEFAULT_RESIZE,
    max_pixels: int = imaging.DEFAULT_MAX_PIXELS,
    backbone: str | None = None,
) -> dict[str, Any]:
    """The `preprocessing` section for a model of input `image_size` (what training applies)."""
    normalise = f"{NORMALISE} ({backbone})" if backbone else NORMALISE
    section = Preprocessing(
        resize=Resize(size=(image_size, image_size), method=method), max_pixels=max_pixels, normalise=normalise
    )
    return section.model_dump(mode="json")


def upgrade(raw: dict[str, Any]) -> dict[str, Any]:
    """A format-1 manifest with the structured preprocessing its prose described; others as they are."""
    pre = raw.get("preprocessing")
    if raw.get("format_version") != 1 or not isinstance(pre, dict) or isinstance(pre.get("resize"), dict):
        return raw
    shape = raw["input"].get("shape") if isinstance(raw.get("input"), dict) else None
    size = list(shape[:2]) if isinstance(shape, list) else shape  # a bad shape fails validation below
    return {
        **raw,
        "preprocessing": {
            "decode": Decode().model_dump(),
            "resize": {"size": size, "method": "bilinear", "keep_aspect": False},
            "max_pixels": pre.get("max_pixels", imaging.DEFAULT_MAX_PIXELS),
            "normalise": NORMALISE,
        },
    }


def validate(raw: Any) -> dict[str, Any]:
    """The manifest checked against the schema, in the current layout (format-1 preprocessing
    upgraded; `format_version` still says what the file holds). Raises ValueError listing every
    problem ("; " between them), each with its field path: `input.shape: Input should be a valid tuple`."""
    if not isinstance(raw, dict):
        raise ValueError(f"not a JSON object but {type(raw).__name__}")
    try:
        return Manifest.model_validate(upgrade(raw)).model_dump(mode="json")
    except ValidationError as exc:
        raise ValueError("; ".join(_describe(err) for err in exc.errors())) from None


def _describe(err: dict[str, Any]) -> str:
    path = ".".join(str(part) for part in err["loc"])
    reason = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]
    if err["type"] == "missing":
        reason = "missing"
    return f"{path}: {reason}" if path else reason
