"""Synthetic OCT B-scans and fundus photographs in the real datasets' layouts.

The embedded default: with no `--data`, a job writes one of these datasets and runs the real
code path on it (layout reader, decode, Ray Train, evaluation), with no download. Each class
draws the lesion a clinician would look for (DME cysts, drusen bumps, a CNV mass; a large optic
cup, haemorrhages, cataract haze...) with random position, size and contrast, so a small CNN can
learn the classes but has to look for them.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from eyeray.tasks import TaskSpec

Rng = np.random.Generator

# --------------------------------------------------------------------------- OCT B-scans


def _oct_scan(classes: set[str], rng: Rng, size: int) -> np.ndarray:
    """A Kermany-like greyscale B-scan, twice as wide as tall."""
    h, w = size, 2 * size
    x = np.arange(w, dtype=np.float32)
    y = np.arange(h, dtype=np.float32)[:, None]
    fovea = w * rng.uniform(0.4, 0.6)
    tilt = rng.uniform(-0.08, 0.08) * h
    top = h * rng.uniform(0.3, 0.42) + tilt * (x / w - 0.5) + h * 0.03 * np.sin(x / w * rng.uniform(2, 5))
    top = top + h * 0.07 * np.exp(-(((x - fovea) / (w * 0.06)) ** 2))  # foveal pit
    thickness = np.full(w, h * rng.uniform(0.2, 0.25), np.float32)
    rpe_lift = np.zeros(w, np.float32)
    lesion = OCT_LESIONS
    for name in classes:
        if name in lesion:
            top, thickness, rpe_lift = lesion[name].shape(x, h, w, fovea, rng, top, thickness, rpe_lift)
    rpe = top + thickness - rpe_lift
    img = np.full((h, w), 12.0, np.float32)
    retina = (y >= top) & (y < rpe)
    depth = np.clip((y - top) / np.maximum(rpe - top, 1), 0, 1)
    img = np.where(retina, 80 + 50 * np.cos(depth * np.pi * 3) ** 2, img)  # inner layers
    img = np.where(np.abs(y - top) < 1.5, 190, img)  # ILM
    img = np.where(np.abs(y - rpe) < h * 0.025, 235, img)  # bright RPE band
    below = y > rpe + h * 0.025
    img = np.where(below, 140 * np.exp(-(y - rpe) / (h * 0.12)) + 15, img)  # choroid fading out
    for name in classes:
        if name in lesion:
            img = lesion[name].paint(img, x, y, top, rpe, h, w, fovea, rng)
    img *= rng.uniform(0.8, 1.15)
    img *= rng.gamma(4.0, 0.25, img.shape)  # speckle
    return np.clip(img, 0, 255).astype(np.uint8)


class _Lesion:
    """One OCT finding: how it deforms the layers, and what it paints on top."""

    def shape(self, x, h, w, fovea, rng, top, thickness, rpe_lift):
        return top, thickness, rpe_lift

    def paint(self, img, x, y, top, rpe, h, w, fovea, rng):
        return img


class _Drusen(_Lesion):
    def shape(self, x, h, w, fovea, rng, top, thickness, rpe_lift):
        for cx in rng.uniform(0.15, 0.85, rng.integers(3, 7)) * w:
            rpe_lift = rpe_lift + h * rng.uniform(0.05, 0.09) * np.exp(-(((x - cx) / (w * rng.uniform(0.015, 0.03))) ** 2))
        return top, thickness, rpe_lift


class _Dme(_Lesion):
    def shape(self, x, h, w, fovea, rng, top, thickness, rpe_lift):
        swell = h * rng.uniform(0.08, 0.14) * np.exp(-(((x - fovea) / (w * 0.2)) ** 2))
        return top - swell, thickness + swell, rpe_lift

    def paint(self, img, x, y, top, rpe, h, w, fovea, rng):
        for _ in range(rng.integers(3, 8)):
            cx = fovea + rng.uniform(-0.15, 0.15) * w
            i = int(np.clip(cx, 0, w - 1))
            cy = rng.uniform(0.3, 0.7) * (rpe[i] - top[i]) + top[i]
            rx, ry = w * rng.uniform(0.02, 0.04), h * rng.uniform(0.03, 0.06)
            cyst = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1
            img = np.where(cyst, 18.0, img)
        return img


class _Cnv(_Lesion):
    def shape(self, x, h, w, fovea, rng, top, thickness, rpe_lift):
        self.cx = fovea + rng.uniform(-0.1, 0.1) * w
        self.width = w * rng.uniform(0.06, 0.1)
        bump = h * rng.uniform(0.12, 0.18) * np.exp(-(((x - self.cx) / self.width) ** 2))
        return top - bump, thickness, rpe_lift + bump

    def paint(self, img, x, y, top, rpe, h, w, fovea, rng):
        i = int(np.clip(self.cx, 0, w - 1))
        blob = ((x - self.cx) / (self.width * 1.1)) ** 2 + ((y - rpe[i] - h * 0.06) / (h * 0.1)) ** 2 < 1
        img = np.where(blob, 215.0 + rng.normal(0, 15, img.shape), img)  # fibrovascular mass
        fluid = ((x - self.cx) / (self.width * 0.7)) ** 2 + ((y - rpe[i] + h * 0.05) / (h * 0.04)) ** 2 < 1
        return np.where(fluid, 15.0, img)


OCT_LESIONS: dict[str, _Lesion] = {"DRUSEN": _Drusen(), "DME": _Dme(), "CNV": _Cnv()}

# --------------------------------------------------------------------------- fundus photographs


def _fundus(classes: set[str], rng: Rng, size: int, right_eye: bool = True) -> np.ndarray:
    s = size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    r = np.hypot(xx - 0.5, yy - 0.5)
    tint = rng.uniform(0.85, 1.1, 3) * np.array([205, 85, 35], np.float32)
    base = tint * (1 - 0.6 * (r / 0.46) ** 2)[..., None]
    if "M" in classes:  # myopic pale, tessellated fundus
        stripes = 0.5 + 0.5 * np.sin((xx * np.cos(1.0) + yy * np.sin(1.0)) * s / 3.0)
        base = base * 1.15 + 25 * stripes[..., None]
    img = Image.fromarray(np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    disc = np.array([0.5 + (0.22 if right_eye else -0.22), 0.5 + rng.uniform(-0.04, 0.04)]) * s
    macula = np.array([s - disc[0], disc[1]]) + rng.normal(0, 0.01 * s, 2)
    disc_r = s * rng.uniform(0.085, 0.1)
    for name in classes:
        if name in FUNDUS_BEFORE_VESSELS:
            FUNDUS_BEFORE_VESSELS[name](draw, rng, s, disc, disc_r, macula, right_eye)
    _ellipse(draw, macula, s * 0.07, (110, 35, 15))
    _vessels(draw, rng, s, disc, thin="H" in classes)
    _ellipse(draw, disc, disc_r, (235, 165, 90))  # neuroretinal rim
    cup = rng.uniform(0.72, 0.9) if "G" in classes or "RG" in classes else rng.uniform(0.2, 0.35)
    _ellipse(draw, disc, disc_r * cup, (255, 252, 235))  # pale cup: large in glaucoma
    for name in classes:
        if name in FUNDUS_LESIONS:
            FUNDUS_LESIONS[name](draw, rng, s, disc, disc_r, macula, right_eye)
    if "C" in classes:  # cataract: the whole view blurred and hazy
        img = Image.blend(img.filter(ImageFilter.GaussianBlur(s / 25)), Image.new("RGB", img.size, (200, 190, 170)), 0.35)
    out = np.asarray(img).copy()
    out[r > 0.46] = 0  # the camera's circular field
    return out


def _ellipse(draw: ImageDraw.ImageDraw, centre, rx: float, fill, ry: float | None = None) -> None:
    ry = rx if ry is None else ry
    draw.ellipse([centre[0] - rx, centre[1] - ry, centre[0] + rx, centre[1] + ry], fill=fill)


def _vessels(draw, rng: Rng, s: int, disc, thin: bool) -> None:
    """Four arcades leaving the disc; hypertension: thin, straight, narrowed arteries."""
    for angle in (0.6, -0.6, np.pi - 0.6, np.pi + 0.6):
        angle += rng.normal(0, 0.12)
        bend = 0.0 if thin else rng.uniform(0.6, 1.1) * np.sign(np.sin(angle))
        t = np.linspace(0, 1, 24)
        length = s * 0.42
        theta = angle + bend * t
        xs = disc[0] + np.cumsum(np.cos(theta)) * length / len(t)
        ys = disc[1] + np.cumsum(np.sin(theta)) * length / len(t)
        width = 1 if thin else max(2, s // 45)
        draw.line(list(zip(xs, ys)), fill=(120, 25, 15) if not thin else (150, 60, 30), width=width)


def _dots(draw, rng: Rng, s: int, centre, spread: float, count: tuple[int, int], radius: tuple[float, float], fill):
    for _ in range(rng.integers(*count)):
        p = centre + rng.normal(0, spread * s, 2)
        _ellipse(draw, p, s * rng.uniform(*radius), fill)


def _diabetic(draw, rng, s, disc, disc_r, macula, right_eye):
    _dots(draw, rng, s, np.array([s / 2, s / 2]), 0.16, (8, 15), (0.012, 0.022), (90, 10, 10))  # haemorrhages
    _dots(draw, rng, s, macula, 0.08, (4, 9), (0.008, 0.014), (250, 225, 90))  # hard exudates


def _amd(draw, rng, s, disc, disc_r, macula, right_eye):
    _dots(draw, rng, s, macula, 0.05, (10, 20), (0.01, 0.018), (245, 230, 120))  # drusen at the macula


def _myopia(draw, rng, s, disc, disc_r, macula, right_eye):
    side = -1 if right_eye else 1  # the crescent faces the macula
    _ellipse(draw, disc + np.array([side * disc_r * 0.9, 0]), disc_r * 1.7, (235, 205, 170), ry=disc_r * 1.35)


def _other(draw, rng, s, disc, disc_r, macula, right_eye):
    centre = np.array([s / 2, s / 2]) + rng.uniform(-0.2, 0.2, 2) * s
    _ellipse(draw, centre, s * rng.uniform(0.06, 0.1), (120, 120, 115), ry=s * rng.uniform(0.04, 0.08))


FUNDUS_BEFORE_VESSELS: dict[str, Callable] = {"M": _myopia}
FUNDUS_LESIONS: dict[str, Callable] = {"D": _diabetic, "A": _amd, "O": _other}

# --------------------------------------------------------------------------- layouts


def draw(modality: str, classes: set[str] | str, rng: Rng, size: int = 128, right_eye: bool = True) -> np.ndarray:
    """One image of `modality` ("oct" | "fundus") showing the findings of `classes`."""
    classes = {classes} if isinstance(classes, str) else set(classes)
    if modality == "oct":
        return _oct_scan(classes, rng, size)
    return _fundus(classes, rng, size, right_eye)


def _save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=90)


def _patient_ids(rng: Rng, n: int) -> list[int]:
    return sorted(rng.choice(np.arange(100_000, 9_999_999), size=n, replace=False).tolist())


def _class_folders(spec: TaskSpec, root: Path, per_class: int, size: int, rng: Rng) -> None:
    """Flat layout, one folder per class; several images per patient named as the real data does."""
    oct_like = spec.demo.modality == "oct"
    for cls in spec.classes:
        written, ids = 0, iter(_patient_ids(rng, per_class))
        while written < per_class:
            pid = next(ids)
            images = int(rng.integers(1, 4 if oct_like else 3))  # fundus: one or both eyes
            for n in range(min(images, per_class - written)):
                right = n % 2 == 0
                name = f"{cls}-{pid}-{n + 1}.jpeg" if oct_like else f"{pid}_{'right' if right else 'left'}.jpg"
                _save(draw(spec.demo.modality, cls, rng, size, right_eye=right), root / cls / name)
                written += 1


KEYWORDS = {"N": "normal fundus", "D": "moderate non proliferative retinopathy", "G": "glaucoma",
            "C": "cataract", "A": "age-related macular degeneration", "H": "hypertensive retinopathy",
            "M": "pathological myopia", "O": "epiretinal membrane"}  # fmt: skip
ODIR_COLUMNS = ["ID", "Patient Age", "Patient Sex", "Left-Fundus", "Right-Fundus",
                "Left-Diagnostic Keywords", "Right-Diagnostic Keywords"]  # fmt: skip


def _odir_sheet(spec: TaskSpec, root: Path, per_class: int, size: int, rng: Rng) -> None:
    """images/<id>_{left,right}.jpg + data.csv: N alone, or one or two diseases per patient."""
    diseases = [c for c in spec.classes if c != "N"]
    label_sets = [{"N"}] * per_class
    for disease in diseases:
        for _ in range(per_class):
            extra = rng.choice(diseases) if rng.random() < 0.25 else disease
            label_sets.append({disease, str(extra)})
    rows = []
    for pid, labels in enumerate(label_sets, start=1):
        for eye in ("left", "right"):
            _save(draw("fundus", labels, rng, size, right_eye=eye == "right"), root / "images" / f"{pid}_{eye}.jpg")
        words = ", ".join(KEYWORDS[c] for c in spec.classes if c in labels)
        rows.append([pid, int(rng.integers(40, 80)), str(rng.choice(["Male", "Female"])), f"{pid}_left.jpg",
                     f"{pid}_right.jpg", words, words] + [int(c in labels) for c in spec.classes])  # fmt: skip
    with open(root / "data.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(ODIR_COLUMNS + list(spec.classes))
        writer.writerows(rows)


WRITERS: dict[str, Callable[[TaskSpec, Path, int, int, Rng], None]] = {
    "class_folders": _class_folders,
    "odir_sheet": _odir_sheet,
}


def make_dataset(spec: TaskSpec, root: str | Path, *, images_per_class: int | None = None,
                 image_size: int = 128, seed: int = 0) -> Path:  # fmt: skip
    """Write a synthetic dataset in `spec`'s real layout under `root` and return `root`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    WRITERS[spec.layout](spec, root, images_per_class or spec.demo.images_per_class, image_size, np.random.default_rng(seed))
    return root
