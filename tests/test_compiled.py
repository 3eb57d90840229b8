"""Compiled inference (eyeray.model.compiled): the same outputs as a plain model call, with padding,
XLA and mixed precision (within a stated tolerance), traced once per padded size; GPU set-up
that is safe on any machine."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from bundles import make_bundle

from eyeray.model import bundle, compiled, devices
from eyeray.model.build import build_model
from eyeray.model.options import InferenceOptions
from eyeray.tasks import get_task

ATOL = 1e-5  # float32 on CPU: padding and XLA change summation order, nothing else
BATCH = 16


@pytest.fixture(scope="module")
def model():
    m = build_model(get_task("oct"), "small_cnn", weights="none", image_size=32)
    kernel = m.get_layer("predictions").kernel  # spread the untrained head's outputs, so differences show
    kernel.assign(np.random.default_rng(0).normal(0, 1.0, kernel.shape).astype(np.float32))
    return m


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (40, 32, 32, 3), np.uint8)


def plain(model, images: np.ndarray) -> np.ndarray:
    return np.asarray(model(images, training=False), np.float32)


def test_buckets_are_powers_of_two_up_to_the_batch_size():
    assert compiled.buckets(16) == (1, 2, 4, 8, 16)
    assert compiled.buckets(12) == (1, 2, 4, 8, 12)
    assert compiled.buckets(1) == (1,)
    assert [compiled.bucket(n, 12) for n in (1, 3, 5, 9, 12)] == [1, 4, 8, 12, 12]
    with pytest.raises(ValueError):
        compiled.buckets(0)


@pytest.mark.parametrize("jit_compile", [False, True], ids=["tf.function", "xla"])
def test_padded_batches_equal_the_plain_call(model, images, jit_compile):
    """Odd sizes (1, 3, 17 with batch 16: 16 + a padded 1) exercise the padding rows and their removal."""
    run = compiled.CompiledModel(model, jit_compile=jit_compile)
    for n in (1, 3, 17):
        out = run(images[:n], BATCH)
        assert out.shape == (n, 4) and out.dtype == np.float32
        np.testing.assert_allclose(out, plain(model, images[:n]), atol=ATOL, err_msg=f"n={n}")
    assert run(images[:0], BATCH).shape == (0, 4)


def test_traces_once_per_padded_size(model, images):
    run = compiled.CompiledModel(model)
    for n in [1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 40, 1, 3, 16, 6]:
        run(images[:n], BATCH)
    assert run.traces == len(compiled.buckets(BATCH))  # 1, 2, 4, 8, 16: every one was needed above
    run(images.astype(np.int64), BATCH)  # other dtypes become the model's input dtype: no new trace
    assert run.traces == len(compiled.buckets(BATCH))


def test_warm_up_traces_every_size_so_calls_trace_nothing(model, images):
    run = compiled.CompiledModel(model, jit_compile=True)
    run.warm_up(BATCH)
    assert run.traces == len(compiled.buckets(BATCH))
    run(images[:11], BATCH)
    run(images[:1], BATCH)
    assert run.traces == len(compiled.buckets(BATCH))


def test_tensorflows_retracing_warning_is_dropped_for_the_padded_sizes_only(model, images):
    """A warm-up of batch 16 traces 5 sizes, which TensorFlow's counter calls retracing (a 700-character
    warning in every Serve replica's log); another function's retracing still gets through."""
    import logging

    import tensorflow as tf

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    tf_log = logging.getLogger("tensorflow")
    tf_log.addHandler(handler)
    try:
        compiled.CompiledModel(model).warm_up(BATCH)
        square = tf.function(lambda x: x * x)
        for n in range(1, 8):  # a new shape every call: real retracing
            square(tf.zeros((n,)))
    finally:
        tf_log.removeHandler(handler)
    retracing = [r for r in records if "triggered tf.function retracing" in r]
    assert retracing and not [r for r in retracing if "CompiledModel._forward" in r], retracing


MIXED_CHILD = r"""
import json, sys
import numpy as np
from eyeray.model import bundle
from eyeray.model.devices import mixed_precision_dtype
from eyeray.model.options import InferenceOptions

loaded = bundle.load(sys.argv[1], inference=InferenceOptions(mixed_precision=True))
size = loaded.image_size
images = np.random.default_rng(1).integers(0, 256, (5, size, size, 3), np.uint8)
plain = np.asarray(loaded.model(images, training=False), np.float32)  # eager: the graph rewrite does not touch it
out = loaded.predict(images, 16)
top2 = np.sort(plain, axis=1)[:, -2:]
decisive = top2[:, 1] - top2[:, 0] > 0.04  # 2 x BFLOAT16_ATOL: beyond what bfloat16's rounding moves
print("RESULT " + json.dumps({
    "hardware": mixed_precision_dtype(), "precision": loaded.compiled.precision, "dtype": str(out.dtype),
    "max_diff": float(np.abs(out - plain).max()),
    "labels_equal": bool((out.argmax(1) == plain.argmax(1))[decisive].all()),
    "sum_error": float(np.abs(out.sum(axis=1) - 1).max()),
}))
"""
BFLOAT16_ATOL = 2e-2  # probabilities; 8 significant bits through a few convolutions


def test_mixed_precision_runs_in_the_hardwares_16_bit_type_with_float32_outputs(tmp_path):
    """A bundle loaded with `mixed_precision`, in a child process: the rewrite is process-wide, so it
    would reach every later test's graphs. On a CPU with bfloat16 (this project's machines have
    AVX512-BF16) the graph runs in bfloat16: the outputs move, within the tolerance; elsewhere the
    process stays float32 and they are unchanged."""
    proc = subprocess.run(
        [sys.executable, "-c", MIXED_CHILD, make_bundle(tmp_path)], capture_output=True, text=True, timeout=300
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(line.removeprefix("RESULT "))
    assert result["dtype"] == "float32" and result["precision"] == (result["hardware"] or "float32")
    if result["precision"] == "bfloat16":
        assert 0 < result["max_diff"] <= BFLOAT16_ATOL, result  # the rewrite ran, and stayed close
    else:
        assert result["max_diff"] <= ATOL, result
    assert result["labels_equal"]
    assert result["sum_error"] <= 1e-6  # softmax rows still sum to 1 (sklearn's AUC, for one, needs it)


def test_mixed_precision_turns_on_the_rewrite_for_the_hardwares_type(monkeypatch):
    import tensorflow as tf

    calls = []
    monkeypatch.setattr(tf.config.optimizer, "set_experimental_options", calls.append)
    for hardware, rewrite in (
        ("float16", "auto_mixed_precision"),
        ("bfloat16", "auto_mixed_precision_onednn_bfloat16"),
        (None, None),
    ):
        calls.clear()
        monkeypatch.setattr(devices, "mixed_precision_dtype", lambda hardware=hardware: hardware)
        assert compiled.enable_mixed_precision() == hardware
        assert calls == ([{rewrite: True}] if rewrite else [])


def test_the_16_bit_type_follows_the_hardware(monkeypatch, tmp_path):
    import tensorflow as tf

    cpuinfo = tmp_path / "cpuinfo"
    for flags, expected in (("fpu avx2 avx512f avx512_bf16 fma", True), ("fpu amx_bf16", True), ("fpu avx2", False)):
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
        assert devices.cpu_has_bfloat16(str(cpuinfo)) is expected, flags
    assert devices.cpu_has_bfloat16(str(tmp_path / "absent")) is False  # not Linux: float32
    cpuinfo.write_text("flags\t\t: avx512_bf16\n")
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")  # no oneDNN kernels: bfloat16 would be emulated
    assert devices.cpu_has_bfloat16(str(cpuinfo)) is False
    for bf16 in (True, False):
        monkeypatch.setattr(devices, "cpu_has_bfloat16", lambda bf16=bf16: bf16)
        assert devices.mixed_precision_dtype() == ("bfloat16" if bf16 else None)
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"] if kind == "GPU" else [])
    assert devices.mixed_precision_dtype() == "float16"  # a GPU: float16, whatever the CPU


def test_bundle_predict_goes_through_the_compiled_model_with_its_settings(tmp_path, images):
    uri = make_bundle(tmp_path)
    default, xla = (
        bundle.load(uri),
        bundle.load(uri, inference=InferenceOptions(jit_compile=True)),
    )  # mixed precision: in a child, above
    assert (default.compiled.jit_compile, xla.compiled.jit_compile) == (False, True)
    for n in (1, 3, 17):
        expected = plain(default.model, images[:n])
        np.testing.assert_allclose(default.predict(images[:n], batch_size=BATCH), expected, atol=ATOL)
        np.testing.assert_allclose(xla.predict(images[:n], batch_size=BATCH), expected, atol=ATOL)
    mean = (plain(xla.model, images[:3]) + plain(xla.model, images[:3, :, ::-1])) / 2
    np.testing.assert_allclose(xla.predict(images[:3], tta=True), mean, atol=ATOL)
    assert default.compiled.traces == 3  # padded sizes 1, 4 and 16


def test_configure_gpus_is_safe_without_gpus_and_once_tensorflow_is_initialised(monkeypatch):
    import tensorflow as tf

    assert devices.configure_gpus() == []  # this machine: no GPU, nothing to do
    assert devices.configure_gpus() == []

    class Gpu:
        name = "/physical_device:GPU:0"

    growth = []

    def refuse(gpu, enabled):
        growth.append(enabled)
        raise RuntimeError("Physical devices cannot be modified after being initialized")

    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [Gpu()])
    monkeypatch.setattr(tf.config.experimental, "get_memory_growth", lambda gpu: False)
    monkeypatch.setattr(tf.config.experimental, "set_memory_growth", refuse)
    assert devices.configure_gpus() == [Gpu.name] and growth == [True]
    monkeypatch.setattr(tf.config.experimental, "get_memory_growth", lambda gpu: True)
    assert devices.configure_gpus() == [Gpu.name] and growth == [True]  # already on: left alone
