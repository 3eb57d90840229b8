"""The fit stage of a training run: Ray Train's `TensorflowTrainer` runs the worker loop
(eyeray.train.worker) data-parallel, with checkpoints, restarts and resume; the model comes back
with the weights of its lowest-validation-loss epoch."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

from eyeray import cluster, storage
from eyeray.tasks import TaskSpec, get_task
from eyeray.train import checkpoint
from eyeray.train.config import RUN_NAME, TrainConfig
from eyeray.train.data import TrainingData, trainer_datasets
from eyeray.train.worker import train_loop_per_worker

log = logging.getLogger(__name__)


@dataclass
class Fitted:
    model: Any  # the Keras model, with the best epoch's weights
    history: list[dict[str, Any]]  # one report per epoch, resumed runs included
    resumed_after: list[int]  # epochs after which a restart resumed
    feature_cache: dict[str, Any] | None  # what the head's feature cache did (None: trained on images)

    @property
    def best_epoch(self) -> int | None:
        return min(self.history, key=lambda h: h["val_loss"])["epoch"] if self.history else None


def fit(cfg: TrainConfig, data: TrainingData, callbacks: list | None = None, trial: str | None = None) -> Fitted:
    """Train on the cluster. `callbacks`: Ray Train callbacks for the run; `trial`: the sweep
    trial this run is (its epoch lines are named after it)."""
    from ray.train.tensorflow import TensorflowTrainer

    from eyeray.model.build import build_model
    from eyeray.train.distributed import class_weights

    spec = get_task(cfg.task)
    resumed_epoch = checkpoint.registered_epoch(storage.join(cfg.output, RUN_NAME)) if cfg.resume else 0
    datasets, cached = trainer_datasets(cfg, data, resumed_epoch)
    scaling = _scaling(cfg)
    log.info(
        f"starting {cfg.workers} training worker(s) ({scaling.resources_per_worker} each); they wait until "
        "the cluster has those resources free"
    )
    trainer = TensorflowTrainer(
        train_loop_per_worker=train_loop_per_worker,
        train_loop_config={
            "train": asdict(cfg),
            "class_weights": class_weights(spec, data.train_labels).tolist(),
            "head_on_features": cached is not None,  # the workers' datasets hold the features
        },
        scaling_config=scaling,
        run_config=_run_config(cfg, spec, [*(callbacks or []), _epoch_log(cfg, spec, trial)]),
        datasets=datasets,
    )
    result = trainer.fit()
    best = result.get_best_checkpoint(metric="val_loss", mode="min") or result.checkpoint
    final = checkpoint.final_state(result.checkpoint)
    model = build_model(spec, cfg.backbone, weights=None, image_size=cfg.image_size, dropout=cfg.dropout)
    with best.as_directory() as d:
        model.load_weights(os.path.join(d, checkpoint.WEIGHTS_FILE))
    return Fitted(model, final.history, final.resumed_after, cached.summary() if cached else None)


def _scaling(cfg: TrainConfig) -> ScalingConfig:
    """One GPU per worker when asked; CPUs sized so Ray Data keeps some for decoding and augmenting
    (2 workers x 1 CPU on a 2-CPU node leaves Ray Data none and the run hangs)."""
    cpus = cfg.cpus_per_worker
    if cpus is None:
        total = ray.cluster_resources().get("CPU", 1.0)
        cpus = max(0.25, min(1.0, (total - 1.0) / cfg.workers))
    resources = {"CPU": cpus, **({"GPU": 1} if cfg.use_gpu else {})}
    return ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources)


def _run_config(cfg: TrainConfig, spec: TaskSpec, callbacks: list) -> RunConfig:
    storage_path, fs = storage.ray_storage(cfg.output)
    return RunConfig(
        name=RUN_NAME,
        storage_path=storage_path,
        storage_filesystem=fs,
        callbacks=callbacks,
        logging_config=cluster.train_logging(),
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=CheckpointConfig(
            num_to_keep=2, checkpoint_score_attribute="val_loss", checkpoint_score_order="min"
        ),
    )


def _epoch_log(cfg: TrainConfig, spec: TaskSpec, trial: str | None):
    """One line per epoch on the driver's console (eyeray.train.progress), a sweep trial's named."""
    from eyeray.model.build import phases
    from eyeray.train.progress import EpochLog

    plan = phases(cfg.weights not in (None, "none"), cfg.epochs, cfg.fine_tune_epochs)
    return EpochLog(plan, spec.selection_metric, f"{trial}: " if trial else "")
