"""The embedded default dataset: the real layouts and file names, deterministic, and learnable.

Learnability is checked here with a tiny CNN on images loaded straight from disk with PIL, so it
holds whatever the rest of the pipeline does; tests/test_train.py checks it end to end.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from eyeray.data import synthetic
from eyeray.tasks import get_task

SIZE = 64  # the demo's image size: features must survive this resize


def _files(root: Path) -> dict[Path, bytes]:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _patient(spec, name: str) -> str:
    match = re.match(spec.patient_id_pattern, name)
    assert match, f"{name} does not carry a patient id ({spec.patient_id_pattern})"
    return match.group(1)


# ---------------------------------------------------------------------------------------------
# layouts


@pytest.mark.parametrize(
    "task, per_patient, name",
    [
        ("oct", (1, 3), r"^(CNV|DME|DRUSEN|NORMAL)-\d{6,7}-[123]\.jpeg$"),
        ("glaucoma", (1, 2), r"^\d+_(left|right)\.jpg$"),
    ],
)
def test_class_folders_hold_named_images_of_whole_patients(task, per_patient, name, tmp_path):
    spec = get_task(task)
    root = synthetic.make_dataset(spec, tmp_path, images_per_class=11, image_size=32)
    assert sorted(p.name for p in root.iterdir()) == sorted(spec.classes)
    classes_of = defaultdict(set)
    images_of = Counter()
    for cls in spec.classes:
        files = sorted(p.name for p in (root / cls).iterdir())
        assert len(files) == 11
        for f in files:
            assert re.match(name, f), f
            if task == "oct":
                assert f.startswith(f"{cls}-"), "Kermany names start with the image's class"
            classes_of[_patient(spec, f)].add(cls)
            images_of[_patient(spec, f)] += 1
    assert all(len(c) == 1 for c in classes_of.values()), "a patient straddles two classes"
    assert set(images_of.values()) <= set(range(per_patient[0], per_patient[1] + 1))
    assert max(images_of.values()) > 1, "several images per patient, as in the real data"


def test_image_modes_and_shapes_imitate_the_real_files(tmp_path):
    oct_root = synthetic.make_dataset(get_task("oct"), tmp_path / "oct", images_per_class=1, image_size=48)
    fundus_root = synthetic.make_dataset(get_task("glaucoma"), tmp_path / "fundus", images_per_class=1, image_size=48)
    oct_img = Image.open(next(oct_root.rglob("*.jpeg")))
    fundus_img = Image.open(next(fundus_root.rglob("*.jpg")))
    assert (oct_img.format, oct_img.mode, oct_img.size) == ("JPEG", "L", (96, 48))  # greyscale, wide
    assert (fundus_img.format, fundus_img.mode, fundus_img.size) == ("JPEG", "RGB", (48, 48))


def test_odir_sheet_has_the_real_columns_and_the_drawn_labels(tmp_path, monkeypatch, odir_sample):
    spec = get_task("odir")
    drawn: list[frozenset] = []  # the labels of the image being drawn, then which file got it
    drawn_into: dict[str, frozenset] = {}
    fundus, save = synthetic.MODALITIES["fundus"], synthetic._save

    def draw_spy(classes, rng, size, eye):
        drawn.append(frozenset(classes))
        return fundus.draw(classes, rng, size, eye)

    def save_spy(pixels, path, mode):
        drawn_into[path.name] = drawn[-1]
        save(pixels, path, mode)

    monkeypatch.setitem(synthetic.MODALITIES, "fundus", dataclasses.replace(fundus, draw=draw_spy))
    monkeypatch.setattr(synthetic, "_save", save_spy)
    root = synthetic.make_dataset(spec, tmp_path, images_per_class=10, image_size=32)

    sheet = pd.read_csv(root / "data.csv", dtype=str, keep_default_na=False)
    real_header = (odir_sample / "data.csv").read_text(encoding="utf-8").splitlines()[0].split(",")
    assert list(sheet.columns) == real_header == synthetic.ODIR_COLUMNS + list(spec.classes)
    assert sheet["ID"].is_unique
    assert sorted(p.name for p in (root / "images").iterdir()) == sorted(drawn_into)
    for _, row in sheet.iterrows():
        assert (row["Left-Fundus"], row["Right-Fundus"]) == (f"{row.ID}_left.jpg", f"{row.ID}_right.jpg")
        assert set(row[list(spec.classes)]) <= {"0", "1"}
        labels = {c for c in spec.classes if row[c] == "1"}
        assert labels == {"N"} or ("N" not in labels and 1 <= len(labels) <= 2), labels
        assert drawn_into[row["Left-Fundus"]] == drawn_into[row["Right-Fundus"]] == labels
        for side in ("Left", "Right"):
            words = row[f"{side}-Diagnostic Keywords"].split(synthetic.KEYWORD_SEPARATOR)
            assert len(words) == len(labels) and ("normal fundus" in words) == (labels == {"N"})
    per_label = {c: int((sheet[c] == "1").sum()) for c in spec.classes}
    assert all(7 <= n <= 16 for n in per_label.values()), per_label  # about images_per_class each
    assert any(len(labels) == 2 for labels in drawn_into.values()), "some patients have two diseases"


@pytest.mark.parametrize("task", ["oct", "glaucoma", "odir"])
def test_eyeray_reads_every_generated_image(task, tmp_path):
    """The point of imitating the layouts: the real reader takes them as they are."""
    from eyeray.data.layouts import read_layout

    spec = get_task(task)
    root = synthetic.make_dataset(spec, tmp_path, images_per_class=6, image_size=32)
    layout = read_layout(spec, str(root))
    on_disk = sum(1 for p in root.rglob("*.jp*g"))
    assert not layout.skipped and sum(len(records) for records in layout.splits.values()) == on_disk


# ---------------------------------------------------------------------------------------------
# determinism and the draw API


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    for task in ("oct", "odir"):
        spec = get_task(task)
        a = _files(synthetic.make_dataset(spec, tmp_path / task / "a", images_per_class=3, image_size=32, seed=5))
        b = _files(synthetic.make_dataset(spec, tmp_path / task / "b", images_per_class=3, image_size=32, seed=5))
        c = _files(synthetic.make_dataset(spec, tmp_path / task / "c", images_per_class=3, image_size=32, seed=6))
        assert a == b
        assert a != c


def test_draw_takes_a_spec_or_a_modality_and_mirrors_the_eye():
    one = synthetic.draw(get_task("oct"), "DME", np.random.default_rng(3), 40, eye="right")
    other = synthetic.draw("oct", {"DME"}, np.random.default_rng(3), 40, eye="left")
    assert one.shape == (40, 80, 3) and one.dtype == np.uint8
    assert np.array_equal(one[:, ::-1], other)
    fundus = synthetic.draw("fundus", {"D", "H"}, np.random.default_rng(3), 40)
    assert fundus.shape == (40, 40, 3) and fundus[0, 0].max() < 20  # black outside the retina
    with pytest.raises(ValueError, match="class 'XYZ'"):
        synthetic.draw("fundus", "XYZ", np.random.default_rng(0))
    with pytest.raises(ValueError, match="modality 'mri'"):
        synthetic.draw("mri", "N", np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------
# learnability: a tiny CNN from scratch at 64 px, split by patient


def _load(paths: list[Path]) -> np.ndarray:
    """As the pipeline sees them: RGB, squashed to SIZE x SIZE, scaled to 0..1."""
    images = [np.asarray(Image.open(p).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)) for p in paths]
    return np.stack(images).astype("float32") / 255.0


def _split_by_patient(patients: list[str], seed: int = 0) -> np.ndarray:
    """A boolean "is train" mask: a random 70% of the patients, all of their images."""
    unique = sorted(set(patients))
    rng = np.random.default_rng(seed)
    train = set(rng.permutation(unique)[: round(0.7 * len(unique))])
    return np.array([p in train for p in patients])


def tiny_cnn(input_shape, outputs: int, activation: str):
    """Three Conv-BN-ReLU blocks, pooled, and a dense head.

    BatchNorm because ~40-70 steps from scratch are too few for a CNN without it, whatever the
    images; momentum 0.5 because at 0.9 the moving statistics still remember their initial values
    after so few steps, and inference collapses to one class while training accuracy is 1.0.
    """
    import keras

    x = inputs = keras.Input(input_shape)
    for filters in (16, 32, 64):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization(momentum=0.5)(x)
        x = keras.layers.MaxPooling2D()(keras.layers.Activation("relu")(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(outputs, activation=activation)(x))
    loss = "binary_crossentropy" if activation == "sigmoid" else "categorical_crossentropy"
    model.compile(keras.optimizers.Adam(2e-3), loss)
    return model


def _fit_and_predict(x, y, is_train, activation: str, seed: int = 0, epochs: int = 6) -> np.ndarray:
    """The demo's recipe (6 epochs, batch 16, Adam 2e-3 with eyeray's per-epoch cosine decay)."""
    import keras

    keras.utils.set_random_seed(seed)
    model = tiny_cnn(x.shape[1:], y.shape[1], activation)
    cosine = keras.callbacks.LearningRateScheduler(lambda epoch: 2e-3 * 0.5 * (1 + np.cos(np.pi * epoch / epochs)))
    model.fit(x[is_train], y[is_train], epochs=epochs, batch_size=16, callbacks=[cosine], verbose=0)
    return model.predict(x[~is_train], verbose=0)


def class_folder_accuracy(task: str, root: Path, seed: int = 0) -> float:
    spec = get_task(task)
    paths = sorted(root.rglob("*.jp*g"))
    y = np.eye(spec.num_classes, dtype="float32")[[spec.class_index(p.parent.name) for p in paths]]
    is_train = _split_by_patient([_patient(spec, p.name) for p in paths], seed)
    probs = _fit_and_predict(_load(paths), y, is_train, spec.activation, seed)
    return float((probs.argmax(1) == y[~is_train].argmax(1)).mean())


def odir_label_aucs(root: Path, seed: int = 0) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    spec = get_task("odir")
    sheet = pd.read_csv(root / "data.csv")
    eyes = [(row[f"{side}-Fundus"], row) for _, row in sheet.iterrows() for side in ("Left", "Right")]
    y = np.array([[row[c] for c in spec.classes] for _, row in eyes], dtype="float32")
    is_train = _split_by_patient([str(row["ID"]) for _, row in eyes], seed)
    probs = _fit_and_predict(_load([root / "images" / name for name, _ in eyes]), y, is_train, "sigmoid", seed)
    return {c: float(roc_auc_score(y[~is_train, i], probs[:, i])) for i, c in enumerate(spec.classes)}


@pytest.mark.parametrize("task", ["oct", "glaucoma"])
def test_single_label_demo_is_learnable_by_a_tiny_cnn(task, tmp_path):
    # 60 per class (half the demo's default): the classes must stand out after ~40-70 steps.
    root = synthetic.make_dataset(get_task(task), tmp_path, images_per_class=60, image_size=128, seed=0)
    assert class_folder_accuracy(task, root) >= 0.9


def test_odir_demo_is_learnable_label_by_label(tmp_path):
    aucs = odir_label_aucs(synthetic.make_dataset(get_task("odir"), tmp_path, image_size=128, seed=0))
    assert np.mean(list(aucs.values())) >= 0.85, aucs
    assert min(aucs.values()) >= 0.7, aucs  # no label is left unlearnable
