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
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from eyeray import storage

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
    """Prediction columns -> the documented schema: `probabilities` is a class -> (calibrated)
    float struct; `referral` is null when the task has no referral rule; `explanations` lists
    overlay PNGs relative to the output; `decision` (JSON, the same for every row of a run) says
    how rows were decided. An ensemble adds `model_probabilities`, a member version -> (class -> float)."""
    classes = list(manifest["classes"])
    n = len(batch["path"])
    ok = np.asarray([e == "" for e in batch["error"]], bool)
    labels = [str(x) for x in batch["label"]]
    if manifest["multi_label"]:
        label = _split(labels)
    else:
        label = pa.array([x or None for x in labels], pa.string())
    columns = {
        "path": pa.array([str(p) for p in batch["path"]], pa.string()),
        "status": pa.array(np.where(ok, "ok", "error"), pa.string()),
        "error": pa.array([str(e) or None for e in batch["error"]], pa.string()),
        "label": label,
        "probabilities": _probability_struct(np.asarray(batch["probabilities"]).reshape(n, -1), classes, ok),
        "task": pa.array([manifest["task"]] * n, pa.string()),
        "bundle_version": pa.array([key] * n, pa.string()),
        "width": pa.array(np.asarray(batch["width"], np.int64)),
        "height": pa.array(np.asarray(batch["height"], np.int64)),
        "referral": pa.array(
            np.asarray(batch["referral"], np.float32) > 0.5,
            pa.bool_(),
            mask=~ok | np.isnan(np.asarray(batch["referral"], np.float32)),
        ),
        "confidence": pa.array(np.asarray(batch["confidence"], np.float32), pa.float32(), mask=~ok),
        "needs_review": pa.array(np.asarray(batch["needs_review"], bool), pa.bool_(), mask=~ok),
        "explanations": _split(batch["explanations"]),
        "decision": pa.array([decision] * n, pa.string()),
        "scored_at": pa.array([_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")] * n, pa.string()),
    }
    if len(members) > 1:
        per_model = np.asarray(batch["model_probabilities"]).reshape(n, len(members), len(classes))
        columns["model_probabilities"] = pa.StructArray.from_arrays(
            [_probability_struct(per_model[:, i], classes, ok) for i in range(len(members))],
            names=members,
            mask=pa.array(~ok),
        )
    return pa.table(columns)


def write_shard(
    batch: dict[str, np.ndarray],
    output: str,
    manifest: dict[str, Any],
    key: str,
    members: list[str],
    decision: str = "{}",
) -> dict[str, np.ndarray]:
    """Ray Data stage: write one batch as a shard (temporary hidden name, then rename = commit)."""
    table = shard_table(batch, manifest, key, members, decision)
    digest = hashlib.sha1("\n".join(sorted(table.column("path").to_pylist())).encode()).hexdigest()[:16]
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
    dataset = pads.dataset(paths, format="parquet", filesystem=storage.pyarrow_filesystem(output))
    return dataset.to_table(columns=columns)


def clear_incomplete(output: str) -> int:
    """Delete temporary shards a killed run left behind (one run per output at a time)."""
    fs, root = storage.filesystem(output)
    stale = fs.glob(f"{root}/{TMP_PREFIX}*") if fs.exists(root) else []
    for path in stale:
        fs.rm(path)
    return len(stale)
