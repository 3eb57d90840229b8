"""Distributed transfer-learning fine-tuning with Ray Train.

Three parts, as in Ray's TensorFlow examples: `build_model` (eyeray.models), a worker loop that
reads its config and its dataset shard, and a driver (`run`) that prepares the data, runs the
`TensorflowTrainer`, then exports the bundle and the evaluation report.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

from eyeray import storage
from eyeray.tasks import TaskSpec, get_task

RUN_NAME = "ray_train"  # Ray Train's run folder inside --output (checkpoints, run state)
WEIGHTS_FILE = "model.weights.h5"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.npz"
FAULT_MARKER = ".fault-injected"
DEPLOYED_CONFUSION_PNG = "confusion_matrix_operating_point.png"


@dataclass
class TrainConfig:
    """Every knob of a training run. None means "the default": the demo's when `data` is None."""

    task: str = "oct"
    data: str | None = None
    output: str | None = None
    backbone: str | None = None
    weights: str | None = None  # "imagenet" | "none" | path or s3:// URI of a weights file
    image_size: int | None = None
    epochs: int | None = None  # phase 1 (head; or the whole net when not pretrained)
    fine_tune_epochs: int | None = None  # phase 2 (top blocks unfrozen)
    batch_size: int | None = None
    learning_rate: float | None = None
    # 1/10: at 1/100 (1e-5) Adam moves the unfrozen conv weights too little in the few hundred
    # steps a small dataset gives (bench/real_transfer.py: fine-tuning at 1e-4 took real OCT from 0.65 to 0.90)
    fine_tune_lr_factor: float = 0.1
    fine_tune_layers: int | None = None
    dropout: float = 0.3
    augment: bool = True
    augment_strength: float = 1.0  # scales the task's augmentation ranges (eyeray.augment.scaled)
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float | None = None
    resume: bool = False
    max_failures: int = 2
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    fault_at_epoch: int | None = None  # test hook: the last worker kills itself once after this epoch

    @property
    def is_demo(self) -> bool:
        return self.data is None

    def resolved(self) -> "TrainConfig":
        """Fill unset fields: the demo configuration without data, the task's defaults with it."""
        spec = get_task(self.task)
        demo = spec.demo
        defaults = (
            dict(backbone=demo.backbone, weights="none", image_size=demo.image_size, epochs=demo.epochs,
                 fine_tune_epochs=0, batch_size=demo.batch_size, learning_rate=demo.learning_rate)
            if self.is_demo
            else dict(backbone=spec.backbone, weights="imagenet", image_size=spec.image_size, epochs=10,
                      fine_tune_epochs=10, batch_size=32, learning_rate=1e-3)
        )  # fmt: skip
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        defaults["output"] = os.path.join("runs", f"{spec.name}-{'demo-' if self.is_demo else ''}{stamp}")
        given = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        return replace(self, **{**defaults, **given})


@dataclass
class TrainResult:
    output: str
    bundle: str
    report: str
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_after: list[int] = field(default_factory=list)


# --------------------------------------------------------------------------- worker side


@dataclass
class _State:
    epoch: int = 0
    phase: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_after: list[int] = field(default_factory=list)  # epochs after which a restart resumed


def _restore(model, checkpoint: Checkpoint | None) -> tuple[_State, list[np.ndarray] | None]:
    if checkpoint is None:
        return _State(), None
    with checkpoint.as_directory() as d:
        model.load_weights(os.path.join(d, WEIGHTS_FILE))
        state = _State(**json.loads(Path(d, STATE_FILE).read_text()))
        state.resumed_after.append(state.epoch)
        opt_path = Path(d, OPTIMIZER_FILE)
        optimizer = list(np.load(opt_path).values()) if opt_path.exists() else None
    print(f"[eyeray] resumed from checkpoint after epoch {state.epoch} ({state.phase})")
    return state, optimizer


def _report(model, fitter, state: _State, metrics: dict[str, Any], rank: int) -> None:
    """Every worker reports (a barrier); only rank 0 writes the checkpoint, since weights are mirrored."""
    with tempfile.TemporaryDirectory(prefix="eyeray-ckpt-") as tmp:
        checkpoint = None
        if rank == 0:
            model.save_weights(os.path.join(tmp, WEIGHTS_FILE))
            np.savez(os.path.join(tmp, OPTIMIZER_FILE), *fitter.optimizer_state())
            Path(tmp, STATE_FILE).write_text(json.dumps(asdict(state)))
            checkpoint = Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def _maybe_inject_fault(cfg: TrainConfig, epoch: int, rank: int, world: int) -> None:
    """Test-only: the last worker dies once, hard, right after `fault_at_epoch` was checkpointed."""
    if cfg.fault_at_epoch != epoch or rank != world - 1:
        return
    fs, path = storage.filesystem(cfg.output)
    marker = f"{path}/{FAULT_MARKER}"
    if fs.exists(marker):
        return
    fs.pipe(marker, f"killed worker rank {rank} after epoch {epoch}\n".encode())
    time.sleep(5)  # die early in the next epoch, after the controller collected this report
    os.kill(os.getpid(), signal.SIGKILL)


def train_batches(shard, batch_size: int):
    """One epoch of a worker's training shard: shuffled locally, prefetched while the step runs."""
    return shard.iter_batches(batch_size=batch_size, local_shuffle_buffer_size=4 * batch_size, prefetch_batches=2)


def cosine(base_lr: float, step: int, steps: int) -> float:
    """Cosine decay over a phase's epochs: the late epochs settle instead of oscillating."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * step / max(steps, 1)))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import tensorflow as tf

    from eyeray.distributed import DistributedFitter
    from eyeray.models import build_model, phases, set_phase

    cfg = TrainConfig(**config["train"])
    spec = get_task(cfg.task)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    gpus = len(ray.get_gpu_ids())
    if cfg.use_gpu and not tf.config.list_physical_devices("GPU"):
        print(f"[eyeray] worker {rank}: Ray assigned {gpus} GPU(s) but TensorFlow sees none; computing on the CPU")
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = build_model(spec, cfg.backbone, weights=cfg.weights, image_size=cfg.image_size, dropout=cfg.dropout)
    state, optimizer_state = _restore(model, ray.train.get_checkpoint())
    fitter = DistributedFitter(strategy, model, spec, np.asarray(config["class_weights"], np.float32))
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation")

    pretrained = cfg.weights not in (None, "none")
    epoch = 0
    for phase, n_epochs in phases(pretrained, cfg.epochs, cfg.fine_tune_epochs):
        if epoch + n_epochs <= state.epoch:
            epoch += n_epochs
            continue
        base_lr = cfg.learning_rate * (cfg.fine_tune_lr_factor if phase == "fine_tune" else 1.0)
        set_phase(model, phase, cfg.fine_tune_layers)
        fitter.compile(base_lr)
        if optimizer_state is not None and state.phase == phase:
            fitter.load_optimizer_state(optimizer_state)
        if phase == "head" and state.epoch == 0:  # a resumed run has the statistics in its weights
            scale = fitter.fit_feature_scale(train_batches(train_shard, cfg.batch_size))
            if rank == 0:
                print(f"[eyeray] head input standardised on {scale['images']} training images "
                      f"(pooled features: mean {scale['feature_mean']:.3g}, std {scale['feature_std']:.3g})")  # fmt: skip
        for i in range(n_epochs):
            epoch += 1
            if epoch <= state.epoch:
                continue
            lr = cosine(base_lr, i, n_epochs)
            fitter.set_learning_rate(lr)
            start = time.perf_counter()
            train = fitter.train_epoch(train_batches(train_shard, cfg.batch_size))
            seconds = time.perf_counter() - start
            outputs: list = []
            val = fitter.evaluate(val_shard.iter_batches(batch_size=cfg.batch_size), outputs)
            metrics = {"epoch": epoch, "phase": phase, "learning_rate": lr, **train.as_dict(), **val.as_dict("val_"),
                       **_validation_metrics(spec, fitter, outputs, rank, world),
                       "train_images": train.examples, "images_per_s": train.examples / max(seconds, 1e-9),
                       "epoch_seconds": seconds, "workers": world, "gpus_per_worker": gpus}  # fmt: skip
            state = replace(state, epoch=epoch, phase=phase, history=[*state.history, metrics])
            _report(model, fitter, state, metrics, rank)
            _maybe_inject_fault(cfg, epoch, rank, world)


def _validation_metrics(spec: TaskSpec, fitter, outputs: list, rank: int, world: int) -> dict[str, Any]:
    """The task's metrics on the whole validation split (every worker's rows) as "val_<key>", so
    epochs and trials can be ranked by what matters for the task (spec.selection_metric), not
    only by the loss. Undefined values (a class absent from a tiny split) are None."""
    from eyeray import evaluate

    k = spec.num_classes
    local = np.concatenate([np.hstack([y, p]) for y, p in outputs]) if outputs else np.zeros((0, 2 * k))
    rows = fitter.gather_rows(local, rank, world)
    if len(rows) == 0:
        return {}
    computed = evaluate.compute_metrics(spec, rows[:, :k], rows[:, k:])
    keys = dict.fromkeys(("macro_f1", "auc", spec.selection_metric, *spec.extra_metrics))
    return {f"val_{key}": computed.get(key) for key in keys}


# --------------------------------------------------------------------------- driver side


def _scaling(cfg: TrainConfig) -> ScalingConfig:
    """One GPU per worker when asked; CPUs sized so Ray Data keeps some for decoding and augmenting
    (2 workers x 1 CPU on a 2-CPU node leaves Ray Data none and the run hangs)."""
    cpus = cfg.cpus_per_worker
    if cpus is None:
        total = ray.cluster_resources().get("CPU", 1.0)
        cpus = max(0.25, min(1.0, (total - 1.0) / cfg.workers))
    resources = {"CPU": cpus, **({"GPU": 1} if cfg.use_gpu else {})}
    return ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources)


def _run_config(cfg: TrainConfig, callbacks: list | None = None) -> RunConfig:
    storage_path, fs = storage.ray_storage(cfg.output)
    return RunConfig(
        name=RUN_NAME,
        storage_path=storage_path,
        storage_filesystem=fs,
        callbacks=callbacks,
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=CheckpointConfig(
            num_to_keep=2, checkpoint_score_attribute="val_loss", checkpoint_score_order="min"
        ),
    )


def _check_output(cfg: TrainConfig) -> None:
    fs, path = storage.filesystem(cfg.output)
    previous = fs.exists(f"{path}/{RUN_NAME}")
    if previous and not cfg.resume:
        raise FileExistsError(
            f"{cfg.output} already holds a training run; pass --resume to continue it, "
            "or choose another --output"
        )
    if cfg.resume and not previous:
        print(f"[eyeray] --resume: no earlier run in {cfg.output}; starting a new one")


def _prepare_data(spec: TaskSpec, cfg: TrainConfig):
    from eyeray.datasets import read_layout
    from eyeray.ingest import decode_split

    data = cfg.data
    if data is None:
        data = _demo_data(spec, cfg)
    layout = read_layout(spec, data, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction)
    print(layout.summary())
    decoded = {
        split: decode_split(records, cfg.image_size, seed=cfg.seed if split == "train" else None)
        for split, records in layout.splits.items()
    }
    for split, d in decoded.items():
        for e in d.errors:
            print(f"[eyeray] skipped undecodable {split} image {e['path']}: {e['error']}")
        if d.count == 0:
            raise ValueError(f"no usable images in the {split} split of {data} ({len(d.errors)} failed to decode)")
    return layout, decoded


def _demo_data(spec: TaskSpec, cfg: TrainConfig) -> str:
    """The embedded default: a synthetic dataset beside the run (reused by --resume), written to a
    staging folder and renamed so a crash never leaves half a dataset. Local even for s3:// runs."""
    from eyeray import synthetic

    if storage.is_remote(cfg.output):
        return str(synthetic.make_dataset(spec, tempfile.mkdtemp(prefix="eyeray-demo-"), seed=cfg.seed))
    data = Path(cfg.output, "demo_data")
    if not data.exists():
        print(f"[eyeray] no --data: generating a synthetic {spec.name} dataset in {data}")
        data.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".demo_data-", dir=data.parent))
        staging.chmod(0o755)
        synthetic.make_dataset(spec, staging, seed=cfg.seed)
        staging.rename(data)
    return str(data)


def _samples(spec: TaskSpec, ds, per_class: int = 6) -> dict[str, list[np.ndarray]]:
    rows = ds.take(min(400, ds.count()))
    grid: dict[str, list[np.ndarray]] = {c: [] for c in spec.classes}
    for row in rows:
        for i in np.flatnonzero(np.asarray(row["label"]) > 0.5):
            if len(grid[spec.classes[i]]) < per_class:
                grid[spec.classes[i]].append(row["image"])
    return grid


def _predict(predict, ds, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and model outputs of one split: Ray Data streams decoded batches to `predict`
    (uint8 images -> outputs: `Bundle.predict`, or a model's `predict_on_batch`)."""
    labels, probs = [], []
    for batch in ds.iter_batches(batch_size=batch_size):
        labels.append(batch["label"])
        probs.append(np.asarray(predict(batch["image"]), np.float32))
    return np.concatenate(labels), np.concatenate(probs)


def _final_state(checkpoint: Checkpoint) -> _State:
    with checkpoint.as_directory() as d:
        return _State(**json.loads(Path(d, STATE_FILE).read_text()))


def run(config: TrainConfig, callbacks: list | None = None) -> TrainResult:
    """Train, evaluate on the test split, and write OUTPUT/bundle and OUTPUT/report.

    `callbacks`: Ray Train callbacks for the run (the model-selection sweep passes the one that
    forwards every epoch's report to Ray Tune)."""
    from ray.train.tensorflow import TensorflowTrainer

    from eyeray import bundle, evaluate
    from eyeray.augment import augment_batch, scaled
    from eyeray.distributed import class_weights
    from eyeray.models import build_model

    cfg = config.resolved()
    spec = get_task(cfg.task)
    if not ray.is_initialized():
        ray.init()
    _check_output(cfg)
    print(f"[eyeray] training {spec.name}: {cfg.backbone} @ {cfg.image_size}px, weights={cfg.weights}, "
          f"{cfg.workers} worker(s){' with GPUs' if cfg.use_gpu else ''}, output {cfg.output}")  # fmt: skip

    layout, decoded = _prepare_data(spec, cfg)
    train_labels = np.stack([np.asarray(r["label"]) for r in layout.splits["train"]])
    train_ds = decoded["train"].images.randomize_block_order()
    if cfg.augment:
        train_ds = train_ds.map_batches(augment_batch, fn_kwargs={"spec": scaled(spec.augment, cfg.augment_strength)}, batch_size=64)

    trainer = TensorflowTrainer(
        train_loop_per_worker=train_loop_per_worker,
        train_loop_config={"train": asdict(cfg), "class_weights": class_weights(spec, train_labels).tolist()},
        scaling_config=_scaling(cfg),
        run_config=_run_config(cfg, callbacks),
        datasets={"train": train_ds, "validation": decoded["validation"].images},
    )
    result = trainer.fit()
    best = result.get_best_checkpoint(metric="val_loss", mode="min") or result.checkpoint
    final = _final_state(result.checkpoint)
    history, resumed = final.history, final.resumed_after

    model = build_model(spec, cfg.backbone, weights=None, image_size=cfg.image_size, dropout=cfg.dropout)
    with best.as_directory() as d:
        model.load_weights(os.path.join(d, WEIGHTS_FILE))
    validation = _predict(model.predict_on_batch, decoded["validation"].images, cfg.batch_size)
    fitted = _fit_decisions(spec, validation)
    calibration, operating_point, _ = fitted

    training = {"config": asdict(cfg), "epochs": len(history), "best_epoch": _best_epoch(history),
                "train_images": int(decoded["train"].count)}  # fmt: skip
    manifest = bundle.make_manifest(
        spec, model, backbone=cfg.backbone, image_size=cfg.image_size, weights=cfg.weights,
        training=training, calibration=calibration, operating_point=operating_point,
    )  # fmt: skip
    data_report = {
        "source": cfg.data or "synthetic (embedded default)",
        "counts": layout.counts(),
        "notes": layout.notes,
        "skipped": layout.skipped,
        "decode_errors": {split: d.errors for split, d in decoded.items()},
    }
    report_uri = storage.join(cfg.output, "report")
    bundle_uri = storage.join(cfg.output, "bundle")
    with tempfile.TemporaryDirectory(prefix="eyeray-export-") as tmp:
        # The test split is scored by the bundle as exported (loaded back from disk, through
        # Bundle.predict and Bundle.decide), so the report describes what scoring and serving do.
        staged = os.path.join(tmp, "bundle")
        bundle.save(model, manifest, staged)
        exported = bundle.load(staged)
        y_true, probs = _predict(exported.predict, decoded["test"].images, cfg.batch_size)
        _, _, sections, plots = _decision_support(spec, validation, (y_true, probs), fitted)
        deployed, deployed_plots = _at_operating_point(spec, exported, y_true, probs)
        sections["at_operating_point"] = deployed
        plots.update(deployed_plots)
        metrics = evaluate.write_report(
            spec, report_uri, y_true=y_true, probs=probs, history=history,
            samples=_samples(spec, decoded["train"].images),
            extra={"config": asdict(cfg), "best_epoch": _best_epoch(history), "resumed_after": resumed, "data": data_report},
            sections=sections, extra_plots=plots,
        )  # fmt: skip
        headline = {**_headline(metrics), "at_operating_point": _headline(deployed)}
        bundle.publish(staged, bundle_uri, metrics=headline)
    print(f"[eyeray] bundle: {bundle_uri}\n[eyeray] report: {report_uri}")
    print("[eyeray] test metrics (argmax of the raw outputs): " + json.dumps(_headline(metrics)))
    print("[eyeray] test metrics (calibrated, at the operating point, as deployed): " + json.dumps(_headline(deployed)))
    return TrainResult(output=cfg.output, bundle=bundle_uri, report=report_uri, metrics=metrics, history=history,
                       resumed_after=resumed)  # fmt: skip


def _fit_decisions(spec: TaskSpec, validation: tuple[np.ndarray, np.ndarray]) -> tuple[dict, dict | None, str | None]:
    """Calibration and the operating point, fitted on the validation split. Data too small to
    choose an operating point leaves it out with a note instead of failing a finished run."""
    from eyeray import calibration, evaluate, operating_points

    y_val, p_val = validation
    params = calibration.fit(y_val, p_val, spec.multi_label, spec.classes)
    try:
        return params, operating_points.choose(spec, y_val, calibration.apply(params, p_val)), None
    except evaluate.UndefinedMetric as exc:
        return params, None, f"not chosen: {exc}"


def _decision_support(spec: TaskSpec, validation: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                      fitted: tuple[dict, dict | None, str | None] | None = None):  # fmt: skip
    """`_fit_decisions` (or its result, `fitted`), and what calibration and the operating point do
    on the test split (report sections and the reliability diagram)."""
    from eyeray import calibration, operating_points

    params, op, note = fitted or _fit_decisions(spec, validation)
    (y_val, p_val), (y_test, p_test) = validation, test
    val_cal, test_cal = calibration.apply(params, p_val), calibration.apply(params, p_test)
    sections: dict[str, Any] = {"calibration": {
        **params, "validation": calibration.summary(y_val, p_val, val_cal, spec.multi_label),
        "test": calibration.summary(y_test, p_test, test_cal, spec.multi_label),
    }}  # fmt: skip
    if op is None:
        sections["operating_point"] = {"rule": spec.operating_point, "note": note}
    else:
        sections["operating_point"] = {**op, "test": operating_points.achieved(op, y_test, test_cal)}

    def reliability(path: Path) -> None:
        title = f"{spec.title}\ntest split; calibration fitted on the validation split"
        calibration.plot_reliability(y_test, p_test, test_cal, spec.multi_label, path, title)

    return params, op, sections, {calibration.RELIABILITY_PNG: reliability}


def _at_operating_point(spec: TaskSpec, exported, y_true: np.ndarray, raw: np.ndarray):
    """Test metrics as deployed: the exported bundle's `decide` (calibrated probabilities, labels
    at its operating point) scored with the same metrics as the argmax figures, plus the
    confusion matrix of those decisions. Returns (metrics, {png name: draw function})."""
    from eyeray import evaluate

    decision = exported.decide(raw)
    decided = np.array([[c in row for c in spec.classes] for row in decision.labels], int)
    op = decision.operating_point
    thresholds = op.get("thresholds") if op is not None and spec.multi_label else None
    metrics = evaluate.compute_metrics(spec, y_true, decision.probabilities, thresholds, decided=decided)
    metrics["decided_by"] = exported.manifest["decision"]
    if decision.referral is not None:
        refer, truth = decision.referral, y_true[:, [spec.class_index(c) for c in spec.referral_classes]].any(axis=1)
        metrics.update(referral_sensitivity=float(refer[truth].mean()) if truth.any() else None,
                       referral_specificity=float((~refer[~truth]).mean()) if (~truth).any() else None,
                       referred=int(refer.sum()), referable=int(truth.sum()))  # fmt: skip

    def confusion(path: Path) -> None:
        evaluate.plot_confusion(spec, y_true, decided, path, 0.5 if spec.multi_label else None)

    return metrics, {DEPLOYED_CONFUSION_PNG: confusion}


def _best_epoch(history: list[dict[str, Any]]) -> int | None:
    return min(history, key=lambda h: h["val_loss"])["epoch"] if history else None


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The scalar metrics (per-class tables and matrices stay in the report)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None}
