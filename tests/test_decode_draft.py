"""Reduced-scale JPEG decode (`imaging.decode(min_side=...)`): what it changes and what it must not.

A decode for a model input of side S may come out of the JPEG decoder at 1/2, 1/4 or 1/8 scale, kept
at >= `imaging.DRAFT_MARGIN` x S a side. These tests hold the result to stated tolerances on the real
samples (pixels after `preprocess`, and a model's probabilities), and check that the file's full size
still rules the records' `height` / `width` and the decompression-bomb limit.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from bundles import make_bundle
from corpus import encode, gradient
from PIL import Image

from eyeray.data import imaging
from eyeray.data.imaging import DecodeError

# Tolerances of preprocess(decode(reduced)) against preprocess(decode(full)), in grey levels (0..255),
# at a size where every real sample is drafted (64: 1/2 scale for the 1024x496 OCT scans and the 256x256
# fundus photos). Measured at DRAFT_MARGIN 2: mean 0.2 (OCT) and 0.3 (fundus), worst pixel 12. The
# worst image (1.2) is the one OCT scan 277 pixels high: a side that is not a multiple of the scale is
# decoded to ceil(side / scale), which stretches the picture by up to one decoded pixel; the 496-high
# Kermany scans (62 x 8) and the 256-wide fundus photos stay under 0.5.
MEAN_DIFF = 0.5  # over every pixel of a sample folder
IMAGE_MEAN_DIFF = 1.5  # the worst single image
MAX_DIFF = 16  # the worst single pixel
# Largest change of any output probability (softmax / sigmoid, 0..1) of the same model on the same file.
# Measured: small_cnn bundles 0.0002 (oct), 0.0004 (glaucoma), 0.0015 (odir); pretrained VGG16 0.005.
PROB_DIFF = 0.02
SIZE = 64


def _jpegs(root: Path, limit: int | None = None) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    return files[:limit]


def _pair(path: Path, size: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """(preprocessed full decode, preprocessed reduced decode, whether the decode was reduced)."""
    data = path.read_bytes()
    full, reduced = imaging.decode(data), imaging.decode(data, min_side=size)
    return imaging.preprocess(full, size), imaging.preprocess(reduced, size), reduced.shape != full.shape


@pytest.mark.parametrize("folder, limit", [("oct_sample", None), ("glaucoma_sample", 60), ("odir_sample", 60)])
def test_reduced_decode_of_real_samples_is_within_pixel_tolerance(folder, limit, request):
    pairs = [_pair(path, SIZE) for path in _jpegs(request.getfixturevalue(folder), limit)]
    assert sum(drafted for _, _, drafted in pairs) >= 0.9 * len(pairs)  # the tolerance is about reduced decodes
    diffs = np.stack([np.abs(full.astype(int) - reduced.astype(int)) for full, reduced, _ in pairs])
    per_image = diffs.reshape(len(diffs), -1).mean(axis=1)
    assert diffs.mean() <= MEAN_DIFF and per_image.max() <= IMAGE_MEAN_DIFF and diffs.max() <= MAX_DIFF, (
        f"mean {diffs.mean():.2f}, worst image {per_image.max():.2f}, worst pixel {diffs.max()}"
    )


def test_no_reduction_where_the_margin_does_not_allow_it(oct_sample, odir_sample):
    """OCT scans are 496 high (2.2x 224) and the fundus samples 256 wide: at 224 and 299 a draft would
    leave less than DRAFT_MARGIN x the input, so the decode is the full one, bit for bit."""
    for path in _jpegs(oct_sample, 3) + _jpegs(odir_sample, 3):
        for size in (224, 299):
            full, reduced, drafted = _pair(path, size)
            assert not drafted and np.array_equal(full, reduced), (path, size)


def _probabilities(model, images: list[np.ndarray]) -> np.ndarray:
    return np.asarray(model.predict(np.stack(images), verbose=0, batch_size=64), np.float64)


@pytest.mark.parametrize(
    "task, folders", [("oct", ("oct_sample",)), ("glaucoma", ("glaucoma_sample",)), ("odir", ("odir_sample",))]
)
def test_same_bundle_gives_the_same_probabilities_on_reduced_decodes(task, folders, request, tmp_path):
    from eyeray.model import bundle

    loaded = bundle.load(make_bundle(tmp_path, task, size=SIZE, seed=3))
    files = [p for f in folders for p in _jpegs(request.getfixturevalue(f), 32)]
    rows = [imaging.load_record({"path": str(p)}, loaded.image_size) for p in files]  # reduced, as every route
    full = [imaging.preprocess(imaging.decode(p.read_bytes()), loaded.image_size) for p in files]
    reduced = [row["image"] for row in rows]
    diff = np.abs(_probabilities(loaded.model, full) - _probabilities(loaded.model, reduced))
    assert diff.max() <= PROB_DIFF, f"largest probability change {diff.max():.4f}"


def test_pretrained_vgg16_gives_the_same_probabilities_on_reduced_decodes(oct_sample, real_vgg16_weights):
    """Real pretrained conv features (HED's VGG16) react to texture as a trained model does. The head
    is a random linear map of the model's last features, scaled so its logits spread (std 2) over the
    full decodes: neither near-uniform (which would hide changes) nor saturated (which would turn a
    tiny change at a decision boundary into a jump)."""
    import keras

    from eyeray.model.build import build_model
    from eyeray.tasks import get_task

    model = build_model(get_task("oct"), "vgg16", weights=real_vgg16_weights, image_size=SIZE)
    features = keras.Model(model.inputs, model.get_layer("predictions").input)
    pairs = [_pair(path, SIZE) for path in _jpegs(oct_sample, 32)]
    full, reduced = (_probabilities(features, [pair[i] for pair in pairs]) for i in (0, 1))
    head = np.random.default_rng(3).normal(0, 1.0, (full.shape[1], 4))
    head *= 2.0 / (full @ head).std()
    diff = np.abs(_softmax(full @ head) - _softmax(reduced @ head))
    assert diff.max() <= PROB_DIFF, f"largest probability change {diff.max():.4f}"


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _jpeg(arr: np.ndarray, orientation: int | None = None, **kwargs) -> bytes:
    img = Image.fromarray(arr)
    if orientation is not None:
        exif = img.getexif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kwargs)
    return buf.getvalue()


def test_records_report_the_files_full_size_with_exif_orientation(tmp_path):
    data = _jpeg(gradient(400, 1000), orientation=6)  # stored 1000 wide, shown 400 wide (rotated 90)
    reduced = imaging.decode(data, min_side=32)
    assert reduced.shape == (250, 100, 3)  # 1/4 scale (100 >= 2 x 32), turned as shown
    assert imaging.decode(data).shape == (1000, 400, 3)
    (tmp_path / "a.jpg").write_bytes(data)
    for record in ({"path": str(tmp_path / "a.jpg")}, {"path": "upload", "bytes": data}):
        row = imaging.load_record(record, 16, extra_sizes=(32,))
        assert (row["height"], row["width"], row["error"]) == (1000, 400, "")
        np.testing.assert_array_equal(row["image_32"], imaging.preprocess(reduced, 32))  # decoded for the largest


def test_bomb_limit_applies_to_the_full_size_not_the_drafted_one():
    data = _jpeg(gradient(800, 1000))  # 800 000 pixels; drafted for 32: 125 x 100
    assert imaging.decode(data, min_side=32).shape == (100, 125, 3)
    with pytest.raises(DecodeError, match="too large: 1000x800"):
        imaging.decode(data, max_pixels=500_000, min_side=32)
    row = imaging.load_record({"path": "upload", "bytes": data}, 32, max_pixels=500_000)
    assert row["error"].startswith("image too large") and (row["height"], row["width"]) == (0, 0)


def test_greyscale_jpeg_drafts_and_stays_grey():
    grey = gradient(496, 1024)[:, :, 0]
    out = imaging.decode(_jpeg(grey), min_side=64)
    assert out.shape == (248, 512, 3) and np.array_equal(out[..., 0], out[..., 2])
    full = imaging.preprocess(imaging.decode(_jpeg(grey)), 64).astype(int)
    assert np.abs(imaging.preprocess(out, 64).astype(int) - full).max() <= 2  # a smooth ramp: nearly exact


def test_only_jpeg_is_drafted_and_none_means_full_size():
    arr = gradient(400, 600)
    for fmt in ("PNG", "TIFF", "BMP"):
        np.testing.assert_array_equal(imaging.decode(encode(arr, fmt), min_side=16), arr)
    assert imaging.decode(_jpeg(arr), min_side=16).shape == (50, 75, 3)
    assert imaging.decode(_jpeg(arr), min_side=None).shape == (400, 600, 3)
    assert imaging.decode(_jpeg(arr), min_side=100).shape == (200, 300, 3)  # 200 >= 2 x 100: 1/2
    assert imaging.decode(_jpeg(arr), min_side=101).shape == (400, 600, 3)  # 200 < 2 x 101: no room
    with pytest.raises(ValueError, match="min_side"):
        imaging.decode(_jpeg(arr), min_side=0)


def test_thumbnails_keep_their_size(oct_sample):
    path = _jpegs(oct_sample, 1)[0]  # 1024 x 496
    thumb, reason = imaging.read_thumbnail(str(path), 64)
    expected = Image.fromarray(imaging.decode(path.read_bytes()))
    expected.thumbnail((64, 64))
    assert reason == "" and thumb.shape[:2] == (expected.height, expected.width)
    assert np.abs(thumb.astype(int) - np.asarray(expected).astype(int)).mean() <= IMAGE_MEAN_DIFF


def test_served_predictions_decode_reduced_and_overlays_full(oct_sample):
    from eyeray.serve.inputs import decode_upload

    data = _jpegs(oct_sample, 1)[0].read_bytes()
    manifest = {
        "preprocessing": {
            "max_pixels": imaging.DEFAULT_MAX_PIXELS,
            "resize": {"size": [SIZE, SIZE], "method": "bilinear"},
        }
    }
    original, full_input, full_size = decode_upload(data, manifest, imaging.DEFAULT_MAX_PIXELS)
    small, reduced_input, reduced_size = decode_upload(data, manifest, imaging.DEFAULT_MAX_PIXELS, overlay=False)
    assert original.shape == (496, 1024, 3) and small.shape == (248, 512, 3)
    assert full_size == reduced_size == (496, 1024)  # the file's own size (the gate's size check), not the draft's
    assert np.abs(full_input.astype(int) - reduced_input.astype(int)).mean() <= IMAGE_MEAN_DIFF
