"""Layout readers on the real samples, on generated Kaggle/ODIR layouts, and on a real S3 server."""

from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path

import pandas as pd
import pytest

from eyeray import storage
from eyeray.data.files import IMAGE_EXTENSIONS, list_inputs
from eyeray.data.layouts import (
    LAYOUTS,
    SPLITS,
    Layout,
    LayoutError,
    patient_of,
    read_layout,
    split_of,
)
from eyeray.tasks import GLAUCOMA, OCT, ODIR

ODIR_MISSING_EYES = {
    "50": "50_left.jpg",
    "293": "293_left.jpg",
    "1145": "1145_left.jpg",
    "1428": "1428_left.jpg",
    "307": "307_right.jpg",
    "1162": "1162_right.jpg",
    "2159": "2159_right.jpg",
    "2757": "2757_right.jpg",
}


# --- helpers -------------------------------------------------------------------------------------


def touch(root: Path, *relative: str) -> None:
    """Write small placeholder files: readers only list, they never decode images."""
    for rel in relative:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def kermany_split(root: Path, split: str, classes=OCT.classes, patients: int = 12, first: int = 0) -> None:
    """`split/<CLASS>/<CLASS>-<patient>-<n>.jpeg`, two images per patient, as Kermany names them."""
    for cls in classes:
        for p in range(first, first + patients):
            touch(root, *(f"{split}/{cls}/{cls}-{1000 + p}-{n}.jpeg" for n in (1, 2)))


def all_records(layout: Layout) -> list[dict]:
    return [r for split in SPLITS for r in layout.splits[split]]


def split_by_path(layout: Layout) -> dict[str, str]:
    return {r["path"]: split for split in SPLITS for r in layout.splits[split]}


def assert_patient_disjoint(layout: Layout) -> None:
    owners: dict[str, set[str]] = {}
    for split in SPLITS:
        for r in layout.splits[split]:
            owners.setdefault(r["patient"], set()).add(split)
    shared = {p: s for p, s in owners.items() if len(s) > 1}
    assert not shared, f"patients in more than one split: {shared}"


def assert_labels_match_folders(layout: Layout, classes: tuple[str, ...]) -> None:
    for r in all_records(layout):
        folder = Path(r["path"]).parent.name
        assert r["label"] == [1.0 if c == folder else 0.0 for c in classes], r


def sheet_rows(odir_sample: Path) -> dict[str, dict]:
    """data.csv read with the csv module, independently of the reader's pandas path."""
    with open(odir_sample / "data.csv", newline="", encoding="utf-8") as f:
        return {row["ID"]: row for row in csv.DictReader(f)}


# --- split_of / patient_of -----------------------------------------------------------------------


def test_split_of_is_pinned():
    # Computed once; a change here reshuffles every user's train/test split.
    expected = {"0": "train", "4": "validation", "9": "test", "39": "test", "1058": "train", "1150304": "validation"}
    assert {p: split_of(p, 0.15, 0.15) for p in expected} == expected
    assert split_of("9", 0.15, 0.0) == "validation"  # carving from train: same hash, no test region


def test_split_of_honours_fractions():
    ids = [str(i) for i in range(10_000)]
    for val, test in ((0.15, 0.15), (0.1, 0.2), (0.0, 0.3)):
        got = [split_of(p, val, test) for p in ids]
        assert abs(got.count("validation") / len(ids) - val) < 0.02
        assert abs(got.count("test") / len(ids) - test) < 0.02


def test_patient_of():
    assert patient_of(OCT, "/x/train/CNV/CNV-1150304-1.jpeg") == "1150304"
    assert patient_of(GLAUCOMA, "1058_left.jpg") == "1058"
    assert patient_of(ODIR, "s3://b/images/2757_left.jpg") == "2757"
    assert patient_of(GLAUCOMA, "TRAIN000123.jpg") == "TRAIN000123"  # no id: the stem
    assert patient_of(dataclasses.replace(OCT, patient_id_pattern=None), "CNV-1-2.jpeg") == "CNV-1-2"


def test_read_layout_dispatches_on_spec_layout():
    assert set(LAYOUTS) == {OCT.layout, GLAUCOMA.layout, ODIR.layout}
    with pytest.raises(ValueError, match="unknown layout"):
        read_layout(dataclasses.replace(OCT, layout="nope"), "/tmp")


# --- real samples --------------------------------------------------------------------------------


def test_oct_sample(oct_sample):
    layout = read_layout(OCT, oct_sample)
    records = all_records(layout)
    assert len(records) == 101 and not layout.skipped
    assert layout.root == str(oct_sample.resolve())
    totals = {c: sum(layout.counts()[s][c] for s in SPLITS) for c in OCT.classes}
    assert totals == {c: len(os.listdir(oct_sample / c)) for c in OCT.classes}
    assert all(layout.splits[s] for s in SPLITS)
    assert_labels_match_folders(layout, OCT.classes)
    assert_patient_disjoint(layout)
    assert len({r["patient"] for r in records}) == 59
    assert any("flat layout" in n and "59 patients" in n for n in layout.notes)
    # CNV-1150304-{1,2,3}: one patient, three images, one split.
    splits = split_by_path(layout)
    same_patient = [str(oct_sample / "CNV" / f"CNV-1150304-{n}.jpeg") for n in (1, 2, 3)]
    assert {splits[p] for p in same_patient} == {split_of("1150304", 0.15, 0.15)}
    for split in SPLITS:
        paths = [r["path"] for r in layout.splits[split]]
        assert paths == sorted(paths)
    assert read_layout(OCT, str(oct_sample)) == layout  # deterministic


def test_glaucoma_sample(glaucoma_sample):
    layout = read_layout(GLAUCOMA, glaucoma_sample)
    assert len(all_records(layout)) == 144 and not layout.skipped
    totals = {c: sum(layout.counts()[s][c] for s in SPLITS) for c in GLAUCOMA.classes}
    assert totals == {"RG": 13, "NRG": 131}
    assert_labels_match_folders(layout, GLAUCOMA.classes)
    assert_patient_disjoint(layout)
    assert layout.counts()["train"]["RG"] > 0


def test_odir_sample(odir_sample):
    layout = read_layout(ODIR, odir_sample)
    records = all_records(layout)
    assert len(records) == 280
    assert sorted((s["patient"], Path(s["path"]).name, s["reason"]) for s in layout.skipped) == sorted(
        (p, name, "image file missing") for p, name in ODIR_MISSING_EYES.items()
    )
    assert all(s["path"] == str(odir_sample / "images" / ODIR_MISSING_EYES[s["patient"]]) for s in layout.skipped)
    assert_patient_disjoint(layout)
    assert len({r["patient"] for r in records}) == 144

    rows = sheet_rows(odir_sample)
    by_name = {Path(r["path"]).name: r for r in records}
    for name, expected in {
        "4_left.jpg": ["D", "O"],
        "28_right.jpg": ["H"],
        "82_left.jpg": ["O"],
        "1058_right.jpg": [c for c in ODIR.classes if rows["1058"][c] == "1"],
    }.items():
        record = by_name[name]
        assert [c for c, v in zip(ODIR.classes, record["label"], strict=True) if v] == expected, name
        assert record["patient"] == name.split("_")[0]
    for r in records:  # every label is its patient's sheet row
        assert r["label"] == [float(rows[r["patient"]][c]) for c in ODIR.classes]
        assert r["path"] == str(odir_sample / "images" / Path(r["path"]).name)
    summary = layout.summary()
    assert "image file missing (8)" in summary and "validation" in summary


# --- generated class_folders layouts -------------------------------------------------------------


def test_split_layout_with_val_folder(tmp_path):
    for split in ("train", "val", "test"):
        kermany_split(tmp_path, split, patients=4, first={"train": 0, "val": 100, "test": 200}[split])
    layout = read_layout(OCT, tmp_path)
    assert {s: len(layout.splits[s]) for s in SPLITS} == {"train": 32, "validation": 32, "test": 32}
    for split, folder in (("train", "train"), ("validation", "val"), ("test", "test")):
        assert all(f"/{folder}/" in r["path"] for r in layout.splits[split])
    assert_labels_match_folders(layout, OCT.classes)
    assert not any("carved" in n for n in layout.notes)


def test_split_layout_with_validation_folder_any_case(tmp_path):
    for split in ("Train", "Validation", "TEST"):
        for cls in ("rg", "NRG"):
            touch(tmp_path, f"{split}/{cls}/{split}-{cls}-1.jpg", f"{split}/{cls}/{split}-{cls}-2.png")
    layout = read_layout(GLAUCOMA, tmp_path)
    assert {s: layout.counts()[s] for s in SPLITS} == {s: {"NRG": 2, "RG": 2} for s in SPLITS}
    assert all("/Validation/" in r["path"] for r in layout.splits["validation"])
    rg = [r for r in all_records(layout) if "/rg/" in r["path"]]
    assert rg and all(r["label"] == [0.0, 1.0] for r in rg)


def test_split_layout_without_validation_carves_train_by_patient(tmp_path):
    kermany_split(tmp_path, "train", patients=30)
    kermany_split(tmp_path, "test", patients=3, first=500)
    layout = read_layout(OCT, tmp_path, val_fraction=0.2)
    train_files = {str(p) for p in (tmp_path / "train").rglob("*.jpeg")}
    carved = {r["path"] for r in layout.splits["validation"]}
    assert carved and carved < train_files
    assert carved | {r["path"] for r in layout.splits["train"]} == train_files
    assert all(split_of(r["patient"], 0.2, 0.0) == "validation" for r in layout.splits["validation"])
    assert_patient_disjoint(layout)
    assert any(n.startswith("no validation split: carved 20% of train by patient") for n in layout.notes)


def test_wrapper_folders_are_descended(tmp_path):
    # Kaggle: kermany2018/OCT2017 /train/... (the trailing space is in the real download)
    dataset = tmp_path / "kermany2018" / "OCT2017 "
    kermany_split(dataset, "train", patients=6)
    kermany_split(dataset, "test", patients=2, first=50)
    touch(tmp_path, "kermany2018/README.txt", "kermany2018/__MACOSX/OCT2017 /._train")
    layout = read_layout(OCT, tmp_path)
    assert layout.root == str(dataset)
    assert len(all_records(layout)) == 8 * 4 * 2
    assert all(r["path"].startswith(str(dataset) + "/") for r in all_records(layout))
    assert any("wrapper" in n and "'OCT2017 '" in n for n in layout.notes)
    assert [(Path(s["path"]).name, s["reason"]) for s in layout.skipped] == [
        ("README.txt", "outside the dataset folder")
    ]


def test_too_many_wrappers_is_an_error(tmp_path):
    kermany_split(tmp_path / "a" / "b" / "c", "train", patients=1)
    # tmp -> a -> b are the two wrappers allowed; b/c/ is one too many.
    with pytest.raises(
        LayoutError, match=r"no dataset found\. Expected Kaggle kermany2018.*Found: 'a/'; inside a/b/: 'c/'$"
    ):
        read_layout(OCT, tmp_path)


def test_missing_test_folder(tmp_path):
    kermany_split(tmp_path, "train", patients=2)
    kermany_split(tmp_path, "val", patients=2)
    with pytest.raises(LayoutError) as error:
        read_layout(OCT, tmp_path)
    message = str(error.value)
    assert "no test/ folder" in message and "'train/'" in message and "'val/'" in message
    assert OCT.dataset_hint in message


def test_unknown_class_folder(tmp_path):
    kermany_split(tmp_path, "train", patients=2)
    kermany_split(tmp_path, "test", patients=2)
    touch(tmp_path, "train/CNV_old/CNV-1-1.jpeg")
    with pytest.raises(LayoutError) as error:
        read_layout(OCT, tmp_path)
    message = str(error.value)
    assert "'CNV_old/'" in message and "CNV, DME, DRUSEN, NORMAL" in message
    assert message.startswith(str(tmp_path / "train"))


def test_unknown_folder_beside_class_folders(tmp_path):
    for cls in GLAUCOMA.classes + ("suspect",):
        touch(tmp_path, f"{cls}/1_left.jpg")
    with pytest.raises(LayoutError, match=r"unexpected folder\(s\) 'suspect/'; expected class folders NRG, RG"):
        read_layout(GLAUCOMA, tmp_path)


def test_empty_class_folder_in_train(tmp_path):
    kermany_split(tmp_path, "train", classes=("CNV", "DRUSEN", "NORMAL"), patients=2)
    kermany_split(tmp_path, "test", patients=2)
    touch(tmp_path, "train/DME/notes.txt")  # present, but no images
    with pytest.raises(LayoutError, match=r"no training images for class\(es\) DME \(cannot train"):
        read_layout(OCT, tmp_path)


def test_empty_class_in_test_is_a_note(tmp_path):
    kermany_split(tmp_path, "train", patients=10)
    kermany_split(tmp_path, "test", classes=("CNV", "DRUSEN", "NORMAL"), patients=2, first=50)
    (tmp_path / "test" / "DME").mkdir()
    layout = read_layout(OCT, tmp_path)
    assert "class DME has no images in test/" in layout.notes
    assert layout.counts()["test"]["DME"] == 0


def test_non_image_files_are_skipped_with_a_reason(tmp_path):
    for cls in GLAUCOMA.classes:
        touch(tmp_path, *(f"{cls}/{p}_left.jpg" for p in range(10)))
    touch(tmp_path, "RG/labels.txt", "RG/.DS_Store", "NRG/._3_left.jpg", "NRG/scan", "NRG/.cache/7_left.jpg")
    touch(tmp_path, "NRG/more/90_left.JPG", "notes.md")
    layout = read_layout(GLAUCOMA, tmp_path)
    reasons = {Path(s["path"]).name: s["reason"] for s in layout.skipped}
    assert reasons == {
        "labels.txt": "not an image (.txt)",
        ".DS_Store": "hidden file",
        "._3_left.jpg": "hidden file",
        "7_left.jpg": "in a hidden folder",
        "notes.md": "not in a class folder",
    }
    # nested NRG/more/90_left.JPG counts, upper-case extension too; so does NRG/scan: PACS exports
    # name DICOM files without an extension, and the decoder (not the name) judges them
    assert len(all_records(layout)) == 22
    assert "skipped 5 files" in layout.summary()
    assert ".dcm" in IMAGE_EXTENSIONS
    # one rule for every route: scoring lists the same image files a training layout reads
    inputs = {Path(p).relative_to(tmp_path).as_posix() for p in list_inputs(str(tmp_path))}
    assert inputs == {Path(r["path"]).relative_to(tmp_path).as_posix() for r in all_records(layout)}


def test_dataset_shipped_split_overlapping_patients_is_noted(tmp_path):
    kermany_split(tmp_path, "train", patients=4)
    kermany_split(tmp_path, "test", patients=4)  # the same patient ids
    layout = read_layout(OCT, tmp_path)
    assert any("4 patient(s) have images in more than one split folder" in n for n in layout.notes)


def test_missing_root(tmp_path):
    with pytest.raises(LayoutError, match="does not exist"):
        read_layout(OCT, tmp_path / "nope")


# --- generated odir_sheet layouts ----------------------------------------------------------------


def placeholder_images(odir_sample: Path, folder: Path) -> None:
    folder.mkdir(parents=True)
    for name in os.listdir(odir_sample / "images"):
        (folder / name).write_bytes(b"x")


def comparable(layout: Layout) -> list[tuple]:
    return sorted(
        (split, Path(r["path"]).name, r["patient"], tuple(r["label"])) for split in SPLITS for r in layout.splits[split]
    )


def test_odir_sheet_as_xlsx(odir_sample, tmp_path):
    root = tmp_path / "ODIR-5K"
    placeholder_images(odir_sample, root / "Training Images")
    pd.read_csv(odir_sample / "data.csv").to_excel(root / "data.xlsx", index=False)
    layout = read_layout(ODIR, tmp_path)  # one wrapper level down
    assert layout.root == str(root)
    assert comparable(layout) == comparable(read_layout(ODIR, odir_sample))
    assert {s["patient"] for s in layout.skipped} == set(ODIR_MISSING_EYES)
    assert "labels from sheet 'data.xlsx' (144 rows)" in layout.notes


def test_odir_sheet_with_one_row_per_eye(odir_sample, tmp_path):
    # Kaggle's full_df.csv repeats the patient row per eye image, beside preprocessed_images/.
    placeholder_images(odir_sample, tmp_path / "preprocessed_images")
    table = pd.read_csv(odir_sample / "data.csv")
    pd.concat([table, table]).assign(filename="x").to_csv(tmp_path / "full_df.csv", index=False)
    pd.DataFrame({"a": [1]}).to_csv(tmp_path / "aaa.csv", index=False)  # tried first, lacks columns
    layout = read_layout(ODIR, tmp_path)
    assert comparable(layout) == comparable(read_layout(ODIR, odir_sample))
    assert "sheet 'full_df.csv': 144 repeated rows ignored" in layout.notes


def test_odir_sheet_missing_a_column(odir_sample, tmp_path):
    placeholder_images(odir_sample, tmp_path / "images")
    pd.read_csv(odir_sample / "data.csv").drop(columns=["G"]).to_csv(tmp_path / "data.csv", index=False)
    with pytest.raises(LayoutError) as error:
        read_layout(ODIR, tmp_path)
    message = str(error.value)
    assert "'data.csv' lacks column(s) G" in message and "'images/'" in message


def test_odir_without_a_sheet(odir_sample, tmp_path):
    placeholder_images(odir_sample, tmp_path / "images")
    touch(tmp_path, "readme.txt")
    with pytest.raises(LayoutError, match=r"no dataset found.*data\.csv or data\.xlsx.*'images/', 'readme.txt'"):
        read_layout(ODIR, tmp_path)


def test_odir_bad_label_values(odir_sample, tmp_path):
    placeholder_images(odir_sample, tmp_path / "images")
    table = pd.read_csv(odir_sample / "data.csv")
    table.loc[table["ID"] == 4, "D"] = 2
    table.to_csv(tmp_path / "data.csv", index=False)
    with pytest.raises(LayoutError, match=r"must hold 0 or 1; not so for ID\(s\) 4$"):
        read_layout(ODIR, tmp_path)


# --- S3 (moto server) ----------------------------------------------------------------------------

BUCKET = "eyeray-test"


@pytest.fixture(scope="module")
def s3(s3_server, oct_sample, odir_sample):
    """The session's S3 server holding part of the OCT sample (inside a Kaggle-style wrapper) and ODIR."""
    fs, _ = storage.filesystem(f"s3://{BUCKET}")  # no region_name: moto rejects it on create
    fs.mkdir(BUCKET)
    local, remote = [], []
    for cls in OCT.classes:
        for name in sorted(os.listdir(oct_sample / cls))[:8]:
            local.append(str(oct_sample / cls / name))
            remote.append(f"{BUCKET}/oct/OCT2017 /{cls}/{name}")
    for path in sorted(odir_sample.rglob("*")):
        if path.is_file():
            local.append(str(path))
            remote.append(f"{BUCKET}/odir/{path.relative_to(odir_sample).as_posix()}")
    fs.put(local, remote)
    fs.invalidate_cache()
    yield fs
    fs.rm(BUCKET, recursive=True)


def test_s3_class_folders_match_local(s3, oct_sample):
    layout = read_layout(OCT, f"s3://{BUCKET}/oct")
    assert layout.root == f"s3://{BUCKET}/oct/OCT2017 "
    assert len(all_records(layout)) == 32 and not layout.skipped
    # The split depends only on the patient, so the S3 subset agrees with the full local read.
    local = read_layout(OCT, oct_sample)
    prefix = f"s3://{BUCKET}/oct/OCT2017 /"
    expected = {
        split: [
            {**r, "path": prefix + Path(r["path"]).relative_to(oct_sample).as_posix()}
            for r in local.splits[split]
            if prefix + Path(r["path"]).relative_to(oct_sample).as_posix() in split_by_path(layout)
        ]
        for split in SPLITS
    }
    assert layout.splits == expected


def test_s3_odir_sheet_matches_local(s3, odir_sample):
    layout = read_layout(ODIR, f"s3://{BUCKET}/odir/")
    local = read_layout(ODIR, odir_sample)
    assert layout.root == f"s3://{BUCKET}/odir"

    def to_s3(path: str) -> str:
        return f"s3://{BUCKET}/odir/" + Path(path).relative_to(odir_sample).as_posix()

    assert layout.splits == {s: [{**r, "path": to_s3(r["path"])} for r in local.splits[s]] for s in SPLITS}
    assert layout.skipped == [{**s, "path": to_s3(s["path"])} for s in local.skipped]
    assert all(r["path"].startswith(f"s3://{BUCKET}/odir/images/") for r in all_records(layout))
