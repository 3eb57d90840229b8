"""Accelerator settings that every process building TensorFlow models applies first (Serve model
replicas, scoring actors, training workers), so that they are the same everywhere."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def configure_gpus() -> list[str]:
    """Turn on memory growth for every visible GPU; returns their names (none on a CPU machine).

    Why: TensorFlow otherwise takes nearly all of a GPU's memory at start-up, and replicas or actors
    holding fractional GPUs (`num_gpus=0.5`) share one. Safe to call again, and after TensorFlow has
    already initialised its devices: the setting is then fixed for the process and is left as is."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            if not tf.config.experimental.get_memory_growth(gpu):
                tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError as exc:  # devices already initialised in this process
            log.debug(f"memory growth of {gpu.name} left as it is: {exc}")
    return [gpu.name for gpu in gpus]
