"""Batch scoring on the session's Ray cluster: one row per file, bad files as rows, exactly once
across kills and re-runs, ensembles, S3, the report."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from bundles import make_bundle
from corpus import STUDY_UID, gradient, make_oct_volume, real_bscans, write_bad_corpus
from faults import CrashingPredictor
from PIL import Image

from eyeray import storage
from eyeray.cli import add_score_arguments, score_config
from eyeray.data import imaging
from eyeray.data.files import list_inputs
from eyeray.decision import operating_points
from eyeray.decision.options import DecisionOptions
from eyeray.model import bundle
from eyeray.model.options import InferenceOptions
from eyeray.score import ScoreConfig, overlays, run, shards
from eyeray.score.pipeline import Plan, pipeline, predictor_args, version_key
from eyeray.score.predictor import BundlePredictor
from eyeray.tasks import get_task

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[1]
OCT_CLASSES = get_task("oct").classes


@pytest.fixture(scope="module")
def oct_bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("model"), decision=True)


def read_rows(output: str) -> list[dict]:
    fs, root = storage.filesystem(output)
    dataset = pads.dataset(root, format="parquet", filesystem=fs, exclude_invalid_files=True)
    return dataset.to_table().to_pylist()


def write_pngs(root: Path, n: int) -> None:
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.roll(gradient(48, 64), i, axis=1)).save(root / f"scan-{i:05d}.png")


def test_predictor_adds_columns_without_ray(oct_bundle):
    predictor = BundlePredictor([oct_bundle])
    batch = {
        "path": np.array(["a", "b"], dtype=object),
        "image": np.zeros((2, 32, 32, 3), np.uint8),
        "error": np.array(["", "corrupt image"], dtype=object),
        "height": np.array([32, 0]),
        "width": np.array([32, 0]),
    }
    out = predictor(batch)
    assert "image" not in out and "model_probabilities" not in out
    assert out["gate"].tolist() == ["no gate", ""]  # a bundle made before the gate answers, and says so
    assert out["label"][0] in OCT_CLASSES and out["label"][1] == ""
    np.testing.assert_allclose(out["probabilities"][0].sum(), 1, rtol=1e-5)
    assert np.isnan(out["probabilities"][1]).all()


def test_predictor_runs_its_bundles_compiled_as_configured(oct_bundle):
    """--batch-size, --jit-compile and --mixed-precision reach the actors' arguments; XLA gives the
    default run's probabilities. (Mixed precision is process-wide, so it runs in actors only:
    test_decode_runs_in_its_own_tasks_beside_the_model_actors; its outputs: test_compiled.)"""
    fast = InferenceOptions(jit_compile=True, mixed_precision=True)
    cfg = ScoreConfig(bundles=[oct_bundle], input="i", output="o", batch_size=8, inference=fast)
    args = predictor_args(cfg, 32)
    assert (args["batch_size"], args["inference"], args["decision"]) == (8, fast, DecisionOptions())
    args["inference"] = InferenceOptions(jit_compile=True)
    batch = {
        "path": np.array(list("abc"), dtype=object),
        "image": np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), np.uint8),
        "error": np.array(["", "", ""], dtype=object),
        "height": np.array([32, 32, 32]),
        "width": np.array([32, 32, 32]),
    }
    compiled, default = BundlePredictor(**{**args, "explain": "none"}), BundlePredictor([oct_bundle], explain="none")
    assert compiled.bundles[0].compiled.jit_compile and not default.bundles[0].compiled.jit_compile
    np.testing.assert_allclose(compiled(dict(batch))["probabilities"], default(dict(batch))["probabilities"], atol=1e-5)


def test_model_actor_reads_no_file_and_overlays_are_drawn_in_their_own_stage(oct_bundle, oct_sample, tmp_path):
    """The predictor computes Grad-CAM maps from the decoded batch alone (its paths do not even
    exist); the overlay stage draws them on the original scans, whole and shrunk to 1024 px."""
    predictor = BundlePredictor([oct_bundle], explain="top-2")
    scans = sorted(oct_sample.rglob("*.jpeg"))[:3]
    images = np.stack([imaging.preprocess(imaging.decode(p.read_bytes()), 32) for p in scans])
    batch = {
        "path": np.array(["/nonexistent/a.jpeg", "/nonexistent/b.jpeg", "/nonexistent/c.jpeg"], dtype=object),
        "image": images,
        "error": np.array(["", "corrupt image", ""], dtype=object),
        "height": np.array([496, 0, 496]),
        "width": np.array([1024, 0, 1024]),
    }
    out = predictor(batch)
    assert "explanations" not in out
    assert [m.shape[0] for m in out[overlays.HEATMAPS]] == [2, 0, 2]
    assert [len(names.split("|")) if names else 0 for names in out[overlays.EXPLAINED]] == [2, 0, 2]
    assert all(0 <= m.min() and m.max() <= 1 for m in out[overlays.HEATMAPS][[0, 2]])

    vanished = overlays.draw(dict(out), str(tmp_path / "gone"), "v1")  # files gone since scoring: no overlay
    assert list(vanished["explanations"]) == ["", "", ""] and overlays.HEATMAPS not in vanished
    drawn = overlays.draw({**out, "path": np.array([str(p) for p in scans], dtype=object)}, str(tmp_path), "v1")
    assert overlays.HEATMAPS not in drawn and overlays.EXPLAINED not in drawn and drawn["explanations"][1] == ""
    for row in (0, 2):
        files = drawn["explanations"][row].split("|")
        assert [f.rsplit("-", 1)[1] for f in files] == [f"{c}.png" for c in out[overlays.EXPLAINED][row].split("|")]
        original = Image.open(scans[row])
        original.thumbnail((1024, 1024))
        assert all(Image.open(tmp_path / f).size == original.size for f in files)


def test_real_samples_and_bad_file_corpus_give_one_row_per_file(ray_cluster, oct_bundle, oct_sample, tmp_path, capfd):
    archive = tmp_path / "archive"
    shutil.copytree(oct_sample, archive / "oct")
    expected = write_bad_corpus(archive / "odd")
    output = str(tmp_path / "scored")
    cfg = ScoreConfig(bundles=[oct_bundle], input=str(archive), output=output, batch_size=16, rows_per_shard=30)

    files = list_inputs(str(archive))
    inputs = [f"odd/{k}" for k, v in expected.items() if v is not None]
    assert len(files) == 101 + len(inputs) and len(inputs) >= 20
    summary = run(cfg)
    rows = read_rows(output)
    assert sorted(r["path"] for r in rows) == files  # one row per file: none lost, none twice
    by_rel = {r["path"][len(str(archive)) + 1 :]: r for r in rows}
    for rel, status in expected.items():
        if status is None:
            assert f"odd/{rel}" not in by_rel, rel
        else:
            row = by_rel[f"odd/{rel}"]
            assert row["status"] == status, (rel, row["error"])
            assert bool(row["error"]) == (status == "error") and (row["label"] is None) == (status == "error")
    assert "pixel data" in by_rel["odd/no-pixels.dcm"]["error"] and "too large" in by_rel["odd/bomb.png"]["error"]
    # a DICOM row names its patient, study, series, instance, laterality and acquisition, an error row too
    scan, empty = by_rel["odd/scan.dcm"], by_rel["odd/no-pixels.dcm"]
    assert (scan["patient_id"], scan["study_uid"], scan["laterality"]) == ("TEST-0001", STUDY_UID, "R")
    assert scan["acquired_at"] == "20261204101500" and scan["sop_uid"] and scan["series_uid"] != scan["sop_uid"]
    assert empty["patient_id"] == "TEST-0001" and empty["sop_uid"] != scan["sop_uid"]
    assert by_rel["odd/DICOMFILE"]["patient_id"] == "TEST-0001"  # DICOM by content, whatever the name
    assert all(r[c] is None for p, r in by_rel.items() if p.startswith("oct/") for c in imaging.DICOM_IDENTIFIERS)
    real = {p: r for p, r in by_rel.items() if p.startswith("oct/")}
    assert len(real) == 101 and all(r["status"] == "ok" and r["label"] in OCT_CLASSES for r in real.values())
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in real.values())
    assert all(r["width"] > 0 and r["height"] > 0 and r["scored_at"] for r in real.values())
    assert {r["bundle_version"] for r in rows} == {bundle.read_manifest(oct_bundle)["version"]}
    n_errors = sum(v == "error" for v in expected.values())
    assert (summary["files_seen"], summary["rows"], summary["errors"]) == (len(files), len(files), n_errors)
    assert summary["scored"] == len(files) - n_errors and sum(summary["predictions"].values()) == summary["scored"]
    assert json.loads((tmp_path / "scored" / "summary.json").read_text())["rows"] == len(files)
    report = (tmp_path / "scored" / "report.html").read_text()
    assert "decompression bomb" in report and "without pixel data" in report
    assert report.count("data:image/jpeg;base64") == sum(min(4, n) for n in summary["predictions"].values())

    seen = capfd.readouterr()
    assert "TEST-0001" not in seen.out + seen.err and STUDY_UID not in seen.out + seen.err  # nothing logs them

    again = run(cfg)
    assert again["scored_this_run"] == 0 and len(read_rows(output)) == len(files)
    (archive / "oct" / "NORMAL" / "NORMAL-999-1.jpeg").write_bytes(b"\xff\xd8\xff truncated")
    third = run(cfg)  # a new file arrives: only it is scored
    assert third["scored_this_run"] == 1 and len(read_rows(output)) == len(files) + 1


def test_fundus_samples_score_without_error_and_odir_rows_carry_label_lists(
    ray_cluster, glaucoma_sample, odir_sample, tmp_path
):
    for task, sample in (("glaucoma", glaucoma_sample), ("odir", odir_sample / "images")):
        model = make_bundle(tmp_path / task, task, decision=True)
        output = str(tmp_path / f"{task}-scored")
        summary = run(ScoreConfig(bundles=[model], input=str(sample), output=output, report=False))
        rows = read_rows(output)
        files = sorted(str(p) for p in sample.rglob("*") if p.is_file())
        assert sorted(r["path"] for r in rows) == files and summary["errors"] == 0, task
        manifest = bundle.read_manifest(model)
        for row in rows[:20]:  # labels are the stored operating point's, on the calibrated probabilities
            probs = np.array([row["probabilities"][c] for c in manifest["classes"]])
            labels = row["label"] if manifest["multi_label"] else [row["label"]]
            hits = operating_points.decisions(manifest["operating_point"], probs[None])[0]
            assert labels == [c for c, hit in zip(manifest["classes"], hits) if hit], row["path"]
        if task == "odir":
            assert all(isinstance(r["label"], list) for r in rows)
            assert sum(summary["predictions"].values()) == sum(len(r["label"]) for r in rows)


def test_ensemble_of_two_sizes_carries_each_models_probabilities(ray_cluster, oct_bundle, tmp_path, glaucoma_sample):
    second = make_bundle(tmp_path / "second", size=48, decision=True, seed=1)
    archive = tmp_path / "archive"
    shutil.copytree(glaucoma_sample / "RG", archive)
    (archive / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    output = str(tmp_path / "scored")
    summary = run(ScoreConfig(bundles=[oct_bundle, second], input=str(archive), output=output, ensemble="vote"))
    manifests = [bundle.read_manifest(u) for u in (oct_bundle, second)]
    assert summary["bundle_version"] == version_key(manifests, "vote") and summary["ensemble"] == "vote"
    rows = read_rows(output)
    assert len(rows) == 14 and summary["errors"] == 1
    loaded = [bundle.load(u) for u in (oct_bundle, second)]
    for row in rows:
        if row["status"] == "error":
            assert row["model_probabilities"] is None and row["label"] is None
            continue
        # one decode for both members, as large as the larger input needs (the pipeline's `min_side`)
        image = imaging.decode(Path(row["path"]).read_bytes(), min_side=max(b.image_size for b in loaded))
        votes = []
        for b in loaded:  # each member saw its own input size, from the same decode; calibrated by its manifest
            decision = b.decide(b.predict(imaging.preprocess(image, b.image_size)[None]))
            np.testing.assert_allclose(
                list(row["model_probabilities"][b.version].values()), decision.probabilities[0], atol=1e-5
            )
            votes.append(decision.labels[0][0])
        shares = row["probabilities"]
        assert all(shares[c] == pytest.approx(votes.count(c) / 2) for c in OCT_CLASSES)
        assert row["label"] in votes


def test_rows_carry_calibrated_decisions_a_review_queue_and_overlays(ray_cluster, oct_bundle, oct_sample, tmp_path):
    """Scoring rows say what serving says: calibrated probabilities, the operating point's labels
    and referral, a confidence and needs_review; rows needing review get a Grad-CAM overlay on the
    original scan, and the report lists them least confident first."""
    archive = tmp_path / "archive"
    shutil.copytree(oct_sample, archive)
    (archive / "broken.jpg").write_bytes(b"\xff\xd8\xff not a scan")
    output = tmp_path / "scored"
    summary = run(
        ScoreConfig(
            bundles=[oct_bundle], input=str(archive), output=str(output), decision=DecisionOptions(review_below=0.5)
        )
    )
    loaded = bundle.load(oct_bundle)
    assert loaded.manifest["calibration"]["method"] == "temperature"
    rows = read_rows(str(output))
    ok = [r for r in rows if r["status"] == "ok"]
    for row in ok[:12]:
        raw = loaded.predict(imaging.preprocess(imaging.decode(Path(row["path"]).read_bytes(), min_side=32), 32)[None])
        expected = loaded.decide(raw)
        probs = [row["probabilities"][c] for c in OCT_CLASSES]
        np.testing.assert_allclose(probs, expected.probabilities[0], atol=1e-5)
        assert not np.allclose(probs, raw[0], atol=1e-3)  # the calibration did change the numbers
        assert row["referral"] == bool(expected.referral[0]) and row["label"] == expected.labels[0][0]
        assert row["confidence"] == pytest.approx(max(probs), abs=1e-5)
    for row in ok:
        assert row["needs_review"] == (row["confidence"] < 0.5)
        assert len(row["explanations"]) == int(row["needs_review"]), row["path"]
        for overlay in row["explanations"]:
            original = Image.open(row["path"])
            original.thumbnail((1024, 1024))
            assert Image.open(output / overlay).size == original.size  # the whole scan, its aspect ratio kept
    error = next(r for r in rows if r["status"] == "error")
    assert (error["referral"], error["confidence"], error["needs_review"], error["explanations"]) == (
        None,
        None,
        None,
        [],
    )
    decision = json.loads(ok[0]["decision"])
    assert decision["operating_point"]["rule"] == "referral_sensitivity" and decision["calibration"] == ["temperature"]
    flagged = [r for r in ok if r["needs_review"]]
    assert summary["needs_review"] == len(flagged) > 0 and summary["referred"] == sum(r["referral"] for r in ok)
    queue = list(csv.DictReader((output / "review_queue.csv").read_text().splitlines()))
    assert len(queue) == len(flagged) and {r["status"] for r in queue} == {"ok"}
    confidences = [float(r["confidence"]) for r in queue]
    assert confidences == sorted(confidences)
    report = (output / "report.html").read_text()
    assert f"Review queue ({len(flagged)})" in report and "referral_sensitivity" in report
    assert report.count("data:image/png;base64") == min(len(flagged), 60) + 1  # overlays + the class chart

    # Everyone referred at a user threshold of 0: a new scoring version, referred rows explained.
    overridden = tmp_path / "override"
    again = run(
        ScoreConfig(
            bundles=[oct_bundle],
            input=str(archive),
            output=str(overridden),
            decision=DecisionOptions(thresholds="0"),
            explain="referred",
        )
    )
    assert again["bundle_version"] not in (summary["bundle_version"], loaded.version)
    rows = [r for r in read_rows(str(overridden)) if r["status"] == "ok"]
    assert all(r["referral"] and r["label"] in ("CNV", "DME") for r in rows)
    assert all(len(r["explanations"]) == 1 and r["explanations"][0].endswith(f"-{r['label']}.png") for r in rows)
    assert json.loads(rows[0]["decision"])["operating_point"]["chosen_on"] == "user override"


def test_a_threshold_override_the_bundle_cannot_take_fails_before_scoring(ray_cluster, oct_bundle, tmp_path):
    archive = tmp_path / "archive"
    write_pngs(archive, 3)
    with pytest.raises(ValueError, match="takes one threshold"):
        run(
            ScoreConfig(
                bundles=[oct_bundle],
                input=str(archive),
                output=str(tmp_path / "out"),
                decision=DecisionOptions(thresholds="0.2,0.3"),
            )
        )
    with pytest.raises(ValueError, match="between 0 and 1"):
        ScoreConfig(
            bundles=[oct_bundle],
            input=str(archive),
            output=str(tmp_path / "out"),
            decision=DecisionOptions(thresholds="1.5"),
        )
    with pytest.raises(ValueError, match="--explain"):
        ScoreConfig(bundles=[oct_bundle], input=str(archive), output=str(tmp_path / "out"), explain="everything")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("part-*"))


def test_archive_and_results_on_s3(ray_cluster, oct_bundle, glaucoma_sample):
    fs, _ = storage.filesystem("s3://pacs")
    fs.mkdir("pacs")
    fs.put(str(glaucoma_sample / "RG"), "pacs/export/RG", recursive=True)
    cfg = ScoreConfig(bundles=[oct_bundle], input="s3://pacs/export", output="s3://pacs/results", batch_size=8)
    summary = run(cfg)
    rows = read_rows("s3://pacs/results")
    assert len(rows) == 13 and summary["errors"] == 0
    assert all(r["path"].startswith("s3://pacs/export/RG/") for r in rows)
    assert fs.exists("pacs/results/summary.json") and fs.exists("pacs/results/report.html")
    assert run(cfg)["scored_this_run"] == 0


def test_driver_killed_mid_run_then_rerun_scores_each_file_exactly_once(ray_cluster, oct_bundle, tmp_path):
    archive, output = tmp_path / "archive", tmp_path / "scored"
    write_pngs(archive, 800)
    cmd = [
        sys.executable,
        str(REPO / "jobs" / "score_archive.py"),
        "--bundle",
        oct_bundle,
        "--input",
        str(archive),
        "--output",
        str(output),
        "--batch-size",
        "8",
        "--rows-per-shard",
        "16",
        "--no-report",
    ]
    proc = subprocess.Popen(cmd, env=ray_cluster["env"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(output.glob("part-*.parquet")):
        assert proc.poll() is None and time.monotonic() < deadline, "the scoring job ended before writing a shard"
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no cleanup, shards in flight stay half-written
    proc.wait()
    # Ray kills a dead driver's workers shortly after; a write already renaming may still land.
    committed_at_kill, stable_since = -1, time.monotonic()
    while time.monotonic() - stable_since < 5:
        now = len(read_rows(str(output)))
        if now != committed_at_kill:
            committed_at_kill, stable_since = now, time.monotonic()
        time.sleep(0.5)
    assert 0 < committed_at_kill < 800, "the kill must land mid-run for this test to mean anything"

    rerun = subprocess.run(cmd, env=ray_cluster["env"], capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    rows = read_rows(str(output))
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)) == 800  # every file exactly once
    summary = json.loads((output / "summary.json").read_text())
    assert summary["scored_this_run"] == 800 - committed_at_kill  # only what was missing
    assert not list(output.glob(".tmp-*"))  # the killed run's partial shards were cleared


def test_predictor_actor_crash_is_retried_by_ray(ray_cluster, oct_bundle, tmp_path):
    write_pngs(tmp_path / "archive", 120)
    output = tmp_path / "scored"
    summary = run(
        ScoreConfig(
            bundles=[oct_bundle], input=str(tmp_path / "archive"), output=str(output), batch_size=8, rows_per_shard=16
        ),
        predictor=CrashingPredictor,  # one model actor dies once, after 3 batches
    )
    assert (output / ".fault-injected").exists()  # the actor did die
    paths = [r["path"] for r in read_rows(str(output))]
    assert len(paths) == len(set(paths)) == 120 and summary["errors"] == 0


def test_decode_runs_in_its_own_tasks_beside_the_model_actors(ray_cluster, oct_bundle, tmp_path):
    """Ray Data fuses a task stage into the next actor stage when their resources match; fused,
    the model actor would read and decode every file itself and wait on the disk. (The actors run
    the model compiled with XLA and in mixed precision, bfloat16 on this CPU: the flags' path through
    a real pipeline.)"""
    import pyarrow as pa

    write_pngs(tmp_path / "archive", 40)
    cfg = ScoreConfig(
        bundles=[oct_bundle],
        input=str(tmp_path / "archive"),
        output=str(tmp_path / "out"),
        batch_size=8,
        inference=InferenceOptions(jit_compile=True, mixed_precision=True),
    )
    todo = shards.remaining(cfg.output, "none yet", pa.array(list_inputs(cfg.input)))
    ds = pipeline(cfg, todo, Plan.of(cfg, [bundle.read_manifest(oct_bundle)]))
    assert sum(r["rows"] for r in ds.take_all()) == 40
    stats = ds.stats()
    assert "MapBatches(load_batch)->MapBatches(BundlePredictor)" not in stats
    assert "MapBatches(load_batch)" in stats and "MapBatches(BundlePredictor)" in stats


def test_cli_takes_repeated_bundles_and_refuses_bad_values():
    import argparse

    parser = add_score_arguments(argparse.ArgumentParser())
    cfg = score_config(
        parser.parse_args(
            [
                "--bundle",
                "a",
                "--bundle",
                "s3://m/b",
                "--input",
                "i",
                "--output",
                "o",
                "--ensemble",
                "vote",
                "--gpus-per-actor",
                "1",
                "--actors",
                "8",
                "--jit-compile",
                "--mixed-precision",
            ]
        )
    )
    assert (cfg.bundles, cfg.ensemble, cfg.gpus_per_actor, cfg.actors) == (["a", "s3://m/b"], "vote", 1.0, 8)
    assert cfg.inference == InferenceOptions(jit_compile=True, mixed_precision=True)
    with pytest.raises(SystemExit):
        parser.parse_args(["--bundle", "a", "--input", "i", "--output", "o", "--ensemble", "median"])
    with pytest.raises(ValueError, match="batch_size"):
        ScoreConfig(bundles=["a"], input="i", output="o", batch_size=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_inputs("/nonexistent/archive")


def test_a_pipeline_the_cluster_can_never_run_is_refused(ray_cluster, oct_bundle, tmp_path):
    write_pngs(tmp_path / "archive", 2)
    cfg = ScoreConfig(bundles=[oct_bundle], input=str(tmp_path / "archive"), output=str(tmp_path / "o"), actors=3)
    with pytest.raises(ValueError, match="lower --actors"):  # 3 actors + a decode task > 2 CPUs
        run(cfg)


def test_mean_ensemble_from_s3_bundles_with_different_operating_points_matches_combine(
    ray_cluster, oct_sample, tmp_path
):
    """`--ensemble mean` (the default) end to end, both members read from s3:// (the session's S3
    server): every row is what `eyeray.decision.ensemble.combine` makes of the members' outputs
    for the same image, decided at the mean of the members' (different) operating points."""
    from eyeray.decision.ensemble import combine

    local = [
        make_bundle(tmp_path / "a", decision=True, seed=0),
        make_bundle(tmp_path / "b", size=48, decision=True, seed=3),
    ]
    fs, _ = storage.filesystem("s3://models")
    fs.mkdir("models")
    uris = []
    for name, path in zip("ab", local):
        fs.put(path, f"models/oct-{name}", recursive=True)
        uris.append(f"s3://models/oct-{name}")
    manifests = [bundle.read_manifest(u) for u in uris]
    thresholds = [m["operating_point"]["threshold"] for m in manifests]
    assert abs(thresholds[0] - thresholds[1]) > 1e-3, thresholds  # the members' operating points differ

    archive = tmp_path / "archive"
    archive.mkdir()
    for path in sorted(oct_sample.rglob("*.jpeg"))[::6]:
        shutil.copy(path, archive / path.name)
    (archive / "broken.jpg").write_bytes(b"\xff\xd8\xff not a scan")
    output = str(tmp_path / "scored")
    summary = run(ScoreConfig(bundles=uris, input=str(archive), output=output, report=False))
    assert summary["ensemble"] == "mean" and summary["bundle_version"] == version_key(manifests, "mean")
    assert summary["errors"] == 1

    loaded = [bundle.load(u) for u in uris]
    rows = read_rows(output)
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in archive.iterdir())
    ok = [r for r in rows if r["status"] == "ok"]
    largest = max(b.image_size for b in loaded)  # the pipeline decodes once, as large as the largest input needs
    images = [imaging.decode(Path(r["path"]).read_bytes(), min_side=largest) for r in ok]
    per_model = [np.stack([b.predict(imaging.preprocess(im, b.image_size)[None])[0] for im in images]) for b in loaded]
    expected = combine(manifests, per_model, "mean")
    op = json.loads(ok[0]["decision"])["operating_point"]
    assert op["threshold"] == pytest.approx(np.mean(thresholds)) and op["chosen_on"].startswith("mean of the members")
    confidence, review = expected.confidence(), expected.needs_review()
    for i, row in enumerate(ok):
        np.testing.assert_allclose([row["probabilities"][c] for c in OCT_CLASSES], expected.probabilities[i], atol=1e-5)
        assert row["label"] == expected.labels[i][0], row["path"]
        assert row["referral"] == bool(expected.referral[i]), row["path"]
        assert row["confidence"] == pytest.approx(float(confidence[i]), abs=1e-5)
        assert row["needs_review"] == bool(review[i])
        assert set(row["model_probabilities"]) == {b.version for b in loaded}
    members = [[list(r["model_probabilities"][b.version].values()) for r in ok] for b in loaded]
    averaged = [[row["probabilities"][c] for c in OCT_CLASSES] for row in ok]
    np.testing.assert_allclose(np.mean(members, axis=0), averaged, atol=1e-5)  # the mean of the members ...
    assert all(not np.allclose(m, averaged, atol=1e-4) for m in members)  # ... and neither member alone


def test_stale_tmp_shards_are_removed_and_a_rerun_scores_each_file_exactly_once(ray_cluster, oct_bundle, tmp_path):
    """A killed run leaves `.tmp-` shards (a write cut mid-file, or never renamed): planted here,
    beside committed shards, before a re-run that also finds new files."""
    archive, output = tmp_path / "archive", tmp_path / "scored"
    write_pngs(archive, 40)
    moved = tmp_path / "later"
    moved.mkdir()
    for path in sorted(archive.iterdir())[24:]:  # 16 files arrive after the first run
        path.rename(moved / path.name)
    cfg = ScoreConfig(
        bundles=[oct_bundle], input=str(archive), output=str(output), batch_size=8, rows_per_shard=8, report=False
    )
    assert run(cfg)["scored_this_run"] == 24
    committed = sorted(output.glob("part-*.parquet"))
    assert len(committed) >= 3
    # a shard cut mid-write (half its bytes, under the name a write uses), one whole but never
    # renamed, and one of another scoring version
    data = committed[0].read_bytes()
    (output / f".tmp-{committed[1].name}").write_bytes(data[: len(data) // 2])
    (output / f".tmp-{committed[2].name}").write_bytes(committed[2].read_bytes())
    (output / ".tmp-part-0123456789ab-deadbeefdeadbeef.parquet").write_bytes(b"PAR1 cut")
    for path in moved.iterdir():
        path.rename(archive / path.name)

    summary = run(cfg)
    assert summary["scored_this_run"] == 16 and summary["rows"] == 40
    assert not list(output.glob(".tmp-*"))
    paths = [r["path"] for r in read_rows(str(output))]
    assert len(paths) == len(set(paths)) == 40
    assert sorted(paths) == sorted(str(p) for p in archive.iterdir())


def test_a_volume_is_scored_bscan_by_bscan_answered_once_and_resumed_by_frame(
    ray_cluster, oct_bundle, oct_sample, tmp_path
):
    """Two OCT cubes built from real B-scans (JPEG 2000 and uncompressed) and a JPEG: one row per
    B-scan with its frame, one answer per cube in _volumes.parquet, Grad-CAM for the driving
    B-scans; a run that lost some of a cube's shards re-scores only those B-scans."""
    archive, output = tmp_path / "archive", tmp_path / "scored"
    archive.mkdir()
    cnv = real_bscans(oct_sample, [f"CNV-6552587-{i}.jpeg" for i in (1, 2, 3, 4, 6)])
    normal = real_bscans(oct_sample, [f"NORMAL-75834-{i}.jpeg" for i in (1, 2, 3)])
    (archive / "cnv-cube.dcm").write_bytes(make_oct_volume(cnv, jpeg2000=True))
    (archive / "normal-cube.dcm").write_bytes(make_oct_volume(normal, patient_id="TEST-0002"))
    shutil.copy(oct_sample / "DME" / "DME-247204-1.jpeg", archive / "scan.jpeg")
    # everyone referred (threshold 0) with the gate off: every B-scan drives its cube's answer
    cfg = ScoreConfig(
        bundles=[oct_bundle],
        input=str(archive),
        output=str(output),
        batch_size=2,
        rows_per_shard=3,
        decision=DecisionOptions(thresholds="0", gate=False),
    )
    summary = run(cfg)
    rows = shard_rows(output)
    keys = [(Path(r["path"]).name, r["frame"]) for r in rows]
    assert sorted(keys, key=str) == sorted(
        [("cnv-cube.dcm", i) for i in range(5)] + [("normal-cube.dcm", i) for i in range(3)] + [("scan.jpeg", None)],
        key=str,
    )
    assert summary["files_seen"] == 3 and summary["rows"] == 9
    assert summary["volumes"] == {"volumes": 2, "referred": 2, "cleared": 0, "declined": 0, "errors": 0}
    cube_rows = {r["frame"]: r for r in rows if r["path"].endswith("cnv-cube.dcm")}
    assert {r["frames"] for r in cube_rows.values()} == {5} and {r["modality"] for r in cube_rows.values()} == {"OPT"}
    volumes_table = pq.read_table(output / "_volumes.parquet").to_pylist()
    assert [Path(v["path"]).name for v in volumes_table] == ["cnv-cube.dcm", "normal-cube.dcm"]
    cube = volumes_table[0]
    score = {f: r["probabilities"]["CNV"] + r["probabilities"]["DME"] for f, r in cube_rows.items()}
    assert cube["referral"] and cube["status"] == "ok" and cube["patient_id"] == "TEST-0001"
    assert cube["driving_frames"] == sorted(score, key=lambda f: (-score[f], f))  # highest referral score first
    assert cube["labels"] == [cube_rows[cube["driving_frames"][0]]["label"]]
    assert len(cube["explanations"]) == 5 and all((output / f).exists() for f in cube["explanations"])
    top = Image.open(output / cube_rows[cube["driving_frames"][0]]["explanations"][0])
    assert top.size == (512, 496)  # drawn on its own B-scan, at the B-scan's size
    assert "Volumes (2)" in (output / "report.html").read_text()

    # A run killed after some shards: drop the committed shards holding some of the cube's B-scans.
    lost = [p for p in output.glob("part-*.parquet") if "cnv-cube.dcm" in str(pq.read_table(p).column("path"))][:1]
    lost_rows = sum(pq.read_table(p).num_rows for p in lost)
    for p in lost:
        p.unlink()
    again = run(cfg)
    assert again["scored_this_run"] == lost_rows and again["rows"] == 9
    keys_again = [(r["path"], r["frame"]) for r in shard_rows(output)]
    assert len(keys_again) == len(set(keys_again)) == 9
    assert pq.read_table(output / "_volumes.parquet").num_rows == 2


def shard_rows(output: Path) -> list[dict]:
    return pads.dataset(sorted(output.glob("part-*.parquet")), format="parquet").to_table().to_pylist()
