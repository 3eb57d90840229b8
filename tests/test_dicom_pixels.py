"""DICOM as hospitals hold it: real public files (pydicom's own test files and pydicom-data) rendered
as a viewer shows them, or refused with a reason, never a wrong picture scored as good."""

from __future__ import annotations

import io
import struct

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.uid import ImplicitVRLittleEndian, JPEGLSLossless

from eyeray.data import imaging
from eyeray.data.imaging import DecodeError


def path(name: str) -> str:
    found = get_testdata_file(name, download=False)  # never the network: bundled or pydicom-data
    assert found, f"{name} is in neither pydicom nor pydicom-data (the test extra installs it)"
    return found


def read(name: str) -> bytes:
    with open(path(name), "rb") as f:
        return f.read()


def window_to_uint8(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR) straight onto 0..255: the standard's formula, not pydicom's."""
    c, w = center - 0.5, width - 1
    out = ((values - c) / w + 0.5) * 255
    out = np.where(values <= c - w / 2, 0, np.where(values > c + w / 2, 255, out))
    return np.round(out)


def first(value) -> float:
    """A window's first value: a file may offer several (bad_sequence.dcm, two)."""
    return float(value[0] if isinstance(value, pydicom.multival.MultiValue) else value)


def min_max(values: np.ndarray) -> np.ndarray:
    lo, hi = values.min(), values.max()
    return np.round((values - lo) * (255 / (hi - lo))) if hi > lo else np.zeros(values.shape)


def reference(ds: pydicom.Dataset, frame: int | None = None) -> np.ndarray:
    """What a viewer shows, from pydicom's own full decode (every frame, YBR to RGB) and the standard's
    order: modality LUT, then VOI LUT or window, then MONOCHROME1's inversion; of a volume, `frame`
    (default: the central one)."""
    arr = ds.pixel_array
    if int(ds.get("NumberOfFrames") or 1) > 1:
        arr = arr[len(arr) // 2 if frame is None else frame]
    photometric = ds.PhotometricInterpretation
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        return rgb >> 8 if rgb.dtype == np.uint16 else rgb
    if not photometric.startswith("MONOCHROME"):  # RGB; YBR, which pydicom returned as RGB
        return arr >> (ds.BitsStored - 8)
    values = apply_modality_lut(arr, ds)
    if "VOILUTSequence" in ds:
        lut = np.asarray(ds.VOILUTSequence[0].LUTData)
        out = np.round((apply_voi_lut(values, ds) - lut.min()) * (255 / (lut.max() - lut.min())))
    elif "WindowCenter" in ds:
        assert ds.get("VOILUTFunction", "LINEAR") == "LINEAR"
        out = window_to_uint8(values, first(ds.WindowCenter), first(ds.WindowWidth))
    else:
        out = min_max(values.astype(np.float64))
    return 255 - out if photometric == "MONOCHROME1" else out


def assert_renders_as_reference(name: str) -> np.ndarray:
    image = imaging.decode(read(name))
    expected = reference(pydicom.dcmread(path(name), force=True))
    if expected.ndim == 2:
        expected = np.repeat(expected[:, :, None], 3, axis=2)
    assert image.shape == expected.shape and image.dtype == np.uint8, name
    np.testing.assert_allclose(image, expected, atol=1, err_msg=name)  # rounding: one grey level
    return image


def saved(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",  # signed 16-bit, rescale, no window
        "693_UNCR.dcm",  # CT: signed 14-bit, rescale -1024, window 40/100
        "MR2_UNCR.dcm",  # MR: rescale slope 3.77, window 1000/2000
        "6154",  # CR: MONOCHROME1, rescale slope 0.684, window 1600/2800
        "RG3_UNCR.dcm",  # radiograph: MONOCHROME1, 10-bit, window
        "MR_small.dcm",  # signed, window 600/1600 wider than the image's values
        "17166",  # CT slice entirely above its window: white
        "4467",  # MR slice entirely inside the lower part of its window: dark, not stretched
        "mlut_18.dcm",  # modality LUT sequence
        "vlut_04.dcm",  # VOI LUT sequence
        "rtdose.dcm",  # 32-bit, 15 frames
        "liver.dcm",  # 1-bit, 3 frames
        "emri_small_big_endian.dcm",  # explicit VR big endian, 10 frames
        "examples_palette.dcm",  # PALETTE COLOR, 16-bit entries
        "OBXXXX1A_rle_2frame.dcm",  # PALETTE COLOR, RLE, 2 frames
        "gdcm-US-ALOKA-16.dcm",  # PALETTE COLOR: 16-bit indices, segmented LUT
        "color-pl.dcm",  # RGB, planar configuration 1
        "ExplVR_BigEnd.dcm",  # RGB, planar configuration 1, big endian
        "SC_rgb_16bit.dcm",  # RGB, 16-bit samples
        "SC_rgb_32bit_2frame.dcm",  # RGB, 32-bit samples, 2 frames
        "SC_ybr_full_uncompressed.dcm",  # YBR_FULL, native
        "SC_ybr_full_422_uncompressed.dcm",  # YBR_FULL_422, native (subsampled)
        "SC_rgb_jpeg_dcmtk.dcm",  # YBR_FULL, JPEG baseline
        "SC_rgb_dcmtk_+eb+cy+s2.dcm",  # YBR_FULL_422, JPEG baseline
        "examples_ybr_color.dcm",  # YBR_FULL_422, JPEG baseline, 30 frames
        "SC_jpeg_no_color_transform.dcm",  # RGB JPEG without the YCbCr transform
        "US1_J2KR.dcm",  # YBR_RCT, JPEG 2000 lossless
        "US1_J2KI.dcm",  # YBR_ICT, JPEG 2000
        "JPEG-LL.dcm",  # JPEG Lossless SV1 (.70), signed 16-bit
        "bad_sequence.dcm",  # JPEG Lossless (.70), rescale, two windows: the first
        "JPGLosslessP14SV1_1s_1f_8b.dcm",  # JPEG Lossless (.70), 8-bit, window
        "JPGExtended.dcm",  # JPEG Extended 12-bit (.51)
        "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless (.80)
        "emri_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless (.80), 10 frames
        "JPEGLSNearLossless_16.dcm",  # JPEG-LS near-lossless (.81)
        "JPEG2000.dcm",  # JPEG 2000 (.91), signed
        "J2K_pixelrep_mismatch.dcm",  # JPEG 2000 whose signedness disagrees with the header
        "MR_small_RLE.dcm",  # RLE lossless
        "image_dfl.dcm",  # deflated explicit VR little endian
    ],
)
def test_real_file_renders_as_a_viewer_shows_it(name):
    assert_renders_as_reference(name)


def test_rescale_comes_before_the_window_and_monochrome1_inverts_after_it():
    ds = pydicom.dcmread(path("693_UNCR.dcm"))  # CT: rescale intercept -1024, window 40/100
    image = assert_renders_as_reference("693_UNCR.dcm")[:, :, 0]
    window_on_stored_values = min_max(apply_voi_lut(ds.pixel_array, ds))  # the old order
    assert np.abs(image - window_on_stored_values).mean() > 50  # 111 grey levels off on average
    ds = pydicom.dcmread(path("6154"))  # CR: MONOCHROME1, rescale, window
    ds.PhotometricInterpretation = "MONOCHROME2"
    np.testing.assert_array_equal(imaging.decode(read("6154")), 255 - imaging.decode(saved(ds)))
    assert (assert_renders_as_reference("17166") == 255).all()  # above its window: white, not black


@pytest.mark.parametrize(
    "compressed, uncompressed",
    [
        ("693_J2KR.dcm", "693_UNCR.dcm"),  # JPEG 2000 lossless, signed CT
        ("RG3_J2KR.dcm", "RG3_UNCR.dcm"),  # JPEG 2000 lossless, MONOCHROME1
        ("US1_J2KR.dcm", "US1_UNCR.dcm"),  # YBR_RCT
        ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),
        ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm"),
        ("emri_small_RLE.dcm", "emri_small.dcm"),
        ("OBXXXX1A_rle.dcm", "OBXXXX1A.dcm"),
        ("SC_rgb_16bit.dcm", "SC_rgb.dcm"),  # 16-bit samples of the same 8-bit picture
        ("SC_rgb_32bit.dcm", "SC_rgb.dcm"),
        ("color-pl.dcm", "color-px.dcm"),  # planar configuration 1 and 0
        ("SC_rgb_dcmtk_+eb+cy+s2.dcm", "SC_rgb_dcmtk_ebcys2_dcmd.dcm"),  # dcmtk's own decompression
        ("SC_rgb_dcmtk_+eb+cy+n1.dcm", "SC_rgb_dcmtk_ebcyn1_dcmd.dcm"),
    ],
)
def test_compressed_file_decodes_as_its_uncompressed_twin(compressed, uncompressed):
    """Independent of pydicom's order: the same picture stored two ways gives the same pixels (dcmtk's
    JPEG decoder rounds YCbCr to RGB its own way, within 2 levels)."""
    a, b = imaging.decode(read(compressed)), imaging.decode(read(uncompressed))
    np.testing.assert_allclose(a, b, atol=2 if "dcmtk" in compressed else 0)


def test_enhanced_multi_frame_uses_the_window_in_its_functional_groups():
    """Enhanced CT keeps rescale and window per frame (here shared), where pydicom's LUT functions
    do not look; ophthalmic tomography is such a file."""
    ds = pydicom.dcmread(path("eCT_Supplemental.dcm"))
    shared = ds.SharedFunctionalGroupsSequence[0]
    rescale, window = shared.PixelValueTransformationSequence[0], shared.FrameVOILUTSequence[0]
    assert "WindowCenter" not in ds and "RescaleSlope" not in ds
    values = ds.pixel_array[1] * float(rescale.RescaleSlope) + float(rescale.RescaleIntercept)
    expected = window_to_uint8(values, float(window.WindowCenter), float(window.WindowWidth))
    image = imaging.decode(read("eCT_Supplemental.dcm"))
    np.testing.assert_allclose(image[:, :, 0], expected, atol=1)
    assert not np.allclose(image[:, :, 0], min_max(values), atol=1)


def test_dicom_without_preamble_is_dicom():
    # A real one: written without preamble, "DICM" or file meta (implicit VR, palette colour).
    data = read("OT-PAL-8-face.dcm")
    assert data[128:132] != b"DICM" and imaging.is_dicom(data)
    ds = pydicom.dcmread(path("OT-PAL-8-face.dcm"), force=True)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian  # how it is stored
    expected = reference(ds)
    np.testing.assert_array_equal(imaging.decode(data), expected)
    assert len(np.unique(expected.reshape(-1, 3), axis=0)) > 50  # colour, not grey index values
    # One stripped here: file meta and dataset without the 128-byte preamble and "DICM".
    stripped = read("CT_small.dcm")[132:]
    assert imaging.is_dicom(stripped) and imaging.dicom_modality(stripped) == "CT"
    np.testing.assert_array_equal(imaging.decode(stripped), assert_renders_as_reference("CT_small.dcm"))


@pytest.mark.parametrize(
    "data",
    [
        np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        b"\x08\x00\x10\x00" + bytes(range(256)) * 4,  # a DICOM-like tag, then no VR or length that fits
        b"this is a text file, not a scan",
    ],
)
def test_other_bytes_are_not_taken_for_preamble_less_dicom(data):
    assert not imaging.is_dicom(data)
    with pytest.raises(DecodeError, match="not an image"):
        imaging.decode(data)


def test_a_tga_that_starts_like_a_dicom_tag_stays_a_tga():
    buf = io.BytesIO()
    Image.new("RGB", (6, 4), (10, 200, 30)).save(buf, format="TGA", id_section=b"8 bytes!")
    assert buf.getvalue()[:4] == b"\x08\x00\x02\x00"  # read as a little-endian tag: (0008,0002)
    assert not imaging.is_dicom(buf.getvalue())
    assert (imaging.decode(buf.getvalue()) == (10, 200, 30)).all()


def test_multi_frame_files_are_checked_per_frame_and_by_frame_count_before_decoding():
    data = read("emri_small.dcm")  # 10 frames of 64 x 64, decoded one at a time
    with pytest.raises(DecodeError, match="image too large: 64x64 = 4096 pixels > limit 4095"):
        imaging.decode(data, max_pixels=64 * 64 - 1)
    assert imaging.decode(data, max_pixels=64 * 64).shape == (64, 64, 3)
    ds = pydicom.dcmread(path("emri_small.dcm"))
    ds.NumberOfFrames = imaging.MAX_FRAMES + 1  # forged: the pixel data holds 10; nothing is decoded
    with pytest.raises(DecodeError, match=f"DICOM with {imaging.MAX_FRAMES + 1} frames: more than eyeray's limit"):
        imaging.decode(saved(ds))


def test_a_volume_decodes_its_central_frame_alone():
    ds = pydicom.dcmread(path("emri_small_jpeg_ls_lossless.dcm"))  # 10 frames: the central one is #5
    frames = list(generate_frames(ds.PixelData, number_of_frames=10))
    frames[0] = bytes(len(frames[0]))  # a frame no decoder reads: decoding every frame would fail
    ds.PixelData = encapsulate(frames)
    np.testing.assert_array_equal(imaging.decode(saved(ds)), imaging.decode(read("emri_small.dcm")))


def test_compressed_stream_larger_than_its_header_is_refused_before_decoding():
    """JPEG decoders allocate what the stream declares: a 64 x 64 file whose JPEG-LS stream says
    60000 x 60000 would ask for 7 GB, past the size limit the DICOM header passed."""
    ds = pydicom.dcmread(path("MR_small_jpeg_ls_lossless.dcm"))
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    sof = frame.index(b"\xff\xf7")  # JPEG-LS start of frame: length, precision, then Y and X
    struct.pack_into(">HH", frame, sof + 5, 60000, 60000)
    ds.PixelData = encapsulate([bytes(frame)])
    reason = imaging.decode_value(saved(ds))[1]
    assert reason == "DICOM frame's compressed stream is 60000x60000, its header 64x64"


@pytest.mark.parametrize(
    "name, reason",
    [
        ("MR_truncated.dcm", "unreadable DICOM: The number of bytes of pixel data is less than expected"),
        ("emri_small_jpeg_2k_lossless_too_short.dcm", "unreadable DICOM: End of file reached"),
        ("badVR.dcm", "DICOM with an invalid NumberOfFrames: '1A'"),
        ("JPEG-lossy.dcm", "unreadable DICOM: Unable to decode"),  # a misplaced JPEG marker
        ("meta_missing_tsyntax.dcm", "DICOM pixel data without Rows"),
    ],
)
def test_odd_real_files_are_refused_with_a_reason(name, reason):
    assert imaging.decode_value(read(name))[1].startswith(reason)


def test_what_eyeray_cannot_render_is_refused_not_guessed(monkeypatch):
    ds = pydicom.dcmread(path("SC_rgb.dcm"))
    ds.PhotometricInterpretation = "HSV"  # a retired colour space
    assert imaging.decode_value(saved(ds))[1] == "unsupported DICOM photometric interpretation HSV"
    ds = pydicom.dcmread(path("CT_small.dcm"))
    ds.FloatPixelData = ds.pixel_array.astype(np.float32).tobytes()
    del ds.PixelData
    assert "float pixel data" in imaging.decode_value(saved(ds))[1]
    decoder = get_decoder(JPEGLSLossless)  # as if the pylibjpeg plugins were not installed
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1")})
    assert imaging.decode_value(read("MR_small_jpeg_ls_lossless.dcm"))[1] == (
        "no decoder for transfer syntax 1.2.840.10008.1.2.4.80 (JPEG-LS Lossless Image Compression); "
        "install pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1"
    )


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "OT-PAL-8-face.dcm"])
def test_identifiers_come_from_the_header_as_pydicom_reads_them(name):
    """The columns a hospital sends a result back with, on real files (one without a preamble)."""
    ds = pydicom.dcmread(path(name), force=True)
    ids = imaging.dicom_identifiers(read(name))
    assert set(ids) == set(imaging.DICOM_IDENTIFIERS)
    keywords = {"patient_id": "PatientID", "study_uid": "StudyInstanceUID", "sop_uid": "SOPInstanceUID"}
    for column, keyword in keywords.items():
        assert ids[column] == str(ds.get(keyword, "") or "").strip(), column
    assert ids["series_uid"] == str(ds.get("SeriesInstanceUID", "") or "") and ids["modality"] == ds.get("Modality", "")

    def text(*keywords: str) -> str:
        return "".join(str(ds.get(k, "") or "").strip() for k in keywords)

    acquired = text("AcquisitionDateTime") or text("AcquisitionDate", "AcquisitionTime")
    assert ids["acquired_at"] == (acquired or text("ContentDate", "ContentTime"))
    assert ids["laterality"] == (text("ImageLaterality") or text("Laterality"))
    assert imaging.dicom_identifiers(b"\x89PNG\r\n\x1a\n" + b"\0" * 64) == imaging.NO_IDENTIFIERS


@pytest.mark.parametrize(
    "name",
    ["emri_small_big_endian.dcm", "emri_small_jpeg_ls_lossless.dcm", "OBXXXX1A_rle_2frame.dcm", "liver.dcm"],
)
def test_every_frame_of_a_real_multi_frame_file_renders_as_a_viewer_shows_it(name):
    """Batch scoring and Serve score a volume frame by frame (`load_frames`): each frame, decoded alone,
    is the frame a viewer shows."""
    ds = pydicom.dcmread(path(name), force=True)
    rows = imaging.load_frames({"path": name, "bytes": read(name)}, 16)
    assert [r["frame"] for r in rows] == list(range(int(ds.NumberOfFrames))) and not any(r["error"] for r in rows)
    opened = imaging.open_dicom(read(name))
    for row in rows:
        expected = reference(ds, row["frame"])
        image = opened.frame(row["frame"])
        expected = np.repeat(expected[:, :, None], 3, axis=2) if expected.ndim == 2 else expected
        np.testing.assert_allclose(image, expected, atol=1, err_msg=f"{name} frame {row['frame']}")


def test_every_file_of_the_public_corpus_gives_rows_with_a_reason_and_never_raises():
    """pydicom's and pydicom-data's files, whatever they hold (SRs, plans, truncated or forged
    headers, JSON, gzip): frame by frame, a row per frame or one error row with its reason."""
    import os
    import warnings

    from pydicom.data import get_testdata_files

    files = [f for f in get_testdata_files("*") if os.path.isfile(f)]
    assert len(files) > 100
    volumes = 0
    for name in files:
        with open(name, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about the odd files' invalid values
            rows = imaging.load_frames({"path": name, "bytes": f.read()}, 16)
        assert rows and all(r["error"] or r["image"].shape == (16, 16, 3) for r in rows), name
        failed = [r for r in rows if r["error"]]
        assert not failed or len(rows) == 1, name  # in this corpus no volume fails part-way
        volumes += rows[0]["frame"] >= 0
    assert volumes >= 20
