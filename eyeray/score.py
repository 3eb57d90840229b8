"""Batch scoring of an image archive with Ray Data: one Parquet row per input file, exactly once.

Pipeline: list files -> read + decode + resize (CPU tasks, `eyeray.imaging`, the functions
training used) -> predict (`BundlePredictor` actors: one or more bundles loaded once per actor,
`num_gpus` when asked; calibrated probabilities, the operating point's labels and referral, a
confidence and `needs_review`, Grad-CAM overlays of the rows `--explain` selects) -> write shards
(`eyeray.shards`: committed by rename). The stages stream,
so the model is fed while files are still being read. A re-run lists what committed shards hold
for the same scoring version and scores only the rest: killed and re-run, every file ends up once.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from eyeray import calibration, ensemble, imaging, operating_points, shards, storage
from eyeray.datasets import IMAGE_EXTENSIONS
from eyeray.ensemble import METHODS, check_compatible, version_key
from eyeray.explain_plan import ExplainPlan

SUMMARY_FILE = "summary.json"
DECODE_CPUS = 1  # per decode task: decoding one JPEG or DICOM is single-threaded
# TensorFlow, Keras and the Ray worker itself. Measured: a VGG16 actor peaked at 1.0 GiB on CPU
# (Ray Data's memory issue detector); with 4x the weights on top, Ray's detector stays quiet.
ACTOR_RUNTIME_BYTES = 5 << 28  # 1.25 GiB
FAULT_MARKER = ".fault-injected"
REPORT_COLUMNS = ["path", "status", "error", "label", "referral", "confidence", "needs_review", "explanations"]
SUMMARY_PRINTED = ("files_seen", "scored", "errors", "errors_by_reason", "predictions", "referred", "needs_review",
                   "wall_seconds")  # fmt: skip


@dataclass
class ScoreConfig:
    bundles: list[str]
    input: str
    output: str
    ensemble: str = "mean"  # how several bundles combine: "mean" or "vote"
    actors: int = 1
    gpus_per_actor: float = 0.0
    batch_size: int = 32
    rows_per_shard: int = 1000
    report: bool = True  # write OUTPUT/report.html
    cpus_per_actor: float = 1.0
    memory_per_actor: int | None = None  # bytes Ray reserves per model actor; None: estimated from the bundles
    thresholds: str | None = None  # operating-point override, as typed: "0.3", "0.3,0.4", "D=0.3,G=0.2"
    tta: bool = False  # mean over the image and its mirror
    review_below: float = operating_points.DEFAULT_REVIEW_BELOW  # calibrated confidence -> needs_review
    explain: str = "review"  # rows that get Grad-CAM overlays: eyeray.explain_plan.ExplainPlan
    fault_after_batches: int | None = None  # test hook: one predictor actor dies once after this many batches
    block_batches: int = field(default=4, repr=False)  # files per read task, in batches

    def __post_init__(self):
        operating_points.parse_thresholds(self.thresholds)  # a typo fails here, not in an actor
        ExplainPlan.parse(self.explain)
        if not 0.0 <= self.review_below <= 1.0:
            raise ValueError(f"review_below must be between 0 and 1, not {self.review_below}")
        if isinstance(self.bundles, str):
            self.bundles = [self.bundles]
        if self.ensemble not in METHODS:
            raise ValueError(f"--ensemble must be one of {', '.join(METHODS)}, not {self.ensemble!r}")
        for name in ("actors", "batch_size", "rows_per_shard", "block_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.gpus_per_actor < 0 or self.cpus_per_actor < 0:
            raise ValueError("gpus_per_actor and cpus_per_actor must not be negative")

    @property
    def decision_options(self) -> dict[str, Any]:
        """The non-default options that change the rows (and so the scoring version)."""
        options = {"thresholds": operating_points.parse_thresholds(self.thresholds), "tta": self.tta or None,
                   "review_below": None if self.review_below == operating_points.DEFAULT_REVIEW_BELOW else self.review_below}
        return {k: v for k, v in options.items() if v is not None}  # fmt: skip


def list_archive(uri: str) -> list[str]:
    """Every image-like file under `uri`, recursive, sorted: image extensions, plus files without
    one or named by a UID (DICOM exports; the decoder tells DICOM from anything else). Hidden files
    and folders (`.DS_Store`, `._x.jpg`, `.Trash/`) are not inputs. Only the path list is held."""
    fs, root = storage.filesystem(uri)
    if not fs.exists(root):
        raise FileNotFoundError(f"--input {uri} does not exist (or is not readable with these credentials)")
    found = []
    for path in fs.find(root):
        relative = posixpath.relpath(path, root) if path != root else posixpath.basename(path)
        if any(part.startswith(".") for part in relative.split("/")):
            continue
        ext = posixpath.splitext(relative)[1].lower()
        if ext in IMAGE_EXTENSIONS or ext == "" or ext[1:].isdigit():  # 1.2.840...: UID-named DICOM
            found.append(storage.to_uri(fs, path))
    return sorted(found)


def image_column(size: int, primary: int) -> str:
    """The decode stage's column holding images resized for a model of input `size`."""
    return "image" if size == primary else f"image_{size}"


class BundlePredictor:
    """Ray Data callable class: loads the bundles once per actor; adds the decision columns.

    With several bundles, each predicts from the image column of its own input size and the
    results combine (`eyeray.ensemble`); per-model calibrated probabilities stay in the rows.
    Grad-CAM models are built once per actor, on the first row that needs one."""

    def __init__(self, bundle_uris: list[str], method: str = "mean", primary_size: int | None = None,
                 thresholds=None, tta: bool = False, review_below: float = operating_points.DEFAULT_REVIEW_BELOW,
                 explain: str = "none", output: str | None = None, key: str = "",
                 fault_after_batches: int | None = None, fault_marker: str | None = None):  # fmt: skip
        from eyeray import bundle

        self.bundles = [bundle.load(uri) for uri in bundle_uris]
        self.manifests = [b.manifest for b in self.bundles]
        check_compatible(self.manifests)
        self.method, self.thresholds, self.tta, self.review_below = method, thresholds, tta, review_below
        self.plan, self.output, self.key, self._cams = ExplainPlan.parse(explain), output, key, None
        if self.plan.active and output is None:
            raise ValueError("explaining rows needs the output folder")
        self.primary = primary_size or min(b.image_size for b in self.bundles)
        self.fault_after, self.fault_marker, self.batches = fault_after_batches, fault_marker, 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._maybe_inject_fault()
        ok = np.asarray([e == "" for e in batch["error"]], bool)
        n, classes = len(ok), self.bundles[0].classes
        images = [batch[image_column(b.image_size, self.primary)][ok] for b in self.bundles]
        per_model = [b.predict(x, tta=self.tta) for b, x in zip(self.bundles, images)]
        decision = ensemble.decide(self.manifests, per_model, self.method, self.thresholds)
        sure = decision.confidence()
        review = sure < self.review_below
        out = {k: v for k, v in batch.items() if not k.startswith("image")}
        out["probabilities"] = _spread(ok, decision.probabilities, np.nan, np.float32)
        out["label"] = _spread(ok, [shards.LABEL_SEPARATOR.join(x) for x in decision.labels], "", object)
        refer = decision.referral if decision.referral is not None else np.full(len(sure), np.nan)
        out["referral"] = _spread(ok, np.asarray(refer, np.float32), np.nan, np.float32)
        out["confidence"] = _spread(ok, sure, np.nan, np.float32)
        out["needs_review"] = _spread(ok, review, False, bool)
        explained = self._explain(batch, ok, images, decision, review)
        out["explanations"] = _spread(ok, [shards.LABEL_SEPARATOR.join(explained.get(i, [])) for i in range(len(sure))],
                                      "", object)  # fmt: skip
        if len(self.bundles) > 1:
            members = [calibration.apply(m.get("calibration"), p) for m, p in zip(self.manifests, per_model)]
            out["model_probabilities"] = _spread(ok, np.stack(members, axis=1) if len(sure) else
                                                 np.zeros((0, len(self.bundles), len(classes))), np.nan, np.float32)  # fmt: skip
        self.batches += 1
        return out

    def _explain(self, batch, ok, images, decision, review) -> dict[int, list[str]]:
        """Overlays of the rows the plan selects (indices among the decoded rows)."""
        from eyeray.explain import GradCam, explain_rows

        pairs = self.plan.pairs(decision, review, self.bundles[0].classes) if self.plan.active else []
        if not pairs:
            return {}
        if self._cams is None:
            self._cams = [GradCam(b.model) for b in self.bundles]
        paths = [str(p) for p in np.asarray(batch["path"])[ok]]
        return explain_rows(self._cams, images, paths, pairs, self.bundles[0].classes, self.output, self.key)

    def _maybe_inject_fault(self) -> None:
        """Test-only: the first actor to reach `fault_after_batches` dies hard, once per output."""
        if self.fault_after is None or self.batches != self.fault_after:
            return
        fs, path = storage.filesystem(self.fault_marker)
        if not fs.exists(path):
            fs.pipe(path, b"killed")
            os._exit(1)


def _spread(ok: np.ndarray, values, fill, dtype) -> np.ndarray:
    """Values of the decoded rows, placed among all rows of the batch; `fill` for error rows."""
    values = np.asarray(values, dtype=dtype) if dtype is not object else np.array(values, dtype=object)
    out = np.empty((len(ok), *values.shape[1:]), dtype=dtype)
    out[...] = fill
    out[ok] = values
    return out


def run(cfg: ScoreConfig) -> dict[str, Any]:
    """Score every file of `cfg.input` not yet scored into `cfg.output`; write and return the summary."""
    from eyeray import bundle, score_report

    start = time.perf_counter()
    manifests = [bundle.read_manifest(uri) for uri in cfg.bundles]
    check_compatible(manifests)
    decision = check_decision(cfg, manifests)
    key = version_key(manifests, cfg.ensemble, cfg.decision_options)
    fs, root = storage.filesystem(cfg.output)
    fs.makedirs(root, exist_ok=True)
    shards.clear_incomplete(cfg.output)
    files = pa.array(list_archive(cfg.input), pa.string())
    done = shards.committed(cfg.output, key, ["path"]).column("path")
    todo = files.filter(pc.invert(pc.is_in(files, value_set=done.combine_chunks())))
    print(f"[eyeray] {len(files)} files in {cfg.input}; {len(files) - len(todo)} already scored "
          f"(version {key}); scoring {len(todo)}")  # fmt: skip
    written = 0
    if len(todo):
        if not ray.is_initialized():
            ray.init()
        check_resources(cfg)
        written = sum(int(row["rows"]) for row in pipeline(cfg, todo, manifests).iter_rows())
    rows = shards.committed(cfg.output, key, REPORT_COLUMNS)  # read once: the summary and the report
    summary = summarize(rows, manifests, key, files_seen=len(files), scored_now=written,
                        seconds=time.perf_counter() - start)  # fmt: skip
    summary["bundles"] = [{"uri": uri, "version": m["version"], "backbone": m["backbone"]}
                          for uri, m in zip(cfg.bundles, manifests)]  # fmt: skip
    summary["ensemble"] = cfg.ensemble if len(manifests) > 1 else None
    summary["decision"] = decision
    fs.pipe(f"{root}/{SUMMARY_FILE}", json.dumps(summary, indent=2).encode())
    if cfg.report:
        score_report.write(cfg.output, summary, rows)
    print("[eyeray] summary: " + json.dumps({k: summary[k] for k in SUMMARY_PRINTED}))
    return summary


def pipeline(cfg: ScoreConfig, todo: pa.Array, manifests: list[dict]) -> ray.data.Dataset:
    """The Ray Data pipeline over the files to score: one row (file name, rows) per committed shard."""
    key, members = version_key(manifests, cfg.ensemble, cfg.decision_options), [m["version"] for m in manifests]
    sizes = sorted({int(m["input"]["shape"][0]) for m in manifests})
    block = cfg.batch_size * cfg.block_batches
    ds = ray.data.from_arrow([pa.table({"path": todo.slice(i, block)}) for i in range(0, len(todo), block)])
    ds = ds.map_batches(imaging.load_batch, fn_kwargs={"size": sizes[0], "extra_sizes": tuple(sizes[1:])},
                        batch_size=cfg.batch_size, num_cpus=DECODE_CPUS)  # fmt: skip
    predictor_args = {"bundle_uris": cfg.bundles, "method": cfg.ensemble, "primary_size": sizes[0],
                      "thresholds": operating_points.parse_thresholds(cfg.thresholds), "tta": cfg.tta,
                      "review_below": cfg.review_below, "explain": cfg.explain, "output": cfg.output, "key": key,
                      "fault_after_batches": cfg.fault_after_batches,
                      "fault_marker": storage.join(cfg.output, FAULT_MARKER)}  # fmt: skip
    ds = ds.map_batches(BundlePredictor, fn_constructor_kwargs=predictor_args, batch_size=cfg.batch_size,
                        compute=ray.data.ActorPoolStrategy(size=cfg.actors), num_gpus=cfg.gpus_per_actor,
                        num_cpus=cfg.cpus_per_actor, memory=cfg.memory_per_actor or actor_memory(cfg.bundles))  # fmt: skip
    ds = ds.map_batches(shards.write_shard, batch_size=cfg.rows_per_shard,
                        fn_kwargs={"output": cfg.output, "manifest": manifests[0], "key": key, "members": members,
                                   "decision": json.dumps(check_decision(cfg, manifests), sort_keys=True)})  # fmt: skip
    return ds


def check_decision(cfg: ScoreConfig, manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """How rows are decided (calibration, operating point with any override, TTA, review level),
    as the rows and the summary record it. A threshold override the bundles cannot take (wrong
    count, unknown label, no operating point) fails here, before any file is read."""
    classes = len(manifests[0]["classes"])
    dry = ensemble.decide(manifests, [np.full((1, classes), 1 / classes, np.float32)] * len(manifests), cfg.ensemble,
                          operating_points.parse_thresholds(cfg.thresholds))  # fmt: skip
    return {
        "calibration": [m.get("calibration", {}).get("method", "none") for m in manifests],
        "operating_point": operating_points.summary(dry.operating_point),
        "tta": cfg.tta,
        "review_below": cfg.review_below,
        "explain": cfg.explain,
    }


def check_resources(cfg: ScoreConfig) -> None:
    """Refuse a pipeline the cluster can never run (Ray Data would wait forever), and say so when
    other work (a Serve app, another job) holds what it needs right now."""
    need = {"CPU": cfg.actors * cfg.cpus_per_actor + DECODE_CPUS, "GPU": cfg.actors * cfg.gpus_per_actor}
    total, free = ray.cluster_resources(), ray.available_resources()
    short = {k: v for k, v in need.items() if v > total.get(k, 0) + 1e-9}
    if short:
        raise ValueError(
            f"the cluster has {', '.join(f'{total.get(k, 0):g} {k}' for k in short)}, but {cfg.actors} model "
            f"actor(s) plus one decode task need {', '.join(f'{v:g} {k}' for k, v in short.items())}: "
            "lower --actors, --cpus-per-actor or --gpus-per-actor, or add nodes"
        )
    busy = {k: v for k, v in need.items() if v > free.get(k, 0) + 1e-9}
    if busy:
        print(f"[eyeray] waiting for resources held by other work: need {busy}, free now "
              f"{ {k: round(free.get(k, 0), 2) for k in busy} }")  # fmt: skip


def actor_memory(bundle_uris: list[str]) -> int:
    """Memory a model actor needs: the runtime plus a few times the weights (loaded model, graph,
    activations). Reserving it keeps Ray from packing more model actors on a node than fit in
    RAM, and, being a resource the decode tasks do not ask for, keeps decoding in its own tasks
    rather than fused into the model actor (where it would stall the model on every read)."""
    from eyeray.bundle import MODEL_FILE

    weights = 0
    for uri in bundle_uris:
        fs, path = storage.filesystem(uri)
        weights += fs.size(f"{path}/{MODEL_FILE}")
    return ACTOR_RUNTIME_BYTES + 4 * weights


def summarize(table: pa.Table, manifests: list[dict[str, Any]], key: str, *, files_seen: int, scored_now: int,
              seconds: float) -> dict[str, Any]:  # fmt: skip
    """Counts over every committed row of this scoring version (all runs, not just this one)."""
    ok = pc.equal(table.column("status"), "ok") if table.num_rows else pa.array([], pa.bool_())
    errors = _counts(table.column("error").filter(pc.invert(ok))) if table.num_rows else {}
    labels = table.column("label").filter(ok) if table.num_rows else pa.array([], pa.string())
    if manifests[0]["multi_label"] and len(labels):
        labels = pc.list_flatten(labels)
    predicted = _counts(labels)
    flagged = {name: int(pc.sum(table.column(name).filter(ok)).as_py() or 0) if table.num_rows and name in table.column_names
               else 0 for name in ("referral", "needs_review")}  # fmt: skip
    return {
        "task": manifests[0]["task"],
        "bundle_version": key,
        "files_seen": files_seen,
        "rows": table.num_rows,
        "scored": int(pc.sum(ok).as_py() or 0) if table.num_rows else 0,
        "errors": sum(errors.values()),
        "errors_by_reason": errors,
        "predictions": {c: predicted.get(c, 0) for c in manifests[0]["classes"]},
        "referred": flagged["referral"] if manifests[0].get("referral_classes") else None,
        "needs_review": flagged["needs_review"],
        "scored_this_run": scored_now,
        "wall_seconds": round(seconds, 2),
        "images_per_s_this_run": round(scored_now / seconds, 2) if seconds > 0 else None,
    }


def _counts(values) -> dict[str, int]:
    """Value -> count, most frequent first."""
    counts = pc.value_counts(values).to_pylist() if len(values) else []
    return {c["values"]: c["counts"] for c in sorted(counts, key=lambda c: -c["counts"])}
