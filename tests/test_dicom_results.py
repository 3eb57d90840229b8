"""Results as DICOM (eyeray.score.dicom_results): the SR and the Grad-CAM Secondary Capture written
for a scored instance or OCT volume, read back as Part 10 bytes with pydicom, highdicom and, where
installed, DCMTK's own SR parser and decoder."""

from __future__ import annotations

import shutil
import subprocess
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from eyeray.score import dicom_results as dr

OPT = "1.2.840.10008.5.1.4.1.1.77.1.5.4"  # Ophthalmic Tomography Image Storage
OP8 = "1.2.840.10008.5.1.4.1.1.77.1.5.1"  # Ophthalmic Photography 8 Bit Image Storage
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
OCT_CLASSES = ("CNV", "DME", "DRUSEN", "NORMAL")
ODIR_CLASSES = ("N", "D", "G", "C", "A", "H", "M", "O")


def _as_file(ds: Dataset) -> Dataset:
    """Through Part 10 bytes and back, as eyeray gets a source from a file or WADO-RS."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(BytesIO(buffer.getvalue()))


def _source(
    sop_class: str, modality: str, *, frames: int = 1, rgb: bool = False, laterality: str = "R", study: str = ""
) -> Dataset:
    """A small, valid-enough source instance with the identifiers a PACS holds."""
    rng = np.random.default_rng(7)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "EYE-0042"
    ds.PatientName = "Doe^Jane"
    ds.PatientBirthDate = "19600131"
    ds.PatientSex = "F"
    ds.AccessionNumber = "ACC7"
    ds.StudyID = "S1"
    ds.StudyDate = "20240307"
    ds.StudyTime = "101500"
    ds.ReferringPhysicianName = ""
    ds.Modality = modality
    ds.SeriesNumber = 3
    ds.InstanceNumber = 1
    ds.ImageLaterality = laterality
    ds.Rows, ds.Columns = 12, 10
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if rgb:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    else:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        pixels = rng.integers(0, 256, (frames, 12, 10), dtype=np.uint8)
    if sop_class == OPT:
        ds.NumberOfFrames = frames
    ds.PixelData = pixels.tobytes()
    return _as_file(ds)


def _oct_finding(**changes) -> dr.Finding:
    fields = dict(
        task="oct",
        classes=OCT_CLASSES,
        probabilities={"CNV": 0.71, "DME": 0.19, "DRUSEN": 0.06, "NORMAL": 0.04},
        labels=("CNV",),
        referral=True,
        status="ok",
        needs_review=False,
        frames=(1, 3),
        model_name="eyeray-oct-vgg16",
        model_version="2024.03.1",
        operating_point="refer when P(CNV)+P(DME) >= 0.31 (95% validation sensitivity)",
    )
    fields.update(changes)
    return dr.Finding(**fields)


def _odir_finding(**changes) -> dr.Finding:
    fields = dict(
        task="odir",
        classes=ODIR_CLASSES,
        probabilities=dict(zip(ODIR_CLASSES, (0.05, 0.82, 0.64, 0.1, 0.2, 0.03, 0.01, 0.3))),
        labels=("D", "G"),
        referral=None,
        status="ok",
        needs_review=True,
        model_name="eyeray-odir",
        model_version="1.0.0",
        operating_point="per-label thresholds maximising validation F1",
    )
    fields.update(changes)
    return dr.Finding(**fields)


def _round_trip_sr(source: Dataset, finding: dr.Finding) -> tuple[bytes, Dataset, hd.sr.Comprehensive3DSR]:
    data = dr.to_bytes(dr.structured_report(source, finding, software_version="0.1.0"))
    return data, pydicom.dcmread(BytesIO(data)), hd.sr.srread(BytesIO(data))


def _group(sr: hd.sr.Comprehensive3DSR) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 1
    return groups[0]


def _evaluations(group) -> dict[tuple[str, str], tuple[str, str]]:
    """(scheme, value) of each qualitative evaluation's name -> (scheme, value) of its coded value."""
    return {
        (e.name.scheme_designator, e.name.value): (e.value.scheme_designator, e.value.value)
        for e in group.get_qualitative_evaluations()
    }


def _text(group, name) -> list[str]:
    return [item.TextValue for item in hd.sr.utils.find_content_items(group[0], name=name, recursive=True)]


def _all_codes(ds: Dataset) -> set[tuple[str, str]]:
    """Every (scheme, value) of a concept name or coded value anywhere in the content tree."""
    found = set()
    for item in ds.get("ContentSequence", []):
        for key in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
            for code in item.get(key, []):
                found.add((code.CodingSchemeDesignator, code.CodeValue))
        found |= _all_codes(item)
    return found


def test_sr_of_an_oct_volume_round_trips_with_its_findings_and_references():
    source = _source(OPT, "OPT", frames=5)
    finding = _oct_finding()
    data, ds, sr = _round_trip_sr(source, finding)

    assert data[128:132] == b"DICM"
    assert ds.SOPClassUID == COMPREHENSIVE_3D_SR and ds.Modality == "SR"
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert (ds.PatientID, str(ds.PatientName), ds.AccessionNumber) == ("EYE-0042", "Doe^Jane", "ACC7")
    assert ds.VerificationFlag == "UNVERIFIED" and ds.CompletionFlag == "COMPLETE"
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert [s.CodingSchemeDesignator for s in ds.CodingSchemeIdentificationSequence] == [dr.CODING_SCHEME]
    # the header's evidence points at the source instance in its own series
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
        source.SOPInstanceUID
    )

    group = _group(sr)
    [image] = group.source_images
    assert image.referenced_sop_class_uid == OPT
    assert image.referenced_sop_instance_uid == source.SOPInstanceUID
    assert image.referenced_frame_numbers == [2, 4]  # 0-based B-scans 1 and 3, 1-based in DICOM

    probabilities = {m.name.value: m.value for m in group.get_measurements()}
    assert probabilities == pytest.approx({f"oct.{c}.p": p for c, p in finding.probabilities.items()})
    assert {m.unit.value for m in group.get_measurements()} == {"1"}

    evaluations = _evaluations(group)
    assert evaluations[(dr.CODING_SCHEME, "oct.CNV")] == ("SCT", codes.SCT.Present.value)
    assert not {("99EYERAY", f"oct.{c}") for c in ("DME", "DRUSEN", "NORMAL")} & set(evaluations)
    assert evaluations[(dr.CODING_SCHEME, "referral")] == ("SCT", codes.SCT.Yes.value)
    assert evaluations[(dr.CODING_SCHEME, "needs-review")] == ("SCT", codes.SCT.No.value)
    assert evaluations[(dr.CODING_SCHEME, "status")] == (dr.CODING_SCHEME, "answered")

    assert _text(group, codes.DCM.AlgorithmName) == [finding.model_name]
    assert _text(group, codes.DCM.AlgorithmVersion) == [finding.model_version]
    assert any(finding.operating_point in p for p in _text(group, codes.DCM.AlgorithmParameters))
    [site] = group.finding_sites
    assert site.value == codes.SCT.Eye and site.laterality == codes.SCT.Right


def test_sr_of_a_single_bscan_references_the_instance_without_frame_numbers():
    source = _source(OPT, "OPT", frames=1, laterality="L")
    _, ds, sr = _round_trip_sr(source, _oct_finding(frames=(), labels=("DRUSEN",), referral=False))
    group = _group(sr)
    [image] = group.source_images
    assert image.referenced_sop_instance_uid == source.SOPInstanceUID
    assert image.referenced_frame_numbers is None
    evaluations = _evaluations(group)
    assert evaluations[(dr.CODING_SCHEME, "oct.DRUSEN")] == ("SCT", codes.SCT.Present.value)
    assert evaluations[(dr.CODING_SCHEME, "referral")] == ("SCT", codes.SCT.No.value)
    assert group.finding_sites[0].laterality == codes.SCT.Left


def test_a_declined_answer_codes_no_diagnosis_and_says_why():
    source = _source(OPT, "OPT", frames=3)
    finding = _oct_finding(
        status="declined",
        gate_reason="ungradable: blurred",
        labels=(),
        referral=None,
        needs_review=True,
        frames=(),
    )
    _, ds, sr = _round_trip_sr(source, finding)
    group = _group(sr)

    assert group.get_measurements() == []  # no probabilities: they would read as an answer
    class_codes = {(dr.CODING_SCHEME, f"oct.{c}") for c in OCT_CLASSES}
    assert not class_codes & _all_codes(ds)
    evaluations = _evaluations(group)
    assert evaluations[(dr.CODING_SCHEME, "status")] == (dr.CODING_SCHEME, "declined")
    assert (dr.CODING_SCHEME, "referral") not in evaluations
    assert evaluations[(dr.CODING_SCHEME, "needs-review")] == ("SCT", codes.SCT.Yes.value)
    [reason] = _text(group, dr.DECLINE_REASON)
    assert "ungradable: blurred" in reason and "no diagnosis" in reason
    assert group.source_images[0].referenced_sop_instance_uid == source.SOPInstanceUID


def test_a_multi_label_odir_finding_codes_every_label_on_a_fundus_photo():
    source = _source(OP8, "OP", rgb=True, laterality="L")
    finding = _odir_finding()
    _, ds, sr = _round_trip_sr(source, finding)
    group = _group(sr)

    evaluations = _evaluations(group)
    present = {name[1] for name, value in evaluations.items() if value == ("SCT", codes.SCT.Present.value)}
    assert present == {"odir.D", "odir.G"}
    assert (dr.CODING_SCHEME, "referral") not in evaluations  # ODIR has no referral rule
    assert evaluations[(dr.CODING_SCHEME, "needs-review")] == ("SCT", codes.SCT.Yes.value)
    probabilities = {m.name.value: m.value for m in group.get_measurements()}
    assert probabilities == pytest.approx({f"odir.{c}.p": p for c, p in finding.probabilities.items()})
    meanings = {e.name.value: e.name.meaning for e in group.get_qualitative_evaluations()}
    assert meanings["odir.D"] == "Diabetic retinopathy" and meanings["odir.G"] == "Glaucoma"
    assert group.source_images[0].referenced_sop_class_uid == OP8
    assert group.source_images[0].referenced_frame_numbers is None


def test_uids_are_derived_so_a_rerun_writes_the_same_objects():
    source = _source(OPT, "OPT", frames=5)
    finding = _oct_finding()
    overlay = np.zeros((12, 10, 3), np.uint8)

    def uids(src: Dataset, f: dr.Finding, frame: int | None = 1) -> tuple[str, str, str, str]:
        sr = dr.structured_report(src, f, software_version="0.1.0")
        sc = dr.overlay_capture(src, overlay, f, software_version="0.1.0", frame=frame)
        return sr.SeriesInstanceUID, sr.SOPInstanceUID, sc.SeriesInstanceUID, sc.SOPInstanceUID

    first = uids(source, finding)
    assert uids(source, finding) == first
    assert uids(_as_file(source), finding) == first  # from a re-read file, as a resumed run would
    assert len(set(first)) == 4  # SR and overlay: different series, different instances

    newer = uids(source, _oct_finding(model_version="2024.04.0"))
    assert not set(newer) & set(first)
    other_model = uids(source, _oct_finding(model_name="eyeray-oct-xception"))
    assert not set(other_model) & set(first)  # a routed run may score one image with several bundles

    # another instance of the same study: same result series, new instances
    sibling = uids(_source(OPT, "OPT", frames=5, study=source.StudyInstanceUID), finding)
    assert (sibling[0], sibling[2]) == (first[0], first[2])
    assert sibling[1] != first[1] and sibling[3] != first[3]
    # another B-scan's overlay of the same volume: same series, another instance
    frame3 = uids(source, finding, frame=3)
    assert frame3[2] == first[2] and frame3[3] != first[3]
    assert uids(source, finding, frame=None)[3] != first[3]


def test_overlay_capture_round_trips_its_pixels_and_references_the_bscan():
    source = _source(OPT, "OPT", frames=5)
    finding = _oct_finding()
    overlay = np.random.default_rng(3).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    data = dr.to_bytes(dr.overlay_capture(source, overlay, finding, software_version="0.1.0", frame=3))
    assert data[128:132] == b"DICM"

    ds = pydicom.dcmread(BytesIO(data))
    assert ds.SOPClassUID == SECONDARY_CAPTURE
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert (ds.PatientID, str(ds.PatientName)) == (source.PatientID, str(source.PatientName))
    assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
    np.testing.assert_array_equal(ds.pixel_array, overlay)
    [ref] = ds.SourceImageSequence
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (OPT, source.SOPInstanceUID)
    assert ref.ReferencedFrameNumber == 4  # B-scan 3, 1-based
    assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == codes.DCM.SourceImageForImageProcessingOperation.value
    assert "not for primary diagnosis" in ds.SeriesDescription
    assert "Grad-CAM" in ds.ImageComments and "not for primary diagnosis" in ds.ImageComments
    assert "right eye" in ds.ImageComments
    assert "DERIVED" in ds.ImageType

    image = hd.imread(BytesIO(data))
    np.testing.assert_array_equal(image.get_frame(1), overlay)


def test_overlay_of_a_fundus_photo_references_the_instance_only():
    source = _source(OP8, "OP", rgb=True, laterality="L")
    overlay = np.full((12, 10, 3), 200, np.uint8)
    ds = pydicom.dcmread(
        BytesIO(dr.to_bytes(dr.overlay_capture(source, overlay, _odir_finding(), software_version="1")))
    )
    [ref] = ds.SourceImageSequence
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert "ReferencedFrameNumber" not in ref
    np.testing.assert_array_equal(ds.pixel_array, overlay)


def test_a_source_lacking_type2_patient_attributes_still_gets_results():
    source = _source(OPT, "OPT", frames=2)
    for keyword in ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "ReferringPhysicianName"):
        delattr(source, keyword)
    _, ds, _ = _round_trip_sr(source, _oct_finding(frames=(0,)))
    assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.AccessionNumber == ""
    sc = dr.overlay_capture(source, np.zeros((4, 4, 3), np.uint8), _oct_finding(), software_version="1", frame=0)
    assert pydicom.dcmread(BytesIO(dr.to_bytes(sc))).PatientID == source.PatientID


def test_bad_inputs_are_refused():
    source = _source(OPT, "OPT", frames=3)
    finding = _oct_finding()
    with pytest.raises(ValueError, match="outside"):
        dr.structured_report(source, _oct_finding(frames=(3,)), software_version="1")
    with pytest.raises(ValueError, match="outside"):
        dr.overlay_capture(source, np.zeros((4, 4, 3), np.uint8), finding, software_version="1", frame=7)
    with pytest.raises(ValueError, match="RGB uint8"):
        dr.overlay_capture(source, np.zeros((4, 4), np.uint8), finding, software_version="1")
    with pytest.raises(ValueError, match="RGB uint8"):
        dr.overlay_capture(source, np.zeros((4, 4, 3), np.float32), finding, software_version="1")
    with pytest.raises(ValueError, match="gate_reason"):
        _oct_finding(status="declined", labels=(), referral=None)
    with pytest.raises(ValueError, match="not among"):
        _oct_finding(labels=("GLAUCOMA",))
    no_study = _source(OPT, "OPT", frames=3)
    del no_study.StudyInstanceUID
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        dr.structured_report(no_study, finding, software_version="1")


DCMTK = pytest.mark.skipif(
    shutil.which("dsrdump") is None or shutil.which("dcm2pnm") is None,
    reason="DCMTK is missing: install it as .ci/run's apt step does (apt-get install -y dcmtk)",
)


@DCMTK
@pytest.mark.parametrize("declined", [False, True])
def test_dcmtk_parses_the_sr_without_a_complaint(tmp_path: Path, declined: bool):
    """DCMTK's SR reader checks the Comprehensive 3D SR IOD's value types and relationship
    constraints on every content item (an independent implementation from highdicom's)."""
    source = _source(OPT, "OPT", frames=5)
    finding = (
        _oct_finding(status="declined", gate_reason="out_of_distribution", labels=(), referral=None)
        if declined
        else _oct_finding()
    )
    path = tmp_path / "sr.dcm"
    path.write_bytes(dr.to_bytes(dr.structured_report(source, finding, software_version="0.1.0")))
    run = subprocess.run(["dsrdump", "-v", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert not [line for line in run.stderr.splitlines() if line[:2] in ("W:", "E:", "F:")], run.stderr
    assert "Comprehensive 3D SR Document" in run.stdout
    assert ("declined" in run.stdout) == declined


@DCMTK
def test_dcmtk_decodes_the_overlay_to_the_same_pixels(tmp_path: Path):
    source = _source(OP8, "OP", rgb=True)
    overlay = np.random.default_rng(5).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    path = tmp_path / "sc.dcm"
    path.write_bytes(dr.to_bytes(dr.overlay_capture(source, overlay, _odir_finding(), software_version="1")))
    out = tmp_path / "sc.ppm"
    run = subprocess.run(["dcm2pnm", "+op", str(path), str(out)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), overlay)
