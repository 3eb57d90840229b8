"""Records (path + label) -> a Ray Dataset of decoded, preprocessed uint8 images.

Bytes are read and decoded in our own `map_batches` function, not `ray.data.read_images`:
that reader aborts the whole read on one corrupt file, and `max_errored_blocks` drops whole
blocks of good images with it. Here a bad file becomes a row with an `error` reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ray
from ray.data.expressions import col, lit

from eyeray.data import imaging

ROWS_PER_BLOCK = 32  # small blocks: decoding is the costly step, spread it over many tasks


def decoded_dataset(records: list[dict], image_size: int, *, seed: int | None = None) -> ray.data.Dataset:
    """Columns out: path, label, patient (the record's patient id, "" when it has none), image
    (size x size x 3 uint8), height, width, error ("" when ok).

    `seed` shuffles the records first (layouts list files class by class; training must not
    see them in that order).
    """
    items = [
        {"path": str(r["path"]), "label": np.asarray(r["label"], np.float32), "patient": str(r.get("patient", ""))}
        for r in records
    ]
    if seed is not None:
        order = np.random.default_rng(seed).permutation(len(items))
        items = [items[i] for i in order]
    blocks = max(1, min(len(items), -(-len(items) // ROWS_PER_BLOCK)))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    return ds.map_batches(imaging.load_batch, fn_kwargs={"size": image_size}, batch_size=ROWS_PER_BLOCK)


@dataclass
class Decoded:
    """A split decoded once and kept in Ray's object store, with its bad files set aside."""

    # columns image, label, height, width (only files that decoded; their full sizes) and patient
    # (the record's patient id: per-patient test metrics, eyeray.evaluation.patients)
    images: ray.data.Dataset
    errors: list[dict]  # {"path", "error"} for every file that did not decode
    count: int


def decoded():
    """The rows that decoded, as a Ray Data expression (a Python lambda makes Ray warn and run slower)."""
    return col("error") == lit("")


def decode_split(records: list[dict], image_size: int, *, seed: int | None = None) -> Decoded:
    ds = decoded_dataset(records, image_size, seed=seed).materialize()
    errors = ds.filter(expr=col("error") != lit("")).select_columns(["path", "error"]).take_all()
    good = ds.filter(expr=decoded()).select_columns(["image", "label", "height", "width", "patient"])
    good = good.materialize()
    return Decoded(images=good, errors=[{"path": e["path"], "error": e["error"]} for e in errors], count=good.count())
