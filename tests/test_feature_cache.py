"""The frozen-backbone phase on cached features (eyeray.train.features), without Ray: the cached
features are the model's own, and the head on them is the full model on the images."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from eyeray.cli import get_train_parser, train_config
from eyeray.model.build import FEATURE_SCALE, build_model, head_model, pooled_features, set_phase
from eyeray.tasks import get_task
from eyeray.train import TrainConfig
from eyeray.train.distributed import DistributedFitter
from eyeray.train.features import FEATURES, PooledFeatures, head_on_features


@pytest.fixture(scope="module")
def vgg16_weights(tmp_path_factory) -> str:
    """A backbone weights file, as --weights PATH takes it (random weights: equality is the point)."""
    path = tmp_path_factory.mktemp("weights") / "vgg16.weights.h5"
    keras.utils.set_random_seed(0)
    keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg").save_weights(path)
    return str(path)


def test_head_on_cached_features_gives_the_full_models_outputs_and_feature_scale(vgg16_weights):
    spec = get_task("oct")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    labels = np.eye(4, dtype=np.float32)[rng.integers(0, 4, 24)]
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():  # as in the workers: the optimizer's slots mirror the model's variables
        model = build_model(spec, "vgg16", weights=vgg16_weights, image_size=32)
    set_phase(model, "head")
    head = head_model(model)
    assert {id(v) for v in head.weights} <= {id(v) for v in model.weights}  # shared, not copied
    assert pooled_features(model) is not None  # the sub-graph leaves the model's own graph as it was

    # the Ray Data stage: a model of its own, built from the same --weights
    stage = PooledFeatures("oct", "vgg16", vgg16_weights, 32)
    cached = stage({"image": images, "label": labels})
    assert cached[FEATURES].shape == (24, 512) and cached[FEATURES].dtype == np.float32
    np.testing.assert_array_equal(cached["label"], labels)

    # standardisation fitted on the cached features = fitted on the images through the backbone
    weights = np.ones(4, np.float32)
    on_images = DistributedFitter(strategy, model, spec, weights)
    scale_images = on_images.fit_feature_scale({"image": images[i : i + 8]} for i in range(0, 24, 8))
    layer = model.get_layer(FEATURE_SCALE)
    mean, std = layer.mean.numpy().copy(), layer.std.numpy().copy()
    layer.set_statistics(np.zeros_like(mean), np.ones_like(std))
    on_features = DistributedFitter(strategy, head, spec, weights, inputs=FEATURES)
    scale_features = on_features.fit_feature_scale({FEATURES: cached[FEATURES][i : i + 8]} for i in range(0, 24, 8))
    assert scale_features["images"] == scale_images["images"] == 24
    np.testing.assert_allclose(layer.mean.numpy(), mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layer.std.numpy(), std, rtol=1e-4, atol=1e-5)

    # a training step on features moves the full model's head; inference outputs agree
    on_features.compile(1e-2)
    before = model.get_layer("predictions").kernel.numpy().copy()
    on_features.train_epoch([{FEATURES: cached[FEATURES], "label": labels}])
    assert not np.array_equal(model.get_layer("predictions").kernel.numpy(), before)
    full = model(images, training=False).numpy()
    np.testing.assert_allclose(head(cached[FEATURES], training=False).numpy(), full, rtol=1e-4, atol=1e-6)
    outputs: list = []
    stats = on_features.evaluate([{FEATURES: cached[FEATURES], "label": labels}], outputs)
    assert stats.examples == 24
    np.testing.assert_allclose(outputs[0][1], full, rtol=1e-4, atol=1e-6)


def test_the_setting_applies_to_a_pretrained_head_phase_only_and_has_a_flag():
    base = TrainConfig(task="oct", data="/d", weights="/w.h5", epochs=2, head_on_features=True).resolved()
    assert head_on_features(base)
    assert not head_on_features(TrainConfig(task="oct", data="/d", weights="none", head_on_features=True).resolved())
    assert not head_on_features(TrainConfig(task="oct", data="/d", epochs=0, head_on_features=True).resolved())
    assert not head_on_features(TrainConfig(task="oct", data="/d", head_on_features=False).resolved())
    default = TrainConfig.head_on_features
    flag = "--no-head-on-features" if default else "--head-on-features"
    assert train_config(get_train_parser("oct").parse_args([flag]), "oct").head_on_features is not default
    assert train_config(get_train_parser("oct").parse_args([]), "oct").head_on_features is default


def test_epoch_line_says_when_the_head_trained_on_cached_features():
    from eyeray.train.progress import epoch_line

    metrics = {"epoch": 2, "phase": "head", "inputs": "features", "loss": 0.5, "val_loss": 0.6, "images_per_s": 900.0}
    assert epoch_line(metrics, 8, "macro_f1", None).startswith("epoch 2/8 head (on cached features): loss 0.5")
    assert epoch_line({**metrics, "inputs": "images"}, 8, "macro_f1", None).startswith("epoch 2/8 head: ")
