"""The gate: know when not to answer. Fitted at training on the training images, carried in the
bundle, applied by the one decision layer on every route.

Two checks, each with a machine-readable reason:

- **out of distribution** (`OUT_OF_DISTRIBUTION`): how far an image's pooled backbone features (the
  exported model's own, after fine-tuning) lie from the training images' features. The classifier's
  own confidence does not separate other modalities: a fundus photo sent to an OCT model gets a
  confident OCT answer (max-softmax kept 85 % of fundus photos at 95 % OCT retention, STACK-NOTES).
  Methods (`METHODS`; bench/gate.py measures them on real images, both directions):
  `mahalanobis`: the Mahalanobis distance to a Gaussian with a Ledoit-Wolf shrunk covariance
  (scikit-learn), the default; `knn`: the cosine distance to the k-th nearest training image.
- **ungradable** (`UNGRADABLE`): simple image statistics of the model input (`eyeray.data.quality`)
  outside the range the training images span, widened by a margin: blank or flat, dark, over-exposed,
  blurred, mostly empty; and files too small to grade.

The threshold of the distance keeps a stated share (`keep`, 97 %) of held-out distances: the
validation split's images, which the model never trained on, as new patients' will be, and the
training images' own, each from a distance fitted without its fold (cross-fitting), so that the
quantile rests on several hundred images rather than a validation split of a hundred. Bundles made before the
gate load and answer with the verdict "no gate".
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from eyeray.data import quality
from eyeray.tasks import TASKS, get_task

OUT_OF_DISTRIBUTION = "out_of_distribution"
UNGRADABLE = "ungradable"
PASSED = "passed"
OUT_OF_SCOPE = "out_of_scope"  # several tasks' bundles, and no task's gate accepts the image (routing)
DECLINING = (OUT_OF_DISTRIBUTION, UNGRADABLE, OUT_OF_SCOPE)  # verdicts that leave an image without an answer
NO_GATE = "no gate"  # a bundle made before the gate
OFF = "off"  # the user turned the gate off (--gate off)
METHODS = ("mahalanobis", "knn")
DEFAULT_METHOD = "mahalanobis"  # bench/gate.py: AUROC and other-modality pass rate, both directions
DEFAULT_KEEP = 0.97  # share of held-out in-distribution images the threshold keeps (bench/gate.py)
FOLDS = 5  # the training images' distances for the threshold are cross-fitted over this many folds
KNN_K = 10
MAX_REFERENCE = 4096  # k-NN: training features kept as the reference set (memory and time per image)
FEATURE_LAYER = "pooled backbone features (the input of the head's feature_scale layer)"
FILE = "gate.npz"


@dataclass
class Gate:
    """A fitted gate: the distance's parameters (arrays), its threshold and the quality ranges."""

    method: str
    threshold: float  # distances above it are out of distribution
    params: dict[str, np.ndarray]
    quality: dict[str, list[float]] = field(default_factory=dict)  # statistic -> [low, high]
    keep: float = DEFAULT_KEEP
    kept_on_validation: float = float("nan")
    train_images: int = 0
    validation_images: int = 0
    threshold_images: int = 0  # the held-out distances the threshold was chosen on

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Pooled features (n, d) -> distance to the training images (n,); larger is farther."""
        x = np.asarray(features, np.float64)
        if len(x) == 0:
            return np.zeros(0)
        if self.method == "mahalanobis":  # |W^T (x - mean)|: no quadratic form, whose cancellation loses digits
            return np.linalg.norm((x - self.params["mean"]) @ self.params["whitening"], axis=1)
        if self.method == "knn":
            similarity = _unit(x) @ self.params["reference"].T
            k = min(KNN_K, similarity.shape[1])
            return 1.0 - np.sort(similarity, axis=1)[:, -k]
        raise ValueError(f"unknown gate method {self.method!r}; one of {', '.join(METHODS)}")

    def verdict(self, features: np.ndarray, stats: dict[str, np.ndarray]) -> Verdict:
        """The gate's answer per image: ungradable first (a blank image's features mean nothing),
        then out of distribution; `score` is the distance over the threshold (> 1: declined)."""
        score = self.distance(features) / self.threshold
        reasons = quality.problems(stats, self.quality)
        verdicts = np.where(reasons != "", UNGRADABLE, np.where(score > 1.0, OUT_OF_DISTRIBUTION, PASSED))
        return Verdict(verdicts.astype(object), reasons, score)

    def section(self, sha256: str) -> dict[str, Any]:
        """The manifest's `gate` section (eyeray.model.manifest.GateSection); the arrays live in FILE."""
        return {
            "method": self.method,
            "threshold": float(self.threshold),
            "keep": self.keep,
            "kept_on_validation": float(self.kept_on_validation),
            "feature_layer": FEATURE_LAYER,
            "feature_dims": int(next(iter(self.params.values())).shape[-1]),
            "train_images": self.train_images,
            "validation_images": self.validation_images,
            "threshold_images": self.threshold_images,
            "threshold_from": f"validation images and training images cross-fitted over {FOLDS} folds",
            "quality": self.quality,
            "file": FILE,
            "sha256": sha256,
        }

    def to_bytes(self) -> bytes:
        """The arrays as fitted, float64: the loaded gate is the one whose threshold was chosen."""
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **{k: np.asarray(v, np.float64) for k, v in self.params.items()})
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, section: dict[str, Any], data: bytes) -> Gate:
        """The gate a manifest's `gate` section describes, from the bytes of its FILE (hash checked)."""
        if hashlib.sha256(data).hexdigest() != section["sha256"]:
            raise ValueError(f"{section['file']} does not match the manifest's sha256")
        with np.load(io.BytesIO(data)) as arrays:
            params = {k: arrays[k].astype(np.float64) for k in arrays.files}
        return cls(
            method=section["method"],
            threshold=float(section["threshold"]),
            params=params,
            quality={k: list(v) for k, v in section.get("quality", {}).items()},
            keep=float(section["keep"]),
            kept_on_validation=float(section["kept_on_validation"]),
            train_images=int(section.get("train_images", 0)),
            validation_images=int(section.get("validation_images", 0)),
            threshold_images=int(section.get("threshold_images", 0)),
        )


@dataclass
class Verdict:
    """Per image: `verdict` (PASSED, OUT_OF_DISTRIBUTION, UNGRADABLE, NO_GATE or OFF), the quality
    `reason` ("" unless ungradable) and the `score` (distance / threshold; NaN without a gate)."""

    verdict: np.ndarray  # object (n,)
    reason: np.ndarray  # object (n,)
    score: np.ndarray  # float (n,)

    @classmethod
    def absent(cls, n: int, why: str = NO_GATE) -> Verdict:
        return cls(np.full(n, why, dtype=object), np.full(n, "", dtype=object), np.full(n, np.nan))

    @property
    def declined(self) -> np.ndarray:
        return np.isin(self.verdict, DECLINING)

    def subset(self, rows) -> Verdict:
        return Verdict(self.verdict[rows], self.reason[rows], self.score[rows])

    def answer(self, i: int) -> dict[str, Any]:
        """Case `i` as JSON (the `gate` field of every answer)."""
        score = float(self.score[i])
        return {
            "verdict": str(self.verdict[i]),
            "reason": _explain(str(self.verdict[i]), str(self.reason[i])),
            "score": None if np.isnan(score) else round(score, 4),
        }


def combine(verdicts: list[Verdict]) -> Verdict:
    """Several bundles' verdicts on the same images (an ensemble): declined when any member's gate
    declines (a wrong answer is worse than none), the largest score, the first reason."""
    if len(verdicts) == 1:
        return verdicts[0]
    rank = {UNGRADABLE: 3, OUT_OF_DISTRIBUTION: 2, PASSED: 1, NO_GATE: 0, OFF: 0}
    stacked = np.stack([v.verdict for v in verdicts])
    worst = np.array([max(col, key=rank.__getitem__) for col in stacked.T], dtype=object)
    reasons = np.stack([v.reason for v in verdicts])
    reason = np.array([next((r for r in col if r), "") for col in reasons.T], dtype=object)
    scores = np.stack([v.score for v in verdicts])
    score = np.full(scores.shape[1], np.nan) if np.isnan(scores).all() else np.nanmax(scores, axis=0)
    return Verdict(worst, reason, score)


def routes_to(task: str, verdicts, modality) -> np.ndarray:
    """Whether each image goes to `task` when several tasks share a run or a service: bool (n,).
    Its gate accepted the image and, for a DICOM file whose header names a modality eyeray knows
    (`modality`; "" for none), the task takes that modality (`TaskSpec.dicom_modalities`: OPT to
    OCT, OP to the fundus tasks): the header is a hint the gate cannot overrule, and the gate still
    checks what the header lets through."""
    verdicts, modality = np.asarray(verdicts, object), np.asarray(modality, object)
    known = (modality != "") & np.isin(modality, [m for s in TASKS.values() for m in s.dicom_modalities])
    return ~np.isin(verdicts, DECLINING) & (~known | np.isin(modality, get_task(task).dicom_modalities))


def out_of_scope_reason(verdicts: dict[str, tuple[str, str, float | None]], modality: str = "") -> str:
    """Why no task answered an image, from each task's (verdict, reason, score): e.g.
    "oct: out_of_distribution (2.30); glaucoma: ungradable (blurred); DICOM modality XC"."""
    parts = [
        f"{t}: {verdict}" + (f" ({reason})" if reason else f" ({score:.2f})" if score is not None else "")
        for t, (verdict, reason, score) in verdicts.items()
    ]
    return "; ".join(parts) + (f"; DICOM modality {modality}" if modality else "")


def _explain(verdict: str, reason: str) -> str:
    return {
        OUT_OF_DISTRIBUTION: "out of distribution: unlike the images this model was trained on",
        UNGRADABLE: f"ungradable: {reason}",
        NO_GATE: "no gate: this bundle was made before eyeray had one; its answer is not checked",
        OFF: "gate turned off for this run",
    }.get(verdict, "")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fit(
    train_features: np.ndarray,
    validation_features: np.ndarray,
    train_stats: dict[str, np.ndarray],
    *,
    method: str = DEFAULT_METHOD,
    keep: float = DEFAULT_KEEP,
    seed: int = 0,
) -> Gate:
    """Fit the distance on the training images' features, choose the threshold that keeps `keep`
    of the held-out distances (the validation images', and the training images' cross-fitted over
    FOLDS folds), and the quality ranges from the training images' statistics."""
    if method not in METHODS:
        raise ValueError(f"unknown gate method {method!r}; one of {', '.join(METHODS)}")
    if not 0.5 <= keep < 1.0:
        raise ValueError(f"the gate's keep share must be in [0.5, 1), not {keep}")
    train = np.asarray(train_features, np.float64)
    if len(train) < 2 or len(validation_features) < 1:
        raise ValueError(f"the gate needs at least 2 training and 1 validation image ({len(train)} given)")
    gate = Gate(method, 1.0, _params(method, train, seed), quality.ranges(train_stats), keep, train_images=len(train))
    validation = gate.distance(validation_features)
    held_out = np.r_[_cross_fitted(method, train, seed), validation]
    gate.threshold = max(float(np.quantile(held_out, keep, method="higher")), 1e-12)
    gate.kept_on_validation = float(np.mean(validation <= gate.threshold))
    gate.validation_images, gate.threshold_images = len(validation), len(held_out)
    return gate


def _params(method: str, train: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    from sklearn.covariance import LedoitWolf

    if method == "mahalanobis":
        lw = LedoitWolf().fit(train)
        # The distance through a whitening matrix (covariance = V diag(w) V^T, W = V / sqrt(w)) rather
        # than the precision's quadratic form: the shrunk covariance's precision has entries of 1/w_min,
        # and the quadratic form loses digits to cancellation.
        eigenvalues, vectors = np.linalg.eigh(lw.covariance_)
        return {"mean": lw.location_, "whitening": vectors / np.sqrt(np.maximum(eigenvalues, 1e-12))}
    rows = np.random.default_rng(seed).permutation(len(train))[:MAX_REFERENCE]
    return {"reference": _unit(train[np.sort(rows)])}


def _cross_fitted(method: str, train: np.ndarray, seed: int) -> np.ndarray:
    """Each training image's distance from a fit on the other FOLDS - 1 folds: held-out distances,
    as the validation images' are, but several times as many. A 97 % quantile of 100 validation
    images alone kept between 91 % and 96 % of new patients' scans from one training run to the
    next (bench/gate.py). None when the training images are too few to fold."""
    if len(train) < 4 * FOLDS:
        return np.zeros(0)
    fold = np.random.default_rng(seed).permutation(len(train)) % FOLDS
    out = np.zeros(len(train))
    for k in range(FOLDS):
        out[fold == k] = Gate(method, 1.0, _params(method, train[fold != k], seed)).distance(train[fold == k])
    return out
