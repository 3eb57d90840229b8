"""The scoring run's report.html: one self-contained page a clinician or an on-call engineer opens.

How the rows were decided (calibration, operating point, the gate, any override), the review queue
first (the least confident cases with their Grad-CAM overlays, so a clinician starts with the
uncertain ones; all of them in review_queue.csv, the declined images after them), the images the gate
declined (out of distribution or ungradable, with thumbnails, by reason), the class distribution
(bar chart), the errors grouped by reason with example paths, and a few thumbnails per predicted
class (read back through the same decoder). Images are inlined as data URIs, so the page can be
mailed or attached to a ticket; it holds no full-size pixels. The page itself is
eyeray/templates/score_report.html; this module prepares the values it prints.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from eyeray import storage
from eyeray.data import imaging
from eyeray.evaluation import pages

REPORT_FILE = "report.html"
REVIEW_FILE = "review_queue.csv"
REVIEW_SHOWN = 60  # the least confident cases shown with overlays; all of them are in REVIEW_FILE
EXAMPLES_PER_CLASS = 4
ERROR_EXAMPLES = 5
DECLINED_SHOWN = 24  # thumbnails of declined images; all of them are in REVIEW_FILE
THUMBNAIL = 160


def write(
    output: str,
    summary: dict[str, Any],
    rows: pa.Table,
    volumes: pa.Table | None = None,
    reader: imaging.Reader | None = None,
) -> str:
    """Write OUTPUT/report.html and OUTPUT/review_queue.csv from the summary and the committed rows
    (and the volume answers, `eyeray.score.volumes`). `reader`: how the scored files are read
    again for thumbnails (a PACS's), when storage cannot."""
    queue = review_queue(rows)
    _write_csv(storage.join(output, REVIEW_FILE), queue)
    page = render(summary, rows, queue, output, volumes, reader)
    uri = storage.join(output, REPORT_FILE)
    fs, path = storage.filesystem(uri)
    fs.pipe(path, page.encode())
    return uri


def review_queue(rows: pa.Table) -> list[dict[str, Any]]:
    """Rows marked needs_review: the answered ones least confident first, then the declined ones
    (no answer to be sure of), farthest from the training images first."""
    if not rows.num_rows or "needs_review" not in rows.column_names:
        return []
    flagged = rows.filter(pc.fill_null(rows.column("needs_review"), False))
    columns = ["path", "status", "confidence", "label", "referral", "gate", "gate_reason", "gate_score", "explanations"]
    columns += [c for c in ("patient_id", "study_uid", "frame") if c in rows.column_names]  # older runs lack them
    answered = flagged.filter(_is(flagged, "ok")).sort_by([("confidence", "ascending"), ("path", "ascending")])
    declined = flagged.filter(_is(flagged, "declined")).sort_by([("gate_score", "descending"), ("path", "ascending")])
    return answered.select(columns).to_pylist() + declined.select(columns).to_pylist()


def _write_csv(uri: str, queue: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    header = ["rank", "patient_id", "study_uid", "path", "frame", "status", "confidence", "labels", "referral"]
    writer.writerow([*header, "declined_because", "overlays"])
    for rank, row in enumerate(queue, 1):
        writer.writerow(
            [
                rank,
                row.get("patient_id") or "",
                row.get("study_uid") or "",
                row["path"],
                "" if row.get("frame") is None else row["frame"],
                row["status"],
                "" if row["confidence"] is None else f"{row['confidence']:.4f}",
                _labels(row["label"]),
                "" if row["referral"] is None else row["referral"],
                _declined_because(row) if row["status"] == "declined" else "",
                " ".join(row["explanations"] or []),
            ]
        )
    fs, path = storage.filesystem(uri)
    fs.pipe(path, buf.getvalue().encode())


def _declined_because(row: dict[str, Any]) -> str:
    """A declined row's reason in words: "ungradable: blurred", "out_of_distribution (score 3.1)"."""
    if row["gate_reason"]:
        return f"{row['gate']}: {row['gate_reason']}"
    return f"{row['gate']} (score {row['gate_score']:.2f})" if row["gate_score"] is not None else str(row["gate"])


def _labels(label) -> str:
    return ", ".join(label) if isinstance(label, list) else (label or "")


def render(
    summary: dict[str, Any],
    rows: pa.Table,
    queue: list[dict[str, Any]] | None = None,
    output: str | None = None,
    volumes: pa.Table | None = None,
    reader: imaging.Reader | None = None,
) -> str:
    """The page as a string: values are prepared here, eyeray/templates/score_report.html prints them."""
    queue = queue or []
    models = ", ".join(f"{b['backbone']} {b['version']}" for b in summary.get("bundles", []))
    return pages.render(
        "score_report.html",
        task=summary["task"],
        ensemble=summary.get("ensemble"),
        models=models or summary["bundle_version"],
        run=summary,
        decision=_decision(summary),
        review={
            "total": len(queue),
            "figures": _review([row for row in queue if row["status"] == "ok"], output, reader),
            "more": max(0, len(queue) - REVIEW_SHOWN),
            "file": REVIEW_FILE,
        },
        distribution=_distribution(summary["predictions"]),
        declined=_declined(summary, queue, reader),
        errors=_errors(summary, rows),
        examples=_examples(rows, list(summary["predictions"]), reader),
        volumes=_volumes(volumes, output, reader),
    )


def _volumes(volumes: pa.Table | None, output: str | None, reader: imaging.Reader | None) -> dict[str, Any] | None:
    """Each volume's answer (`eyeray.decision.volume`), the referred first, with the overlay of its
    top driving B-scan."""
    if volumes is None or not volumes.num_rows:
        return None
    from eyeray.decision.volume import NAMED, RULE

    rank = {"ok": 1, "declined": 2, "error": 3}
    ordered = sorted(volumes.to_pylist(), key=lambda v: (not v["referral"], rank[v["status"]], v["path"]))
    shown = []
    for v in ordered[:REVIEW_SHOWN]:
        answer = "refer" if v["referral"] else ("not referred" if v["status"] == "ok" else v["status"])
        detail = f"{answer} · {', '.join(v['labels']) or 'no label'} · {v['reason']}"
        caption = {"name": _name(v), "detail": detail, "refer": bool(v["referral"]), "note": None}
        if v["explanations"] and output is not None:
            shown.append({**_thumbnail(storage.join(output, v["explanations"][0]), size=240, fmt="PNG"), **caption})
        elif v["status"] == "ok" and (v["driving_frames"] or v["closest_frame"] is not None):
            first = (v["driving_frames"] or [v["closest_frame"]])[0]
            shown.append(
                {**_thumbnail(v["path"], frame=first, reader=reader), **caption, "note": f"B-scan {first}, no overlay"}
            )
        else:
            shown.append({"alt": v["path"], "src": None, "unavailable": v["reason"], **caption})
    return {"rule": RULE, "named": NAMED, "figures": shown, "total": volumes.num_rows}


def _decision(summary: dict[str, Any]) -> dict[str, Any]:
    """How probabilities became answers, in words a reader can check against the bundle."""
    d = summary.get("decision") or {}
    points = d.get("operating_points")  # a routed run: one per task
    if points:
        point = "; ".join(f"{task}: {_point_words(op)}" for task, op in points.items())
    else:
        point = _point_words(d.get("operating_point"))
    gates = d.get("gate") or []
    return {
        "gate": "; ".join(_gate_words(g) for g in gates) or "not recorded",
        "calibration": ", ".join(d.get("calibration", [])),
        "point": point,
        "referred": summary.get("referred"),
        "tta": "on" if d.get("tta") else "off",
        "review_below": d.get("review_below"),
        "routing": summary.get("routing"),
    }


def _point_words(op: dict[str, Any] | None) -> str:
    if op is None:
        return "no operating point in the bundle: argmax, or 0.5 per label"
    if "threshold" in op:
        return (
            f"{op['rule']}: refer when {op.get('score', '')} ≥ {op['threshold']:.4f} "
            f"(target {op.get('target')}, {op.get('chosen_on', '')})"
        )
    return f"{op['rule']} ({op.get('chosen_on', '')}): " + json.dumps(op.get("thresholds") or op.get("members"))


def _gate_words(gate: dict[str, Any]) -> str:
    if "method" not in gate:
        return "turned off for this run (--gate off)" if gate["verdict"] == "off" else "none (made before the gate)"
    kept = 100 * gate["kept_on_validation"]
    return (
        f"{gate['method']} distance to the training images, threshold {gate['threshold']:.4g} "
        f"(chosen to keep {100 * gate['keep']:.0f} % of validation images; kept {kept:.1f} %)"
    )


def _declined(summary: dict[str, Any], queue: list[dict[str, Any]], reader: imaging.Reader | None) -> dict[str, Any]:
    """The declined images: counts by reason, and thumbnails of the first DECLINED_SHOWN."""
    shown = [row for row in queue if row["status"] == "declined"][:DECLINED_SHOWN]
    caption = {"refer": False, "note": None}
    figures = [
        {
            **_thumbnail(row["path"], frame=row.get("frame"), reader=reader),
            "name": _name(row),
            "detail": _declined_because(row),
            **caption,
        }
        for row in shown
    ]
    reasons = summary.get("declined_by_reason", {})
    return {
        "total": summary.get("declined", 0),
        "reasons": [{"reason": r, "count": n} for r, n in reasons.items()],
        "figures": figures,
        "more": max(0, summary.get("declined", 0) - len(figures)),
        "file": REVIEW_FILE,
    }


def _review(queue: list[dict[str, Any]], output: str | None, reader: imaging.Reader | None) -> list[dict[str, Any]]:
    """The least confident cases, each with its Grad-CAM overlay (or the scan itself when there is none)."""
    figures = []
    for row in queue[:REVIEW_SHOWN]:
        caption = {
            "name": _name(row),
            "detail": f"{_labels(row['label'])} · confidence {row['confidence']:.2f}",
            "refer": bool(row["referral"]),
        }
        overlays = row["explanations"] or []
        if overlays and output is not None:
            figures.append(
                {**_thumbnail(storage.join(output, overlays[0]), size=240, fmt="PNG"), **caption, "note": None}
            )
        else:
            figures.append(
                {
                    **_thumbnail(row["path"], frame=row.get("frame"), reader=reader),
                    **caption,
                    "note": "no overlay (--explain)",
                }
            )
    return figures


def _distribution(predictions: dict[str, int]) -> dict[str, Any]:
    """A bar chart of the predicted classes (inlined PNG) and the same counts as a table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes, counts = list(predictions), list(predictions.values())
    fig, ax = plt.subplots(figsize=(max(4, 0.7 * len(classes) + 2), 3))
    bars = ax.bar(classes, counts, color="#4c72b0")
    ax.bar_label(bars)
    ax.set_ylabel("images")
    ax.spines[["top", "right"]].set_visible(False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    total = sum(counts) or 1
    return {
        "chart": pages.data_uri(buf.getvalue(), "image/png"),
        "rows": [{"label": c, "count": n, "share": f"{100 * n / total:.1f} %"} for c, n in predictions.items()],
    }


def _errors(summary: dict[str, Any], rows: pa.Table) -> list[dict[str, Any]]:
    """One row per error reason, most frequent first, with a few of the files that failed that way."""
    if not summary["errors"]:
        return []
    examples: dict[str, list[str]] = defaultdict(list)
    wanted = {reason: min(count, ERROR_EXAMPLES) for reason, count in summary["errors_by_reason"].items()}
    for batch in rows.filter(_is(rows, "error")).select(["path", "error"]).to_batches(max_chunksize=4096):
        for row in batch.to_pylist():
            if len(examples[row["error"]]) < ERROR_EXAMPLES:
                examples[row["error"]].append(row["path"])
        if all(len(examples[reason]) >= n for reason, n in wanted.items()):
            break
    return [
        {"reason": reason, "count": count, "examples": examples[reason]}
        for reason, count in summary["errors_by_reason"].items()
    ]


def _examples(rows: pa.Table, classes: list[str], reader: imaging.Reader | None) -> list[dict[str, Any]]:
    """A few thumbnails per predicted class, read back through the same decoder as scoring."""
    picked: dict[str, list[dict[str, Any]]] = {c: [] for c in classes}
    columns = ["path", "label", *(["frame"] if "frame" in rows.column_names else [])]
    for batch in rows.filter(_is(rows, "ok")).select(columns).to_batches(max_chunksize=4096):
        for row in batch.to_pylist():  # batch by batch: an archive of millions is never one Python list
            labels = row["label"] if isinstance(row["label"], list) else [row["label"]]
            for label in labels:
                if label in picked and len(picked[label]) < EXAMPLES_PER_CLASS:
                    picked[label].append(row)
        if all(len(p) >= EXAMPLES_PER_CLASS for p in picked.values()):
            break
    caption = {"detail": None, "refer": False, "note": None}
    return [
        {
            "label": label,
            "figures": [
                {**_thumbnail(r["path"], frame=r.get("frame"), reader=reader), "name": _name(r), **caption}
                for r in chosen
            ],
        }
        for label, chosen in picked.items()
    ]


def _thumbnail(
    path: str, size: int = THUMBNAIL, fmt: str = "JPEG", frame: int | None = None, reader: imaging.Reader | None = None
) -> dict[str, Any]:
    """A small inlined copy of the image at `path` (a volume's B-scan: its `frame`), or why it
    could not be read again."""
    figure = {"alt": _name({"path": path, "frame": frame}), "src": None, "unavailable": None}
    thumbnail, reason = imaging.read_thumbnail(path, size, frame=-1 if frame is None else frame, reader=reader)
    if thumbnail is None:  # moved or changed since it was scored
        return {**figure, "unavailable": reason}
    image = Image.fromarray(thumbnail)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return {**figure, "src": pages.data_uri(buf.getvalue(), "image/jpeg" if fmt == "JPEG" else "image/png")}


def _name(row: dict[str, Any]) -> str:
    """A figure's caption: the file's name, and for a DICOM file its patient and study, which a
    clinician finds the case by."""
    ids = [f"{what} {row[key]}" for key, what in (("patient_id", "patient"), ("study_uid", "study")) if row.get(key)]
    frame = [f"B-scan {row['frame']}"] if row.get("frame") is not None else []
    return " · ".join([row["path"].rsplit("/", 1)[-1], *frame, *ids])


def _is(rows: pa.Table, status: str):
    return pc.equal(rows.column("status"), status)
