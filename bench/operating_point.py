"""Does the operating point hold on new patients? The rule before issue 25 (the threshold whose
validation point estimate meets the target) against the certified rule (the threshold whose
one-sided 95 % Clopper-Pearson lower bound on validation meets it), on real images with real
pretrained weights (VGG16 with the HED backbone weights, bench/hed_vgg16.py), over several seeds of
eyeray's training job:

- OCT urgent referral (CNV or DME) at 95 % sensitivity, on $EYERAY_SAMPLES/oct-train, with the
  default validation share (15 % of patients) and a larger one (30 %): does resting the threshold
  on more validation patients help, at the cost of training patients?
- glaucoma referral (RG) at 95 % specificity (AIROGS), on $EYERAY_SAMPLES/glaucoma-sample, with a
  30 % validation share (its 13 RG images leave none in a 15 % one).

For every run and rule: the threshold, what it achieves on the test split (patients no threshold
saw), with counts, and whether the target holds there. The test split is the same patients at
every validation share (eyeray.data.layouts.split_of). Then, because three test splits are few,
each run's held-out images (validation + test) are re-split by patient many times into a
selection half and an evaluation half; calibration and both rules are refitted on the selection
half, and the share of re-splits whose evaluation half meets the target is reported per rule.

    python bench/operating_point.py                 # writes bench/results/operating_point.json
    python bench/operating_point.py --seeds 0 --tasks glaucoma --output /tmp/op.json
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

from bench.gate import SHARED, decode, recipe  # noqa: E402
from bench.hed_vgg16 import convert  # noqa: E402
from eyeray.data.layouts import read_layout  # noqa: E402
from eyeray.decision import calibration, operating_points  # noqa: E402
from eyeray.decision.roc import UndefinedMetric  # noqa: E402
from eyeray.tasks import get_task  # noqa: E402
from eyeray.train import run  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DATA = {"oct": SHARED / "oct-train", "glaucoma": SHARED / "glaucoma-sample"}
# glaucoma-sample (13 RG of 144 images) at 15 % leaves no RG in validation, so no rule can be chosen there
VAL_FRACTIONS = {"oct": (0.15, 0.30), "glaucoma": (0.30,)}
RULES = {"point estimate (before)": None, "certified at 95 %": operating_points.CONFIDENCE}
RESPLITS = 1000


def held_out(task: str, val_fraction: float, size: int) -> dict[str, dict]:
    """The validation and test splits eyeray's --data makes: images, labels and patients per split."""
    layout = read_layout(get_task(task), str(DATA[task]), val_fraction=val_fraction)
    out = {}
    for split in ("validation", "test"):
        rows = layout.splits[split]
        out[split] = {
            **decode([str(r["path"]) for r in rows], size),
            "labels": np.stack([r["label"] for r in rows]),
            "patients": np.array([r["patient"] for r in rows]),
        }
    return out


def evaluate(spec, op: dict, y: np.ndarray, calibrated: np.ndarray) -> dict:
    """What `op` achieves on labelled data, and whether its target holds there."""
    a = operating_points.achieved(op, y, calibrated)
    metric = "sensitivity" if op["rule"] == "referral_sensitivity" else "specificity"
    return {**a, "holds": bool(a[metric] is not None and a[metric] >= op["target"])}


def choose(spec, y, calibrated, confidence) -> dict | None:
    try:
        return operating_points.choose(spec, y, calibrated, confidence=confidence)
    except UndefinedMetric:
        return None


def resplit(spec, y: np.ndarray, raw: np.ndarray, patients: np.ndarray, seed: int) -> dict:
    """The share of patient re-splits (selection half / evaluation half of the held-out images) whose
    evaluation half meets the target, per rule; calibration refitted on each selection half."""
    rng = np.random.default_rng(seed)
    unique = np.unique(patients)
    holds = {name: [] for name in RULES}
    for _ in range(RESPLITS):
        chosen = set(rng.choice(unique, len(unique) // 2, replace=False))
        sel = np.array([p in chosen for p in patients])
        params = calibration.fit(y[sel], raw[sel], spec.multi_label, spec.classes)
        cal = calibration.apply(params, raw)
        for name, confidence in RULES.items():
            op = choose(spec, y[sel], cal[sel], confidence)
            if op is not None and (~sel).any():
                holds[name].append(evaluate(spec, op, y[~sel], cal[~sel])["holds"])
    return {
        "resplits": RESPLITS,
        "images": len(y),
        "patients": len(unique),
        "target_holds": {name: float(np.mean(h)) if h else None for name, h in holds.items()},
    }


def one_run(task: str, seed: int, val_fraction: float, weights: str, args, out: str) -> dict:
    from eyeray.model import bundle

    spec = get_task(task)
    cfg = recipe(task, DATA[task], out, weights, args, seed=seed, val_fraction=val_fraction)
    start = time.perf_counter()
    result = run(cfg)
    seconds = time.perf_counter() - start
    loaded = bundle.load(result.bundle)
    splits = held_out(task, val_fraction, args.image_size)
    raw = {s: loaded.predict(d["images"]) for s, d in splits.items()}
    params = loaded.manifest["calibration"]  # fitted on the validation split by training
    cal = {s: calibration.apply(params, p) for s, p in raw.items()}
    y = {s: d["labels"] for s, d in splits.items()}
    rules = {}
    for name, confidence in RULES.items():
        op = choose(spec, y["validation"], cal["validation"], confidence)
        if op is None:
            rules[name] = {"note": "the validation split cannot define it"}
            continue
        rules[name] = {
            "threshold": op["threshold"],
            "validation": {k: v for k, v in op["achieved"].items() if not k.endswith("_ci95")},
            **({"certified": op["certified"]} if "certified" in op else {}),
            "test": evaluate(spec, op, y["test"], cal["test"]),
        }
    stored = loaded.manifest["operating_point"]
    pooled = {k: np.concatenate([splits["validation"][k], splits["test"][k]]) for k in ("labels", "patients")}
    return {
        "seed": seed,
        "val_fraction": val_fraction,
        "seconds": round(seconds, 1),
        "images": {"train": loaded.manifest["training"]["train_images"], **{s: len(v) for s, v in y.items()}},
        "test_accuracy": result.metrics.get("accuracy"),
        "stored_threshold": stored["threshold"] if stored else None,
        "rules": rules,
        "resplit": resplit(
            spec, pooled["labels"], np.concatenate([raw["validation"], raw["test"]]), pooled["patients"], seed
        ),
    }


def summarise(runs: list[dict]) -> dict:
    """Per validation share and rule: in how many runs the target held on test, and the test rates."""
    out = {}
    for fraction in sorted({r["val_fraction"] for r in runs}):
        these = [r for r in runs if r["val_fraction"] == fraction]
        out[str(fraction)] = {
            "runs": len(these),
            "test_accuracy": [r["test_accuracy"] for r in these],
            **{
                name: {
                    "target_held_on_test": sum(bool(r["rules"][name].get("test", {}).get("holds")) for r in these),
                    "test_sensitivity": [r["rules"][name].get("test", {}).get("sensitivity") for r in these],
                    "test_specificity": [r["rules"][name].get("test", {}).get("specificity") for r in these],
                    "resplit_target_holds": [r["resplit"]["target_holds"][name] for r in these],
                }
                for name in RULES
            },
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["oct", "glaucoma"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--head-epochs", type=int, default=4)
    ap.add_argument("--fine-tune-epochs", type=int, default=2)
    ap.add_argument("--output", default=str(RESULTS / "operating_point.json"))
    args = ap.parse_args()
    results: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        "weights": "VGG16 conv layers of the HED edge detector (bench/hed_vgg16.py)",
        "recipe": {
            "image_size": args.image_size,
            "head_epochs": args.head_epochs,
            "fine_tune_epochs": args.fine_tune_epochs,
            "split": "by patient; test 15 % of patients",
        },
        "rules": {name: confidence for name, confidence in RULES.items()},
        "tasks": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        weights = str(convert(Path(tmp) / "hed_vgg16.weights.h5"))
        for task in args.tasks:
            spec = get_task(task)
            runs = []
            for fraction in VAL_FRACTIONS[task]:
                for seed in args.seeds:
                    out = os.path.join(tmp, f"{task}-{fraction}-{seed}")
                    runs.append(one_run(task, seed, fraction, weights, args, out))
                    print(f"{task} val {fraction} seed {seed}: " + json.dumps(runs[-1]["rules"], default=str)[:400])
            results["tasks"][task] = {"operating_point": spec.operating_point, "runs": runs, "summary": summarise(runs)}
            Path(args.output).write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(json.dumps({t: r["summary"] for t, r in results["tasks"].items()}, indent=2))


if __name__ == "__main__":
    main()
