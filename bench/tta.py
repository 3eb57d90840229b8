"""Test-time augmentation (`--tta`): what it costs and what it changes, on the real samples.

For OCT and glaucoma, a small CNN is trained with eyeray's own training run on the real sample
in $EYERAY_SAMPLES (no ImageNet weights here, so the models are weak; the question is what TTA
does to *their* answers). Every sample image is then decoded once and scored with and without
TTA through `Bundle.predict` and `Bundle.decide` (calibration and operating point included):

- cost: model seconds per image, TTA / plain, for the trained small CNN and for an untrained
  VGG16 at 224 px (the production backbone; its cost does not depend on its weights);
- change: labels and referrals that flip, mean |change| of the calibrated probabilities,
  accuracy against the folder labels and cases needing review, without and with TTA.

Most sample images were in the training split (the samples are small), so accuracy here is not
a generalisation figure; the changes are what to look at.

    python bench/tta.py            # writes bench/results/tta.json
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only

from bench.fixtures import make_bundle  # noqa: E402
from eyeray import storage  # noqa: E402
from eyeray.data import imaging
from eyeray.decision.decide import DEFAULT_REVIEW_BELOW  # noqa: E402
from eyeray.model import bundle
from eyeray.tasks import get_task  # noqa: E402
from eyeray.train import TrainConfig, run  # noqa: E402
from tests import samples  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLES = samples.SAMPLES
REPEATS = 3


def load_sample(task: str, root: Path, size: int) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """Every image of a class-folder sample: paths, preprocessed images, class indices."""
    classes = get_task(task).classes
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.parent.name in classes)
    images = np.stack([imaging.preprocess(imaging.decode(storage.read_bytes(str(p))), size) for p in paths])
    return paths, images, np.array([classes.index(p.parent.name) for p in paths])


def model_seconds(loaded: bundle.Bundle, images: np.ndarray) -> dict[str, float]:
    """Median seconds per image over REPEATS, plain and TTA interleaved (the machine is shared)."""
    loaded.predict(images[:8], tta=True)  # trace once
    plain, tta = [], []
    for _ in range(REPEATS):
        for flag, out in ((False, plain), (True, tta)):
            start = time.perf_counter()
            loaded.predict(images, tta=flag)
            out.append((time.perf_counter() - start) / len(images))
    return {
        "plain_s_per_image": float(np.median(plain)),
        "tta_s_per_image": float(np.median(tta)),
        "tta_over_plain": float(np.median(tta) / np.median(plain)),
    }


def changes(loaded: bundle.Bundle, images: np.ndarray, truth: np.ndarray) -> dict[str, float | int]:
    plain, tta = (loaded.decide(loaded.predict(images, tta=flag)) for flag in (False, True))
    classes = loaded.classes
    top = [np.array([classes.index(d.labels[i][0]) for i in range(len(images))]) for d in (plain, tta)]
    out = {
        "images": len(images),
        "labels_changed": int(sum(a != b for a, b in zip(plain.labels, tta.labels))),
        "mean_abs_probability_change": float(np.abs(plain.probabilities - tta.probabilities).mean()),
        "max_abs_probability_change": float(np.abs(plain.probabilities - tta.probabilities).max()),
        "accuracy_plain": float((top[0] == truth).mean()),
        "accuracy_tta": float((top[1] == truth).mean()),
        "needs_review_plain": int((plain.confidence() < DEFAULT_REVIEW_BELOW).sum()),
        "needs_review_tta": int((tta.confidence() < DEFAULT_REVIEW_BELOW).sum()),
    }
    if plain.referral is not None:
        out["referrals_changed"] = int((plain.referral != tta.referral).sum())
    return out


def main() -> None:
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    results: dict = {
        "machine": f"{os.cpu_count()} CPU cores, no GPU, {platform.processor() or platform.machine()}",
        "repeats": REPEATS,
        "tasks": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for task, folder in (("oct", "oct-sample"), ("glaucoma", "glaucoma-sample")):
            cfg = TrainConfig(
                task=task,
                data=str(SAMPLES / folder),
                output=f"{tmp}/{task}",
                backbone="small_cnn",
                weights="none",
                image_size=64,
                epochs=12,
                fine_tune_epochs=0,
                batch_size=16,
            )
            trained = bundle.load(run(cfg).bundle)
            _, images, truth = load_sample(task, SAMPLES / folder, trained.image_size)
            results["tasks"][task] = {
                "model": "small_cnn @ 64 px, trained on the sample's train split",
                **changes(trained, images, truth),
                **model_seconds(trained, images),
            }
            print(task, json.dumps(results["tasks"][task]))
        uri = make_bundle(Path(tmp), "vgg16", 224)
        _, images, _ = load_sample("oct", SAMPLES / "oct-sample", 224)
        results["vgg16_224_cost"] = model_seconds(bundle.load(uri), images[:48])
        print("vgg16", json.dumps(results["vgg16_224_cost"]))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tta.json").write_text(json.dumps(results, indent=2) + "\n")
    ray.shutdown()


if __name__ == "__main__":
    main()
