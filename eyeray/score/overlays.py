"""The overlay stage of batch scoring: Grad-CAM heatmaps, computed by the model actors and carried
in the rows as small arrays, are drawn here on the original images in CPU tasks, so a model actor
never reads a file. Only the explained rows are read again, shrunk to at most OVERLAY_MAX_SIDE: a
clinician sees the whole scan rather than the model's square input."""

from __future__ import annotations

import hashlib

import numpy as np

from eyeray import storage
from eyeray.data import imaging
from eyeray.model.overlay import overlay_png
from eyeray.score.shards import LABEL_SEPARATOR

EXPLANATIONS_DIR = "explanations"
OVERLAY_MAX_SIDE = 1024  # overlays are for review on screen, not full-resolution copies
HEATMAPS = "heatmaps"  # per row: float16 (k, h, w), k maps of the classes in EXPLAINED (k = 0: none)
EXPLAINED = "explained_classes"  # per row: the explained class names, joined by LABEL_SEPARATOR


def heatmap_column(maps: list[np.ndarray]) -> np.ndarray:
    """One object array with an (k, h, w) array per row (np.array would merge equal shapes)."""
    out = np.empty(len(maps), dtype=object)
    for i, m in enumerate(maps):
        out[i] = np.asarray(m, np.float16)
    return out


def draw(
    batch: dict[str, np.ndarray],
    output: str,
    key: str,
    max_pixels: int = imaging.DEFAULT_MAX_PIXELS,
    prefix: str = "",
    reader: imaging.Reader | None = None,
) -> dict[str, np.ndarray]:
    """Ray Data batch function: write OUTPUT/explanations/KEY/<hash of path>[-f<frame>]-<class>.png for
    every explained row (a volume's B-scan: its frame) and class, and replace the heatmap columns by
    `explanations` (the overlays' paths relative to OUTPUT). Names hash the path and class, so a
    retried batch overwrites its own files. A file that cannot be read again keeps its row, without
    an overlay. `prefix`: one task's columns in a routed run (`eyeray.score.routing`, "oct::"); its
    name goes in the file names. `reader`: how the originals are read (a PACS's), when storage cannot."""
    maps, explained = batch.pop(prefix + HEATMAPS), batch.pop(prefix + EXPLAINED)
    tag = prefix.replace(":", "") + "-" if prefix else ""
    written = []
    frames = batch.get("frame", np.full(len(batch["path"]), -1))
    for path, frame, heat, names in zip(batch["path"], frames, maps, explained):
        files = []
        original = (
            imaging.read_thumbnail(str(path), OVERLAY_MAX_SIDE, max_pixels, int(frame), reader)[0] if names else None
        )
        if original is not None:  # None: gone or changed since it was scored
            digest = hashlib.sha1(str(path).encode()).hexdigest()[:16] + (f"-f{int(frame)}" if frame >= 0 else "")
            for heatmap, name in zip(heat, str(names).split(LABEL_SEPARATOR)):
                relative = f"{EXPLANATIONS_DIR}/{key}/{digest}-{tag}{name}.png"
                storage.write_bytes(
                    storage.join(output, relative), overlay_png(original, np.asarray(heatmap, np.float32))
                )
                files.append(relative)
        written.append(LABEL_SEPARATOR.join(files))
    return {**batch, prefix + "explanations": np.array(written, dtype=object)}
