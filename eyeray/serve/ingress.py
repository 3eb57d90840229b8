"""The HTTP ingress (`api`): FastAPI routes, auth, body limits, decode and preprocess; each task's
scoring is awaited from its model deployment (`eyeray.serve.model`).

`POST /v1/{task}/explain` draws the Grad-CAM overlay here from the replica's small heatmap, so no
full-size image travels to the model. Bad requests are values: every one gets a 4xx with
`{"detail": reason}` and the replica carries on. Nothing from a request body (pixels, file names)
is logged. The OpenAPI document is the application's own (`eyeray.serve.openapi`): one path per
served task, each task's classes, and the bearer token where one is required.
"""

# No `from __future__ import annotations`: FastAPI and Serve read these annotations at run time,
# in replicas that receive the routes serialised by value.
import asyncio
import base64
import contextlib
import hmac
import logging
import os
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.concurrency import run_in_threadpool

from eyeray import __version__
from eyeray.data import imaging
from eyeray.decision import gate, volume
from eyeray.decision.options import DecisionOptions
from eyeray.model.overlay import ALPHA_HELP, DEFAULT_ALPHA, overlay_png
from eyeray.serve import openapi
from eyeray.serve.inputs import MULTIPART, check_thresholds, decode_upload, decode_volume, frame_count, read_image
from eyeray.serve.model import LATENCY_BOUNDARIES
from eyeray.serve.schemas import Explanation, Prediction, Problem, Routed, VolumePrediction

logger = logging.getLogger("ray.serve")  # inside replicas: Serve writes it to the replica logs

TOKEN_ENV = "EYERAY_API_TOKEN"
TOKEN_FILE_ENV = "EYERAY_API_TOKEN_FILE"
UNAVAILABLE = (RayError, BackPressureError, DeploymentUnavailableError)  # a model replica failed or is full: 503

app = FastAPI(
    title="eyeray",
    version=__version__,
    description="Retinal image classifiers (research use only; not a diagnosis). Post an image to "
    "`/v1/{task}/predict` as a multipart upload (`file`) or as the raw request body.",
)
UNAUTHORIZED = {
    "model": Problem,
    "description": "missing or wrong bearer token",
    "headers": {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
}
FAILURES = {
    500: {"model": Problem, "description": "internal error"},
    503: {"model": Problem, "description": "a model replica failed or is overloaded: retry"},
}
REJECTIONS = {
    400: {"model": Problem, "description": "empty body, malformed multipart or no 'file' field"},
    401: UNAUTHORIZED,
    413: {"model": Problem, "description": "body larger than the service's limit"},
    415: {"model": Problem, "description": "not multipart/form-data, image/*, application/dicom or octet-stream"},
    422: {"model": Problem, "description": "an invalid parameter, or an upload that does not decode to an image"},
    **FAILURES,
}
UNROUTABLE = {"model": Problem, "description": "a served bundle has no gate, or the service runs with the gate off"}
TASK_REJECTIONS = {**REJECTIONS, 404: {"model": Problem, "description": "a task this service does not serve"}}
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
    """Not the client's fault: 500, JSON as the schema says (a failed model call is a 503 already,
    `Api._counted`). The log names the type only, as messages of failed calls could quote request data."""
    logger.error(f"eyeray API: {type(exc).__name__} on {request.url.path}")
    return JSONResponse({"detail": f"internal error ({type(exc).__name__})"}, status_code=500)


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A bad query parameter: 422 with one `detail` string, as the schema (`Problem`) says, instead
    of FastAPI's list of errors."""
    parts = [f"{' '.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()]
    return JSONResponse({"detail": "; ".join(parts)}, status_code=422)


THRESHOLDS_QUERY = Query(
    None,
    description="override the bundle's operating point: 0.3 (referral rules), "
    "0.3,0.4,... (one per label) or LABEL=0.3,LABEL=0.2",
)


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
        decisions: dict[str, DecisionOptions] | None = None,
    ):
        from ray.util import metrics

        self.models, self.manifests = models, manifests
        self.decisions = decisions or {task: DecisionOptions() for task in manifests}  # each task's deployment's
        self.gate_on = all(d.gate for d in self.decisions.values())
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

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve calls this on each replica after `__init__`: the routes' app, its OpenAPI document
        made for this application's tasks and auth (FastAPI's own knows neither)."""
        self.app.openapi_schema = openapi.for_tasks(self.app.openapi(), self.manifests, self.token is not None)
        return self.app

    @app.get("/healthz")
    def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "tasks": sorted(self.models)}

    @app.get("/v1/models", responses={401: UNAUTHORIZED, 500: FAILURES[500]})
    def list_models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return {"models": [{"task": task, "manifest": m} for task, m in sorted(self.manifests.items())]}

    @app.post(
        "/v1/{task}/predict",
        response_model=Prediction | VolumePrediction,
        responses=TASK_REJECTIONS,
        openapi_extra=UPLOAD_BODY,
    )
    async def predict(self, task: str, request: Request, thresholds: str | None = THRESHOLDS_QUERY) -> dict[str, Any]:
        return await self._answer(task, request, thresholds)

    @app.post("/v1/{task}/explain", response_model=Explanation, responses=TASK_REJECTIONS, openapi_extra=UPLOAD_BODY)
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
        alpha: float = Query(DEFAULT_ALPHA, ge=0, le=1, description=ALPHA_HELP),
    ) -> dict[str, Any]:
        return await self._answer(task, request, thresholds, explain=(class_name, alpha))

    @app.post("/v1/route", response_model=Routed, responses={**REJECTIONS, 409: UNROUTABLE}, openapi_extra=UPLOAD_BODY)
    async def route(self, request: Request) -> dict[str, Any]:
        """A mixed archive's upload: every task's model scores it and the tasks whose gate accepts it
        answer (`eyeray.decision.gate.routes_to`, as `eyeray score` routes with several bundles)."""
        with self._counted("route") as outcome:
            self._authorize(request)
            without = [f"{t} {m['version']}" for t, m in sorted(self.manifests.items()) if not m.get("gate")]
            if not self.gate_on or without:
                why = "the service runs with the gate off" if not self.gate_on else f"{', '.join(without)} has none"
                raise HTTPException(409, f"routing sends an image to the tasks whose gate accepts it, and {why}")
            data = await read_image(request, self.max_body_bytes)
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
        except UNAVAILABLE as exc:  # JSON as documented (Serve's own handler would answer in plain text)
            outcome["status"] = 503
            logger.error(f"eyeray API: {type(exc).__name__} on {task}")  # the type only, as `_unexpected` logs
            raise HTTPException(503, f"model unavailable ({type(exc).__name__}); retry") from exc
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
            data = await read_image(request, self.max_body_bytes)
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
        text = text if text is not None else self.decisions[task].thresholds
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
