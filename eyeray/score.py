"""Batch scoring of an image archive with Ray Data: one Parquet row per input file, exactly once.

Pipeline: list files -> read + decode + resize (CPU tasks, `eyeray.imaging`) -> predict
(`BundlePredictor` actors, model loaded once per actor, `num_gpus` when asked) -> write shards.
Each shard is written under a hidden temporary name and renamed when complete, so a reader (and
a re-run) only ever sees whole shards. A re-run lists what committed shards already hold for the
same bundle version and scores only the rest: killed and re-run, every file ends up once.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import posixpath
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from eyeray import imaging, storage
from eyeray.datasets import IMAGE_EXTENSIONS

SUMMARY_FILE = "summary.json"
PART_PREFIX = "part-"


@dataclass
class ScoreConfig:
    bundle: str
    input: str
    output: str
    actors: int = 1
    gpus_per_actor: float = 0.0
    batch_size: int = 32
    rows_per_shard: int = 1000


def list_archive(uri: str) -> list[str]:
    """Every image-like file under `uri` (recursive; extension-less files may be DICOM), sorted."""
    fs, root = storage.filesystem(uri)
    found = []
    for path in fs.find(root):
        name = posixpath.basename(path)
        if name.startswith("."):
            continue
        ext = posixpath.splitext(name)[1].lower()
        if ext in IMAGE_EXTENSIONS or ext == "":
            found.append(storage.to_uri(fs, path))
    return sorted(found)


class BundlePredictor:
    """Ray Data callable class: loads the bundle once per actor, adds prediction columns."""

    def __init__(self, bundle_uri: str):
        from eyeray import bundle

        self.bundle = bundle.load(bundle_uri)
        self.thresholds = np.asarray(self.bundle.manifest["thresholds"], np.float32)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray([e == "" for e in batch["error"]])
        probs = np.full((len(ok), len(self.bundle.classes)), np.nan, np.float32)
        if ok.any():
            probs[ok] = self.bundle.predict(batch["image"][ok])
        out = {k: v for k, v in batch.items() if k != "image"}
        out["probabilities"] = probs
        out["label"] = np.array([self._label(p) if good else "" for p, good in zip(probs, ok)], dtype=object)
        return out

    def _label(self, p: np.ndarray) -> str:
        classes = self.bundle.classes
        if self.bundle.manifest["multi_label"]:
            return "|".join(c for c, v, t in zip(classes, p, self.thresholds) if v >= t)
        return classes[int(np.argmax(p))]


def shard_table(batch: dict[str, np.ndarray], manifest: dict[str, Any]) -> pa.Table:
    """Prediction columns -> the documented Parquet schema (probabilities as a class -> float struct)."""
    classes = manifest["classes"]
    probs = np.asarray(batch["probabilities"], np.float32).reshape(len(batch["path"]), len(classes))
    ok = np.asarray([e == "" for e in batch["error"]])
    prob_struct = pa.StructArray.from_arrays(
        [pa.array(probs[:, i], mask=~ok) for i in range(len(classes))], names=classes, mask=pa.array(~ok)
    )
    labels = [str(x) for x in batch["label"]]
    label = (pa.array([x.split("|") if x else [] for x in labels], pa.list_(pa.string()))
             if manifest["multi_label"] else pa.array([x or None for x in labels], pa.string()))  # fmt: skip
    scored_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    n = len(labels)
    return pa.table({
        "path": pa.array([str(p) for p in batch["path"]], pa.string()),
        "status": pa.array(["ok" if good else "error" for good in ok], pa.string()),
        "error": pa.array([str(e) or None for e in batch["error"]], pa.string()),
        "label": label,
        "probabilities": prob_struct,
        "task": pa.array([manifest["task"]] * n, pa.string()),
        "bundle_version": pa.array([manifest["version"]] * n, pa.string()),
        "width": pa.array(np.asarray(batch["width"], np.int64)),
        "height": pa.array(np.asarray(batch["height"], np.int64)),
        "scored_at": pa.array([scored_at] * n, pa.string()),
    })  # fmt: skip


def write_shard(batch: dict[str, np.ndarray], output: str, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    """Write one batch as a Parquet shard: temporary hidden name, then rename (the commit)."""
    table = shard_table(batch, manifest)
    digest = hashlib.sha1("\n".join(sorted(table.column("path").to_pylist())).encode()).hexdigest()[:16]
    name = f"{PART_PREFIX}{manifest['version']}-{digest}.parquet"
    fs, root = storage.filesystem(output)
    tmp, final = f"{root}/.tmp-{name}", f"{root}/{name}"
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f)
    fs.mv(tmp, final)
    return {"file": np.array([name], dtype=object), "rows": np.array([table.num_rows])}


def committed_rows(output: str, version: str, columns: list[str]) -> pa.Table | None:
    """`columns` of every committed shard of this bundle version (temporary shards are hidden)."""
    fs, root = storage.filesystem(output)
    if not fs.exists(root):
        return None
    tables = []
    for path in fs.glob(f"{root}/{PART_PREFIX}{version}-*.parquet"):
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f, columns=columns))
    return pa.concat_tables(tables) if tables else None


def scored_paths(output: str, version: str) -> set[str]:
    """Paths already in committed shards of this bundle version (only that column is read)."""
    table = committed_rows(output, version, ["path"])
    return set(table.column("path").to_pylist()) if table is not None else set()


def run(cfg: ScoreConfig) -> dict[str, Any]:
    """Score every file of `cfg.input` not yet scored into `cfg.output`; write and return the summary."""
    from eyeray import bundle

    if not ray.is_initialized():
        ray.init()
    start = time.perf_counter()
    manifest = bundle.read_manifest(cfg.bundle)
    files = list_archive(cfg.input)
    done = scored_paths(cfg.output, manifest["version"])
    todo = [p for p in files if p not in done]
    fs, root = storage.filesystem(cfg.output)
    fs.makedirs(root, exist_ok=True)
    print(f"[eyeray] {len(files)} files in {cfg.input}; {len(done)} already scored by bundle "
          f"{manifest['version']}; scoring {len(todo)}")  # fmt: skip
    written = 0
    if todo:
        blocks = max(1, -(-len(todo) // cfg.batch_size))
        ds = ray.data.from_items([{"path": p} for p in todo], override_num_blocks=blocks)
        ds = ds.map_batches(imaging.load_batch, fn_kwargs={"size": int(manifest["input"]["shape"][0])},
                            batch_size=cfg.batch_size)  # fmt: skip
        ds = ds.map_batches(BundlePredictor, fn_constructor_kwargs={"bundle_uri": cfg.bundle},
                            batch_size=cfg.batch_size, compute=ray.data.ActorPoolStrategy(size=cfg.actors),
                            num_gpus=cfg.gpus_per_actor)  # fmt: skip
        ds = ds.map_batches(write_shard, fn_kwargs={"output": cfg.output, "manifest": manifest},
                            batch_size=cfg.rows_per_shard)  # fmt: skip
        written = sum(int(row["rows"]) for row in ds.iter_rows())
    summary = summarize(cfg.output, manifest, files_seen=len(files), scored_now=written,
                        seconds=time.perf_counter() - start)  # fmt: skip
    fs.pipe(f"{root}/{SUMMARY_FILE}", json.dumps(summary, indent=2).encode())
    print("[eyeray] summary: " + json.dumps({k: summary[k] for k in ("files_seen", "scored", "errors")}))
    return summary


def summarize(output: str, manifest: dict[str, Any], *, files_seen: int, scored_now: int, seconds: float) -> dict:
    table = committed_rows(output, manifest["version"], ["status", "error", "label"])
    rows = table.to_pylist() if table is not None else []
    errors = Counter(r["error"] for r in rows if r["status"] == "error")
    labels: Counter = Counter()
    for r in rows:
        if r["status"] == "ok":
            labels.update(r["label"] if isinstance(r["label"], list) else [r["label"]])
    return {
        "task": manifest["task"],
        "bundle_version": manifest["version"],
        "files_seen": files_seen,
        "rows": len(rows),
        "scored": sum(r["status"] == "ok" for r in rows),
        "errors": sum(errors.values()),
        "errors_by_reason": dict(errors.most_common()),
        "predictions": {c: labels.get(c, 0) for c in manifest["classes"]},
        "scored_this_run": scored_now,
        "wall_seconds": round(seconds, 2),
        "images_per_s_this_run": round(scored_now / seconds, 2) if seconds > 0 else None,
    }
