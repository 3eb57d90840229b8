"""Pieces of training that run without Ray: class weights, config resolution, CLI (augmentation: test_augment.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from eyeray.cli import get_train_parser, train_config
from eyeray.tasks import get_task
from eyeray.train import TrainConfig
from eyeray.train.distributed import class_weights


def test_class_weights_balance_single_and_multi_label():
    oct_spec = get_task("oct")
    labels = np.eye(4)[[0] * 6 + [1] * 2 + [2] * 2 + [3] * 2]  # 12 images, CNV x6
    np.testing.assert_allclose(class_weights(oct_spec, labels), [0.5, 1.5, 1.5, 1.5])  # n / (k * count)
    odir = get_task("odir")
    multi = np.zeros((10, 8))
    multi[:2, 0] = 1  # N: 2 positives, 8 negatives -> 4
    multi[:, 1] = 1  # D: all positive -> 0 / 10, floored at 1
    weights = class_weights(odir, multi)
    assert weights[0] == pytest.approx(4.0) and weights[1] == 1.0 and weights[2] == 10.0  # G: 10 / max(0, 1)


def test_demo_defaults_apply_without_data_and_flags_override():
    demo = TrainConfig(task="glaucoma").resolved()
    assert (demo.backbone, demo.weights, demo.image_size, demo.fine_tune_epochs) == ("small_cnn", "none", 64, 0)
    assert demo.output.startswith("runs/glaucoma-demo-")
    real = TrainConfig(task="glaucoma", data="/data/airogs", epochs=3).resolved()
    assert (real.backbone, real.weights, real.image_size, real.epochs) == ("xception", "imagenet", 299, 3)


def test_job_flags_parse_into_the_config():
    args = get_train_parser("oct").parse_args(
        [
            "--data",
            "s3://b/k",
            "--output",
            "s3://b/r",
            "--backbone",
            "vgg16",
            "--weights",
            "None",
            "--image-size",
            "96",
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--learning-rate",
            "0.01",
            "--workers",
            "4",
            "--use-gpu",
            "--resume",
        ]
    )
    cfg = train_config(args, "oct")
    assert (cfg.task, cfg.data, cfg.output, cfg.weights, cfg.image_size, cfg.workers, cfg.use_gpu, cfg.resume) == (
        "oct",
        "s3://b/k",
        "s3://b/r",
        "none",
        96,
        4,
        True,
        True,
    )
    assert cfg.learning_rate == 0.01 and cfg.batch_size == 8 and cfg.epochs == 2


@pytest.mark.parametrize(
    "augment_on, use_gpu, site",
    [("auto", False, "trainer"), ("auto", True, "data"), ("data", False, "data"), ("trainer", True, "trainer")],
)
def test_augmentation_runs_in_the_trainer_on_cpus_and_in_ray_data_beside_gpus(augment_on, use_gpu, site):
    argv = ["--augment-on", augment_on, *(["--use-gpu"] if use_gpu else [])]
    cfg = train_config(get_train_parser("oct").parse_args(argv), "oct")
    assert cfg.augment_site == site
    spec = get_task("oct").augment
    assert cfg.augmentation() == spec
    assert dataclasses.replace(cfg, augment_strength=0.5).augmentation().rotation_deg == spec.rotation_deg / 2
    assert dataclasses.replace(cfg, augment=False).augmentation() is None
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        get_train_parser("oct").parse_args(["--augment-on", "gpu"])


def test_head_standardises_pooled_features_fitted_on_training_batches(tmp_path):
    """The head's first layer is identity until fitted, then maps the training images' pooled
    features to mean 0 / std 1 per unit (constant units keep scale 1), and survives save/load."""
    import keras
    import tensorflow as tf

    from eyeray.model.build import FEATURE_SCALE, build_model, pooled_features
    from eyeray.train.distributed import DistributedFitter

    spec = get_task("oct")
    model = build_model(spec, "small_cnn", weights="none", image_size=32)
    features, layer = pooled_features(model)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    raw = features.predict(images, verbose=0)
    np.testing.assert_allclose(layer(raw), raw, rtol=1e-6)  # identity before fitting

    fitter = DistributedFitter(tf.distribute.MirroredStrategy(["/cpu:0"]), model, spec, np.ones(4, np.float32))
    stats = fitter.fit_feature_scale({"image": images[i : i + 16]} for i in range(0, 40, 16))
    assert stats["images"] == 40
    z = np.asarray(layer(raw))
    varying = raw.std(axis=0) > 1e-6
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-3)
    np.testing.assert_allclose(z.std(axis=0)[varying], 1, atol=1e-3)
    np.testing.assert_allclose(layer.std.numpy()[~varying], 1)

    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    np.testing.assert_allclose(loaded.get_layer(FEATURE_SCALE).mean.numpy(), layer.mean.numpy())
    np.testing.assert_allclose(loaded.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_mixed_precision_trains_and_hands_over_float32_weights(dtype):
    """--mixed-precision: 16-bit compute (float16 on GPUs, bfloat16 on CPUs that have it), float32
    variables and outputs, a loss-scaling optimizer for float16 only (bfloat16 has float32's
    exponent range); the trained weights load into the float32 model the bundle is exported from."""
    import keras
    import tensorflow as tf

    from eyeray.model.build import build_model
    from eyeray.model.compiled import CompiledModel
    from eyeray.train.distributed import DistributedFitter, set_precision

    spec = get_task("oct")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
    labels = np.eye(4, dtype=np.float32)[np.arange(32) % 4]
    images[labels[:, 0] == 1] //= 4  # a class the model can tell apart
    assert set_precision(dtype) == f"mixed_{dtype}"
    try:
        strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
        with strategy.scope():
            mixed = build_model(spec, "small_cnn", weights="none", image_size=32)
        fitter = DistributedFitter(strategy, mixed, spec, np.ones(4, np.float32))
        fitter.compile(1e-3)
        assert isinstance(fitter.optimizer, keras.optimizers.LossScaleOptimizer) == (dtype == "float16")
        assert mixed.get_layer("head_dense").compute_dtype == dtype
        assert {v.dtype for v in mixed.trainable_variables} == {"float32"}
        losses = [
            fitter.train_epoch({"image": images[i : i + 8], "label": labels[i : i + 8]} for i in range(0, 32, 8))
            for _ in range(4)
        ]
        assert all(np.isfinite(s.loss) for s in losses) and losses[-1].loss < losses[0].loss
        out = CompiledModel(mixed)(images, 16)
        assert out.dtype == np.float32
    finally:
        set_precision(None)
    exported = build_model(spec, "small_cnn", weights="none", image_size=32)
    exported.set_weights(mixed.get_weights())
    assert exported.get_layer("head_dense").compute_dtype == "float32"
    np.testing.assert_allclose(CompiledModel(exported)(images, 16), out, atol=2e-2)


def test_best_so_far_is_the_highest_defined_value_up_to_each_epoch():
    from eyeray.train.worker import best_so_far

    history = [{"val_macro_f1": None}, {"val_macro_f1": 1.0}, {"val_macro_f1": 0.45}, {"val_macro_f1": float("nan")}]
    assert [best_so_far(history[: i + 1], "val_macro_f1") for i in range(4)] == [None, 1.0, 1.0, 1.0]
    assert best_so_far([], "val_macro_f1") is None and best_so_far([{"loss": 1.0}], "val_macro_f1") is None
