"""Online predictions with Ray Serve: the same bundles, decode and preprocess behind an HTTP API.

One application: an ingress deployment (`api`, FastAPI: routes, auth, body limits, decode and
preprocess) and one model deployment per bundle, named after its task (`oct`, `glaucoma`,
`odir`), so each task scales on its own. A model deployment loads its bundle once and scores
concurrent requests in one model call (`@serve.batch`; batch size and wait time come from
`user_config`, so `serve deploy` retunes them without a restart).

Answers are those of batch scoring: calibrated probabilities, the labels and referral at the
bundle's operating point (`?thresholds=` overrides it per request, `thresholds:` per deployment),
a confidence and `needs_review`. `POST /v1/{task}/explain` adds a Grad-CAM overlay of the
decided class (a PNG at the upload's own size, base64), drawn by the ingress from the replica's
small heatmap, so no full-size image travels to the model.

    serve run jobs/serve_config.yaml            # Ray's own tools, bundles as application args
    eyeray serve --bundle runs/oct-1/bundle     # the same application from the command line

Bad requests are values: every one gets a 4xx with `{"detail": reason}` and the replica carries
on. Nothing from a request body (pixels, file names) is logged.
"""

# No `from __future__ import annotations`: FastAPI and Serve read these annotations at run time,
# in replicas that receive the routes serialised by value.
import asyncio
import base64
import contextlib
import hmac
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayError
from starlette.concurrency import run_in_threadpool
from starlette.formparsers import MultiPartException, MultiPartParser

from eyeray import __version__
from eyeray.data import imaging
from eyeray.decision import gate, operating_points, volume
from eyeray.decision.decide import DEFAULT_REVIEW_BELOW, decide
from eyeray.model.overlay import overlay_png

log = logging.getLogger(__name__)

logger = logging.getLogger("ray.serve")  # inside replicas: Serve writes it to the replica logs

API_APP = "eyeray"  # the application's name in `serve status` and the config file
INGRESS = "api"  # the ingress deployment's name (model deployments are named after their task)
TOKEN_ENV = "EYERAY_API_TOKEN"
TOKEN_FILE_ENV = "EYERAY_API_TOKEN_FILE"
MULTIPART = "multipart/form-data"
RAW_TYPES = ("application/octet-stream", "application/dicom")  # and any image/*
MAX_BATCH_SIZE, BATCH_WAIT_TIMEOUT_S = 16, 0.01  # defaults; per deployment through user_config
LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]


class ServeArgs(BaseModel):
    """Application arguments (`args:` in a Serve config file, flags of `eyeray serve`).

    Replica resources and autoscaling set here are the code defaults, sized so that all three
    tasks fit on a two-core laptop; a Serve config file's `deployments:` section overrides them
    per deployment, as Serve always does (jobs/serve_config.yaml: GPU replicas, autoscaling)."""

    model_config = ConfigDict(extra="forbid")

    bundles: list[str] = Field(min_length=1, description="bundle folders or s3:// URIs, at most one per task")
    max_body_bytes: int = Field(64 * 2**20, gt=0, description="larger request bodies get 413")
    max_pixels: int = Field(
        imaging.DEFAULT_MAX_PIXELS,
        gt=0,
        description="upper bound on each bundle's preprocessing.max_pixels (the stricter wins); larger decoded "
        "images get 422",
    )
    max_batch_size: int = Field(MAX_BATCH_SIZE, gt=0, description="requests per model call (user_config)")
    batch_wait_timeout_s: float = Field(BATCH_WAIT_TIMEOUT_S, ge=0, description="how long a batch waits to fill up")
    gpus_per_replica: float = Field(0.0, ge=0, description="GPUs per model replica")
    cpus_per_replica: float = Field(0.5, ge=0, description="CPUs per model replica")
    ingress_cpus: float = Field(0.5, ge=0, description="CPUs per ingress replica (it decodes the uploads)")
    autoscaling: dict[str, Any] = Field(
        default_factory=lambda: {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8},
        description="Serve autoscaling_config of every model deployment",
    )
    ingress_env: dict[str, str] = Field(
        default_factory=dict, description=f"environment of the ingress replicas (e.g. {TOKEN_FILE_ENV})"
    )
    thresholds: dict[str, str] = Field(
        default_factory=dict, description="task -> operating-point override (as `?thresholds=`); requests may override"
    )
    tta: bool = Field(False, description="test-time augmentation: mean over the image and its mirror (2x model time)")
    jit_compile: bool = Field(
        False, description="compile the model with XLA (often faster on GPUs; slower on the CPUs measured)"
    )
    mixed_precision: bool = Field(
        False,
        description="float16 inference on GPUs, bfloat16 on CPUs with AVX512-BF16 or AMX (TensorFlow's "
        "mixed-precision rewrite; outputs stay float32); elsewhere float32",
    )
    review_below: float = Field(
        DEFAULT_REVIEW_BELOW, ge=0, le=1, description="calibrated confidence below which an answer says needs_review"
    )
    gate: bool = Field(
        True,
        description="apply each bundle's gate: an image out of distribution or ungradable gets status declined, "
        "no diagnosis",
    )


class GateAnswer(BaseModel):
    verdict: Literal["passed", "out_of_distribution", "ungradable", "no gate", "off"] = Field(
        description="passed; out_of_distribution or ungradable (declined: no diagnosis); no gate (a bundle made "
        "before the gate); off (the service runs with the gate off)"
    )
    reason: str = Field(description="why, in words (empty when passed)")
    score: float | None = Field(description="distance to the training images over the gate's threshold (> 1: declined)")


class Prediction(BaseModel):
    task: str
    status: Literal["ok", "declined"] = Field(
        description="ok: answered; declined: the gate found the image out of distribution or ungradable, so no "
        "labels, probabilities, confidence or referral are given (the image was valid; the model declines)"
    )
    labels: list[str] = Field(description="decided labels at the operating point (multi-label: possibly none)")
    label: str | None = Field(None, description="the decided class of a single-label task")
    probabilities: dict[str, float] = Field(description="calibrated probabilities (empty when declined)")
    referral: bool | None = Field(
        description="refer at the operating point; null: declined, or the task has no referral rule"
    )
    confidence: float | None = Field(
        description="calibrated top probability (multi-label: of the least sure label); null when declined"
    )
    needs_review: bool = Field(description="confidence below the service's review level, or declined")
    gate: GateAnswer = Field(description="the gate's verdict on this image")
    operating_point: dict[str, Any] | None = Field(description="rule and threshold(s) used, and where they come from")
    bundle_version: str
    batch_size: int = Field(description="requests scored in the same model call as this one")


class VolumePrediction(BaseModel):
    """The answer for an uploaded OCT volume (a multi-frame DICOM): each B-scan scored as one image,
    one answer by the rule in `rule` (`eyeray.decision.volume`)."""

    task: str
    status: Literal["ok", "declined"] = Field(
        description="ok: the volume is referred, or cleared with every B-scan answered; declined: some B-scans "
        "could not be answered and none of the others was referred, so no answer is given"
    )
    labels: list[str] = Field(description="the top driving (cleared: the closest) B-scan's labels; none when declined")
    probabilities: dict[str, float] = Field(description="that B-scan's calibrated probabilities")
    referral: bool | None = Field(description="refer: any B-scan referred; null when declined or no referral rule")
    needs_review: bool
    driving_frames: list[int] = Field(
        description="B-scans (0-based frames) behind the answer, the most severe first: the referred ones, or "
        "when declined the unanswered ones; none for a cleared volume"
    )
    closest_frame: int | None = Field(
        description="the answered B-scan closest to referral (its labels: a cleared volume's)"
    )
    reason: str = Field(description="the answer in words, e.g. '3 of 49 B-scans referred: frames 20, 21, 19'")
    rule: str = Field(description="how B-scans make the volume's answer")
    frames: int
    answered: int
    declined: int
    errors: int
    bscans: list[dict[str, Any]] = Field(
        description="each B-scan's answer with its `frame`, as /predict answers one image; one that could not "
        "be decoded has status error and `error`"
    )
    bundle_version: str


class Routed(BaseModel):
    status: Literal["ok", "out_of_scope"] = Field(
        description="ok: at least one task answered; out_of_scope: no task's gate accepted the image"
    )
    answers: list[Prediction] = Field(
        description="one answer per task whose gate accepted the image (and, for DICOM, whose modality its header "
        "names), as POST /v1/{task}/predict gives it; a fundus photo can get glaucoma and ODIR answers"
    )
    reason: str = Field(description="out_of_scope: each task's verdict; empty otherwise")


class Explanation(Prediction):
    explained_class: str = Field(description="the class the heatmap explains")
    overlay_png: str = Field(description="base64 PNG: the Grad-CAM heatmap over the uploaded image, at its size")


class Problem(BaseModel):
    detail: str


# --------------------------------------------------------------------------- model deployment


@serve.deployment(max_ongoing_requests=64)
class TaskModel:
    """One bundle, loaded once per replica; concurrent requests become one model call."""

    def __init__(
        self,
        bundle_uri: str,
        version: str,
        tta: bool = False,
        review_below: float = DEFAULT_REVIEW_BELOW,
        jit_compile: bool = False,
        mixed_precision: bool = False,
        use_gate: bool = True,
    ):
        import threading

        from ray.util import metrics

        from eyeray.model import bundle
        from eyeray.model.devices import configure_gpus

        configure_gpus()  # before the model: replicas with fractional GPUs share one
        self.bundle = bundle.load(bundle_uri, jit_compile=jit_compile, mixed_precision=mixed_precision)
        if self.bundle.version != version:
            raise bundle.BundleError(
                f"{bundle_uri} changed since the application was built "
                f"({version} -> {self.bundle.version}): redeploy it"
            )
        bundle.verify(self.bundle)  # a first trace; `reconfigure` traces the other batch sizes
        self.task, self.tta, self.review_below = self.bundle.manifest["task"], tta, review_below
        self.use_gate = use_gate
        self.max_batch_size = MAX_BATCH_SIZE
        self._cam, self._cam_lock = None, threading.Lock()
        self.batch_sizes = metrics.Histogram(
            "eyeray_serve_batch_size", "Requests per model call.", boundaries=BATCH_BOUNDARIES, tag_keys=("task",)
        )
        self.model_seconds = metrics.Histogram(
            "eyeray_serve_model_seconds", "Seconds per model call.", boundaries=LATENCY_BOUNDARIES, tag_keys=("task",)
        )

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Batch size and wait time (`user_config`); the model is traced for every padded batch size
        up to the new maximum here, before the replica takes requests, not by the first requests."""
        self.max_batch_size = int(config.get("max_batch_size", MAX_BATCH_SIZE))
        self.predict.set_max_batch_size(self.max_batch_size)
        self.predict.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", BATCH_WAIT_TIMEOUT_S)))
        self.bundle.compiled.warm_up(self.max_batch_size)

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_TIMEOUT_S)
    async def predict(self, requests: list[tuple[np.ndarray, Any, tuple[int, int]]]) -> list[dict[str, Any]]:
        """(preprocessed uint8 image, threshold override or None, the original's (height, width)),
        one per request -> one answer each."""
        start = time.perf_counter()
        images = np.stack([image for image, _, _ in requests])
        sizes = [size for _, _, size in requests]
        probs, verdict = await asyncio.to_thread(self._infer, images, sizes)  # the loop keeps queueing
        self.model_seconds.observe(time.perf_counter() - start, tags={"task": self.task})
        self.batch_sizes.observe(len(requests), tags={"task": self.task})
        answers: list[dict[str, Any]] = [{} for _ in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, thresholds, _) in enumerate(requests):  # requests with the same override decide together
            groups.setdefault(json.dumps(thresholds, sort_keys=True), []).append(i)
        for rows in groups.values():
            decision = self.bundle.decide(probs[rows], requests[rows[0]][1], self.review_below, verdict.subset(rows))
            for j, i in enumerate(rows):
                answers[i] = self._answer(decision, j, len(requests))
        return answers

    def _infer(self, images: np.ndarray, sizes: list[tuple[int, int]]):
        """The model's probabilities and the gate's verdict (`Bundle.infer`, `Bundle.verdict`)."""
        probs, features = self.bundle.infer(images, self.max_batch_size, tta=self.tta)
        heights, widths = zip(*sizes)
        return probs, self.bundle.verdict(images, features, heights, widths, self.use_gate)

    async def explain(
        self, image: np.ndarray, class_name: str | None, thresholds: Any, size: tuple[int, int]
    ) -> tuple[dict[str, Any], np.ndarray]:
        """The answer for one image (its original `size`) plus the Grad-CAM heatmap (feature-map
        resolution) of its class."""
        return await asyncio.to_thread(self._explain, image, class_name, thresholds, size)

    def _explain(
        self, image: np.ndarray, class_name: str | None, thresholds: Any, size: tuple[int, int]
    ) -> tuple[dict[str, Any], np.ndarray]:
        from eyeray.model.gradcam import GradCam, explain_decision

        with self._cam_lock:  # built once per replica, on the first explain request
            if self._cam is None:
                self._cam = GradCam(self.bundle.model)
            decision, k, heatmap = explain_decision(
                self.bundle, self._cam, image, class_name, thresholds, self.tta, self.review_below, size, self.use_gate
            )
        return {**self._answer(decision, 0, 1), "explained_class": self.bundle.classes[k]}, heatmap

    def _answer(self, decision, i: int, batch_size: int) -> dict[str, Any]:
        return {
            "task": self.task,
            **decision.answer(i, self.bundle.classes),
            "bundle_version": self.bundle.version,
            "batch_size": batch_size,
        }


# --------------------------------------------------------------------------- HTTP ingress

app = FastAPI(
    title="eyeray",
    version=__version__,
    description="Retinal image classifiers (research use only; not a diagnosis). Post an image to "
    "`/v1/{task}/predict` as a multipart upload (`file`) or as the raw request body.",
)
REJECTIONS = {code: {"model": Problem} for code in (400, 401, 404, 413, 415, 422)}
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            MULTIPART: {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/dicom": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def read_token() -> str | None:
    """The bearer token from EYERAY_API_TOKEN or the file EYERAY_API_TOKEN_FILE names; None: no auth.
    A named file that is missing or empty is an error, so a broken secret never opens the API."""
    path = os.environ.get(TOKEN_FILE_ENV)
    if path:
        token = Path(path).read_text().strip()
        if not token:
            raise ValueError(f"{TOKEN_FILE_ENV}={path} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """Not the client's fault: 503 when a model replica failed (retry), else 500. JSON either way;
    the log names the type only, as messages of failed calls could quote request data."""
    logger.error(f"eyeray API: {type(exc).__name__} on {request.url.path}")
    if isinstance(exc, RayError):
        return JSONResponse({"detail": f"model unavailable ({type(exc).__name__}); retry"}, status_code=503)
    return JSONResponse({"detail": f"internal error ({type(exc).__name__})"}, status_code=500)


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A bad query parameter: 422 with one `detail` string, as the schema (`Problem`) says, instead
    of FastAPI's list of errors."""
    parts = [f"{' '.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()]
    return JSONResponse({"detail": "; ".join(parts)}, status_code=422)


def check_thresholds(manifest: dict[str, Any], text: str | None) -> Any:
    """Parse a threshold override and check the bundle can take it (a dry run of its decision)."""
    thresholds = operating_points.parse_thresholds(text)
    if thresholds is not None:
        classes = len(manifest["classes"])
        decide(manifest, np.full((1, classes), 1 / classes, np.float32), thresholds)
    return thresholds


def decode_upload(
    data: bytes, manifest: dict[str, Any], max_pixels: int, overlay: bool = True
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """The upload as decoded (for overlays) and as the bundle's model takes it: the manifest's
    `preprocessing` (resize size and method), as batch scoring applies it. The decoded-size limit is
    the stricter of the bundle's `preprocessing.max_pixels` and the service's `max_pixels`. Any
    decode failure is a 422 with the reason batch scoring writes in its rows (`imaging.decode_value`).
    `overlay=False` (a prediction only): a large JPEG is decoded only as large as the model input
    needs (`imaging.decode`'s `min_side`, as batch scoring decodes), and the first value is that.
    The third is the file's full (height, width): the gate's size check."""
    pre = manifest["preprocessing"]
    size = int(pre["resize"]["size"][0])
    limit = min(max_pixels, int(pre["max_pixels"]))
    original, reason, full = imaging.decode_with_size(data, limit, None if overlay else size)
    if original is None:
        raise HTTPException(422, reason)
    return original, imaging.preprocess(original, size, pre["resize"]["method"]), full


def frame_count(data: bytes, max_pixels: int) -> int:
    """Frames in a DICOM upload, from its header; 1 for any other upload or one that cannot be read
    (the one-image path then says what is wrong with it, as a 422)."""
    if not imaging.is_dicom(data):
        return 1
    try:
        return imaging.open_dicom(data, max_pixels).frames
    except Exception:
        return 1


def decode_volume(data: bytes, manifest: dict[str, Any], max_pixels: int) -> list[dict[str, Any]] | None:
    """A multi-frame DICOM upload (an OCT volume) as one preprocessed record per B-scan
    (`imaging.load_frames`, as batch scoring decodes it); None for any other upload (one image)."""
    pre = manifest["preprocessing"]
    limit = min(max_pixels, int(pre["max_pixels"]))
    if frame_count(data, limit) < 2:
        return None
    size = int(pre["resize"]["size"][0])
    return imaging.load_frames({"path": "upload", "bytes": data}, size, limit, method=pre["resize"]["method"])


THRESHOLDS_QUERY = Query(
    None,
    description="override the bundle's operating point: 0.3 (referral rules), "
    "0.3,0.4,... (one per label) or LABEL=0.3,LABEL=0.2",
)


class _InMemoryParser(MultiPartParser):
    spool_max_size = 2**62  # uploads stay in memory (bounded by max_body_bytes), never on disk


# `serve.ingress` serialises the app and this class as it decorates them, before the module has
# finished importing: whatever they use (functions, exception handlers) must be defined above.
@serve.deployment(max_ongoing_requests=256)
@serve.ingress(app)
class Api:
    """Routes, auth, body limits, decode + preprocess; scoring is awaited from the task's model."""

    def __init__(
        self,
        models: dict[str, Any],
        manifests: dict[str, dict],
        max_body_bytes: int,
        max_pixels: int,
        thresholds: dict[str, str] | None = None,
        gate_on: bool = True,
    ):
        from ray.util import metrics

        self.models, self.manifests, self.default_thresholds = models, manifests, dict(thresholds or {})
        self.gate_on = gate_on
        self.max_body_bytes, self.max_pixels = max_body_bytes, max_pixels  # max_pixels: caps each bundle's own
        self.token = read_token()
        if self.token is None:
            logger.warning(f"eyeray API without authentication: set {TOKEN_ENV} or {TOKEN_FILE_ENV} to require one")
        self.requests = metrics.Counter(
            "eyeray_serve_requests", "Prediction requests by outcome.", tag_keys=("task", "status", "label")
        )
        self.latency = metrics.Histogram(
            "eyeray_serve_request_seconds",
            "Seconds per prediction request.",
            boundaries=LATENCY_BOUNDARIES,
            tag_keys=("task", "status"),
        )

    @app.get("/healthz")
    def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "tasks": sorted(self.models)}

    @app.get("/v1/models", responses={401: {"model": Problem}})
    def list_models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return {"models": [{"task": task, "manifest": m} for task, m in sorted(self.manifests.items())]}

    @app.post(
        "/v1/{task}/predict",
        response_model=Prediction | VolumePrediction,
        responses=REJECTIONS,
        openapi_extra=UPLOAD_BODY,
    )
    async def predict(self, task: str, request: Request, thresholds: str | None = THRESHOLDS_QUERY) -> dict[str, Any]:
        return await self._answer(task, request, thresholds)

    @app.post("/v1/{task}/explain", response_model=Explanation, responses=REJECTIONS, openapi_extra=UPLOAD_BODY)
    async def explain(
        self,
        task: str,
        request: Request,
        thresholds: str | None = THRESHOLDS_QUERY,
        class_name: str | None = Query(
            None,
            alias="class",
            min_length=1,
            description="class to explain (default: the decided class the model is most sure of)",
        ),
        alpha: float = Query(0.5, ge=0, le=1, description="heatmap opacity where the heat is highest"),
    ) -> dict[str, Any]:
        return await self._answer(task, request, thresholds, explain=(class_name, alpha))

    @app.post(
        "/v1/route", response_model=Routed, responses={**REJECTIONS, 409: {"model": Problem}}, openapi_extra=UPLOAD_BODY
    )
    async def route(self, request: Request) -> dict[str, Any]:
        """A mixed archive's upload: every task's model scores it and the tasks whose gate accepts it
        answer (`eyeray.decision.gate.routes_to`, as `eyeray score` routes with several bundles)."""
        with self._counted("route") as outcome:
            self._authorize(request)
            without = [f"{t} {m['version']}" for t, m in sorted(self.manifests.items()) if not m.get("gate")]
            if not self.gate_on or without:
                why = "the service runs with the gate off" if not self.gate_on else f"{', '.join(without)} has none"
                raise HTTPException(409, f"routing sends an image to the tasks whose gate accepts it, and {why}")
            data = await self._read_image(request)
            if (frames := await run_in_threadpool(frame_count, data, self.max_pixels)) > 1:
                raise HTTPException(
                    422,
                    f"this upload is a volume of {frames} frames: /v1/{{task}}/predict answers volumes",
                )
            modality = await run_in_threadpool(imaging.dicom_modality, data)
            tasks = sorted(self.models)
            answers = await asyncio.gather(*(self._score(t, data) for t in tasks))
            routed = {t: bool(gate.routes_to(t, [a["gate"]["verdict"]], [modality])[0]) for t, a in zip(tasks, answers)}
            chosen = [a for t, a in zip(tasks, answers) if routed[t]]
            verdicts = {
                t: (a["gate"]["verdict"], a["gate"]["reason"], a["gate"]["score"]) for t, a in zip(tasks, answers)
            }
            outcome.update(status=200, label=",".join(t for t in tasks if routed[t]) or gate.OUT_OF_SCOPE)
            return {
                "status": "ok" if chosen else gate.OUT_OF_SCOPE,
                "answers": chosen,
                "reason": "" if chosen else gate.out_of_scope_reason(verdicts, modality),
            }

    @contextlib.contextmanager
    def _counted(self, task: str):
        """Count and time one request by its outcome (the metrics' status and label, set through the
        yielded dict on success; an HTTPException's code, or 503/500, on failure)."""
        start, outcome = time.perf_counter(), {"status": 500, "label": "-"}
        try:
            yield outcome
        except HTTPException as exc:
            outcome["status"] = exc.status_code
            raise
        except Exception as exc:
            outcome["status"] = 503 if isinstance(exc, RayError) else 500
            raise
        finally:
            tags = {"task": task, "status": str(outcome["status"])}
            self.requests.inc(tags={**tags, "label": outcome["label"]})
            self.latency.observe(time.perf_counter() - start, tags=tags)

    async def _score(self, task: str, data: bytes) -> dict[str, Any]:
        """One task's answer for an upload: decoded by its bundle's preprocessing, at its deployment's thresholds."""
        _, image, size = await run_in_threadpool(decode_upload, data, self.manifests[task], self.max_pixels, False)
        return await self.models[task].predict.remote((image, self._thresholds(task, None), size))

    async def _answer(
        self, task: str, request: Request, thresholds_text: str | None, explain: tuple[str | None, float] | None = None
    ) -> dict[str, Any]:
        """Auth, checks, decode + preprocess here; the model call (or Grad-CAM) in the task's replicas."""
        with self._counted(task if task in self.models else "unknown") as outcome:
            self._authorize(request)
            if task not in self.models:
                raise HTTPException(404, f"unknown task {task!r}; this service has: {', '.join(sorted(self.models))}")
            manifest = self.manifests[task]
            thresholds = self._thresholds(task, thresholds_text)
            if explain and explain[0] is not None and explain[0] not in manifest["classes"]:
                raise HTTPException(
                    422, f"class {explain[0]!r} is not a class of {task}: {', '.join(manifest['classes'])}"
                )
            data = await self._read_image(request)
            bscans = await run_in_threadpool(decode_volume, data, manifest, self.max_pixels)
            if bscans is not None:
                if explain is not None:
                    raise HTTPException(
                        422,
                        f"this upload is a volume of {bscans[0]['frames']} frames: /explain takes one image; "
                        "/predict answers the volume and names the B-scans behind its answer",
                    )
                answer = await self._volume(task, bscans, thresholds)
                outcome.update(status=200, label="|".join(answer["labels"]) or answer["status"])
                return answer
            original, image, size = await run_in_threadpool(
                decode_upload, data, manifest, self.max_pixels, overlay=explain is not None
            )
            if explain is None:
                answer = await self.models[task].predict.remote((image, thresholds, size))
            else:
                answer, heatmap = await self.models[task].explain.remote(image, explain[0], thresholds, size)
                png = await run_in_threadpool(overlay_png, original, heatmap, explain[1])
                answer["overlay_png"] = base64.b64encode(png).decode()
            label = "|".join(answer["labels"]) or ("declined" if answer["status"] == "declined" else "none")
            outcome.update(status=200, label=label)
            return answer

    async def _volume(self, task: str, bscans: list[dict[str, Any]], thresholds: Any) -> dict[str, Any]:
        """Each decoded B-scan scored as one image (the replicas batch them), one answer by the volume rule."""
        decoded = [b for b in bscans if not b["error"]]
        answers = await asyncio.gather(
            *(self.models[task].predict.remote((b["image"], thresholds, (b["height"], b["width"]))) for b in decoded)
        )
        by_frame = {b["frame"]: a for b, a in zip(decoded, answers)}
        scans = [
            {"frame": b["frame"], **by_frame[b["frame"]]}
            if not b["error"]
            else {"frame": b["frame"], "status": "error", "error": b["error"]}
            for b in bscans
        ]
        manifest = self.manifests[task]
        answer = volume.aggregate(
            [volume.from_answer(b["frame"], b) for b in scans], manifest.get("referral_classes") or ()
        )
        if answer.status == "error":
            raise HTTPException(422, f"no B-scan of this volume could be decoded: {answer.reason}")
        return {"task": task, **answer.answer(), "bscans": scans, "bundle_version": manifest["version"]}

    def _thresholds(self, task: str, text: str | None) -> Any:
        """The request's override, else the deployment's; checked against the bundle (422 if it cannot take it)."""
        text = text if text is not None else self.default_thresholds.get(task)
        try:
            return check_thresholds(self.manifests[task], text)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None

    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    async def _read_image(self, request: Request) -> bytes:
        """The upload's bytes: a multipart `file` field or the raw body, never more than the limit."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype and ctype != MULTIPART and ctype not in RAW_TYPES and not ctype.startswith("image/"):
            raise HTTPException(
                415,
                f"unsupported content type {ctype!r}: send multipart/form-data with a "
                "'file' field, or the image as the body (image/*, application/dicom, "
                "application/octet-stream)",
            )
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            raise self._too_large() if length.isdigit() else HTTPException(400, "invalid Content-Length")
        body = self._limited(request)
        if ctype == MULTIPART:
            data = await self._multipart_file(request, body)
        else:
            data = b"".join([chunk async for chunk in body])
        if not data:
            raise HTTPException(400, "empty body: no image bytes received")
        return data

    async def _limited(self, request: Request):
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > self.max_body_bytes:
                raise self._too_large()
            yield chunk

    async def _multipart_file(self, request: Request, body) -> bytes:
        parser = _InMemoryParser(request.headers, body, max_files=1, max_fields=10)
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise HTTPException(400, f"malformed multipart body: {exc.message}") from None
        try:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise HTTPException(400, "multipart upload needs a 'file' field holding the image")
            return await upload.read()
        finally:
            await form.close()

    def _too_large(self) -> HTTPException:
        return HTTPException(413, f"body larger than the limit of {self.max_body_bytes} bytes")


# --------------------------------------------------------------------------- application


def build_app(args: ServeArgs | dict[str, Any]) -> serve.Application:
    """Serve application builder (`import_path: eyeray.serve:build_app`): one model deployment
    per bundle, named after its task, bound into the ingress."""
    from eyeray.model import bundle

    args = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args)
    unknown = set(args.thresholds) - {bundle.read_manifest(uri)["task"] for uri in args.bundles}
    if unknown:
        raise ValueError(f"thresholds for tasks this application does not serve: {sorted(unknown)}")
    manifests: dict[str, dict] = {}
    models = {}
    for uri in args.bundles:
        manifest = bundle.read_manifest(uri)
        task = manifest["task"]
        if task in manifests:
            raise ValueError(f"two bundles for task {task!r}; serve one bundle per task")
        manifests[task] = {**manifest, "uri": uri}
        check_thresholds(manifest, args.thresholds.get(task))  # a bad override fails the deploy, not requests
        models[task] = TaskModel.options(
            name=task,
            autoscaling_config=args.autoscaling,
            ray_actor_options={"num_cpus": args.cpus_per_replica, "num_gpus": args.gpus_per_replica},
            user_config={"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s},
            max_ongoing_requests=max(64, 2 * args.max_batch_size),
        ).bind(uri, manifest["version"], args.tta, args.review_below, args.jit_compile, args.mixed_precision, args.gate)
    ingress_actor = {"num_cpus": args.ingress_cpus}
    if args.ingress_env:
        ingress_actor["runtime_env"] = {"env_vars": dict(args.ingress_env)}
    return Api.options(name=INGRESS, ray_actor_options=ingress_actor).bind(
        models, manifests, args.max_body_bytes, args.max_pixels, args.thresholds, args.gate
    )


def start(
    args: ServeArgs, *, host: str = "127.0.0.1", port: int = 8000, name: str = API_APP, route_prefix: str = "/"
) -> str:
    """Deploy the application on the current Ray cluster (or a new local one); returns its URL."""
    from eyeray import cluster

    cluster.connect()
    log.info(f"deploying {name} on Ray Serve, port {port}: ready once every replica has loaded its model")
    serve.start(http_options={"host": host, "port": port}, logging_config=cluster.serve_logging(controller=True))
    serve.run(build_app(args), name=name, route_prefix=route_prefix, logging_config=cluster.serve_logging())
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


def stop(name: str = API_APP) -> None:
    """Delete the application; shut Serve down when no other application is left."""
    serve.delete(name)
    if not serve.status().applications:
        serve.shutdown()


def run(args: ServeArgs, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """`eyeray serve`: serve until SIGINT or SIGTERM, then delete the application.

    The API token (variable or file name) is passed from this process's environment to the
    ingress replicas, which may run in another process tree (an existing cluster)."""
    from eyeray import storage

    env = {k: os.environ[k] for k in (TOKEN_ENV, TOKEN_FILE_ENV) if os.environ.get(k)}
    # Replicas do not share this shell's working directory: local bundle paths become absolute.
    bundles = [uri if storage.is_remote(uri) else str(Path(uri).resolve()) for uri in args.bundles]
    url = start(
        args.model_copy(update={"bundles": bundles, "ingress_env": {**env, **args.ingress_env}}), host=host, port=port
    )
    log.info(f"serving at {url} (OpenAPI docs: {url}/docs); Ctrl-C or SIGTERM stops")
    signal.signal(signal.SIGTERM, _interrupt)  # a background `eyeray serve` ignores SIGINT
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        stop()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


# --------------------------------------------------------------------------- demo


def demo(bundle_uri: str, images: list[Path], port: int = 8000, route_prefix: str = "/") -> list[dict[str, Any]]:
    """Start the service on `bundle_uri`, post each image as the raw body, print and return the
    answers (with `file` and `status` added), then shut the application down."""
    import json
    import urllib.error
    import urllib.request

    from eyeray.model import bundle

    task = bundle.read_manifest(bundle_uri)["task"]
    url = start(ServeArgs(bundles=[bundle_uri]), port=port, name="eyeray-demo", route_prefix=route_prefix)
    answers = []
    try:
        for path in images:
            req = urllib.request.Request(
                f"{url}/v1/{task}/predict",
                data=Path(path).read_bytes(),
                method="POST",
                headers={"Content-Type": "application/octet-stream"},
            )
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    status, body = resp.status, json.load(resp)
            except urllib.error.HTTPError as exc:
                status, body = exc.code, json.load(exc)
            answers.append({**body, "file": Path(path).name, "status": status})  # status: the HTTP one
            declined = body.get("status") == "declined"
            shown = f"declined: {body['gate']['reason']}" if declined else body.get("labels", body.get("detail"))
            log.info(f"POST {Path(path).name} -> {status} {shown}")
    finally:
        stop("eyeray-demo")
    return answers
