"""The one decode and the one preprocess, shared by training, batch scoring and serving.

`decode` turns file bytes into an RGB uint8 array; `preprocess` resizes it to the model's input
size with the bundle manifest's resize method (`RESIZE_METHODS`). A caller that only needs the
image at a model's input size says so (`min_side`): a large JPEG is then decoded at 1/2, 1/4 or 1/8
scale by the JPEG decoder itself (`DRAFT_MARGIN` says how far), several times cheaper than a full
decode followed by a large downscale. `decode_value` is the one place a
decode failure becomes a reason instead of an exception: batch rows (`load_record`) and served
uploads (a 422) get the same text.

The backbone's own `preprocess_input` (ImageNet mean/scale) is the first layer of every model
(see `eyeray.model.build.BackbonePreprocess`), so pipelines ship compact uint8 pixels and a
bundle cannot be fed pixels normalised the wrong way.

Records are MONAI-style dicts (`path`, `image`, `label`, `error`, ...): functions copy them, fill
their own keys and pass the rest through. A file that cannot be decoded sets `error` instead of
raising, so one bad file never fails a batch.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

# About 8000 x 8000: far above fundus cameras (~12 MP) and OCT B-scans, far below what a
# crafted "decompression bomb" file asks the decoder to allocate.
DEFAULT_MAX_PIXELS = 64_000_000
# Frames per DICOM file, checked before any is decoded: well above the B-scan count of OCT cube
# scans (tens to a few hundred), far below what a forged NumberOfFrames would have eyeray decode.
# Each frame is held to `max_pixels` on its own: frames are decoded one at a time.
MAX_FRAMES = 2048
DICOM_MAGIC_OFFSET = 128
# Resize methods a manifest may name (`preprocessing.resize.method`) -> PIL resample filters.
RESIZE_METHODS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
DEFAULT_RESIZE = "bilinear"  # what training uses, as the seeds did
Reader = Callable[[str], bytes]  # a file's bytes by its URI, where storage cannot read it (a PACS)
# A JPEG decoded for a model input of side S is drafted (DCT-scaled by 1/2, 1/4 or 1/8) only as far as
# keeps both its sides >= DRAFT_MARGIN * S, so `preprocess` still downsamples by >= 2x. Measured on the
# real samples (bench/decode_speed.py; tests/test_decode_draft.py): at 2x, preprocess(reduced) is within
# 0.3 grey levels on average (max 10) of preprocess(full); letting the draft come down to ~1.1x the
# input instead (margin 1) triples the mean difference to ~1 and lets single pixels move by 30-40
# levels, as the last resize then interpolates rather than averages. 2x is also Pillow's own default
# for the same trade-off (`Image.thumbnail(reducing_gap=2.0)`).
DRAFT_MARGIN = 2.0
# JPEG start-of-frame markers (SOF0-15 less DHT, JPG and DAC; JPEG-LS's SOF55): they carry the image size.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
# EXIF orientations that swap width and height (transpose, rotate 90 / 270, transverse).
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


class DecodeError(ValueError):
    """The bytes are not an image eyeray can use; the message is the reason shown to users."""


def is_dicom(data: bytes) -> bool:
    """A DICOM file ("DICM" after the 128-byte preamble) or a bare dataset written without them."""
    return _has_magic(data) or _looks_like_dataset(data)


def _has_magic(data: bytes) -> bool:
    return data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == b"DICM"


def _looks_like_dataset(data: bytes) -> bool:
    """A DICOM dataset without preamble and "DICM" (older files, some PACS exports) starts with a
    little-endian (0002,00xx) file meta or (0008,00xx) identification element, then either an
    explicit VR (two capital letters) or an implicit VR's short, even, non-zero length (a TGA with
    an 8-byte ID has zeros there). Tight enough that no other format or random bytes pass, which
    pydicom's `force=True` alone would read as DICOM."""
    if len(data) < 8:
        return False
    group, element, length = struct.unpack_from("<HHI", data)
    if group not in (0x0002, 0x0008) or element > 0x00FF:
        return False
    vr = data[4:6]
    return (vr.isalpha() and vr.isupper()) or (0 < length <= 1024 and length % 2 == 0)


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None) -> np.ndarray:
    """Bytes (JPEG, PNG, TIFF, BMP or DICOM) -> HxWx3 uint8 RGB array.

    Greyscale, 16-bit and float images are scaled into 0..255 and replicated to three channels.

    `min_side`: the largest model input side the caller will `preprocess` to. A JPEG larger than
    `DRAFT_MARGIN` x that on both sides is then decoded at a reduced scale (the returned array is
    smaller than the file's image, never below that margin); every other format, and None (the
    default: callers that show or overlay the original), decode at full size. The `max_pixels`
    limit always applies to the file's full size.
    """
    return _decode(data, max_pixels, min_side)[0]


def _decode(data: bytes, max_pixels: int, min_side: int | None) -> tuple[np.ndarray, tuple[int, int]]:
    """`decode`, plus the image's full (height, width) as shown (EXIF orientation applied), which a
    reduced decode no longer has: records report the file's size, not the decoded one."""
    if not data:
        raise DecodeError("empty file")
    if is_dicom(data):
        arr = _decode_dicom(data, max_pixels)
        return arr, (arr.shape[0], arr.shape[1])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            _check_size(img.size, max_pixels)  # the full size: a draft must not let a bomb through
            if getattr(img, "n_frames", 1) > 1:  # a volume (multi-page TIFF): its central frame, as for DICOM
                img.seek(img.n_frames // 2)
            width, height = img.size
            if img.getexif().get(ExifTags.Base.Orientation) in _SWAPPING_ORIENTATIONS:
                width, height = height, width
            _draft(img, min_side)
            img = ImageOps.exif_transpose(img)  # camera orientation, as a viewer shows it
            img.load()
    except DecodeError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(_reason(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt data
        raise DecodeError(f"corrupt image: {exc}") from None
    return _to_rgb(img), (height, width)


def _draft(img: Image.Image, min_side: int | None) -> None:
    """Ask the JPEG decoder for the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides at least
    `DRAFT_MARGIN * min_side`. Only baseline/progressive JPEG in RGB or L: `draft` is a no-op for other
    formats, and for RGB it must not be asked for a mode change (it would turn colour into grey)."""
    if min_side is None or img.format != "JPEG" or img.mode not in ("RGB", "L"):
        return
    if min_side < 1:
        raise ValueError(f"min_side must be >= 1, not {min_side}")
    need = math.ceil(min_side * DRAFT_MARGIN)  # square: the same whichever way EXIF turns the image
    img.draft(img.mode, (need, need))


def _reason(exc: Exception) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not an image (unrecognised format)"
    return f"image too large (decompression bomb limit): {exc}"


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w * h > max_pixels:
        raise DecodeError(f"image too large: {w}x{h} = {w * h} pixels > limit {max_pixels}")
    if w < 1 or h < 1:
        raise DecodeError(f"image has no pixels: {w}x{h}")


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("RGB", "L"):
        arr = np.asarray(img)
    elif img.mode in ("RGBA", "LA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1"):
        arr = np.asarray(img.convert("RGB"))
    else:  # "I;16", "I", "F": more than 8 bits per sample
        arr = scale_to_uint8(np.asarray(img))
    return gray_to_rgb(arr)


def scale_to_uint8(arr: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Scale a high-bit-depth image into 0..255 (12/16-bit OCT and DICOM): `value_range` (lo, hi)
    onto 0..255, or by default its own min-max."""
    arr = arr.astype(np.float64)
    lo, hi = value_range or (float(np.nanmin(arr)), float(np.nanmax(arr)))
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def gray_to_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DecodeError(f"unsupported pixel layout {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.uint8)


@dataclass
class DicomImage:
    """A DICOM file opened for its pixels: the dataset, its decoder and how many frames it holds.
    Frames are decoded one at a time (`frame`), so a volume never needs all of them in memory."""

    dataset: Any
    decoder: Any
    options: dict[str, Any]
    frames: int

    def frame(self, index: int) -> np.ndarray:
        """Frame `index` (0-based) as a viewer shows it (`_render_dicom`), RGB uint8."""
        from pydicom.encaps import get_frame

        ds, rows, columns = self.dataset, int(self.dataset.Rows), int(self.dataset.Columns)
        try:
            if self.decoder.UID.is_encapsulated:
                offsets = self.options.get("extended_offsets")
                stream = get_frame(ds.PixelData, index, extended_offsets=offsets, number_of_frames=self.frames)
                _check_stream_size(stream, rows, columns)
            arr, decoded = self.decoder.as_array(ds, index=index, **self.options)
            return gray_to_rgb(_render_dicom(arr, ds, str(decoded["photometric_interpretation"]), index))
        except DecodeError:
            raise
        except Exception as exc:  # a corrupt stream, a plugin's failure, a malformed LUT
            raise DecodeError(f"unreadable DICOM: {exc}") from None


def open_dicom(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> DicomImage:
    """Read a DICOM file's header and find its decoder; every frame's size and the number of frames
    are checked here, before any pixel is decoded. A file eyeray cannot render faithfully is a
    `DecodeError` with the reason, never a wrong picture."""
    try:
        from pydicom import pixels
    except ImportError:  # pragma: no cover - pydicom is a core dependency
        raise DecodeError("DICOM support needs pydicom") from None
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            ds = _read_dicom(data)
    except Exception as exc:  # pydicom raises many types for bad or unsupported files
        raise DecodeError(f"unreadable DICOM: {exc}") from None
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        if warned:  # a truncated file reads as a dataset without its last elements, and a warning
            raise DecodeError(f"unreadable DICOM: {warned[-1].message}")
        raise DecodeError("DICOM without pixel data (a report, structured document or key object)")
    if "PixelData" not in ds:
        raise DecodeError("DICOM float pixel data (a parametric map) is not supported")
    rows, columns = _header_int(ds, "Rows"), _header_int(ds, "Columns")
    frames = _header_int(ds, "NumberOfFrames", 1) or 1  # pydicom reads 0 and empty as one frame too
    _check_size((columns, rows), max_pixels)  # one frame: frames are decoded one at a time
    if frames > MAX_FRAMES:
        raise DecodeError(f"DICOM with {frames} frames: more than eyeray's limit of {MAX_FRAMES} per file")
    uid = _transfer_syntax(ds)
    try:
        decoder = pixels.get_decoder(uid)
    except NotImplementedError:
        raise DecodeError(f"no decoder for transfer syntax {uid} ({uid.name}) in pydicom") from None
    if not decoder.is_available:
        needs = "; or ".join(decoder.missing_dependencies)
        raise DecodeError(f"no decoder for transfer syntax {uid} ({uid.name}); install {needs}")
    try:
        options = pixels.as_pixel_options(ds, number_of_frames=frames)
    except Exception as exc:
        raise DecodeError(f"unreadable DICOM: {exc}") from None
    return DicomImage(ds, decoder, options, frames)


def _decode_dicom(data: bytes, max_pixels: int) -> np.ndarray:
    """A DICOM file's one image; a volume's central frame, decoded alone (`iter_frames` gives every frame)."""
    image = open_dicom(data, max_pixels)
    return image.frame(image.frames // 2)


def _check_stream_size(frame: bytes, rows: int, columns: int) -> None:
    """A JPEG, JPEG-LS or JPEG 2000 decoder allocates what the frame's own header declares, whatever
    the DICOM header (which `_check_size` checked) says; they must agree, or a small file is a
    decompression bomb. RLE and other streams are decoded into the DICOM header's size."""
    size = None
    if frame[:2] == b"\xff\xd8":  # JPEG and JPEG-LS: walk the marker segments to the start of frame
        i = 2
        while size is None and i + 9 <= len(frame) and frame[i] == 0xFF:
            if frame[i + 1] in _JPEG_SOF:
                size = struct.unpack_from(">HH", frame, i + 5)  # Y, X
            i += 1 if frame[i + 1] == 0xFF else 2 + struct.unpack_from(">H", frame, i + 2)[0]
    elif (at := frame.find(b"\xff\x4f\xff\x51")) >= 0 and at + 24 <= len(frame):  # JPEG 2000: SOC, SIZ
        width, height, x0, y0 = struct.unpack_from(">IIII", frame, at + 8)
        size = (height - y0, width - x0)
    if size is not None and tuple(size) != (rows, columns):
        raise DecodeError(f"DICOM frame's compressed stream is {size[1]}x{size[0]}, its header {columns}x{rows}")


def _read_dicom(data: bytes, **kwargs: Any) -> Any:
    """`pydicom.dcmread`; `force` only for a dataset without the preamble and "DICM" (`is_dicom`)."""
    import pydicom

    return pydicom.dcmread(io.BytesIO(data), force=not _has_magic(data), **kwargs)


def _header_int(ds: Any, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    if value is None:
        raise DecodeError(f"DICOM pixel data without {keyword}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DecodeError(f"DICOM with an invalid {keyword}: {value!r}") from None


def _transfer_syntax(ds: Any) -> Any:
    """The file meta's transfer syntax; a dataset written without file meta has none, but its
    uncompressed pixel data is in the encoding pydicom read the dataset with."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    uid = ds.get("file_meta", {}).get("TransferSyntaxUID")
    if uid:
        return uid
    implicit, little = ds.original_encoding
    if ds["PixelData"].is_undefined_length or little is None:
        raise DecodeError("compressed DICOM pixel data without a transfer syntax (no file meta)")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = (
        (ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian) if little else ExplicitVRBigEndian
    )
    return ds.file_meta.TransferSyntaxUID


def _render_dicom(arr: np.ndarray, ds: Any, photometric: str, index: int) -> np.ndarray:
    """One decoded frame -> uint8, in the order the standard renders it: grey through the modality
    LUT (rescale), the VOI LUT or window, then MONOCHROME1's inversion; palette through its colour
    LUT. pydicom's decoders already return YBR (FULL, 422, ICT, RCT) as RGB and say so in
    `photometric`; any other colour space is refused."""
    from pydicom import pixels

    if photometric not in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB"):
        raise DecodeError(f"unsupported DICOM photometric interpretation {photometric}")
    if arr.ndim != (3 if photometric == "RGB" else 2):
        raise DecodeError(f"DICOM {photometric} with pixels shaped {arr.shape}")
    if photometric == "PALETTE COLOR":
        rgb = pixels.apply_color_lut(arr, ds)  # 8- or 16-bit entries
        return (rgb >> (8 * rgb.dtype.itemsize - 8)).astype(np.uint8)
    if photometric == "RGB":  # 16-bit samples are 8-bit ones scaled up (v * 257): their high byte, as viewers show
        return arr if arr.dtype.itemsize == 1 else (arr >> (_header_int(ds, "BitsStored") - 8)).astype(np.uint8)
    _lift_functional_groups(ds, index)
    out = _apply_voi(pixels.apply_modality_lut(arr, ds), ds)
    return 255 - out if photometric == "MONOCHROME1" else out  # 0 means white


def _lift_functional_groups(ds: Any, index: int) -> None:
    """Enhanced multi-frame files (ophthalmic tomography, enhanced CT and MR) keep the rescale and
    window in functional groups, shared or per frame, where pydicom's LUT functions do not look:
    copy the frame's onto the dataset."""
    for groups, i in (("SharedFunctionalGroupsSequence", 0), ("PerFrameFunctionalGroupsSequence", index)):
        items = ds.get(groups) or []
        for name in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
            for item in (items[i].get(name) or []) if i < len(items) else []:
                ds.update(item)


def _apply_voi(arr: np.ndarray, ds: Any) -> np.ndarray:
    """The VOI LUT (preferred, as pydicom's `apply_voi_lut` does) or window, its whole output range
    mapped onto 0..255 as a viewer shows it: a slice that lies entirely above its window is white,
    not stretched or black. Min-max when the file sets neither."""
    from pydicom import pixels

    luts = ds.get("VOILUTSequence")
    if luts and "LUTDescriptor" in luts[0] and "LUTData" in luts[0]:
        entries, first = luts[0].LUTDescriptor[:2]
        lo_hi = pixels.apply_voi(np.arange(first, first + (entries or 2**16)), ds)  # every entry
        arr = pixels.apply_voi(arr, ds)
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        with np.errstate(over="ignore"):  # SIGMOID's exp at the infinities: its two limits
            lo_hi = pixels.apply_windowing(np.array([-np.inf, np.inf]), ds)
        arr = pixels.apply_windowing(arr, ds)
    else:
        return scale_to_uint8(arr)
    lo, hi = float(np.min(lo_hi)), float(np.max(lo_hi))
    return scale_to_uint8(np.clip(arr, lo, hi), (lo, hi))


def decode_value(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None
) -> tuple[np.ndarray | None, str]:
    """`decode`, with every failure as a value: (image, "") or (None, reason).

    The reason is a `DecodeError`'s message, or for any other exception (a decoder bug on one odd
    file, e.g. Pillow's TypeError on a TIFF page without dimensions) its type and message. Batch
    rows and served uploads (422) both show this text."""
    image, reason, _ = decode_with_size(data, max_pixels, min_side)
    return image, reason


def decode_with_size(
    data: bytes, max_pixels: int, min_side: int | None
) -> tuple[np.ndarray | None, str, tuple[int, int]]:
    """`decode_value` plus the full (height, width) of the file's image (also when `min_side` decoded it
    smaller); (0, 0) on failure."""
    try:
        image, full = _decode(data, max_pixels, min_side)
        return image, "", full
    except DecodeError as exc:
        return None, str(exc), (0, 0)
    except Exception as exc:  # a decoder bug on one odd file must not fail its batch or its request
        return None, f"undecodable file: {type(exc).__name__}: {exc}", (0, 0)


def read_value(
    uri: str, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None, reader: Reader | None = None
) -> tuple[np.ndarray | None, str]:
    """Read (local or s3://) and decode one file, every failure as a value, as `decode_value`:
    a missing, unreadable or undecodable file is (None, reason)."""
    data, reason = _read_bytes(uri, reader)
    return decode_value(data, max_pixels, min_side) if data is not None else (None, reason)


def _read_bytes(uri: str, reader: Reader | None = None) -> tuple[bytes | None, str]:
    """The file's bytes, by `reader` when given (a PACS: `eyeray.dicomweb.reader`), else from local
    or s3:// storage; a failure is (None, reason). A PACS that is down or slow (`PacsUnavailable`)
    raises instead: the Ray task reading it is retried, and the file is not written off as an error."""
    from eyeray import dicomweb, storage

    try:
        return (reader(uri) if reader is not None else storage.read_bytes(uri)), ""
    except dicomweb.PacsUnavailable:
        raise
    except Exception as exc:  # missing file, permission, network, a PACS's refusal
        return None, f"unreadable file: {type(exc).__name__}: {exc}"


def read_thumbnail(
    uri: str, max_side: int, max_pixels: int = DEFAULT_MAX_PIXELS, frame: int = -1, reader: Reader | None = None
) -> tuple[np.ndarray | None, str]:
    """`read_value`, shrunk to at most `max_side` pixels a side, aspect ratio kept: an original read
    again for a person to look at (report thumbnails, Grad-CAM overlays). Decoded at a reduced scale
    when the file is much larger (`decode`'s `min_side`): the thumbnail needs no more. `frame` >= 0:
    that frame of a multi-frame DICOM file (a volume's B-scan)."""
    if frame < 0:
        original, reason = read_value(uri, max_pixels, min_side=max_side, reader=reader)
    else:
        original, reason = _read_frame(uri, max_pixels, frame, reader)
    if original is None:
        return None, reason
    image = Image.fromarray(original)
    image.thumbnail((max_side, max_side))
    return np.asarray(image), ""


def _read_frame(uri: str, max_pixels: int, frame: int, reader: Reader | None) -> tuple[np.ndarray | None, str]:
    data, reason = _read_bytes(uri, reader)
    if data is None:
        return None, reason
    try:
        volume = open_dicom(data, max_pixels)
        if not 0 <= frame < volume.frames:
            return None, f"no frame {frame} in a file of {volume.frames}"
        return volume.frame(frame), ""
    except DecodeError as exc:
        return None, str(exc)


def preprocess(image: np.ndarray, size: int, method: str = DEFAULT_RESIZE) -> np.ndarray:
    """RGB uint8 -> size x size x 3 uint8 (aspect ratio not kept, as the seeds did).

    `method`: a key of `RESIZE_METHODS`, the bundle manifest's `preprocessing.resize.method`."""
    if method not in RESIZE_METHODS:
        raise ValueError(f"unknown resize method {method!r}; one of {', '.join(RESIZE_METHODS)}")
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), RESIZE_METHODS[method]))


def load_record(
    record: dict[str, Any],
    size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    extra_sizes: tuple[int, ...] = (),
    method: str = DEFAULT_RESIZE,
    reader: Reader | None = None,
) -> dict[str, Any]:
    """Read, decode and preprocess one record's file; errors become `error`, never exceptions.

    Uses `record["bytes"]` when present (uploads, `read_binary_files`), else reads `record["path"]`.
    A DICOM file's identifiers (`DICOM_IDENTIFIERS`: modality, patient, study, series, instance,
    laterality, acquisition time) become columns, "" for other files. `extra_sizes` adds `image_<size>`
    columns from the same decode (ensembles of models whose
    input sizes differ decode each file once); every size is resized with `method`. The decode is
    only as large as the largest size needs (`decode`'s `min_side`); `height` and `width` are still
    the file's full image size. A volume gives its central frame (`load_frames` gives every one).
    """
    out, data, reason = _read_record(record, reader)
    image, full = None, (0, 0)
    if data is not None:
        image, reason, full = decode_with_size(data, max_pixels, max((size, *extra_sizes)))
    if image is None:
        return _failed(out, size, extra_sizes, reason)
    return _loaded(out, image, full, size, extra_sizes, method)


def load_frames(
    record: dict[str, Any],
    size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    extra_sizes: tuple[int, ...] = (),
    method: str = DEFAULT_RESIZE,
    reader: Reader | None = None,
) -> list[dict[str, Any]]:
    """`load_record`, one record per frame: a multi-frame DICOM file (an OCT volume: one B-scan per
    frame) gives a record per frame, `frame` its 0-based index and `frames` the file's count; any
    other file one record with `frame` -1 (`frames` 1, or 0 when it failed before its frames were
    counted). Frames are decoded one at a time; one that fails is an error record beside the others.
    `record["done_frames"]`: frames an interrupted run already committed, skipped (resume)."""
    skip = record.get("done_frames")
    done = set() if skip is None else {int(i) for i in skip}
    record = {k: v for k, v in record.items() if k != "done_frames"}
    out, data, reason = _read_record(record, reader)
    if data is None:
        return [{**_failed(out, size, extra_sizes, reason), "frame": -1, "frames": 0}]
    if not is_dicom(data):
        row = load_record({**record, "bytes": data}, size, max_pixels, extra_sizes, method)
        return [{**row, "frame": -1, "frames": 0 if row["error"] else 1}]
    try:
        volume = open_dicom(data, max_pixels)
    except DecodeError as exc:
        return [{**_failed(out, size, extra_sizes, str(exc)), "frame": -1, "frames": 0}]
    except Exception as exc:  # a decoder bug on one odd file must not fail its batch
        return [
            {
                **_failed(out, size, extra_sizes, f"undecodable file: {type(exc).__name__}: {exc}"),
                "frame": -1,
                "frames": 0,
            }
        ]
    rows = []
    for index in range(volume.frames) if volume.frames > 1 else [-1]:
        if index in done:
            continue
        row = {**out, "frame": index, "frames": volume.frames}
        try:
            image = volume.frame(max(index, 0))
        except DecodeError as exc:
            rows.append(_failed(row, size, extra_sizes, str(exc)))
            continue
        except Exception as exc:
            rows.append(_failed(row, size, extra_sizes, f"undecodable file: {type(exc).__name__}: {exc}"))
            continue
        rows.append(_loaded(row, image, image.shape[:2], size, extra_sizes, method))
    return rows


def _read_record(record: dict[str, Any], reader: Reader | None) -> tuple[dict[str, Any], bytes | None, str]:
    """The record without its bytes, with the DICOM identifiers; the file's bytes (None and the
    reason when it cannot be read)."""
    out = dict(record)
    data = out.pop("bytes", None)
    reason = ""
    if data is None:
        data, reason = _read_bytes(record["path"], reader)
    out.update(dicom_identifiers(data) if data is not None else NO_IDENTIFIERS)
    return out, data, reason


def _loaded(
    out: dict[str, Any], image: np.ndarray, full: tuple[int, int], size: int, extra_sizes: tuple[int, ...], method: str
) -> dict[str, Any]:
    out.update(image=preprocess(image, size, method), height=full[0], width=full[1], error="")
    out.update({f"image_{s}": preprocess(image, s, method) for s in extra_sizes})
    return out


# What every row from a DICOM file carries, so a hospital can send the result back (column ->
# the attributes that fill it, the first one present winning); "" for other files and absent ones.
DICOM_IDENTIFIERS: dict[str, tuple[str, ...]] = {
    "modality": ("Modality",),
    "patient_id": ("PatientID",),
    "study_uid": ("StudyInstanceUID",),
    "series_uid": ("SeriesInstanceUID",),
    "sop_uid": ("SOPInstanceUID",),
    "laterality": ("ImageLaterality", "Laterality"),  # image level (OP, OPT) before series level
    "acquired_at": ("AcquisitionDateTime", "AcquisitionDate+AcquisitionTime", "ContentDate+ContentTime"),
}
NO_IDENTIFIERS = dict.fromkeys(DICOM_IDENTIFIERS, "")


def dicom_identifiers(data: bytes) -> dict[str, str]:
    """A DICOM file's identifiers (`DICOM_IDENTIFIERS`), from its header alone, as DICOM writes them
    (dates and times as DT: YYYYMMDDHHMMSS); every value "" for other files."""
    if not is_dicom(data):
        return dict(NO_IDENTIFIERS)
    keywords = sorted({k for names in DICOM_IDENTIFIERS.values() for name in names for k in name.split("+")})
    try:
        header = _read_dicom(data, stop_before_pixels=True, specific_tags=keywords)
    except Exception:  # the decode that follows says what is wrong with the file
        return dict(NO_IDENTIFIERS)

    def value(name: str) -> str:
        return "".join(str(header.get(k, "") or "").strip() for k in name.split("+"))

    return {column: next((v for v in map(value, names) if v), "") for column, names in DICOM_IDENTIFIERS.items()}


def dicom_modality(data: bytes) -> str:
    """A DICOM file's Modality (OPT, OP, ...), from its header alone; "" for other files or none."""
    return dicom_identifiers(data)["modality"]


def _failed(out: dict[str, Any], size: int, extra_sizes: tuple[int, ...], reason: str) -> dict[str, Any]:
    # A blank image keeps every column the same shape, so the row travels with its batch.
    out.update(image=np.zeros((size, size, 3), np.uint8), height=0, width=0, error=reason)
    out.update({f"image_{s}": np.zeros((s, s, 3), np.uint8) for s in extra_sizes})
    return out


def load_batch(
    batch: dict[str, np.ndarray],
    size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    extra_sizes: tuple[int, ...] = (),
    method: str = DEFAULT_RESIZE,
    every_frame: bool = False,
    reader: Reader | None = None,
) -> dict[str, np.ndarray]:
    """`load_record` over a Ray Data batch (dict of columns) -> dict of columns; `every_frame`:
    `load_frames`, so a volume becomes one row per frame (batch scoring)."""
    n = len(next(iter(batch.values())))
    records = [{k: v[i] for k, v in batch.items()} for i in range(n)]
    if every_frame:
        rows = [row for r in records for row in load_frames(r, size, max_pixels, extra_sizes, method, reader)]
    else:
        rows = [load_record(r, size, max_pixels, extra_sizes, method, reader) for r in records]
    return {key: _column([row[key] for row in rows]) for key in rows[0]} if rows else _empty(batch)


def _empty(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A batch whose every frame was already scored (resume): no rows, the input's columns."""
    return {k: v[:0] for k, v in batch.items() if k != "done_frames"}


def _column(values: list[Any]) -> np.ndarray:
    if isinstance(values[0], np.ndarray):
        return np.stack(values)
    if isinstance(values[0], str):
        return np.array(values, dtype=object)
    return np.asarray(values)
