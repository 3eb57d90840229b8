"""Backbones, heads, in-model preprocessing, the fine-tuning schedule, weights files."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from eyeray.model.build import (
    BACKBONES,
    backbone_names,
    backbones_of,
    build_model,
    phases,
    set_phase,
)
from eyeray.tasks import TASKS, get_task


@pytest.mark.parametrize(
    "task, backbone, size",
    [
        ("oct", "vgg16", 32),
        ("glaucoma", "xception", 71),
        ("glaucoma", "inception_resnet_v2", 75),
        ("odir", "vgg16", 32),
        ("glaucoma", "small_cnn", 32),
        ("glaucoma", "xception+small_cnn", 71),
    ],
)
def test_every_backbone_builds_with_the_task_head(task, backbone, size):
    spec = get_task(task)
    model = build_model(spec, backbone, weights="none", image_size=size)
    assert model.input.dtype == "uint8"
    assert [name for name, _ in backbones_of(model)] == backbone.split("+")
    out = model.predict(np.random.default_rng(0).integers(0, 255, (2, size, size, 3), dtype=np.uint8), verbose=0)
    assert out.shape == (2, spec.num_classes)
    if spec.multi_label:
        assert np.all((out > 0) & (out < 1)) and not np.allclose(out.sum(axis=1), 1)
    else:
        np.testing.assert_allclose(out.sum(axis=1), 1, rtol=1e-5)


def test_in_model_preprocessing_is_the_backbones_own():
    model = build_model(get_task("oct"), "vgg16", weights="none", image_size=32)
    x = np.random.default_rng(1).integers(0, 255, (1, 32, 32, 3), dtype=np.uint8)
    ours = keras.ops.convert_to_numpy(model.get_layer("preprocess_vgg16")(x))
    theirs = keras.applications.vgg16.preprocess_input(x.astype(np.float32))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    xc = build_model(get_task("glaucoma"), "xception", weights="none", image_size=71)
    y = np.full((1, 71, 71, 3), 255, np.uint8)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(xc.get_layer("preprocess_xception")(y)), 1.0)


def test_unknown_backbone_and_too_small_input_are_clear_errors():
    with pytest.raises(ValueError, match="unknown backbone 'resnet9'.*vgg16"):
        backbone_names("resnet9")
    with pytest.raises(ValueError, match="--image-size 64 is too small for xception"):
        build_model(get_task("glaucoma"), "xception", weights="none", image_size=64)


def trainable_counts(model):
    return {
        name: sum(1 for layer in base.layers if layer.trainable and layer.weights) for name, base in backbones_of(model)
    }


def test_two_phase_schedule_freezes_then_unfreezes_the_top_without_batchnorm():
    model = build_model(get_task("glaucoma"), "xception", weights="none", image_size=71)
    head_vars = len(model.trainable_weights)
    set_phase(model, "head")
    assert not backbones_of(model)[0][1].trainable
    frozen = len(model.trainable_weights)
    assert frozen == 4  # head_dense + predictions: kernel and bias each
    set_phase(model, "fine_tune")
    base = backbones_of(model)[0][1]
    top = [layer for layer in base.layers if layer.weights][-BACKBONES["xception"].fine_tune_layers :]
    assert all(layer.trainable != isinstance(layer, keras.layers.BatchNormalization) for layer in top)
    assert trainable_counts(model)["xception"] == sum(
        not isinstance(layer, keras.layers.BatchNormalization) for layer in top
    )
    assert frozen < len(model.trainable_weights) < head_vars
    set_phase(model, "full")
    assert len(model.trainable_weights) == head_vars


def test_phases():
    assert phases(True, 3, 2) == [("head", 3), ("fine_tune", 2)]
    assert phases(True, 3, 0) == [("head", 3)]
    assert phases(False, 3, 2) == [("full", 5)]


def test_weights_path_loads_a_saved_backbone(tmp_path):
    """--weights PATH: the air-gapped route (a backbone saved with save_weights elsewhere)."""
    spec = get_task("oct")
    source = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg")
    path = tmp_path / "vgg16_backbone.weights.h5"
    source.save_weights(path)
    model = build_model(spec, "vgg16", weights=str(path), image_size=32)
    loaded = dict(backbones_of(model))["vgg16"]
    for a, b in zip(source.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="one backbone"):
        build_model(spec, "vgg16+small_cnn", weights=str(path), image_size=32)


def test_small_cnn_refuses_imagenet():
    with pytest.raises(ValueError, match="no ImageNet weights"):
        build_model(get_task("oct"), "small_cnn", weights="imagenet", image_size=32)


def test_every_task_default_backbone_is_registered():
    for spec in TASKS.values():
        backbone_names(spec.backbone)
        backbone_names(spec.demo.backbone)


def test_weights_file_on_s3(s3_server, tmp_path):
    """Air-gapped hospitals keep the backbone file in their object store: --weights s3://..."""
    from eyeray import storage

    source = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg")
    path = tmp_path / "vgg16.weights.h5"
    source.save_weights(path)
    fs, _ = storage.filesystem("s3://weights")
    fs.mkdir("weights")
    fs.put_file(str(path), "weights/vgg16.weights.h5")
    model = build_model(get_task("odir"), "vgg16", weights="s3://weights/vgg16.weights.h5", image_size=32)
    np.testing.assert_array_equal(dict(backbones_of(model))["vgg16"].get_weights()[0], source.get_weights()[0])
