"""Shared fixtures: the real samples (the EYERAY_SAMPLES setting), and one local Ray cluster per session."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# Loopback only. Ray otherwise swaps 127.0.0.1 for the machine's network address; this switch
# (Ray's single-machine mode) keeps every Ray, gRPC and TF collective socket on 127.0.0.1. Ray reads
# it at import time, so it is set before any test module imports Ray.
RAY_TEST_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
os.environ.update(RAY_TEST_ENV)

# The real samples: the folder the EYERAY_SAMPLES setting names (tests/samples.py, docs/testing.md).
import samples  # noqa: E402


def _sample(name: str) -> Path:
    """A real sample folder; a test that needs one that is absent is skipped, saying how to get it."""
    path = samples.SAMPLES / name
    if not path.is_dir():
        pytest.skip(samples.missing(name))
    return path


@pytest.fixture(scope="session")
def oct_sample() -> Path:
    return _sample("oct-sample")


@pytest.fixture(scope="session")
def oct_train() -> Path:
    return _sample("oct-train")


@pytest.fixture(scope="session")
def real_vgg16_weights(tmp_path_factory) -> str:
    """A real pretrained VGG16 backbone weights file (HED's conv layers, bench/hed_vgg16.py),
    for tests that need what ImageNet-like features do to training, through `--weights PATH`. Made by
    the script itself (the tests import no bench module)."""
    repo = Path(__file__).resolve().parents[1]
    dest = tmp_path_factory.mktemp("weights") / "vgg16_hed.weights.h5"
    subprocess.run([sys.executable, str(repo / "bench" / "hed_vgg16.py"), str(dest)], check=True, timeout=300)
    return str(dest)


@pytest.fixture(scope="session")
def glaucoma_sample() -> Path:
    return _sample("glaucoma-sample")


@pytest.fixture(scope="session")
def odir_sample() -> Path:
    return _sample("odir-sample")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's server) on 127.0.0.1 for the whole session. Its endpoint and dummy
    credentials go into the environment before the Ray cluster starts, so Ray workers, s3fs and
    pyarrow all reach it the way a cluster reaches MinIO."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    for key in ("EYERAY_S3_ENDPOINT", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(key, None)
    try:
        yield os.environ["AWS_ENDPOINT_URL"]
    finally:
        server.stop()
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


S3_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "EYERAY_S3_ENDPOINT",
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
)


@pytest.fixture(scope="session")
def ray_cluster(s3_server, tmp_path_factory):
    """One real local Ray cluster (`ray start --head` on 127.0.0.1, with the dashboard for job
    submission) shared by every test that needs Ray; this process connects to it as a driver.

    Every port is a free one and the session directory is private, and teardown stops only this
    cluster's processes (never `ray stop`, which would take down any other Ray on the machine)."""
    import ray

    port, dashboard_port = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    # RAY_ADDRESS for every process of the cluster: Ray's own helpers inside workers (Train's
    # PlacementGroupCleaner, the state API) otherwise fail with "Found multiple active Ray
    # instances" while another private cluster runs on the same machine, and a stopped Ray Train
    # run (a Tune trial cut by ASHA) then keeps its placement group's CPUs forever.
    env = {**os.environ, **RAY_TEST_ENV, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    head_args = [
        "--head",
        f"--port={port}",
        "--num-cpus=2",
        "--num-gpus=2",  # logical GPUs: --use-gpu runs its real code path (TF falls back to the CPU)
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={free_port()}",
    ]
    address = f"127.0.0.1:{port}"
    try:
        start_node(head_args, temp_dir, env)
        os.environ["RAY_ADDRESS"] = address
        ray.init(address=address, log_to_driver=False)
        _wait_for_job_agent(f"http://127.0.0.1:{dashboard_port}")
        yield {
            "address": address,
            "dashboard": f"http://127.0.0.1:{dashboard_port}",
            "env": {**env, "RAY_ADDRESS": address},
            "temp_dir": temp_dir,
        }
    finally:
        ray.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
        stop_cluster(temp_dir, address)
        shutil.rmtree(temp_dir, ignore_errors=True)


# `ray start --address` refuses to add a node while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (its "multi-node
# clusters are not supported on Windows and OSX" guard), and that switch is what keeps every socket on
# loopback here. A joining node therefore runs the same `ray start` with only that CLI guard lifted:
# its own processes still see =0, so they, too, stay on 127.0.0.1. Real clusters need none of this.
_JOIN_NODE = (
    "import sys, types, ray._private.ray_constants as c; from ray.scripts import scripts; "
    "scripts.ray_constants = types.SimpleNamespace(**{**vars(c), 'ENABLE_RAY_CLUSTER': True}); "
    "sys.argv[0] = 'ray'; scripts.main()"
)


def start_node(args: list[str], temp_dir: str, env: dict[str, str]) -> None:
    """`ray start` one node of a private local cluster: on 127.0.0.1, its own free ports for every
    agent and exporter, its own session directory. `args` say which node: `--head --port=...`, or
    `--address=HEAD` for one more node of that cluster on this machine."""
    joining = any(arg.startswith("--address") for arg in args)
    cmd = [
        *([sys.executable, "-c", _JOIN_NODE] if joining else ["ray"]),
        "start",
        "--node-ip-address=127.0.0.1",
        *args,
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"ray start {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


@contextlib.contextmanager
def private_local_ray(home: Path, strip: tuple[str, ...] = ()):
    """The environment of a subprocess that starts a local Ray of its own, as on a user's fresh
    machine: its own HOME, nothing of Ray's or eyeray's exported (nor the `strip` prefixes), loopback
    only, a short session folder (Ray's socket paths must fit in 107 bytes). Afterwards that Ray's
    processes are stopped, should the subprocess not have shut it down."""
    ray_tmp = tempfile.mkdtemp(prefix="rl-", dir="/tmp")
    drop = ("RAY_AUTH", "RAY_ADDRESS", "EYERAY_", *strip)
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(HOME=str(home), RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    try:
        yield env
    finally:
        stop_cluster(ray_tmp, "no-such-address")
        shutil.rmtree(ray_tmp, ignore_errors=True)


def stop_cluster(temp_dir: str, address: str) -> None:
    """Kill the processes of one local cluster: those naming its session directory or address
    (GCS, raylet, dashboard, monitors, client server) and everything they started (workers, agents)."""
    import psutil

    roots = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if proc.pid != os.getpid() and (temp_dir in cmdline or f"--address={address}" in cmdline):
            roots.append(proc)
    doomed = {p.pid: p for root in roots for p in [root, *_descendants(root)]}
    for proc in doomed.values():
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(list(doomed.values()), timeout=30)


def _descendants(proc):
    import psutil

    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def _wait_for_job_agent(dashboard: str, timeout_s: float = 90.0) -> None:
    """The dashboard answers before its job agent has registered ("No available agent to submit
    job"): wait until a trivial job has run, so job-submission tests start on a ready cluster."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(dashboard)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            job = client.submit_job(entrypoint="python -c pass")
            break
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.monotonic() > deadline:
            raise TimeoutError("the warm-up job did not finish")
        time.sleep(0.5)


@pytest.fixture(scope="module", autouse=True)
def cluster_released_after_module(request):
    """Every module that used the session cluster hands it back whole: what its tests started
    (Serve replicas, Train workers, Data actors) is gone within a minute of its last test. A test
    that leaks a GPU or CPU otherwise stalls a later module's training until its timeout."""
    import ray

    yield
    if not ray.is_initialized():  # no module has started the session cluster yet
        return
    held = wait_until_idle(timeout_s=60)
    if held:
        pytest.fail(f"{request.module.__name__} left the session cluster's resources held: {held}")


@pytest.fixture(autouse=True)
def no_mixed_precision_rewrite_in_the_test_process(request):
    """TensorFlow's mixed-precision rewrite (`eyeray.model.compiled.enable_mixed_precision`) is
    process-wide and cannot be undone for graphs already run: a test that turns it on in pytest's
    own process moves every later in-process prediction (by ~5e-5 in bfloat16 on tiny models) and
    fails tests far away. Tests of it run in child processes or Ray actors; this names the one that did not."""
    yield
    if "tensorflow" not in sys.modules:
        return
    import tensorflow as tf

    from eyeray.model.compiled import GRAPPLER_REWRITES

    options = tf.config.optimizer.get_experimental_options()
    on = [name for name in GRAPPLER_REWRITES.values() if options.get(name)]
    if on:
        pytest.fail(f"{request.node.nodeid} turned on {on} in the test process (see this fixture's docstring)")


def wait_until_idle(timeout_s: float) -> list[str]:
    """Wait until every CPU and GPU of the connected cluster is free; else name what holds them
    (live actors with resources, placement groups not removed)."""
    import ray
    from ray.util.state import list_actors, list_placement_groups

    deadline = time.monotonic() + timeout_s
    while True:
        total, free = ray.cluster_resources(), ray.available_resources()
        short = {k: total[k] - free.get(k, 0) for k in ("CPU", "GPU") if total.get(k, 0) - free.get(k, 0) > 1e-6}
        if not short:
            return []
        if time.monotonic() > deadline:
            break
        time.sleep(1)
    actors = [
        f"{a.class_name} {a.required_resources} pid={a.pid}"
        for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True)
        if a.required_resources
    ]
    groups = [
        f"placement group {g.placement_group_id} {g.bundles}"
        for g in list_placement_groups(detail=True)
        if g.state != "REMOVED"
    ]
    return [f"held {short}", *actors, *groups]
