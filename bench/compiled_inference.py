"""Compiled inference (`eyeray.model.compiled`) against Keras' own ways of running a model.

An untrained VGG16 at 224 px (the OCT and ODIR production backbone; its cost does not depend on its
weights), batch 16, in one process, on the same uint8 images. Each way runs up to REPEATS times,
interleaved (the machine is shared, so load changes hit every way alike), while BUDGET_S lasts
(at least once); the median is reported, with the load average before and after:

- `predict`: `model.predict(x, batch_size=16)` (a dataset and a progress loop per call);
- `predict_on_batch`: one call per batch of 16 (what `Bundle.predict` used before);
- `tf_function`: `CompiledModel` (a `tf.function` on batches padded to fixed sizes: `Bundle.predict` now);
- `xla`: the same with `jit_compile=True`.

Each way's outputs are compared with the plain `model(x, training=False)` (max absolute difference),
and its first call (trace, and for XLA compile) is timed apart from the steady state.

    python bench/compiled_inference.py      # writes bench/results/compiled_inference.json
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eyeray.model.build import build_model  # noqa: E402
from eyeray.model.compiled import CompiledModel  # noqa: E402
from eyeray.tasks import get_task  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SIZE, BATCH, IMAGES, REPEATS = 224, 16, 16, 5
BUDGET_S = float(os.environ.get("BENCH_BUDGET_S", 270))  # seconds from the model build: about 5 minutes in all


def ways(model) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    tf_function, xla = CompiledModel(model), CompiledModel(model, jit_compile=True)

    def on_batch(x: np.ndarray) -> np.ndarray:
        return np.concatenate([np.asarray(model.predict_on_batch(x[i : i + BATCH])) for i in range(0, len(x), BATCH)])

    return {
        "predict": lambda x: np.asarray(model.predict(x, batch_size=BATCH, verbose=0)),
        "predict_on_batch": on_batch,
        "tf_function": lambda x: tf_function(x, BATCH),
        "xla": lambda x: xla(x, BATCH),
    }


def main() -> dict:
    import tensorflow as tf

    load_before, began = os.getloadavg(), time.perf_counter()
    model = build_model(get_task("oct"), "vgg16", weights="none", image_size=SIZE)
    images = np.random.default_rng(0).integers(0, 256, (IMAGES, SIZE, SIZE, 3), np.uint8)
    reference = np.concatenate(
        [np.asarray(model(images[i : i + BATCH], training=False)) for i in range(0, IMAGES, BATCH)]
    )
    runs = ways(model)
    first, seconds, diff = {}, {name: [] for name in runs}, {}
    for name, run in runs.items():  # first call: tracing (and XLA compilation) on one batch
        start = time.perf_counter()
        run(images[:BATCH])
        first[name] = time.perf_counter() - start
        print(f"{name}: first call {first[name]:.1f} s", file=sys.stderr, flush=True)
    started = time.perf_counter()
    for repeat in range(REPEATS):
        per_round = (time.perf_counter() - started) / max(repeat, 1)
        if repeat and time.perf_counter() - began + per_round > BUDGET_S:
            break
        for name, run in runs.items():
            start = time.perf_counter()
            out = run(images)
            seconds[name].append(time.perf_counter() - start)
            print(f"{name}: {IMAGES / seconds[name][-1]:.2f} images/s", file=sys.stderr, flush=True)
            diff[name] = max(diff.get(name, 0.0), float(np.max(np.abs(out - reference))))
    median = {name: statistics.median(s) for name, s in seconds.items()}
    return {
        "machine": f"{os.cpu_count()} CPU cores, "
        f"{'GPU' if tf.config.list_physical_devices('GPU') else 'no GPU'}, {platform.machine()}",
        "libraries": {"tensorflow": tf.__version__, "keras": __import__("keras").__version__},
        "model": f"vgg16 @ {SIZE} px, weights none, oct head (4 classes)",
        "batch_size": BATCH,
        "images": IMAGES,
        "repeats": len(seconds["predict"]),
        "load_average_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "ways": {
            name: {
                "images_per_s": round(IMAGES / median[name], 3),
                "median_s": round(median[name], 3),
                "all_s": [round(s, 3) for s in seconds[name]],
                "first_call_s": round(first[name], 3),
                "max_abs_diff_vs_plain_call": diff[name],
                "speedup_vs_predict": round(median["predict"] / median[name], 3),
            }
            for name in runs
        },
    }


if __name__ == "__main__":
    results = main()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compiled_inference.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["ways"], indent=2))
