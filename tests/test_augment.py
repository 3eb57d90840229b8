"""Training augmentation (eyeray.data.augment): the batched numpy version against its definition.

The rotation + zoom used to be one `PIL.Image.transform` per image; `pil_affine` below keeps that
implementation as the reference the batched resampling must agree with.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from eyeray.data.augment import affine_batch, augment_batch, augmented, scaled
from eyeray.tasks import AugmentSpec

OFF = AugmentSpec(hflip=False, vflip=False, rotation_deg=0.0, zoom=0.0, brightness=0.0, contrast=0.0)


def pil_affine(image: np.ndarray, angle: float, scale: float) -> np.ndarray:
    """The previous per-image implementation: rotate by `angle` and zoom by `scale` about the centre."""
    h, w = image.shape[:2]
    cx, cy = w / 2, h / 2
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    matrix = (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)
    img = Image.fromarray(np.ascontiguousarray(image))
    return np.asarray(img.transform((w, h), Image.AFFINE, matrix, resample=Image.BILINEAR))


def test_images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Half smooth (gradients, a sine pattern: what photographs look like), half noise (the worst case)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([128 + 100 * np.sin(xx / 5.0) * np.cos(yy / 7.0), xx * 255 / w, yy * 255 / h], -1)
    out = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    out[::2] = np.clip(smooth + rng.normal(0, 3, (len(out[::2]), h, w, 3)), 0, 255).astype(np.uint8)
    return out


test_images.__test__ = False  # a helper, not a test


def test_identity_spec_returns_the_input_unchanged():
    images = test_images(4, 20, 30)
    batch = {"image": images, "label": np.eye(4, dtype=np.float32)}
    for spec in (OFF, scaled(AugmentSpec(), 0.0)):
        out = augment_batch(batch, spec)
        np.testing.assert_array_equal(out["image"], images)
        np.testing.assert_array_equal(out["label"], batch["label"])


@pytest.mark.parametrize(
    "spec, mirror",
    [
        (replace(OFF, hflip=True), lambda im: im[:, ::-1]),
        (replace(OFF, vflip=True), lambda im: im[::-1]),
    ],
    ids=["hflip", "vflip"],
)
def test_flip_only_gives_each_image_or_its_mirror(spec, mirror):
    images = test_images(32, 20, 30)
    out = augment_batch({"image": images}, spec, np.random.default_rng(0))["image"]
    flipped = [not np.array_equal(o, im) for o, im in zip(out, images)]
    for o, im, was_flipped in zip(out, images, flipped):
        np.testing.assert_array_equal(o, mirror(im) if was_flipped else im)
    assert 0 < sum(flipped) < len(images)  # an independent coin per image
    np.testing.assert_array_equal(images, test_images(32, 20, 30))  # the input batch is not modified


def test_zero_angle_unit_scale_is_the_identity():
    for h, w in ((32, 32), (23, 37)):
        images = test_images(3, h, w)
        np.testing.assert_array_equal(affine_batch(images, np.zeros(3), np.ones(3)), images)


def test_quarter_turn_matches_rot90_away_from_the_border():
    images = test_images(2, 32, 32)
    turned = affine_batch(images, np.full(2, math.pi / 2), np.ones(2)).astype(int)
    expected = np.rot90(images, k=-1, axes=(1, 2)).astype(int)  # PIL's positive angle: clockwise on screen
    inner = (slice(None), slice(2, -2), slice(2, -2))
    assert np.abs(turned[inner] - expected[inner]).max() <= 1  # cos(pi/2) is 6e-17, not 0: rounding only


@pytest.mark.parametrize("h, w", [(64, 64), (37, 50)])
def test_batched_affine_agrees_with_the_pil_per_image_transform(h, w):
    """Mean absolute difference under 0.75 grey levels: PIL truncates its 8-bit result (about -0.5 on
    average) where the batched version rounds, and positions are quantised to 1/256 px. A pixel whose
    source point lies on the image edge can fall on either side of it: 99.5% are within 2 levels."""
    rng = np.random.default_rng(1)
    images = test_images(8, h, w)
    angle = np.radians(rng.uniform(-30, 30, len(images)))
    scale = rng.uniform(0.7, 1.3, len(images))
    hflip = rng.random(len(images)) < 0.5
    got = affine_batch(images, angle, scale, hflip).astype(int)
    for i, image in enumerate(images):
        reference = pil_affine(image[:, ::-1] if hflip[i] else image, angle[i], scale[i]).astype(int)
        diff = np.abs(got[i] - reference)
        assert diff.mean() < 0.75, (i, diff.mean())
        assert (diff <= 2).mean() > 0.995, (i, (diff <= 2).mean())


def test_randomness_differs_between_images_and_between_calls():
    image = test_images(1, 40, 40)[0]
    batch = {"image": np.stack([image] * 6), "label": np.eye(6, dtype=np.float32)}
    a, b = augment_batch(batch, AugmentSpec()), augment_batch(batch, AugmentSpec())
    assert len({o.tobytes() for o in a["image"]}) == 6  # every image of the batch its own draw
    assert not np.array_equal(a["image"], b["image"])  # fresh randomness each call: each epoch differs
    np.testing.assert_array_equal(a["label"], batch["label"])


@pytest.mark.parametrize("shape", [(5, 40, 30, 3), (1, 17, 17, 3), (0, 8, 8, 3)])
def test_dtype_and_shape_are_kept(shape):
    images = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    strong = AugmentSpec(hflip=True, vflip=True, rotation_deg=40, zoom=0.5, brightness=0.3, contrast=0.5)
    for spec in (AugmentSpec(), strong):
        out = augment_batch({"image": images}, spec)["image"]
        assert out.shape == images.shape and out.dtype == np.uint8


def test_brightness_and_contrast_are_per_image_and_keep_flat_images_flat():
    """Contrast scales about the image's own mean, so a flat image stays flat and only brightness moves it."""
    images = np.stack([np.full((10, 12, 3), v, np.uint8) for v in (40, 128, 200, 128)])
    contrast_only = replace(OFF, contrast=0.5)
    np.testing.assert_array_equal(augment_batch({"image": images}, contrast_only)["image"], images)
    brightness_only = replace(OFF, brightness=0.1)
    out = augment_batch({"image": images}, brightness_only, np.random.default_rng(3))["image"].astype(int)
    shift = out - images
    assert (shift == shift[:, :1, :1, :1]).all()  # one offset per image
    assert np.abs(shift).max() <= round(0.1 * 255) and len(set(shift[:, 0, 0, 0])) > 1


def numbered_batches(n: int, log: dict):
    """n batches whose images (a smooth test image) and labels carry their number; `log` records
    how many were taken and whether the generator was closed."""
    image = test_images(2, 24, 24)[0]
    log.update(taken=0, closed=False)
    try:
        for i in range(n):
            log["taken"] += 1
            yield {"image": np.stack([image] * 3), "label": np.full(3, i), "index": i}
    finally:
        log["closed"] = True


def augment_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "eyeray-augment"]


def test_augmented_in_the_background_keeps_order_and_labels_and_augments_every_batch():
    """--augment-on trainer: the shard's batches, in their order, each augmented once."""
    log: dict = {}
    out = list(augmented(numbered_batches(6, log), AugmentSpec()))
    assert [b["index"] for b in out] == list(range(6))
    original = next(numbered_batches(1, {}))["image"]
    for i, batch in enumerate(out):
        np.testing.assert_array_equal(batch["label"], np.full(3, i))
        assert batch["image"].shape == original.shape and batch["image"].dtype == np.uint8
        assert not np.array_equal(batch["image"], original)
    assert log["closed"] and not augment_threads()
    source = list(numbered_batches(2, {}))
    assert list(augmented(iter(source), None)) == source  # no spec: the batches as they are


def test_augmented_works_ahead_of_the_consumer_but_no_further_than_asked():
    """The thread augments the next batches while the consumer (the training step) works on one,
    holding at most `ahead` ready plus the one it is handing over."""
    log: dict = {}
    batches = augmented(numbered_batches(20, log), AugmentSpec(), ahead=2)
    next(batches)
    deadline = time.monotonic() + 30
    while log["taken"] < 3 and time.monotonic() < deadline:  # taken while the consumer holds batch 0
        time.sleep(0.01)
    time.sleep(0.2)
    assert 3 <= log["taken"] <= 1 + 2 + 1
    batches.close()
    assert log["closed"] and not augment_threads()


def test_a_consumer_that_stops_early_stops_the_thread_and_closes_the_source():
    log: dict = {}
    for batch in augmented(numbered_batches(100, log), AugmentSpec()):
        if batch["index"] == 1:
            break
    assert log["closed"] and log["taken"] < 100 and not augment_threads()


def test_an_error_in_the_thread_is_raised_in_the_consumer_after_the_batches_before_it():
    def source():
        yield {"image": test_images(2, 16, 16)}
        yield {"image": np.zeros((2, 16, 16, 4), np.uint8)}  # not RGB: affine_batch refuses it
        yield {"image": test_images(2, 16, 16)}

    batches = augmented(source(), AugmentSpec())
    assert next(batches)["image"].shape == (2, 16, 16, 3)
    with pytest.raises(ValueError, match="NxHxWx3"):
        next(batches)
    assert not augment_threads()
