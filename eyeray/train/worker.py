"""The Ray Train worker loop: build the model inside the strategy scope, take this worker's
dataset shard, and run the fine-tuning phases epoch by epoch, reporting and checkpointing each."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import ray
import ray.train

from eyeray.data.augment import augmented
from eyeray.log import setup as setup_logging
from eyeray.tasks import AugmentSpec, TaskSpec, get_task
from eyeray.train import checkpoint
from eyeray.train.config import TrainConfig

log = logging.getLogger(__name__)


def train_batches(shard, batch_size: int, augment: AugmentSpec | None = None):
    """One epoch of a worker's training shard: shuffled locally, prefetched while the step runs
    (4 batches: at batch 32 two were the output of a single augmenting task, so any scheduling delay
    stalled the step), and augmented by `augment` in a background thread (--augment-on trainer;
    None: as the shard holds them)."""
    batches = shard.iter_batches(batch_size=batch_size, local_shuffle_buffer_size=4 * batch_size, prefetch_batches=4)
    return augmented(batches, augment)


def cosine(base_lr: float, step: int, steps: int) -> float:
    """Cosine decay over a phase's epochs: the late epochs settle instead of oscillating."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * step / max(steps, 1)))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's loop on each worker: per phase (head, then fine-tune), one epoch of training,
    one of evaluation on the whole validation split, and a checkpoint reported to Ray Train. A
    restarted worker group resumes after the last checkpointed epoch."""
    setup_logging()  # a Ray worker process: eyeray's lines reach the driver's console through Ray
    worker = Worker.start(config)
    epoch = 0
    for phase, n_epochs in worker.phases():
        if epoch + n_epochs <= worker.state.epoch:  # done before a restart
            epoch += n_epochs
            continue
        current = worker.begin(phase, config["head_on_features"])
        for i in range(n_epochs):
            epoch += 1
            if epoch > worker.state.epoch:
                metrics = worker.epoch(current, epoch, cosine(current.base_lr, i, n_epochs))
                worker.checkpoint(current, metrics)


@dataclass
class Phase:
    """What one training phase runs on: its fitter (on images, or the head alone on cached
    features), this worker's shards, the augmentation it applies, and its base learning rate."""

    name: str
    fitter: Any
    on_features: bool
    train_shard: Any
    val_shard: Any
    augment: AugmentSpec | None
    base_lr: float
    started: float = field(default_factory=time.perf_counter)  # wall time since the last report


@dataclass
class Worker:
    cfg: TrainConfig
    spec: TaskSpec
    rank: int
    world: int
    gpus: int
    model: Any
    on_images: Any  # DistributedFitter of the whole model
    on_features: Any  # DistributedFitter of the head on pooled features (None: no feature cache)
    state: checkpoint.RunState
    optimizer_state: Any

    @classmethod
    def start(cls, config: dict[str, Any]) -> Worker:
        """Devices and precision, the model built in the strategy's scope and restored from Ray
        Train's checkpoint (if a restart handed one), and its fitters."""
        import tensorflow as tf

        from eyeray.model.build import build_model, head_model
        from eyeray.train.distributed import DistributedFitter
        from eyeray.train.features import FEATURES

        cfg = TrainConfig(**config["train"])
        spec = get_task(cfg.task)
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        gpus = _devices(cfg, rank)
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        if cfg.weights == "imagenet" and rank == 0:
            log.info(f"loading ImageNet weights for {cfg.backbone} (downloaded once into ~/.keras/models on each node)")
        with strategy.scope():
            model = build_model(spec, cfg.backbone, weights=cfg.weights, image_size=cfg.image_size, dropout=cfg.dropout)
        state, optimizer_state = checkpoint.restore(model, ray.train.get_checkpoint())
        weights = np.asarray(config["class_weights"], np.float32)
        on_images = DistributedFitter(strategy, model, spec, weights)
        # the head alone on cached features: the same variables, so `model` is what gets checkpointed
        on_features = None
        if config["head_on_features"]:
            on_features = DistributedFitter(strategy, head_model(model), spec, weights, inputs=FEATURES)
        return cls(cfg, spec, rank, world, gpus, model, on_images, on_features, state, optimizer_state)

    def phases(self) -> list[tuple[str, int]]:
        from eyeray.model.build import phases

        return phases(self.cfg.weights not in (None, "none"), self.cfg.epochs, self.cfg.fine_tune_epochs)

    def begin(self, name: str, head_on_features: bool) -> Phase:
        """Unfreeze what the phase trains, compile its fitter (with the optimizer state of a run
        restarted in this phase), and standardise the head's input on a fresh run's first phase."""
        from eyeray.model.build import set_phase
        from eyeray.train.features import DATASETS

        cfg = self.cfg
        set_phase(self.model, name, cfg.fine_tune_layers)
        features = name == "head" and head_on_features
        phase = Phase(
            name=name,
            fitter=self.on_features if features else self.on_images,
            on_features=features,
            train_shard=ray.train.get_dataset_shard(DATASETS["train"] if features else "train"),
            val_shard=ray.train.get_dataset_shard(DATASETS["validation"] if features else "validation"),
            augment=cfg.augmentation() if cfg.augment_site == "trainer" and not features else None,
            base_lr=cfg.learning_rate * (cfg.fine_tune_lr_factor if name == "fine_tune" else 1.0),
        )
        phase.fitter.compile(phase.base_lr)
        if self.optimizer_state is not None and self.state.phase == name:
            phase.fitter.load_optimizer_state(self.optimizer_state)
        if name == "head" and self.state.epoch == 0:  # a resumed run has the statistics in its weights
            scale = phase.fitter.fit_feature_scale(train_batches(phase.train_shard, cfg.batch_size, phase.augment))
            if self.rank == 0:
                log.info(
                    f"head input standardised on {scale['images']} training images{' (cached)' if features else ''} "
                    f"(pooled features: mean {scale['feature_mean']:.3g}, std {scale['feature_std']:.3g})"
                )
        return phase

    def epoch(self, phase: Phase, epoch: int, lr: float) -> dict[str, Any]:
        """One epoch: train on this worker's shard, evaluate on the validation split; its report."""
        phase.fitter.set_learning_rate(lr)
        start = time.perf_counter()
        train = phase.fitter.train_epoch(train_batches(phase.train_shard, self.cfg.batch_size, phase.augment))
        seconds = time.perf_counter() - start
        outputs: list = []
        val = phase.fitter.evaluate(phase.val_shard.iter_batches(batch_size=self.cfg.batch_size), outputs)
        metrics = {
            "epoch": epoch,
            "phase": phase.name,
            "inputs": "features" if phase.on_features else "images",
            "learning_rate": lr,
            **train.as_dict(),
            **val.as_dict("val_"),
            **_validation_metrics(self.spec, phase.fitter, outputs, self.rank, self.world),
            "train_images": train.examples,
            "images_per_s": train.examples / max(seconds, 1e-9),
            "epoch_seconds": seconds,
            "wall_seconds": time.perf_counter() - phase.started,  # + validation (+ set-up): the phase's cost
            "workers": self.world,
            "gpus_per_worker": self.gpus,
        }
        selection = f"val_{self.spec.selection_metric}"
        metrics[f"best_{selection}"] = best_so_far([*self.state.history, metrics], selection)
        return metrics

    def checkpoint(self, phase: Phase, metrics: dict[str, Any]) -> None:
        """Report the epoch to Ray Train with a checkpoint (weights, optimizer, history)."""
        history = [*self.state.history, metrics]
        self.state = replace(self.state, epoch=metrics["epoch"], phase=phase.name, history=history)
        checkpoint.report(self.model, phase.fitter, self.state, metrics, self.rank)
        phase.started = time.perf_counter()


def _devices(cfg: TrainConfig, rank: int) -> int:
    """The GPUs Ray assigned this worker (TensorFlow told to use them) and the Keras precision policy."""
    from eyeray.model.devices import configure_gpus, mixed_precision_dtype
    from eyeray.train.distributed import set_precision

    gpus = len(ray.get_gpu_ids())
    if cfg.use_gpu and not configure_gpus():
        log.warning(f"worker {rank}: Ray assigned {gpus} GPU(s) but TensorFlow sees none; computing on the CPU")
    if cfg.mixed_precision:
        dtype = mixed_precision_dtype() if cfg.mixed_dtype == "auto" else cfg.mixed_dtype
        policy = set_precision(dtype)
        if rank == 0:
            if dtype is None:
                log.warning("--mixed-precision: no GPU, and this CPU has no bfloat16 instructions: training in float32")
            else:
                log.info(f"--mixed-precision: Keras policy {policy}")
    return gpus


def best_so_far(history: list[dict[str, Any]], key: str) -> float | None:
    """The highest defined value of `key` over the epochs so far; None while every one is undefined.

    Reported every epoch as "best_<key>": a sweep's ASHA ranks trials by it, so a trial is judged by
    the best model it already has (its bundle is its best checkpoint), not by one epoch that dipped.
    It comes from the checkpointed history, so a resumed trial keeps the epochs before the resume."""
    values = [h[key] for h in history if h.get(key) is not None and math.isfinite(h[key])]
    return max(values) if values else None


def _validation_metrics(spec: TaskSpec, fitter, outputs: list, rank: int, world: int) -> dict[str, Any]:
    """The task's metrics on the whole validation split (every worker's rows) as "val_<key>", so
    epochs and trials can be ranked by what matters for the task (spec.selection_metric), not
    only by the loss. Undefined values (a class absent from a tiny split) are None."""
    from eyeray.evaluation import metrics as evaluate

    k = spec.num_classes
    local = np.concatenate([np.hstack([y, p]) for y, p in outputs]) if outputs else np.zeros((0, 2 * k))
    rows = fitter.gather_rows(local, rank, world)
    if len(rows) == 0:
        return {}
    computed = evaluate.compute_metrics(spec, rows[:, :k], rows[:, k:])
    keys = dict.fromkeys(("macro_f1", "auc", spec.selection_metric, *spec.extra_metrics))
    return {f"val_{key}": computed.get(key) for key in keys}
