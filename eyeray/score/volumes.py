"""Volume answers of a scoring run: the B-scan rows of each multi-frame file, committed in any
number of shards and runs, folded into one answer per volume (`eyeray.decision.volume`) and written
to OUTPUT/_volumes.parquet. Derived from the committed rows at the end of every run, so a resumed run
rewrites it whole and it never holds a volume twice."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from eyeray import storage
from eyeray.data import imaging
from eyeray.decision.volume import RULE, BScan, aggregate

VOLUMES_FILE = "_volumes.parquet"  # "_": dataset readers of OUTPUT skip it, as they skip _metadata
COLUMNS = ["frame", "frames", "status", "error", "gate", "gate_reason", "label", "probabilities", "referral"]
COLUMNS += ["needs_review", "explanations", "task", *imaging.DICOM_IDENTIFIERS]
SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("task", pa.string()),
        ("status", pa.string()),
        ("labels", pa.list_(pa.string())),
        ("referral", pa.bool_()),
        ("driving_frames", pa.list_(pa.int32())),
        ("closest_frame", pa.int32()),
        ("needs_review", pa.bool_()),
        ("reason", pa.string()),
        ("frames", pa.int32()),
        ("answered", pa.int32()),
        ("declined", pa.int32()),
        ("errors", pa.int32()),
        ("probabilities", pa.map_(pa.string(), pa.float32())),
        ("explanations", pa.list_(pa.string())),  # the driving B-scans' overlays
        *[(name, pa.string()) for name in imaging.DICOM_IDENTIFIERS],
        ("rule", pa.string()),
    ]
)


def answers(rows: pa.Table, manifests: list[dict[str, Any]]) -> pa.Table:
    """One row per volume (per task, in a routed run) from the committed rows (`COLUMNS` and
    `path`); rows of files with one image are not volumes. In a routed run, B-scans no task's gate
    accepted and failed ones count as unanswered for every task the volume went to."""
    referral = {m["task"]: tuple(m.get("referral_classes") or ()) for m in manifests}
    if not rows.num_rows or "frame" not in rows.column_names:
        return SCHEMA.empty_table()
    framed = rows.filter(pc.is_valid(rows.column("frame"))).to_pylist()
    by_path: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in framed:
        by_path[row["path"]].append(row)
    out = []
    for path in sorted(by_path):
        scans = by_path[path]
        tasks = sorted({r["task"] for r in scans if r["task"] and r["status"] != "error"}) or [None]
        for task in tasks:
            mine = [r for r in scans if r["task"] in (task, None) or r["status"] == "error"]
            answer = aggregate([_bscan(r) for r in mine], referral.get(task, ()))
            explained = {r["frame"]: r["explanations"] or [] for r in mine}
            out.append(
                {
                    "path": path,
                    "task": task,
                    "status": answer.status,
                    "labels": list(answer.labels),
                    "referral": answer.referral,
                    "driving_frames": list(answer.driving),
                    "closest_frame": answer.closest,
                    "needs_review": answer.needs_review,
                    "reason": answer.reason,
                    "frames": max(r["frames"] for r in mine),
                    "answered": answer.answered,
                    "declined": answer.declined,
                    "errors": answer.errors,
                    "probabilities": list(answer.probabilities.items()),
                    "explanations": [f for i in answer.driving for f in explained.get(i, [])],
                    **{name: next((r[name] for r in mine if r.get(name)), None) for name in imaging.DICOM_IDENTIFIERS},
                    "rule": RULE,
                }
            )
    return pa.Table.from_pylist(out, SCHEMA)


def _bscan(row: dict[str, Any]) -> BScan:
    label = row["label"]
    return BScan(
        frame=int(row["frame"]),
        status=row["status"],
        labels=tuple(label if isinstance(label, list) else [label] if label else []),
        probabilities=dict(row["probabilities"] or {}),  # a struct (one task) or a map (a routed run)
        referral=row["referral"],
        needs_review=bool(row["needs_review"]),
        reason=row["error"] or _declined_reason(row),
    )


def _declined_reason(row: dict[str, Any]) -> str:
    return f"{row['gate']}: {row['gate_reason']}" if row.get("gate_reason") else (row.get("gate") or "")


def write(output: str, table: pa.Table) -> None:
    """OUTPUT/_volumes.parquet, replaced whole (a reader sees the old file or the new one)."""
    fs, root = storage.filesystem(output)
    tmp, final = f"{root}/.tmp-{VOLUMES_FILE}", f"{root}/{VOLUMES_FILE}"
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f)
    fs.mv(tmp, final)


def summary(table: pa.Table) -> dict[str, int]:
    """Counts for summary.json: volumes, and how many were referred, cleared, declined or failed."""
    status, refer = table.column("status").to_pylist(), table.column("referral").to_pylist()
    return {
        "volumes": table.num_rows,
        "referred": sum(1 for s, r in zip(status, refer) if s == "ok" and r),
        "cleared": sum(1 for s, r in zip(status, refer) if s == "ok" and r is False),
        "declined": status.count("declined"),
        "errors": status.count("error"),
    }
