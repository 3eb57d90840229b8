"""Tiny real bundles for scoring and serving tests: an untrained small CNN, optionally with a
calibration and an operating point fitted the way training fits them (on its own outputs for
generated images and balanced made-up labels), so the calibrated path is the one under test."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from eyeray.decision import calibration, operating_points
from eyeray.model import bundle
from eyeray.model.build import build_model
from eyeray.tasks import get_task


def validation_labels(task: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Balanced one-hot labels (single-label), or labels with both outcomes for every class."""
    spec = get_task(task)
    if spec.multi_label:
        y = (rng.random((n, spec.num_classes)) < 0.3).astype(int)
        y[0], y[1] = 1, 0
        return y
    return np.eye(spec.num_classes, dtype=int)[np.arange(n) % spec.num_classes]


def make_bundle(root: Path, task: str = "oct", size: int = 32, decision: bool = False, seed: int = 0) -> str:
    spec = get_task(task)
    model = build_model(spec, "small_cnn", weights="none", image_size=size)
    # An untrained head starts at near-uniform outputs (small initial logits); spread them, so
    # calibration, operating points and review flags have different cases to tell apart.
    kernel = model.get_layer("predictions").kernel
    kernel.assign(np.random.default_rng(seed).normal(0, 1.0, kernel.shape).astype(np.float32))
    fitted = {}
    if decision:
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, (64, size, size, 3), np.uint8)
        probs = np.asarray(model.predict(images, verbose=0), np.float32)
        y = validation_labels(task, len(images), rng)
        params = calibration.fit(y, probs, spec.multi_label, spec.classes)
        op = operating_points.choose(spec, y, calibration.apply(params, probs))
        fitted = {"calibration": params, "operating_point": op}
    manifest = bundle.make_manifest(spec, model, backbone="small_cnn", image_size=size, weights="none", **fitted)
    bundle.save(model, manifest, str(root / "bundle"))
    return str(root / "bundle")


def with_gate(uri: str, train: np.ndarray, validation: np.ndarray, out: Path) -> str:
    """A copy of the bundle at `uri`, published to `out`, with a gate fitted as training fits one:
    on its own features of `train` images, the threshold keeping 95 % of `validation`'s."""
    import shutil

    from eyeray.data import quality
    from eyeray.decision import gate

    loaded = bundle.load(uri)
    side = np.full(len(train), train.shape[1])
    fitted = gate.fit(loaded.infer(train)[1], loaded.infer(validation)[1], quality.statistics(train, side, side))
    staged = out.with_name(out.name + "-staged")
    shutil.copytree(uri, staged)
    section = bundle.add_gate(staged, fitted)
    bundle.publish(staged, str(out), gate=section)
    return str(out)


def drawn(task: str, n: int, seed: int, size: int = 32) -> np.ndarray:
    """Generated images of a task's modality, resized to the model input as scoring does."""
    from PIL import Image

    from eyeray.data import synthetic

    spec, rng = get_task(task), np.random.default_rng(seed)
    images = [synthetic.draw(spec, spec.classes[i % spec.num_classes], rng, 64) for i in range(n)]
    return np.stack([np.asarray(Image.fromarray(x).resize((size, size), Image.Resampling.BILINEAR)) for x in images])


def gated_task_bundles(root: Path) -> dict[str, str]:
    """An OCT and a glaucoma bundle, each with a gate fitted on generated images of its modality:
    what a mixed archive is routed by."""
    out = {}
    for k, task in enumerate(("oct", "glaucoma")):
        plain = make_bundle(root / task, task=task, decision=True, seed=k)
        out[task] = with_gate(plain, drawn(task, 120, 10 + k), drawn(task, 60, 20 + k), root / f"{task}-gated")
    return out
