"""Test images made on the fly: encoders, a DICOM writer, and the bad-file corpus of an archive.

`write_bad_corpus` writes every kind of odd file a hospital export has been seen to hold and
returns what scoring must make of each: "ok", "error" or None (not an input: no row).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image


def encode(arr: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def gradient(h: int = 40, w: int = 60) -> np.ndarray:
    x = np.linspace(0, 255, w, dtype=np.float64)
    rgb = np.stack([np.tile(x, (h, 1)), np.tile(x[::-1], (h, 1)), np.full((h, w), 128.0)], axis=2)
    return rgb.astype(np.uint8)


STUDY_UID = "1.2.826.0.1.3680043.8.498.1"  # the study every corpus DICOM belongs to


def make_dicom(
    pixels: np.ndarray | None,
    photometric: str = "MONOCHROME2",
    window: tuple[float, float] | None = None,
    modality: str | None = None,
) -> bytes:
    """An ophthalmic-tomography DICOM file; `pixels=None` writes one without pixel data; `modality`
    sets the Modality attribute (absent by default)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.5.4"  # ophthalmic tomography
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = "TEST-0001"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY_UID, generate_uid()
    ds.ImageLaterality, ds.AcquisitionDateTime = "R", "20261204101500"
    if modality is not None:
        ds.Modality = modality
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        if window:
            ds.WindowCenter, ds.WindowWidth = window
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


OPT_STORAGE = "1.2.840.10008.5.1.4.1.1.77.1.5.4"  # Ophthalmic Tomography Image Storage


def make_oct_volume(
    bscans: list[np.ndarray],
    jpeg2000: bool = False,
    patient_id: str = "TEST-0001",
    study_uid: str = STUDY_UID,
    study_date: str = "20261204",
) -> bytes:
    """An Ophthalmic Tomography Image Storage file holding `bscans` (8-bit grey, one size) as its
    frames, uncompressed or JPEG 2000 (lossless, through pylibjpeg-openjpeg), as an OCT device
    exports a cube; one B-scan makes a single-frame instance."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

    frames = np.stack(bscans).astype(np.uint8)
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = OPT_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = OPT_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.PatientName = "OPT", patient_id, "Test^Patient"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.StudyDate = study_uid, generate_uid(), study_date
    ds.ImageLaterality, ds.AcquisitionDateTime = "L", "20261204103000"
    ds.NumberOfFrames, (ds.Rows, ds.Columns) = len(frames), frames.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = frames.tobytes()
    if jpeg2000:
        ds.compress(JPEG2000Lossless, frames, encoding_plugin="pylibjpeg")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def real_bscans(root: Path, names: list[str], size: tuple[int, int] = (512, 496)) -> list[np.ndarray]:
    """Real OCT B-scans (the Kermany sample's JPEGs under `root`, by file name), grey, all `size`
    (width, height) as one device's cube would be."""
    found = {p.name: p for p in root.rglob("*.jpeg")}
    return [np.asarray(Image.open(found[n]).convert("L").resize(size)) for n in names]


def _grey(h: int = 48, w: int = 64) -> np.ndarray:
    return gradient(h, w)[:, :, 0]


def _multi_frame_tiff() -> bytes:
    frames = [Image.fromarray(np.full((40, 50), v, np.uint8)) for v in (10, 128, 250)]
    buf = io.BytesIO()
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")  # tiny on disk, 400 M pixels decoded
    return buf.getvalue()


def write_bad_corpus(root: Path) -> dict[str, str | None]:
    """Write the corpus under `root`; returns relative path -> expected status (None: no row)."""
    root.mkdir(parents=True, exist_ok=True)
    jpeg = encode(gradient(), "JPEG")
    files: dict[str, tuple[bytes, str | None]] = {
        "empty.jpg": (b"", "error"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "error"),
        "random-bytes.jpg": (np.random.default_rng(0).bytes(3000), "error"),
        "notes.png": (b"Referral letter, not an image.\n", "error"),
        "16-bit.png": (encode((_grey().astype(np.uint16) * 200), "PNG"), "ok"),
        "cmyk.jpg": (_cmyk_jpeg(), "ok"),
        "rgba.png": (encode(np.dstack([gradient(), np.full((40, 60), 128, np.uint8)]), "PNG"), "ok"),
        "palette.png": (_palette_png(), "ok"),
        "greyscale.jpeg": (encode(_grey(), "JPEG"), "ok"),
        "bomb.png": (_bomb(), "error"),
        "volume.tiff": (_multi_frame_tiff(), "ok"),  # a volume scores its central frame, as DICOM does
        "no-pixels.dcm": (make_dicom(None), "error"),
        "scan.dcm": (make_dicom(np.arange(48 * 64).reshape(48, 64) % 4096), "ok"),
        "1.2.840.113619.2.55.3": (make_dicom(np.full((32, 32), 900)), "ok"),  # DICOM named by its UID
        "DICOMFILE": (make_dicom(np.full((32, 32), 700)), "ok"),  # DICOM without extension
        "README": (b"export notes: no extension and not DICOM\n", "error"),
        "UPPER CASE.JPG": (jpeg, "ok"),
        "Müller, Zoë – OD 2026.jpg": (jpeg, "ok"),  # unicode, commas and spaces
        "眼底 画像.png": (encode(gradient(), "PNG"), "ok"),
        "folder.jpg/inside.png": (encode(gradient(), "PNG"), "ok"),  # a directory named like an image
        "report.pdf": (b"%PDF-1.4 not an image extension", None),
        ".DS_Store": (b"\0\0\0\1Bud1", None),
        "._resource-fork.jpg": (b"\0\5\26\7", None),
        ".hidden/inside.jpg": (jpeg, None),
    }
    expected: dict[str, str | None] = {}
    for rel, (data, status) in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expected[rel] = status
    locked = root / "no-permission.jpg"
    locked.write_bytes(jpeg)
    locked.chmod(0)
    # root reads any file whatever its mode: then the file is simply scored.
    expected["no-permission.jpg"] = "ok" if os.geteuid() == 0 else "error"
    (root / "dangling.jpg").symlink_to(root / "moved-away.jpg")
    expected["dangling.jpg"] = "error"
    (root / "empty-folder.png").mkdir()
    expected["empty-folder.png"] = None
    return expected


def _cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gradient()).convert("CMYK").save(buf, format="JPEG")
    return buf.getvalue()


def _palette_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gradient()).convert("P", palette=Image.ADAPTIVE, colors=16).save(buf, format="PNG")
    return buf.getvalue()
