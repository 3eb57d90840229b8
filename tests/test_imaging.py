"""The one decode and preprocess: formats, bit depths, bad input as values, the real samples."""

from __future__ import annotations

import io

import numpy as np
import pytest
from corpus import encode, gradient, make_dicom
from PIL import Image

from eyeray.data import imaging
from eyeray.data.imaging import DecodeError


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_lossless_formats_roundtrip_exactly(fmt):
    arr = gradient()
    out = imaging.decode(encode(arr, fmt))
    assert out.dtype == np.uint8 and out.shape == (40, 60, 3)
    np.testing.assert_array_equal(out, arr)


def test_jpeg_decodes_close_to_source():
    arr = gradient()
    out = imaging.decode(encode(arr, "JPEG", quality=95))
    assert out.shape == arr.shape
    assert np.abs(out.astype(int) - arr.astype(int)).mean() < 3


def test_greyscale_is_replicated_to_three_channels():
    grey = gradient()[:, :, 0]
    out = imaging.decode(encode(grey, "PNG"))
    assert out.shape == (40, 60, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], grey)


def test_16bit_is_scaled_to_full_8bit_range():
    arr16 = np.arange(40 * 60, dtype=np.uint16).reshape(40, 60) * 3 + 1000  # 12-bit-ish values
    buf = io.BytesIO()
    Image.fromarray(arr16).save(buf, format="PNG")
    out = imaging.decode(buf.getvalue())
    assert out.shape == (40, 60, 3)
    assert out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out[:, :, 0].ravel().astype(int)) >= 0)  # order preserved


def test_rgba_and_palette_become_rgb():
    rgba = np.dstack([gradient(), np.full((40, 60), 200, np.uint8)])
    assert imaging.decode(encode(rgba, "PNG")).shape == (40, 60, 3)
    pal = Image.fromarray(gradient()).convert("P")
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    assert imaging.decode(buf.getvalue()).shape == (40, 60, 3)


def test_exif_orientation_is_applied():
    arr = gradient(20, 50)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW when shown
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    assert imaging.decode(buf.getvalue()).shape == (50, 20, 3)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"this is a text file, not a scan", "not an image"),
        (np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(), "not an image"),
    ],
)
def test_bad_bytes_raise_decode_error_with_reason(data, reason):
    with pytest.raises(DecodeError, match=reason):
        imaging.decode(data)


def test_truncated_jpeg_is_a_decode_error():
    data = encode(gradient(200, 200), "JPEG")
    with pytest.raises(DecodeError, match="corrupt"):
        imaging.decode(data[: len(data) // 2])


def test_decompression_bomb_is_refused_before_decoding():
    # A 1-bit PNG of 20000 x 20000 is tiny on disk but 400 M pixels once decoded.
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 200_000
    with pytest.raises(DecodeError, match="too large"):
        imaging.decode(buf.getvalue())
    with pytest.raises(DecodeError, match="too large"):
        imaging.decode(encode(gradient(), "PNG"), max_pixels=100)


def test_dicom_monochrome_is_scaled_and_monochrome1_inverted():
    pixels = np.tile(np.linspace(0, 4095, 32), (16, 1))
    data = make_dicom(pixels)
    assert imaging.is_dicom(data)
    out = imaging.decode(data)
    assert out.shape == (16, 32, 3)
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255
    inverted = imaging.decode(make_dicom(pixels, "MONOCHROME1"))
    assert inverted[0, 0, 0] == 255 and inverted[0, -1, 0] == 0


def test_dicom_window_is_applied():
    pixels = np.tile(np.linspace(0, 4095, 64), (8, 1))
    out = imaging.decode(make_dicom(pixels, window=(1000, 400)))  # only 800..1200 is shown
    row = out[0, :, 0]
    assert row[pixels[0] < 780].max() == 0 and row[pixels[0] > 1220].min() == 255


def test_truncated_dicom_is_a_decode_error():
    data = make_dicom(np.ones((16, 16)) * 100)
    with pytest.raises(DecodeError, match="DICOM"):
        imaging.decode(data[:-200])


def test_preprocess_resizes_to_square_uint8():
    out = imaging.preprocess(gradient(496, 1024), 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    same = gradient(64, 64)
    assert imaging.preprocess(same, 64) is same


def test_load_batch_turns_errors_into_rows(tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(encode(gradient(), "PNG"))
    bad = tmp_path / "bad.jpeg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    batch = {
        "path": np.array([str(good), str(bad), str(tmp_path / "missing.png")], dtype=object),
        "label": np.eye(3, dtype=np.float32),
    }
    out = imaging.load_batch(batch, size=32)
    assert out["image"].shape == (3, 32, 32, 3)
    assert list(out["error"][:1]) == [""]
    assert out["error"][1] and out["error"][2].startswith("unreadable file")
    assert list(out["width"]) == [60, 0, 0] and list(out["height"]) == [40, 0, 0]
    np.testing.assert_array_equal(out["label"], batch["label"])  # other keys pass through
    assert list(out["path"]) == list(batch["path"])


def test_every_real_sample_decodes(oct_sample, glaucoma_sample, odir_sample):
    files = [
        p
        for root in (oct_sample, glaucoma_sample, odir_sample)
        for p in root.rglob("*")
        if p.suffix.lower() in (".jpg", ".jpeg")
    ]
    assert len(files) == 101 + 144 + 280
    for path in files:
        image = imaging.decode(path.read_bytes())
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8, path
    kermany = imaging.decode(next(oct_sample.glob("CNV/*.jpeg")).read_bytes())
    assert kermany.shape[0] == 496 and kermany.shape[1] in (512, 768, 1024, 1536)
    assert np.array_equal(kermany[..., 0], kermany[..., 1])  # greyscale OCT replicated


def test_dicom_without_pixels_and_multi_frame_tiff():
    with pytest.raises(DecodeError, match="without pixel data"):
        imaging.decode(make_dicom(None))
    frames = [Image.fromarray(np.full((8, 10), v, np.uint8)) for v in (10, 128, 250)]
    buf = io.BytesIO()
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:])
    assert (imaging.decode(buf.getvalue()) == 128).all()  # the central frame, as for DICOM volumes


def test_extra_sizes_come_from_one_decode(tmp_path):
    (tmp_path / "a.png").write_bytes(encode(gradient(), "PNG"))
    row = imaging.load_record({"path": str(tmp_path / "a.png")}, 16, extra_sizes=(24,))
    assert row["image"].shape == (16, 16, 3) and row["image_24"].shape == (24, 24, 3)
    np.testing.assert_array_equal(row["image_24"], imaging.preprocess(imaging.decode(encode(gradient(), "PNG")), 24))
    bad = imaging.load_record({"path": str(tmp_path / "missing.png")}, 16, extra_sizes=(24,))
    assert bad["error"].startswith("unreadable file") and bad["image_24"].shape == (24, 24, 3)


def tiff_with_a_page_without_dimensions() -> bytes:
    """A real odd file: a two-page TIFF whose second page has no ImageWidth tag. Pillow raises
    TypeError("Missing dimensions") while counting the pages, not one of its decode errors."""
    import struct

    frames = [Image.fromarray(np.full((8, 10), v, np.uint8)) for v in (10, 250)]
    buf = io.BytesIO()
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:])
    data = bytearray(buf.getvalue())
    first = struct.unpack_from("<I", data, 4)[0]  # little-endian ("II"): IFD offsets, 12-byte entries
    second = struct.unpack_from("<I", data, first + 2 + 12 * struct.unpack_from("<H", data, first)[0])[0]
    for i in range(struct.unpack_from("<H", data, second)[0]):
        entry = second + 2 + 12 * i
        if struct.unpack_from("<H", data, entry)[0] == 256:  # ImageWidth -> a private tag
            struct.pack_into("<H", data, entry, 0x8000)
    return bytes(data)


def test_decode_value_turns_every_failure_into_a_reason(tmp_path):
    odd = tiff_with_a_page_without_dimensions()
    with pytest.raises(TypeError):  # not a DecodeError: what reached serving as a 500 before
        imaging.decode(odd)
    assert imaging.decode_value(odd) == (None, "undecodable file: TypeError: Missing dimensions")
    assert imaging.decode_value(b"not a scan") == (None, "not an image (unrecognised format)")
    image, reason = imaging.decode_value(encode(gradient(), "PNG"))
    assert reason == "" and image.shape == (40, 60, 3)
    (tmp_path / "odd.tif").write_bytes(odd)  # batch rows carry the same reason
    row = imaging.load_record({"path": str(tmp_path / "odd.tif")}, 16)
    assert row["error"] == imaging.decode_value(odd)[1] and row["image"].shape == (16, 16, 3)


def test_preprocess_applies_the_named_resize_method():
    checker = (np.indices((4, 4)).sum(axis=0) % 2 * 255).astype(np.uint8)
    image = np.repeat(checker[:, :, None], 3, axis=2)  # 4x4 black and white squares
    nearest = imaging.preprocess(image, 8, "nearest")
    np.testing.assert_array_equal(nearest, np.repeat(np.repeat(image, 2, axis=0), 2, axis=1))
    bilinear = imaging.preprocess(image, 8)  # the default: what training applies
    assert set(np.unique(bilinear)) - {0, 255}  # blends neighbours, nearest never does
    np.testing.assert_array_equal(bilinear, imaging.preprocess(image, 8, "bilinear"))
    assert not np.array_equal(imaging.preprocess(image, 8, "bicubic"), bilinear)
    with pytest.raises(ValueError, match="unknown resize method 'fancy'; one of nearest, bilinear"):
        imaging.preprocess(image, 8, "fancy")


def test_load_batch_resizes_with_the_given_method(tmp_path):
    (tmp_path / "a.png").write_bytes(encode(gradient(), "PNG"))
    batch = {"path": np.array([str(tmp_path / "a.png")], dtype=object)}
    out = imaging.load_batch(batch, 16, extra_sizes=(24,), method="nearest")
    decoded = imaging.decode(encode(gradient(), "PNG"))
    np.testing.assert_array_equal(out["image"][0], imaging.preprocess(decoded, 16, "nearest"))
    np.testing.assert_array_equal(out["image_24"][0], imaging.preprocess(decoded, 24, "nearest"))
    assert not np.array_equal(out["image"][0], imaging.preprocess(decoded, 16))
