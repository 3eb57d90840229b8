"""OCT volumes: a multi-frame DICOM is scored B-scan by B-scan and answered once, by a stated rule.

The volumes are built from real Kermany B-scans ($EYERAY_SAMPLES/oct-sample), stacked into Ophthalmic
Tomography Image Storage files, uncompressed and JPEG 2000."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest
from corpus import make_oct_volume, real_bscans
from pydicom.encaps import encapsulate, generate_frames

from eyeray.data import imaging
from eyeray.decision.volume import RULE, BScan, aggregate
from eyeray.score import shards, volumes

PATIENT = ["CNV-6552587-1.jpeg", "CNV-6552587-2.jpeg", "CNV-6552587-3.jpeg", "CNV-6552587-4.jpeg"]


@pytest.fixture(scope="module")
def bscans(oct_sample) -> list[np.ndarray]:
    return real_bscans(oct_sample, PATIENT)


@pytest.mark.parametrize("jpeg2000", [False, True], ids=["uncompressed", "jpeg2000"])
def test_a_volume_is_one_record_per_bscan_with_its_pixels(bscans, jpeg2000):
    data = make_oct_volume(bscans, jpeg2000=jpeg2000)
    assert pydicom.dcmread(pa.BufferReader(data)).file_meta.TransferSyntaxUID.is_compressed == jpeg2000
    rows = imaging.load_frames({"path": "cube.dcm", "bytes": data}, 64)
    assert [r["frame"] for r in rows] == [0, 1, 2, 3] and {r["frames"] for r in rows} == {4}
    for row, bscan in zip(rows, bscans):  # lossless: each frame is its B-scan, resized as training resizes
        assert row["error"] == "" and (row["height"], row["width"]) == bscan.shape
        np.testing.assert_array_equal(row["image"], imaging.preprocess(imaging.gray_to_rgb(bscan), 64))
        assert row["modality"] == "OPT" and row["laterality"] == "L" and row["sop_uid"]


def test_a_resumed_volume_decodes_only_the_bscans_not_yet_committed(bscans):
    data = make_oct_volume(bscans)
    rows = imaging.load_frames({"path": "cube.dcm", "bytes": data, "done_frames": np.array([0, 2])}, 32)
    assert [r["frame"] for r in rows] == [1, 3]


def test_a_corrupt_bscan_is_an_error_row_beside_its_sound_neighbours(bscans):
    ds = pydicom.dcmread(pa.BufferReader(make_oct_volume(bscans, jpeg2000=True)))
    frames = list(generate_frames(ds.PixelData, number_of_frames=4))
    frames[1] = b"\xff\x4f" + bytes(len(frames[1]) - 2)  # a JPEG 2000 start with garbage after it
    ds.PixelData = encapsulate(frames)
    out = pa.BufferOutputStream()
    ds.save_as(out)
    rows = imaging.load_frames({"path": "cube.dcm", "bytes": out.getvalue().to_pybytes()}, 32)
    assert [r["frame"] for r in rows] == [0, 1, 2, 3]
    assert [bool(r["error"]) for r in rows] == [False, True, False, False]
    assert rows[1]["error"].startswith("unreadable DICOM")


def test_single_images_and_unreadable_files_keep_one_row_without_a_frame(tmp_path):
    from corpus import encode, gradient, make_dicom

    (tmp_path / "a.png").write_bytes(encode(gradient(), "PNG"))
    (tmp_path / "b.dcm").write_bytes(make_dicom(np.full((20, 30), 500, np.uint16)))
    batch = {"path": np.array([str(tmp_path / n) for n in ("a.png", "b.dcm", "gone.png")], object)}
    out = imaging.load_batch(batch, 16, every_frame=True)
    assert list(out["frame"]) == [-1, -1, -1] and list(out["frames"]) == [1, 1, 0]
    assert [bool(e) for e in out["error"]] == [False, False, True]


def test_a_bscan_overlay_reads_the_frame_it_explains(tmp_path, bscans):
    (tmp_path / "cube.dcm").write_bytes(make_oct_volume(bscans))
    thumb, reason = imaging.read_thumbnail(str(tmp_path / "cube.dcm"), 1024, frame=2)
    assert reason == "" and thumb.shape == (*bscans[2].shape, 3)
    np.testing.assert_array_equal(thumb[:, :, 0], bscans[2])
    assert imaging.read_thumbnail(str(tmp_path / "cube.dcm"), 64, frame=9) == (None, "no frame 9 in a file of 4")


# --------------------------------------------------------------------------- the rule


def scan(frame, status="ok", cnv=0.1, dme=0.1, refer=None, reason="", review=False) -> BScan:
    probs = {"CNV": cnv, "DME": dme, "DRUSEN": 0.1, "NORMAL": 1 - cnv - dme - 0.1} if status == "ok" else {}
    label = max(probs, key=probs.get) if probs else None
    refer = (cnv + dme >= 0.5) if refer is None and status == "ok" else refer
    return BScan(frame, status, (label,) if label else (), probs, refer, review, reason)


REFERRAL = ("CNV", "DME")


def test_any_referred_bscan_refers_the_volume_and_the_referred_ones_drive_it():
    answer = aggregate(
        [scan(0), scan(1, cnv=0.7), scan(2, dme=0.8), scan(3, "declined", reason="ungradable")], REFERRAL
    )
    assert answer.status == "ok" and answer.referral is True
    assert answer.driving == (2, 1) and answer.closest == 2  # highest referral score first
    assert answer.labels == ("DME",) and answer.probabilities["DME"] == 0.8
    assert (answer.frames, answer.answered, answer.declined, answer.errors) == (4, 3, 1, 0)
    assert "2 of 4 B-scans referred: frames 2, 1" == answer.reason


def test_a_volume_is_cleared_only_when_every_bscan_was_answered():
    cleared = aggregate([scan(0), scan(1, cnv=0.3), scan(2)], REFERRAL)
    assert cleared.status == "ok" and cleared.referral is False and cleared.driving == () and cleared.closest == 1
    assert cleared.reason == "none of 3 B-scans referred; closest: frame 1"
    unsure = aggregate([scan(0), scan(1, "declined", reason="ungradable: blurred"), scan(2, "error", reason="bad")])
    assert unsure.status == "declined" and unsure.referral is None and unsure.labels == ()
    assert unsure.needs_review and unsure.driving == (1, 2)
    assert unsure.reason == "2 of 3 B-scans not answered (1 ungradable: blurred; 1 bad), none of the others referred"


def test_a_volume_no_bscan_of_which_decoded_is_an_error():
    failed = aggregate([scan(0, "error", reason="unreadable DICOM: x")] * 2, REFERRAL)
    assert failed.status == "error" and failed.reason == "2 of 2 B-scans not answered (2 unreadable DICOM: x)"


def test_without_a_referral_rule_the_most_confident_bscan_answers():
    plain = [BScan(0, "ok", ("A",), {"A": 0.6, "B": 0.4}), BScan(1, "ok", ("B",), {"A": 0.1, "B": 0.9})]
    answer = aggregate(plain)
    assert answer.referral is None and answer.labels == ("B",) and answer.closest == 1 and answer.driving == ()
    assert answer.answer()["rule"] == RULE


# --------------------------------------------------------------------------- resume and the volume table


def committed_rows(tmp_path, rows: list[dict]) -> None:
    """Shards as an interrupted run leaves them: each dict one shard of (path, frame, frames) rows."""
    for i, shard in enumerate(rows):
        table = pa.table(
            {
                "path": pa.array(shard["path"], pa.string()),
                "frame": pa.array(shard["frame"], pa.int32()),
                "frames": pa.array(shard["frames"], pa.int32()),
            }
        )
        pq.write_table(table, tmp_path / f"{shards.PART_PREFIX}v1-{i}.parquet")


def test_remaining_resumes_a_volume_whose_bscans_span_shards(tmp_path):
    committed_rows(
        tmp_path,
        [
            {"path": ["a.png", "cube", "cube"], "frame": [None, 0, 1], "frames": [1, 3, 3]},
            {"path": ["whole", "whole"], "frame": [0, 1], "frames": [2, 2]},
        ],
    )
    found = pa.array(["a.png", "b.png", "cube", "whole"])
    todo = shards.remaining(str(tmp_path), "v1", found)
    assert todo.column("path").to_pylist() == ["b.png", "cube"]
    assert todo.column("done_frames").to_pylist() == [None, [0, 1]]


def test_the_volume_table_answers_each_volume_once_from_its_rows(tmp_path):
    def row(frame, status="ok", cnv=0.1, refer=False, task="oct"):
        probs = {"CNV": cnv, "DME": 0.1, "DRUSEN": 0.1, "NORMAL": 0.7 - cnv} if status == "ok" else None
        return {
            "path": "cube.dcm",
            "frame": frame,
            "frames": 3,
            "status": status,
            "error": "boom" if status == "error" else None,
            "gate": "in_distribution" if status == "ok" else None,
            "gate_reason": None,
            "label": "CNV" if refer else ("NORMAL" if status == "ok" else None),
            "probabilities": probs,
            "referral": refer if status == "ok" else None,
            "needs_review": False,
            "explanations": [f"explanations/k/cube-f{frame}-CNV.png"] if refer else [],
            "task": task,
            "patient_id": "P1",
            "study_uid": "1.2.3",
        }

    table = pa.Table.from_pylist(
        [row(0), row(1, cnv=0.8, refer=True), row(2, "error"), {**row(0), "path": "a.png", "frame": None}]
    )
    manifests = [{"task": "oct", "referral_classes": ["CNV", "DME"]}]
    answers = volumes.answers(table, manifests).to_pylist()
    assert len(answers) == 1
    (v,) = answers
    assert (v["path"], v["status"], v["referral"], v["driving_frames"]) == ("cube.dcm", "ok", True, [1])
    assert v["explanations"] == ["explanations/k/cube-f1-CNV.png"] and v["patient_id"] == "P1"
    assert (v["frames"], v["answered"], v["errors"]) == (3, 2, 1)
    volumes.write(str(tmp_path), volumes.answers(table, manifests))
    assert pq.read_table(tmp_path / volumes.VOLUMES_FILE).num_rows == 1
    assert volumes.summary(volumes.answers(table, manifests)) == {
        "volumes": 1,
        "referred": 1,
        "cleared": 0,
        "declined": 0,
        "errors": 0,
    }
