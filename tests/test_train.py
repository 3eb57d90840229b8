"""End to end on a real local Ray cluster: job submission, 2 workers, a killed worker, --resume."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import ray.train
from faults import KillTrainWorkerAfterEpoch

from eyeray import storage
from eyeray.data import synthetic
from eyeray.model import bundle
from eyeray.tasks import get_task
from eyeray.train import TrainConfig, checkpoint, run

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
        "--epochs",
        "8",
        "--image-size",
        "48",
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
    # the gate: fitted on the exported model's features, its threshold keeping 97 % of the held-out
    # distances (validation, and the training images' cross-fitted)
    section = manifest["gate"]
    assert section["method"] == "mahalanobis" and section["keep"] == 0.97 and section["kept_on_validation"] >= 0.85
    assert section["threshold_images"] == section["train_images"] + section["validation_images"]
    assert metrics["gate"]["test_images"] > 0 and metrics["gate"]["test_answered"] >= 0.5, metrics["gate"]
    loaded = bundle.load(str(output / "bundle"))
    bundle.verify(loaded)
    assert loaded.gate is not None and loaded.gate.threshold == manifest["gate"]["threshold"]


def make_data(task: str, root: Path, per_class: int) -> Path:
    return synthetic.make_dataset(get_task(task), root, images_per_class=per_class, image_size=64, seed=1)


def test_killed_worker_resumes_from_checkpoint_through_both_phases(ray_cluster, tmp_path):
    """A pretrained backbone (--weights PATH) runs head then fine-tune on 2 GPU workers (the session
    cluster's GPUs are logical: the same code, TensorFlow computes on the CPU); one dies after epoch 2.
    The head trains on pooled features cached by a Ray Data stage (a GPU actor), fine-tuning on images,
    in mixed precision."""
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
        mixed_precision=True,  # float16 compute with loss scaling, as on GPUs; the bundle is float32
        mixed_dtype="float16",  # on this CPU, auto would pick bfloat16
    )
    result = run(cfg, callbacks=[KillTrainWorkerAfterEpoch(2, cfg.output)])  # a worker dies once, after epoch 2
    assert (tmp_path / "run" / ".fault-injected").exists()
    # Resumed from a checkpoint, not from scratch; normally epoch 2's, but a report still in
    # flight when a worker dies may be lost, as with any real failure.
    assert len(result.resumed_after) == 1 and result.resumed_after[0] in (1, 2)
    assert [(h["epoch"], h["phase"], h["inputs"]) for h in result.history] == [
        (1, "head", "features"),
        (2, "head", "features"),
        (3, "fine_tune", "images"),
        (4, "fine_tune", "images"),
    ]
    cached = result.metrics["run"]["feature_cache"]
    assert sum(cached["images"].values()) == cached["images"]["train"] + cached["images"]["validation"] > 0
    # every worker's equal shard of the cached split, as of the images (Ray drops the remainder)
    assert result.history[0]["train_images"] == result.history[2]["train_images"] > cached["images"]["train"] - 2
    assert {(h["workers"], h["gpus_per_worker"]) for h in result.history} == {(2, 1)}
    assert result.history[2]["learning_rate"] == pytest.approx(
        result.history[0]["learning_rate"] * cfg.fine_tune_lr_factor
    )
    for key in ("pauc_90_100", "sens_at_95_spec", "auc"):
        assert key in result.metrics
    assert bundle.read_manifest(result.bundle)["weights"] == str(weights)
    exported = bundle.load(result.bundle).model
    assert {layer.compute_dtype for layer in exported.layers if layer.weights} == {"float32"}
    # --resume restores the last checkpoint (epoch 4, past the head phase): no features are cached again,
    # no epoch runs again (so no new checkpoint: the run's history and restarts are the first run's)
    assert checkpoint.registered_epoch(cfg.output + "/ray_train") == 4
    again = run(dataclasses.replace(cfg, resume=True))
    assert again.metrics["run"]["feature_cache"] is None
    assert (again.history, again.resumed_after) == (result.history, result.resumed_after)


def test_interrupted_run_on_s3_resumes_with_resume_flag_and_reports_bad_files(ray_cluster, tmp_path):
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
    with pytest.raises(ray.train.TrainingFailedError):  # the only worker dies after epoch 1; no restart allowed
        run(cfg, callbacks=[KillTrainWorkerAfterEpoch(1, output)])
    assert fs.exists("odir-train/runs/odir-1/ray_train")
    assert not fs.exists("odir-train/runs/odir-1/bundle")  # no half-written bundle
    assert checkpoint.registered_epoch(f"{output}/ray_train") == 1  # what --resume restores, read from S3
    assert checkpoint.registered_epoch(f"{output}/no-such-run") == 0
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


def test_two_workers_get_disjoint_shards_covering_the_split_and_identical_weights_after_a_step(ray_cluster, tmp_path):
    """Data parallelism, seen from inside the workers: eyeray's dataset preparation
    (eyeray.data.records) split by Ray Train over 2 workers, one epoch of eyeray's DistributedFitter
    step on batches augmented in the worker (--augment-on trainer); each worker writes the paths,
    labels and image hashes it trained on and a hash of its trainable weights."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    from eyeray.data.layouts import read_layout
    from eyeray.data.records import decoded_dataset

    spec = get_task("oct")
    data = make_data("oct", tmp_path / "data", per_class=8)
    records = [r for split in read_layout(spec, str(data)).splits.values() for r in split]
    records = records[: len(records) // 2 * 2]  # an even count: an equal split drops no row
    paths = sorted(str(r["path"]) for r in records)
    report_dir = tmp_path / "seen"
    report_dir.mkdir()

    def loop(config):  # pickled by value: the workers do not import this test module
        import hashlib
        import json

        import numpy as np
        import ray.train
        import tensorflow as tf

        from eyeray.model.build import build_model
        from eyeray.tasks import get_task
        from eyeray.train.distributed import DistributedFitter
        from eyeray.train.worker import train_batches

        def digest(variables) -> str:
            h = hashlib.sha256()
            for v in variables:
                h.update(np.ascontiguousarray(v.numpy()).tobytes())
            return h.hexdigest()

        rank = ray.train.get_context().get_world_rank()
        spec = get_task("oct")
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        with strategy.scope():
            model = build_model(spec, "small_cnn", weights="none", image_size=32)
        fitter = DistributedFitter(strategy, model, spec, np.ones(spec.num_classes, np.float32))
        fitter.compile(1e-2)
        before = digest(model.trainable_weights)
        seen: list[str] = []
        labels: list[int] = []
        images: list[str] = []

        def recorded(batches):
            for batch in batches:
                seen.extend(str(p) for p in batch["path"])
                labels.extend(np.asarray(batch["label"]).argmax(axis=1).tolist())
                images.extend(hashlib.sha256(image.tobytes()).hexdigest() for image in batch["image"])
                yield batch

        augment = spec.augment
        stats = fitter.train_epoch(recorded(train_batches(ray.train.get_dataset_shard("train"), 4, augment)))
        moving = [v for v in model.non_trainable_weights if "moving_" in v.path]
        out = {
            "rank": rank,
            "paths": seen,
            "labels": labels,
            "images": images,
            "before": before,
            "after": digest(model.trainable_weights),
            "moving": digest(moving),
            "loss": stats.loss,
        }
        with open(f"{config['dir']}/rank-{rank}.json", "w") as f:
            json.dump(out, f)
        ray.train.report({"loss": stats.loss})

    trainer = TensorflowTrainer(
        train_loop_per_worker=loop,
        train_loop_config={"dir": str(report_dir)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="dp", storage_path=str(tmp_path / "ray")),
        datasets={"train": decoded_dataset(records, 32, seed=0)},
    )
    trainer.fit()

    ranks = [json.loads((report_dir / f"rank-{r}.json").read_text()) for r in (0, 1)]
    seen = [set(r["paths"]) for r in ranks]
    assert all(len(r["paths"]) == len(set(r["paths"])) > 0 for r in ranks)  # no row twice within a shard
    assert not seen[0] & seen[1]  # disjoint shards
    assert sorted(seen[0] | seen[1]) == paths  # together: the whole split, nothing else
    assert len(seen[0]) == len(seen[1])
    label_of = {str(r["path"]): int(np.argmax(r["label"])) for r in records}
    assert all(label_of[p] == y for r in ranks for p, y in zip(r["paths"], r["labels"], strict=True))
    decoded = decoded_dataset(records, 32, seed=0).take_all()
    as_decoded = {hashlib.sha256(row["image"].tobytes()).hexdigest() for row in decoded}
    assert not as_decoded & {h for r in ranks for h in r["images"]}  # every image augmented on its way
    assert ranks[0]["before"] == ranks[1]["before"]  # the replicas start from the same weights
    assert ranks[0]["after"] == ranks[1]["after"] != ranks[0]["before"]  # ... and stay equal after training
    assert ranks[0]["loss"] == ranks[1]["loss"]  # the all-reduced epoch loss
    # BatchNormalization's moving statistics (each worker's own, from its shard) are averaged after
    # the epoch, so the checkpoint (rank 0's) holds the whole split's
    assert ranks[0]["moving"] == ranks[1]["moving"]


def checkpoint_states(output: Path) -> dict[Path, dict]:
    """The checkpoints on disk of the run in `output`: folder -> its state.json (whole files only)."""
    states = {}
    for path in (output / "ray_train").rglob("state.json"):
        try:
            states[path.parent] = json.loads(path.read_text())
        except (OSError, ValueError):  # caught mid-copy
            pass
    return states


def registered_epoch(output: Path) -> int:
    """The newest epoch whose checkpoint Ray Train has registered: what a resume starts from (0 while
    none is, or while its record is caught mid-write)."""
    return checkpoint.registered_epoch(str(output / "ray_train"))


def wait_for_checkpoint_after(output: Path, epoch: int, alive, timeout_s: float = 300) -> int:
    """Wait until Ray Train has registered a checkpoint of an epoch after `epoch`; returns that epoch."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        newest = registered_epoch(output)
        if newest > epoch:
            return newest
        assert alive(), "the training driver ended before it could be interrupted"
        assert time.monotonic() < deadline, f"no checkpoint after epoch {epoch} within {timeout_s} s"
        time.sleep(0.1)


def test_driver_killed_and_job_stopped_then_resume_continues_and_exports_the_lowest_val_loss_epoch(
    ray_cluster, tmp_path
):
    """Interrupted twice, the way operators interrupt a run: the driver (`jobs/train_oct.py`)
    SIGKILLed mid-epoch, then the resumed run submitted as a Ray job and stopped with `ray job stop`;
    a last `--resume` finishes it. Each resume starts from the newest checkpoint, every epoch is in
    the history once, and the bundle holds the weights of the epoch with the lowest validation loss."""
    import signal
    import time

    from ray.job_submission import JobStatus, JobSubmissionClient

    from eyeray.model.build import build_model

    data = make_data("oct", tmp_path / "data", per_class=12)
    output = tmp_path / "run"
    epochs = 6
    flags = ["--data", str(data), "--output", str(output), "--backbone", "small_cnn", "--weights", "none"]
    flags += ["--image-size", "32", "--epochs", str(epochs), "--fine-tune-epochs", "0", "--batch-size", "8"]
    flags += ["--no-augment", "--learning-rate", "0.003"]

    t0 = time.monotonic()
    # 1. the driver process dies (SIGKILL: no cleanup) while epoch 2 or later runs
    driver = subprocess.Popen(
        [sys.executable, "jobs/train_oct.py", *flags],
        cwd=REPO,
        env=ray_cluster["env"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        killed_at = wait_for_checkpoint_after(output, 0, lambda: driver.poll() is None)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    assert killed_at < epochs
    time.sleep(2)  # a checkpoint already being registered may still land
    on_disk = registered_epoch(output)
    assert not (output / "bundle").exists()
    t1 = time.monotonic()

    # 2. resumed as a Ray job, stopped with `ray job stop` once it has checkpointed a new epoch
    client = JobSubmissionClient(ray_cluster["dashboard"])
    job = client.submit_job(
        entrypoint=f"python jobs/train_oct.py {' '.join(flags)} --resume", runtime_env={"working_dir": str(REPO)}
    )
    try:
        stopped_at = wait_for_checkpoint_after(
            output, on_disk, lambda: client.get_job_status(job) in (JobStatus.PENDING, JobStatus.RUNNING)
        )
    finally:
        stop = subprocess.run(
            [sys.executable, "-m", "ray.scripts.scripts", "job", "stop", "--address", ray_cluster["dashboard"], job],
            env=ray_cluster["env"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert stop.returncode == 0, stop.stdout[-2000:] + stop.stderr[-2000:]
    assert client.get_job_status(job) == JobStatus.STOPPED, client.get_job_logs(job)[-3000:]
    assert stopped_at < epochs and not (output / "bundle").exists()
    time.sleep(2)
    on_disk_2 = registered_epoch(output)
    t2 = time.monotonic()

    # 3. --resume to the end, at a learning rate high enough to make the last epochs worse: the best
    # epoch is then one of an earlier run, its checkpoint kept by val_loss across the interruptions
    cfg = TrainConfig(
        task="oct",
        data=str(data),
        output=str(output),
        backbone="small_cnn",
        weights="none",
        image_size=32,
        epochs=epochs,
        fine_tune_epochs=0,
        batch_size=8,
        augment=False,
        learning_rate=10.0,
        resume=True,
    )
    result = run(cfg)
    print(f"phases {t1 - t0:.0f} s, {t2 - t1:.0f} s, {time.monotonic() - t2:.0f} s")
    states = {d.name: (st["epoch"], st["resumed_after"]) for d, st in checkpoint_states(output).items()}
    assert len(result.resumed_after) == 2, (result.resumed_after, states)
    first, second = result.resumed_after  # each time from the newest registered checkpoint
    assert killed_at <= first <= on_disk < stopped_at <= second <= on_disk_2 < epochs, (
        result.resumed_after,
        on_disk,
        on_disk_2,
        states,
    )
    history = result.history
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))  # every epoch once: none redone, none lost

    manifest = bundle.read_manifest(result.bundle)
    val_loss = [h["val_loss"] for h in history]
    assert np.isfinite(val_loss).all(), val_loss
    best = int(np.argmin(val_loss)) + 1
    assert best <= second < epochs, f"the test needs a best epoch before the last resume: {val_loss}"
    assert manifest["training"]["best_epoch"] == best and manifest["training"]["epochs"] == epochs
    metrics = json.loads((output / "report" / "metrics.json").read_text())
    assert metrics["run"]["best_epoch"] == best and [h["epoch"] for h in metrics["history"]] == list(
        range(1, epochs + 1)
    )
    # the exported weights are that epoch's checkpoint (the one whose history ends with the same val_loss)
    [best_checkpoint] = [
        d
        for d, s in checkpoint_states(output).items()
        if s["epoch"] == best and s["history"][-1]["val_loss"] == history[best - 1]["val_loss"]
    ]
    model = build_model(get_task("oct"), "small_cnn", weights=None, image_size=32, dropout=cfg.dropout)
    model.load_weights(best_checkpoint / "model.weights.h5")
    exported = bundle.load(result.bundle).model
    assert len(model.weights) == len(exported.weights)
    for ours, theirs in zip(model.weights, exported.weights):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy(), err_msg=ours.path)
    print(f"resumed after {result.resumed_after}; val_loss {np.round(val_loss, 4).tolist()}; best {best}")
