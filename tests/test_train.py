"""End to end on a real local Ray cluster: job submission, 2 workers, a killed worker, --resume."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import ray.train

from eyeray import faults, storage
from eyeray.data import synthetic
from eyeray.model import bundle
from eyeray.tasks import get_task
from eyeray.train import TrainConfig, run

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.cluster


def test_ray_job_submit_trains_oct_with_two_workers(ray_cluster, tmp_path):
    output = tmp_path / "oct-run"
    cmd = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "job",
        "submit",
        "--address",
        ray_cluster["dashboard"],
        "--working-dir",
        str(REPO),
        "--",
        "python",
        "jobs/train_oct.py",
        "--output",
        str(output),
        "--workers",
        "2",
        "--weights",
        "none",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=ray_cluster["env"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "succeeded" in proc.stdout.lower(), proc.stdout[-4000:] + proc.stderr[-4000:]

    manifest = json.loads((output / "bundle" / "manifest.json").read_text())
    assert manifest["task"] == "oct" and manifest["classes"] == ["CNV", "DME", "DRUSEN", "NORMAL"]
    assert manifest["training"]["config"]["workers"] == 2
    metrics = json.loads((output / "report" / "metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "auc", "urgent_referral_auc", "confusion_matrix", "per_class"):
        assert key in metrics
    assert metrics["accuracy"] >= 0.9, metrics
    for png in ("curves.png", "confusion_matrix.png", "roc.png", "samples.png", "reliability.png"):
        assert (output / "report" / png).stat().st_size > 5000
    # calibration and the urgent-referral operating point: fitted on validation, reported on test
    assert manifest["calibration"]["method"] == "temperature" and manifest["calibration"]["fitted_on"] == "validation"
    assert manifest["operating_point"]["rule"] == "referral_sensitivity"
    assert manifest["operating_point"]["achieved"]["sensitivity"] >= 0.95
    assert {"ece_before", "ece_after"} <= set(metrics["calibration"]["test"]) and "test" in metrics["operating_point"]
    history = metrics["history"]
    assert [h["epoch"] for h in history] == list(range(1, len(history) + 1))
    assert history[-1]["loss"] < history[0]["loss"]
    loaded = bundle.load(str(output / "bundle"))
    bundle.verify(loaded)


def make_data(task: str, root: Path, per_class: int) -> Path:
    return synthetic.make_dataset(get_task(task), root, images_per_class=per_class, image_size=64, seed=1)


def test_killed_worker_resumes_from_checkpoint_through_both_phases(ray_cluster, tmp_path, monkeypatch):
    """A pretrained backbone (--weights PATH) runs head then fine-tune on 2 GPU workers (the session
    cluster's GPUs are logical: the same code, TensorFlow computes on the CPU); one dies after epoch 2."""
    data = make_data("glaucoma", tmp_path / "data", per_class=24)
    weights = tmp_path / "vgg16_backbone.weights.h5"
    keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg").save_weights(
        weights
    )
    cfg = TrainConfig(
        task="glaucoma",
        data=str(data),
        output=str(tmp_path / "run"),
        backbone="vgg16",
        weights=str(weights),
        image_size=32,
        epochs=2,
        fine_tune_epochs=2,
        batch_size=16,
        workers=2,
        use_gpu=True,
    )
    monkeypatch.setenv(faults.AT_EPOCH_ENV, "2")  # the last worker dies once, after epoch 2
    result = run(cfg)
    assert (tmp_path / "run" / ".fault-injected").exists()
    # Resumed from a checkpoint, not from scratch; normally epoch 2's, but a report still in
    # flight when a worker dies may be lost, as with any real failure.
    assert len(result.resumed_after) == 1 and result.resumed_after[0] in (1, 2)
    assert [(h["epoch"], h["phase"]) for h in result.history] == [
        (1, "head"),
        (2, "head"),
        (3, "fine_tune"),
        (4, "fine_tune"),
    ]
    assert {(h["workers"], h["gpus_per_worker"]) for h in result.history} == {(2, 1)}
    assert result.history[2]["learning_rate"] == pytest.approx(
        result.history[0]["learning_rate"] * cfg.fine_tune_lr_factor
    )
    for key in ("pauc_90_100", "sens_at_95_spec", "auc"):
        assert key in result.metrics
    assert bundle.read_manifest(result.bundle)["weights"] == str(weights)


def test_interrupted_run_on_s3_resumes_with_resume_flag_and_reports_bad_files(ray_cluster, tmp_path, monkeypatch):
    """Data, checkpoints, bundle and report all on S3 (the session's local S3 server)."""
    data = make_data("odir", tmp_path / "data", per_class=10)
    sheet = (data / "data.csv").read_text().splitlines()
    victim = sheet[1].split(",")[3]  # the first patient's left eye
    (data / "images" / victim).write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    fs, _ = storage.filesystem("s3://odir-train")
    fs.mkdir("odir-train")
    fs.put(str(data), "odir-train/odir5k", recursive=True)
    output = "s3://odir-train/runs/odir-1"
    cfg = TrainConfig(
        task="odir",
        data="s3://odir-train/odir5k",
        output=output,
        backbone="small_cnn",
        weights="none",
        image_size=32,
        epochs=3,
        fine_tune_epochs=0,
        workers=1,
        max_failures=0,
    )
    monkeypatch.setenv(faults.AT_EPOCH_ENV, "1")
    with pytest.raises(ray.train.TrainingFailedError):
        run(cfg)  # the only worker dies after epoch 1 and no restart is allowed
    assert fs.exists("odir-train/runs/odir-1/ray_train")
    assert not fs.exists("odir-train/runs/odir-1/bundle")  # no half-written bundle
    with pytest.raises(FileExistsError, match="--resume"):
        run(cfg)
    result = run(dataclasses.replace(cfg, resume=True))
    assert result.resumed_after == [1]
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    errors = [e for split in result.metrics["run"]["data"]["decode_errors"].values() for e in split]
    assert [e["path"].rsplit("/", 1)[-1] for e in errors] == [victim]
    assert errors[0]["path"].startswith("s3://odir-train/odir5k/")
    assert "corrupt" in errors[0]["error"]
    for key in ("odir_score", "kappa", "f1", "auc"):
        assert key in result.metrics
    assert fs.exists("odir-train/runs/odir-1/report/metrics.json")
    assert fs.exists("odir-train/runs/odir-1/report/curves.png")
    loaded = bundle.load(result.bundle)  # straight from s3://
    assert loaded.manifest["multi_label"] and len(loaded.manifest["thresholds"]) == 8
    assert loaded.manifest["calibration"]["method"] == "platt"
    assert (
        loaded.manifest["operating_point"]["rule"] == "per_label_f1"
        and len(loaded.manifest["operating_point"]["thresholds"]) == 8
    )
    assert loaded.predict(np.zeros((2, 32, 32, 3), np.uint8)).shape == (2, 8)
