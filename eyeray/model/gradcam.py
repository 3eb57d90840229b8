"""Grad-CAM heatmaps and overlays for any eyeray model, the backbone's feature map found from the graph.

Grad-CAM (Selvaraju et al. 2017): weight each channel of the last convolutional feature map by
the spatial mean of the class score's gradient, sum, keep the positive part. The class score is
the output layer's pre-activation (the logit), as in the paper: softmax or sigmoid probabilities
saturate near 0 and 1 and would give a confident case a flat map.

Finding the feature map. eyeray backbones are Keras models nested inside the functional model,
so `model.get_layer(...).output` of an inner layer is disconnected from the outer input (the
classic "Graph disconnected" of Grad-CAM on transfer-learning models). Instead, the outer graph
is walked back from the output: through the head (Dense, Dropout), into every nested model met
(a concatenation ensemble has several), down to the first tensor that is 4-D and not made by a
pooling layer (VGG16 block5_conv3, Xception block14_sepconv2_act, MobileNetV2 out_relu, the small
CNN's last ReLU). The model is then re-traced with `keras.models.clone_model`, sharing its layers
and weights, with each backbone call swapped for one that also returns that feature map.

Ensembles: every branch gets its own map, in the same units (its share of the class score per
unit of image area), summed on the finest branch's grid; `branch=` picks one branch instead.
"""

from __future__ import annotations

import posixpath
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from eyeray import storage
from eyeray.data import imaging
from eyeray.decision.decide import explained_class
from eyeray.decision.options import DecisionOptions
from eyeray.model.options import InferenceOptions
from eyeray.model.overlay import (  # noqa: F401  (public here too)
    DEFAULT_ALPHA,
    overlay,
    overlay_png,
    png_bytes,
    resize_map,
)

POOLING = (
    keras.layers.MaxPooling2D,
    keras.layers.AveragePooling2D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalMaxPooling2D,
)


@dataclass(frozen=True)
class FeatureSource:
    """Where one branch's feature map comes from: `layer` is called in the outer graph; `tensor`
    is the feature map inside it (a nested backbone) or None (the layer's own output is the map)."""

    layer: keras.layers.Layer
    tensor: object | None
    name: str

    @property
    def feature_layer(self) -> str:
        """The layer whose output is the explained feature map (e.g. VGG16's block5_conv3)."""
        return self.layer.name if self.tensor is None else _producer(self.tensor)[0].name


@dataclass
class Explanation:
    heatmaps: np.ndarray  # (n, h, w) float32 in [0, 1], at the (finest) feature-map resolution
    class_index: np.ndarray  # (n,) the class each map explains
    probabilities: np.ndarray  # (n, classes) the model's output for the same images


def _producer(tensor):
    """(layer, node) that made a symbolic Keras tensor."""
    layer, node_index, _ = tensor._keras_history
    return layer, layer._inbound_nodes[node_index]


def _is_feature_map(layer, tensor) -> bool:
    return len(tensor.shape) == 4 and not isinstance(layer, POOLING) and not isinstance(layer, keras.Model)


def _inner_feature_map(model: keras.Model):
    """The last non-pooling 4-D tensor on the path from a nested model's output back to its input."""
    tensor = model.outputs[0]
    while True:
        layer, node = _producer(tensor)
        if _is_feature_map(layer, tensor):
            return tensor
        if not node.input_tensors:
            raise ValueError(f"{model.name}: no convolutional feature map found on the way to its output")
        tensor = node.input_tensors[0]


def feature_sources(model: keras.Model) -> list[FeatureSource]:
    """The feature map of every branch, found by walking the graph back from the model's output."""
    found: dict[int, FeatureSource] = {}
    stack = [model.outputs[0]]
    while stack:
        tensor = stack.pop()
        layer, node = _producer(tensor)
        if isinstance(layer, keras.Model):
            found.setdefault(id(layer), FeatureSource(layer, _inner_feature_map(layer), layer.name))
        elif _is_feature_map(layer, tensor):
            found.setdefault(id(layer), FeatureSource(layer, None, layer.name))
        else:
            stack.extend(reversed(node.input_tensors))  # all inputs of a Concatenate: every branch
    if not found:
        raise ValueError(f"{model.name}: no convolutional feature map found; Grad-CAM needs a CNN")
    return list(found.values())  # in branch order: a Concatenate's first input first


class GradCam:
    """Grad-CAM for one model: builds the feature-map model once, then explains batches."""

    def __init__(self, model: keras.Model):
        self.model = model
        self.sources = feature_sources(model)
        self._grad_model = self._build()

    def _build(self) -> keras.Model:
        by_layer = {id(s.layer): s for s in self.sources}
        output_layer, _ = _producer(self.model.outputs[0])
        features: dict[str, object] = {}
        logits: list[object] = []

        def call(layer, *args, **kwargs):
            source = by_layer.get(id(layer))
            if source is not None and source.tensor is not None:
                both = keras.Model(layer.inputs, [source.tensor, layer.outputs[0]], name=f"{layer.name}_gradcam")
                features[source.name], out = both(*args, **kwargs)
                return out
            out = layer(*args, **kwargs)
            if source is not None:
                features[source.name] = out
            if layer is output_layer and isinstance(layer, keras.layers.Dense):
                z = keras.ops.matmul(args[0], layer.kernel)
                logits.append(z + layer.bias if layer.use_bias else z)
            return out

        clone = keras.models.clone_model(self.model, clone_function=lambda layer: layer, call_function=call)
        score = logits[0] if logits else clone.outputs[0]  # not a Dense head: explain the output itself
        maps = [features[s.name] for s in self.sources]
        return keras.Model(clone.inputs[0], [maps, score, clone.outputs[0]], name=f"{self.model.name}_gradcam")

    def __call__(
        self, images_uint8: np.ndarray, class_index: int | Sequence[int] | None = None, branch: int | str | None = None
    ) -> Explanation:
        """(n, size, size, 3) uint8 -> one heatmap per image for `class_index` (default: the top class).

        `branch` (index or backbone layer name) explains one branch of an ensemble; None sums them.
        """
        import tensorflow as tf

        images = np.asarray(images_uint8)
        if images.ndim == 3:
            images = images[None]
        with tf.GradientTape() as tape:
            maps, score, probs = self._grad_model(images, training=False)
            chosen = _classes(np.asarray(probs), class_index)
            target = tf.gather(score, chosen, axis=1, batch_dims=1)
        grads = tape.gradient(target, maps)
        cams = [_cam(np.asarray(a), np.asarray(g)) for a, g in zip(maps, grads)]
        if branch is not None:
            cams = [cams[self._branch(branch)]]
        return Explanation(_combine(cams), chosen, np.asarray(probs, np.float32))

    def _branch(self, branch: int | str) -> int:
        names = [s.name for s in self.sources]
        if isinstance(branch, int) and -len(names) <= branch < len(names):
            return branch
        if branch in names:
            return names.index(branch)
        raise ValueError(f"unknown branch {branch!r}; this model has {', '.join(names)}")


def _classes(probs: np.ndarray, class_index) -> np.ndarray:
    n, classes = probs.shape
    if class_index is None:
        return probs.argmax(axis=1).astype(np.int32)
    chosen = np.broadcast_to(np.asarray(class_index, np.int32), (n,)).copy()
    if ((chosen < 0) | (chosen >= classes)).any():
        raise ValueError(f"class_index must be in 0..{classes - 1}, got {class_index}")
    return chosen


def _cam(features: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """Raw Grad-CAM (n, h, w), scaled by h*w so that branches of different resolutions add up."""
    weights = grads.mean(axis=(1, 2), keepdims=True)  # alpha_k: the mean gradient of each channel
    h, w = features.shape[1:3]
    return (features * weights).sum(axis=-1) * (h * w)


def _combine(cams: list[np.ndarray]) -> np.ndarray:
    """Sum the branches on the finest grid, keep the positive evidence, scale each map to [0, 1]."""
    h = max(c.shape[1] for c in cams)
    w = max(c.shape[2] for c in cams)
    total = sum(np.stack([resize_map(m, h, w) for m in c]) for c in cams)
    total = np.maximum(total, 0.0)
    peak = total.max(axis=(1, 2), keepdims=True)
    out = np.divide(total, peak, out=np.zeros_like(total), where=peak > 0)
    return np.nan_to_num(out, nan=0.0).astype(np.float32)


_CACHE: weakref.WeakKeyDictionary[keras.Model, GradCam] = weakref.WeakKeyDictionary()


def gradcam(
    model: keras.Model,
    images_uint8: np.ndarray,
    class_index: int | Sequence[int] | None = None,
    branch: int | str | None = None,
) -> np.ndarray:
    """Heatmaps (n, h, w) in [0, 1] at the feature-map resolution; the Grad-CAM model is cached per model."""
    if model not in _CACHE:
        _CACHE[model] = GradCam(model)
    return _CACHE[model](images_uint8, class_index, branch).heatmaps


# ---------------------------------------------------------------------------------------------
# Files in, PNG overlays out (`eyeray explain`)


def overlay_path(image_uri: str, output: str | None) -> str:
    """`<output or the image's folder>/<image name without extension>.gradcam.png`."""
    folder, name = posixpath.split(image_uri.rstrip("/"))
    stem = name.rsplit(".", 1)[0] if "." in name.strip(".") else name
    return storage.join(output or folder or ".", f"{stem}.gradcam.png")


def explain_decision(
    loaded,
    cam: GradCam,
    model_input: np.ndarray,
    class_name: str | None = None,
    decision: DecisionOptions = DecisionOptions(),
    original_size: tuple[int, int] | None = None,
    override=None,
):
    """One preprocessed image (size, size, 3) -> (Decision, explained class index, heatmap).

    The decision is `Bundle.decide`'s (the gate's verdict on the image, whose file was
    `original_size` (height, width; default: the model input's); calibrated, at the operating
    point or `decision`'s override, or `override` already parsed (a Serve request's)), as in scoring
    and serving; the heatmap explains `class_name`, by default the decided class the model is most
    sure of (for a declined image, its most probable class). TTA is as `loaded` was loaded.
    """
    classes = loaded.classes
    if class_name is not None and class_name not in classes:
        raise ValueError(f"class {class_name!r} is not a class of this bundle ({', '.join(classes)})")
    batch = np.asarray(model_input)[None]
    height, width = original_size or batch.shape[1:3]
    probs, features = loaded.infer(batch)
    verdict = loaded.verdict(batch, features, [height], [width], decision.gate)
    thresholds = decision.override if override is None else override
    decided = loaded.decide(probs, thresholds, decision.review_below, verdict)
    k = classes.index(class_name) if class_name else explained_class(decided, 0, classes)
    return decided, k, cam(batch, class_index=k).heatmaps[0]


def explain_image(
    loaded,
    cam: GradCam,
    original: np.ndarray,
    class_name: str | None = None,
    alpha: float = DEFAULT_ALPHA,
    decision: DecisionOptions = DecisionOptions(),
) -> tuple[dict[str, Any], bytes]:
    """One decoded image (RGB uint8, any size) -> (the answer as a JSON-ready dict, overlay PNG at
    the image's own size). `loaded` is an `eyeray.model.bundle.Bundle`, `cam` its GradCam, built once."""
    model_input = imaging.preprocess(original, loaded.image_size, loaded.resize_method)
    decided, k, heatmap = explain_decision(loaded, cam, model_input, class_name, decision, original.shape[:2])
    row = {"explained_class": loaded.classes[k], **decided.answer(0, loaded.classes)}
    return row, overlay_png(original, heatmap, alpha)


# ---------------------------------------------------------------------------------------------
# Batch scoring: heatmaps of the explained rows (drawn on the originals by eyeray.score.overlays)


def ensemble_heatmaps(cams: Sequence[GradCam], images: Sequence[np.ndarray], rows, class_index) -> np.ndarray:
    """Heatmaps (len(rows), h, w) in [0, 1] of `class_index[i]` for image `rows[i]`; `images[j]` is
    the batch at model j's input size. With several models (an ensemble) the map is the mean of the
    members' maps, each scaled to [0, 1], on the finest member's grid."""
    rows, wanted = np.asarray(rows, int), np.asarray(class_index, np.int32)
    maps = [cam(x[rows], class_index=wanted).heatmaps for cam, x in zip(cams, images)]
    h, w = max(m.shape[1] for m in maps), max(m.shape[2] for m in maps)
    return np.mean([np.stack([resize_map(x, h, w) for x in m]) for m in maps], axis=0).astype(np.float32)


def explain_files(
    bundle_uri: str,
    images: Sequence[str],
    output: str | None = None,
    class_name: str | None = None,
    alpha: float = DEFAULT_ALPHA,
    decision: DecisionOptions = DecisionOptions(),
    inference: InferenceOptions = InferenceOptions(),
) -> list[dict[str, Any]]:
    """Grad-CAM overlays for image files (local or s3://), one row per file; a bad file is a row
    with `error`, not an exception. Decode and resize are `eyeray.data.imaging`'s, as everywhere;
    the answer is the gate's and the decision layer's, with the options of scoring and serving."""
    from eyeray.model import bundle as bundles

    loaded = bundles.load(bundle_uri, inference=inference)
    cam = GradCam(loaded.model)
    rows = []
    for uri in images:
        original, reason = imaging.read_value(uri, loaded.max_pixels)
        if original is None:
            rows.append({"path": uri, "error": reason})
            continue
        row, png = explain_image(loaded, cam, original, class_name, alpha, decision)
        target = overlay_path(uri, output)
        storage.write_bytes(target, png)
        rows.append({"path": uri, "overlay": target, **row, "error": ""})
    return rows
