"""Grad-CAM: it points at the region that decides the class, for every backbone, and the CLI writes overlays."""

from __future__ import annotations

import io
import json

import keras
import numpy as np
import pytest
from PIL import Image

from eyeray.cli import explain_main
from eyeray.model import bundle
from eyeray.model.build import build_model
from eyeray.model.gradcam import GradCam, gradcam, overlay_path
from eyeray.model.overlay import overlay, overlay_png
from eyeray.tasks import get_task

SIZE = 64
MARKER = 12  # px: a white square in the top-left (class 0) or bottom-right (class 1) corner
MARGIN = 4


def marker_images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Noise, plus a grey distractor square anywhere; the class is decided ONLY by the white
    marker's corner."""
    images = rng.integers(0, 160, (n, SIZE, SIZE, 3)).astype(np.uint8)
    classes = rng.integers(0, 2, n)
    for image, k in zip(images, classes):
        r, c = rng.integers(0, SIZE - MARKER, 2)
        image[r : r + MARKER, c : c + MARKER] = 200
        o = MARGIN if k == 0 else SIZE - MARGIN - MARKER
        image[o : o + MARKER, o : o + MARKER] = 255
    return images, classes


@pytest.fixture(scope="module")
def marker_model():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    images, classes = marker_images(240, rng)
    model = build_model(get_task("glaucoma"), "small_cnn", weights="none", image_size=SIZE, dropout=0.1, dense_units=32)
    model.compile(keras.optimizers.Adam(2e-3), "categorical_crossentropy", metrics=["accuracy"])
    model.fit(images, np.eye(2, dtype=np.float32)[classes], epochs=6, batch_size=16, verbose=0)
    return model


def quadrant_of_peak(heatmap: np.ndarray) -> tuple[bool, bool]:
    """(bottom half?, right half?) of the heatmap's maximum."""
    r, c = np.unravel_index(np.argmax(heatmap), heatmap.shape)
    return bool(r >= heatmap.shape[0] / 2), bool(c >= heatmap.shape[1] / 2)


def test_heatmap_peak_falls_on_the_class_marker_for_held_out_images(marker_model):
    images, classes = marker_images(40, np.random.default_rng(1))
    result = GradCam(marker_model)(images)
    assert (result.class_index == classes).mean() == 1.0  # the model learned the marker
    assert result.heatmaps.shape == (40, SIZE // 8, SIZE // 8)  # small CNN: the last ReLU before pooling
    hits = [
        quadrant_of_peak(h) == ((False, False) if k == 0 else (True, True)) for h, k in zip(result.heatmaps, classes)
    ]
    print(f"localisation hit rate {np.mean(hits):.3f} on {len(hits)} held-out images")
    assert np.mean(hits) >= 0.9


def test_explaining_a_given_class_and_the_cached_function(marker_model):
    images, _ = marker_images(4, np.random.default_rng(2))
    result = GradCam(marker_model)(images, class_index=[1, 1, 0, 0])
    assert result.class_index.tolist() == [1, 1, 0, 0]
    np.testing.assert_allclose(result.probabilities, marker_model.predict(images, verbose=0), atol=1e-5)
    heatmaps = gradcam(marker_model, images, class_index=[1, 1, 0, 0])
    np.testing.assert_allclose(heatmaps, result.heatmaps, atol=1e-6)
    with pytest.raises(ValueError, match="class_index"):
        gradcam(marker_model, images, class_index=2)


@pytest.mark.parametrize(
    "backbone, size, feature_layer, grid",
    [
        ("small_cnn", 32, "activation", (4, 4)),  # its last ReLU (auto-named activation_N)
        ("vgg16", 32, "block5_conv3", (2, 2)),
        ("xception", 71, "block14_sepconv2_act", (3, 3)),
        ("mobilenet_v2", 64, "out_relu", (2, 2)),
    ],
)
def test_feature_map_is_found_from_the_graph_for_each_backbone(backbone, size, feature_layer, grid):
    model = build_model(get_task("oct"), backbone, weights="none", image_size=size)
    cam = GradCam(model)
    [source] = cam.sources
    assert source.name == f"backbone_{backbone}" and source.feature_layer.startswith(feature_layer)
    heatmaps = cam(np.random.default_rng(0).integers(0, 255, (2, size, size, 3), dtype=np.uint8)).heatmaps
    assert heatmaps.shape == (2, *grid) and heatmaps.dtype == np.float32
    assert np.isfinite(heatmaps).all() and heatmaps.min() >= 0 and heatmaps.max() <= 1


def test_concatenation_ensemble_combines_both_branches_or_explains_one():
    model = build_model(get_task("glaucoma"), "vgg16+small_cnn", weights="none", image_size=32)
    cam = GradCam(model)
    assert [s.name for s in cam.sources] == ["backbone_vgg16", "backbone_small_cnn"]
    images = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    assert cam(images).heatmaps.shape == (2, 4, 4)  # on the finer (small CNN) grid
    assert cam(images, branch="backbone_vgg16").heatmaps.shape == (2, 2, 2)
    assert cam(images, branch=1).heatmaps.shape == (2, 4, 4)
    with pytest.raises(ValueError, match="unknown branch"):
        cam(images, branch="backbone_xception")


def test_a_flat_functional_model_without_a_nested_backbone_works_too():
    inputs = keras.Input((32, 32, 3), dtype="uint8")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu", name="last_conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    cam = GradCam(model)
    assert [s.feature_layer for s in cam.sources] == ["last_conv"]
    assert cam(np.zeros((1, 32, 32, 3), np.uint8)).heatmaps.shape == (1, 30, 30)


def test_overlay_has_the_original_image_size_and_encodes_as_png():
    image = np.full((123, 211, 3), 90, np.uint8)
    heatmap = np.zeros((4, 4), np.float32)
    heatmap[0, 0] = 1.0
    out = overlay(image, heatmap)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert not np.array_equal(out[:10, :10], image[:10, :10])  # hot corner coloured
    np.testing.assert_array_equal(out[-10:, -10:], image[-10:, -10:])  # cold corner keeps the image
    decoded = np.asarray(Image.open(io.BytesIO(overlay_png(image, heatmap))))
    np.testing.assert_array_equal(decoded, out)
    assert overlay(image[..., 0], heatmap).shape == image.shape  # greyscale in, RGB out


def test_explain_cli_writes_an_overlay_per_image_from_a_bundle(marker_model, tmp_path, capsys):
    spec = get_task("glaucoma")
    manifest = bundle.make_manifest(spec, marker_model, backbone="small_cnn", image_size=SIZE, weights="none")
    bundle.save(marker_model, manifest, str(tmp_path / "bundle"))
    images, classes = marker_images(2, np.random.default_rng(3))
    paths = []
    for i, (image, size) in enumerate(zip(images, [(300, 200), (150, 150)])):  # originals larger than the input
        paths.append(tmp_path / f"eye{i}.jpg")
        Image.fromarray(image).resize(size, Image.NEAREST).save(paths[-1], quality=95)
    (tmp_path / "broken.png").write_bytes(b"not an image")

    code = explain_main(
        [
            "--bundle",
            str(tmp_path / "bundle"),
            "--output",
            str(tmp_path / "out"),
            *map(str, paths),
            str(tmp_path / "broken.png"),
        ]
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1 and [r["error"] == "" for r in rows] == [True, True, False]
    assert "not an image" in rows[2]["error"]
    for row, path, k in zip(rows, paths, classes):
        assert row["overlay"] == str(tmp_path / "out" / f"{path.stem}.gradcam.png")
        assert row["explained_class"] == spec.classes[k] and row["labels"] == [spec.classes[k]]
        assert Image.open(row["overlay"]).size == Image.open(path).size
    assert overlay_path("s3://b/x/eye.jpeg", None) == "s3://b/x/eye.gradcam.png"


def test_explain_plan_picks_rows_and_classes():
    from eyeray.decision.decide import Decision
    from eyeray.score.explain_plan import ExplainPlan

    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.4, 0.35, 0.25]], np.float32)
    decision = Decision(probs, [["a"], ["b"], ["a"]], np.array([True, False, False]), None)
    review = np.array([False, False, True])
    classes = ["a", "b", "c"]
    assert ExplainPlan.parse("none").pairs(decision, review, classes) == [] and not ExplainPlan.parse("none").active
    assert ExplainPlan.parse("review").pairs(decision, review, classes) == [(2, 0)]
    assert ExplainPlan.parse("referred,review").pairs(decision, review, classes) == [(0, 0), (2, 0)]
    assert ExplainPlan.parse("top-2").pairs(decision, review, classes) == [
        (0, 0),
        (0, 1),
        (1, 1),
        (1, 2),
        (2, 0),
        (2, 1),
    ]
    for bad in ("top-0", "top-x", "everything", "top-1,top-2"):
        with pytest.raises(ValueError, match="--explain"):
            ExplainPlan.parse(bad)
