"""The embedded default dataset: the real layouts, real file-name conventions, deterministic.

Whether its classes are learnable is checked end to end (tests/test_train.py asserts >= 0.9 test
accuracy after a demo-sized run)."""

from __future__ import annotations

import csv
import re

import numpy as np
import pytest
from PIL import Image

from eyeray import synthetic
from eyeray.datasets import read_layout
from eyeray.tasks import get_task


@pytest.mark.parametrize("task", ["oct", "glaucoma"])
def test_class_folder_layout_with_patient_ids(task, tmp_path):
    spec = get_task(task)
    root = synthetic.make_dataset(spec, tmp_path, images_per_class=7, image_size=64)
    for cls in spec.classes:
        files = sorted((root / cls).iterdir())
        assert len(files) == 7
        for f in files:
            assert re.match(spec.patient_id_pattern, f.name), f.name
    layout = read_layout(spec, str(root))
    assert sum(len(v) for v in layout.splits.values()) == 7 * spec.num_classes
    patients = {split: {r["patient"] for r in records} for split, records in layout.splits.items()}
    assert not (patients["train"] & patients["test"])


def test_oct_scans_are_greyscale_and_wide(tmp_path):
    root = synthetic.make_dataset(get_task("oct"), tmp_path, images_per_class=2, image_size=64)
    img = Image.open(next((root / "DME").iterdir()))
    assert img.mode == "L" or np.array_equal(np.asarray(img)[..., 0], np.asarray(img)[..., 1])
    assert img.size == (128, 64)


def test_odir_sheet_has_the_real_columns_and_drawn_labels(tmp_path):
    spec = get_task("odir")
    root = synthetic.make_dataset(spec, tmp_path, images_per_class=4, image_size=64)
    with open(root / "data.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == synthetic.ODIR_COLUMNS + list(spec.classes)
    for row in rows:
        labels = {c for c in spec.classes if row[c] == "1"}
        assert labels and (labels == {"N"} or "N" not in labels)
        assert (root / "images" / row["Left-Fundus"]).exists() and (root / "images" / row["Right-Fundus"]).exists()
    per_label = {c: sum(row[c] == "1" for row in rows) for c in spec.classes}
    assert all(n >= 4 for n in per_label.values()), per_label
    layout = read_layout(spec, str(root))
    assert not layout.skipped and sum(len(v) for v in layout.splits.values()) == 2 * len(rows)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    spec = get_task("glaucoma")
    a = synthetic.make_dataset(spec, tmp_path / "a", images_per_class=3, seed=5)
    b = synthetic.make_dataset(spec, tmp_path / "b", images_per_class=3, seed=5)
    c = synthetic.make_dataset(spec, tmp_path / "c", images_per_class=3, seed=6)
    files = lambda root: {p.relative_to(root): p.read_bytes() for p in root.rglob("*.jpg")}  # noqa: E731
    assert files(a) == files(b)
    assert files(a) != files(c)


def test_glaucoma_classes_differ_in_cup_size():
    rng = np.random.default_rng(0)
    rg = synthetic.draw("fundus", "RG", rng, 128)
    nrg = synthetic.draw("fundus", "NRG", rng, 128)
    bright = lambda img: int((img.min(axis=2) > 210).sum())  # noqa: E731  (the pale cup)
    assert bright(rg) > 2 * bright(nrg)
