"""Accelerator settings that every process building TensorFlow models applies first (Serve model
replicas, scoring actors, training workers), so that they are the same everywhere."""

from __future__ import annotations

import logging
import os
from pathlib import Path

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


BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 instructions oneDNN runs bfloat16 convolutions with


def cpu_has_bfloat16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when this CPU runs bfloat16 in hardware (AVX512-BF16 or AMX, in /proc/cpuinfo's flags) and
    TensorFlow's oneDNN kernels are on (they are by default on x86 Linux; `TF_ENABLE_ONEDNN_OPTS=0`
    turns them off). Without both, TensorFlow emulates bfloat16, which is slower than float32."""
    if os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1") == "0":
        return False
    try:
        text = Path(cpuinfo).read_text()
    except OSError:  # not Linux: no way to tell here, so no bfloat16
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in BFLOAT16_CPU_FLAGS)


def mixed_precision_dtype() -> str | None:
    """The 16-bit compute type `--mixed-precision` uses in this process: "float16" where a GPU is
    visible (tensor cores), "bfloat16" on a CPU that runs it in hardware (on this project's 2-core
    AVX512-BF16 machine, bench/score_throughput.py and bench/real_transfer.py measure about twice
    float32's inference rate and 1.7x its fine-tuning speed), and None elsewhere (float32 stays)."""
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return "float16"
    return "bfloat16" if cpu_has_bfloat16() else None
