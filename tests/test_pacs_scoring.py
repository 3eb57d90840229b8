"""`eyeray score` against a real PACS: Orthanc on 127.0.0.1, loaded with real OCT B-scans as DICOM
(single-frame instances and a JPEG 2000 volume). Instances are listed by QIDO-RS with a study-date
and modality filter, read by WADO-RS inside Ray Data's tasks, scored exactly once, and the results go
back over STOW-RS as an SR and Grad-CAM Secondary Captures per instance or volume, never twice.
A PACS answering errors, or down, is retried by Ray, and a re-run resumes."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
import requests
from bundles import make_bundle
from corpus import make_oct_volume, real_bscans
from orthanc import forward, http_server, running_orthanc
from pydicom.uid import generate_uid

from eyeray import dicomweb
from eyeray.decision.options import DecisionOptions
from eyeray.score import ScoreConfig, run, shards

pytestmark = pytest.mark.cluster

SINGLE = ["CNV-1150304-1.jpeg", "DME-247204-1.jpeg", "DRUSEN-2851896-1.jpeg", "NORMAL-1553966-1.jpeg"]
CUBE = ["CNV-6552587-1.jpeg", "CNV-6552587-2.jpeg", "CNV-6552587-3.jpeg", "CNV-6552587-4.jpeg"]
STUDY, OTHER_DAY = generate_uid(), generate_uid()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, oct_sample):
    """Orthanc holding study STUDY (20261201: four OCT B-scans and a four-B-scan JPEG 2000 cube), a
    fundus-modality instance in the same study, and an OCT instance of another day."""
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        for bscan in real_bscans(oct_sample, SINGLE):
            server.upload(make_oct_volume([bscan], study_uid=STUDY, study_date="20261201"))
        server.upload(
            make_oct_volume(real_bscans(oct_sample, CUBE), jpeg2000=True, study_uid=STUDY, study_date="20261201")
        )
        fundus = pydicom.dcmread(io.BytesIO(make_oct_volume(real_bscans(oct_sample, SINGLE[:1]), study_uid=STUDY)))
        fundus.Modality, fundus.SOPInstanceUID = "OP", generate_uid()
        fundus.file_meta.MediaStorageSOPInstanceUID = fundus.SOPInstanceUID
        server.upload(_bytes(fundus))
        server.upload(make_oct_volume(real_bscans(oct_sample, SINGLE[:1]), study_uid=OTHER_DAY, study_date="20250101"))
        yield server


def _bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("model"), decision=True)


def config(bundle: str, source: str, output: Path, **extra) -> ScoreConfig:
    # the gate off and a threshold of 0: every image is answered and referred, so each instance and
    # the volume get an SR, and the volume's every B-scan drives its answer (and has an overlay)
    return ScoreConfig(
        bundles=[bundle],
        input=source,
        output=str(output),
        study_date="20261201-20261231",
        modality=["OPT"],
        decision=DecisionOptions(thresholds="0", gate=False),
        batch_size=4,
        rows_per_shard=3,
        **extra,
    )


def rows_of(output: Path, key: str) -> list[dict]:
    return shards.committed(str(output), key, ["path", "frame", "status", "error", "sop_uid"]).to_pylist()


def test_score_reads_the_pacs_and_writes_results_back_once(ray_cluster, pacs, bundle_dir, tmp_path):
    before = pacs.instance_count()
    output = tmp_path / "scored"
    summary = run(config(bundle_dir, pacs.dicomweb, output, write_back=True))

    rows = rows_of(output, summary["bundle_version"])
    assert summary["files_seen"] == 5 and summary["errors"] == 0  # the OP instance and the other day: filtered
    assert sorted((r["frame"] is None) for r in rows) == [False] * 4 + [True] * 4  # 4 instances + 4 B-scans
    assert {dicomweb.Instance.from_uri(r["path"]).study_uid for r in rows} == {STUDY}
    assert all(dicomweb.Instance.from_uri(r["path"]).sop_uid == r["sop_uid"] for r in rows)
    assert summary["volumes"]["volumes"] == 1 and summary["volumes"]["referred"] == 1
    # 4 instances: an SR and an overlay each; the volume: an SR and an overlay per driving B-scan
    assert summary["written_back"] == {"studies": 1, "results": 5, "stored": 4 * 2 + 1 + 4, "already_present": 0}
    assert pacs.instance_count() == before + 13

    series = requests.get(f"{pacs.dicomweb}/studies/{STUDY}/series", timeout=30).json()
    modalities = sorted(s["00080060"]["Value"][0] for s in series)
    assert modalities == ["OP", "OPT", "OPT", "OPT", "OPT", "OPT", "OT", "SR"]  # 2 new series in the source study
    sources = {r["sop_uid"] for r in rows}
    reports = dicomweb.search_instances(dicomweb.Pacs(pacs.dicomweb), modalities=("SR",))
    assert len(reports) == 5
    for found in reports:
        sr = hd.sr.srread(io.BytesIO(dicomweb.read(dicomweb.Pacs(pacs.dicomweb), found.uri)))
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert {item.ReferencedSOPInstanceUID for item in evidence.ReferencedSOPSequence} <= sources
        assert sr.StudyInstanceUID == STUDY and sr.PatientID == "TEST-0001"

    again = run(config(bundle_dir, pacs.dicomweb, output, write_back=True))  # a re-run: nothing twice
    assert again["scored_this_run"] == 0 and again["rows"] == 8
    assert again["written_back"] == {"studies": 1, "results": 5, "stored": 0, "already_present": 13}
    assert pacs.instance_count() == before + 13


def test_a_pacs_answering_errors_is_retried_and_one_that_stays_down_resumes(ray_cluster, pacs, bundle_dir, tmp_path):
    """A gateway in front of Orthanc: it fails the first WADO-RS reads with 503 (Ray retries the
    read tasks, nothing becomes an error row), then fails every read (the run stops with one line;
    what was committed stays), then comes back (the same command scores the rest, each once)."""
    state = {"fail_next": 2, "down": False}
    lock = threading.Lock()

    def gateway(request, body):
        reading = "/instances/" in request.path and request.command == "GET"
        with lock:
            failing = reading and (state["down"] or state["fail_next"] > 0)
            if failing and not state["down"]:
                state["fail_next"] -= 1
        if failing:
            return 503, {"Content-Type": "text/plain"}, b"PACS busy"
        return forward(pacs.url, request, body)

    with http_server(gateway) as front:
        output = tmp_path / "flaky"
        summary = run(config(bundle_dir, front + "/dicom-web", output))
        assert state["fail_next"] == 0 and summary["errors"] == 0 and summary["rows"] == 8

        key = summary["bundle_version"]
        output = tmp_path / "down"
        state["down"] = True
        with pytest.raises(dicomweb.PacsUnavailable, match="answered 503.*run the same command again to do the rest"):
            run(config(bundle_dir, front + "/dicom-web", output, block_batches=1))
        committed = len(rows_of(output, key))
        state["down"] = False
        summary = run(config(bundle_dir, front + "/dicom-web", output, block_batches=1))
        keys = [(r["path"], r["frame"]) for r in rows_of(output, key)]
        assert len(keys) == len(set(keys)) == 8 and summary["errors"] == 0
        assert summary["scored_this_run"] == 8 - committed


def test_writing_back_to_a_pacs_that_refuses_stores_stops_and_a_rerun_stores_each_object_once(
    ray_cluster, pacs, tmp_path
):
    """STOW-RS answered with 503 (reads still work): Ray retries the study's task, then the run stops
    with one line; once the PACS takes stores again, the same command stores every object once."""
    other_model = make_bundle(tmp_path / "model", decision=True, seed=1)  # its own UIDs: nothing stored yet
    state = {"refuse_stores": True}

    def gateway(request, body):
        if request.command == "POST" and state["refuse_stores"]:
            return 503, {"Content-Type": "text/plain"}, b"storage full"
        return forward(pacs.url, request, body)

    before = pacs.instance_count()
    with http_server(gateway) as front:
        cfg = config(other_model, front + "/dicom-web", tmp_path / "out", write_back=True)
        with pytest.raises(dicomweb.PacsUnavailable, match="answered 503.*run the same command again to do the rest"):
            run(cfg)
        assert pacs.instance_count() == before
        state["refuse_stores"] = False
        summary = run(cfg)
    assert summary["scored_this_run"] == 0  # the rows were committed before the write-back failed
    assert summary["written_back"] == {"studies": 1, "results": 5, "stored": 13, "already_present": 0}
    assert pacs.instance_count() == before + 13
