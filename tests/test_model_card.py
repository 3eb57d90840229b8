"""The model card (report/index.html of every training run), rendered without a Ray cluster from a
report written the way the training driver writes it: every section is there, what comes from data
is printed as text, the page is one file, the bootstrap intervals behave, the worst test images are
kept with bounded memory, and a real browser draws the page."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eyeray.decision import calibration, operating_points
from eyeray.evaluation import model_card
from eyeray.evaluation.bootstrap import confidence_intervals
from eyeray.evaluation.metrics import compute_metrics, scalar_metrics
from eyeray.evaluation.plots import DEPLOYED_CONFUSION_PNG, RELIABILITY_PNG, plot_confusion, plot_reliability
from eyeray.evaluation.report import jsonable, write_report
from eyeray.tasks import get_task

EVIL = "<script>alert(1)</script>"
OCT = get_task("oct")
ODIR = get_task("odir")
HISTORY = [
    {"epoch": e, "loss": 1 / e, "val_loss": 1.2 / e, "accuracy": 0.5 + e / 20, "phase": "head"} for e in (1, 2, 3)
]


def _single_label(spec, n: int, seed: int, skill: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.eye(spec.num_classes)[np.arange(n) % spec.num_classes]
    logits = skill * y + rng.normal(size=y.shape)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, p.astype(np.float32)


def _multi_label(spec, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, spec.num_classes)) < 0.3).astype(float)
    y[np.arange(n), np.arange(n) % spec.num_classes] = 1  # every label present somewhere
    return y, np.clip(0.55 * y + 0.5 * rng.random(y.shape), 0, 1).astype(np.float32)


def _records(spec, counts: dict[str, int]) -> dict[str, list[dict]]:
    """Layout-like records: two images per patient, classes in turn."""
    classes = spec.classes
    return {
        split: [
            {
                "path": f"/data/{split}/{i}.png",
                "label": np.eye(len(classes))[i % len(classes)],
                "patient": f"{split}{i % (n // 2)}",
            }
            for i in range(n)
        ]
        for split, n in counts.items()
    }


def _report(spec, out: Path | None, config_value: str = "ok", seed: int = 0):
    """report/ as the driver leaves it in `out` (metrics.json with every section, the PNGs), and the
    card's other inputs: manifest, split records, training samples and the worst test images.
    `out` None: the same metrics.json dict, without drawing or writing anything."""
    if spec.multi_label:
        (y_val, p_val), (y_test, p_test) = _multi_label(spec, 80, seed), _multi_label(spec, 60, seed + 1)
    else:
        (y_val, p_val), (y_test, p_test) = _single_label(spec, 80, seed), _single_label(spec, 60, seed + 1)
    params = calibration.fit(y_val, p_val, spec.multi_label, spec.classes)
    val_cal, test_cal = calibration.apply(params, p_val), calibration.apply(params, p_test)
    op = operating_points.choose(spec, y_val, val_cal)
    deployed = compute_metrics(spec, y_test, test_cal, op.get("thresholds") if spec.multi_label else None)
    sections = {
        "calibration": {
            **params,
            "validation": calibration.summary(y_val, p_val, val_cal, spec.multi_label),
            "test": calibration.summary(y_test, p_test, test_cal, spec.multi_label),
        },
        "operating_point": {**op, "test": operating_points.achieved(op, y_test, test_cal)},
        "at_operating_point": deployed,
        "gate": {
            "method": "mahalanobis",
            "threshold": 41.5,
            "keep": 0.95,
            "kept_on_validation": 0.9625,
            "train_images": 240,
            "validation_images": 80,
            "test_images": 60,
            "test_answered": 0.95,
            "test_declined_by_reason": {"out_of_distribution": 2, f"ungradable: {EVIL}": 1},
            "test_accuracy_all": 0.8,
            "test_accuracy_answered": 0.82,
        },
        "bootstrap": confidence_intervals(spec, y_test, p_test, resamples=100),
    }

    def reliability(path):
        plot_reliability(y_test, p_test, test_cal, spec.multi_label, path, "test")

    def confusion(path):
        plot_confusion(spec, y_test, test_cal, path, op.get("thresholds") if spec.multi_label else None)

    rng = np.random.default_rng(seed)
    samples = {c: [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(3)] for c in spec.classes}
    config = {"task": spec.name, "backbone": "small_cnn", "learning_rate": 0.002, "note": config_value, "data": None}
    run = {"config": config, "best_epoch": 3, "resumed_after": None, "data": {"source": "/data", "notes": []}}
    if out is None:
        metrics = {**compute_metrics(spec, y_test, p_test), **jsonable(sections), "run": run, "history": HISTORY}
    else:
        metrics = write_report(
            spec,
            out,
            y_true=y_test,
            probs=p_test,
            history=HISTORY,
            samples=samples,
            extra=run,
            sections=sections,
            extra_plots={RELIABILITY_PNG: reliability, DEPLOYED_CONFUSION_PNG: confusion},
        )
    worst = model_card.WorstCases(spec, keep=4)
    images = rng.integers(0, 256, (len(y_test), 32, 32, 3), dtype=np.uint8)
    for start in range(0, len(y_test), 16):
        worst.update(images[start : start + 16], y_test[start : start + 16], p_test[start : start + 16])
    manifest = {
        "name": f"eyeray-{spec.name}",
        "title": spec.title,
        "version": "0123456789ab",
        "backbone": "small_cnn",
        "weights": "none",
        "input": {"shape": [48, 48, 3]},
        "decision": "operating point on calibrated probabilities",
        "created_at": "2026-01-01T00:00:00+00:00",
        "intended_use": "Research use only. Not a medical device; outputs are not a diagnosis.",
        "libraries": {"eyeray": "0.0.0"},
    }
    splits = _records(spec, {"train": 24, "validation": 8, "test": 12})
    return {"metrics": metrics, "manifest": manifest, "splits": splits, "samples": samples, "worst": worst}


@pytest.fixture(scope="module")
def oct_card(tmp_path_factory) -> tuple[dict, str, Path]:
    out = tmp_path_factory.mktemp("card") / "report"
    inputs = _report(OCT, out, config_value=EVIL)
    uri = model_card.write(OCT, str(out), **inputs)
    return inputs, Path(uri).read_text(), Path(uri)


def test_card_has_every_section(oct_card):
    inputs, page, path = oct_card
    assert path.name == "index.html" and path.parent.joinpath("metrics.json").is_file()
    for heading in (
        "<h1>Model card: OCT B-scan classification (Kermany 2018)</h1>",
        '<h2 id="data">Data</h2>',
        '<h2 id="performance">Test performance</h2>',
        '<h2 id="confusion">Confusion matrices (test split)</h2>',
        '<h2 id="calibration">Calibration</h2>',
        '<h2 id="operating-point">Operating point</h2>',
        '<h2 id="gate">Gate: when the model does not answer</h2>',
        '<h2 id="examples">Example training images per class</h2>',
        '<h2 id="worst">Worst errors on the test split</h2>',
        '<h2 id="training">Training</h2>',
        '<h2 id="configuration">Configuration</h2>',
    ):
        assert heading in page, heading
    assert "<b>Intended use.</b> Research use only. Not a medical device" in page
    # images (patients) per split and class: 24 train images of 12 patients, 6 per class of 3 patients each
    assert "<tr><td>train</td><td>6 (3)</td><td>6 (3)</td><td>6 (3)</td><td>6 (3)</td><td>24 (12)</td></tr>" in page
    # every metric with its interval and the as-deployed value
    metrics, boot = inputs["metrics"], inputs["metrics"]["bootstrap"]["metrics"]
    for key, name in (("accuracy", "Accuracy"), ("macro_f1", "Macro F1"), ("urgent_referral_auc", "Urgent-referral")):
        interval = f"{boot[key]['low']:.3f} – {boot[key]['high']:.3f}"
        assert re.search(f"<td>{name}[^<]*</td><td>{metrics[key]:.3f}</td><td>{interval}[^<]*</td><td>0\\.", page), key
    assert "percentile bootstrap over test images, 100 resamples of the 60 test images (seed 0)" in page
    # the operating point, the calibration and the gate's figures
    op = metrics["operating_point"]
    assert f"refer when P(CNV) + P(DME) ≥ {op['threshold']:.4f}" in page and "target 0.95" in page
    # 80 validation images hold about 40 referable: too few to certify 0.95, and the card says so
    assert f"Certified: {op['certified']['statement']}." in page and "certify at most" in page
    test, bound = op["test"], op["certified"]["bound"]
    low, high = test["sensitivity_ci95"]
    row = f"<td>test</td><td>{test['sensitivity']:.3f} ({low:.3f} – {high:.3f})</td>"
    assert row in page and f"<td>0.95</td><td>{bound:.3f}</td></tr>" in page
    assert f"Temperature scaling, T = {metrics['calibration']['temperature']:.3f}" in page
    assert "threshold 41.5, chosen to keep 95.0 % of the validation images: it kept 96.2 % of 80" in page
    assert "it answered 95.0 % and declined 3" in page and "<td>out_of_distribution</td><td>2</td>" in page
    assert "on all test images 0.800, on the answered ones 0.820" in page
    # four PNGs of the report, 4 x 3 training samples and 4 worst test images, all inlined
    assert page.count('src="data:image/png;base64,') == 4 and page.count('src="data:image/jpeg;base64,') == 16
    worst = page[page.index('id="worst"') : page.index('id="training"')]
    wrong = inputs["worst"].wrong
    assert worst.count("<figure>") == 4 and f"the argmax gets {wrong} of the 60 test images wrong" in worst
    assert "<td>learning_rate</td><td>0.002</td>" in page and "<td>data</td><td>none</td>" in page


def test_card_prints_hostile_strings_as_text(oct_card):
    inputs, page, _ = oct_card
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # the config value and the gate's reason
    assert "<script" not in page
    # a class name from a hostile label sheet (the examples), a patient id, the manifest's text
    inputs = {
        **inputs,
        "samples": {EVIL: inputs["samples"]["CNV"]},
        "splits": {"train": [{"label": [1, 0, 0, 0], "patient": EVIL}]},
        "manifest": {**inputs["manifest"], "intended_use": f"Research use only {EVIL}", "backbone": EVIL},
    }
    page = model_card.render(OCT, **inputs)
    assert "<h3>&lt;script&gt;alert(1)&lt;/script&gt;</h3>" in page and "Research use only &lt;script&gt;" in page
    assert "<td>&lt;script&gt;alert(1)&lt;/script&gt;, initial weights none</td>" in page
    assert "<script" not in page


def test_card_is_one_self_contained_file(oct_card):
    _, page, path = oct_card
    assert sorted(p.name for p in path.parent.iterdir() if p.suffix == ".html") == ["index.html"]
    assert page.count("<style>") == 1 and "figure.plot" in page and "<link" not in page
    for attribute, value in re.findall(r'\b(src|href)="([^"]*)"', page):
        assert value.startswith(("data:", "#")), (attribute, value[:60])


def test_card_for_a_multi_label_task_without_a_gate_or_pictures():
    inputs = _report(ODIR, None, seed=3)
    inputs["metrics"]["gate"] = {"method": "none"}
    page = model_card.render(ODIR, **{**inputs, "samples": None})
    assert "one threshold per label on calibrated probabilities" in page and "<td>N</td><td>0." in page
    op = inputs["metrics"]["operating_point"]  # how many validation positives each threshold rests on
    assert f"<td>G</td><td>{op['thresholds'][2]:.4f}</td><td>{op['positives']['G']}</td>" in page
    assert "No gate: this model answers every image" in page and "AUC (flattened labels)" in page
    assert "ODIR-2019 score" in page and "No example images were kept for this run." in page
    assert f"per label gets a label wrong on {inputs['worst'].wrong} of the 60 test images." in page
    assert page.count('<figure class="plot wide">') == 3  # the per-label confusion grids and the curves: full width
    assert page.count('src="data:image/jpeg;base64,') == 4  # the worst test images only
    page = model_card.render(ODIR, **{**inputs, "worst": None})
    assert "The test images were not kept for this card." in page


def test_card_shows_the_per_patient_odir_score_beside_the_per_eye_one():
    inputs = _report(ODIR, None, seed=3)
    metrics = inputs["metrics"]
    page = model_card.render(ODIR, **inputs)  # no patient ids given: the card says the figure is absent
    assert "not the challenge leaderboard" in page and "No per-patient figure" in page
    y, p = _multi_label(ODIR, 60, 4)
    patients = [f"p{i // 2}" for i in range(60)]  # two eyes per patient
    per_patient = compute_metrics(ODIR, y, p, patients=patients)
    deployed = compute_metrics(ODIR, y, p, 0.4, patients=patients)
    metrics.update({k: v for k, v in per_patient.items() if k.endswith("_per_patient") or k == "n_patients"})
    metrics["at_operating_point"] = deployed
    page = model_card.render(ODIR, **inputs)
    row = (
        f"<td>ODIR-2019 score, per patient (as the challenge)</td><td>{per_patient['odir_score_per_patient']:.3f}"
        f"</td><td>not resampled</td><td>{deployed['odir_score_per_patient']:.3f}</td>"
    )
    assert row in page and "not the challenge leaderboard" in page and "on the 30 test patients" in page
    assert "No per-patient figure" not in page
    oct_inputs = _report(OCT, None)
    assert "per patient" not in model_card.render(OCT, **oct_inputs)


def test_missing_plots_say_so_instead_of_breaking_the_page(oct_card):
    inputs, _, _ = oct_card
    page = model_card.render(OCT, **inputs)  # no PNG bytes given
    assert "confusion_matrix.png was not written for this run" in page and "reliability.png was not" in page


def test_worst_cases_keep_the_lowest_truth_probabilities_in_bounded_memory():
    spec = OCT
    y, p = _single_label(spec, 100, seed=5)
    truth = p[np.arange(100), y.argmax(axis=1)]
    worst = model_card.WorstCases(spec, keep=5)
    images = np.arange(100, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
    for start in range(0, 100, 7):
        worst.update(images[start : start + 7], y[start : start + 7], p[start : start + 7])
        assert len(worst.cases()) <= 5
    kept = [int(case["image"][0, 0, 0]) for case in worst.cases()]
    assert kept == list(np.argsort(truth, kind="stable")[:5])
    assert worst.seen == 100 and worst.wrong == int((p.argmax(axis=1) != y.argmax(axis=1)).sum())
    # multi-label: an image's worst label (present with a low p, or absent with a high one)
    worst = model_card.WorstCases(ODIR, keep=1)
    y = np.zeros((2, 8))
    y[:, 0] = 1
    p = np.full((2, 8), 0.1, np.float32)
    p[:, 0] = 0.9
    p[1, 3] = 0.97  # image 1: G absent but p 0.97
    worst.update(np.zeros((2, 4, 4, 3), np.uint8), y, p)
    assert worst.cases()[0]["probs"][3] == pytest.approx(0.97) and worst.wrong == 1


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_data():
    small = confidence_intervals(OCT, *_single_label(OCT, 40, seed=1), resamples=100, seed=7)
    large = confidence_intervals(OCT, *_single_label(OCT, 400, seed=1), resamples=100, seed=7)
    for key in ("accuracy", "macro_f1", "auc", "urgent_referral_auc"):
        for ci in (small["metrics"][key], large["metrics"][key]):
            assert ci["low"] <= ci["value"] <= ci["high"] and ci["resamples"] == 100, (key, ci)
        width = {name: r["metrics"][key]["high"] - r["metrics"][key]["low"] for name, r in (("s", small), ("l", large))}
        assert width["l"] < width["s"], (key, width)
    assert small["n"] == 40 and small["confidence"] == 0.95
    # the same seed gives the same interval; the point estimates are metrics.json's
    first, again = (confidence_intervals(OCT, *_single_label(OCT, 40, seed=1), resamples=20, seed=7) for _ in "ab")
    assert first == again
    y, p = _single_label(OCT, 40, seed=1)
    full = compute_metrics(OCT, y, p)
    assert {k: v["value"] for k, v in small["metrics"].items()} == {k: full[k] for k in small["metrics"]}


def test_bootstrap_skips_resamples_where_a_metric_is_undefined():
    spec = get_task("glaucoma")
    y = np.eye(2)[[0] * 38 + [1] * 2]  # 2 positives: many resamples draw none, AUC undefined there
    p = np.where(y > 0, 0.8, 0.2).astype(np.float32)
    ci = confidence_intervals(spec, y, p, resamples=50, seed=0)["metrics"]
    assert 0 < ci["auc"]["resamples"] < 50 and ci["accuracy"]["resamples"] == 50
    assert ci["auc"]["low"] == ci["auc"]["high"] == 1.0
    one_class = confidence_intervals(spec, np.eye(2)[[0] * 10], np.full((10, 2), 0.5), resamples=20)["metrics"]
    assert one_class["auc"] == {"value": None, "low": None, "high": None, "resamples": 0}


def test_scalar_metrics_are_compute_metrics_figures():
    for spec, (y, p) in ((OCT, _single_label(OCT, 50, 2)), (ODIR, _multi_label(ODIR, 50, 2))):
        full, scalars = compute_metrics(spec, y, p), scalar_metrics(spec, y, p)
        assert scalars == {k: full[k] for k in scalars} and set(spec.extra_metrics) <= set(scalars)


def test_split_counts_count_images_and_patients_per_class():
    records = {
        "train": [
            {"label": [1, 0], "patient": "a"},
            {"label": [1, 0], "patient": "a"},
            {"label": [0, 1], "patient": "b"},
        ]
    }
    counts = model_card.split_counts(("NRG", "RG"), records)
    assert counts["train"] == {
        "classes": {"NRG": {"images": 2, "patients": 1}, "RG": {"images": 1, "patients": 1}},
        "images": 3,
        "patients": 2,
    }


@pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="no chromium on PATH: install the Debian package `chromium` to screenshot the model card",
)
def test_chromium_draws_the_card(oct_card, tmp_path):
    _, _, path = oct_card
    shot = tmp_path / "card.png"
    cmd = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1200,3000",
        path.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), proc.stderr[-2000:]
    with Image.open(shot) as img:
        pixels = np.asarray(img.convert("L"), np.float32)
    assert pixels.shape == (3000, 1200) and pixels.std() > 10  # text, tables and images, not a blank page


def test_the_sweep_report_links_the_winners_model_card(tmp_path):
    from eyeray.sweep import SweepConfig
    from eyeray.sweep import report as sweep_report

    cfg = SweepConfig(task="oct", output=str(tmp_path), trials=1, epochs=1, fine_tune_epochs=0, weights="none")
    row = {"trial_id": "t-1", "status": "finished", "best_val_macro_f1": 0.9, "bundle": "trials/t-1/bundle", "rank": 1}
    page = Path(sweep_report.write(cfg, OCT, [row], {}, {}, None)).read_text()
    assert '<a href="trials/t-1/report/index.html">trials/t-1/report/index.html</a>' in page


def test_card_on_s3_inlines_the_uploaded_pngs_and_is_written_beside_them(oct_card, monkeypatch):
    import fsspec

    from eyeray import storage

    inputs, page, path = oct_card
    memory, real = fsspec.filesystem("memory"), storage.filesystem

    def filesystem(uri):
        return (memory, "/" + str(uri).removeprefix("s3://").rstrip("/")) if str(uri).startswith("s3://") else real(uri)

    monkeypatch.setattr(storage, "filesystem", filesystem)
    for png in path.parent.glob("*.png"):  # the report as write_report uploaded it
        memory.pipe(f"/bucket/run/report/{png.name}", png.read_bytes())
    uri = model_card.write(OCT, "s3://bucket/run/report", **inputs)
    assert uri == "s3://bucket/run/report/index.html"
    assert memory.cat("/bucket/run/report/index.html").decode() == page
