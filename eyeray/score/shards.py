"""Result shards of batch scoring: the Parquet schema, the commit by rename, and what is committed.

A shard is written under a hidden temporary name and renamed when complete, so a reader (and a
re-run) only ever sees whole shards; Parquet readers skip hidden names. Shard names carry the
scoring version (bundle version, or the ensemble's key) and a hash of the shard's paths: the same
rows always get the same name, so a retried write task overwrites instead of duplicating.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from eyeray import storage
from eyeray.data import imaging
from eyeray.decision import gate

PART_PREFIX = "part-"
TMP_PREFIX = ".tmp-"
LABEL_SEPARATOR = "|"  # labels travel between pipeline stages as one string per row


def _probability_struct(probs: np.ndarray, classes: list[str], ok: np.ndarray) -> pa.StructArray:
    fields = [pa.array(probs[:, i], pa.float32(), mask=~ok) for i in range(len(classes))]
    return pa.StructArray.from_arrays(fields, names=classes, mask=pa.array(~ok))


def _split(values) -> pa.Array:
    return pa.array([str(x).split(LABEL_SEPARATOR) if x else [] for x in values], pa.list_(pa.string()))


def shard_table(
    batch: dict[str, np.ndarray], manifest: dict[str, Any], key: str, members: list[str], decision: str = "{}"
) -> pa.Table:
    """Prediction columns -> the documented schema: `status` is ok, declined (the gate's verdict is
    out_of_distribution or ungradable: no label, probabilities, confidence or referral; `gate_reason`
    says why; needs_review) or error; `gate_score` is the distance over the gate's threshold (> 1:
    declined); `probabilities` is a class -> (calibrated) float struct; `referral` is null when the
    task has no referral rule; `explanations` lists overlay PNGs relative to the output; `decision`
    (JSON, the same for every row of a run) says how rows were decided. An ensemble adds
    `model_probabilities`, a member version -> (class -> float)."""
    classes = list(manifest["classes"])
    n = len(batch["path"])
    ok = np.asarray([e == "" for e in batch["error"]], bool)
    declined = ok & np.isin(np.asarray(batch["gate"], object), gate.DECLINING)
    answered = ok & ~declined
    gate_score = np.asarray(batch["gate_score"], np.float32)
    frame = np.asarray(batch.get("frame", np.full(n, -1)), np.int32)
    labels = [str(x) if a else "" for x, a in zip(batch["label"], answered)]  # a declined row has none
    if manifest["multi_label"]:
        label = _split(labels)
    else:
        label = pa.array([x or None for x in labels], pa.string())
    columns = {
        "path": pa.array([str(p) for p in batch["path"]], pa.string()),
        # a volume's B-scan (0-based frame) and its file's frame count; null frame: a single image
        "frame": pa.array(frame, pa.int32(), mask=frame < 0),
        "frames": pa.array(np.asarray(batch.get("frames", np.ones(n)), np.int32)),
        "status": pa.array(np.where(ok, np.where(declined, "declined", "ok"), "error"), pa.string()),
        "error": pa.array([str(e) or None for e in batch["error"]], pa.string()),
        "gate": pa.array([str(v) or None for v in batch["gate"]], pa.string()),
        "gate_reason": pa.array([str(r) or None for r in batch["gate_reason"]], pa.string()),
        "gate_score": pa.array(gate_score, pa.float32(), mask=~ok | np.isnan(gate_score)),
        "label": label,
        "probabilities": _probability_struct(np.asarray(batch["probabilities"]).reshape(n, -1), classes, answered),
        "task": pa.array([manifest["task"]] * n, pa.string()),
        "bundle_version": pa.array([key] * n, pa.string()),
        "width": pa.array(np.asarray(batch["width"], np.int64)),
        "height": pa.array(np.asarray(batch["height"], np.int64)),
        "referral": pa.array(
            np.asarray(batch["referral"], np.float32) > 0.5,
            pa.bool_(),
            mask=~answered | np.isnan(np.asarray(batch["referral"], np.float32)),
        ),
        "confidence": pa.array(np.asarray(batch["confidence"], np.float32), pa.float32(), mask=~answered),
        "needs_review": pa.array(np.asarray(batch["needs_review"], bool) | declined, pa.bool_(), mask=~ok),
        "explanations": _split(batch["explanations"]),
        "decision": pa.array([decision] * n, pa.string()),
        "scored_at": pa.array([_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")] * n, pa.string()),
        # a DICOM file's identifiers, null for other files: what sending a result back needs
        **{
            name: pa.array([str(v) or None for v in batch.get(name, [""] * n)], pa.string())
            for name in imaging.DICOM_IDENTIFIERS
        },
    }
    if len(members) > 1:
        per_model = np.asarray(batch["model_probabilities"]).reshape(n, len(members), len(classes))
        columns["model_probabilities"] = pa.StructArray.from_arrays(
            [_probability_struct(per_model[:, i], classes, answered) for i in range(len(members))],
            names=members,
            mask=pa.array(~answered),
        )
    return pa.table(columns)


def routed_table(
    batch: dict[str, np.ndarray], manifests: list[dict[str, Any]], key: str, decision: str = "{}"
) -> pa.Table:
    """A routed run's rows (`eyeray.score.routing`): per task, the rows its gate accepted, as
    `shard_table` writes them, `probabilities` (and `model_probabilities`) as maps and `label` as a
    list; one out-of-scope row per file no task accepted; one error row per file that failed; in the
    batch's file order. A file's rows stay in this one table (one shard): resume stays exactly once."""
    from eyeray.score import routing

    groups = routing.group(manifests)
    tasks = [g.task for g in groups]
    ok = np.asarray([e == "" for e in batch["error"]], bool)
    accepted = routing.routed(batch, tasks)
    tables, order = [], []
    for g in groups:
        rows = np.flatnonzero(ok & accepted[g.task])
        columns = {k: _take(v, rows) for k, v in routing.task_columns(batch, g.task).items()}
        tables.append(
            _as_routed(shard_table(columns, g.manifests[0], key, [m["version"] for m in g.manifests], decision))
        )
        order.append(rows)
    rows = np.flatnonzero(~ok | ~np.any([accepted[t] for t in tasks], axis=0))
    columns = {k: _take(v, rows) for k, v in routing.task_columns(batch, tasks[0]).items()}
    columns["gate"] = np.array([gate.OUT_OF_SCOPE] * len(rows), dtype=object)
    columns["gate_reason"] = np.array([routing.out_of_scope_reason(batch, tasks, i) for i in rows], dtype=object)
    columns["gate_score"] = np.full(len(rows), np.nan, np.float32)
    unrouted = _as_routed(shard_table(columns, groups[0].manifests[0], key, [], decision))
    tables.append(
        unrouted.set_column(unrouted.schema.get_field_index("task"), "task", pa.nulls(len(rows), pa.string()))
    )
    order.append(rows)
    table = pa.concat_tables(tables, promote_options="default")
    return table.take(np.argsort(np.concatenate(order), kind="stable"))


def _take(values, rows: np.ndarray):
    return [values[i] for i in rows] if isinstance(values, list) else np.asarray(values)[rows]


def _as_routed(table: pa.Table) -> pa.Table:
    """`probabilities` and `model_probabilities` structs as maps (every task's rows share one
    schema), and `label` as a list (single-label tasks write a string)."""
    for name in ("probabilities", "model_probabilities"):
        if name in table.column_names:
            column = _to_map(table.column(name).combine_chunks())
            table = table.set_column(table.schema.get_field_index(name), name, column)
    label = table.column("label")
    if pa.types.is_string(label.type):
        lists = pa.array([[x] if x is not None else [] for x in label.to_pylist()], pa.list_(pa.string()))
        table = table.set_column(table.schema.get_field_index("label"), "label", lists)
    return table


def _to_map(struct: pa.StructArray) -> pa.Array:
    """A struct of same-typed fields (nested structs too) as a map from field name to value."""
    values = [struct.field(i) for i in range(struct.type.num_fields)]
    values = [_to_map(v) if pa.types.is_struct(v.type) else v for v in values]
    names = [struct.type.field(i).name for i in range(struct.type.num_fields)]
    n, k = len(struct), len(names)
    keys = pa.array(names * n, pa.string())
    items = pa.concat_arrays(values)  # field by field; taken below row by row, as the keys are
    order = np.arange(n * k).reshape(k, n).T.ravel()
    offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
    return pa.MapArray.from_arrays(offsets, keys, items.take(pa.array(order)), mask=struct.is_null())


def write_shard(
    batch: dict[str, np.ndarray],
    output: str,
    manifest: dict[str, Any],
    key: str,
    members: list[str],
    decision: str = "{}",
    routed_manifests: list[dict[str, Any]] | None = None,
) -> dict[str, np.ndarray]:
    """Ray Data stage: write one batch as a shard (temporary hidden name, then rename = commit).
    `routed_manifests`: every bundle's, in a run of several tasks (`routed_table`)."""
    if routed_manifests:
        table = routed_table(batch, routed_manifests, key, decision)
    else:
        table = shard_table(batch, manifest, key, members, decision)
    rows = zip(table.column("path").to_pylist(), table.column("frame").to_pylist())
    digest = hashlib.sha1("\n".join(sorted(f"{p}#{f}" for p, f in rows)).encode()).hexdigest()[:16]
    name = f"{PART_PREFIX}{key}-{digest}.parquet"
    fs, root = storage.filesystem(output)
    tmp, final = f"{root}/{TMP_PREFIX}{name}", f"{root}/{name}"
    fs.makedirs(root, exist_ok=True)  # on this node: a local --output must be shared storage on a cluster
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f)
    fs.mv(tmp, final)
    return {"file": np.array([name], dtype=object), "rows": np.array([table.num_rows])}


def committed(output: str, key: str, columns: list[str]) -> pa.Table:
    """`columns` of every committed shard of scoring version `key` (empty table if none)."""
    fs, root = storage.filesystem(output)
    paths = fs.glob(f"{root}/{PART_PREFIX}{key}-*.parquet") if fs.exists(root) else []
    if not paths:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    filesystem = storage.pyarrow_filesystem(output)
    dataset = pads.dataset(paths, format="parquet", filesystem=filesystem)
    # shards an earlier eyeray wrote may lack newer columns (the DICOM identifiers): those read as nulls
    schema = pa.unify_schemas([f.physical_schema for f in dataset.get_fragments()])
    present = [c for c in columns if c in schema.names]  # a column no shard has yet (frame): all nulls
    table = pads.dataset(paths, schema=schema, format="parquet", filesystem=filesystem).to_table(columns=present)
    for name in columns:
        if name not in present:
            table = table.append_column(name, pa.nulls(table.num_rows))
    return table.select(columns)


def remaining(output: str, key: str, found: pa.Array) -> pa.Table:
    """What a run of scoring version `key` still has to score of the files `found`: a table of
    `path` and `done_frames`, the frames of a volume an interrupted run already committed (null for
    a file not started). A file is done when its row is committed; a volume when every frame's is
    (a volume's rows may span shards, and a killed run may have committed only some)."""
    rows = committed(output, key, ["path", "frame", "frames"])
    if not rows.num_rows:
        return pa.table({"path": found, "done_frames": pa.nulls(len(found), pa.list_(pa.int32()))})
    framed = rows.filter(pc.is_valid(rows.column("frame")))
    single = rows.filter(pc.is_null(rows.column("frame"))).column("path")
    if not framed.num_rows:  # no volumes (or shards from before volumes were scored by frame)
        todo = found.filter(pc.invert(pc.is_in(found, value_set=single.combine_chunks())))
        return pa.table({"path": todo, "done_frames": pa.nulls(len(todo), pa.list_(pa.int32()))})
    counts = framed.group_by("path").aggregate([("frame", "count_distinct"), ("frames", "max")])
    whole = pc.greater_equal(counts.column("frame_count_distinct"), counts.column("frames_max"))
    done = pa.concat_arrays([single.combine_chunks(), counts.column("path").filter(whole).combine_chunks()])
    todo = found.filter(pc.invert(pc.is_in(found, value_set=done)))
    partial = counts.column("path").filter(pc.invert(whole)).combine_chunks()
    started: dict[str, list[int]] = {}
    if len(partial):
        mine = framed.filter(pc.is_in(framed.column("path"), value_set=partial))
        for path, frame in zip(mine.column("path").to_pylist(), mine.column("frame").to_pylist()):
            started.setdefault(path, []).append(frame)
    done_frames = [sorted(set(started[p])) if p in started else None for p in todo.to_pylist()]
    return pa.table({"path": todo, "done_frames": pa.array(done_frames, pa.list_(pa.int32()))})


def clear_incomplete(output: str) -> int:
    """Delete temporary shards a killed run left behind (one run per output at a time)."""
    fs, root = storage.filesystem(output)
    stale = fs.glob(f"{root}/{TMP_PREFIX}*") if fs.exists(root) else []
    for path in stale:
        fs.rm(path)
    return len(stale)
