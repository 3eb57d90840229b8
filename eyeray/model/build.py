"""Backbones, heads, the two-phase fine-tuning schedule, and concatenation ensembles.

Every model takes RGB uint8 pixels at the task's input size. Its first layer applies the
backbone's own `keras.applications.<module>.preprocess_input`, so training, scoring and serving
cannot disagree about normalisation, and a concatenation ensemble can mix backbones whose
normalisations differ (VGG16 "caffe" vs Xception "tf").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import keras

from eyeray import storage
from eyeray.preflight import SettingError
from eyeray.tasks import TaskSpec

ENSEMBLE_SEPARATOR = "+"
FEATURE_SCALE = "feature_scale"  # the head's first layer: standardises the pooled backbone features


@dataclass(frozen=True)
class Backbone:
    """How to build one feature extractor and how much of it to unfreeze when fine-tuning."""

    build: Callable[..., keras.Model]  # (input_shape, weights) -> headless model with pooled output
    preprocess: str  # module of keras.applications whose preprocess_input applies, or "unit" (x/255)
    min_size: int
    fine_tune_layers: int  # top layers (BatchNorm excluded) unfrozen in phase 2; 0 = all
    imagenet: bool = True  # Keras has ImageNet weights for it (weights="imagenet")


def _application(name: str) -> Callable[..., keras.Model]:
    def build(input_shape: tuple[int, int, int], weights: str | None) -> keras.Model:
        factory = getattr(keras.applications, name)
        return factory(include_top=False, weights=weights, input_shape=input_shape, pooling="avg")

    return build


def _small_cnn(input_shape: tuple[int, int, int], weights: str | None) -> keras.Model:
    """The glaucoma seed's plain CNN baseline: four conv blocks, trained from scratch."""
    if weights == "imagenet":
        raise _no_imagenet("small_cnn")
    inputs = keras.Input(input_shape)
    x = inputs
    for filters in (32, 64, 128, 128):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        # momentum 0.6: short runs take few steps, and 0.99 (or 0.9) leaves the inference statistics
        # at their initial values (training accuracy 1.0, inference at chance).
        x = keras.layers.BatchNormalization(momentum=0.6)(x)
        x = keras.layers.Activation("relu")(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, x, name="small_cnn")


BACKBONES: dict[str, Backbone] = {
    "vgg16": Backbone(_application("VGG16"), "vgg16", 32, fine_tune_layers=4),  # block5
    "xception": Backbone(_application("Xception"), "xception", 71, fine_tune_layers=30),  # blocks 13-14
    "inception_resnet_v2": Backbone(_application("InceptionResNetV2"), "inception_resnet_v2", 75, fine_tune_layers=40),
    "mobilenet_v2": Backbone(_application("MobileNetV2"), "mobilenet_v2", 32, fine_tune_layers=30),
    "small_cnn": Backbone(_small_cnn, "unit", 16, fine_tune_layers=0, imagenet=False),  # 4 poolings: 16 -> 1
}


def backbone_names(backbone: str) -> list[str]:
    """`"xception+inception_resnet_v2"` -> both names, checked against the registry."""
    names = [n.strip().lower() for n in backbone.split(ENSEMBLE_SEPARATOR) if n.strip()]
    unknown = [n for n in names if n not in BACKBONES]
    if unknown or not names:
        raise ValueError(
            f"unknown backbone {backbone!r}; choose from {', '.join(BACKBONES)} "
            f"or join several with '{ENSEMBLE_SEPARATOR}' for a concatenation ensemble"
        )
    return names


def _no_imagenet(name: str) -> SettingError:
    return SettingError(
        f"--weights imagenet: {name} has no ImageNet weights; use --weights none (train from scratch) or --weights PATH"
    )


def check_backbone(spec: TaskSpec, backbone: str, image_size: int, weights: str | None) -> list[str]:
    """--backbone known, --image-size at least each backbone's minimum (BACKBONES' min_size),
    --weights possible for it; returns the backbone names. The one check of these settings, for
    eyeray.train.preflight and for `build_model`'s callers that did not preflight; each failure
    is a one-line SettingError (a ValueError) that names the flag."""
    try:
        names = backbone_names(backbone)
    except ValueError as exc:
        raise SettingError(f"--backbone: {exc}") from exc
    too_small = [n for n in names if image_size < BACKBONES[n].min_size]
    if too_small:
        worst = max(too_small, key=lambda n: BACKBONES[n].min_size)
        need = BACKBONES[worst].min_size
        which = worst if len(names) == 1 else f"{backbone} ({worst})"
        fix = (
            f"--image-size {spec.image_size} (the task's default)"
            if spec.image_size >= need
            else f"--image-size {need} or more"
        )
        raise SettingError(
            f"--image-size {image_size} is too small for {which} (needs at least {need}); "
            f"use {fix} or another --backbone"
        )
    keras_weights, weights_file = resolve_weights(weights)
    scratch = [n for n in names if not BACKBONES[n].imagenet]
    if keras_weights == "imagenet" and scratch:
        raise _no_imagenet(scratch[0])
    if weights_file and len(names) > 1:
        raise SettingError(
            f"--weights {weights_file} loads one backbone, not the ensemble {backbone}; "
            "use --weights imagenet or none, or one --backbone"
        )
    return names


@keras.saving.register_keras_serializable(package="eyeray")
class BackbonePreprocess(keras.layers.Layer):
    """uint8 RGB -> what the backbone was trained on, via the backbone's own preprocess_input."""

    def __init__(self, preprocess: str, **kwargs):
        super().__init__(**kwargs)
        self.preprocess = preprocess

    def call(self, inputs):
        x = keras.ops.cast(inputs, "float32")
        if self.preprocess == "unit":
            return x / 255.0
        module = getattr(keras.applications, self.preprocess)
        return module.preprocess_input(x)

    def get_config(self):
        return {**super().get_config(), "preprocess": self.preprocess}


@keras.saving.register_keras_serializable(package="eyeray")
class FeatureStandardize(keras.layers.Layer):
    """(features - mean) / std per unit, with mean and std fitted on the training images before
    the head trains (`set_statistics`, see eyeray.train.distributed.DistributedFitter.fit_feature_scale).

    Why: pooled features of pretrained backbones come in any scale (a real VGG16 at 160 px: mean 7.5,
    std 19, max 333 per unit; a random one: 0.17 / 0.17 / 0.86). Unscaled, a freshly initialised
    head starts with saturated softmax outputs (first-epoch loss 16-19 instead of ln 4) and dropout
    on such inputs makes every training step a different, saturated guess (training accuracy at
    chance). Standardised, the head starts near uniform outputs whatever the weights. Identity
    until fitted (models trained from scratch keep it that way).
    """

    def build(self, input_shape):
        units = (int(input_shape[-1]),)
        self.mean = self.add_weight(shape=units, initializer="zeros", trainable=False, name="mean")
        self.std = self.add_weight(shape=units, initializer="ones", trainable=False, name="std")

    def call(self, inputs):
        return (keras.ops.cast(inputs, "float32") - self.mean) / self.std

    def set_statistics(self, mean, std) -> None:
        self.mean.assign(mean)
        self.std.assign(std)


def resolve_weights(weights: str | None) -> tuple[str | None, str | None]:
    """`--weights` value -> (keras `weights=` argument, local weights file to load afterwards)."""
    if weights is None or str(weights).lower() in ("none", ""):
        return None, None
    if str(weights).lower() == "imagenet":
        return "imagenet", None
    return None, str(weights)


def build_model(
    spec: TaskSpec,
    backbone: str | None = None,
    *,
    weights: str | None = "imagenet",
    image_size: int | None = None,
    dropout: float = 0.3,
    dense_units: int = 256,
) -> keras.Model:
    """A backbone (or several, concatenated) + a dense/dropout head with the task's activation.

    `weights`: "imagenet" (downloads Keras' weights), None / "none", or a path / `s3://` URI of a
    weights file saved from the same backbone (`backbone.save_weights`), for air-gapped sites.
    Settings it cannot build raise `check_backbone`'s SettingError.
    """
    size = image_size or spec.image_size
    names = check_backbone(spec, backbone or spec.backbone, size, weights)
    keras_weights, weights_file = resolve_weights(weights)

    inputs = keras.Input((size, size, 3), dtype="uint8", name="image")
    features = []
    for name in names:
        info = BACKBONES[name]
        x = BackbonePreprocess(info.preprocess, name=f"preprocess_{name}")(inputs)
        base = _build_backbone(name, info, size, keras_weights)
        base.name = f"backbone_{name}"
        if weights_file:
            local, tmp = storage.local_copy(weights_file)
            base.load_weights(local)
            if tmp is not None:
                tmp.cleanup()
        # Pretrained: training=False keeps BatchNorm statistics frozen, also while fine-tuning
        # (keras-io). From scratch, BatchNorm must learn its statistics.
        pretrained = keras_weights is not None or weights_file is not None
        features.append(base(x, training=False) if pretrained else base(x))
    x = features[0] if len(features) == 1 else keras.layers.Concatenate(name="concat")(features)
    x = FeatureStandardize(name=FEATURE_SCALE)(x)
    x = keras.layers.Dropout(dropout)(x)
    x = keras.layers.Dense(dense_units, activation="relu", name="head_dense")(x)
    x = keras.layers.Dropout(dropout)(x)
    # Small initial logits: the head starts at near-uniform outputs (first loss ~ ln(classes)).
    small = keras.initializers.VarianceScaling(0.01, mode="fan_avg", distribution="uniform")
    outputs = keras.layers.Dense(
        spec.num_classes, activation=spec.activation, dtype="float32", kernel_initializer=small, name="predictions"
    )(x)
    model = keras.Model(inputs, outputs, name=f"{spec.name}_{'_'.join(names)}")
    return model


def _build_backbone(name: str, info: Backbone, size: int, keras_weights: str | None) -> keras.Model:
    try:
        return info.build((size, size, 3), keras_weights)
    except Exception as exc:
        if keras_weights != "imagenet" or isinstance(exc, ValueError):
            raise
        raise RuntimeError(
            f"could not download Keras' ImageNet weights for {name} ({exc}). Without internet access, "
            "pass --weights PATH (a weights file saved where the internet is reachable) or --weights none"
        ) from exc


def pooled_features(model: keras.Model) -> tuple[keras.Model, FeatureStandardize] | None:
    """(uint8 image -> pooled backbone features, the head's standardisation layer), or None for a
    model built before the head had one."""
    try:
        layer = model.get_layer(FEATURE_SCALE)
    except ValueError:
        return None
    return keras.Model(model.input, layer.input, name=f"{model.name}_features"), layer


def with_features(model: keras.Model) -> keras.Model | None:
    """The model with a second output, its pooled backbone features (what the gate reads), from the
    same forward pass; None for a model built before the head had a FeatureStandardize layer."""
    found = pooled_features(model)
    return None if found is None else keras.Model(model.input, [model.output, found[1].input], name=model.name)


def head_model(model: keras.Model) -> keras.Model:
    """Pooled backbone features -> outputs: the model's own head (from its FeatureStandardize layer
    on), the same layer objects and variables, not copies.

    Why: while the backbone is frozen, the head can train on features computed once instead of
    running the backbone on every image every epoch (eyeray.train.features); sharing the layers
    means the full model, checkpointed and exported as usual, holds the head so trained. A
    sub-graph of the model's own graph: no layer is called again, so `pooled_features` still works."""
    layer = model.get_layer(FEATURE_SCALE)
    return keras.Model(layer.input, model.output, name=f"{model.name}_head")


def backbones_of(model: keras.Model) -> list[tuple[str, keras.Model]]:
    prefix = "backbone_"
    return [(layer.name[len(prefix) :], layer) for layer in model.layers if layer.name.startswith(prefix)]


def set_phase(model: keras.Model, phase: str, fine_tune_layers: int | None = None) -> None:
    """Phase "head": backbones frozen. "fine_tune": the top layers unfrozen, BatchNorm kept frozen.

    "full" trains everything (random initialisation, where freezing would freeze noise).
    """
    for name, base in backbones_of(model):
        base.trainable = phase != "head"
        count = BACKBONES[name].fine_tune_layers if fine_tune_layers is None else fine_tune_layers
        layers = [layer for layer in base.layers if layer.weights]
        for i, layer in enumerate(layers):
            top = count == 0 or i >= len(layers) - count
            batchnorm = isinstance(layer, keras.layers.BatchNormalization)
            layer.trainable = phase == "full" or (phase == "fine_tune" and top and not batchnorm)


def phases(pretrained: bool, epochs: int, fine_tune_epochs: int) -> list[tuple[str, int]]:
    """The schedule: pretrained backbones train the head first, then fine-tune the top blocks."""
    if not pretrained:
        return [("full", epochs + fine_tune_epochs)]
    return [(name, n) for name, n in (("head", epochs), ("fine_tune", fine_tune_epochs)) if n > 0]
