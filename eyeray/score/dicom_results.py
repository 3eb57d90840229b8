"""Results as DICOM: what eyeray decided for one source instance (or one OCT volume), written as two
objects that go back into the source's study as new series and reference the source instance.

- `structured_report`: a Comprehensive 3D SR whose content is a TID 1500 "Imaging Measurement Report"
  with one TID 1501 measurement group: the source image (and, for a volume, the B-scans that drove
  the answer as referenced frame numbers), the algorithm (TID 4019: name, version, operating point),
  each class's calibrated probability (NUM, UCUM "1"), each predicted label as a CODE item with value
  "Present", the referral and needs-review as coded Yes/No, and the answer status. A declined case
  codes no diagnosis (no label, no probability, no referral): it says "declined" and why.
  TID 1500 in Comprehensive 3D SR is what highdicom builds and parses natively (`hd.sr.srread`,
  `get_image_measurement_groups`), and the SR IOD the IHE AI Results (AIR) profile names for AI
  findings (gazelle.ihe-europe.net/content/aireccapabilities). eyeray writes no spatial coordinates,
  so a Comprehensive SR reader shows all of it.
- `overlay_capture`: a Secondary Capture image of the Grad-CAM overlay (RGB), derived from the source
  (Source Image Sequence, with the B-scan's frame number) and labelled as not for primary diagnosis.

UIDs are derived, not random: the same source, model and kind give the same Series and SOP Instance
UIDs, so a re-run or a retried upload writes the same objects (the upload is idempotent by UID).

Codes. Every standard one is taken from pydicom's code dictionary (`pydicom.sr.codedict`, generated
from DICOM PS3.16), which also lists the context groups (CIDs) it belongs to, noted where used.
eyeray's class labels and result concepts are in the private coding scheme `99EYERAY` (designators
beginning with "99" are private or local schemes, as DCMTK's dcmsr/dsrcodvl.h also states), declared
in the SR's Coding Scheme Identification Sequence, rather than SNOMED CT codes recalled from memory:
the datasets' labels (ODIR's "D", "H", "O"; Kermany's "NORMAL") are not one-to-one with SNOMED concepts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from io import BytesIO

import highdicom as hd
import numpy as np
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CODING_SCHEME = "99EYERAY"  # private (local) coding scheme: DICOM reserves the "99" prefix for these
UID_NAMESPACE = "eyeray.results/1"  # part of every derived UID: bump it if the derivation ever changes
SR_SERIES_NUMBER = 9901  # fixed so a re-run gives the same header; Series Numbers need not be unique
OVERLAY_SERIES_NUMBER = 9902
NOT_FOR_DIAGNOSIS = "not for primary diagnosis"

# What each (task, class) means, for the private codes' Code Meaning. Unknown tasks fall back to the label.
CLASS_MEANINGS: dict[tuple[str, str], str] = {
    ("oct", "CNV"): "Choroidal neovascularization",
    ("oct", "DME"): "Diabetic macular edema",
    ("oct", "DRUSEN"): "Drusen",
    ("oct", "NORMAL"): "Normal retina on OCT",
    ("glaucoma", "RG"): "Referable glaucoma",
    ("glaucoma", "NRG"): "No referable glaucoma",
    ("odir", "N"): "Normal fundus",
    ("odir", "D"): "Diabetic retinopathy",
    ("odir", "G"): "Glaucoma",
    ("odir", "C"): "Cataract",
    ("odir", "A"): "Age-related macular degeneration",
    ("odir", "H"): "Hypertensive retinopathy",
    ("odir", "M"): "Pathological myopia",
    ("odir", "O"): "Other ocular disease or abnormality",
}

# Standard codes, each looked up in pydicom's code dictionary (pydicom.sr.codedict, built from PS3.16),
# with the CIDs that dictionary lists for it.
PRESENT = codes.SCT.Present  # (52101004, SCT, "Present"): CIDs 240, 241
YES = codes.SCT.Yes  # (373066001, SCT, "Yes"): CIDs 230, 231
NO = codes.SCT.No  # (373067005, SCT, "No"): CIDs 230, 231
NO_UNITS = codes.UCUM.NoUnits  # (1, UCUM, "no units"): CID 7181; a probability is dimensionless
IMAGING_PROCEDURE = codes.SCT.ImagingProcedure  # (363679005, SCT, "Imaging procedure"): CID 100, TID 1500's
DEVICE = codes.DCM.Device  # (121007, DCM, "Device"): CID 270, the observer type
SOURCE_FOR_PROCESSING = codes.DCM.SourceImageForImageProcessingOperation  # (121322, DCM): CID 7202
EYE = codes.SCT.Eye  # (81745001, SCT, "Eye"): CIDs 4, 4209; the finding site of every eyeray answer
LATERALITY = {  # from the source's Image Laterality (or series Laterality)
    "R": codes.SCT.Right,  # (24028007, SCT, "Right"): CID 244
    "L": codes.SCT.Left,  # (7771000, SCT, "Left"): CID 244
    "B": codes.SCT.Bilateral,  # (51440002, SCT, "Bilateral"): CID 244
}


def _private(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator=CODING_SCHEME, meaning=meaning[:64])


REFERRAL = _private("referral", "Referral recommended")
NEEDS_REVIEW = _private("needs-review", "Human review needed")
STATUS = _private("status", "eyeray answer status")
ANSWERED = _private("answered", "Answered")
DECLINED = _private("declined", "Declined to answer: no diagnosis made")
DECLINE_REASON = _private("decline-reason", "Reason no diagnosis was made")


@dataclass(frozen=True)
class Finding:
    """What eyeray decided for one source instance, or for one OCT volume (the B-scans in `frames`).

    `probabilities` are calibrated. `referral` is None where the task has no referral rule. A
    declined answer (`status="declined"`) carries `gate_reason` and no diagnosis goes into DICOM."""

    task: str
    classes: tuple[str, ...]
    probabilities: dict[str, float]
    labels: tuple[str, ...]
    referral: bool | None
    status: str
    needs_review: bool
    model_name: str
    model_version: str
    operating_point: str
    gate_reason: str = ""
    frames: tuple[int, ...] = ()  # 0-based B-scan indices that drove a volume's answer

    def __post_init__(self) -> None:
        if self.status not in ("ok", "declined"):
            raise ValueError(f"status must be 'ok' or 'declined', not {self.status!r}")
        if self.status == "declined" and not self.gate_reason:
            raise ValueError("a declined finding needs its gate_reason")
        unknown = [label for label in self.labels if label not in self.classes]
        if unknown:
            raise ValueError(f"labels {unknown} are not among the classes {list(self.classes)}")
        if self.status == "ok" and set(self.probabilities) != set(self.classes):
            raise ValueError(f"probabilities for {sorted(self.probabilities)}, classes {list(self.classes)}")
        if any(f < 0 for f in self.frames):
            raise ValueError(f"frame indices are 0-based and non-negative: {self.frames}")


def class_code(task: str, label: str) -> hd.sr.CodedConcept:
    """The private code of one class label; its value names the task, so ODIR "G" and glaucoma "RG" differ."""
    return _private(f"{task}.{label}", CLASS_MEANINGS.get((task, label), label))


def probability_code(task: str, label: str) -> hd.sr.CodedConcept:
    """The private concept name of one class's calibrated probability."""
    return _private(f"{task}.{label}.p", f"Probability of {CLASS_MEANINGS.get((task, label), label)}")


def result_uid(*parts: object) -> pydicom.uid.UID:
    """A UID that depends only on `parts`: JSON-encoded, because generate_uid joins its sources
    without a separator (["ab", "c"] and ["a", "bc"] would collide)."""
    return generate_uid(entropy_srcs=[json.dumps([UID_NAMESPACE, *map(str, parts)])])


def series_uid(source: pydicom.Dataset, finding: Finding, kind: str) -> pydicom.uid.UID:
    """One series per (study, model, version, kind). The model's name and task are in it as well as its
    version: a routed run scores one fundus photo with several bundles, whose versions may be equal."""
    return result_uid("series", source.StudyInstanceUID, finding.task, finding.model_name, finding.model_version, kind)


def instance_uid(source: pydicom.Dataset, finding: Finding, kind: str, frame: int | None = None) -> pydicom.uid.UID:
    return result_uid(
        "instance", source.SOPInstanceUID, finding.task, finding.model_name, finding.model_version, kind, frame
    )


def _frame_count(source: pydicom.Dataset) -> int:
    return int(source.get("NumberOfFrames") or 1)


def _frame_numbers(source: pydicom.Dataset, frames: tuple[int, ...]) -> list[int] | None:
    """DICOM's 1-based Referenced Frame Numbers for 0-based indices; None (the whole instance) for a
    single-frame source or no frames, where the standard has no frame to name."""
    count = _frame_count(source)
    bad = [f for f in frames if not 0 <= f < count]
    if bad:
        raise ValueError(f"frames {bad} are outside the source's {count} frame(s)")
    if count == 1 or not frames:
        return None
    return [f + 1 for f in sorted(set(frames))]


_IDENTIFIERS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
# Type 2 patient/study attributes highdicom copies by attribute access: empty where the source lacks them.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID")
_BULK = {pydicom.tag.Tag(kw) for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")}


def _header(source: pydicom.Dataset) -> pydicom.Dataset:
    """The source without its pixels (the results never need them), with empty type 2 patient and
    study attributes added where missing; raises if an identifier the references need is missing."""
    missing = [kw for kw in _IDENTIFIERS if not source.get(kw)]
    if missing:
        raise ValueError(f"the source lacks {', '.join(missing)}: a result cannot reference it")
    header = pydicom.Dataset({elem.tag: elem for elem in source if elem.tag not in _BULK})
    for keyword in _TYPE2:
        if keyword not in header:
            setattr(header, keyword, None)
    if "StudyDate" not in header:
        header.StudyDate = None
    if "StudyTime" not in header:
        header.StudyTime = None
    return header


def _laterality(source: pydicom.Dataset) -> str:
    return str(source.get("ImageLaterality") or source.get("Laterality") or "")


def _yes_no(value: bool) -> pydicom.sr.coding.Code:
    return YES if value else NO


def _algorithm(finding: Finding, manufacturer: str) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=finding.model_name,
        version=finding.model_version,
        parameters=[f"task: {finding.task}", f"operating point: {finding.operating_point}"],
        manufacturer=manufacturer,
    )


def _group(source: pydicom.Dataset, finding: Finding, manufacturer: str, sop_uid: str) -> hd.sr.ContentSequence:
    """The TID 1501 group: references, algorithm, and either the answer or the declination."""
    source_image = hd.sr.SourceImageForMeasurementGroup(
        referenced_sop_class_uid=source.SOPClassUID,
        referenced_sop_instance_uid=source.SOPInstanceUID,
        referenced_frame_numbers=_frame_numbers(source, finding.frames),
    )
    measurements: list[hd.sr.Measurement] = []
    evaluations = [hd.sr.QualitativeEvaluation(STATUS, ANSWERED if finding.status == "ok" else DECLINED)]
    if finding.status == "ok":
        for label in finding.classes:
            value = float(finding.probabilities[label])
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"probability of {label} is {value}, not in [0, 1]")
            measurements.append(hd.sr.Measurement(probability_code(finding.task, label), value, NO_UNITS))
        for label in finding.labels:
            evaluations.append(hd.sr.QualitativeEvaluation(class_code(finding.task, label), PRESENT))
        if finding.referral is not None:
            evaluations.append(hd.sr.QualitativeEvaluation(REFERRAL, _yes_no(finding.referral)))
    evaluations.append(hd.sr.QualitativeEvaluation(NEEDS_REVIEW, _yes_no(finding.needs_review)))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=result_uid("tracking", sop_uid), identifier=f"eyeray {finding.task}"
        ),
        algorithm_id=_algorithm(finding, manufacturer),
        finding_sites=[hd.sr.FindingSite(EYE, laterality=LATERALITY.get(_laterality(source)))],
        measurements=measurements or None,
        qualitative_evaluations=evaluations,
        source_images=[source_image],
    )
    if finding.status == "declined":
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(
                name=DECLINE_REASON,
                value=f"{finding.gate_reason}: the model declined to answer, so no diagnosis was made; this "
                "image needs a human reading",
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    return group


def structured_report(
    source: pydicom.Dataset, finding: Finding, *, manufacturer: str = "eyeray", software_version: str
) -> pydicom.Dataset:
    """The SR of one finding (see the module docstring for its content tree): same patient and study as
    `source`, a new series, deterministic UIDs. PRELIMINARY and UNVERIFIED: no clinician has read it."""
    header = _header(source)
    sop_uid = instance_uid(header, finding, "sr")
    observer = hd.sr.ObserverContext(
        observer_type=DEVICE,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=result_uid("device", finding.task, finding.model_name, finding.model_version),
            name=finding.model_name[:64],
            manufacturer_name=manufacturer,
            model_name=f"{finding.model_name} {finding.model_version}"[:64],
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=IMAGING_PROCEDURE,
        imaging_measurements=[_group(header, finding, manufacturer, sop_uid)],
        referenced_images=[header],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[header],
        content=report[0],
        series_instance_uid=series_uid(header, finding, "sr"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=f"eyeray {finding.task} findings, {finding.model_name} {finding.model_version}"[:64],
        software_versions=software_version,
        manufacturer_model_name=finding.model_name[:64],
        coding_schemes=[
            CodingSchemeIdentificationItem(
                designator=CODING_SCHEME,
                name="eyeray result concepts and class labels",
                responsible_organization=manufacturer,
            )
        ],
    )
    return sr


def overlay_capture(
    source: pydicom.Dataset,
    overlay: np.ndarray,
    finding: Finding,
    *,
    software_version: str,
    frame: int | None = None,
    manufacturer: str = "eyeray",
) -> pydicom.Dataset:
    """A Secondary Capture of the Grad-CAM overlay (RGB uint8, rows x columns x 3) of `source`, or of its
    B-scan `frame` (0-based) for a volume: same study, a new series, derived from the source image."""
    overlay = np.asarray(overlay)
    if overlay.dtype != np.uint8 or overlay.ndim != 3 or overlay.shape[2] != 3:
        raise ValueError(f"the overlay must be RGB uint8 (rows, columns, 3), not {overlay.dtype} {overlay.shape}")
    header = _header(source)
    frames = _frame_numbers(header, () if frame is None else (frame,))
    sc = hd.sc.SCImage(
        pixel_array=np.ascontiguousarray(overlay),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=header.StudyInstanceUID,
        series_instance_uid=series_uid(header, finding, "overlay"),
        series_number=OVERLAY_SERIES_NUMBER,
        sop_instance_uid=instance_uid(header, finding, "overlay", frame),
        instance_number=1 if frame is None else frame + 1,
        manufacturer=manufacturer,
        patient_id=header.PatientID,
        patient_name=header.PatientName,
        patient_birth_date=header.PatientBirthDate,
        patient_sex=header.PatientSex,
        accession_number=header.AccessionNumber,
        study_id=header.StudyID,
        study_date=header.StudyDate,
        study_time=header.StudyTime,
        referring_physician_name=header.get("ReferringPhysicianName"),
        patient_orientation=("L", "F"),  # required by highdicom; replaced below by the source's or empty
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=f"eyeray Grad-CAM overlays, {NOT_FOR_DIAGNOSIS}"[:64],
        software_versions=software_version,
        manufacturer_model_name=finding.model_name[:64],
    )
    sc.copy_patient_and_study_information(header)
    # Patient Orientation is type 2 here: a Grad-CAM overlay has the source image's orientation, or
    # none known. highdicom insists on a value, so set what the source says (or empty) afterwards.
    sc.PatientOrientation = header.get("PatientOrientation") or None
    for keyword in ("BurnedInAnnotation", "RecognizableVisualFeatures"):
        if keyword in header:
            setattr(sc, keyword, header.get(keyword))
    if header.get("LossyImageCompression") == "01":  # a derived image stays marked lossy (PS3.3 C.7.6.1.1.5)
        for keyword in ("LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in header:
                setattr(sc, keyword, header.get(keyword))
    reference = pydicom.Dataset()
    reference.ReferencedSOPClassUID = header.SOPClassUID
    reference.ReferencedSOPInstanceUID = header.SOPInstanceUID
    if frames:
        reference.ReferencedFrameNumber = frames[0]
    reference.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(SOURCE_FOR_PROCESSING)]
    sc.SourceImageSequence = [reference]
    where = "" if frame is None else f" of frame {frame + 1}"
    eye = {"L": "left eye", "R": "right eye", "B": "both eyes"}.get(_laterality(header))
    sc.DerivationDescription = (
        f"Grad-CAM heatmap{where} blended over the source image by {finding.model_name} {finding.model_version}"
    )[:1024]
    answer = ", ".join(finding.labels) or "no label" if finding.status == "ok" else "declined"
    sc.ImageComments = (
        f"eyeray Grad-CAM overlay, {NOT_FOR_DIAGNOSIS}: where the model looked for its answer "
        f"({finding.task}: {answer}{', ' + eye if eye else ''}). Read the source image."
    )
    return sc


def to_bytes(ds: pydicom.Dataset) -> bytes:
    """Part 10 bytes (preamble, "DICM", file meta) for STOW-RS or a file."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
