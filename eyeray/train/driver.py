"""The training driver, as stages that hand a value on: data (eyeray.train.data) -> fit
(eyeray.train.fit, Ray Train) -> decisions (eyeray.decision.fitting: calibration and operating
point on the validation split) -> export and evaluation (the bundle staged, its gate fitted on its
own features, the test split scored as exported: eyeray.evaluation.deployed) -> publish."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict
from typing import Any

from eyeray import cluster, storage
from eyeray.data.layouts import Layout
from eyeray.decision import fitting
from eyeray.evaluation import deployed
from eyeray.evaluation.inference import Inferred, infer
from eyeray.tasks import get_task
from eyeray.train import data as training_data
from eyeray.train import preflight
from eyeray.train.config import TrainConfig, TrainResult
from eyeray.train.fit import Fitted, fit

log = logging.getLogger(__name__)


def run(
    config: TrainConfig, callbacks: list | None = None, trial: str | None = None, layout: Layout | None = None
) -> TrainResult:
    """Train, evaluate on the test split, and write OUTPUT/bundle and OUTPUT/report.

    `callbacks`: Ray Train callbacks for the run; `trial`: the sweep trial this run is (the sweep
    passes both: its callback forwards every epoch's report to Ray Tune); `layout`: --data's
    layout, already read and checked (the sweep's preflight, for every trial)."""
    from eyeray.model.build import with_features
    from eyeray.model.compiled import CompiledModel

    # resolved, and every setting checked before Ray starts (SettingError), --output's earlier run
    # included; --data's layout as the check read it flows on to the data stage
    checked = preflight.checked(config, layout)
    cfg = checked.config
    spec = get_task(cfg.task)
    cluster.connect()
    log.info(
        f"training {spec.name}: {cfg.backbone} @ {cfg.image_size}px, weights={cfg.weights}, "
        f"{cfg.workers} worker(s){' with GPUs' if cfg.use_gpu else ''}, "
        f"{f'augmented by the {cfg.augment_site}' if cfg.augment else 'no augmentation'}, output {cfg.output}"
    )
    data = training_data.prepare(spec, cfg, checked.layout)
    fitted = fit(cfg, data, callbacks, trial)
    compiled = CompiledModel(with_features(fitted.model))
    validation = infer(lambda x: compiled(x, cfg.batch_size), data.images("validation"), cfg.batch_size)
    decisions = fitting.fit(spec, *validation.pair, cfg.threshold_confidence or None)
    result, as_deployed = _export(cfg, data, fitted, validation, decisions)
    log.info("bundle: %s", result.bundle)
    log.info("report: %s", result.report)
    log.info("test metrics (argmax of the raw outputs): " + json.dumps(_headline(result.metrics)))
    log.info("test metrics (calibrated, at the operating point, as deployed): " + json.dumps(as_deployed))
    return result


def _export(
    cfg: TrainConfig, data: training_data.TrainingData, fitted: Fitted, validation: Inferred, decisions
) -> tuple[TrainResult, dict[str, Any]]:
    """Stage the bundle, fit its gate on its own features, score the test split with the bundle as
    loaded back from disk (what scoring and serving run), write the report, then publish the
    bundle with its headline figures. Returns the result and the deployed headline metrics."""
    from eyeray.model import bundle

    spec = get_task(cfg.task)
    manifest = bundle.make_manifest(
        spec,
        fitted.model,
        backbone=cfg.backbone,
        image_size=cfg.image_size,
        weights=cfg.weights,
        training=_training_summary(cfg, data, fitted),
        calibration=decisions.calibration,
        operating_point=decisions.operating_point,
    )
    bundle_uri, report_uri = storage.join(cfg.output, "bundle"), storage.join(cfg.output, "report")
    with tempfile.TemporaryDirectory(prefix="eyeray-export-") as tmp:
        staged = os.path.join(tmp, "bundle")
        bundle.save(fitted.model, manifest, staged)
        exported = bundle.load(staged)
        gate = _fit_gate(cfg, exported, data, validation, staged)
        metrics, evaluation = _evaluate(cfg, data, fitted, exported, validation, decisions, gate, report_uri)
        as_deployed = _headline(evaluation.deployed)
        bundle.publish(staged, bundle_uri, metrics={**_headline(metrics), "at_operating_point": as_deployed}, gate=gate)
    result = TrainResult(cfg.output, bundle_uri, report_uri, metrics, fitted.history, fitted.resumed_after)
    return result, as_deployed


def _training_summary(cfg: TrainConfig, data: training_data.TrainingData, fitted: Fitted) -> dict[str, Any]:
    """The manifest's `training` block: how this model was made."""
    return {
        "config": asdict(cfg),
        "epochs": len(fitted.history),
        "best_epoch": fitted.best_epoch,
        "train_images": int(data.decoded["train"].count),
        "feature_cache": fitted.feature_cache,
    }


def _fit_gate(cfg: TrainConfig, exported, data: training_data.TrainingData, validation: Inferred, staged: str):
    """Fit the gate (`eyeray.decision.gate.fit`) on the exported model's own features of (at most
    --gate-fit-images) training images, its threshold on the validation split's; write it into the
    staged bundle and set it on `exported`. Returns the manifest's `gate` section (None: --gate-method none)."""
    from eyeray.decision import gate
    from eyeray.model import bundle

    if cfg.gate_method == "none":
        log.info("no gate (--gate-method none): every answer of this bundle will say so")
        return None
    train = infer(exported.infer, data.images("train"), cfg.batch_size, limit=cfg.gate_fit_images)
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


def _evaluate(cfg, data, fitted: Fitted, exported, validation: Inferred, decisions, gate, report_uri: str):
    """Score the test split with the exported bundle; write the report (metrics.json, plots) and
    the model card. Returns (the report's metrics, the deployed evaluation)."""
    from eyeray.evaluation import model_card
    from eyeray.evaluation.report import write_report

    spec = get_task(cfg.task)
    worst = model_card.WorstCases(spec)
    test = infer(exported.infer, data.images("test"), cfg.batch_size, watch=worst.update)
    evaluation = deployed.evaluate(spec, exported, validation, test, decisions, gate, seed=cfg.seed)
    samples = training_data.samples(spec, data.images("train"))
    run_section = {
        "config": asdict(cfg),
        "best_epoch": fitted.best_epoch,
        "resumed_after": fitted.resumed_after,
        "feature_cache": fitted.feature_cache,
        "data": data.report(),
    }
    metrics = write_report(
        spec,
        report_uri,
        y_true=test.labels,
        probs=test.probs,
        history=fitted.history,
        samples=samples,
        extra=run_section,
        sections=evaluation.sections,
        extra_plots=evaluation.plots,
        patients=test.patients,  # the per-patient ODIR-2019 score (the challenge scored patients)
    )
    card = {"manifest": exported.manifest, "splits": data.layout.splits, "samples": samples, "worst": worst}
    model_card.write(spec, report_uri, metrics=metrics, **card)
    return metrics, evaluation


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The scalar metrics (per-class tables and matrices stay in the report)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None}
