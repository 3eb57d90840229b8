"""What the benchmarks run on: a bundle with random weights (a trained model's compute: the weights
do not change the cost) and a generated archive of OCT-sized JPEGs.

For bench/ only. The tests build their own small bundles (tests/bundles.py: a small CNN with a
spread head, calibration and operating point, what scoring and serving tests check), and the demo
its own archive (`eyeray.demo.make_archive`: per-class images plus broken files); neither measures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from eyeray.data import synthetic
from eyeray.model import bundle
from eyeray.model.build import build_model
from eyeray.tasks import get_task

OCT_SHAPE = (1024, 496)  # width, height of a Spectralis B-scan export in the Kermany set


def make_bundle(root: Path, backbone: str, image_size: int, task: str = "oct") -> str:
    """An untrained `backbone` at `image_size` px saved as a bundle at root/BACKBONE-SIZE (its URI)."""
    spec = get_task(task)
    model = build_model(spec, backbone, weights="none", image_size=image_size)
    manifest = bundle.make_manifest(spec, model, backbone=backbone, image_size=image_size, weights="none")
    uri = str(Path(root) / f"{backbone}-{image_size}")
    bundle.save(model, manifest, uri)
    return uri


def make_archive(root: Path, n: int, seed: int = 0) -> Path:
    """n greyscale JPEGs of 1024 x 496 (16 synthetic B-scans, each saved under many names)."""
    rng = np.random.default_rng(seed)
    classes = get_task("oct").classes
    bases = []
    for i in range(16):
        scan = synthetic.draw("oct", classes[i % len(classes)], rng, 256)
        bases.append(Image.fromarray(scan).convert("L").resize(OCT_SHAPE, Image.BILINEAR))
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        bases[i % 16].save(root / f"scan-{i:06d}.jpeg", quality=90)
    return root
