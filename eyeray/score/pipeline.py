"""Batch scoring of an image archive with Ray Data: one Parquet row per input file, exactly once.

Pipeline: list files -> read + decode + resize (CPU tasks, `eyeray.data.imaging`, the functions
training used) -> predict (`BundlePredictor` actors: one or more bundles loaded once per actor,
`num_gpus` when asked; calibrated probabilities, the operating point's labels and referral, a
confidence and `needs_review`, Grad-CAM heatmaps of the rows `--explain` selects) -> draw the
overlays on the originals (CPU tasks, `eyeray.score.overlays`) -> write shards (`eyeray.score.shards`:
committed by rename). The stages stream, so the model is fed while files are still being read.
A re-run lists what committed shards hold for the same scoring version and scores only the rest:
killed and re-run, every file ends up once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from eyeray import cluster, dicomweb, storage
from eyeray.data import imaging
from eyeray.data.files import list_inputs
from eyeray.decision import operating_points
from eyeray.decision.ensemble import METHODS, combine
from eyeray.decision.gate import OUT_OF_SCOPE
from eyeray.decision.options import DecisionOptions
from eyeray.model.options import InferenceOptions
from eyeray.preflight import SettingError
from eyeray.score import overlays, preflight, routing, shards, volumes, write_back
from eyeray.score.explain_plan import ExplainPlan
from eyeray.score.predictor import BundlePredictor

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
DECODE_CPUS = 1  # per decode task: decoding one JPEG or DICOM is single-threaded
PACS_RETRIES = 4  # a read task whose PACS is down or slow (PacsUnavailable) is retried by Ray this often
# TensorFlow, Keras and the Ray worker itself. Measured: a VGG16 actor peaked at 1.0 GiB on CPU
# (Ray Data's memory issue detector); with 4x the weights on top, Ray's detector stays quiet.
ACTOR_RUNTIME_BYTES = 5 << 28  # 1.25 GiB
REPORT_COLUMNS = [
    "path",
    "task",
    "status",
    "error",
    "gate",
    "gate_reason",
    "gate_score",
    "label",
    "referral",
    "confidence",
    "needs_review",
    "explanations",
    "frame",
    "frames",
    "probabilities",
    *imaging.DICOM_IDENTIFIERS,
]
SUMMARY_PRINTED = (
    "files_seen",
    "scored",
    "declined",
    "declined_by_reason",
    "errors",
    "errors_by_reason",
    "predictions",
    "referred",
    "needs_review",
    "volumes",
    "wall_seconds",
)


@dataclass
class ScoreConfig:
    """Every knob of a scoring run; the user settings are the flags of `eyeray score` (eyeray.config_cli)."""

    bundles: list[str] = field(
        metadata={
            "flag": "--bundle",
            "metavar": "DIR_OR_S3_URI",
            "help": "model bundle folder or s3:// URI (from training); repeat for an ensemble of one task",
        }
    )
    input: str = field(
        metadata={
            "help": "archive to score: local folder, s3://bucket/prefix (recursive), or a PACS's DICOMweb root "
            "(http(s)://host/dicom-web: its instances, filtered by --study-date and --modality)"
        }
    )
    output: str = field(metadata={"help": "results folder or s3:// URI (Parquet shards, summary.json, report.html)"})
    ensemble: str = field(
        default="mean",
        metadata={"choices": METHODS, "help": "with several bundles: average the probabilities, or majority vote"},
    )
    actors: int = field(default=1, metadata={"help": "model actors (each loads the bundles once)"})
    gpus_per_actor: float = field(default=0.0, metadata={"help": "GPUs per model actor"})
    batch_size: int = field(default=32, metadata={"help": "images per model call"})
    rows_per_shard: int = field(
        default=1000, metadata={"help": "rows per Parquet shard (the unit of commit and resume)"}
    )
    report: bool = field(default=True, metadata={"help": "skip OUTPUT/report.html"})
    cpus_per_actor: float = field(default=1.0, metadata={"help": "CPUs Ray reserves per model actor"})
    # bytes Ray reserves per model actor; None: estimated from the bundles
    memory_per_actor: int | None = field(default=None, metadata={"cli": False})
    decision: DecisionOptions = field(default_factory=DecisionOptions)  # --thresholds, --review-below, --gate
    inference: InferenceOptions = field(default_factory=InferenceOptions)  # --tta, --jit-compile, --mixed-precision
    explain: str = field(  # eyeray.score.explain_plan.ExplainPlan
        default="review",
        metadata={
            "help": "rows that get Grad-CAM overlays (PNG under OUTPUT/explanations/, named in the rows): "
            "none, review, referred, top-K (every row, its K most probable classes), or a comma list"
        },
    )
    study_date: str | None = field(
        default=None,
        metadata={"metavar": "YYYYMMDD[-YYYYMMDD]", "help": "DICOMweb --input: studies of this date or range"},
    )
    modality: list[str] = field(
        default_factory=list,
        metadata={"metavar": "MODALITY", "help": "DICOMweb --input: instances of this modality (OPT, OP); repeat"},
    )
    pacs_token_file: str | None = field(
        default=None, metadata={"help": "DICOMweb: a file holding the bearer token (read at each request)"}
    )
    pacs_user: str | None = field(default=None, metadata={"help": "DICOMweb: HTTP basic auth user"})
    pacs_password_file: str | None = field(
        default=None, metadata={"help": "DICOMweb: a file holding the basic auth password"}
    )
    pacs_timeout: float = field(default=30.0, metadata={"help": "DICOMweb: seconds to connect, and per read"})
    write_back: bool = field(
        default=False,
        metadata={
            "help": "DICOMweb --input: store a DICOM SR of each instance's (or volume's) answer and a Secondary "
            "Capture of its Grad-CAM overlay into its study, as new series over STOW-RS (idempotent by UID); "
            "every answered image gets an overlay"
        },
    )
    block_batches: int = field(default=4, repr=False, metadata={"cli": False})  # files per read task, in batches

    def __post_init__(self):
        ExplainPlan.parse(self.explain)
        if isinstance(self.bundles, str):
            self.bundles = [self.bundles]
        if self.ensemble not in METHODS:
            raise ValueError(f"--ensemble must be one of {', '.join(METHODS)}, not {self.ensemble!r}")
        for name in ("actors", "batch_size", "rows_per_shard", "block_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.gpus_per_actor < 0 or self.cpus_per_actor < 0:
            raise ValueError("gpus_per_actor and cpus_per_actor must not be negative")
        if self.pacs is None and (self.study_date or self.modality or self.write_back):
            raise ValueError(
                "--study-date, --modality and --write-back need a DICOMweb --input (http(s)://.../dicom-web)"
            )
        if self.write_back and ExplainPlan.parse(self.explain).top_k == 0:
            self.explain = "top-1"  # the overlay each written-back instance carries

    @property
    def pacs(self) -> dicomweb.Pacs | None:
        """The DICOMweb service `input` names, with its authentication; None for a folder or s3://."""
        if not dicomweb.is_dicomweb(self.input):
            return None
        return dicomweb.Pacs(
            self.input, self.pacs_token_file, self.pacs_user, self.pacs_password_file, self.pacs_timeout
        )

    @property
    def row_options(self) -> dict[str, Any]:
        """The non-default options that change the rows (and so the scoring version), spelled as
        the versions before the options objects were (so their results resume)."""
        options = self.decision.changed()
        if options.pop("thresholds", None) is not None and self.decision.override is not None:
            options["thresholds"] = self.decision.override
        if "gate" in options:
            options["gate"] = "off"
        return {**options, **({"tta": True} if self.inference.tta else {})}


def version_key(manifests: list[dict[str, Any]], method: str, options: dict[str, Any] | None = None) -> str:
    """What identifies a scoring result: the bundle's version, or for an ensemble a hash of its
    members' versions and the method (so a re-run with the same bundles resumes, other ones do not).
    Non-default decision `options` (threshold override, TTA, review level) add a hash of their own:
    they change the rows, so rows made without them are not reused."""
    if len(manifests) == 1:
        key = manifests[0]["version"]
    else:
        members = ",".join(sorted(m["version"] for m in manifests))
        kind = "route" if len({m["task"] for m in manifests}) > 1 else "ens"
        key = f"{kind}-" + hashlib.sha1(f"{method}:{members}".encode()).hexdigest()[:12]
    if options:
        key += "-" + hashlib.sha1(json.dumps(options, sort_keys=True).encode()).hexdigest()[:8]
    return key


@dataclass(frozen=True)
class Plan:
    """What a scoring run's settings and bundles come to, worked out once, before any file is read,
    from the manifests preflight read: the tasks (one, or several routed by their gates), the decode
    stage's arguments, how rows are decided, and the scoring version the rows are kept under."""

    manifests: list[dict[str, Any]]
    tasks: list[str]
    loading: dict[str, Any]  # `decode_options`
    decision: dict[str, Any]  # `check_decision`
    key: str  # `version_key`

    @classmethod
    def of(cls, cfg: ScoreConfig, manifests: list[dict[str, Any]]) -> Plan:
        return cls(
            manifests,
            [g.task for g in routing.group(manifests, cfg.decision.gate)],
            decode_options(manifests),
            check_decision(cfg, manifests),
            version_key(manifests, cfg.ensemble, cfg.row_options),
        )


def run(cfg: ScoreConfig, predictor: type[BundlePredictor] = BundlePredictor) -> dict[str, Any]:
    """Score every file of `cfg.input` not yet scored into `cfg.output`; write and return the summary.
    `predictor`: the model actors' class, a `BundlePredictor` or a subclass of it (one that adds
    its own logging, or a test's that fails on purpose)."""
    from eyeray.score import report as score_report

    start = time.perf_counter()
    manifests = preflight.check(cfg)  # bundles, --input, --output: a one-line SettingError before Ray starts
    plan = Plan.of(cfg, manifests)  # what the bundles cannot do together fails here, before any file is read
    key = plan.key
    fs, root = storage.filesystem(cfg.output)
    fs.makedirs(root, exist_ok=True)
    shards.clear_incomplete(cfg.output)
    try:
        found = pa.array(inputs(cfg), pa.string())
    except dicomweb.PacsError as exc:  # before Ray starts: one line, as for any --input that cannot be read
        raise SettingError(f"--input {exc}") from None
    todo = shards.remaining(cfg.output, key, found)
    started = pc.sum(pc.is_valid(todo.column("done_frames"))).as_py() or 0
    log.info(
        f"{len(found)} files in {cfg.input}; {len(found) - len(todo)} already scored "
        f"(version {key}); scoring {len(todo)}" + (f", {started} of them volumes a run had started" if started else "")
    )
    written = 0
    if len(todo):
        cluster.connect()
        check_resources(cfg)
        written = _scored(cfg, todo, plan, predictor)
    rows = shards.committed(cfg.output, key, REPORT_COLUMNS)  # read once: the summary and the report
    summary = summarize(
        rows, manifests, key, files_seen=len(found), scored_now=written, seconds=time.perf_counter() - start
    )
    volume_rows = volumes.answers(rows, manifests)  # empty when no file had several frames
    if volume_rows.num_rows:
        volumes.write(cfg.output, volume_rows)
        summary["volumes"] = volumes.summary(volume_rows)
    summary["bundles"] = [
        {"uri": uri, "version": m["version"], "backbone": m["backbone"]} for uri, m in zip(cfg.bundles, manifests)
    ]
    summary["ensemble"] = cfg.ensemble if len(manifests) > len({m["task"] for m in manifests}) else None
    summary["decision"] = plan.decision
    summary["inference_this_run"] = {
        "jit_compile": cfg.inference.jit_compile,
        "mixed_precision": cfg.inference.mixed_precision,
    }
    if cfg.write_back:
        rows_back = shards.committed(cfg.output, key, write_back.ROW_COLUMNS)
        results = write_back.results(rows_back, volume_rows, write_back.models(manifests, plan.decision), key)
        summary["written_back"] = _pacs_stage(write_back.write, cfg.pacs, cfg.output, results)
    fs.pipe(f"{root}/{SUMMARY_FILE}", json.dumps(summary, indent=2).encode())
    if cfg.report:
        score_report.write(cfg.output, summary, rows, volume_rows, reader=_reader(cfg))
    log.info("summary: " + json.dumps({k: summary[k] for k in SUMMARY_PRINTED if k in summary}))
    return summary


def inputs(cfg: ScoreConfig) -> list[str]:
    """The files to score: under a folder or s3:// prefix, or a PACS's instances (QIDO-RS, by
    --study-date and --modality) as their WADO-RS URIs, which the rows keep as `path`."""
    if cfg.pacs is None:
        return list_inputs(cfg.input)
    found = dicomweb.search_instances(cfg.pacs, study_date=cfg.study_date, modalities=tuple(cfg.modality))
    return [instance.uri for instance in found]


def _reader(cfg: ScoreConfig) -> imaging.Reader | None:
    """How the decode, overlay and report stages read a file: from the PACS, or (None) from storage."""
    return None if cfg.pacs is None else dicomweb.reader(cfg.pacs)


def _scored(cfg: ScoreConfig, todo: pa.Table, plan: Plan, predictor: type) -> int:
    """Run the pipeline; the rows it committed."""
    return _pacs_stage(lambda: sum(int(row["rows"]) for row in pipeline(cfg, todo, plan, predictor).iter_rows()))


def _pacs_stage(stage, *args):
    """`stage(*args)`. A PACS that stays down or slow through Ray's retries stops the run with one
    line saying so: what was committed (rows, stored results) stays, and a re-run resumes."""
    try:
        return stage(*args)
    except Exception as exc:
        cause = _pacs_cause(exc)
        if cause is None:
            raise
        raise dicomweb.PacsUnavailable(
            f"{str(cause).splitlines()[0]} (after Ray's retries); what was committed or stored so far stays, "
            "run the same command again to do the rest"
        ) from None


def _pacs_cause(exc: BaseException) -> dicomweb.PacsUnavailable | None:
    """The PacsUnavailable behind a Ray or Ray Data error, if that is what stopped the pipeline."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)  # a RayTaskError: the exception its task raised
        if isinstance(exc, dicomweb.PacsUnavailable) and not isinstance(cause, dicomweb.PacsUnavailable):
            return exc
        exc = cause or exc.__cause__ or exc.__context__
    return None


def decode_options(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """`imaging.load_batch` arguments from the bundles' manifests (`preprocessing`): each input size
    once (the smallest first), their resize method and the strictest `max_pixels`. One decode
    serves every bundle, so bundles that resize differently are scored separately."""
    resizes = [m["preprocessing"]["resize"] for m in manifests]
    methods = {r["method"] for r in resizes}
    if len(methods) > 1:
        named = ", ".join(f"{m['version']}: {r['method']}" for m, r in zip(manifests, resizes))
        raise ValueError(f"bundles resize differently ({named}): score them one at a time")
    sizes = sorted({int(r["size"][0]) for r in resizes})
    return {
        "size": sizes[0],
        "extra_sizes": tuple(sizes[1:]),
        "method": methods.pop(),
        "max_pixels": min(int(m["preprocessing"]["max_pixels"]) for m in manifests),
    }


def pipeline(cfg: ScoreConfig, todo: pa.Table, plan: Plan, predictor: type = BundlePredictor) -> ray.data.Dataset:
    """The Ray Data pipeline over the files to score (`shards.remaining`): one row (file name, rows)
    per committed shard. A volume becomes one row per B-scan in the decode tasks. Errors raised in
    its stages reach the driver as themselves, not as Ray Data's UserCodeException (the datasets
    copy the context they are built in), so `run` tells a PACS outage from a bug."""
    context = ray.data.DataContext.get_current()
    saved, context.raise_original_map_exception = context.raise_original_map_exception, True
    try:
        return _stages(cfg, todo, plan, predictor)
    finally:
        context.raise_original_map_exception = saved


def _stages(cfg: ScoreConfig, todo: pa.Table, plan: Plan, predictor: type) -> ray.data.Dataset:
    key, loading, manifests = plan.key, plan.loading, plan.manifests
    sizes = [loading["size"], *loading["extra_sizes"]]
    block = cfg.batch_size * cfg.block_batches
    ds = ray.data.from_arrow([todo.slice(i, block) for i in range(0, len(todo), block)])
    reading = {"max_retries": PACS_RETRIES, "retry_exceptions": [dicomweb.PacsUnavailable]} if cfg.pacs else {}
    ds = ds.map_batches(
        imaging.load_batch,
        fn_kwargs={**loading, "every_frame": True, "reader": _reader(cfg)},
        batch_size=cfg.batch_size,
        num_cpus=DECODE_CPUS,
        **reading,
    )
    ds = ds.map_batches(
        predictor,
        fn_constructor_kwargs=predictor_args(cfg, sizes[0]),
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.actors),
        num_gpus=cfg.gpus_per_actor,
        num_cpus=cfg.cpus_per_actor,
        memory=cfg.memory_per_actor or actor_memory(cfg.bundles),
    )
    tasks = plan.tasks
    routed = len(tasks) > 1
    if ExplainPlan.parse(cfg.explain).active:  # CPU tasks draw the actors' heatmaps on the originals
        for prefix in [f"{t}{routing.SEPARATOR}" for t in tasks] if routed else [""]:
            ds = ds.map_batches(
                overlays.draw,
                fn_kwargs={
                    "output": cfg.output,
                    "key": key,
                    "max_pixels": loading["max_pixels"],
                    "prefix": prefix,
                    "reader": _reader(cfg),
                },
                batch_size=cfg.batch_size,
                **reading,
            )
    ds = ds.map_batches(
        shards.write_shard,
        batch_size=cfg.rows_per_shard,
        fn_kwargs={
            "output": cfg.output,
            "manifest": manifests[0],
            "key": key,
            "members": [m["version"] for m in manifests],
            "decision": json.dumps(plan.decision, sort_keys=True),
            "routed_manifests": manifests if routed else None,
        },
    )
    return ds


def predictor_args(cfg: ScoreConfig, primary_size: int) -> dict[str, Any]:
    """The `BundlePredictor` arguments of a scoring run (each model actor builds one from them)."""
    return {
        "bundle_uris": cfg.bundles,
        "method": cfg.ensemble,
        "primary_size": primary_size,
        "decision": cfg.decision,
        "inference": cfg.inference,
        "explain": cfg.explain,
        "output": cfg.output,
        "batch_size": cfg.batch_size,
    }


def check_decision(cfg: ScoreConfig, manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """How rows are decided (calibration, operating point with any override, TTA, review level,
    the gate), as the rows and the summary record it; a routed run (several tasks) records each
    task's operating point in `operating_points`. A threshold override the bundles cannot take
    (wrong count, unknown label, no operating point) fails here, before any file is read; one for
    several tasks fails in preflight."""
    groups = routing.group(manifests, cfg.decision.gate)
    points = {}
    for g in groups:
        classes = len(g.manifests[0]["classes"])
        dry = combine(
            g.manifests,
            [np.full((1, classes), 1 / classes, np.float32)] * len(g.manifests),
            cfg.ensemble,
            cfg.decision.override,
        )
        points[g.task] = operating_points.summary(dry.operating_point)
    return {
        "calibration": [m.get("calibration", {}).get("method", "none") for m in manifests],
        "operating_point": next(iter(points.values())) if len(points) == 1 else None,
        **({"operating_points": points} if len(points) > 1 else {}),
        "tta": cfg.inference.tta,
        "review_below": cfg.decision.review_below,
        "explain": cfg.explain,
        "gate": _gate_summary(cfg, manifests),
    }


def _gate_summary(cfg: ScoreConfig, manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per bundle: how its gate decides (method, threshold, share kept on validation), or why none does."""
    if not cfg.decision.gate:
        return [{"verdict": "off"} for _ in manifests]
    keys = ("method", "threshold", "keep", "kept_on_validation")
    return [{k: m["gate"][k] for k in keys} if m.get("gate") else {"verdict": "no gate"} for m in manifests]


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
        log.info(
            f"waiting for resources held by other work: need {busy}, free now "
            f"{ {k: round(free.get(k, 0), 2) for k in busy} }"
        )


def actor_memory(bundle_uris: list[str]) -> int:
    """Memory a model actor needs: the runtime plus a few times the weights (loaded model, graph,
    activations). Reserving it keeps Ray from packing more model actors on a node than fit in
    RAM, and, being a resource the decode tasks do not ask for, keeps decoding in its own tasks
    rather than fused into the model actor (where it would stall the model on every read)."""
    from eyeray.model.bundle import MODEL_FILE

    weights = 0
    for uri in bundle_uris:
        fs, path = storage.filesystem(uri)
        weights += fs.size(f"{path}/{MODEL_FILE}")
    return ACTOR_RUNTIME_BYTES + 4 * weights


def summarize(
    table: pa.Table, manifests: list[dict[str, Any]], key: str, *, files_seen: int, scored_now: int, seconds: float
) -> dict[str, Any]:
    """Counts over every committed row of this scoring version (all runs, not just this one). A
    routed run (several tasks) counts rows per task in `routing` and its predictions as "task: class"."""
    ok = pc.equal(table.column("status"), "ok") if table.num_rows else pa.array([], pa.bool_())
    failed = pc.equal(table.column("status"), "error") if table.num_rows else pa.array([], pa.bool_())
    errors = _counts(table.column("error").filter(failed)) if table.num_rows else {}
    declined = _counts(_declined_reasons(table)) if table.num_rows else {}
    tasks = list(dict.fromkeys(m["task"] for m in manifests))
    predictions: dict[str, int] = {}
    for task in tasks:
        classes = next(m["classes"] for m in manifests if m["task"] == task)
        mine = pc.and_(ok, pc.equal(table.column("task"), task)) if table.num_rows else ok
        labels = table.column("label").filter(mine) if table.num_rows else pa.array([], pa.string())
        if pa.types.is_list(labels.type) and len(labels):
            labels = pc.list_flatten(labels)
        predicted = _counts(labels)
        predictions.update({(f"{task}: {c}" if len(tasks) > 1 else c): predicted.get(c, 0) for c in classes})
    flagged = {
        name: int(pc.sum(table.column(name).filter(ok)).as_py() or 0)
        if table.num_rows and name in table.column_names
        else 0
        for name in ("referral", "needs_review")
    }
    summary = {
        "task": "+".join(tasks),
        "bundle_version": key,
        "files_seen": files_seen,
        "rows": table.num_rows,
        "scored": int(pc.sum(ok).as_py() or 0) if table.num_rows else 0,
        "declined": sum(declined.values()),
        "declined_by_reason": declined,
        "errors": sum(errors.values()),
        "errors_by_reason": errors,
        "predictions": predictions,
        "referred": flagged["referral"] if any(m.get("referral_classes") for m in manifests) else None,
        "needs_review": flagged["needs_review"],
        "scored_this_run": scored_now,
        "wall_seconds": round(seconds, 2),
        "images_per_s_this_run": round(scored_now / seconds, 2) if seconds > 0 else None,
    }
    if len(tasks) > 1:
        answered = _counts(table.column("task").filter(ok)) if table.num_rows else {}
        summary["routing"] = {**{t: answered.get(t, 0) for t in tasks}, "out of scope": declined.get(OUT_OF_SCOPE, 0)}
    return summary


def _declined_reasons(table: pa.Table) -> pa.Array:
    """Per declined row, its reason as the summary counts it: "out_of_distribution", "out_of_scope"
    (a routed run: no task's gate accepted it), or "ungradable: <what>" (the statistic that failed)."""
    rows = table.filter(pc.equal(table.column("status"), "declined"))
    verdict, reason = rows.column("gate"), pc.fill_null(rows.column("gate_reason"), "")
    bare = pc.or_(pc.equal(reason, ""), pc.equal(verdict, OUT_OF_SCOPE))  # out of scope: each task's verdict
    return pc.if_else(bare, verdict, pc.binary_join_element_wise(verdict, reason, ": "))


def _counts(values) -> dict[str, int]:
    """Value -> count, most frequent first."""
    counts = pc.value_counts(values).to_pylist() if len(values) else []
    return {c["values"]: c["counts"] for c in sorted(counts, key=lambda c: -c["counts"])}
