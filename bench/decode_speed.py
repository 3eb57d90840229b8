"""Decode + preprocess speed on one core, full decode vs reduced-scale JPEG decode (`min_side`).

`imaging.decode(data, min_side=S)` lets the JPEG decoder scale by 1/2, 1/4 or 1/8 while both sides
stay >= `imaging.DRAFT_MARGIN` x S. This measures what that buys on the real samples in
$EYERAY_SAMPLES, one process pinned to one core (Pillow decodes on one thread), files already in
memory (storage reads are not the question):

- OCT (every 3rd file of oct-train + all of oct-sample, Kermany JPEGs, mostly 1024x496 grey) at 224
  (VGG16): 496 rows are 2.2x 224, so the 2x margin leaves nothing to reduce;
- fundus (glaucoma-sample + odir-sample) at 224 and 299: these samples are 256x256 (downscaled
  copies), so nothing can be reduced; the same photos upscaled to 2048x2048 and re-encoded in memory
  (marked "synthetic") stand in for the 2000-3000 px photos fundus cameras write;
- OCT at 224 once more with a margin of 1 (not the chosen rule) to show what the 2x margin gives up.

Full and reduced passes are interleaved, repeat by repeat (the order swapped each time), so load
from other processes falls on both alike. Pixel differences are preprocess(reduced) against
preprocess(full), in grey levels.

    python bench/decode_speed.py [--repeats 2]   # writes bench/results/decode_speed.json (~3-4 min, loaded machine)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eyeray.data import imaging  # noqa: E402
from tests import samples  # noqa: E402

DATA = samples.SAMPLES
RESULTS = Path(__file__).resolve().parent / "results"
UPSCALED_SIDE = 2048
UPSCALED_COUNT = 48


def jpegs(*folders: str) -> list[bytes]:
    files = sorted(p for f in folders for p in (DATA / f).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        sys.exit(samples.missing(folders[0]))
    return [p.read_bytes() for p in files]


def upscaled(photos: list[bytes]) -> list[bytes]:
    """Large fundus stand-ins: real photos upscaled (bicubic) and re-encoded as cameras do (q 90, 4:2:0)."""
    out = []
    for data in photos[:UPSCALED_COUNT]:
        img = Image.open(io.BytesIO(data)).convert("RGB").resize((UPSCALED_SIDE, UPSCALED_SIDE), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def one_pass(images: list[bytes], size: int, min_side: int | None, margin: float) -> float:
    """Images per second of decode + preprocess over `images`, with `imaging.DRAFT_MARGIN` = margin."""
    imaging.DRAFT_MARGIN = margin
    start = time.perf_counter()
    for data in images:
        imaging.preprocess(imaging.decode(data, min_side=min_side), size)
    return len(images) / (time.perf_counter() - start)


def differences(images: list[bytes], size: int, margin: float) -> dict:
    imaging.DRAFT_MARGIN = margin
    diffs, per_image, shapes = [], [], set()
    for data in images:
        full, reduced = imaging.decode(data), imaging.decode(data, min_side=size)
        shapes.add(f"{full.shape[1]}x{full.shape[0]} -> {reduced.shape[1]}x{reduced.shape[0]}")
        d = np.abs(imaging.preprocess(full, size).astype(int) - imaging.preprocess(reduced, size).astype(int))
        diffs.append(d.mean())
        per_image.append(int(d.max()))
    return {
        "decoded_sizes": sorted(shapes),
        "mean_abs_diff": round(float(np.mean(diffs)), 3),
        "worst_image_mean_abs_diff": round(float(np.max(diffs)), 3),
        "max_abs_diff": int(np.max(per_image)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})  # one core, as one decode task of the pipelines has (DECODE_CPUS = 1)
    chosen = imaging.DRAFT_MARGIN
    oct_images = jpegs("oct-train")[::3] + jpegs("oct-sample")
    fundus = jpegs("glaucoma-sample", "odir-sample")
    big_fundus = upscaled(jpegs("odir-sample"))
    cases: list[tuple[str, list[bytes], int, float]] = [
        ("oct 224", oct_images, 224, chosen),
        ("fundus samples 256px 224", fundus, 224, chosen),
        ("fundus samples 256px 299", fundus, 299, chosen),
        (f"fundus upscaled {UPSCALED_SIDE}px (synthetic) 224", big_fundus, 224, chosen),
        (f"fundus upscaled {UPSCALED_SIDE}px (synthetic) 299", big_fundus, 299, chosen),
        ("oct 224, margin 1 (not chosen)", oct_images, 224, 1.0),
    ]
    rates: dict[str, dict[str, list[float]]] = {name: {"full": [], "reduced": []} for name, *_ in cases}
    t0 = time.perf_counter()
    for repeat in range(args.repeats):
        for name, images, size, margin in cases:
            runs: list[tuple[str, Callable[[], float]]] = [
                ("full", lambda i=images, s=size, m=margin: one_pass(i, s, None, m)),
                ("reduced", lambda i=images, s=size, m=margin: one_pass(i, s, s, m)),
            ]
            for label, run in runs if repeat % 2 == 0 else runs[::-1]:
                rates[name][label].append(run())
        print(f"repeat {repeat + 1}/{args.repeats} done at {time.perf_counter() - t0:.0f} s", flush=True)
    results: dict = {
        "machine": f"{os.cpu_count()} CPU cores (pinned to core {core}), no GPU, {platform.machine()}",
        "note": "a shared machine: other processes ran on the same cores; compare full and reduced within a case",
        "pillow": Image.__version__,
        "draft_margin": chosen,
        "repeats": args.repeats,
        "unit": "images per second, decode + preprocess (bilinear), one core; median of repeats (best in brackets)",
        "cases": {},
    }
    for name, images, size, margin in cases:
        full, reduced = statistics.median(rates[name]["full"]), statistics.median(rates[name]["reduced"])
        results["cases"][name] = {
            "images": len(images),
            "input_size": size,
            "draft_margin": margin,
            "full_per_s": round(full, 1),
            "reduced_per_s": round(reduced, 1),
            "full_best_per_s": round(max(rates[name]["full"]), 1),
            "reduced_best_per_s": round(max(rates[name]["reduced"]), 1),
            "speedup": round(reduced / full, 2),
            **differences(images, size, margin),
        }
        print(name, json.dumps(results["cases"][name]), flush=True)
    imaging.DRAFT_MARGIN = chosen
    results["seconds"] = round(time.perf_counter() - t0, 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "decode_speed.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
