"""Mixed precision with several replicas: a float16 overflow on any replica skips the step on all.

Keras' LossScaleOptimizer decides from one replica's gradients before they are all-reduced; across
workers that hung the 2-worker mixed-precision run (one worker skipped the all-reduce the other
waited in), in one process it let NaN into the weights. The check runs in a child process because
TensorFlow's logical devices (two replicas on this one CPU) must be set before TensorFlow starts."""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np
from eyeray.tasks import get_task
from eyeray.train.distributed import DistributedFitter, set_precision

set_precision("float16")
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
results = {}
for overflowing in (0, 1, None):
    with strategy.scope():
        layers = [keras.Input((4,)), keras.layers.Dense(2), keras.layers.Activation("softmax", dtype="float32")]
        model = keras.Sequential(layers)
    fitter = DistributedFitter(strategy, model, get_task("glaucoma"), np.ones(2, np.float32))
    fitter.compile(1e-2)
    before = model.get_weights()
    x = np.ones((4, 4), np.float32)
    if overflowing is not None:  # float16 logits overflow on that replica's half of the global batch
        x[2 * overflowing : 2 * overflowing + 2] = 6e4
    y = np.eye(2, dtype=np.float32)[[0, 1, 0, 1]]
    for xb, yb in strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((x, y)).batch(4)):
        fitter._train_step(xb, yb)
    after = model.get_weights()
    results[str(overflowing)] = {
        "scale": float(fitter.optimizer.dynamic_scale.numpy()),
        "unchanged": all(np.array_equal(a, b) for a, b in zip(before, after)),
        "finite": all(bool(np.isfinite(w).all()) for w in after),
    }
print("RESULT " + json.dumps(results))
"""


def test_an_overflow_on_any_replica_skips_the_step_on_every_replica():
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads(line.removeprefix("RESULT "))
    for replica in ("0", "1"):  # skipped everywhere: weights untouched and finite, loss scale halved
        assert results[replica] == {"scale": 2.0**14, "unchanged": True, "finite": True}, (replica, results)
    assert results["None"] == {"scale": 2.0**15, "unchanged": False, "finite": True}  # a normal step applies
