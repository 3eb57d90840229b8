"""Batch scoring on the session's Ray cluster: one row per file, bad files as rows, re-runs exactly once."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pyarrow.dataset as pads
import pytest
from PIL import Image

from eyeray import bundle, storage
from eyeray.models import build_model
from eyeray.score import BundlePredictor, ScoreConfig, list_archive, run
from eyeray.tasks import get_task

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def oct_bundle(tmp_path_factory):
    spec = get_task("oct")
    model = build_model(spec, "small_cnn", weights="none", image_size=32)
    manifest = bundle.make_manifest(spec, model, backbone="small_cnn", image_size=32, weights="none")
    uri = str(tmp_path_factory.mktemp("model") / "bundle")
    bundle.save(model, manifest, uri)
    return uri


def read_rows(output: str) -> list[dict]:
    fs, root = storage.filesystem(output)
    dataset = pads.dataset(root, format="parquet", filesystem=fs, exclude_invalid_files=True)
    return dataset.to_table().to_pylist()


def test_predictor_adds_columns_without_ray(oct_bundle):
    predictor = BundlePredictor(oct_bundle)
    batch = {"path": np.array(["a", "b"], dtype=object), "image": np.zeros((2, 32, 32, 3), np.uint8),
             "error": np.array(["", "corrupt image"], dtype=object)}  # fmt: skip
    out = predictor(batch)
    assert "image" not in out
    assert out["label"][0] in get_task("oct").classes and out["label"][1] == ""
    np.testing.assert_allclose(out["probabilities"][0].sum(), 1, rtol=1e-5)
    assert np.isnan(out["probabilities"][1]).all()


def test_real_samples_plus_bad_files_score_once_each_and_rerun_scores_nothing(ray_cluster, oct_bundle, oct_sample, tmp_path):
    archive = tmp_path / "archive"
    shutil.copytree(oct_sample, archive)
    (archive / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (archive / "random.png").write_bytes(np.random.default_rng(0).bytes(4000))
    (archive / "empty.jpeg").write_bytes(b"")
    (archive / "notes.txt").write_text("not scored: not an image extension")
    buf = io.BytesIO()
    Image.fromarray((np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)).save(buf, format="PNG")
    (archive / "scan 16-bit ü.png").write_bytes(buf.getvalue())
    output = str(tmp_path / "scored")
    cfg = ScoreConfig(bundle=oct_bundle, input=str(archive), output=output, batch_size=16, rows_per_shard=30)

    files = list_archive(str(archive))
    assert len(files) == 101 + 4
    summary = run(cfg)
    rows = read_rows(output)
    assert sorted(r["path"] for r in rows) == files  # one row per file, no more, no less
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in rows}
    for bad in ("broken.jpg", "random.png", "empty.jpeg"):
        assert by_name[bad]["status"] == "error" and by_name[bad]["error"], bad
    assert by_name["scan 16-bit ü.png"]["status"] == "ok"
    real = [r for r in rows if "/CNV/" in r["path"] or "/NORMAL/" in r["path"]]
    assert all(r["status"] == "ok" and r["label"] in get_task("oct").classes for r in real)
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in real)
    assert {r["bundle_version"] for r in rows} == {bundle.read_manifest(oct_bundle)["version"]}
    assert (summary["files_seen"], summary["scored"], summary["errors"]) == (105, 102, 3)
    assert json.loads((tmp_path / "scored" / "summary.json").read_text())["rows"] == 105

    again = run(cfg)
    assert again["scored_this_run"] == 0 and len(read_rows(output)) == 105
    (archive / "NORMAL" / "NORMAL-999-1.jpeg").write_bytes((archive / "broken.jpg").read_bytes())
    third = run(cfg)  # a new file arrives: only it is scored
    assert third["scored_this_run"] == 1 and len(read_rows(output)) == 106


def test_archive_and_results_on_s3(ray_cluster, oct_bundle, glaucoma_sample):
    fs, _ = storage.filesystem("s3://pacs")
    fs.mkdir("pacs")
    fs.put(str(glaucoma_sample / "RG"), "pacs/export/RG", recursive=True)
    summary = run(ScoreConfig(bundle=oct_bundle, input="s3://pacs/export", output="s3://pacs/results", batch_size=8))
    rows = read_rows("s3://pacs/results")
    assert len(rows) == 13 and summary["errors"] == 0
    assert all(r["path"].startswith("s3://pacs/export/RG/") for r in rows)
    assert fs.exists("pacs/results/summary.json")


def test_demo_trains_then_scores_an_archive_with_broken_files(ray_cluster, tmp_path):
    """`eyeray demo` end to end (shortened): the archive's broken files become error rows."""
    from eyeray import demo
    from eyeray.train import TrainConfig

    out = demo.run(TrainConfig(task="glaucoma", output=str(tmp_path / "run"), epochs=1, image_size=32))
    summary = out["score"]
    assert summary["files_seen"] == 2 * 10 + len(demo.BROKEN_FILES)
    assert summary["errors"] == len(demo.BROKEN_FILES) and summary["scored"] == 20
    rows = read_rows(out["scores"])
    assert {r["path"].rsplit("/", 1)[-1] for r in rows if r["status"] == "error"} == set(demo.BROKEN_FILES)
    assert (tmp_path / "run" / "bundle" / "manifest.json").exists()
