"""The frozen-backbone (head) phase on cached features vs on images: wall time and test accuracy.

eyeray's own training job on real Kermany OCT B-scans ($EYERAY_SAMPLES/oct-train, 633 images, the
patient split `--data` makes) with a real pretrained VGG16 (bench/hed_vgg16.py), same split, same
seed, same epochs, three ways:

  images_augmented   --no-head-on-features, augmentation on (the behaviour before the setting)
  images_plain       --no-head-on-features --no-augment
  features           --head-on-features: pooled features computed once (un-augmented), the head on them

Phase-1 wall time = the feature stage (driver, before `trainer.fit()`; 0 on images) + every head
epoch's `wall_seconds` (training, validation, and on the first epoch the standardisation pass).
Test figures at argmax of the raw outputs and as deployed (the bundle's calibrated decision).
`--fine-tune-epochs F` adds runs with F fine-tuning epochs (on augmented images) after the head.

    python bench/feature_cache.py                       # writes bench/results/feature_cache.json
    python bench/feature_cache.py --runs features --image-size 64
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only

from bench.hed_vgg16 import convert  # noqa: E402
from bench.real_transfer import DATA, RESULTS, SHARED, headline  # noqa: E402
from eyeray.tasks import get_task  # noqa: E402
from eyeray.train import TrainConfig, run  # noqa: E402

log = logging.getLogger("eyeray.bench")
RUNS = {  # name -> (head_on_features, augment)
    "images_augmented": (False, True),
    "images_plain": (False, False),
    "features": (True, True),  # augment applies to fine-tuning only
}


def one_run(name: str, weights: str, args, fine_tune: int, out: str) -> dict:
    spec = get_task("oct")
    on_features, augment = RUNS[name]
    cfg = TrainConfig(
        task="oct",
        data=str(DATA["oct"]),
        output=out,
        backbone="vgg16",
        weights=weights,
        image_size=args.image_size,
        epochs=args.head_epochs,
        fine_tune_epochs=fine_tune,
        augment=augment,
        head_on_features=on_features,
    )
    start = time.perf_counter()
    result = run(cfg)
    seconds = time.perf_counter() - start
    head = [h for h in result.history if h["phase"] == "head"]
    cache = result.metrics["run"].get("feature_cache") or {"images": {}, "seconds": 0.0}
    epochs = sum(h["wall_seconds"] for h in head)
    deployed = result.metrics["at_operating_point"]
    return {
        "settings": {"head_on_features": on_features, "augment": augment},
        "epochs": {"head": args.head_epochs, "fine_tune": fine_tune},
        "head_phase_seconds": round(cache["seconds"] + epochs, 1),
        "feature_cache": cache,
        "head_epochs_seconds": round(epochs, 1),
        "head_epoch_seconds": [round(h["wall_seconds"], 2) for h in head],
        "fine_tune_seconds": round(sum(h["wall_seconds"] for h in result.history if h["phase"] == "fine_tune"), 1),
        "run_seconds": round(seconds, 1),
        "test": headline(spec, result.metrics),
        "test_at_operating_point": headline(spec, deployed),
        "inputs": [h["inputs"] for h in result.history],
        "train_accuracy": [round(h["accuracy"], 4) for h in result.history],
        "val_accuracy": [round(h["val_accuracy"], 4) for h in result.history],
        "val_macro_f1": [round(h.get("val_macro_f1") or 0.0, 4) for h in result.history],
        "best_epoch": result.metrics["run"]["best_epoch"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--head-epochs", type=int, default=6)
    parser.add_argument("--fine-tune-epochs", type=int, default=0, help="also run these with fine-tuning (0: none)")
    parser.add_argument("--fine-tune-runs", default="images_augmented,features")
    parser.add_argument("--output", default=str(RESULTS / "feature_cache.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s")

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    output = Path(args.output)
    results = json.loads(output.read_text()) if output.exists() else {}
    if results.get("image_size") != args.image_size or results.get("head_epochs") != args.head_epochs:
        results = {}  # runs kept from an earlier invocation only when comparable
    results.update(
        {
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
            "data": str(DATA["oct"].relative_to(SHARED.parent)),
            "weights": "VGG16 conv layers of the HED edge detector (bench/hed_vgg16.py)",
            "split": "by patient, 70/15/15 (eyeray's --data split), seed 0",
            "image_size": args.image_size,
            "head_epochs": args.head_epochs,
        }
    )
    results.setdefault("runs", {})
    planned = [(n, 0) for n in args.runs.split(",") if n]
    if args.fine_tune_epochs:
        planned += [(n, args.fine_tune_epochs) for n in args.fine_tune_runs.split(",") if n]
    with tempfile.TemporaryDirectory(prefix="eyeray-feature-cache-") as tmp:
        weights = str(convert(Path(tmp, "vgg16_hed.weights.h5")))
        for name, fine_tune in planned:
            key = name if not fine_tune else f"{name}+fine_tune_{fine_tune}"
            results["runs"][key] = one_run(name, weights, args, fine_tune, f"{tmp}/{key}")
            figures = results["runs"][key]
            log.info(f"{key}: head phase {figures['head_phase_seconds']} s, test {figures['test']}")
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
