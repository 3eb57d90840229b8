"""eyeray.dicomweb against a real Orthanc 1.10 with its DICOMweb plugin (started per test on 127.0.0.1,
0.1 s): QIDO-RS filters and paging, WADO-RS bytes, idempotent STOW-RS, basic and bearer auth, and
the faults a PACS can show (down, slow, 5xx, 404, refused or dropped instances). The few HTTP servers
here are real ones on 127.0.0.1 that either forward to Orthanc (checking a bearer token, counting or
rewriting requests) or play a faulty PACS."""

from __future__ import annotations

import io
import json
import pickle
import re
import threading
import time
from collections.abc import Iterator

import numpy as np
import pydicom
import pytest
from orthanc import OrthancServer, forward, http_server, running_orthanc
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from eyeray.dicomweb import (
    Instance,
    Pacs,
    PacsError,
    PacsUnavailable,
    StoreResult,
    retrieve_instance,
    search_instances,
    split_multipart,
    store_instances,
)

OPT_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.5.4"  # Ophthalmic Tomography Image Storage


def dicom_file(
    study: str, series: str, *, date: str, modality: str, seed: int = 0, transfer_syntax: str = ExplicitVRLittleEndian
) -> bytes:
    """A small Part-10 file with its own SOP Instance UID, distinct pixels and the given study/series."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = OPT_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = OPT_CLASS, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientName = "TEST-0001", "Test^Patient"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.StudyDate, ds.Modality = date, modality
    ds.Rows, ds.Columns = 24, 32
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.random.default_rng(seed).integers(0, 4096, (24, 32), dtype=np.uint16).tobytes()
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def sop_uid(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


@pytest.fixture
def orthanc(tmp_path) -> Iterator[OrthancServer]:
    """A fresh, empty Orthanc for each test: it starts in about 0.1 s and is killed by its pid."""
    with running_orthanc(tmp_path / "orthanc") as server:
        yield server


# Three studies: A (2026-01-05) with an OPT series of 3 and an OP series of 1; B (2025-12-31) with 2 OPT;
# C (2026-07-01) with 1 SR.
CORPUS = [
    ("A", "20260105", "OPT", 3),
    ("A", "20260105", "OP", 1),
    ("B", "20251231", "OPT", 2),
    ("C", "20260701", "SR", 1),
]


@pytest.fixture
def loaded(orthanc) -> dict[tuple[str, str], set[str]]:
    """Upload CORPUS through Orthanc's REST API; returns {(study letter, modality): SOP Instance UIDs}."""
    studies = {letter: generate_uid() for letter in "ABC"}
    expected: dict[tuple[str, str], set[str]] = {}
    for seed, (letter, date, modality, count) in enumerate(CORPUS):
        series = generate_uid()
        for i in range(count):
            data = dicom_file(studies[letter], series, date=date, modality=modality, seed=10 * seed + i)
            orthanc.upload(data)
            expected.setdefault((letter, modality), set()).add(sop_uid(data))
    return expected


def assert_no_identifiers(message: str, pacs_url: str, *uids: str) -> None:
    """Error messages reach logs, which must hold no DICOM identifier (issue 26): none of `uids`, and
    nothing UID-shaped at all once the PACS root (whose host may be an IP address) is taken out."""
    assert uids and all(len(uid) > 8 for uid in uids)  # a short one could hide in the port number
    for uid in uids:
        assert uid not in message, (uid, message)
    assert not re.search(r"\d+(?:\.\d+){2,}", message.replace(pacs_url, "")), message


def all_uids(expected: dict[tuple[str, str], set[str]], *keys: tuple[str, str]) -> list[str]:
    return sorted(set().union(*(expected[k] for k in keys)))


def test_qido_filters_by_study_date_and_modality(orthanc, loaded):
    pacs = Pacs(orthanc.dicomweb)
    everything = search_instances(pacs)
    assert sorted(i.sop_uid for i in everything) == all_uids(loaded, *loaded)
    assert everything == sorted(everything, key=lambda i: (i.study_uid, i.series_uid, i.sop_uid))
    cases = {
        ("20260101-20261231", ()): [("A", "OPT"), ("A", "OP"), ("C", "SR")],
        ("20260101-", ()): [("A", "OPT"), ("A", "OP"), ("C", "SR")],
        ("-20251231", ()): [("B", "OPT")],
        ("20260105", ()): [("A", "OPT"), ("A", "OP")],
        ("20270101-", ()): [],
        (None, ("OPT",)): [("A", "OPT"), ("B", "OPT")],
        (None, ("op",)): [("A", "OP")],
        ("20260101-", ("OPT", "SR")): [("A", "OPT"), ("C", "SR")],
        ("20251201-20251231", ("OPT", "OP")): [("B", "OPT")],
    }
    for (study_date, modalities), keys in cases.items():
        for page_size in (1000, 2):
            found = search_instances(pacs, study_date=study_date, modalities=modalities, page_size=page_size)
            assert found == sorted(found, key=lambda i: (i.study_uid, i.series_uid, i.sop_uid))
            assert sorted(i.sop_uid for i in found) == (all_uids(loaded, *keys) if keys else []), (
                study_date,
                modalities,
                page_size,
            )
    by_uid = {i.sop_uid: i for i in everything}
    for (_, modality), uids in loaded.items():
        assert {by_uid[u].modality for u in uids} == {modality}
    first = everything[0]
    assert first.uri == (
        f"{orthanc.dicomweb}/studies/{first.study_uid}/series/{first.series_uid}/instances/{first.sop_uid}"
    )
    assert Instance.from_uri(first.uri) == Instance(
        orthanc.dicomweb, first.study_uid, first.series_uid, first.sop_uid, ""
    )


def test_qido_rejects_a_malformed_date_or_modality(orthanc):
    pacs = Pacs(orthanc.dicomweb)
    for bad in ("2026", "20260101-2026", "-", "20261231-20260101", "2026010120261231"):
        with pytest.raises(ValueError, match="study_date"):
            search_instances(pacs, study_date=bad)
    with pytest.raises(ValueError, match="Modality"):
        search_instances(pacs, modalities=("OPT,OP",))


def test_qido_pages_with_limit_and_offset(orthanc, loaded):
    """7 instances in pages of 2: 4 requests, the last one short; a first page shorter than asked
    costs one more (empty) request, in case the server caps `limit`."""
    seen: list[dict[str, str]] = []

    def counting(request, body):
        from urllib.parse import parse_qsl, urlsplit

        seen.append(dict(parse_qsl(urlsplit(request.path).query)))
        return forward(orthanc.url, request, body)

    with http_server(counting) as proxy:
        pacs = Pacs(proxy + "/dicom-web")
        paged = search_instances(pacs, page_size=2)
        assert [(q["limit"], q["offset"]) for q in seen] == [("2", "0"), ("2", "2"), ("2", "4"), ("2", "6")]
        assert [i.uri.replace(proxy, orthanc.url) for i in paged] == [
            i.uri for i in search_instances(Pacs(orthanc.dicomweb))
        ]
        assert len(paged) == 7
        seen.clear()
        assert len(search_instances(pacs, page_size=3, modalities=("SR",))) == 1
        assert [(q["limit"], q["offset"], q["Modality"]) for q in seen] == [("3", "0", "SR"), ("3", "1", "SR")]


def test_wado_returns_the_stored_file_without_transcoding(orthanc):
    """Both an uncompressed and an RLE-compressed file come back with their SOP Instance UID, their own
    transfer syntax (transfer-syntax=*) and identical pixels."""
    study, series = generate_uid(), generate_uid()
    files = [
        dicom_file(study, series, date="20260105", modality="OPT", seed=1),
        dicom_file(study, series, date="20260105", modality="OPT", seed=2, transfer_syntax=RLELossless),
    ]
    for data in files:
        orthanc.upload(data)
    pacs = Pacs(orthanc.dicomweb)
    found = {i.sop_uid: i for i in search_instances(pacs)}
    assert len(found) == 2
    for data in files:
        original = pydicom.dcmread(io.BytesIO(data))
        got = retrieve_instance(pacs, found[original.SOPInstanceUID])
        copy = pydicom.dcmread(io.BytesIO(got))
        assert copy.SOPInstanceUID == original.SOPInstanceUID
        assert copy.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert copy.PixelData == original.PixelData
        np.testing.assert_array_equal(copy.pixel_array, original.pixel_array)
        # and through a stored row's `path`, as a resumed run reads it
        assert retrieve_instance(pacs, Instance.from_uri(found[original.SOPInstanceUID].uri)) == got


def test_stow_stores_into_the_study_and_a_retry_sends_nothing_again(orthanc):
    study = generate_uid()
    orthanc.upload(dicom_file(study, generate_uid(), date="20260105", modality="OPT", seed=1))
    results_series = generate_uid()
    new = [dicom_file(study, results_series, date="20260105", modality="SR", seed=s) for s in (2, 3, 4)]
    posts: list[str] = []

    def counting(request, body):
        if request.command == "POST":
            posts.append(request.path)
        return forward(orthanc.url, request, body)

    with http_server(counting) as proxy:
        pacs = Pacs(proxy + "/dicom-web")
        before = orthanc.instance_count()
        first = store_instances(pacs, new, study)
        assert first == StoreResult(stored=tuple(sorted(map(sop_uid, new))), already_present=())
        assert orthanc.instance_count() == before + 3
        assert posts == [f"/dicom-web/studies/{study}"]

        again = store_instances(pacs, new, study)  # a retried task: nothing is sent
        assert again == StoreResult(stored=(), already_present=first.stored)
        assert orthanc.instance_count() == before + 3 and len(posts) == 1

        one_more = dicom_file(study, results_series, date="20260105", modality="SR", seed=5)
        mixed = store_instances(pacs, [*new, one_more, one_more], study)
        assert mixed == StoreResult(stored=(sop_uid(one_more),), already_present=first.stored)
        assert orthanc.instance_count() == before + 4 and len(posts) == 2

    in_study = {i.sop_uid for i in search_instances(Pacs(orthanc.dicomweb)) if i.study_uid == study}
    assert in_study >= set(first.stored) | {sop_uid(one_more)}

    other = dicom_file(generate_uid(), generate_uid(), date="20260105", modality="SR")
    with pytest.raises(ValueError, match="belongs to another study than the one it is stored into"):
        store_instances(Pacs(orthanc.dicomweb), [other], study)
    with pytest.raises(ValueError, match="Part-10"):
        store_instances(Pacs(orthanc.dicomweb), [new[0][132:]], study)
    assert orthanc.instance_count() == before + 4


def test_stow_refused_by_the_pacs_is_a_pacs_error_giving_the_reason(orthanc):
    """A proxy posts into another study than the files hold: Orthanc's own 409 and FailedSOPSequence.
    The message counts and gives the reason but names no UID (it reaches logs)."""
    study, elsewhere, series = generate_uid(), generate_uid(), generate_uid()
    data = dicom_file(study, series, date="20260105", modality="SR")

    def rewriting(request, body):
        return forward(orthanc.url, request, body, path=request.path.replace(study, elsewhere))

    with http_server(rewriting) as proxy:
        with pytest.raises(PacsError) as caught:
            store_instances(Pacs(proxy + "/dicom-web"), [data], study)
    assert not isinstance(caught.value, PacsUnavailable)
    message = str(caught.value)
    assert message == (
        f"PACS {proxy}/dicom-web refused 1 of 1 instance(s) sent by STOW-RS: failure reason 0x0110 processing failure"
    )
    assert_no_identifiers(message, f"{proxy}/dicom-web", study, elsewhere, series, sop_uid(data))
    assert orthanc.instance_count() == 0


def test_stow_detects_an_instance_the_pacs_acknowledged_but_dropped(tmp_path):
    """Orthanc's STOW-RS answers success for an instance its ReceivedInstanceFilter dropped."""
    script = tmp_path / "filter.lua"
    script.write_text('function ReceivedInstanceFilter(dicom, origin, info)\n  return dicom.Modality ~= "XX"\nend\n')
    with running_orthanc(tmp_path / "orthanc", config={"LuaScripts": [str(script)]}) as server:
        study, kept_series, dropped_series = generate_uid(), generate_uid(), generate_uid()
        kept = dicom_file(study, kept_series, date="20260105", modality="SR", seed=1)
        dropped = dicom_file(study, dropped_series, date="20260105", modality="XX", seed=2)
        uids = (study, kept_series, dropped_series, sop_uid(kept), sop_uid(dropped))
        with pytest.raises(PacsUnavailable) as caught:
            store_instances(Pacs(server.dicomweb), [kept, dropped], study)
        assert str(caught.value) == (
            f"PACS {server.dicomweb} accepted for STOW-RS of 2 instance(s) but does not list 1 of them afterwards: "
            "still indexing, or a filter on the PACS dropped them"
        )
        assert_no_identifiers(str(caught.value), server.dicomweb, *uids)
        assert server.instance_count() == 1
        # the retry sends only the dropped one, and says the same
        with pytest.raises(PacsUnavailable) as caught:
            store_instances(Pacs(server.dicomweb), [kept, dropped], study)
        assert str(caught.value) == (
            f"PACS {server.dicomweb} accepted for STOW-RS of 1 instance(s) but does not list 1 of them afterwards: "
            "still indexing, or a filter on the PACS dropped them"
        )
        assert_no_identifiers(str(caught.value), server.dicomweb, *uids)


def test_basic_auth(tmp_path):
    with running_orthanc(tmp_path / "orthanc", users={"eyeray": "correct horse"}) as server:
        study = generate_uid()
        server.upload(dicom_file(study, generate_uid(), date="20260105", modality="OPT"))
        password = tmp_path / "password"
        password.write_text("correct horse\n")
        pacs = Pacs(server.dicomweb, user="eyeray", password_file=str(password))
        assert "correct horse" not in repr(pacs)
        [instance] = search_instances(pacs)
        assert sop_uid(retrieve_instance(pacs, instance)) == instance.sop_uid
        stored = store_instances(pacs, [dicom_file(study, generate_uid(), date="20260105", modality="SR")], study)
        assert len(stored.stored) == 1

        password.write_text("wrong horse")
        with pytest.raises(PacsError) as caught:
            search_instances(pacs)
        assert not isinstance(caught.value, PacsUnavailable)
        message = str(caught.value)
        assert message.startswith(
            f"PACS {server.dicomweb} answered 401 Unauthorized for the QIDO-RS instance search (check eyeray's PACS "
            "credentials: the token file, or the user and password file)"
        )
        assert "credentials" in message and "horse" not in message and "\n" not in message
        with pytest.raises(PacsError, match="401"):
            search_instances(Pacs(server.dicomweb))  # no credentials at all
        with pytest.raises(PacsError, match="cannot read the PACS password file"):
            search_instances(Pacs(server.dicomweb, user="eyeray", password_file=str(tmp_path / "absent")))


def test_bearer_token_is_read_from_its_file_at_each_request(orthanc, loaded, tmp_path):
    """A gateway that lets a request through to Orthanc only with the current bearer token; the token
    rotates (as a Kubernetes secret does) and the same Pacs keeps working."""
    current = {"token": "token-one"}
    received: list[str | None] = []

    def gateway(request, body):
        received.append(request.headers.get("Authorization"))
        if request.headers.get("Authorization") != f"Bearer {current['token']}":
            return 401, {"Content-Type": "application/json"}, b'{"error": "invalid token"}'
        return forward(orthanc.url, request, body)

    token = tmp_path / "token"
    token.write_text("token-one\n")
    with http_server(gateway) as proxy:
        pacs = Pacs(proxy + "/dicom-web", token_file=str(token))
        assert "token-one" not in repr(pacs)
        assert len(search_instances(pacs)) == 7
        assert received[-1] == "Bearer token-one"

        current["token"] = "token-two"
        token.write_text("  token-two  ")
        [instance] = search_instances(pacs, modalities=("SR",))
        assert sop_uid(retrieve_instance(pacs, instance)) == instance.sop_uid
        assert received[-1] == "Bearer token-two"

        current["token"] = "token-three"
        with pytest.raises(PacsError) as caught:
            search_instances(pacs)
        assert not isinstance(caught.value, PacsUnavailable)
        assert "401" in str(caught.value) and "invalid token" in str(caught.value)
        assert "token-two" not in str(caught.value)


def test_pacs_down_is_unavailable(tmp_path):
    with running_orthanc(tmp_path / "orthanc") as server:
        pacs = Pacs(server.dicomweb, timeout_s=5)
        assert search_instances(pacs) == []
    with pytest.raises(PacsUnavailable) as caught:
        search_instances(pacs)
    assert str(caught.value) == (
        f"PACS {server.dicomweb} unreachable for the QIDO-RS instance search: connection refused"
    )
    study, series = generate_uid(), generate_uid()
    data = dicom_file(study, series, date="20260105", modality="SR")
    with pytest.raises(PacsUnavailable) as caught:
        store_instances(pacs, [data], study)
    assert str(caught.value) == (
        f"PACS {server.dicomweb} unreachable for the listing of a study's instances: connection refused"
    )
    assert_no_identifiers(str(caught.value), server.dicomweb, study, series, sop_uid(data))


@pytest.mark.parametrize("status", [503, 500, 429, 408])
def test_server_errors_and_throttling_are_unavailable(status):
    reason = {
        503: "Service Unavailable",
        500: "Internal Server Error",
        429: "Too Many Requests",
        408: "Request Timeout",
    }
    with http_server(
        lambda request, body: (status, {"Content-Type": "text/plain"}, b"PACS busy, come back later")
    ) as url:
        with pytest.raises(PacsUnavailable) as caught:
            search_instances(Pacs(url + "/dicom-web"))
    assert str(caught.value) == (
        f"PACS {url}/dicom-web answered {status} {reason[status]} for the QIDO-RS instance search: "
        "PACS busy, come back later"
    )


def test_slow_pacs_times_out_as_unavailable():
    release = threading.Event()
    study, series, sop = generate_uid(), generate_uid(), generate_uid()

    def slow(request, body):
        release.wait(10)
        return 200, {"Content-Type": "application/dicom+json"}, b"[]"

    try:
        with http_server(slow) as url:
            started = time.monotonic()
            with pytest.raises(PacsUnavailable) as caught:
                retrieve_instance(Pacs(url + "/dicom-web", timeout_s=0.3), Instance(url, study, series, sop))
            assert time.monotonic() - started < 5
    finally:
        release.set()
    assert str(caught.value) == (
        f"PACS {url}/dicom-web did not answer within the timeout of 0.3 s for an instance (WADO-RS)"
    )
    assert_no_identifiers(str(caught.value), f"{url}/dicom-web", study, series, sop)


def test_missing_instance_is_a_permanent_error(orthanc, loaded):
    pacs = Pacs(orthanc.dicomweb)
    real = search_instances(pacs)[0]
    missing = Instance(orthanc.dicomweb, real.study_uid, real.series_uid, generate_uid())
    with pytest.raises(PacsError) as caught:
        retrieve_instance(pacs, missing)
    assert not isinstance(caught.value, PacsUnavailable)
    # Orthanc's own detail quotes the SOP Instance UID; it is masked
    assert str(caught.value) == (
        f"PACS {orthanc.dicomweb} answered 404 Not Found for an instance (WADO-RS): "
        "Accessing an inexistent instance with WADO-RS: <uid>"
    )
    assert_no_identifiers(str(caught.value), orthanc.dicomweb, real.study_uid, real.series_uid, missing.sop_uid)
    with pytest.raises(PacsError, match="404 Not Found"):
        search_instances(Pacs(orthanc.url + "/not-dicom-web"))


def test_uids_in_a_pacs_error_body_are_masked():
    """Whatever the PACS's error text quotes that looks like a UID becomes <uid>, in JSON or plain text,
    also when the text is cut at 200 characters in the middle of one (no prefix of it survives)."""
    study, sop = generate_uid(), generate_uid()
    bodies = {
        "json": (
            "application/json",
            json.dumps({"Message": "Unknown resource", "Details": f"No instance {sop} in study {study}"}).encode(),
            "No instance <uid> in study <uid>",
        ),
        "text": (
            "text/plain",
            f"study {study}\nnot found (also 2.25.7)".encode(),
            "study <uid> not found (also <uid>)",
        ),
        "cut": ("text/plain", ("x" * 190 + " " + sop).encode(), "x" * 190 + " <uid>"),
        "cut inside": ("text/plain", ("x" * 180 + " " + sop + " tail").encode(), "x" * 180 + " <uid> tail"),
        # masked first (201 characters), then cut: the cut falls inside "<uid>", never inside the UID
        "long": ("text/plain", ("y" * 195 + " " + sop).encode(), "y" * 195 + " <..."),
    }
    for name, (content_type, payload, detail) in bodies.items():
        with http_server(lambda request, body, t=content_type, p=payload: (404, {"Content-Type": t}, p)) as url:
            with pytest.raises(PacsError) as caught:
                retrieve_instance(Pacs(url + "/dicom-web"), Instance(url, study, generate_uid(), sop))
        assert str(caught.value) == (
            f"PACS {url}/dicom-web answered 404 Not Found for an instance (WADO-RS): {detail}"
        ), name
        assert_no_identifiers(str(caught.value), f"{url}/dicom-web", study, sop)


def test_errors_survive_pickling_for_ray():
    for error in (PacsError("PACS http://x answered 404"), PacsUnavailable("PACS http://x unreachable")):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error)


def test_pacs_settings_are_checked():
    with pytest.raises(ValueError, match="either token_file"):
        Pacs("http://pacs/dicom-web", token_file="/t", user="u", password_file="/p")
    with pytest.raises(ValueError, match="both user and password_file"):
        Pacs("http://pacs/dicom-web", user="u")
    with pytest.raises(ValueError, match="must not carry credentials"):
        Pacs("http://u:p@pacs/dicom-web")
    with pytest.raises(ValueError, match="http:// or https://"):
        Pacs("ftp://pacs/dicom-web")
    assert Pacs("https://pacs/dicom-web/").url == "https://pacs/dicom-web"
    assert Pacs("https://pacs/dicom-web").auth_header() == {}


def test_split_multipart():
    body = (
        b"preamble\r\n--b1\r\nContent-Type: application/dicom\r\n\r\nfirst\r\n--b1 \r\n\r\nsec\r\n--b\r\nond"
        b"\r\n--b1--\r\nepilogue"
    )
    assert split_multipart(body, 'multipart/related; type="application/dicom"; boundary="b1"') == [
        ({"content-type": "application/dicom"}, b"first"),
        ({}, b"sec\r\n--b\r\nond"),
    ]
    with pytest.raises(ValueError, match="truncated"):
        split_multipart(
            b"--b1\r\nContent-Type: application/dicom\r\n\r\nfirst part, cut", "multipart/related; boundary=b1"
        )
    with pytest.raises(ValueError, match="no multipart boundary"):
        split_multipart(body, "multipart/related")
