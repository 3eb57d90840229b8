"""Results back into the PACS (`eyeray score --write-back`): for each instance scored from a DICOMweb
--input, and for each OCT volume, a DICOM SR of the answer and a Secondary Capture of its Grad-CAM
overlay (`eyeray.score.dicom_results`), stored into the source's study as new series over STOW-RS.

One Ray task per study: it reads the study's source instances again (WADO-RS: the SR copies their
patient and study attributes), builds the objects and stores them in one STOW-RS request. A PACS that
is down or slow (`PacsUnavailable`) makes Ray retry the task. Writing is idempotent by UID: the
objects' UIDs are derived from the source and the model, and `dicomweb.store_instances` sends only
what the study does not hold yet, so a retried task or a re-run of the same command never stores
anything twice.
"""

from __future__ import annotations

import io
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from PIL import Image

from eyeray import __version__, dicomweb, storage
from eyeray.score.dicom_results import Finding, overlay_capture, structured_report, to_bytes

log = logging.getLogger(__name__)

WRITE_RETRIES = 3  # per study task, on PacsUnavailable; then the run stops and a re-run resumes
ROW_COLUMNS = ["path", "frame", "task", "status", "gate", "gate_reason", "label", "probabilities", "referral"]
ROW_COLUMNS += ["needs_review", "explanations"]


@dataclass(frozen=True)
class Result:
    """What goes back for one source instance: its finding and its overlays, (frame or None, the
    overlay PNG relative to the scoring output)."""

    uri: str
    finding: Finding
    overlays: tuple[tuple[int | None, str], ...]


def models(manifests: list[dict[str, Any]], decision: dict[str, Any]) -> dict[str, tuple[str, list[str], str]]:
    """Per task: the model's name in DICOM, its classes, and its operating point in words (from the
    run's `decision`, as `eyeray.score.pipeline.check_decision` records it)."""
    points = decision.get("operating_points") or {m["task"]: decision.get("operating_point") for m in manifests}
    return {
        m["task"]: (f"eyeray {m['task']} {m['backbone']}", m["classes"], _words(points[m["task"]])) for m in manifests
    }


def _words(point: dict[str, Any] | None) -> str:
    if not point:
        return "argmax (no operating point)"
    threshold = point.get("threshold", point.get("thresholds"))
    chosen = f", chosen on {point['chosen_on']}" if point.get("chosen_on") else ""
    return f"{point.get('rule')} at {threshold}{chosen}"


def results(
    rows: pa.Table, volume_rows: pa.Table, models: dict[str, tuple[str, list[str], str]], version: str
) -> list[Result]:
    """A Result per answered or declined instance read from a PACS (rows without a frame) and per
    volume (its overlays: the driving B-scans', or a cleared volume's closest B-scan's); error rows
    get none (there is no answer to write). `models`: as `models` gives them;
    `version`, the scoring version, is every result's model version."""
    single = rows.filter(pc.is_null(rows.column("frame"))) if rows.num_rows else rows
    out = []
    for row in single.select(ROW_COLUMNS).to_pylist():
        if row["status"] in ("ok", "declined") and dicomweb.is_dicomweb(row["path"]):
            finding = _finding(row, models[row["task"]], version)
            out.append(Result(row["path"], finding, tuple((None, f) for f in (row["explanations"] or [])[:1])))
    overlays = {
        (r["path"], r["frame"]): r["explanations"] or []
        for r in rows.filter(pc.is_valid(rows.column("frame"))).select(["path", "frame", "explanations"]).to_pylist()
    }
    for v in volume_rows.to_pylist():
        if v["status"] in ("ok", "declined") and v["task"] and dicomweb.is_dicomweb(v["path"]):
            name, classes, point = models[v["task"]]
            finding = Finding(
                task=v["task"],
                classes=tuple(classes),
                probabilities=dict(v["probabilities"] or []) if v["status"] == "ok" else {},
                labels=tuple(v["labels"]),
                referral=v["referral"],
                status=v["status"],
                needs_review=bool(v["needs_review"]),
                model_name=name,
                model_version=version,
                operating_point=point,
                gate_reason=v["reason"] if v["status"] == "declined" else "",
                frames=tuple(v["driving_frames"]),
            )
            shown = v["driving_frames"] or ([v["closest_frame"]] if v["closest_frame"] is not None else [])
            drawn = [(f, overlays[(v["path"], f)][0]) for f in shown if overlays.get((v["path"], f))]
            out.append(Result(v["path"], finding, tuple(drawn)))
    return out


def _finding(row: dict[str, Any], model: tuple[str, list[str], str], version: str) -> Finding:
    name, classes, point = model
    label = row["label"]
    answered = row["status"] == "ok"
    return Finding(
        task=row["task"],
        classes=tuple(classes),
        probabilities={k: float(v) for k, v in dict(row["probabilities"] or {}).items()} if answered else {},
        labels=tuple(label if isinstance(label, list) else [label] if label else []),
        referral=row["referral"] if answered else None,
        status=row["status"],
        needs_review=bool(row["needs_review"]),
        model_name=name,
        model_version=version,
        operating_point=point,
        gate_reason="" if answered else f"{row['gate']}: {row['gate_reason']}" if row["gate_reason"] else row["gate"],
    )


def write(pacs: dicomweb.Pacs, output: str, todo: list[Result]) -> dict[str, int]:
    """Store every result's SR and overlays into its study (a Ray task per study); the counts of
    objects stored now and already there."""
    by_study: dict[str, list[Result]] = defaultdict(list)
    for result in todo:
        by_study[dicomweb.Instance.from_uri(result.uri).study_uid].append(result)
    task = store_study.options(max_retries=WRITE_RETRIES, retry_exceptions=[dicomweb.PacsUnavailable])
    refs = [task.remote(pacs, output, study, items) for study, items in sorted(by_study.items())]
    stored = already = 0
    for now, before in ray.get(refs):
        stored, already = stored + now, already + before
    log.info(f"wrote back to the PACS: {stored} DICOM objects stored, {already} already there")
    return {"studies": len(by_study), "results": len(todo), "stored": stored, "already_present": already}


@ray.remote(num_cpus=1)
def store_study(pacs: dicomweb.Pacs, output: str, study_uid: str, items: list[Result]) -> tuple[int, int]:
    """One study's SRs and overlays, built from its source instances and stored in one STOW-RS request."""
    import pydicom

    files = []
    for item in items:
        source = pydicom.dcmread(io.BytesIO(dicomweb.read(pacs, item.uri)), force=True)
        files.append(to_bytes(structured_report(source, item.finding, software_version=__version__)))
        for frame, png in item.overlays:
            overlay = np.asarray(Image.open(io.BytesIO(storage.read_bytes(storage.join(output, png)))).convert("RGB"))
            capture = overlay_capture(source, overlay, item.finding, software_version=__version__, frame=frame)
            files.append(to_bytes(capture))
    result = dicomweb.store_instances(pacs, files, study_uid)
    return len(result.stored), len(result.already_present)
