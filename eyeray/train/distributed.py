"""The multi-worker training step: the one place that works around Keras 3 + MultiWorkerMirroredStrategy.

Keras 3's `model.fit` fails under `MultiWorkerMirroredStrategy` with two or more workers
(keras-team/keras#20585, ray-project/ray#47464: the symbolic build reduces a PerReplica first
batch, then step metrics are reduced with `axis=0`). We use TensorFlow's documented custom loop
instead (`strategy.run` + `tf.GradientTape`, gradients all-reduced by the optimizer), which
does not depend on Keras internals. The same code runs with one worker, many workers, CPU or GPU.

Losses are summed per example and divided by the global batch, and epoch metrics are all-reduced
sums, so every worker reports the same, exact numbers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from eyeray.tasks import TaskSpec


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    examples: int

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}loss": self.loss, f"{prefix}accuracy": self.accuracy}


def class_weights(spec: TaskSpec, labels: np.ndarray) -> np.ndarray:
    """Per-class loss weights for imbalanced data ("balanced", as sklearn defines it).

    Single-label: n / (k * count_c). Multi-label: a positive weight per label, negatives / positives,
    capped so a label with very few positives cannot dominate the loss.
    """
    labels = np.asarray(labels, np.float64)
    counts = labels.sum(axis=0)
    if spec.multi_label:
        pos = np.maximum(counts, 1.0)
        return np.clip((len(labels) - counts) / pos, 1.0, 50.0).astype(np.float32)
    present = counts > 0
    weights = np.ones(spec.num_classes)
    weights[present] = len(labels) / (present.sum() * counts[present])
    return weights.astype(np.float32)


def set_precision(dtype: str | None) -> str:
    """Keras' global dtype policy for the models built after it, returned: "mixed_float16" or
    "mixed_bfloat16" (16-bit compute, float32 variables) for `dtype` "float16" or "bfloat16"
    (`eyeray.model.devices.mixed_precision_dtype` picks one for the hardware), "float32" for None.
    Every model builds its output layer in float32 (see eyeray.model.build), so probabilities and
    the loss stay float32 either way. `DistributedFitter` scales the loss under float16, whose
    small gradients underflow; bfloat16 has float32's exponent range and needs no scaling."""
    policy = f"mixed_{dtype}" if dtype else "float32"
    keras.mixed_precision.set_global_policy(policy)
    return policy


def skip_everywhere_if_any_overflows(grads: list) -> list:
    """Make every replica's gradients non-finite when any replica's are.

    Keras' LossScaleOptimizer decides to apply or skip a step from the first local replica's
    gradients *before* they are all-reduced (the inner optimizer reduces them, in the apply
    branch). Under MultiWorkerMirroredStrategy, a worker whose float16 gradients overflowed skips
    while the others wait for it in the all-reduce: the run hangs. In one process with several
    replicas, the replica that overflowed is ignored and NaN reaches the weights. One scalar
    all-reduce per step makes every replica agree: all skip and halve the loss scale."""
    finite = [tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None]
    overflowed = tf.cast(tf.logical_not(tf.reduce_all(tf.stack(finite))), tf.float32)
    anywhere = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, overflowed)
    factor = tf.where(anywhere > 0, tf.constant(float("nan")), tf.constant(1.0))
    return [None if g is None else g * tf.cast(factor, g.dtype) for g in grads]


class DistributedFitter:
    """Trains and evaluates one model under a `tf.distribute` strategy, one epoch at a time."""

    def __init__(
        self,
        strategy: tf.distribute.Strategy,
        model: keras.Model,
        spec: TaskSpec,
        weights: np.ndarray,
        inputs: str = "image",
    ):
        """`inputs`: the batch column the model takes: "image" (a full model), or "features" (its
        head alone, eyeray.model.build.head_model, on cached pooled features)."""
        self.strategy = strategy
        self.model = model
        self.inputs = inputs
        self.multi_label = spec.multi_label
        self.weights = tf.constant(weights, tf.float32)
        self.optimizer: keras.optimizers.Optimizer | None = None
        self._train_step = None

    def compile(self, learning_rate: float) -> None:
        """A new optimizer and a new traced step: needed whenever `trainable` changes."""
        with self.strategy.scope():
            self.optimizer = keras.optimizers.Adam(learning_rate)
            if keras.mixed_precision.global_policy().name == "mixed_float16":
                self.optimizer = keras.optimizers.LossScaleOptimizer(self.optimizer)  # dynamic loss scale
            self.optimizer.build(self.model.trainable_variables)
        self._train_step = tf.function(self._step, reduce_retracing=True)
        self._eval_step = tf.function(self._eval, reduce_retracing=True)

    def set_learning_rate(self, value: float) -> None:
        self.optimizer.learning_rate.assign(value)

    def optimizer_state(self) -> list[np.ndarray]:
        return [np.asarray(v.numpy()) for v in self.optimizer.variables]

    def load_optimizer_state(self, values: list[np.ndarray]) -> bool:
        variables = self.optimizer.variables
        if len(values) != len(variables) or any(v.shape != tuple(x.shape) for v, x in zip(variables, values)):
            return False
        for var, value in zip(variables, values):
            var.assign(value)
        return True

    def _per_example(self, y, p):
        """Weighted loss and correctness per example (multi-label: averaged over labels)."""
        if self.multi_label:
            bce = keras.losses.binary_crossentropy(y[..., None], p[..., None])  # (n, C)
            weight = y * self.weights + (1.0 - y)
            loss = tf.reduce_mean(bce * weight, axis=-1)
            correct = tf.reduce_mean(tf.cast(tf.equal(tf.cast(p > 0.5, y.dtype), y), tf.float32), axis=-1)
        else:
            loss = keras.losses.categorical_crossentropy(y, p) * tf.reduce_sum(y * self.weights, axis=-1)
            correct = tf.cast(tf.equal(tf.argmax(p, -1), tf.argmax(y, -1)), tf.float32)
        return loss, correct

    def _step(self, x, y):
        replicas = self.strategy.num_replicas_in_sync

        def replica_fn(x, y):
            with tf.GradientTape() as tape:
                p = self.model(x, training=True)
                loss, correct = self._per_example(y, p)
                global_batch = tf.cast(tf.shape(x)[0] * replicas, tf.float32)
                scaled = tf.reduce_sum(loss) / global_batch
                if self.model.losses:
                    scaled += tf.add_n(self.model.losses) / replicas
                if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
                    scaled = self.optimizer.scale_loss(scaled)  # apply_gradients unscales, skips inf steps
            variables = self.model.trainable_variables
            grads = tape.gradient(scaled, variables)
            if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
                grads = skip_everywhere_if_any_overflows(grads)
            self.optimizer.apply_gradients(zip(grads, variables))
            return tf.reduce_sum(loss), tf.reduce_sum(correct), tf.cast(tf.shape(x)[0], tf.float32)

        sums = self.strategy.run(replica_fn, args=(x, y))
        return [self.strategy.reduce(tf.distribute.ReduceOp.SUM, s, axis=None) for s in sums]

    def _eval(self, x, y):
        p = self.model(x, training=False)
        loss, correct = self._per_example(y, p)
        return tf.reduce_sum(loss), tf.reduce_sum(correct), tf.cast(tf.shape(x)[0], tf.float32), p

    def train_epoch(self, batches: Iterable[dict[str, np.ndarray]]) -> EpochStats:
        """One pass over this worker's shard. Shards must yield the same number of batches on
        every worker (Ray Train's default `streaming_split(equal=True)` guarantees it)."""
        totals = np.zeros(3)
        for batch in batches:
            out = self._train_step(
                tf.convert_to_tensor(batch[self.inputs]), tf.convert_to_tensor(batch["label"], tf.float32)
            )
            totals += [float(v) for v in out]
        self.average_moving_statistics()
        return _stats(totals)

    def average_moving_statistics(self) -> None:
        """BatchNormalization's moving mean and variance are updated by each worker from its own
        shard (Keras does not synchronise them); average them over the workers after an epoch, so
        every replica, the checkpoint (rank 0's) and validation use statistics of the whole split."""
        variables = [v for layer in _batchnorms(self.model) for v in (layer.moving_mean, layer.moving_variance)]
        if not variables:
            return
        local = np.concatenate([np.ravel(v.numpy()).astype(np.float64) for v in variables])
        workers, *summed = self.all_reduce_sum(np.concatenate([[1.0], local]))
        mean, start = np.asarray(summed) / workers, 0
        for v in variables:
            size = int(np.prod(v.shape))
            v.assign(mean[start : start + size].reshape(v.shape).astype(v.dtype))
            start += size

    def evaluate(self, batches: Iterable[dict[str, np.ndarray]], outputs: list | None = None) -> EpochStats:
        """Local evaluation, then one all-reduce of the sums: shards may differ in length.
        `outputs`, when given, collects this worker's (labels, probabilities) per batch."""
        totals = np.zeros(3)
        for batch in batches:
            *sums, probs = self._eval_step(
                tf.convert_to_tensor(batch[self.inputs]), tf.convert_to_tensor(batch["label"], tf.float32)
            )
            totals += [float(v) for v in sums]
            if outputs is not None:
                outputs.append((np.asarray(batch["label"], np.float32), probs.numpy()))
        return _stats(self.all_reduce_sum(totals))

    def fit_feature_scale(self, batches: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
        """Fit the head's feature standardisation on this split (every worker's shard, one
        all-reduce of count, sum and sum of squares), so all replicas get the same statistics.
        Units that never vary keep a scale of 1, as scikit-learn's StandardScaler does. On cached
        features (a head model), the statistics come straight from the batches."""
        from eyeray.model.build import FEATURE_SCALE, pooled_features

        if self.inputs == "image":
            features, layer = pooled_features(self.model)
            forward = tf.function(lambda x: features(x, training=False), reduce_retracing=True)
        else:
            layer, forward = self.model.get_layer(FEATURE_SCALE), tf.identity
        dims = layer.mean.shape[0]
        sums = np.zeros((3, dims))
        for batch in batches:
            f = np.asarray(forward(tf.convert_to_tensor(batch[self.inputs]))).astype(np.float64)
            sums += [np.full(dims, len(f)), f.sum(axis=0), np.square(f).sum(axis=0)]
        count, total, squares = self.all_reduce_sum(sums)
        n = max(float(count[0]), 1.0)
        mean = total / n
        std = np.sqrt(np.maximum(squares / n - mean**2, 0.0))
        std = np.where(std > 1e-6 * max(float(std.max()), 1e-12), std, 1.0)
        layer.set_statistics(mean.astype(np.float32), std.astype(np.float32))
        return {"images": int(count[0]), "feature_mean": float(mean.mean()), "feature_std": float(std.mean())}

    def gather_rows(self, rows: np.ndarray, rank: int, world: int) -> np.ndarray:
        """Every worker's rows (n_i x k), in rank order, on every worker. Each worker places its rows
        in a zero block at its offset and the blocks are summed: one all-reduce, no other collective
        (meant for validation outputs, which are small)."""
        counts = np.zeros(world)
        counts[rank] = len(rows)
        counts = np.rint(self.all_reduce_sum(counts)).astype(int)
        if counts.sum() == 0:
            return np.zeros((0, rows.shape[1]))
        start = int(counts[:rank].sum())
        block = np.zeros((int(counts.sum()), rows.shape[1]))
        block[start : start + len(rows)] = rows
        return self.all_reduce_sum(block)

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        # Each local replica contributes the same worker-local sums: count each worker once.
        local_replicas = max(1, len(self.strategy.extended.worker_devices))
        return self._all_reduce(tf.constant(values, tf.float64)).numpy() / local_replicas

    @tf.function
    def _all_reduce(self, local):
        per_replica = self.strategy.run(lambda: tf.identity(local))
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)


def _batchnorms(layer) -> list[keras.layers.BatchNormalization]:
    """Every BatchNormalization layer of a model, nested backbones included."""
    found = []
    for sub in getattr(layer, "layers", []):
        found += [sub] if isinstance(sub, keras.layers.BatchNormalization) else _batchnorms(sub)
    return found


def _stats(totals: np.ndarray) -> EpochStats:
    n = max(totals[2], 1.0)
    return EpochStats(loss=float(totals[0] / n), accuracy=float(totals[1] / n), examples=int(totals[2]))
