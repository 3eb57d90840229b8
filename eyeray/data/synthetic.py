"""Synthetic retinal images in the real datasets' layouts: the embedded default.

A job run without `--data` trains on a small generated dataset written to disk exactly as the
public dataset lays it out (Kermany class folders, AIROGS class folders, the ODIR-5K sheet), so
the real reader, decoder, trainer and evaluator all run with no download. The images are cartoons
of OCT B-scans and fundus photographs, each class drawn with its textbook sign, big enough to
survive a resize to 64 px, and randomised enough that a classifier has something to learn.

Nothing here branches on a task name: the drawer is chosen by `spec.demo.modality`, the writer
by `spec.layout`, and each class's look by its name in a painter table.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from eyeray import storage
from eyeray.tasks import TaskSpec

log = logging.getLogger(__name__)

JPEG_QUALITY = 90
EYES = ("left", "right")
# Classes that mean "no finding": they never combine with a disease label on one patient.
NORMAL_CLASSES = frozenset({"N", "NORMAL", "NRG"})


# ---------------------------------------------------------------------------------------------
# shared helpers


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: tuple[int, int]) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled, for textures and wobble."""
    coarse = rng.uniform(-1, 1, size=cells).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.BICUBIC))


def _gauss(dist2: np.ndarray, sigma: float) -> np.ndarray:
    return np.exp(-dist2 / (2.0 * sigma * sigma))


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# OCT B-scan
#
# Geometry per column x: Bruch's membrane `bruch(x)`; the RPE sits `lift(x)` above it (drusen and
# CNV lift it); the retina spans `thick(x)` above the RPE. Painters change that geometry or add
# cysts, and `_render_oct` turns it into pixels, so painters never depend on each other's order.

# Relative depth inside the retina (0 = inner surface, 1 = RPE) -> reflectivity: bright nerve
# fibre layer, grey plexiform layers, dark nuclear layers, bright ellipsoid zone.
_OCT_LAYER_DEPTH = np.array([0.0, 0.04, 0.14, 0.24, 0.36, 0.46, 0.54, 0.64, 0.84, 0.9, 0.94, 1.0])
_OCT_LAYER_LEVEL = np.array([0.95, 0.8, 0.55, 0.38, 0.5, 0.24, 0.5, 0.16, 0.18, 0.7, 0.3, 0.5])


@dataclass
class _OctScene:
    rng: np.random.Generator
    h: int
    w: int
    fovea_x: float
    bruch: np.ndarray
    thick: np.ndarray
    lift: np.ndarray
    fill_level: float = 0.45  # reflectivity of the material between the lifted RPE and Bruch
    fill_texture: float = 0.1  # how irregular that material is
    cysts: list[tuple[float, float, float, float, float]] = field(default_factory=list)
    # (x, depth 0..1, x radius px, y radius as a fraction of the local thickness, darkness)

    @property
    def x(self) -> np.ndarray:
        return np.arange(self.w, dtype=np.float32)

    def bump(self, centre: float, sigma: float) -> np.ndarray:
        return _gauss((self.x - centre) ** 2, sigma)


def _oct_scene(rng: np.random.Generator, h: int, w: int) -> _OctScene:
    """A healthy retina with random placement, tilt, curvature and foveal pit."""
    x = np.arange(w, dtype=np.float32)
    u = (x - w / 2) / w
    fovea_x = w * (0.5 + rng.uniform(-0.08, 0.08))
    bruch = (
        h * rng.uniform(0.6, 0.7)
        + h * rng.uniform(-0.1, 0.1) * u
        + h * rng.uniform(-0.3, 0.15) * u * u
        + h * 0.012 * _smooth_noise(rng, 1, w, (1, 6))[0]
    )
    thick0 = h * rng.uniform(0.24, 0.3)
    pit = rng.uniform(0.45, 0.65) * _gauss((x - fovea_x) ** 2, w * rng.uniform(0.035, 0.055))
    shoulders = 0.08 * _gauss((np.abs(x - fovea_x) - w * 0.09) ** 2, w * 0.05)
    thick = thick0 * (1.0 - pit + shoulders + 0.12 * u)  # thicker nasally, towards the disc
    return _OctScene(rng, h, w, fovea_x, bruch, thick, np.zeros(w, np.float32))


def _oct_normal(scene: _OctScene) -> None:
    """A healthy scan: the base scene as drawn."""


def _oct_drusen(scene: _OctScene) -> None:
    """Drusen: several small dome-shaped RPE elevations, filled with mid-grey material."""
    rng, h, w = scene.rng, scene.h, scene.w
    n = int(rng.integers(5, 9))
    spread = w * rng.uniform(0.25, 0.35)  # spaced apart, so they read as separate domes
    for centre in scene.fovea_x + np.linspace(-spread, spread, n) + rng.normal(0, w * 0.01, n):
        height = h * rng.uniform(0.07, 0.1)
        scene.lift = np.maximum(scene.lift, height * scene.bump(centre, w * rng.uniform(0.02, 0.028)))
    scene.fill_level, scene.fill_texture = rng.uniform(0.42, 0.55), 0.1


def _oct_dme(scene: _OctScene) -> None:
    """Diabetic macular oedema: a thickened retina with dark intraretinal cysts."""
    rng, w = scene.rng, scene.w
    swell = rng.uniform(0.5, 0.9) * scene.bump(scene.fovea_x + w * rng.uniform(-0.05, 0.05), w * 0.12)
    scene.thick = scene.thick + scene.thick.max() * swell
    for _ in range(rng.integers(4, 8)):
        x, depth = scene.fovea_x + w * rng.uniform(-0.18, 0.18), rng.uniform(0.3, 0.65)
        size = (w * rng.uniform(0.022, 0.045), rng.uniform(0.12, 0.22))
        scene.cysts.append((x, depth, *size, rng.uniform(0.85, 0.97)))


def _oct_cnv(scene: _OctScene) -> None:
    """Choroidal neovascularisation: one bright irregular mass lifting the retina, maybe fluid."""
    rng, h, w = scene.rng, scene.h, scene.w
    centre = scene.fovea_x + w * rng.uniform(-0.1, 0.1)
    sigma = w * rng.uniform(0.045, 0.07)
    wobble = 1.0 + 0.25 * _smooth_noise(rng, 1, w, (1, 24))[0]
    scene.lift = np.maximum(scene.lift, h * rng.uniform(0.18, 0.26) * scene.bump(centre, sigma) * wobble)
    scene.fill_level, scene.fill_texture = rng.uniform(0.8, 0.95), 0.45
    if rng.random() < 0.4:  # subretinal fluid: a thin, flat, greyish pocket on top of the mass
        scene.cysts.append((centre + rng.uniform(-0.5, 0.5) * sigma, 0.9, sigma * 1.2, 0.07, 0.7))


def _render_oct(scene: _OctScene) -> np.ndarray:
    """Layers, RPE, sub-RPE material, choroid and cysts from the geometry, then speckle."""
    rng, h, w = scene.rng, scene.h, scene.w
    y = np.arange(h, dtype=np.float32)[:, None]
    rpe = scene.bruch - scene.lift
    top = rpe - scene.thick
    depth = (y - top) / np.maximum(rpe - top, 1.0)
    levels = _OCT_LAYER_LEVEL * rng.uniform(0.85, 1.15, size=_OCT_LAYER_LEVEL.shape)
    img = np.full((h, w), 0.04, np.float32)  # vitreous
    inside = (depth >= 0) & (depth < 1)
    img[inside] = np.interp(depth[inside], _OCT_LAYER_DEPTH, levels)

    band = max(1.5, h * 0.018)
    fill = scene.fill_level * (1 + scene.fill_texture * _smooth_noise(rng, h, w, (h // 6, w // 6)))
    sub_rpe = (y > rpe) & (y < scene.bruch)
    img[sub_rpe] = fill[sub_rpe]
    img[np.abs(y - rpe) <= band] = rng.uniform(0.9, 1.0)
    lifted = scene.lift > 1.5
    img[(np.abs(y - scene.bruch) <= 0.8) & lifted] = 0.75

    below = y > scene.bruch + 0.8
    dense = scene.fill_level > 0.7  # dense (bright) sub-RPE tissue shadows the choroid below it
    shadow = 1.0 - 0.6 * np.clip(scene.lift / (h * 0.1), 0, 1) * dense
    choroid = 0.38 * np.exp(-(y - scene.bruch) / (h * 0.12)) * (1 + 0.3 * _smooth_noise(rng, h, w, (h // 10, w // 10)))
    img = np.where(below, choroid * shadow, img)

    for cx, cd, rx, ry_frac, dark in scene.cysts:
        i = int(np.clip(cx, 0, w - 1))
        cy = top[i] + cd * (rpe[i] - top[i])
        ry = max(2.0, ry_frac * (rpe[i] - top[i]))
        mask = ((np.arange(w) - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1
        img[mask & inside] *= 1 - dark

    for _ in range(rng.integers(2, 6)):  # vessel shadows: faint dark columns
        img *= 1 - 0.35 * _gauss((np.arange(w) - rng.uniform(0, w)) ** 2, w * 0.004) * (y > top)

    img = img * rng.uniform(0.8, 1.15) * rng.gamma(8.0, 1 / 8.0, size=img.shape)
    return img + rng.normal(0, 0.03, size=img.shape)


def _draw_oct(classes: set[str], rng: np.random.Generator, size: int, eye: str) -> np.ndarray:
    """A size x 2*size B-scan through the fovea; the left eye is the mirror image."""
    grey = _to_uint8(_render_oct(_paint("oct", _oct_scene(rng, size, 2 * size), classes)))
    if eye == "left":
        grey = grey[:, ::-1]
    return np.repeat(grey[:, :, None], 3, axis=2)


# ---------------------------------------------------------------------------------------------
# Colour fundus photograph
#
# Painters set parameters (cup size, vessel calibre, pallor, blur) or append shapes; the renderer
# draws background, then shapes by depth (under the disc, disc, cup, vessels, lesions), then optics.

_Z_UNDER_DISC, _Z_DISC, _Z_CUP, _Z_VESSELS, _Z_LESION = 0, 1, 2, 3, 4
_Shape = tuple[int, str, list, tuple[int, int, int, int]]  # (z, "ellipse" | "polygon", points, RGBA)


def _ellipse(z: int, xy: np.ndarray, r: float, rgba: tuple[int, ...], squash: float = 1.0) -> _Shape:
    x, y = xy
    return (z, "ellipse", [x - r, y - r * squash, x + r, y + r * squash], rgba)


@dataclass
class _FundusScene:
    rng: np.random.Generator
    size: int
    side: int  # +1 right eye (disc on the image's right), -1 left eye
    centre: np.ndarray
    radius: float
    disc: np.ndarray
    disc_r: float
    macula: np.ndarray
    base_rgb: np.ndarray
    cup_ratio: float = 0.35
    vessel_width: float = 1.0  # calibre multiplier
    vessel_bend: float = 1.0  # how much the arcades curve around the macula
    vessel_rgb: tuple[int, int, int] = (120, 22, 18)
    pallor: float = 0.0
    tessellation: float = 0.0
    blur: float = 0.0  # Gaussian radius as a fraction of the image size
    haze: float = 0.0
    shapes: list[_Shape] = field(default_factory=list)

    def spot(self, z: int, xy: np.ndarray, r: float, rgba: tuple[int, ...], squash: float = 1.0) -> None:
        self.shapes.append(_ellipse(z, xy, r, rgba, squash))

    def random_point(self, around: np.ndarray, spread: float) -> np.ndarray:
        """A point near `around` that stays inside the retina."""
        for _ in range(20):
            p = around + self.rng.normal(0, spread, 2)
            if np.linalg.norm(p - self.centre) < self.radius * 0.85:
                return p
        return around.copy()


def _fundus_scene(rng: np.random.Generator, size: int, eye: str) -> _FundusScene:
    """A healthy fundus at a random framing, pigmentation and optic-disc position."""
    side = 1 if eye == "right" else -1
    centre = size / 2 + rng.normal(0, size * 0.015, 2)
    radius = size * rng.uniform(0.44, 0.49)
    disc = centre + np.array([side * radius * rng.uniform(0.48, 0.58), radius * rng.uniform(-0.1, 0.06)])
    macula = centre + np.array([-side * radius * rng.uniform(0.0, 0.12), radius * rng.uniform(-0.02, 0.1)])
    base = np.array([0.82, 0.36, 0.14]) * rng.uniform(0.85, 1.1) + rng.normal(0, 0.03, 3)
    return _FundusScene(
        rng,
        size,
        side,
        centre,
        radius,
        disc,
        size * rng.uniform(0.085, 0.1),
        macula,
        base,
        cup_ratio=rng.uniform(0.15, 0.35),
        tessellation=rng.uniform(0, 0.2),
        pallor=rng.uniform(0, 0.1),
    )


def _fundus_normal(scene: _FundusScene) -> None:
    """A healthy fundus: the base scene as drawn."""


def _fundus_diabetic(scene: _FundusScene) -> None:
    """Diabetic retinopathy: dark red dot/blot haemorrhages and bright yellow hard exudates."""
    rng, s = scene.rng, scene.size
    for _ in range(rng.integers(8, 16)):
        p = scene.random_point(scene.macula, scene.radius * 0.45)
        scene.spot(_Z_LESION, p, s * rng.uniform(0.014, 0.026), (105, 8, 6, 235))
    for _ in range(rng.integers(2, 4)):  # exudates come in clusters
        c = scene.random_point(scene.macula, scene.radius * 0.35)
        for _ in range(rng.integers(3, 6)):
            scene.spot(_Z_LESION, scene.random_point(c, s * 0.03), s * rng.uniform(0.01, 0.018), (255, 230, 95, 240))


def _fundus_glaucoma(scene: _FundusScene) -> None:
    """Glaucomatous cupping: the pale cup fills most of a slightly larger optic disc."""
    scene.cup_ratio = scene.rng.uniform(0.68, 0.85)
    scene.disc_r *= scene.rng.uniform(1.0, 1.15)


def _fundus_cataract(scene: _FundusScene) -> None:
    """Cataract: the lens opacity blurs and veils the whole view."""
    scene.blur = scene.rng.uniform(0.03, 0.05)
    scene.haze = scene.rng.uniform(0.3, 0.5)


def _fundus_amd(scene: _FundusScene) -> None:
    """Age-related macular degeneration: a crowd of yellow drusen on and around the macula."""
    rng, s = scene.rng, scene.size
    scene.spot(_Z_LESION, scene.macula, s * rng.uniform(0.08, 0.11), (235, 200, 110, 90))  # confluent
    for _ in range(rng.integers(22, 34)):
        p = scene.random_point(scene.macula, s * 0.07)
        scene.spot(_Z_LESION, p, s * rng.uniform(0.012, 0.022), (245, 222, 130, 225))


def _fundus_hypertensive(scene: _FundusScene) -> None:
    """Hypertensive retinopathy: narrowed, straightened, copper-coloured vessels."""
    scene.vessel_width = scene.rng.uniform(0.25, 0.4)
    scene.vessel_bend = scene.rng.uniform(0.1, 0.3)
    scene.vessel_rgb = (185, 80, 45)


def _fundus_myopia(scene: _FundusScene) -> None:
    """Pathological myopia: a pale atrophic crescent beside the disc and a thin, tessellated fundus."""
    rng = scene.rng
    r = scene.disc_r * rng.uniform(1.5, 1.9)
    at = scene.disc + np.array([-scene.side * scene.disc_r * rng.uniform(0.5, 0.8), rng.normal(0, scene.disc_r * 0.2)])
    scene.spot(_Z_UNDER_DISC, at, r, (242, 228, 200, 245), squash=rng.uniform(1.0, 1.3))
    scene.pallor = rng.uniform(0.35, 0.55)
    scene.tessellation = rng.uniform(0.7, 1.0)


def _fundus_other(scene: _FundusScene) -> None:
    """Other findings, stood in for by a grey chorioretinal scar with pigment clumps."""
    rng, s = scene.rng, scene.size
    c = scene.random_point(scene.centre, scene.radius * 0.4)
    r = s * rng.uniform(0.085, 0.12)
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    radii = 0.9 + 0.35 * _smooth_noise(rng, 1, 24, (1, 5))[0]  # an irregular but rounded outline
    grey = int(rng.integers(140, 180))
    for scale, rgba in ((r * 1.3, (40, 26, 20, 240)), (r, (grey, grey, grey, 240))):
        outline = [
            (c[0] + scale * q * np.cos(a), c[1] + scale * q * np.sin(a)) for a, q in zip(angles, radii, strict=True)
        ]
        scene.shapes.append((_Z_LESION, "polygon", outline, rgba))  # a pigmented rim round a grey scar
    for _ in range(rng.integers(2, 5)):
        scene.spot(_Z_LESION, c + rng.normal(0, r * 0.4, 2), s * rng.uniform(0.012, 0.02), (50, 32, 24, 230))


def _fundus_background(scene: _FundusScene) -> np.ndarray:
    """Orange-red retina with vignetting, uneven lighting, tessellation, pallor and a dark macula."""
    rng, s = scene.rng, scene.size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    rr2 = ((xx - scene.centre[0]) ** 2 + (yy - scene.centre[1]) ** 2) / scene.radius**2
    light = 1.0 - rng.uniform(0.35, 0.55) * rr2 + 0.15 * _smooth_noise(rng, s, s, (3, 3))
    rgb = scene.base_rgb[None, None, :] * light[:, :, None]
    if scene.tessellation > 0:  # choroidal vessels showing through a thin pigment layer
        warp = 6.0 * _smooth_noise(rng, s, s, (4, 4))
        angle = rng.uniform(0, np.pi)
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / (s * rng.uniform(0.07, 0.1)))
        stripes = 0.5 + 0.5 * np.sin(phase + warp)
        rgb = rgb * (1 - 0.35 * scene.tessellation * stripes[:, :, None] * np.array([0.6, 1.0, 1.0]))
    pale = np.array([0.95, 0.7, 0.5])
    rgb = rgb * (1 - scene.pallor) + pale * light[:, :, None] * scene.pallor
    md2 = (xx - scene.macula[0]) ** 2 + (yy - scene.macula[1]) ** 2
    rgb = rgb * (1 - rng.uniform(0.3, 0.45) * _gauss(md2, s * 0.055))[:, :, None]
    return rgb


def _vessel_paths(scene: _FundusScene) -> list[tuple[np.ndarray, float]]:
    """Vessel centre lines leaving the disc: four arcades bending around the macula, a few nasal."""
    rng, side = scene.rng, scene.side
    temporal = np.array([-side, 0.0])
    starts = [  # initial heading, pull towards `temporal` (bend), calibre as a fraction of size
        ((-0.25 * side, -1.0), 0.09, 0.03),  # veins
        ((-0.45 * side, -1.0), 0.08, 0.022),  # arteries
        ((-0.25 * side, 1.0), 0.09, 0.03),
        ((-0.45 * side, 1.0), 0.08, 0.022),
        ((side, -0.6), 0.01, 0.016),
        ((side, 0.6), 0.01, 0.016),
        ((0.2 * side, -1.0), 0.03, 0.011),
        ((0.2 * side, 1.0), 0.03, 0.011),
    ]
    step = scene.radius * rng.uniform(0.045, 0.055)
    paths = []
    for heading, pull, calibre in starts:
        h = np.array(heading) / np.linalg.norm(heading) + rng.normal(0, 0.12, 2)
        p = scene.disc + h * scene.disc_r * max(0.3, scene.cup_ratio)  # vessels climb out at the cup rim
        pts = [p]
        for _ in range(rng.integers(14, 22)):
            h = h + pull * scene.vessel_bend * temporal + rng.normal(0, 0.035 * scene.vessel_bend, 2)
            h /= np.linalg.norm(h)
            p = p + step * h
            pts.append(p)
        paths.append((np.array(pts), calibre))
    return paths


def _draw_vessels(draw: ImageDraw.ImageDraw, scene: _FundusScene) -> None:
    """Each vessel tapers: full calibre over the first half, thinner over the rest."""
    r, g, b = scene.vessel_rgb
    for pts, calibre in _vessel_paths(scene):
        width = max(1.0, calibre * scene.size * scene.vessel_width)
        half = len(pts) // 2
        for seg, w in ((pts[: half + 1], width), (pts[half:], width * 0.6)):
            draw.line([tuple(q) for q in seg], fill=(r, g, b, 225), width=max(1, round(w)), joint="curve")


def _disc_shapes(scene: _FundusScene) -> list[_Shape]:
    """Optic disc: a soft yellow-orange rim around a central cup, paler the wider it is."""
    d, r = scene.disc, scene.disc_r
    cup_at = d + np.array([-scene.side * r * 0.1, 0]) + scene.rng.normal(0, r * 0.05, 2)
    white = np.clip((scene.cup_ratio - 0.15) / 0.6, 0, 1)  # a deep, wide cup bares the pale lamina
    cup_rgb = np.array([250, 212, 140]) * (1 - white) + np.array([255, 250, 238]) * white
    return [
        _ellipse(_Z_DISC, d, r * 1.25, (235, 150, 80, 110), squash=1.08),
        _ellipse(_Z_DISC, d, r, (250, 190, 110, 240), squash=1.08),
        _ellipse(_Z_CUP, cup_at, r * scene.cup_ratio, (*cup_rgb.astype(int).tolist(), 245), squash=1.1),
    ]


def _draw_shapes(draw: ImageDraw.ImageDraw, shapes: list[_Shape]) -> None:
    for _, kind, points, rgba in shapes:
        (draw.ellipse if kind == "ellipse" else draw.polygon)(points, fill=rgba)


def _render_fundus(scene: _FundusScene) -> np.ndarray:
    """Background, shapes by depth with the vessels over the disc, optics, then the round field stop."""
    rng, s = scene.rng, scene.size
    shapes = sorted(scene.shapes + _disc_shapes(scene), key=lambda shape: shape[0])
    img = Image.fromarray(_to_uint8(_fundus_background(scene)), "RGB")
    draw = ImageDraw.Draw(img, "RGBA")
    _draw_shapes(draw, [shape for shape in shapes if shape[0] < _Z_VESSELS])
    _draw_vessels(draw, scene)
    _draw_shapes(draw, [shape for shape in shapes if shape[0] > _Z_VESSELS])
    img = img.filter(ImageFilter.GaussianBlur(max(0.6, scene.blur * s)))
    rgb = np.asarray(img, np.float32) / 255.0
    rgb = rgb * (1 - scene.haze) + np.array([0.85, 0.72, 0.55]) * scene.haze
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    dist = np.sqrt((xx - scene.centre[0]) ** 2 + (yy - scene.centre[1]) ** 2)
    stop = np.clip(scene.radius - dist, 0, 1.0)[:, :, None]
    rgb = rgb * rng.uniform(0.85, 1.1) + rng.normal(0, 0.012, rgb.shape)
    return _to_uint8(rgb * stop)


def _draw_fundus(classes: set[str], rng: np.random.Generator, size: int, eye: str) -> np.ndarray:
    """A size x size colour fundus photograph of one eye."""
    return _render_fundus(_paint("fundus", _fundus_scene(rng, size, eye), classes))


# ---------------------------------------------------------------------------------------------
# registries: modality -> how to draw and name files; class name -> how it looks


PAINTERS: dict[str, dict[str, Callable]] = {
    "oct": {"NORMAL": _oct_normal, "DRUSEN": _oct_drusen, "DME": _oct_dme, "CNV": _oct_cnv},
    "fundus": {
        "N": _fundus_normal,
        "NRG": _fundus_normal,
        "D": _fundus_diabetic,
        "G": _fundus_glaucoma,
        "RG": _fundus_glaucoma,
        "C": _fundus_cataract,
        "A": _fundus_amd,
        "H": _fundus_hypertensive,
        "M": _fundus_myopia,
        "O": _fundus_other,
    },
}


@dataclass(frozen=True)
class Modality:
    """How one imaging modality is drawn, stored and named, as its public dataset does it."""

    draw: Callable[[set[str], np.random.Generator, int, str], np.ndarray]
    pil_mode: str  # "L": greyscale JPEGs, as Kermany ships them
    images_per_patient: tuple[int, int]  # inclusive range
    file_name: Callable[[str, int, str, int], str]  # (class, patient id, eye, n) -> file name
    patient_ids: tuple[int, int]  # id range, as the dataset numbers its patients


MODALITIES: dict[str, Modality] = {
    "oct": Modality(
        draw=_draw_oct,
        pil_mode="L",
        images_per_patient=(1, 3),
        file_name=lambda cls, pid, eye, n: f"{cls}-{pid}-{n}.jpeg",
        patient_ids=(100_000, 9_999_999),
    ),
    "fundus": Modality(
        draw=_draw_fundus,
        pil_mode="RGB",
        images_per_patient=(1, 2),
        file_name=lambda cls, pid, eye, n: f"{pid}_{eye}.jpg",
        patient_ids=(0, 4999),
    ),
}

# ODIR-5K per-eye diagnostic keywords for each label (the sheet's vocabulary).
KEYWORDS: dict[str, tuple[str, ...]] = {
    "N": ("normal fundus",),
    "D": (
        "mild nonproliferative retinopathy",
        "moderate non proliferative retinopathy",
        "severe nonproliferative retinopathy",
        "proliferative diabetic retinopathy",
    ),
    "G": ("glaucoma", "suspected glaucoma"),
    "C": ("cataract",),
    "A": ("dry age-related macular degeneration", "wet age-related macular degeneration"),
    "H": ("hypertensive retinopathy",),
    "M": ("pathological myopia", "high myopia"),
    "O": ("macular epiretinal membrane", "laser spot", "chorioretinal atrophy", "vitreous degeneration"),
}
ODIR_COLUMNS = [  # before the label columns, which are spec.classes
    "ID",
    "Patient Age",
    "Patient Sex",
    "Left-Fundus",
    "Right-Fundus",
    "Left-Diagnostic Keywords",
    "Right-Diagnostic Keywords",
]
KEYWORD_SEPARATOR = "，"  # ODIR-5K joins several keywords with a full-width comma


def _modality_name(spec_or_modality: TaskSpec | str) -> str:
    return spec_or_modality if isinstance(spec_or_modality, str) else spec_or_modality.demo.modality


def _modality(spec_or_modality: TaskSpec | str) -> Modality:
    name = _modality_name(spec_or_modality)
    try:
        return MODALITIES[name]
    except KeyError:
        raise ValueError(f"no synthetic generator for modality {name!r}; known: {', '.join(MODALITIES)}") from None


def _paint(modality: str, scene, classes: set[str]):
    """Apply each class's painter to the scene (sorted, so the random draws are reproducible)."""
    for name in sorted(classes):
        try:
            painter = PAINTERS[modality][name]
        except KeyError:
            known = ", ".join(PAINTERS[modality])
            raise ValueError(f"no synthetic look for class {name!r} in {modality} images; known: {known}") from None
        painter(scene)
    return scene


def draw(
    spec_or_modality: TaskSpec | str,
    classes: set[str] | str,
    rng: np.random.Generator,
    size: int = 128,
    *,
    eye: str | None = None,
) -> np.ndarray:
    """One HxWx3 uint8 image showing `classes` (OCT: size x 2*size, fundus: size x size).

    `eye` ("left"/"right") mirrors the anatomy; None picks one at random.
    """
    classes = {classes} if isinstance(classes, str) else set(classes)
    eye = eye or EYES[int(rng.integers(2))]
    if eye not in EYES:
        raise ValueError(f"eye must be one of {EYES}, not {eye!r}")
    return _modality(spec_or_modality).draw(classes, rng, size, eye)


# ---------------------------------------------------------------------------------------------
# layouts


def _save(pixels: np.ndarray, path: Path, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").convert(mode).save(path, "JPEG", quality=JPEG_QUALITY)


def _patient_ids(rng: np.random.Generator, modality: Modality, n: int) -> list[int]:
    """Distinct ids, so that no patient straddles two classes or two splits."""
    lo, hi = modality.patient_ids
    return [int(i) + lo for i in rng.choice(hi - lo + 1, size=n, replace=False)]


def _write_class_folders(spec: TaskSpec, root: Path, per_class: int, size: int, rng: np.random.Generator) -> None:
    """One folder per class; each patient gets 1..k images (a patient's eyes or repeated scans)."""
    modality = _modality(spec)
    low, high = modality.images_per_patient
    ids = iter(_patient_ids(rng, modality, per_class * spec.num_classes))
    for cls in spec.classes:
        written = 0
        while written < per_class:
            pid = next(ids)
            count = min(int(rng.integers(low, high + 1)), per_class - written)
            eyes = rng.permutation(EYES)
            for n in range(1, count + 1):
                eye = str(eyes[(n - 1) % len(EYES)])
                name = modality.file_name(cls, pid, eye, n)
                _save(modality.draw({cls}, rng, size, eye), root / cls / name, modality.pil_mode)
            written += count


def _label_sets(spec: TaskSpec, per_class: int, rng: np.random.Generator) -> list[set[str]]:
    """Patients' label sets: a normal class alone, or one disease plus sometimes a second.

    Each disease is the main label of 80% of `per_class` patients, and a quarter of all disease
    patients get a second disease at random, so each label ends with about 0.8 * 1.25 = 1 x
    `per_class` patients.
    """
    diseases = [c for c in spec.classes if c not in NORMAL_CLASSES]
    patients: list[set[str]] = []
    for cls in spec.classes:
        if cls in NORMAL_CLASSES:
            patients += [{cls} for _ in range(per_class)]
            continue
        for _ in range(round(per_class * 0.8)):
            labels = {cls}
            if len(diseases) > 1 and rng.random() < 0.25:
                labels.add(str(rng.choice([d for d in diseases if d != cls])))
            patients.append(labels)
    return [patients[i] for i in rng.permutation(len(patients))]


def _keywords(labels: set[str], spec: TaskSpec, rng: np.random.Generator) -> str:
    words = [str(rng.choice(KEYWORDS[c])) for c in spec.classes if c in labels]
    return KEYWORD_SEPARATOR.join(words)


def _write_odir_sheet(spec: TaskSpec, root: Path, per_class: int, size: int, rng: np.random.Generator) -> None:
    """images/<id>_{left,right}.jpg and data.csv with the ODIR-5K columns, labels per patient."""
    import pandas as pd

    modality = _modality(spec)
    label_sets = _label_sets(spec, per_class, rng)
    rows = []
    for pid, labels in zip(_patient_ids(rng, modality, len(label_sets)), label_sets, strict=True):
        row = {"ID": pid, "Patient Age": int(rng.integers(30, 86)), "Patient Sex": str(rng.choice(["Male", "Female"]))}
        for eye in EYES:
            name = modality.file_name("", pid, eye, 1)
            _save(modality.draw(labels, rng, size, eye), root / "images" / name, modality.pil_mode)
            row[f"{eye.capitalize()}-Fundus"] = name
            row[f"{eye.capitalize()}-Diagnostic Keywords"] = _keywords(labels, spec, rng)
        row.update({c: int(c in labels) for c in spec.classes})
        rows.append(row)
    sheet = pd.DataFrame(rows, columns=[*ODIR_COLUMNS, *spec.classes]).sort_values("ID")
    sheet.to_csv(root / "data.csv", index=False, encoding="utf-8")


WRITERS: dict[str, Callable[[TaskSpec, Path, int, int, np.random.Generator], None]] = {
    "class_folders": _write_class_folders,
    "odir_sheet": _write_odir_sheet,
}


def make_dataset(
    spec: TaskSpec,
    root: str | Path,
    *,
    images_per_class: int | None = None,
    image_size: int = 128,
    seed: int = 0,
) -> Path:
    """Write a synthetic dataset for `spec` under `root` in the real dataset's layout; return root.

    `images_per_class` counts images per class folder (class_folders) or patients per label
    (sheet layouts, approximately); it defaults to `spec.demo.images_per_class`.
    """
    try:
        writer = WRITERS[spec.layout]
    except KeyError:
        raise ValueError(f"no synthetic writer for layout {spec.layout!r}; known: {', '.join(WRITERS)}") from None
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    per_class = spec.demo.images_per_class if images_per_class is None else images_per_class
    writer(spec, root, per_class, image_size, np.random.default_rng(seed))
    return root


def demo_dataset(spec: TaskSpec, output: str, seed: int = 0) -> str:
    """The embedded default a run trains on without `--data`: a synthetic dataset beside the run
    (OUTPUT/demo_data, reused by --resume and by every trial of a sweep), written to a staging
    folder and renamed so a crash never leaves half a dataset. Local even for s3:// runs."""
    if storage.is_remote(output):
        return str(make_dataset(spec, tempfile.mkdtemp(prefix="eyeray-demo-"), seed=seed))
    data = Path(output, "demo_data")
    if not data.exists():
        log.info("no --data: generating a synthetic %s dataset in %s", spec.name, data)
        data.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".demo_data-", dir=data.parent))
        staging.chmod(0o755)
        make_dataset(spec, staging, seed=seed)
        staging.rename(data)
    return str(data)
