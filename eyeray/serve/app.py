"""The application: its arguments, the builder Serve imports, and `eyeray serve` (deploy, serve until
a signal, delete).

One application: an ingress deployment (`api`, `eyeray.serve.ingress`) and one model deployment per
bundle, named after its task (`oct`, `glaucoma`, `odir`, `eyeray.serve.model`), so each task scales
on its own. Answers are those of batch scoring: calibrated probabilities, the labels and referral at
the bundle's operating point (`?thresholds=` overrides it per request, `thresholds:` per
deployment), a confidence and `needs_review`.

    serve run jobs/serve_config.yaml            # Ray's own tools, bundles as application args
    eyeray serve --bundle runs/oct-1/bundle     # the same application from the command line
"""

# No `from __future__ import annotations`: pydantic reads ServeArgs' annotations at run time.
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from eyeray.data import imaging
from eyeray.decision.options import DecisionOptions
from eyeray.model.options import InferenceOptions
from eyeray.serve.ingress import TOKEN_ENV, TOKEN_FILE_ENV, Api
from eyeray.serve.inputs import check_thresholds
from eyeray.serve.model import BATCH_WAIT_TIMEOUT_S, MAX_BATCH_SIZE, TaskModel

log = logging.getLogger(__name__)

API_APP = "eyeray"  # the application's name in `serve status` and the config file
INGRESS = "api"  # the ingress deployment's name (model deployments are named after their task)


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
    decision: DecisionOptions = Field(
        default_factory=DecisionOptions,
        description="thresholds (every task's override), review_below and gate, as for score "
        "(eyeray.decision.options); requests may override the thresholds",
    )
    inference: InferenceOptions = Field(
        default_factory=InferenceOptions,
        description="tta, jit_compile and mixed_precision, as for score (eyeray.model.options)",
    )
    thresholds: dict[str, str] = Field(
        default_factory=dict, description="task -> operating-point override, over decision.thresholds"
    )

    def task_decision(self, task: str) -> DecisionOptions:
        """The decision options of one task's deployment: its own override, else every task's."""
        return self.decision.with_thresholds(self.thresholds.get(task, self.decision.thresholds))


def build_app(args: ServeArgs | dict[str, Any]) -> serve.Application:
    """Serve application builder (`import_path: eyeray.serve:build_app`): one model deployment
    per bundle, named after its task, bound into the ingress."""
    from eyeray.model import bundle

    args = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args)
    unknown = set(args.thresholds) - {bundle.read_manifest(uri)["task"] for uri in args.bundles}
    if unknown:
        raise ValueError(f"thresholds for tasks this application does not serve: {sorted(unknown)}")
    manifests: dict[str, dict] = {}
    models, decisions = {}, {}
    for uri in args.bundles:
        manifest = bundle.read_manifest(uri)
        task = manifest["task"]
        if task in manifests:
            raise ValueError(f"two bundles for task {task!r}; serve one bundle per task")
        manifests[task] = {**manifest, "uri": uri}
        decisions[task] = args.task_decision(task)
        check_thresholds(manifest, decisions[task].thresholds)  # a bad override fails the deploy, not requests
        models[task] = TaskModel.options(
            name=task,
            autoscaling_config=args.autoscaling,
            ray_actor_options={"num_cpus": args.cpus_per_replica, "num_gpus": args.gpus_per_replica},
            user_config={"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s},
            max_ongoing_requests=max(64, 2 * args.max_batch_size),
        ).bind(uri, manifest["version"], decisions[task], args.inference)
    ingress_actor = {"num_cpus": args.ingress_cpus}
    if args.ingress_env:
        ingress_actor["runtime_env"] = {"env_vars": dict(args.ingress_env)}
    return Api.options(name=INGRESS, ray_actor_options=ingress_actor).bind(
        models, manifests, args.max_body_bytes, args.max_pixels, decisions
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
