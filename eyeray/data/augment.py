"""Training-only augmentation on uint8 batches, run where it costs the training step least.

Two places run the same `augment_batch` (eyeray.train picks one, `--augment-on`):
- `training_stream`: Ray Data's CPU tasks, beside the trainers. Right for GPU workers: the step
  does not use the CPUs, and the augmentation scales out to every CPU of the cluster.
- `augmented`: a background thread of the training worker, on the batches its shard yields, while
  TensorFlow runs the step (which releases the GIL). Right for CPU workers: the step and Ray Data's
  tasks share the same cores, and here no task is launched and no batch crosses a process per epoch
  (bench/train_ingest.py measures both).

Either way the saved model has no random layers (whose seed state does not mix with
MultiWorkerMirroredStrategy replicas).

It is vectorised over the batch in plain numpy (no TensorFlow in eyeray.data, no per-image PIL
call): the augmentation competes with the training step for the same few CPU cores, so every
millisecond it costs is a millisecond the trainer may wait. The rotation + zoom is one batched
inverse-affine bilinear resampling with PIL's conventions (the previous implementation called
`PIL.Image.transform` per image; tests/test_augment.py keeps that as the reference).
"""

from __future__ import annotations

import math
import queue
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import replace

import numpy as np

from eyeray.tasks import AugmentSpec

# The resampling packs a pixel's three channels into one uint64, one 16-bit lane per channel
# (bytes 0, 2, 4), so one gather fetches a whole pixel and one multiply weights all its channels:
# a lane holds at most 255 * 256, the weighted sum of two pixels with 8-bit weights that add to 256.
_LANE_SHIFT = (0, 16, 32)
_LANES_LOW_BYTE = np.uint64(0x0000_00FF_00FF_00FF)
_LANES_HALF = np.uint64(0x0000_0080_0080_0080)  # + 0.5 in every lane before dropping 8 bits: rounding
_CHUNK_PIXELS = 1 << 16  # output pixels per resampling step: its temporaries (0.25-0.5 MiB each) stay in cache
_CHUNK_VALUES = 1 << 18  # uint8 values per contrast/brightness step: whole images, 1 MiB of float32


def _byte(bit: int) -> int:
    """The byte of a uint64 that holds bits bit..bit+7 (bit a multiple of 8), in this machine's byte order."""
    return bit // 8 if sys.byteorder == "little" else 7 - bit // 8


def scaled(spec: AugmentSpec, strength: float) -> AugmentSpec:
    """The task's augmentation made weaker or stronger (a sweep dimension): rotation, zoom,
    brightness and contrast ranges times `strength`; 0 turns augmentation off, flips included."""
    if strength == 1.0:
        return spec
    if strength <= 0:
        return AugmentSpec(hflip=False, vflip=False, rotation_deg=0.0, zoom=0.0, brightness=0.0, contrast=0.0)
    return replace(
        spec,
        rotation_deg=spec.rotation_deg * strength,
        zoom=min(spec.zoom * strength, 0.9),
        brightness=spec.brightness * strength,
        contrast=min(spec.contrast * strength, 0.9),
    )


def augment_batch(
    batch: dict[str, np.ndarray], spec: AugmentSpec, rng: np.random.Generator | None = None
) -> dict[str, np.ndarray]:
    """Ray Data `map_batches` function: fresh randomness on every call (no `rng`), so every epoch
    differs; `rng` is for tests that want a reproducible draw."""
    out = dict(batch)
    out["image"] = augment_images(batch["image"], spec, np.random.default_rng() if rng is None else rng)
    return out


def training_stream(ds, spec: AugmentSpec | None):
    """A training split as each epoch reads it (a Ray Dataset): its blocks in a new random order,
    then every image augmented by `spec` (None: not augmented, or augmented by the trainer:
    `augmented`) in Ray Data's CPU tasks, beside the training step. eyeray.train and
    bench/train_ingest.py both build it here."""
    ds = ds.randomize_block_order()
    if spec is None:
        return ds
    # zero_copy_batch: augment_batch never writes to its input
    return ds.map_batches(augment_batch, fn_kwargs={"spec": spec}, batch_size=64, zero_copy_batch=True)


def augmented(batches: Iterable[dict], spec: AugmentSpec | None, ahead: int = 2) -> Iterator[dict]:
    """`batches` augmented by `spec` in a background thread, up to `ahead` batches before the
    consumer asks (None: `batches` as they are). An error in the thread is raised in the consumer;
    a consumer that stops early (or fails) stops the thread, which closes `batches` (a Ray Data
    iterator then shuts its execution down)."""
    if spec is None:
        yield from batches
        return
    done = object()
    ready: queue.Queue = queue.Queue(maxsize=ahead)
    stop = threading.Event()

    def hand_over(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        source = iter(batches)
        try:
            for batch in source:
                if not hand_over(augment_batch(batch, spec)):
                    return
            hand_over(done)
        except BaseException as error:  # handed to the consumer, raised there
            hand_over(error)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="eyeray-augment", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def augment_images(images: np.ndarray, spec: AugmentSpec, rng: np.random.Generator) -> np.ndarray:
    """One independent random flip / rotation / zoom / brightness / contrast draw per image of an
    NxHxWx3 uint8 batch, in that order; returns a new uint8 batch of the same shape (the input is
    returned as is when `spec` turns everything off)."""
    n = len(images)
    if n == 0:
        return images
    hflip = rng.random(n) < 0.5 if spec.hflip else np.zeros(n, bool)
    vflip = rng.random(n) < 0.5 if spec.vflip else np.zeros(n, bool)
    if spec.rotation_deg or spec.zoom:
        angle = np.radians(rng.uniform(-spec.rotation_deg, spec.rotation_deg, n))
        scale = rng.uniform(1 - spec.zoom, 1 + spec.zoom, n)
        images = affine_batch(images, angle, scale, hflip, vflip)  # the flips ride along in the matrices
    elif hflip.any() or vflip.any():
        images = images.copy()
        images[hflip] = images[hflip, :, ::-1]
        images[vflip] = images[vflip, ::-1]
    if spec.contrast or spec.brightness:
        contrast = rng.uniform(1 - spec.contrast, 1 + spec.contrast, n) if spec.contrast else np.ones(n)
        brightness = rng.uniform(-spec.brightness, spec.brightness, n) if spec.brightness else np.zeros(n)
        images = _contrast_brightness(images, contrast, brightness)
    return images


def _contrast_brightness(images: np.ndarray, contrast: np.ndarray, brightness: np.ndarray) -> np.ndarray:
    """(x - mean) * contrast + mean + brightness * 255 per image (mean over the image's pixels and
    channels), rounded and clipped to uint8: one scale and one offset per image, broadcast."""
    n = len(images)
    out = np.empty_like(images)
    per_chunk = max(1, _CHUNK_VALUES // max(1, images[0].size))  # whole images per step, in cache
    for i in range(0, n, per_chunk):
        x = images[i : i + per_chunk].astype(np.float32)
        shape = (len(x),) + (1,) * (x.ndim - 1)
        mean = x.reshape(len(x), -1).mean(axis=1, dtype=np.float64)
        c = contrast[i : i + per_chunk]
        offset = mean * (1 - c) + brightness[i : i + per_chunk] * 255.0 + 0.5  # + 0.5: round, not truncate
        x *= c.astype(np.float32).reshape(shape)
        x += offset.astype(np.float32).reshape(shape)
        np.clip(x, 0, 255, out=x)
        out[i : i + per_chunk] = x  # float -> uint8 truncates the +0.5-shifted value: rounds
    return out


def affine_batch(
    images: np.ndarray,
    angle: np.ndarray,
    scale: np.ndarray,
    hflip: np.ndarray | None = None,
    vflip: np.ndarray | None = None,
) -> np.ndarray:
    """Rotate image i by angle[i] radians and zoom it by scale[i] about its centre, after an
    optional mirror, as PIL's `Image.transform(AFFINE, BILINEAR)` with the previous matrix does:
    bilinear, pixel centres at +0.5, neighbours clamped to the edge, samples whose source point
    falls outside the image are 0. NxHxWx3 uint8 in and out.

    One pass for the whole batch, in cache-sized runs of output rows: int32 fixed-point source
    coordinates (as many fractional bits as fit, 20 for 224 px: integer ops are the cheapest numpy
    has, and the 8-bit interpolation weights fall out of them), four gathers of packed pixels, and
    the two linear interpolations done on all three channels at once (see _LANE_SHIFT). Differences
    from PIL: results are rounded where PIL truncates (PIL is about 0.5 grey level darker on average),
    and positions are quantised to 1/256 px for the weights."""
    n, h, w, channels = images.shape
    if channels != 3:
        raise ValueError(f"affine_batch expects NxHxWx3 images, got {images.shape}")
    hflip = np.zeros(n, bool) if hflip is None else np.asarray(hflip, bool)
    vflip = np.zeros(n, bool) if vflip is None else np.asarray(vflip, bool)

    # PIL's inverse map (output pixel centre -> source point), x_src = a x + b y + c, y_src = d x + e y + f,
    # then the mirror x_src -> w - x_src (y_src -> h - y_src) for a flip done before the transform.
    angle, scale = np.asarray(angle, np.float64), np.asarray(scale, np.float64)
    cx, cy = w / 2, h / 2
    a, b = np.cos(angle) / scale, np.sin(angle) / scale
    c, d, e = cx - a * cx - b * cy, -b, a
    f = cy - d * cx - e * cy
    a, b, c = np.where(hflip, -a, a), np.where(hflip, -b, b), np.where(hflip, w - c, c)
    d, e, f = np.where(vflip, -d, d), np.where(vflip, -e, e), np.where(vflip, h - f, f)

    # Edge-padded by one pixel, so a sample's four neighbours never need clamping; one packed uint64 per
    # pixel; a run of zeros at the end that every out-of-image sample reads instead.
    hp, wp = h + 2, w + 2
    src = np.zeros(n * hp * wp + wp + 2, np.uint64)
    packed = src[: n * hp * wp].view(np.uint8).reshape(n, hp, wp, 8)
    for ch, shift in enumerate(_LANE_SHIFT):
        packed[:, 1:-1, 1:-1, _byte(shift)] = images[..., ch]  # a channel at a time: the fastest strided copy
    packed[:, 0], packed[:, -1] = packed[:, 1], packed[:, -2]
    packed[:, :, 0], packed[:, :, -1] = packed[:, :, 1], packed[:, :, -2]
    outside = n * hp * wp
    right, below, below_right = src[1:], src[wp:], src[wp + 1 :]

    # Source coordinates of output pixel (row r of the batch's n*h rows, column x): row start + step * x.
    row_image = np.repeat(np.arange(n), h)
    y_mid = np.tile(np.arange(h) + 0.5, n)
    ra, rb, rc, rd, re, rf = (v[row_image] for v in (a, b, c, d, e, f))
    x_start, y_start = ra * 0.5 + rb * y_mid + rc, rd * 0.5 + re * y_mid + rf
    bound = max(np.abs(x_start).max() + np.abs(ra).max() * w, np.abs(y_start).max() + np.abs(rd).max() * w, w, h) + 2
    bits = 30 - math.ceil(math.log2(bound))  # as many fractional bits as int32 holds: exact edges
    if bits < 8:
        raise ValueError(f"affine_batch: source coordinates up to {bound:.0f} px do not fit the fixed-point range")
    one = float(1 << bits)
    x_start = np.round(x_start * one + (1 << (bits - 1))).astype(np.int32)[:, None]  # + 0.5 px: see below
    y_start = np.round(y_start * one + (1 << (bits - 1))).astype(np.int32)[:, None]
    x_step = np.round(ra * one).astype(np.int32)[:, None]
    y_step = np.round(rd * one).astype(np.int32)[:, None]
    row_base = (row_image * (hp * wp)).astype(np.intp)[:, None]
    cols = np.arange(w, dtype=np.int32)[None, :]
    # A sample is inside when 0 <= x_src < w; shifted by +0.5 px that is 0.5 <= . < w + 0.5 (unsigned compare).
    x_lo, y_lo = np.int32(1 << (bits - 1)), np.int32(1 << (bits - 1))
    x_span, y_span = np.uint32(w << bits), np.uint32(h << bits)
    frac_shift, u8, u256 = bits - 8, np.uint64(8), np.uint64(256)

    out = np.empty(n * h * w * channels, np.uint8)
    rows_per_step = max(1, _CHUNK_PIXELS // w)
    for r0 in range(0, n * h, rows_per_step):
        rows = slice(r0, r0 + rows_per_step)
        # x_src + 0.5 in fixed point: its integer part is the left neighbour's column in the padded image
        # (floor(x_src - 0.5) + 1) and its fraction the weight of the right neighbour.
        xq = x_step[rows] * cols
        xq += x_start[rows]
        yq = y_step[rows] * cols
        yq += y_start[rows]
        outside_mask = (xq - x_lo).view(np.uint32) >= x_span
        outside_mask |= (yq - y_lo).view(np.uint32) >= y_span
        index = (yq >> bits) * wp
        index += xq >> bits
        index = index + row_base[rows]  # int64 from here: numpy gathers fastest with intp indices
        np.copyto(index, outside, where=outside_mask)
        fx = ((xq >> frac_shift) & 255).astype(np.uint64)
        fy = ((yq >> frac_shift) & 255).astype(np.uint64)
        gx = u256 - fx
        top = np.take(src, index)
        top *= gx
        top += np.take(right, index) * fx
        bottom = np.take(below, index)
        bottom *= gx
        bottom += np.take(below_right, index) * fx
        top += _LANES_HALF
        top >>= u8
        top &= _LANES_LOW_BYTE
        top *= u256 - fy
        bottom += _LANES_HALF
        bottom >>= u8
        bottom &= _LANES_LOW_BYTE
        bottom *= fy
        top += bottom
        top += _LANES_HALF  # each lane's high byte is now the rounded result
        lanes = top.view(np.uint8).reshape(-1, 8)
        block = out[r0 * w * channels : (r0 + rows_per_step) * w * channels]
        for ch, shift in enumerate(_LANE_SHIFT):
            block[ch::channels] = lanes[:, _byte(shift + 8)]  # one channel at a time: the fastest strided copy
    return out.reshape(n, h, w, channels)
