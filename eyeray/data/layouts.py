"""Dataset layout readers: turn a dataset folder, local or on S3, into labelled, split records.

A reader takes a folder as users download it (Kaggle class folders, the ODIR-5K sheet) and
returns a `Layout`: per split, records of image path, label vector and patient id. Whatever the
dataset does not split itself is split by patient, so no patient's images sit on both sides of a
train/test boundary, and by a cryptographic hash, so every machine and every run agrees.

Readers only list files (never read image bytes), so they stay fast on S3 with tens of thousands
of images. Files they do not use are reported in `Layout.skipped`, never silently dropped.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NotRequired, TypedDict

import fsspec

from eyeray import storage
from eyeray.data.files import is_hidden, skip_reason
from eyeray.tasks import TaskSpec

SPLITS = ("train", "validation", "test")
# Split folder names as datasets spell them (matched case-insensitively) -> our split name.
SPLIT_FOLDERS = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}
# Kaggle downloads nest the dataset in up to this many single-folder wrappers.
MAX_WRAPPERS = 2

# odir_sheet: the sheet's required columns (besides the task's classes), and where the images
# usually are relative to the sheet (the sheet's own folder is tried last).
SHEET_COLUMNS = ("ID", "Left-Fundus", "Right-Fundus")
EYE_COLUMNS = ("Left-Fundus", "Right-Fundus")
SHEET_IMAGE_FOLDERS = ("images", "Training Images", "ODIR-5K_Training_Dataset", "preprocessed_images")


class LayoutError(ValueError):
    """The dataset folder is not laid out as the task expects; the message says what was found."""


class Record(TypedDict):
    path: str  # absolute local path, or an s3:// URI
    label: list[float]  # one float per spec class: one-hot, or multi-hot for multi-label tasks
    patient: str


class Skipped(TypedDict):
    path: str
    reason: str
    patient: NotRequired[str]


@dataclass
class Layout:
    task: str
    root: str  # the resolved root, after descending wrapper folders
    splits: dict[str, list[Record]]  # every name in SPLITS, records sorted by path
    skipped: list[Skipped]
    notes: list[str]
    classes: tuple[str, ...]  # the spec's classes: the meaning of each label position

    def counts(self) -> dict[str, dict[str, int]]:
        """split -> class -> number of records with that class set."""
        return {
            split: {c: sum(1 for r in records if r["label"][i] > 0) for i, c in enumerate(self.classes)}
            for split, records in self.splits.items()
        }

    def summary(self) -> str:
        """A few lines for logs and the CLI: counts per split and class, notes, skipped files."""
        counts = self.counts()
        columns = (*self.classes, "images", "patients")
        width = max(8, *(len(c) + 2 for c in columns))
        lines = [f"{self.task} dataset at {self.root}", "split     " + "".join(f"{c:>{width}}" for c in columns)]
        for split, records in self.splits.items():
            values = [*counts[split].values(), len(records), len({r["patient"] for r in records})]
            lines.append(f"{split:<10}" + "".join(f"{v:>{width}}" for v in values))
        lines += [f"note: {note}" for note in self.notes]
        if self.skipped:
            reasons = Counter(s["reason"] for s in self.skipped)
            lines.append(
                f"skipped {len(self.skipped)} files: " + ", ".join(f"{r} ({n})" for r, n in reasons.most_common())
            )
        return "\n".join(lines)


# --- patients and splits -------------------------------------------------------------------------


def _patient_match(spec: TaskSpec, filename: str) -> str | None:
    if spec.patient_id_pattern is None:
        return None
    match = re.search(spec.patient_id_pattern, posixpath.basename(filename))
    return match.group(1) if match else None


def patient_of(spec: TaskSpec, filename: str) -> str:
    """The patient id in a file name; without one, the file stem (so the split is by file)."""
    found = _patient_match(spec, filename)
    return found if found is not None else posixpath.splitext(posixpath.basename(filename))[0]


def split_of(patient: str, val_fraction: float, test_fraction: float) -> str:
    """The split of a patient: a SHA-256 of the id, so it is the same on every machine and run.

    Python's hash() is salted per process, which would reshuffle patients between runs.
    """
    digest = hashlib.sha256(str(patient).encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "validation"
    return "train"


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) and leave "
            "some data for training"
        )


# --- listing -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Folder:
    """One folder's direct entries (name -> path inside the filesystem), sorted by name."""

    path: str
    dirs: dict[str, str]
    files: dict[str, str]

    def describe(self, limit: int = 20) -> str:
        names = [repr(f"{n}/") for n in self.dirs] + [repr(n) for n in self.files]
        more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
        return (", ".join(names[:limit]) + more) if names else "nothing (empty folder)"


def _list(fs: fsspec.AbstractFileSystem, path: str) -> _Folder:
    dirs: dict[str, str] = {}
    files: dict[str, str] = {}
    for info in fs.ls(path, detail=True):
        full = info["name"].rstrip("/")
        name = posixpath.basename(full)
        if name and full != path.rstrip("/"):  # object stores may list a folder marker as itself
            (dirs if info["type"] == "directory" else files)[name] = full
    return _Folder(path, dict(sorted(dirs.items())), dict(sorted(files.items())))


def _folder_key(name: str) -> str:
    """Folder names compare case-insensitively and without stray spaces ('OCT2017 ', 'Train')."""
    return name.strip().lower()


@dataclass
class _Reading:
    """One reader's state while it walks a dataset: where, and what it skipped and noticed."""

    spec: TaskSpec
    fs: fsspec.AbstractFileSystem
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, spec: TaskSpec, root: str) -> tuple[_Reading, str]:
        fs, path = storage.filesystem(str(root))
        if not fs.isdir(path):
            raise LayoutError(f"{root}: not a folder, or it does not exist. Expected {spec.dataset_hint}")
        return cls(spec, fs), path

    def uri(self, path: str) -> str:
        return storage.to_uri(self.fs, path)

    def skip(self, path: str, reason: str, patient: str | None = None) -> None:
        entry: Skipped = {"path": self.uri(path) if path else "", "reason": reason}
        if patient is not None:
            entry["patient"] = patient
        self.skipped.append(entry)

    def skip_files(self, paths: Iterable[str], reason: str) -> None:
        for path in paths:
            self.skip(path, reason)

    def one_hot(self, cls: str) -> list[float]:
        return [1.0 if c == cls else 0.0 for c in self.spec.classes]

    def descend(self, path: str, is_dataset: Callable[[_Folder], bool]) -> _Folder:
        """The dataset folder: `path`, or the folder inside single-folder wrappers (Kaggle zips)."""
        wrappers: list[str] = []
        root = _list(self.fs, path)
        for depth in range(MAX_WRAPPERS + 1):
            folder = _list(self.fs, path) if depth else root
            if is_dataset(folder):
                if wrappers:
                    self.notes.append(f"dataset found inside wrapper folder(s) {' / '.join(map(repr, wrappers))}")
                return folder
            visible = [name for name in folder.dirs if not is_hidden(name)]
            if len(visible) != 1 or depth == MAX_WRAPPERS:
                break
            self.skip_files(folder.files.values(), "outside the dataset folder")
            wrappers.append(visible[0])
            path = folder.dirs[visible[0]]
        inside = f"; inside {'/'.join(wrappers)}/: {folder.describe()}" if wrappers else ""
        raise LayoutError(
            f"{self.uri(root.path)}: no dataset found. Expected {self.spec.dataset_hint}. "
            f"Found: {root.describe()}{inside}"
        )

    def layout(self, path: str, splits: dict[str, list[Record]]) -> Layout:
        """Check the classes every split holds, and freeze everything in path order."""
        splits = {s: sorted(splits.get(s, []), key=lambda r: r["path"]) for s in SPLITS}
        self._check_classes(path, splits)
        return Layout(
            task=self.spec.name,
            root=self.uri(path),
            splits=splits,
            skipped=sorted(self.skipped, key=lambda s: (s["path"], s["reason"])),
            notes=self.notes,
            classes=self.spec.classes,
        )

    def _check_classes(self, path: str, splits: dict[str, list[Record]]) -> None:
        """A class without training images cannot be learned (error); elsewhere it is a note."""
        classes = self.spec.classes
        present = {
            s: Counter(c for r in records for c, v in zip(classes, r["label"], strict=True) if v > 0)
            for s, records in splits.items()
        }
        untrainable = [c for c in classes if present["train"][c] == 0]
        if untrainable:
            found = ", ".join(f"{c}: {present['train'][c]}" for c in classes)
            raise LayoutError(
                f"{self.uri(path)}: no training images for class(es) {', '.join(untrainable)} (cannot train a "
                f"class with no images). Expected {self.spec.dataset_hint}. Training images per class: {found}"
            )
        for split in SPLITS[1:]:
            if not splits[split]:
                self.notes.append(f"no images in {split}/")
                continue
            self.notes += [f"class {c} has no images in {split}/" for c in classes if present[split][c] == 0]

    def split_note(self, records: list[Record], val_fraction: float, test_fraction: float, how: str) -> None:
        patients = {r["patient"] for r in records}
        train = 1 - val_fraction - test_fraction
        self.notes.append(
            f"{how}: split by patient id ({len(patients)} patients) into train/validation/test "
            f"~{train:.0%}/{val_fraction:.0%}/{test_fraction:.0%}"
        )


# --- class_folders -------------------------------------------------------------------------------


def _class_of(spec: TaskSpec, name: str) -> str | None:
    return next((c for c in spec.classes if _folder_key(c) == _folder_key(name)), None)


def _split_of_folder(name: str) -> str | None:
    return SPLIT_FOLDERS.get(_folder_key(name))


def _images(reading: _Reading, path: str) -> list[str]:
    """Image files anywhere under a class folder; the rest goes to `skipped` with the reason."""
    images = []
    for file in sorted(reading.fs.find(path)):
        reason = skip_reason(file[len(path) :])
        if reason:
            reading.skip(file, reason)
        else:
            images.append(file)
    return images


def _read_class_set(reading: _Reading, folder: _Folder) -> list[Record]:
    """Records of a folder that holds one sub-folder per class (a split folder, or a flat root)."""
    spec = reading.spec
    unknown = [n for n in folder.dirs if not is_hidden(n) and _class_of(spec, n) is None]
    if unknown:
        raise LayoutError(
            f"{reading.uri(folder.path)}: unexpected folder(s) {', '.join(repr(n + '/') for n in unknown)}; "
            f"expected class folders {', '.join(spec.classes)}. Expected {spec.dataset_hint}"
        )
    reading.skip_files(folder.files.values(), "not in a class folder")
    records: list[Record] = []
    for name, path in folder.dirs.items():
        if is_hidden(name):
            reading.skip_files(reading.fs.find(path), "in a hidden folder")
            continue
        label = reading.one_hot(_class_of(spec, name))
        for image in _images(reading, path):
            records.append({"path": reading.uri(image), "label": list(label), "patient": patient_of(spec, image)})
    return records


def _read_split_folders(reading: _Reading, folder: _Folder, val_fraction: float) -> dict[str, list[Record]]:
    """Kaggle's own split: train/ test/ [val/ | validation/], each holding class folders."""
    by_split: dict[str, list[str]] = {}
    for name in folder.dirs:
        if not is_hidden(name):
            by_split.setdefault(_split_of_folder(name), []).append(name)
    problems = []
    if None in by_split:
        problems.append(f"unexpected folder(s) {', '.join(repr(n + '/') for n in by_split[None])} beside split folders")
    problems += [f"both {' and '.join(repr(n + '/') for n in names)}" for names in by_split.values() if len(names) > 1]
    problems += [f"no {split}/ folder" for split in ("train", "test") if split not in by_split]
    if problems:
        raise LayoutError(
            f"{reading.uri(folder.path)}: {'; '.join(problems)}. Expected {reading.spec.dataset_hint}. "
            f"Found: {folder.describe()}"
        )
    reading.skip_files(folder.files.values(), "not in a split folder")
    for name, path in folder.dirs.items():
        if is_hidden(name):
            reading.skip_files(reading.fs.find(path), "in a hidden folder")
    splits = {
        split: _read_class_set(reading, _list(reading.fs, folder.dirs[names[0]])) for split, names in by_split.items()
    }
    if "validation" not in splits:
        splits["train"], splits["validation"] = _carve(reading, splits["train"], val_fraction)
    _note_shared_patients(reading, splits)
    return splits


def _carve(reading: _Reading, train: list[Record], val_fraction: float) -> tuple[list[Record], list[Record]]:
    """A validation split taken from train by patient, for datasets that ship without one."""
    kept = [r for r in train if split_of(r["patient"], val_fraction, 0.0) == "train"]
    carved = [r for r in train if split_of(r["patient"], val_fraction, 0.0) == "validation"]
    reading.notes.append(
        f"no validation split: carved {val_fraction:.0%} of train by patient "
        f"({len({r['patient'] for r in carved})} patients, {len(carved)} images)"
    )
    return kept, carved


def _note_shared_patients(reading: _Reading, splits: dict[str, list[Record]]) -> None:
    """A dataset's own split may not be patient-disjoint; say so rather than hide it."""
    seen: dict[str, set[str]] = {}
    for split, records in splits.items():
        for r in records:
            seen.setdefault(r["patient"], set()).add(split)
    shared = sorted(p for p, in_splits in seen.items() if len(in_splits) > 1)
    if shared:
        reading.notes.append(
            f"{len(shared)} patient(s) have images in more than one split folder, e.g. {', '.join(shared[:5])} "
            "(the dataset's own split is not patient-disjoint)"
        )


def read_class_folders(spec: TaskSpec, root: str, *, val_fraction: float = 0.15, test_fraction: float = 0.15) -> Layout:
    """One folder per class, either inside train/ test/ [val/] folders or directly in the root."""
    _check_fractions(val_fraction, test_fraction)
    reading, path = _Reading.open(spec, root)
    folder = reading.descend(
        path, lambda f: any(_split_of_folder(n) or _class_of(spec, n) for n in f.dirs if not is_hidden(n))
    )
    if any(_split_of_folder(n) for n in folder.dirs if not is_hidden(n)):
        splits = _read_split_folders(reading, folder, val_fraction)
    else:
        records = _read_class_set(reading, folder)
        splits = {}
        for r in records:
            splits.setdefault(split_of(r["patient"], val_fraction, test_fraction), []).append(r)
        reading.split_note(records, val_fraction, test_fraction, "flat layout (one folder per class)")
        _note_unmatched_names(reading, records)
    return reading.layout(folder.path, splits)


def _note_unmatched_names(reading: _Reading, records: list[Record]) -> None:
    pattern = reading.spec.patient_id_pattern
    unmatched = [r for r in records if _patient_match(reading.spec, r["path"]) is None]
    if pattern is None:
        reading.notes.append("the task has no patient id pattern: split by file name")
    elif unmatched:
        reading.notes.append(
            f"{len(unmatched)} of {len(records)} file names have no patient id (pattern {pattern!r}): "
            "those are split by file name"
        )


# --- odir_sheet ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SheetRow:
    patient: str
    files: dict[str, str]  # eye column -> file name ("" when the cell is empty)
    label: list[float]


def _sheet_candidates(folder: _Folder) -> list[str]:
    """Sheets to try, in order: data.csv, data.xlsx, any other .xlsx, any other .csv."""
    files = {n.lower(): p for n, p in folder.files.items() if not n.startswith((".", "~$"))}  # ~$: Office locks
    ordered = [files[n] for n in ("data.csv", "data.xlsx") if n in files]
    for extension in (".xlsx", ".csv"):
        ordered += [p for n, p in files.items() if n.endswith(extension) and p not in ordered]
    return ordered


def _read_table(fs: fsspec.AbstractFileSystem, path: str):
    import pandas as pd

    with fs.open(path, "rb") as f:
        table = pd.read_excel(f) if path.lower().endswith(".xlsx") else pd.read_csv(f)
    table.columns = [str(c).strip() for c in table.columns]
    return table


def _cell(value) -> str:
    """A sheet cell as text: ids read as floats ('4.0') become '4', empty cells ''."""
    import pandas as pd

    if pd.isna(value):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _read_sheet(reading: _Reading, folder: _Folder) -> tuple[str, list[_SheetRow]]:
    """The first sheet with the required columns, as one row per patient."""
    required = (*SHEET_COLUMNS, *reading.spec.classes)
    problems = []
    for path in _sheet_candidates(folder):
        name = posixpath.basename(path)
        try:
            table = _read_table(reading.fs, path)
        except Exception as e:  # noqa: BLE001 - any unreadable file is just "not the sheet"
            problems.append(f"{name!r} is unreadable ({type(e).__name__}: {e})")
            continue
        missing = [c for c in required if c not in table.columns]
        if missing:
            problems.append(f"{name!r} lacks column(s) {', '.join(missing)}")
            continue
        reading.notes.append(f"labels from sheet {name!r} ({len(table)} rows)")
        return path, _sheet_rows(reading, name, table[list(required)])
    raise LayoutError(
        f"{reading.uri(folder.path)}: no sheet with columns {', '.join(required)}"
        f"{': ' + '; '.join(problems) if problems else ''}. Expected {reading.spec.dataset_hint}. "
        f"Found: {folder.describe()}"
    )


def _sheet_rows(reading: _Reading, name: str, table) -> list[_SheetRow]:
    """Validate labels (0/1) and collapse repeated rows (some exports have one row per eye)."""
    import pandas as pd

    classes = list(reading.spec.classes)
    unique = table.drop_duplicates()
    if len(unique) < len(table):
        reading.notes.append(f"sheet {name!r}: {len(table) - len(unique)} repeated rows ignored")
    ids = unique["ID"].map(_cell)
    conflicting = sorted(set(ids[ids.duplicated()]))
    if conflicting:
        raise LayoutError(f"sheet {name!r}: rows for the same ID disagree, for ID(s) {', '.join(conflicting[:10])}")
    labels = unique[classes].apply(pd.to_numeric, errors="coerce")
    bad = ~labels.isin([0, 1]).all(axis=1)
    if bad.any():
        raise LayoutError(
            f"sheet {name!r}: label columns {' '.join(classes)} must hold 0 or 1; not so for ID(s) "
            f"{', '.join(ids[bad].head(10))}"
        )
    return [
        _SheetRow(patient, {c: _cell(unique.at[i, c]) for c in EYE_COLUMNS}, [float(v) for v in labels.loc[i]])
        for i, patient in ids.items()
    ]


def _image_folder(reading: _Reading, folder: _Folder, names: set[str]) -> _Folder:
    """The candidate folder holding most of the sheet's file names, each listed once."""
    by_key = {_folder_key(n): p for n, p in folder.dirs.items()}
    candidates = [by_key[_folder_key(n)] for n in SHEET_IMAGE_FOLDERS if _folder_key(n) in by_key]
    best, best_hits = folder, -1
    for path in [*candidates, folder.path]:
        listed = folder if path == folder.path else _list(reading.fs, path)
        hits = len(names & listed.files.keys())
        if hits > best_hits:
            best, best_hits = listed, hits
        if hits == len(names):
            break
    if best_hits <= 0:
        looked = ", ".join(repr(posixpath.basename(p) + "/") for p in candidates) or "no image folder"
        raise LayoutError(
            f"{reading.uri(folder.path)}: no folder holds the images the sheet names (e.g. "
            f"{', '.join(sorted(names)[:3])}); looked in {looked} and the sheet's folder. "
            f"Expected {reading.spec.dataset_hint}. Found: {folder.describe()}"
        )
    return best


def read_odir_sheet(spec: TaskSpec, root: str, *, val_fraction: float = 0.15, test_fraction: float = 0.15) -> Layout:
    """A sheet of per-patient labels naming a left and a right eye image (ODIR-5K)."""
    _check_fractions(val_fraction, test_fraction)
    reading, path = _Reading.open(spec, root)
    folder = reading.descend(path, lambda f: bool(_sheet_candidates(f)))
    sheet, rows = _read_sheet(reading, folder)
    images = _image_folder(reading, folder, {n for row in rows for n in row.files.values() if n})
    records: list[Record] = []
    for row in rows:
        for column, name in row.files.items():
            if not name:
                reading.skip("", f"no {column} file named in the sheet", patient=row.patient)
            elif name in images.files:
                records.append(
                    {"path": reading.uri(images.files[name]), "label": list(row.label), "patient": row.patient}
                )
            else:
                reading.skip(posixpath.join(images.path, name), "image file missing", patient=row.patient)
    used = {n for row in rows for n in row.files.values()}
    for name, file in images.files.items():
        if name not in used and file != sheet:
            reading.skip(file, skip_reason(name) or "not in the sheet")
    reading.notes.append(f"images from {reading.uri(images.path)!r}")
    splits: dict[str, list[Record]] = {}
    for r in records:
        splits.setdefault(split_of(r["patient"], val_fraction, test_fraction), []).append(r)
    reading.split_note(records, val_fraction, test_fraction, "sheet layout")
    return reading.layout(folder.path, splits)


# --- dispatch ------------------------------------------------------------------------------------

Reader = Callable[..., Layout]
LAYOUTS: dict[str, Reader] = {"class_folders": read_class_folders, "odir_sheet": read_odir_sheet}


def read_layout(spec: TaskSpec, root: str, *, val_fraction: float = 0.15, test_fraction: float = 0.15) -> Layout:
    """Read `root` (a local folder or an s3:// prefix) with the reader of the task's layout."""
    try:
        reader = LAYOUTS[spec.layout]
    except KeyError:
        raise ValueError(f"task {spec.name!r}: unknown layout {spec.layout!r}; known: {', '.join(LAYOUTS)}") from None
    return reader(spec, str(root), val_fraction=val_fraction, test_fraction=test_fraction)
