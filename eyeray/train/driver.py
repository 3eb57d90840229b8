"""The training driver: prepare the data, run the `TensorflowTrainer`, then export the bundle
(with its gate fitted on the exported model's own features, and scored as exported on the test
split) and the evaluation report."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

from eyeray import cluster, storage
from eyeray.data import synthetic
from eyeray.tasks import TaskSpec, get_task
from eyeray.train import checkpoint, features, preflight
from eyeray.train.config import RUN_NAME, TrainConfig, TrainResult
from eyeray.train.worker import train_loop_per_worker

log = logging.getLogger(__name__)

DEPLOYED_CONFUSION_PNG = "confusion_matrix_operating_point.png"  # = eyeray.evaluation.plots.DEPLOYED_CONFUSION_PNG


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
        callbacks=[*(callbacks or []), _epoch_log(cfg)],
        logging_config=cluster.train_logging(),
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=CheckpointConfig(
            num_to_keep=2, checkpoint_score_attribute="val_loss", checkpoint_score_order="min"
        ),
    )


def _epoch_log(cfg: TrainConfig):
    """One line per epoch on the driver's console (eyeray.train.progress), a sweep trial's named."""
    from eyeray.model.build import phases
    from eyeray.train.progress import EpochLog

    label = f"{Path(cfg.output).name}: " if "/trials/" in cfg.output.replace(os.sep, "/") else ""
    plan = phases(cfg.weights not in (None, "none"), cfg.epochs, cfg.fine_tune_epochs)
    return EpochLog(plan, get_task(cfg.task).selection_metric, label)


def _check_output(cfg: TrainConfig) -> None:
    previous = preflight.check_resume(cfg)  # a run there without --resume: RunExistsError (a FileExistsError)
    if cfg.resume and not previous:
        log.info(f"--resume: no earlier run in {cfg.output}; starting a new one")


def _prepare_data(spec: TaskSpec, cfg: TrainConfig):
    from eyeray.data.layouts import read_layout
    from eyeray.data.records import decode_split
    from eyeray.decision import operating_points

    data = cfg.data
    if data is None:
        data = synthetic.demo_dataset(spec, cfg.output, cfg.seed)
    layout = read_layout(spec, data, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction)
    log.info(layout.summary())
    y_val = np.array([r["label"] for r in layout.splits["validation"]])
    shortfall = operating_points.validation_shortfall(spec, y_val, cfg.threshold_confidence or None, cfg.val_fraction)
    if shortfall:
        log.warning(f"operating point: {shortfall}")
    decoded = {
        split: decode_split(records, cfg.image_size, seed=cfg.seed if split == "train" else None)
        for split, records in layout.splits.items()
    }
    for split, d in decoded.items():
        for e in d.errors:
            log.warning(f"skipped undecodable {split} image {e['path']}: {e['error']}")
        if d.count == 0:
            raise ValueError(f"no usable images in the {split} split of {data} ({len(d.errors)} failed to decode)")
    return layout, decoded


def _training_datasets(
    cfg: TrainConfig, decoded: dict, resumed_epoch: int = 0
) -> tuple[dict, features.CachedFeatures | None]:
    """The trainer's datasets: the images when a phase runs on images (the training ones augmented
    here when --augment-on resolves to data, by the workers otherwise), and the train and validation
    splits' pooled features when the head trains on them (eyeray.train.features), computed here,
    before `fit()`, so the stage has the cluster to itself. A run resumed after its head phase
    (`resumed_epoch` >= --epochs) needs no features."""
    from eyeray.data.augment import training_stream

    datasets, cached = {}, None
    if features.head_on_features(cfg) and resumed_epoch >= cfg.epochs:
        log.info(f"resuming after epoch {resumed_epoch}: the head phase is done, so no feature cache")
    elif features.head_on_features(cfg):
        cached = features.cache_features(cfg, {split: decoded[split].images for split in features.DATASETS})
        datasets = {features.DATASETS[split]: ds for split, ds in cached.datasets.items()}
        train = features.DATASETS["train"]
        datasets[train] = datasets[train].randomize_block_order()
    if cached is None or cfg.fine_tune_epochs:
        augment = cfg.augmentation() if cfg.augment_site == "data" else None  # else the workers augment
        train_ds = training_stream(decoded["train"].images, augment)
        datasets.update(train=train_ds, validation=decoded["validation"].images)
    return datasets, cached


def _samples(spec: TaskSpec, ds, per_class: int = 6) -> dict[str, list[np.ndarray]]:
    rows = ds.take(min(400, ds.count()))
    grid: dict[str, list[np.ndarray]] = {c: [] for c in spec.classes}
    for row in rows:
        for i in np.flatnonzero(np.asarray(row["label"]) > 0.5):
            if len(grid[spec.classes[i]]) < per_class:
                grid[spec.classes[i]].append(row["image"])
    return grid


@dataclass
class Inferred:
    """One split as the model sees it: labels, outputs, pooled features and quality statistics."""

    labels: np.ndarray
    probs: np.ndarray
    features: np.ndarray
    stats: dict[str, np.ndarray]

    @property
    def pair(self) -> tuple[np.ndarray, np.ndarray]:
        return self.labels, self.probs


def _infer(infer, ds, batch_size: int, limit: int | None = None, watch=None) -> Inferred:
    """Ray Data streams decoded batches of one split (its first `limit` rows) to `infer` (uint8
    images -> (outputs, pooled features): `Bundle.infer`, or a two-output `CompiledModel`).
    `watch(images, labels, outputs)` sees every batch (the model card keeps its worst few)."""
    from eyeray.data import quality

    parts: dict[str, list] = {"labels": [], "probs": [], "features": []}
    stats: list[dict[str, np.ndarray]] = []
    for batch in (ds.limit(limit) if limit else ds).iter_batches(batch_size=batch_size):
        probs, features = infer(batch["image"])
        parts["labels"].append(batch["label"])
        parts["probs"].append(np.asarray(probs, np.float32))
        parts["features"].append(np.asarray(features, np.float32))
        if watch is not None:
            watch(batch["image"], batch["label"], parts["probs"][-1])
        stats.append(quality.statistics(batch["image"], batch["height"], batch["width"]))
    return Inferred(
        *(np.concatenate(parts[k]) for k in ("labels", "probs", "features")),
        {k: np.concatenate([s[k] for s in stats]) for k in stats[0]},
    )


def run(config: TrainConfig, callbacks: list | None = None) -> TrainResult:
    """Train, evaluate on the test split, and write OUTPUT/bundle and OUTPUT/report.

    `callbacks`: Ray Train callbacks for the run (the model-selection sweep passes the one that
    forwards every epoch's report to Ray Tune)."""
    from ray.train.tensorflow import TensorflowTrainer

    from eyeray.evaluation import bootstrap, model_card
    from eyeray.evaluation.report import write_report
    from eyeray.model import bundle
    from eyeray.model.build import build_model, with_features
    from eyeray.model.compiled import CompiledModel
    from eyeray.train.distributed import class_weights

    cfg = config.resolved()
    spec = get_task(cfg.task)
    preflight.check(cfg)  # every setting that can be checked before Ray starts: SettingError
    cluster.connect()
    _check_output(cfg)
    log.info(
        f"training {spec.name}: {cfg.backbone} @ {cfg.image_size}px, weights={cfg.weights}, "
        f"{cfg.workers} worker(s){' with GPUs' if cfg.use_gpu else ''}, "
        f"{f'augmented by the {cfg.augment_site}' if cfg.augment else 'no augmentation'}, output {cfg.output}"
    )

    layout, decoded = _prepare_data(spec, cfg)
    train_labels = np.stack([np.asarray(r["label"]) for r in layout.splits["train"]])
    resumed_epoch = checkpoint.registered_epoch(storage.join(cfg.output, RUN_NAME)) if cfg.resume else 0
    datasets, cached = _training_datasets(cfg, decoded, resumed_epoch)

    scaling = _scaling(cfg)
    log.info(
        f"starting {cfg.workers} training worker(s) ({scaling.resources_per_worker} each); they wait until "
        "the cluster has those resources free"
    )
    trainer = TensorflowTrainer(
        train_loop_per_worker=train_loop_per_worker,
        train_loop_config={
            "train": asdict(cfg),
            "class_weights": class_weights(spec, train_labels).tolist(),
            "head_on_features": cached is not None,  # the workers' datasets hold the features
        },
        scaling_config=scaling,
        run_config=_run_config(cfg, callbacks),
        datasets=datasets,
    )
    result = trainer.fit()
    best = result.get_best_checkpoint(metric="val_loss", mode="min") or result.checkpoint
    final = checkpoint.final_state(result.checkpoint)
    history, resumed = final.history, final.resumed_after

    model = build_model(spec, cfg.backbone, weights=None, image_size=cfg.image_size, dropout=cfg.dropout)
    with best.as_directory() as d:
        model.load_weights(os.path.join(d, checkpoint.WEIGHTS_FILE))
    compiled = CompiledModel(with_features(model))
    inferred_val = _infer(lambda x: compiled(x, cfg.batch_size), decoded["validation"].images, cfg.batch_size)
    validation = inferred_val.pair
    fitted = _fit_decisions(spec, validation, cfg.threshold_confidence or None)
    calibration, operating_point, _ = fitted
    if operating_point and "certified" in operating_point:
        certified = operating_point["certified"]
        (log.info if certified["meets_target"] else log.warning)(f"operating point: {certified['statement']}")

    training = {
        "config": asdict(cfg),
        "epochs": len(history),
        "best_epoch": _best_epoch(history),
        "train_images": int(decoded["train"].count),
        "feature_cache": cached.summary() if cached else None,
    }
    manifest = bundle.make_manifest(
        spec,
        model,
        backbone=cfg.backbone,
        image_size=cfg.image_size,
        weights=cfg.weights,
        training=training,
        calibration=calibration,
        operating_point=operating_point,
    )
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
        gate_section = _fit_gate(cfg, exported, decoded, inferred_val, staged)
        worst = model_card.WorstCases(spec)
        test = _infer(exported.infer, decoded["test"].images, cfg.batch_size, watch=worst.update)
        y_true, probs = test.pair
        _, _, sections, plots = _decision_support(spec, validation, (y_true, probs), fitted)
        deployed, deployed_plots = _at_operating_point(spec, exported, y_true, probs)
        sections["at_operating_point"] = deployed
        sections["gate"] = _gate_report(spec, exported, test, gate_section)
        sections["bootstrap"] = bootstrap.confidence_intervals(spec, y_true, probs, seed=cfg.seed)
        plots.update(deployed_plots)
        samples = _samples(spec, decoded["train"].images)
        metrics = write_report(
            spec,
            report_uri,
            y_true=y_true,
            probs=probs,
            history=history,
            samples=samples,
            extra={
                "config": asdict(cfg),
                "best_epoch": _best_epoch(history),
                "resumed_after": resumed,
                "feature_cache": cached.summary() if cached else None,
                "data": data_report,
            },
            sections=sections,
            extra_plots=plots,
        )
        card = {"manifest": exported.manifest, "splits": layout.splits, "samples": samples, "worst": worst}
        model_card.write(spec, report_uri, metrics=metrics, **card)
        headline = {**_headline(metrics), "at_operating_point": _headline(deployed)}
        bundle.publish(staged, bundle_uri, metrics=headline, gate=gate_section)
    log.info("bundle: %s", bundle_uri)
    log.info("report: %s", report_uri)
    log.info("test metrics (argmax of the raw outputs): " + json.dumps(_headline(metrics)))
    log.info("test metrics (calibrated, at the operating point, as deployed): " + json.dumps(_headline(deployed)))
    return TrainResult(
        output=cfg.output, bundle=bundle_uri, report=report_uri, metrics=metrics, history=history, resumed_after=resumed
    )


def _fit_gate(cfg: TrainConfig, exported, decoded: dict, validation: Inferred, staged: str) -> dict | None:
    """Fit the gate (`eyeray.decision.gate.fit`) on the exported model's own features of (at most
    --gate-fit-images) training images, its threshold on the validation split's; write it into the
    staged bundle and set it on `exported`. Returns the manifest's `gate` section (None: --gate-method none)."""
    from eyeray.decision import gate
    from eyeray.model import bundle

    if cfg.gate_method == "none":
        log.info("no gate (--gate-method none): every answer of this bundle will say so")
        return None
    train = _infer(exported.infer, decoded["train"].images, cfg.batch_size, limit=cfg.gate_fit_images)
    fitted = gate.fit(
        train.features, validation.features, train.stats, method=cfg.gate_method, keep=cfg.gate_keep, seed=cfg.seed
    )
    exported.gate = fitted
    log.info(
        f"gate: {fitted.method} on {fitted.train_images} training images' features, threshold "
        f"{fitted.threshold:.4g} keeps {100 * fitted.kept_on_validation:.1f} % of {fitted.validation_images} "
        "validation images"
    )
    return bundle.add_gate(staged, fitted)


def _gate_report(spec: TaskSpec, exported, test: Inferred, section: dict | None) -> dict[str, Any]:
    """What the gate does on the test split: the share answered, the declined by reason, and the
    accuracy of the argmax on all test images and on the answered ones (the gate should not lower it)."""
    if section is None:
        return {"method": "none"}
    verdict = exported.gate.verdict(test.features, test.stats)
    answered = ~verdict.declined
    reasons = [f"{v}: {r}" if r else str(v) for v, r in zip(verdict.verdict[~answered], verdict.reason[~answered])]
    report = {
        **{k: v for k, v in section.items() if k not in ("quality", "file", "sha256")},
        "test_images": len(answered),
        "test_answered": float(answered.mean()) if len(answered) else None,
        "test_declined_by_reason": {r: reasons.count(r) for r in sorted(set(reasons))},
    }
    if not spec.multi_label:
        correct = test.labels.argmax(axis=1) == test.probs.argmax(axis=1)
        report["test_accuracy_all"] = float(correct.mean())
        report["test_accuracy_answered"] = float(correct[answered].mean()) if answered.any() else None
    return report


def _fit_decisions(
    spec: TaskSpec, validation: tuple[np.ndarray, np.ndarray], confidence: float | None
) -> tuple[dict, dict | None, str | None]:
    """Calibration and the operating point (its rate target met with `confidence`; None: on the
    point estimate), fitted on the validation split. Data too small to choose an operating point
    leaves it out with a note instead of failing a finished run."""
    from eyeray.decision import calibration, operating_points
    from eyeray.decision.roc import UndefinedMetric

    y_val, p_val = validation
    params = calibration.fit(y_val, p_val, spec.multi_label, spec.classes)
    try:
        op = operating_points.choose(spec, y_val, calibration.apply(params, p_val), confidence=confidence)
        return params, op, None
    except UndefinedMetric as exc:
        return params, None, f"not chosen: {exc}"


def _decision_support(
    spec: TaskSpec,
    validation: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    fitted: tuple[dict, dict | None, str | None] | None = None,
):
    """`_fit_decisions` (or its result, `fitted`), and what calibration and the operating point do
    on the test split (report sections and the reliability diagram)."""
    from eyeray.decision import calibration, operating_points
    from eyeray.evaluation.plots import RELIABILITY_PNG, plot_reliability

    params, op, note = fitted or _fit_decisions(spec, validation, operating_points.CONFIDENCE)
    (y_val, p_val), (y_test, p_test) = validation, test
    val_cal, test_cal = calibration.apply(params, p_val), calibration.apply(params, p_test)
    sections: dict[str, Any] = {
        "calibration": {
            **params,
            "validation": calibration.summary(y_val, p_val, val_cal, spec.multi_label),
            "test": calibration.summary(y_test, p_test, test_cal, spec.multi_label),
        }
    }
    if op is None:
        sections["operating_point"] = {"rule": spec.operating_point, "note": note}
    else:
        sections["operating_point"] = {**op, "test": operating_points.achieved(op, y_test, test_cal)}

    def reliability(path: Path) -> None:
        title = f"{spec.title}\ntest split; calibration fitted on the validation split"
        plot_reliability(y_test, p_test, test_cal, spec.multi_label, path, title)

    return params, op, sections, {RELIABILITY_PNG: reliability}


def _at_operating_point(spec: TaskSpec, exported, y_true: np.ndarray, raw: np.ndarray):
    """Test metrics as deployed: the exported bundle's `decide` (calibrated probabilities, labels
    at its operating point) scored with the same metrics as the argmax figures, plus the
    confusion matrix of those decisions. Returns (metrics, {png name: draw function})."""
    from eyeray.evaluation.metrics import compute_metrics
    from eyeray.evaluation.plots import plot_confusion

    decision = exported.decide(raw)
    decided = np.array([[c in row for c in spec.classes] for row in decision.labels], int)
    op = decision.operating_point
    thresholds = op.get("thresholds") if op is not None and spec.multi_label else None
    metrics = compute_metrics(spec, y_true, decision.probabilities, thresholds, decided=decided)
    metrics["decided_by"] = exported.manifest["decision"]
    if decision.referral is not None:
        refer, truth = decision.referral, y_true[:, [spec.class_index(c) for c in spec.referral_classes]].any(axis=1)
        metrics.update(
            referral_sensitivity=float(refer[truth].mean()) if truth.any() else None,
            referral_specificity=float((~refer[~truth]).mean()) if (~truth).any() else None,
            referred=int(refer.sum()),
            referable=int(truth.sum()),
        )

    def confusion(path: Path) -> None:
        plot_confusion(spec, y_true, decided, path, 0.5 if spec.multi_label else None)

    return metrics, {DEPLOYED_CONFUSION_PNG: confusion}


def _best_epoch(history: list[dict[str, Any]]) -> int | None:
    return min(history, key=lambda h: h["val_loss"])["epoch"] if history else None


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The scalar metrics (per-class tables and matrices stay in the report)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None}
