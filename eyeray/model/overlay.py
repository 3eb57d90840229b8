"""Heatmap overlays as a clinician sees them: coloured, blended over the image at its own size, PNG.

Kept apart from `eyeray.model.gradcam` (which needs Keras) so the Serve ingress can draw an overlay
from a replica's small heatmap without loading TensorFlow.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

DEFAULT_ALPHA = 0.5
ALPHA_HELP = "heatmap opacity where the heat is highest"  # `eyeray explain --alpha`, the API's `?alpha=`
DEFAULT_COLORMAP = "jet"


def resize_map(heatmap: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of one float map (PIL mode "F": no 8-bit rounding)."""
    if heatmap.shape == (height, width):
        return heatmap.astype(np.float32)
    image = Image.fromarray(np.ascontiguousarray(heatmap, np.float32))  # 2-D float32: mode "F"
    return np.asarray(image.resize((width, height), Image.BILINEAR), np.float32)


def overlay(
    image_rgb: np.ndarray, heatmap: np.ndarray, alpha: float = DEFAULT_ALPHA, colormap: str = DEFAULT_COLORMAP
) -> np.ndarray:
    """The heatmap, resized to the image's own size, coloured and blended over it: RGB uint8, same size.

    Each pixel's blend weight is `alpha * heat`, so regions that did not drive the class keep the
    original image and the anatomy stays readable under the colour.
    """
    import matplotlib

    image = np.asarray(image_rgb)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    heat = np.clip(resize_map(np.asarray(heatmap, np.float32), image.shape[0], image.shape[1]), 0.0, 1.0)
    colour = matplotlib.colormaps[colormap](heat)[..., :3] * 255.0
    weight = (alpha * heat)[..., None]
    return np.clip(image[..., :3] * (1.0 - weight) + colour * weight + 0.5, 0, 255).astype(np.uint8)


def png_bytes(image_rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image_rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def overlay_png(
    image_rgb: np.ndarray, heatmap: np.ndarray, alpha: float = DEFAULT_ALPHA, colormap: str = DEFAULT_COLORMAP
) -> bytes:
    """`overlay` encoded as PNG (for files, Parquet-side folders and base64 in the API)."""
    return png_bytes(overlay(image_rgb, heatmap, alpha, colormap))
