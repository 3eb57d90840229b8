"""The model card: report/index.html beside metrics.json, written for every training run.

One self-contained page (the shared stylesheet and every image inlined) that says what the model is
for and how far to trust it: the intended use and the research-use disclaimer (the bundle manifest's
`intended_use`), the images and patients per split and class, the test metrics with 95 % bootstrap
intervals (metrics.json `bootstrap`, eyeray.evaluation.bootstrap) beside the as-deployed values, both
confusion matrices (argmax, and at the operating point), the calibration, the operating point, what
the gate keeps and declines, example training images per class, the test images the model got most
wrong, the training curves and the run's configuration. Values are prepared here;
eyeray/templates/model_card.html only prints them, autoescaped: only data: URIs of images we encoded
ourselves are `Markup`.

`WorstCases` keeps the few worst test images while the test split streams past the model, so the
driver never holds the whole split.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from eyeray import storage
from eyeray.evaluation import pages
from eyeray.evaluation.metrics import PER_PATIENT_METRICS
from eyeray.evaluation.plots import CONFUSION_PNG, CURVES_PNG, DEPLOYED_CONFUSION_PNG, RELIABILITY_PNG
from eyeray.tasks import TaskSpec

CARD_FILE = "index.html"
TEMPLATE = "model_card.html"
WORST_SHOWN = 8
EXAMPLES_PER_CLASS = 4
THUMBNAIL = 160
PLOTS = (CONFUSION_PNG, DEPLOYED_CONFUSION_PNG, RELIABILITY_PNG, CURVES_PNG)
LABEL_THRESHOLD = 0.5  # multi-label decisions of the raw outputs, as metrics.json's argmax figures

METRIC_NAMES = {
    "accuracy": "Accuracy",
    "macro_f1": "Macro F1",
    "auc": "AUC",
    "urgent_referral_auc": "Urgent-referral AUC (refer vs not)",
    "pauc_90_100": "Partial AUC, 90-100 % specificity (AIROGS α)",
    "sens_at_95_spec": "Sensitivity at 95 % specificity (AIROGS β)",
    "odir_score": "ODIR-2019 score",
    "kappa": "Cohen's kappa (ODIR, flattened)",
    "f1": "F1 (ODIR, flattened)",
    "odir_score_per_patient": "ODIR-2019 score, per patient (as the challenge)",
    "kappa_per_patient": "Cohen's kappa (ODIR, flattened), per patient",
    "f1_per_patient": "F1 (ODIR, flattened), per patient",
    "auc_per_patient": "AUC (ODIR, flattened), per patient",
}


# --------------------------------------------------------------------------- the worst test images


class WorstCases:
    """The `keep` images whose truth got the lowest probability, of all the batches `update` saw.

    Single-label: the probability of the true class. Multi-label: per image its worst label (a present
    label's probability, or an absent label's 1 - p). Only `keep` images are held at any time."""

    def __init__(self, spec: TaskSpec, keep: int = WORST_SHOWN):
        self.spec, self.keep = spec, keep
        self.seen = self.wrong = 0
        self._kept: list[tuple[float, int, np.ndarray, np.ndarray, np.ndarray]] = []

    def update(self, images, labels, probs) -> None:
        """One batch: uint8 images (n, h, w, 3), labels (n, C) and the model's outputs (n, C)."""
        y, p = np.asarray(labels, np.float32), np.asarray(probs, np.float32)
        truth = _truth_probability(self.spec, y, p)
        self.wrong += int(np.sum(_wrong(self.spec, y, p)))
        worst_kept = self._kept[-1][0] if len(self._kept) == self.keep else np.inf
        for i in np.argsort(truth, kind="stable")[: self.keep]:
            if truth[i] < worst_kept:
                self._kept.append((float(truth[i]), self.seen + int(i), np.array(images[i]), y[i], p[i]))
        self._kept = sorted(self._kept, key=lambda case: case[:2])[: self.keep]
        self.seen += len(y)

    def cases(self) -> list[dict[str, Any]]:
        """Lowest truth probability first: {"image", "label", "probs"}."""
        return [{"image": image, "label": y, "probs": p} for _, _, image, y, p in self._kept]


def _truth_probability(spec: TaskSpec, y: np.ndarray, p: np.ndarray) -> np.ndarray:
    if spec.multi_label:
        return np.where(y > 0.5, p, 1.0 - p).min(axis=1)
    return p[np.arange(len(y)), y.argmax(axis=1)]


def _wrong(spec: TaskSpec, y: np.ndarray, p: np.ndarray) -> np.ndarray:
    if spec.multi_label:
        return ((p >= LABEL_THRESHOLD) != (y > 0.5)).any(axis=1)
    return p.argmax(axis=1) != y.argmax(axis=1)


# --------------------------------------------------------------------------- writing


def write(
    spec: TaskSpec,
    out_dir: str,
    *,
    metrics: Mapping[str, Any],
    manifest: Mapping[str, Any],
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
    samples: Mapping[str, Sequence[np.ndarray]] | None = None,
    worst: WorstCases | None = None,
) -> str:
    """Write OUT_DIR/index.html (local or s3://) beside the report `write_report` wrote there (its
    PNGs are read back and inlined); returns its URI. Locally it is renamed into place, on S3 it is
    one PUT, so a reader never sees half a page."""
    plots = {
        name: storage.read_bytes(storage.join(out_dir, name)) for name in PLOTS if name in metrics.get("plots", [])
    }
    page = render(spec, metrics=metrics, manifest=manifest, splits=splits, samples=samples, worst=worst, plots=plots)
    uri = storage.join(out_dir, CARD_FILE)
    if storage.is_remote(uri):
        storage.write_bytes(uri, page.encode())
    else:
        path = Path(uri.removeprefix("file://"))
        tmp = path.with_name(f".{CARD_FILE}.tmp")
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, path)
    return uri


def render(
    spec: TaskSpec,
    *,
    metrics: Mapping[str, Any],
    manifest: Mapping[str, Any],
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
    samples: Mapping[str, Sequence[np.ndarray]] | None = None,
    worst: WorstCases | None = None,
    plots: Mapping[str, bytes] | None = None,
) -> str:
    """The page as a string. `metrics`: metrics.json's dict; `manifest`: the exported bundle's;
    `splits`: split -> the layout's records (`label`, `patient`); `samples`: class -> training images;
    `worst`: the `WorstCases` that watched the test split; `plots`: PNG name -> bytes (the report's PNGs)."""
    plots = plots or {}
    run = metrics.get("run") or {}
    return pages.render(
        TEMPLATE,
        title=manifest.get("title") or spec.title,
        model=_model(spec, manifest),
        intended_use=manifest.get("intended_use") or "not stated in the manifest",
        data=_data(spec, splits, run.get("data") or {}),
        performance=_performance(spec, metrics),
        per_class=_per_class(spec, metrics),
        confusion=[
            _plot(plots, CONFUSION_PNG, "Argmax of the raw outputs (the column test (argmax) above)", spec.multi_label),
            _plot(plots, DEPLOYED_CONFUSION_PNG, "As deployed: calibrated, at the operating point", spec.multi_label),
        ],
        calibration=_calibration(metrics.get("calibration"), _plot(plots, RELIABILITY_PNG, "Reliability, test split")),
        operating_point=_operating_point(metrics.get("operating_point")),
        gate=_gate(metrics.get("gate")),
        examples=_examples(spec, samples or {}),
        worst=_worst(spec, worst),
        training=_training(run, metrics, _plot(plots, CURVES_PNG, "Training and validation per epoch", wide=True)),
        config=_table(["setting", "value"], [[k, _value(v)] for k, v in (run.get("config") or {}).items()]),
    )


# --------------------------------------------------------------------------- sections


def _model(spec: TaskSpec, manifest: Mapping[str, Any]) -> list[tuple[str, str]]:
    """What the model is, as (name, value) rows."""
    shape = (manifest.get("input") or {}).get("shape")
    libraries = manifest.get("libraries") or {}
    kind = "multi-label: any number of" if spec.multi_label else "one of"
    return [
        ("task", f"{spec.name}: {kind} {', '.join(spec.classes)}"),
        ("model", f"{manifest.get('name', spec.name)}, version {manifest.get('version', 'not saved')}"),
        ("backbone", f"{manifest.get('backbone', '?')}, initial weights {manifest.get('weights', '?')}"),
        ("input", f"{' x '.join(str(s) for s in shape)} RGB, uint8" if shape else "not recorded"),
        ("decision", str(manifest.get("decision", "not recorded"))),
        ("created", str(manifest.get("created_at", "not saved"))),
        ("libraries", ", ".join(f"{k} {v}" for k, v in libraries.items()) or "not recorded"),
    ]


def split_counts(classes: Sequence[str], splits: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """split -> {"classes": class -> {"images", "patients"}, "images", "patients"} of a layout's records."""
    out = {}
    for split, records in splits.items():
        labels = np.array([np.asarray(r["label"]) > 0.5 for r in records]).reshape(len(records), len(classes))
        patients = [str(r["patient"]) for r in records]
        out[split] = {
            "classes": {
                c: {
                    "images": int(labels[:, k].sum()),
                    "patients": len({q for q, x in zip(patients, labels[:, k]) if x}),
                }
                for k, c in enumerate(classes)
            },
            "images": len(records),
            "patients": len(set(patients)),
        }
    return out


def _data(spec: TaskSpec, splits, data: Mapping[str, Any]) -> dict[str, Any]:
    counts = split_counts(spec.classes, splits)
    rows = [
        [
            split,
            *(f"{c['images']} ({c['patients']})" for c in count["classes"].values()),
            f"{count['images']} ({count['patients']})",
        ]
        for split, count in counts.items()
    ]
    notes = list(data.get("notes") or [])
    if data.get("skipped"):
        notes.append(f"{len(data['skipped'])} files were skipped when the layout was read (metrics.json run.data)")
    for split, errors in (data.get("decode_errors") or {}).items():
        if errors:
            notes.append(f"{len(errors)} {split} files could not be decoded and were left out")
    return {
        "source": data.get("source", "not recorded"),
        "table": _table(["split", *spec.classes, "all"], rows),
        "notes": notes,
        "patients_split": "patients never straddle splits" if spec.patient_id_pattern else "split by file",
    }


def _performance(spec: TaskSpec, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The test metrics table: argmax value, its bootstrap interval, and the as-deployed value."""
    boot = metrics.get("bootstrap") or {}
    intervals = boot.get("metrics") or {}
    deployed = metrics.get("at_operating_point") or {}
    per_patient = [k for k in PER_PATIENT_METRICS if k in metrics]
    keys = ["accuracy", "macro_f1", "auc", *spec.extra_metrics, *per_patient]
    rows = []
    for key in keys:
        ci = intervals.get(key) or {}
        interval = "not resampled" if key in per_patient else _interval(ci, boot)
        rows.append([_metric_name(spec, key), _num(metrics.get(key)), interval, _num(deployed.get(key))])
    notes = [f"{key}: {why}" for key, why in (metrics.get("notes") or {}).items() if key in keys]
    if boot:
        method = (
            f"95 % intervals: {boot['method']}, {boot['resamples']} resamples of the {boot['n']} test images "
            f"(seed {boot['seed']}); a resample on which a metric is undefined is left out of its interval."
        )
    else:
        method = "No bootstrap intervals in this report (metrics.json has no bootstrap section)."
    return {
        "n": metrics.get("n"),
        "table": _table(["metric", "test (argmax)", "95 % interval", "as deployed"], rows),
        "method": method,
        "notes": notes,
        "per_patient": _per_patient_text(spec, metrics, per_patient),
    }


def _per_patient_text(spec: TaskSpec, metrics: Mapping[str, Any], per_patient: Sequence[str]) -> str:
    """What the per-eye and per-patient ODIR-2019 figures are ("" for a task without them)."""
    if "odir_score" not in spec.extra_metrics:
        return ""
    text = (
        "The ODIR-2019 score above scores each eye image as a row; it is not the challenge leaderboard's "
        "figure, since the challenge scored one row per patient (both eyes together)."
    )
    if not per_patient:
        why = (metrics.get("notes") or {}).get("odir_score_per_patient", "no patient ids in this report")
        return f"{text} No per-patient figure: {why}."
    return (
        f"{text} The per-patient rows compute it as the challenge does, on the {metrics.get('n_patients')} test "
        "patients: a patient's labels and probabilities are the per-label maximum over their eyes (a patient "
        "has a finding if either eye shows it), scored with the official formula; the bootstrap resamples "
        "images, so these rows have no interval."
    )


def _metric_name(spec: TaskSpec, key: str) -> str:
    if key != "auc":
        return METRIC_NAMES.get(key, key)
    if spec.multi_label:
        return "AUC (flattened labels)"
    if spec.num_classes == 2:
        return f"AUC ({spec.positive_class or spec.classes[-1]} vs {spec.classes[0]})"
    return "AUC (one-vs-rest, macro)"


def _interval(ci: Mapping[str, Any], boot: Mapping[str, Any]) -> str:
    if not ci or ci.get("low") is None:
        return "undefined"
    text = f"{ci['low']:.3f} – {ci['high']:.3f}"
    if ci["resamples"] < boot.get("resamples", 0):
        text += f" ({ci['resamples']} of {boot['resamples']} resamples)"
    return text


def _per_class(spec: TaskSpec, metrics: Mapping[str, Any]) -> dict[str, Any]:
    columns = ["support", "precision", "sensitivity", "specificity", "f1", "auc"]
    per_class = metrics.get("per_class") or {}
    rows = [
        [c, *(_num(per_class[c].get(k)) if k != "support" else per_class[c].get("support", "") for k in columns)]
        for c in spec.classes
        if c in per_class
    ]
    return _table(["class", *columns], rows)


def _calibration(section: Mapping[str, Any] | None, figure: dict[str, Any]) -> dict[str, Any]:
    if not section:
        return {"text": "Not calibrated (no calibration section in metrics.json).", "table": None, "figure": figure}
    method = section.get("method", "none")
    if method == "temperature":
        text = f"Temperature scaling, T = {section['temperature']:.3f}"
    elif method == "platt":
        text = "Platt scaling per label"
    else:
        text = f"Calibration: {method}"
    text += f", fitted on the {section.get('fitted_on', 'validation')} split ({section.get('n', '?')} images)."
    rows = [
        [
            split,
            s.get("n"),
            *(_num(s.get(k)) for k in ("ece_before", "ece_after", "nll_before", "nll_after")),
        ]
        for split in ("validation", "test")
        if (s := section.get(split))
    ]
    columns = ["split", "images", "ECE model output", "ECE calibrated", "NLL model output", "NLL calibrated"]
    return {"text": text, "table": _table(columns, rows), "figure": figure}


def _operating_point(op: Mapping[str, Any] | None) -> dict[str, Any]:
    if not op or "note" in op:
        rule = (op or {}).get("rule") or "none"
        why = (op or {}).get("note") or "the task has no rule: argmax, or 0.5 per label"
        return {"text": f"No operating point ({rule}): {why}.", "table": None}
    target = f", target {op['target']}" if "target" in op else ""
    chosen = f"chosen on the {op.get('chosen_on', 'validation')} split of {op.get('n', '?')} images"
    if "threshold" in op:
        text = f"{op['rule']}{target}: refer when {op.get('score', 'the score')} ≥ {op['threshold']:.4f} ({chosen})."
        certified = op.get("certified")
        if certified:
            text += f" Certified: {certified['statement']}."
        else:
            text += " Chosen on the point estimate, with no stated confidence (made before certification)."
        columns = ["split", "sensitivity (95 % CI)", "specificity (95 % CI)", "referred / referable", "images"]
        columns += ["target", f"certified {certified['metric']} bound"] if certified else []
        rows = [
            [
                split,
                _rate_ci(a, "sensitivity"),
                _rate_ci(a, "specificity"),
                f"{a.get('referred')} / {a.get('referable')}",
                a.get("n"),
                *([op.get("target"), _num(certified["bound"])] if certified else []),
            ]
            for split, a in (("validation", op.get("achieved")), ("test", op.get("test")))
            if a
        ]
        return {"text": text, "table": _table(columns, rows)}
    labels, thresholds = op.get("labels") or [], op.get("thresholds") or []
    val, test = op.get("achieved") or {}, op.get("test") or {}
    at_half = next((k for k in test if k.startswith("f1_at_")), None)
    text = f"{op['rule']}{target}: one threshold per label on calibrated probabilities ({chosen})."
    positives = op.get("positives") or {}
    columns = ["label", "threshold", "validation positives", "validation F1"]
    columns += ["test F1", "test precision", "test recall"]
    columns += [f"test F1 at {at_half.removeprefix('f1_at_')}"] if at_half else []
    rows = [
        [
            label,
            _num(t, 4),
            positives.get(label, "?"),
            _num((val.get("f1") or {}).get(label)),
            *(_num((test.get(k) or {}).get(label)) for k in ("f1", "precision", "recall")),
            *([_num(test[at_half].get(label))] if at_half else []),
        ]
        for label, t in zip(labels, thresholds)
    ]
    return {"text": text, "table": _table(columns, rows)}


def _rate_ci(achieved: Mapping[str, Any], rate: str) -> str:
    """ "0.931 (0.873 – 0.968)": a rate with its exact 95 % interval (counts-based; older runs: the rate alone)."""
    ci = achieved.get(f"{rate}_ci95")
    return _num(achieved.get(rate)) + (f" ({ci[0]:.3f} – {ci[1]:.3f})" if ci else "")


def _gate(section: Mapping[str, Any] | None) -> dict[str, Any]:
    if not section or section.get("method") in (None, "none"):
        return {
            "text": "No gate: this model answers every image, however unlike its training images (--gate-method none).",
            "test": None,
            "declined": None,
            "accuracy": None,
        }
    text = (
        f"{section['method']} distance of an image's pooled backbone features to those of "
        f"{section.get('train_images', '?')} training images; threshold {section['threshold']:.4g}, chosen to keep "
        f"{_pct(section.get('keep'))} of the validation images: it kept {_pct(section.get('kept_on_validation'))} "
        f"of {section.get('validation_images', '?')}. Images outside the training images' quality ranges "
        "(blank, dark, over-exposed, blurred, mostly empty, too small) are declined as ungradable."
    )
    reasons = section.get("test_declined_by_reason") or {}
    declined = sum(reasons.values())
    test = (
        f"On the {section.get('test_images', '?')} test images (all of the kind it was trained on) it answered "
        f"{_pct(section.get('test_answered'))} and declined {declined}"
        + (": the price of the gate, shown by reason below." if declined else ".")
    )
    accuracy = None
    if "test_accuracy_all" in section:
        accuracy = (
            f"Accuracy of the argmax on all test images {_num(section['test_accuracy_all'])}, "
            f"on the answered ones {_num(section.get('test_accuracy_answered'))}."
        )
    table = _table(["declined because", "test images"], [[r, n] for r, n in reasons.items()]) if reasons else None
    return {"text": text, "test": test, "declined": table, "accuracy": accuracy}


def _examples(spec: TaskSpec, samples: Mapping[str, Sequence[np.ndarray]]) -> list[dict[str, Any]]:
    names = [c for c in spec.classes if c in samples] + [c for c in samples if c not in spec.classes]
    return [
        {
            "label": name,
            "figures": [
                _figure(image, f"{name} {i}", "", None) for i, image in enumerate(samples[name][:EXAMPLES_PER_CLASS], 1)
            ],
        }
        for name in names
    ]


def _worst(spec: TaskSpec, worst: WorstCases | None) -> dict[str, Any]:
    if worst is None:
        return {"note": "The test images were not kept for this card.", "figures": []}
    figures = []
    for rank, case in enumerate(worst.cases(), 1):
        y, p = np.asarray(case["label"], np.float32), np.asarray(case["probs"], np.float32)
        true = [c for c, v in zip(spec.classes, y) if v > 0.5]
        if spec.multi_label:
            predicted = [c for c, v in zip(spec.classes, p) if v >= LABEL_THRESHOLD]
            k = int(np.argmin(np.where(y > 0.5, p, 1.0 - p)))
            name = f"{spec.classes[k]} {'present' if y[k] > 0.5 else 'absent'}, p({spec.classes[k]}) {p[k]:.2f}"
            detail = f"true: {', '.join(true) or 'none'}; predicted: {', '.join(predicted) or 'none'}"
        else:
            t, d = int(y.argmax()), int(p.argmax())
            name = f"true {spec.classes[t]}, p {p[t]:.2f}"
            detail = f"predicted {spec.classes[d]}, p {p[d]:.2f}" if d != t else "predicted correctly, least sure"
        figures.append(_figure(case["image"], f"worst {rank}: {name}", name, detail))
    seen = f"{worst.wrong} of the {worst.seen} test images"
    if spec.multi_label:
        what = "present or absent label"
        wrong = f"deciding p ≥ {LABEL_THRESHOLD} per label gets a label wrong on {seen}"
    else:
        what, wrong = "true class", f"the argmax gets {seen} wrong"
    note = (
        f"The {len(figures)} test images whose {what} got the lowest probability (model output, before "
        f"calibration), lowest first; {wrong}."
    )
    return {"note": note, "figures": figures}


def _training(run: Mapping[str, Any], metrics: Mapping[str, Any], figure: dict[str, Any]) -> dict[str, Any]:
    history = metrics.get("history") or []
    text = f"{len(history)} epochs; the bundle holds epoch {run.get('best_epoch', '?')}, the lowest validation loss."
    if run.get("resumed_after"):
        text += f" Resumed after epoch {run['resumed_after']}."
    return {"text": text, "figure": figure}


# --------------------------------------------------------------------------- cells and images


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """The shape the `table` macro prints: column names and rows of text cells."""
    return {"columns": list(columns), "rows": [{"cells": [_value(c) for c in row], "winner": False} for row in rows]}


def _value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "undefined"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.{digits}f}"


def _pct(value: Any) -> str:
    return "?" if value is None else f"{100 * value:.1f} %"


def _plot(plots: Mapping[str, bytes], name: str, caption: str, wide: bool = False) -> dict[str, Any]:
    """A report PNG for the `plot` macro (`wide`: the page's full width, else half of it)."""
    data = plots.get(name)
    return {
        "wide": wide,
        "src": pages.data_uri(data, "image/png") if data else None,
        "alt": name,
        "name": caption,
        "unavailable": None if data else f"{name} was not written for this run",
    }


def _figure(image, alt: str, name: str, detail: str | None) -> dict[str, Any]:
    """A thumbnail figure for the `figure` macro: the image as an inlined JPEG."""
    pixels = np.asarray(image)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    thumbnail = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    thumbnail.thumbnail((THUMBNAIL, THUMBNAIL))
    buf = io.BytesIO()
    thumbnail.convert("RGB").save(buf, format="JPEG", quality=85)
    src = pages.data_uri(buf.getvalue(), "image/jpeg")
    return {"src": src, "alt": alt, "name": name, "detail": detail, "refer": False, "note": None, "unavailable": None}
