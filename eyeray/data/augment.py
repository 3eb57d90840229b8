"""Training-only augmentation, run by Ray Data's CPU workers on uint8 batches.

It runs in the data pipeline rather than in the model so the CPU workers that decode images
also augment them while the trainers compute, and so the saved model has no random layers
(whose seed state does not mix with MultiWorkerMirroredStrategy replicas).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
from PIL import Image

from eyeray.tasks import AugmentSpec


def scaled(spec: AugmentSpec, strength: float) -> AugmentSpec:
    """The task's augmentation made weaker or stronger (a sweep dimension): rotation, zoom,
    brightness and contrast ranges times `strength`; 0 turns augmentation off, flips included."""
    if strength == 1.0:
        return spec
    if strength <= 0:
        return AugmentSpec(hflip=False, vflip=False, rotation_deg=0.0, zoom=0.0, brightness=0.0, contrast=0.0)
    return replace(
        spec,
        rotation_deg=spec.rotation_deg * strength,
        zoom=min(spec.zoom * strength, 0.9),
        brightness=spec.brightness * strength,
        contrast=min(spec.contrast * strength, 0.9),
    )


def augment_image(image: np.ndarray, spec: AugmentSpec, rng: np.random.Generator) -> np.ndarray:
    """One random flip / rotation / zoom / brightness / contrast draw on an HxWx3 uint8 image."""
    if spec.hflip and rng.random() < 0.5:
        image = image[:, ::-1]
    if spec.vflip and rng.random() < 0.5:
        image = image[::-1]
    if spec.rotation_deg or spec.zoom:
        angle = math.radians(rng.uniform(-spec.rotation_deg, spec.rotation_deg))
        scale = rng.uniform(1 - spec.zoom, 1 + spec.zoom)
        image = _affine(image, angle, scale)
    out = image.astype(np.float32)
    if spec.contrast:
        mean = out.mean()
        out = (out - mean) * rng.uniform(1 - spec.contrast, 1 + spec.contrast) + mean
    if spec.brightness:
        out += rng.uniform(-spec.brightness, spec.brightness) * 255.0
    return np.clip(out, 0, 255).astype(np.uint8)


def _affine(image: np.ndarray, angle: float, scale: float) -> np.ndarray:
    """Rotate by `angle` and zoom by `scale` about the centre (PIL maps output -> input pixels)."""
    h, w = image.shape[:2]
    cx, cy = w / 2, h / 2
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    matrix = (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)
    img = Image.fromarray(np.ascontiguousarray(image))
    return np.asarray(img.transform((w, h), Image.AFFINE, matrix, resample=Image.BILINEAR))


def augment_batch(batch: dict[str, np.ndarray], spec: AugmentSpec) -> dict[str, np.ndarray]:
    """Ray Data `map_batches` function: fresh randomness on every call, so every epoch differs."""
    rng = np.random.default_rng()
    out = dict(batch)
    out["image"] = np.stack([augment_image(img, spec, rng) for img in batch["image"]])
    return out
