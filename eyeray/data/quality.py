"""Image quality as numbers: a few statistics of each model input, and the range the training
images span. An image outside that range (blank, flat, too dark, over-exposed, blurred, mostly
empty, too small) is ungradable: the gate (`eyeray.decision.gate`) declines it instead of guessing.

Why simple statistics and not only the out-of-distribution distance: a blank or flat image has
pooled features near nothing in particular (its distance can be small), and the reason a person
needs ("too dark", "blurred") is a statistic's name. Every statistic is computed on the image as
the model sees it (resized to its input), so training, scoring and serving compute the same.
"""

from __future__ import annotations

import numpy as np

TILE = 8  # pixels a side of the tiles `content` counts
TILE_FLAT = 4.0  # grey-level std below which a tile holds nothing
FLAT = 4.0  # grey-level std below which the whole image is blank or flat, whatever training saw
MIN_SIDE = 32  # pixels: smaller originals are too small to grade, whatever training saw (sizes vary
# by device, so the training images' own sizes set no bound)
QUANTILES = (0.005, 0.995)  # the training images' range of a statistic ...
MARGIN = 0.5  # ... widened: a low bound at half its low quantile (blur, darkness and emptiness divide a
# statistic), a high bound half way from its high quantile to the statistic's ceiling, or at twice it for a
# statistic without one (noise multiplies sharpness). A spread-based margin failed here: one smooth
# training scan stretched the sharpness range down to blurred images.
# statistic -> (the side that is checked, the reason shown when it is crossed, the statistic's ceiling)
CHECKS = {
    "brightness": ("both", ("too dark", "over-exposed"), 255.0),  # grey levels
    "contrast": ("low", ("low contrast",), 127.5),  # grey levels
    "sharpness": ("both", ("blurred", "noisy"), None),  # uniform noise: ~3, fundus photos: < 0.25
    "clipped": ("high", ("over-exposed",), 1.0),  # share of pixels
    "content": ("low", ("mostly empty or cropped",), 1.0),  # share of tiles
}


def statistics(images: np.ndarray, heights, widths) -> dict[str, np.ndarray]:
    """uint8 model inputs (n, h, w, 3) and their originals' sizes -> statistic -> (n,) values:
    brightness (mean grey), contrast (grey std), sharpness (mean |Laplacian| over the contrast),
    clipped (share of grey >= 250), content (share of 8x8 tiles that are not flat), min_side (px)."""
    x = np.asarray(images, np.float32)
    n = len(x)
    if n == 0:
        return {name: np.zeros(0) for name in (*CHECKS, "min_side")}
    grey = x @ np.array([0.299, 0.587, 0.114], np.float32) if x.ndim == 4 else x
    contrast = grey.std(axis=(1, 2))
    lap = 4 * grey[:, 1:-1, 1:-1] - grey[:, :-2, 1:-1] - grey[:, 2:, 1:-1] - grey[:, 1:-1, :-2] - grey[:, 1:-1, 2:]
    h, w = (grey.shape[1] // TILE) * TILE, (grey.shape[2] // TILE) * TILE
    tiles = grey[:, :h, :w].reshape(n, h // TILE, TILE, w // TILE, TILE).std(axis=(2, 4))
    return {
        "brightness": grey.mean(axis=(1, 2)).astype(np.float64),
        "contrast": contrast.astype(np.float64),
        "sharpness": (np.abs(lap).mean(axis=(1, 2)) / np.maximum(contrast, 1.0)).astype(np.float64),
        "clipped": (grey >= 250).mean(axis=(1, 2)).astype(np.float64),
        "content": (tiles > TILE_FLAT).mean(axis=(1, 2)).astype(np.float64),
        "min_side": np.minimum(np.asarray(heights, np.float64), np.asarray(widths, np.float64)),
    }


def ranges(stats: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """The accepted [low, high] of each statistic: the training images' QUANTILES, widened by MARGIN."""
    out = {}
    for name, (_, _, ceiling) in CHECKS.items():
        values = np.asarray(stats[name], np.float64)
        lo, hi = np.quantile(values, QUANTILES) if len(values) else (0.0, 0.0)
        out[name] = [float(lo * (1 - MARGIN)), float(hi + (ceiling - hi) * MARGIN if ceiling else hi / (1 - MARGIN))]
    return out


def problems(stats: dict[str, np.ndarray], accepted: dict[str, list[float]]) -> np.ndarray:
    """Per image, why it is ungradable ("" when it is not): the absolute floors (FLAT, MIN_SIDE)
    first, then each statistic outside its `accepted` range, in CHECKS order."""
    n = len(next(iter(stats.values())))
    reasons = np.full(n, "", dtype=object)

    def mark(mask, text):
        reasons[(reasons == "") & mask] = text

    mark(stats["contrast"] < FLAT, "blank or flat image")
    mark(stats["min_side"] < MIN_SIDE, "too small")
    for name, (side, texts, _) in CHECKS.items():
        if name not in accepted:
            continue
        lo, hi = accepted[name]
        if side in ("low", "both"):
            mark(stats[name] < lo, texts[0])
        if side in ("high", "both"):
            mark(stats[name] > hi, texts[-1])
    return reasons
