"""The scoring and sweep report.html pages, rendered from eyeray/templates without a Ray cluster:
every section is there, what comes from data is printed as text (autoescape), both pages inline the
one shared stylesheet, and a template given too little fails instead of printing a blank."""

from __future__ import annotations

import csv
from importlib.resources import files
from pathlib import Path

import jinja2
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from eyeray.data import imaging
from eyeray.evaluation import pages
from eyeray.score import report as score_report
from eyeray.score.pipeline import REPORT_COLUMNS
from eyeray.sweep import SweepConfig
from eyeray.sweep import report as sweep_report
from eyeray.tasks import get_task

EVIL_PATH = "s3://archive/<script>alert(1)</script>.jpg"
EVIL_REASON = "cannot decode: <b>not an image</b>"
EVIL_NAME = "<img src=x onerror=alert(1)>.jpg"  # a real file name: no slash in it
SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("task", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("gate", pa.string()),
        ("gate_reason", pa.string()),
        ("gate_score", pa.float32()),
        ("label", pa.string()),
        ("referral", pa.bool_()),
        ("confidence", pa.float64()),
        ("needs_review", pa.bool_()),
        ("explanations", pa.list_(pa.string())),
        ("frame", pa.int32()),
        ("frames", pa.int32()),
        ("probabilities", pa.map_(pa.string(), pa.float32())),
        *[(name, pa.string()) for name in imaging.DICOM_IDENTIFIERS],
    ]
)
STYLESHEET = files("eyeray").joinpath("templates", "style.css").read_text().strip()


def _image(path: Path, seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def _row(path: str, label: str | None, confidence: float | None, review: bool, **extra) -> dict:
    row = {"path": path, "task": "oct", "status": "ok", "error": None}
    row.update(gate="passed", gate_reason=None, gate_score=0.5)
    row.update(label=label, referral=label in ("CNV", "DME"))
    return {**row, "confidence": confidence, "needs_review": review, "explanations": [], **extra}


def _summary(
    rows: pa.Table, predictions: dict[str, int], errors: dict[str, int], declined: dict | None = None, **decision
) -> dict:
    """The shape eyeray.score.pipeline.run hands to the report (summarize + bundles, ensemble, decision)."""
    declined = declined or {}
    scored = rows.num_rows - sum(errors.values()) - sum(declined.values())
    return {
        "task": "oct",
        "bundle_version": "v-test",
        "files_seen": rows.num_rows,
        "rows": rows.num_rows,
        "scored": scored,
        "declined": sum(declined.values()),
        "declined_by_reason": declined,
        "errors": sum(errors.values()),
        "errors_by_reason": errors,
        "predictions": predictions,
        "referred": 2,
        "needs_review": 3,
        "scored_this_run": rows.num_rows,
        "wall_seconds": 1.25,
        "images_per_s_this_run": 4.0,
        "bundles": [{"uri": "model/", "version": "1.0.0", "backbone": "vgg16"}],
        "ensemble": None,
        "decision": {"calibration": ["temperature"], "tta": False, "review_below": 0.6, **decision},
    }


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> tuple[dict, str, Path]:
    """A scoring output folder: five scans (one with a hostile name), one overlay, one image the gate
    declined, one failed file."""
    root = tmp_path_factory.mktemp("score")
    scans = root / "scans"
    scans.mkdir()
    output = root / "out"
    (output / "explanations").mkdir(parents=True)
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(output / "explanations" / "a-CNV.png")
    rows = [
        _row(_image(scans / "cnv-1.jpeg", 1), "CNV", 0.31, True, explanations=["explanations/a-CNV.png"]),
        _row(_image(scans / "dme-1.jpeg", 2), "DME", 0.42, True, patient_id="PAT-7", study_uid="1.2.3.4"),
        _row(_image(scans / EVIL_NAME, 3), "DME", 0.55, True),
        _row(_image(scans / "normal-1.jpeg", 4), "NORMAL", 0.97, False),
        _row(_image(scans / "normal-2.jpeg", 5), "NORMAL", 0.95, False),
        {**_row(_image(scans / "blank.jpeg", 6), None, None, True), "status": "declined", "referral": None}
        | {"gate": "ungradable", "gate_reason": "blank or flat image", "gate_score": 0.7},
        {**_row(EVIL_PATH, None, None, False), "status": "error", "error": EVIL_REASON, "referral": None}
        | {"gate": None, "gate_score": None},
    ]
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    assert table.column_names == REPORT_COLUMNS
    operating_point = {
        "rule": "referral_sensitivity",
        "score": "p(CNV)+p(DME)",
        "threshold": 0.25,
        "target": 0.95,
        "chosen_on": "validation",
    }
    gate = {"method": "mahalanobis", "threshold": 12.5, "keep": 0.95, "kept_on_validation": 0.951}
    summary = _summary(
        table,
        {"CNV": 1, "DME": 2, "DRUSEN": 0, "NORMAL": 2},
        {EVIL_REASON: 1},
        {"ungradable: blank or flat image": 1},
        operating_point=operating_point,
        gate=[gate],
    )
    uri = score_report.write(str(output), summary, table)
    return summary, Path(uri).read_text(), output


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, str]:
    """A sweep output folder: two finished trials, one stopped early, one failed, an ensemble of two."""
    spec = get_task("oct")
    output = tmp_path_factory.mktemp("sweep") / "out"
    cfg = SweepConfig(task="oct", output=str(output), trials=4, epochs=2, fine_tune_epochs=0, weights="none")
    metric = spec.selection_metric
    rows, histories = [], {}
    trials = [
        ("t-win", "finished", 0.91),
        ("t-2", "finished", 0.62),
        ("t-3", "early-stopped", 0.3),
        ("t-4", "error", None),
    ]
    for rank, (trial_id, status, best) in enumerate(trials, start=1):
        rows.append(
            {
                "trial_id": trial_id,
                "status": status,
                "learning_rate": 10.0**-rank,
                f"best_val_{metric}": best,
                "best_epoch": 2 if best is not None else None,
                "val_loss_at_best": 0.5 if best is not None else None,
                "epochs_run": 2 if best is not None else 0,
                "wall_time_s": 3.2,
                f"test_{metric}": best - 0.05 if status == "finished" else None,
                "bundle": str(output / "trials" / trial_id / "bundle") if status == "finished" else "",
                "error": "ValueError: <b>bad</b> <script>alert(1)</script>" if status == "error" else "",
                "rank": rank,
            }
        )
        histories[trial_id] = [{"epoch": e, f"val_{metric}": (best or 0) * e / 2} for e in (1, 2)] if best else []
    ensemble = {
        "k": 2,
        "n_test": 40,
        "members": [{"trial_id": "t-win", metric: 0.86}, {"trial_id": "t-2", metric: 0.57}],
        "mean": {metric: 0.88},
        "vote": {metric: 0.8},
        "mean_beats_best": True,
        "vote_beats_best": False,
        "best_single": 0.86,
    }
    space = {"learning_rate": "loguniform(1e-4, 1e-1)", "backbone": "['small_cnn']"}
    uri = sweep_report.write(cfg, spec, rows, histories, space, ensemble)
    return output, Path(uri).read_text()


def test_scoring_report_has_every_section(scored):
    summary, page, _ = scored
    for heading in (
        "<h1>Scoring report: oct</h1>",
        "<h2>Decision</h2>",
        "<h2>Review queue (4)</h2>",
        "<h2>Declined by the gate (1)</h2>",
        "<h2>Predicted classes</h2>",
        "<h2>Errors</h2>",
        "<h2>Examples per predicted class</h2>",
        "<h3>DRUSEN</h3>",
    ):
        assert heading in page
    assert "Model: vgg16 1.0.0." in page and "7 files seen, 5 answered, 1 declined by the gate, 1 errors" in page
    assert "Gate: mahalanobis distance to the training images, threshold 12.5 (chosen to keep 95 % of" in page
    assert "referral_sensitivity: refer when p(CNV)+p(DME) ≥ 0.2500 (target 0.95, validation)" in page
    assert "<b>2</b> of 5 answered images are referred. Test-time augmentation: off." in page
    assert '<td>DME</td><td class="num">2</td><td class="num">40.0 %</td>' in page
    assert "none predicted" in page  # DRUSEN: no example
    # review queue, least confident first: the overlay (PNG) of cnv-1, then the scans themselves
    review = page[page.index("Review queue") : page.index("Declined by the gate")]
    assert review.index("cnv-1.jpeg") < review.index("dme-1.jpeg") < review.index("&lt;img src=x")
    assert "dme-1.jpeg · patient PAT-7 · study 1.2.3.4" in review  # a clinician finds the case by them
    assert review.count("no overlay (--explain)") == 2 and review.count("<b>refer</b>") == 3
    assert "blank.jpeg" not in review  # a declined image has no answer to show there ...
    declined = page[page.index("Declined by the gate") : page.index("Predicted classes")]
    assert '<td>ungradable: blank or flat image</td><td class="num">1</td>' in declined
    assert "blank.jpeg" in declined and "cnv-1.jpeg" not in declined  # ... but its own section
    # trusted data URIs go out raw: 1 overlay + the class chart as PNG, 2 review scans + 5 examples
    # + 1 declined scan as JPEG
    assert page.count('src="data:image/png;base64,') == 2 and page.count('src="data:image/jpeg;base64,') == 8


def test_review_queue_csv_lists_the_answered_least_confident_first_then_the_declined(scored):
    _, _, output = scored
    lines = (output / score_report.REVIEW_FILE).read_text().splitlines()
    rows = list(csv.DictReader(lines))
    assert [r["path"].rsplit("/", 1)[-1] for r in rows] == ["cnv-1.jpeg", "dme-1.jpeg", EVIL_NAME, "blank.jpeg"]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "declined"]
    assert [r["confidence"] for r in rows] == ["0.3100", "0.4200", "0.5500", ""]
    assert [r["declined_because"] for r in rows] == ["", "", "", "ungradable: blank or flat image"]
    assert rows[3]["labels"] == rows[3]["referral"] == "" and rows[0]["overlays"] == "explanations/a-CNV.png"
    assert [r["patient_id"] for r in rows] == ["", "PAT-7", "", ""] and rows[1]["study_uid"] == "1.2.3.4"


def test_scoring_report_prints_paths_and_reasons_as_text(scored):
    _, page, _ = scored
    assert (
        "&lt;script&gt;alert(1)&lt;/script&gt;.jpg" in page and "cannot decode: &lt;b&gt;not an image&lt;/b&gt;" in page
    )
    assert 'alt="&lt;img src=x onerror=alert(1)&gt;.jpg"' in page
    for raw in ("<script", "<img src=x", "<b>not an image"):
        assert raw not in page


def test_scoring_report_without_review_or_errors_multi_label():
    """Multi-label rows (ODIR-like lists of labels), no case to review, no failed file."""
    labels = pa.field("label", pa.list_(pa.string()))
    row = {**_row("gone/left.jpg", None, 0.9, False), "label": ["D", "G"], "referral": None}
    rows = pa.Table.from_pylist([row], schema=SCHEMA.set(SCHEMA.get_field_index("label"), labels))
    summary = _summary(rows, {"N": 0, "D": 1, "G": 1}, {}, operating_point=None, gate=[{"verdict": "no gate"}])
    summary["referred"] = None
    page = score_report.render(summary, rows, score_report.review_queue(rows))
    assert "<h2>Review queue (0)</h2>" in page and "No case is below the review level." in page
    assert "No file failed." in page and "no operating point in the bundle" in page and "referred" not in page
    assert "The gate declined no image." in page and "Gate: none (made before the gate)." in page
    assert page.count("unavailable: ") == 2  # the file moved since it was scored: D and G each show it
    assert "<h3>N</h3>" in page and "none predicted" in page


def test_sweep_report_has_every_section(sweep):
    output, page = sweep
    for heading in (
        "<h1>Model selection: ",
        "<h2>Leaderboard</h2>",
        "<h2>Ensemble of the top 2 (test split, 40 images)</h2>",
        "<h2>Search space</h2>",
        "<h2>Settings</h2>",
    ):
        assert heading in page
    assert "Winner: <b>t-win</b>, validation macro_f1 0.91" in page
    assert "4 trials: 2 finished, 1 early-stopped, 1 error, 0 not run." in page
    assert page.count("<tr class=winner>") == 1 and "<tr class=winner><td>t-win</td>" in page
    assert "averaged probabilities: 0.88 beats the single best model&#39;s 0.86<br>majority vote" in page
    assert '<img src="sweep_curves.png"' in page and '<img src="ensemble.png"' in page
    assert "<td>ASHA</td><td>grace period 1, reduction factor 2</td>" in page
    for name in ("leaderboard.csv", "sweep_curves.png", "ensemble.png", "sweep.json", "report.html"):
        assert (output / name).stat().st_size > 0


def test_sweep_report_prints_errors_as_text(sweep):
    _, page = sweep
    assert "ValueError: &lt;b&gt;bad&lt;/b&gt; &lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script" not in page and "<b>bad" not in page


def test_sweep_report_without_trials_or_ensemble(tmp_path):
    spec = get_task("glaucoma")
    cfg = SweepConfig(task="glaucoma", output=str(tmp_path), trials=2, epochs=1, fine_tune_epochs=0, weights="none")
    ensemble = {"k": 3, "note": "fewer than 2 trials finished: <no ensemble>"}
    page = Path(sweep_report.write(cfg, spec, [], {}, {"dropout": "[0.1, 0.3]"}, ensemble)).read_text()
    assert "No trial finished: no winner." in page and "<p>No trials.</p>" in page
    assert "<h2>Ensemble of the top 3</h2>" in page and "&lt;no ensemble&gt;" in page


def test_both_pages_inline_the_one_shared_stylesheet(scored, sweep):
    assert STYLESHEET.startswith("/*") and "tr.winner" in STYLESHEET and ".review img" in STYLESHEET
    for page in (scored[1], sweep[1]):
        assert page.count("<style>") == 1 and STYLESHEET in page
        assert "<link" not in page  # one self-contained file


@pytest.mark.parametrize("template", ["score_report.html", "sweep_report.html"])
def test_a_template_given_too_little_fails(template):
    with pytest.raises(jinja2.UndefinedError):
        pages.render(template, task="oct", title="oct")


def test_a_missing_value_fails_the_render_instead_of_printing_a_blank():
    empty = {"columns": [], "rows": []}
    context = {
        "title": "OCT",
        "metric": "macro_f1",
        "winner": None,
        "n_trials": 0,
        "counts": "0 finished",
        "curves": "sweep_curves.png",
        "leaderboard": empty,
        "ensemble": None,
        "space": empty,
        "settings": empty,
    }
    assert "0 trials: 0 finished." in pages.render("sweep_report.html", **context)
    del context["counts"]  # printed as {{ counts }}: a lenient Undefined would print ""
    with pytest.raises(jinja2.UndefinedError, match="counts"):
        pages.render("sweep_report.html", **context)


def test_environment_escapes_html_templates_only():
    env = pages.environment()
    assert env is pages.environment()  # built once
    assert env.autoescape("score_report.html") and not env.autoescape("style.css")
