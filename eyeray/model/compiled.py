"""Compiled inference: a Keras model called as one `tf.function` on batches padded to a few fixed sizes.

Why not `model.predict`: it builds a dataset and a progress loop on every call (tens of ms, most of
a served request). Why fixed sizes: a `tf.function` traces, and XLA compiles, once per input shape;
a served stream has every batch size from 1 to the maximum, so each batch is padded with zero rows
up to the next power of two (or the batch size itself) and the padding rows are dropped after. The
graph is traced at most `len(buckets(batch_size))` times, and per image the outputs are those of
`model(x, training=False)` (inference layers do not mix rows of a batch).

Options: `jit_compile` (XLA; measured on this 2-core CPU at 0.83x of the plain `tf.function`, on
GPUs usually faster) and `mixed_precision` (TensorFlow's grappler rewrite: float16 on GPUs, bfloat16
on CPUs that have it; see `enable_mixed_precision`). Outputs are always float32.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def buckets(batch_size: int) -> tuple[int, ...]:
    """The padded batch sizes for calls of at most `batch_size` images: the powers of two below it, and it."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    return (*(1 << i for i in range(batch_size.bit_length()) if 1 << i < batch_size), batch_size)


def bucket(n: int, batch_size: int) -> int:
    """The padded size of a batch of `n` (1 <= n <= batch_size) images."""
    return next(b for b in buckets(batch_size) if b >= n)


GRAPPLER_REWRITES = {  # TensorFlow's graph rewrites that run a float32 graph in 16 bits where it is safe
    "float16": "auto_mixed_precision",
    "bfloat16": "auto_mixed_precision_onednn_bfloat16",
}


def enable_mixed_precision() -> str | None:
    """Turn on TensorFlow's grappler mixed-precision rewrite for this process, in the 16-bit type
    `eyeray.model.devices.mixed_precision_dtype` picks; returns that type, or None (float32 stays).

    The rewrite runs the ops that are safe in 16 bits (convolutions, matmuls) in float16 on GPUs, or
    in bfloat16 through oneDNN on CPUs with AVX512-BF16 or AMX, and casts back where the graph needs
    float32; the bundle's weights stay float32. It is a process-wide setting (every graph run after
    it, of every model), which suits the actors and replicas that ask for it: they exist to serve
    one model. For inference only: training sets a Keras dtype policy instead."""
    import tensorflow as tf

    from eyeray.model.devices import mixed_precision_dtype

    dtype = mixed_precision_dtype()
    if dtype is None:
        log.warning(
            "mixed precision asked for, but there is no GPU and this CPU has no bfloat16: inference stays float32"
        )
        return None
    tf.config.optimizer.set_experimental_options({GRAPPLER_REWRITES[dtype]: True})
    log.info(f"mixed precision: inference in {dtype}")
    return dtype


class _BoundedRetracing(logging.Filter):
    """Drops TensorFlow's "N of the last M calls to CompiledModel._forward triggered tf.function
    retracing" warning: those traces are one per padded size by design (`buckets`), not the
    unbounded retracing the warning is about. Other functions' retracing warnings still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("triggered tf.function retracing" in message and "CompiledModel._forward" in message)


def _outputs(out) -> tuple:
    return tuple(out) if isinstance(out, (list, tuple)) else (out,)


class CompiledModel:
    """`model(x, training=False)` as a `tf.function`, on batches padded to `buckets(batch_size)`.

    `precision`: the compute type of the traced graph, "float32" or (with `mixed_precision`) the
    16-bit type the process could turn on. `sums_to_one`: the outputs are softmax probabilities; the
    rewrite runs the softmax in 16 bits too (rows then sum to 1 within about 2e-3), so in 16 bits
    each row is divided by its float32 sum, as a float32 model's rows sum to 1.

    `traces` counts the traces (a Python side effect, so it runs while tracing only): it grows by at
    most one per padded size and input dtype, whatever the sizes of the calls."""

    def __init__(
        self, model: Any, *, jit_compile: bool = False, mixed_precision: bool = False, sums_to_one: bool = False
    ):
        import tensorflow as tf

        self.model, self.jit_compile = model, jit_compile
        self.precision = (enable_mixed_precision() if mixed_precision else None) or "float32"
        self.renormalise = sums_to_one and self.precision != "float32"
        self.traces = 0
        self.multi_output = isinstance(model.output_shape, list)
        self.input_dtype = np.dtype(getattr(model.inputs[0], "dtype", "float32") if model.inputs else "float32")
        self._function = tf.function(self._forward, jit_compile=jit_compile, reduce_retracing=False)
        tf_log = logging.getLogger("tensorflow")
        if not any(isinstance(f, _BoundedRetracing) for f in tf_log.filters):
            tf_log.addFilter(_BoundedRetracing())

    def _forward(self, images):
        import tensorflow as tf

        self.traces += 1
        return tuple(tf.cast(out, tf.float32) for out in _outputs(self.model(images, training=False)))

    def __call__(self, images: np.ndarray, batch_size: int = 32):
        """Images (n, ...) -> float32 outputs (n, ...), at most `batch_size` images per model call;
        a tuple of them for a model of several outputs (the first is the one `sums_to_one` means)."""
        images = np.asarray(images, self.input_dtype)
        if len(images) == 0:
            shapes = self.model.output_shape if self.multi_output else [self.model.output_shape]
            outs = [np.zeros((0, *shape[1:]), np.float32) for shape in shapes]
        else:
            chunks = [self._padded(images[i : i + batch_size], batch_size) for i in range(0, len(images), batch_size)]
            outs = [np.concatenate(parts) for parts in zip(*chunks)]
        if self.renormalise and len(images):
            outs[0] = outs[0] / outs[0].sum(axis=1, keepdims=True)
        return tuple(outs) if self.multi_output else outs[0]

    def _padded(self, chunk: np.ndarray, batch_size: int) -> tuple[np.ndarray, ...]:
        n, size = len(chunk), bucket(len(chunk), batch_size)
        if size > n:
            chunk = np.concatenate([chunk, np.zeros((size - n, *chunk.shape[1:]), chunk.dtype)])
        return tuple(out[:n] for out in self._run(chunk))

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, ...]:
        import tensorflow as tf

        return tuple(out.numpy() for out in self._function(tf.convert_to_tensor(np.ascontiguousarray(batch))))

    def warm_up(self, batch_size: int) -> None:
        """Trace (and with XLA, compile) every padded size now, so no request pays for it later."""
        shape = tuple(int(d) for d in self.model.inputs[0].shape[1:])
        for size in buckets(batch_size):
            self._run(np.zeros((size, *shape), self.input_dtype))
