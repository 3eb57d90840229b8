"""The frozen-backbone phase at feature speed: pooled backbone features computed once, as a Ray Data
stage in the driver, and the head trained on them (`TrainConfig.head_on_features`).

Why: in phase "head" the backbone is frozen, so every epoch on images recomputes the same backbone
forward pass (nearly all of the work) to train a few dense layers. Computed once, the features
make each head epoch a matter of seconds. The price: the head sees each training image once,
un-augmented (augmentation needs the backbone forward pass per epoch); fine-tuning, which needs
images anyway, is augmented as configured. bench/feature_cache.py measured both ways.

The stage is a `map_batches` callable class (one model per actor, with the run's --weights; a
GPU per actor on GPU runs), materialized before `trainer.fit()` so it never competes with the
training workers for CPUs or GPUs. The workers then train `eyeray.model.build.head_model`, which
shares the full model's head layers, so checkpoints and the bundle are the full model as usual.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import ray

from eyeray.tasks import get_task
from eyeray.train.config import TrainConfig

log = logging.getLogger(__name__)

FEATURES = "features"  # the column of pooled features (float32, one vector per image)
DATASETS = {"train": "train_features", "validation": "validation_features"}  # Ray Train dataset names


def head_on_features(cfg: TrainConfig) -> bool:
    """Whether this (resolved) run trains its head on cached features: asked for, and there is a
    head phase (a pretrained backbone, --epochs > 0). One answer for the driver and the workers."""
    return bool(cfg.head_on_features) and cfg.weights not in (None, "none") and bool(cfg.epochs)


class PooledFeatures:
    """`map_batches` callable class: uint8 images -> the model's pooled backbone features (the
    input of its FeatureStandardize layer), from the same model the workers build, same --weights;
    with `mixed_precision` (the run's --mixed-precision) in the hardware's 16-bit type, see
    eyeray.model.compiled.enable_mixed_precision."""

    def __init__(
        self,
        task: str,
        backbone: str,
        weights: str,
        image_size: int,
        batch_size: int = 32,
        mixed_precision: bool = False,
    ):
        from eyeray.model.build import build_model, pooled_features
        from eyeray.model.compiled import CompiledModel
        from eyeray.model.devices import configure_gpus

        configure_gpus()
        model = build_model(get_task(task), backbone, weights=weights, image_size=image_size)
        self.features = CompiledModel(pooled_features(model)[0], mixed_precision=mixed_precision)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        features = self.features(batch["image"], self.batch_size)
        return {FEATURES: features, "label": batch["label"]}


@dataclass
class CachedFeatures:
    datasets: dict[str, ray.data.Dataset]  # split -> materialized rows of `features` and `label`
    counts: dict[str, int]  # split -> images
    seconds: float  # wall time of the stage, model builds included

    def summary(self) -> dict:
        """What the report and the benchmark keep of it."""
        return {"images": self.counts, "seconds": round(self.seconds, 2)}


def cache_features(cfg: TrainConfig, splits: dict[str, ray.data.Dataset]) -> CachedFeatures:
    """{split: materialized images dataset} -> each split's pooled features, materialized. The
    splits go one after the other, each straight from its materialized images, so the stage needs
    nothing but its actors (no upstream task waits for a CPU the actors hold). One actor on CPUs:
    on 2 cores one TensorFlow process using both beat two with one each (STACK-NOTES); on GPUs, one
    GPU actor (the features are computed once, so one GPU is plenty)."""
    start = time.perf_counter()
    stage = dict(
        fn_constructor_kwargs=dict(
            task=cfg.task,
            backbone=cfg.backbone,
            weights=cfg.weights,
            image_size=cfg.image_size,
            batch_size=cfg.batch_size,
            mixed_precision=cfg.mixed_precision,
        ),
        batch_size=cfg.batch_size,
        # one actor also on GPUs: a 2-worker GPU run with one per worker stalled in CI (open)
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=1,
        **({"num_gpus": 1} if cfg.use_gpu else {}),
    )
    out = {name: ds.map_batches(PooledFeatures, **stage).materialize() for name, ds in splits.items()}
    seconds = time.perf_counter() - start
    counts = {n: ds.count() for n, ds in out.items()}
    total = sum(counts.values())
    log.info(
        f"cached pooled backbone features of {total} images ({', '.join(f'{n} {c}' for n, c in counts.items())}) "
        f"in {seconds:.1f}s ({total / max(seconds, 1e-9):.1f} img/s); the head trains on them"
    )
    return CachedFeatures(out, counts, seconds)
