"""Compiled inference: a Keras model called as one `tf.function` on batches padded to a few fixed sizes.

Why not `model.predict`: it builds a dataset and a progress loop on every call (tens of ms, most of
a served request). Why fixed sizes: a `tf.function` traces, and XLA compiles, once per input shape;
a served stream has every batch size from 1 to the maximum, so each batch is padded with zero rows
up to the next power of two (or the batch size itself) and the padding rows are dropped after. The
graph is traced at most `len(buckets(batch_size))` times, and per image the outputs are those of
`model(x, training=False)` (inference layers do not mix rows of a batch).

Options: `jit_compile` (XLA; measured on this 2-core CPU at 0.83x of the plain `tf.function`, on
GPUs usually faster) and `mixed_precision` (TensorFlow's grappler rewrite, float16 on GPUs; see
`enable_mixed_precision`). Outputs are always float32.
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


def enable_mixed_precision() -> bool:
    """Turn TensorFlow's grappler `auto_mixed_precision` rewrite on for this process when a GPU is
    visible; True if it was turned on.

    It only changes GPU graphs: the rewrite runs float32 ops that are safe in float16 (convolutions,
    matmuls) in float16 on GPUs of compute capability 7.0 or more, and casts back where the graph
    needs float32. TensorFlow also applies it on CPUs with AMX-FP16, so without a GPU it is left
    off and CPU inference stays float32 everywhere. It is a process-wide setting (graphs run after
    it, of every model), which suits the actors and replicas that ask for it: they exist to serve one
    model. For inference only: training under it would need loss scaling."""
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        log.info("mixed precision asked for, but no GPU is visible: inference stays float32")
        return False
    tf.config.optimizer.set_experimental_options({"auto_mixed_precision": True})
    return True


class CompiledModel:
    """`model(x, training=False)` as a `tf.function`, on batches padded to `buckets(batch_size)`.

    `traces` counts the traces (a Python side effect, so it runs while tracing only): it grows by at
    most one per padded size and input dtype, whatever the sizes of the calls."""

    def __init__(self, model: Any, *, jit_compile: bool = False, mixed_precision: bool = False):
        import tensorflow as tf

        self.model, self.jit_compile = model, jit_compile
        self.mixed_precision = enable_mixed_precision() if mixed_precision else False
        self.traces = 0
        self.input_dtype = np.dtype(getattr(model.inputs[0], "dtype", "float32") if model.inputs else "float32")
        self._function = tf.function(self._forward, jit_compile=jit_compile, reduce_retracing=False)

    def _forward(self, images):
        import tensorflow as tf

        self.traces += 1
        return tf.cast(self.model(images, training=False), tf.float32)

    def __call__(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Images (n, ...) -> float32 outputs (n, ...), at most `batch_size` images per model call."""
        images = np.asarray(images, self.input_dtype)
        if len(images) == 0:
            return np.zeros((0, *self.model.output_shape[1:]), np.float32)
        return np.concatenate(
            [self._padded(images[i : i + batch_size], batch_size) for i in range(0, len(images), batch_size)]
        )

    def _padded(self, chunk: np.ndarray, batch_size: int) -> np.ndarray:
        n, size = len(chunk), bucket(len(chunk), batch_size)
        if size > n:
            chunk = np.concatenate([chunk, np.zeros((size - n, *chunk.shape[1:]), chunk.dtype)])
        return self._run(chunk)[:n]

    def _run(self, batch: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        return self._function(tf.convert_to_tensor(np.ascontiguousarray(batch))).numpy()

    def warm_up(self, batch_size: int) -> None:
        """Trace (and with XLA, compile) every padded size now, so no request pays for it later."""
        shape = tuple(int(d) for d in self.model.inputs[0].shape[1:])
        for size in buckets(batch_size):
            self._run(np.zeros((size, *shape), self.input_dtype))
