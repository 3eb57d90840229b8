"""Data-parallel fine-tuning with Ray Train: the run's config, the worker loop, the multi-worker
fitter, checkpoints, and the driver that exports the bundle and report. `run` is the entry point."""

from eyeray.train.config import TrainConfig, TrainResult
from eyeray.train.driver import run

__all__ = ["TrainConfig", "TrainResult", "run"]
