"""The model bundle: the one hand-over between training, batch scoring and serving.

A bundle is a directory with `model.keras` and `manifest.json` (modelled on MONAI's bundle
metadata). Scoring and serving load nothing else: the manifest says which classes the outputs
are, which input the model takes, how to decode and preprocess, and which thresholds apply.
The manifest is written last and names the model file's hash, so a directory without a
manifest, or whose model does not match it, is not a bundle. Its schema (`eyeray.model.manifest`)
is checked when it is written and on every read.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eyeray import __version__, storage
from eyeray.data import quality
from eyeray.decision import gate as gates
from eyeray.decision.decide import DEFAULT_REVIEW_BELOW, decide
from eyeray.model import manifest as schema
from eyeray.model.compiled import CompiledModel
from eyeray.model.options import InferenceOptions
from eyeray.tasks import TaskSpec, get_task

MANIFEST = "manifest.json"
MODEL_FILE = "model.keras"
FORMAT_VERSION = schema.FORMAT_VERSION
REQUIRED_KEYS = schema.REQUIRED_KEYS
INTENDED_USE = (
    "Research use only. Not a medical device; outputs are not a diagnosis and must be reviewed "
    "by a qualified clinician."
)


class BundleError(ValueError):
    """A directory that is not a complete, consistent bundle."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_manifest(
    spec: TaskSpec,
    model,
    *,
    backbone: str,
    image_size: int,
    weights: str | None,
    metrics: dict | None = None,
    training: dict | None = None,
    thresholds: list[float] | None = None,
    calibration: dict | None = None,
    operating_point: dict | None = None,
) -> dict[str, Any]:
    """Everything a consumer needs besides the weights; `version` and the hash are added on save.

    `calibration` (eyeray.decision.calibration.fit) and `operating_point` (eyeray.decision.operating_points.choose)
    are fitted on the validation split; eyeray.decision.decide.decide applies both.
    """
    import keras
    import tensorflow as tf

    return {
        "format_version": FORMAT_VERSION,
        "name": f"eyeray-{spec.name}",
        "task": spec.name,
        "title": spec.title,
        "classes": list(spec.classes),
        "multi_label": spec.multi_label,
        "activation": spec.activation,
        "referral_classes": list(spec.referral_classes),
        "positive_class": spec.positive_class,
        "backbone": backbone,
        "weights": weights or "none",
        "input": {
            "name": model.input.name if hasattr(model.input, "name") else "image",
            "shape": [image_size, image_size, 3],
            "dtype": "uint8",
            "value_range": [0, 255],
            "channels": ["red", "green", "blue"],
        },
        "output": {
            "shape": [spec.num_classes],
            "dtype": "float32",
            "value_range": [0, 1],
            "meaning": "per-class probability" + (" (independent labels)" if spec.multi_label else " (sums to 1)"),
        },
        "preprocessing": schema.preprocessing(image_size, backbone=backbone),  # what training applies
        "thresholds": thresholds if thresholds is not None else [0.5] * spec.num_classes,
        "decision": _decision_text(spec, operating_point),
        "calibration": calibration or {"method": "none"},
        "operating_point": operating_point,
        "metrics": metrics or {},
        "training": training or {},
        "intended_use": INTENDED_USE,
        "libraries": {
            "eyeray": __version__,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
    }


def _decision_text(spec: TaskSpec, operating_point: dict | None) -> str:
    if operating_point:
        return f"operating point {operating_point['rule']} on calibrated probabilities (see operating_point)"
    return "per-label probability >= threshold" if spec.multi_label else "argmax"


def save(model, manifest: dict[str, Any], uri: str) -> dict[str, Any]:
    """Write model + manifest to `uri` (local or s3://) atomically; returns the final manifest."""
    with tempfile.TemporaryDirectory(prefix="eyeray-bundle-") as tmp:
        tmp_path = Path(tmp)
        model.save(tmp_path / MODEL_FILE)
        digest = _sha256(tmp_path / MODEL_FILE)
        manifest = {
            **manifest,
            "model_file": MODEL_FILE,
            "model_sha256": digest,
            "version": digest[:12],
            "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
        text = json.dumps(manifest, indent=2, default=_json_default)
        manifest = json.loads(text)  # what readers will see
        _check(manifest, f"{uri}/{MANIFEST}")
        (tmp_path / MANIFEST).write_text(text)
        storage.publish_dir(tmp_path, uri, commit_file=MANIFEST)
    return manifest


def publish(local_dir: str | Path, uri: str, **manifest_updates: Any) -> dict[str, Any]:
    """Copy a bundle saved locally (`save`) to `uri`, with `manifest_updates` merged into its
    manifest first: training scores the exported bundle before it knows the metrics to record.
    The model file, and so the version, stay as saved."""
    path = Path(local_dir, MANIFEST)
    text = json.dumps({**json.loads(path.read_text()), **manifest_updates}, indent=2, default=_json_default)
    manifest = json.loads(text)
    _check(manifest, str(path))
    path.write_text(text)
    storage.publish_dir(local_dir, uri, commit_file=MANIFEST)
    return manifest


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_manifest(uri: str) -> dict[str, Any]:
    """The bundle's manifest, checked against the schema and in the current layout (a format-1
    manifest's prose preprocessing as the structured defaults it described); a BundleError names
    the file and each bad field (`.../manifest.json: input.shape: Input should be a valid tuple`)."""
    fs, path = storage.filesystem(uri)
    manifest_path = f"{path}/{MANIFEST}"
    if not fs.exists(manifest_path):
        raise BundleError(f"{uri} is not a model bundle: no {MANIFEST} (training not finished, or wrong path)")
    with fs.open(manifest_path, "r") as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as exc:
            raise BundleError(f"{uri}/{MANIFEST}: not JSON: {exc}") from None
    return _check(raw, f"{uri}/{MANIFEST}")


def _check(manifest: Any, where: str) -> dict[str, Any]:
    """`eyeray.model.manifest.validate`, its problems as a BundleError naming the file and the fields."""
    try:
        return schema.validate(manifest)
    except ValueError as exc:
        raise BundleError(f"{where}: {exc}") from None


@dataclass
class Bundle:
    """A loaded bundle: the Keras model, its manifest, and the task spec it was trained for.

    `infer` and `predict` run the model compiled for inference (`eyeray.model.compiled`: a
    `tf.function`; TTA, XLA and 16-bit compute as `inference` says, `eyeray.model.options`), with
    the pooled features as a second output of the same pass (the gate's input); `model` stays the
    plain Keras model, for what needs its layers (Grad-CAM).
    `gate`: the fitted gate (`eyeray.decision.gate`), None for a bundle made before it."""

    model: Any
    manifest: dict[str, Any]
    uri: str
    inference: InferenceOptions = InferenceOptions()
    gate: gates.Gate | None = None
    compiled: CompiledModel = field(init=False, repr=False)

    def __post_init__(self):
        from eyeray.model.build import with_features

        self.compiled = CompiledModel(
            with_features(self.model) or self.model,
            jit_compile=self.inference.jit_compile,
            mixed_precision=self.inference.mixed_precision,
            sums_to_one=not self.manifest["multi_label"],
        )

    @property
    def spec(self) -> TaskSpec:
        return get_task(self.manifest["task"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def image_size(self) -> int:
        return int(self.manifest["input"]["shape"][0])

    @property
    def resize_method(self) -> str:
        """How images are resized to `image_size`: `eyeray.data.imaging.preprocess(image, size, method)`."""
        return self.manifest["preprocessing"]["resize"]["method"]

    @property
    def max_pixels(self) -> int:
        """The decoded-size limit the bundle was made with (`eyeray.data.imaging.decode`)."""
        return int(self.manifest["preprocessing"]["max_pixels"])

    @property
    def version(self) -> str:
        return self.manifest["version"]

    def predict(self, images: np.ndarray, batch_size: int = 32, tta: bool | None = None) -> np.ndarray:
        """uint8 images (n, size, size, 3) -> float32 probabilities (n, classes), `batch_size` at a time.

        The compiled model (`eyeray.model.compiled.CompiledModel`), not `predict`: one traced call
        per batch, padded to a few fixed sizes, without building a dataset and a progress loop each
        time (most of a served request). `tta`: test-time augmentation, the mean over the image and
        its left-right mirror (the flip training augments with; twice the model time); None: as
        the bundle was loaded (`inference.tta`)."""
        return self.infer(images, batch_size, tta)[0]

    def infer(
        self, images: np.ndarray, batch_size: int = 32, tta: bool | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """`predict`'s probabilities and the pooled features (n, d) of the same forward pass (None
        for a model without them); with `tta`, the features are the unmirrored image's."""
        out = self.compiled(images, batch_size)
        probs, features = out if self.compiled.multi_output else (out, None)
        if (self.inference.tta if tta is None else tta) and len(images):
            probs = (probs + self.infer(images[:, :, ::-1], batch_size, tta=False)[0]) / 2
        return probs, features

    def verdict(self, images: np.ndarray, features: np.ndarray | None, heights, widths, use_gate: bool = True):
        """The gate's verdict (`eyeray.decision.gate.Verdict`) on model inputs `images` whose
        originals were `heights` x `widths`, from `infer`'s features: "no gate" for a bundle made
        before it, "off" when `use_gate` is false."""
        if not use_gate:
            return gates.Verdict.absent(len(images), gates.OFF)
        if self.gate is None or features is None:
            return gates.Verdict.absent(len(images))
        return self.gate.verdict(features, quality.statistics(images, heights, widths))

    def decide(
        self, probabilities: np.ndarray, thresholds=None, review_below: float = DEFAULT_REVIEW_BELOW, verdict=None
    ):
        """Calibrated probabilities, labels, referral, confidence and review flag at the bundle's
        operating point (or `thresholds`), no label for what the gate's `verdict` declines:
        `eyeray.decision.decide.decide`, as on every route."""
        return decide(self.manifest, probabilities, thresholds, review_below, verdict)


def check_compatible(manifests: list[dict[str, Any]]) -> None:
    """Bundles combine only if they answer the same question: same task, same classes in order."""
    if not manifests:
        raise BundleError("no bundle given")
    first = manifests[0]
    for m in manifests[1:]:
        if (m["task"], list(m["classes"]), m["multi_label"]) != (
            first["task"],
            list(first["classes"]),
            first["multi_label"],
        ):
            raise BundleError(
                f"bundles of different tasks or classes cannot be combined: {first['task']} {first['classes']} "
                f"(bundle {first['version']}) vs {m['task']} {m['classes']} (bundle {m['version']})"
            )
    versions = [m["version"] for m in manifests]
    if len(set(versions)) != len(versions):
        raise BundleError(f"the same bundle is given more than once: versions {versions}")


def load(uri: str, verify_hash: bool = True, *, inference: InferenceOptions = InferenceOptions()) -> Bundle:
    """Load a bundle from a local directory or an `s3://` prefix; `inference` says how
    `Bundle.predict` runs the model (XLA, 16-bit compute: `eyeray.model.compiled`)."""
    import keras

    import eyeray.model.build  # noqa: F401  (registers BackbonePreprocess for deserialisation)

    manifest = read_manifest(uri)
    local, tmp = storage.local_copy(uri)
    try:
        model_path = Path(local) / manifest["model_file"]
        if verify_hash and _sha256(model_path) != manifest["model_sha256"]:
            raise BundleError(f"{uri}: {manifest['model_file']} does not match the manifest's sha256")
        model = keras.saving.load_model(model_path, compile=False)
        gate = _load_gate(manifest.get("gate"), Path(local), uri)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return Bundle(model, manifest, uri, inference=inference, gate=gate)


def _load_gate(section: dict[str, Any] | None, local: Path, uri: str) -> gates.Gate | None:
    if section is None:
        return None
    path = local / section["file"]
    if not path.exists():
        raise BundleError(f"{uri}: the manifest names a gate file {section['file']} that is not there")
    try:
        return gates.Gate.from_bytes(section, path.read_bytes())
    except ValueError as exc:
        raise BundleError(f"{uri}: {exc}") from None


def add_gate(local_dir: str | Path, gate: gates.Gate) -> dict[str, Any]:
    """Write `gate`'s arrays into a bundle saved locally (`save`) and return its manifest section,
    for `publish` to merge: the gate is fitted on the exported model's own features."""
    data = gate.to_bytes()
    Path(local_dir, gates.FILE).write_bytes(data)
    return gate.section(hashlib.sha256(data).hexdigest())


def verify(bundle: Bundle) -> None:
    """Run a zero input of the declared shape and check the output matches the manifest."""
    shape = tuple(bundle.manifest["input"]["shape"])
    out = bundle.predict(np.zeros((1, *shape), np.uint8))
    if out.shape != (1, len(bundle.classes)):
        raise BundleError(f"model output {out.shape} does not match {len(bundle.classes)} classes")
    if not np.all(np.isfinite(out)):
        raise BundleError("model output on a zero input is not finite")
