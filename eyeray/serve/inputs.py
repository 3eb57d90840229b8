"""What a request carries, checked before any model sees it: the upload's bytes (a multipart `file`
field or the raw body, within the body limit), decoded and preprocessed as the bundle's own
preprocessing says (as batch scoring does, so no train/serve skew), and a threshold override the
bundle can take. Every refusal is an HTTPException with the reason (4xx, `{"detail": reason}`)."""

from typing import Any

import numpy as np
from fastapi import HTTPException, Request
from starlette.formparsers import MultiPartException, MultiPartParser

from eyeray.data import imaging
from eyeray.decision import operating_points
from eyeray.decision.decide import decide

MULTIPART = "multipart/form-data"
RAW_TYPES = ("application/octet-stream", "application/dicom")  # and any image/*


async def read_image(request: Request, max_body_bytes: int) -> bytes:
    """The upload's bytes: a multipart `file` field or the raw body, never more than the limit."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype and ctype != MULTIPART and ctype not in RAW_TYPES and not ctype.startswith("image/"):
        raise HTTPException(
            415,
            f"unsupported content type {ctype!r}: send multipart/form-data with a "
            "'file' field, or the image as the body (image/*, application/dicom, "
            "application/octet-stream)",
        )
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
        raise too_large(max_body_bytes) if length.isdigit() else HTTPException(400, "invalid Content-Length")
    body = limited(request, max_body_bytes)
    if ctype == MULTIPART:
        data = await multipart_file(request, body)
    else:
        data = b"".join([chunk async for chunk in body])
    if not data:
        raise HTTPException(400, "empty body: no image bytes received")
    return data


async def limited(request: Request, max_body_bytes: int):
    """The body's chunks, stopped with a 413 once they exceed the limit (no Content-Length needed)."""
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_body_bytes:
            raise too_large(max_body_bytes)
        yield chunk


class InMemoryParser(MultiPartParser):
    spool_max_size = 2**62  # uploads stay in memory (bounded by max_body_bytes), never on disk


async def multipart_file(request: Request, body) -> bytes:
    """The `file` field of a multipart body read from `body` (the limited stream)."""
    parser = InMemoryParser(request.headers, body, max_files=1, max_fields=10)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise HTTPException(400, f"malformed multipart body: {exc.message}") from None
    try:
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise HTTPException(400, "multipart upload needs a 'file' field holding the image")
        return await upload.read()
    finally:
        await form.close()


def too_large(max_body_bytes: int) -> HTTPException:
    return HTTPException(413, f"body larger than the limit of {max_body_bytes} bytes")


def check_thresholds(manifest: dict[str, Any], text: str | None) -> Any:
    """Parse a threshold override and check the bundle can take it (a dry run of its decision)."""
    thresholds = operating_points.parse_thresholds(text)
    if thresholds is not None:
        classes = len(manifest["classes"])
        decide(manifest, np.full((1, classes), 1 / classes, np.float32), thresholds)
    return thresholds


def decode_upload(
    data: bytes, manifest: dict[str, Any], max_pixels: int, overlay: bool = True
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """The upload as decoded (for overlays) and as the bundle's model takes it: the manifest's
    `preprocessing` (resize size and method), as batch scoring applies it. The decoded-size limit is
    the stricter of the bundle's `preprocessing.max_pixels` and the service's `max_pixels`. Any
    decode failure is a 422 with the reason batch scoring writes in its rows (`imaging.decode_value`).
    `overlay=False` (a prediction only): a large JPEG is decoded only as large as the model input
    needs (`imaging.decode`'s `min_side`, as batch scoring decodes), and the first value is that.
    The third is the file's full (height, width): the gate's size check."""
    pre = manifest["preprocessing"]
    size = int(pre["resize"]["size"][0])
    limit = min(max_pixels, int(pre["max_pixels"]))
    original, reason, full = imaging.decode_with_size(data, limit, None if overlay else size)
    if original is None:
        raise HTTPException(422, reason)
    return original, imaging.preprocess(original, size, pre["resize"]["method"]), full


def frame_count(data: bytes, max_pixels: int) -> int:
    """Frames in a DICOM upload, from its header; 1 for any other upload or one that cannot be read
    (the one-image path then says what is wrong with it, as a 422)."""
    if not imaging.is_dicom(data):
        return 1
    try:
        return imaging.open_dicom(data, max_pixels).frames
    except Exception:
        return 1


def decode_volume(data: bytes, manifest: dict[str, Any], max_pixels: int) -> list[dict[str, Any]] | None:
    """A multi-frame DICOM upload (an OCT volume) as one preprocessed record per B-scan
    (`imaging.load_frames`, as batch scoring decodes it); None for any other upload (one image)."""
    pre = manifest["preprocessing"]
    limit = min(max_pixels, int(pre["max_pixels"]))
    if frame_count(data, limit) < 2:
        return None
    size = int(pre["resize"]["size"][0])
    return imaging.load_frames({"path": "upload", "bytes": data}, size, limit, method=pre["resize"]["method"])
