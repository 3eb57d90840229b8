"""The token-auth trap (Ray >= 2.59, STACK-NOTES "Authentication trap"), closed: on one machine, a
local Ray the way `eyeray demo` starts it, then the README's quick start for a local cluster
(`ray start --head`, then `ray job submit`) works as written; and eyeray, connecting to a cluster
that asks for a token it does not have, says what to export.

Every process runs with HOME in a temp folder (so ~/.ray/auth_token is the test's own), on
127.0.0.1 with free ports and a private session folder; teardown stops only these clusters."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import free_port, private_local_ray, start_node, stop_cluster

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.cluster

# `eyeray demo` and every route start Ray through eyeray.cluster.connect
DEMO_STYLE_INIT = (
    "from eyeray.log import setup; setup(); from eyeray import cluster; cluster.connect(); import ray; ray.shutdown()"
)
PLAIN_INIT = "import ray; ray.init(); ray.shutdown()"  # any other Ray program on the machine
CONNECT = """
from eyeray.log import setup; setup(); from eyeray import cluster
try:
    cluster.connect()
except cluster.ClusterError as e:
    print("ClusterError:", e); raise SystemExit(3)
import ray; print("connected", ray.cluster_resources().get("CPU")); ray.shutdown()
"""


@pytest.fixture
def machine(tmp_path):
    """A user's shell on a fresh machine: its own HOME, nothing of Ray's exported."""
    home = tmp_path / "home"
    home.mkdir()
    clusters: list[tuple[str, str]] = []
    with private_local_ray(home) as env:  # loopback only; RAY_TMPDIR: the local ray.init's session folder
        try:
            yield {"home": home, "env": env, "clusters": clusters}
        finally:
            for temp_dir, address in clusters:
                stop_cluster(temp_dir, address)
                shutil.rmtree(temp_dir, ignore_errors=True)


def python(code: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def ray_start_head(machine) -> tuple[str, str]:
    """`ray start --head --include-dashboard=true` (README), on free loopback ports."""
    port, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    address = f"127.0.0.1:{port}"
    machine["clusters"].append((temp_dir, address))
    start_node(
        [
            "--head",
            f"--port={port}",
            "--num-cpus=1",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={free_port()}",
        ],
        temp_dir,
        machine["env"],
    )
    return address, f"http://127.0.0.1:{dashboard}"


def job_submit(dashboard: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The README's `ray job submit --working-dir . -- python jobs/train_oct.py ...` (its address:
    RAY_ADDRESS, as `ray start` prints; `--help`, so the job itself takes seconds)."""
    cmd = ["ray", "job", "submit", "--working-dir", ".", "--", "python", "jobs/train_oct.py", "--help"]
    return subprocess.run(
        cmd, cwd=REPO, env={**env, "RAY_ADDRESS": dashboard}, capture_output=True, text=True, timeout=300
    )


def test_quick_start_works_as_written_after_the_demo(machine):
    """The demo's local Ray leaves no ~/.ray/auth_token, so the quick start needs no export."""
    env = machine["env"]
    proc = python(DEMO_STYLE_INIT, env, machine["home"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (machine["home"] / ".ray" / "auth_token").exists()

    _, dashboard = ray_start_head(machine)
    proc = job_submit(dashboard, env)
    assert proc.returncode == 0 and "succeeded" in proc.stdout.lower(), proc.stdout[-3000:] + proc.stderr[-3000:]


def test_with_a_token_on_the_machine_export_ray_auth_mode_token(machine):
    """Another Ray program wrote ~/.ray/auth_token, so `ray start --head` turns token auth on: with
    RAY_AUTH_MODE=token exported (the README's line for that case) the quick start works, and
    eyeray without it says what to export instead of a traceback."""
    env = machine["env"]
    proc = python(PLAIN_INIT, env, machine["home"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (machine["home"] / ".ray" / "auth_token").is_file()  # the trap is set

    token_env = {**env, "RAY_AUTH_MODE": "token"}
    address, dashboard = ray_start_head({**machine, "env": token_env})
    proc = job_submit(dashboard, token_env)
    assert proc.returncode == 0 and "succeeded" in proc.stdout.lower(), proc.stdout[-3000:] + proc.stderr[-3000:]

    proc = python(CONNECT, {**env, "RAY_ADDRESS": address}, machine["home"])  # no RAY_AUTH_MODE
    assert proc.returncode == 3 and "export RAY_AUTH_MODE=token" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    proc = python(CONNECT, {**token_env, "RAY_ADDRESS": address}, machine["home"])
    assert proc.returncode == 0 and "connected" in proc.stdout, proc.stdout + proc.stderr[-3000:]


def test_an_address_nobody_answers_at_is_one_line(machine):
    env = {**machine["env"], "RAY_ADDRESS": f"127.0.0.1:{free_port()}"}
    proc = python(CONNECT, env, machine["home"])
    assert proc.returncode == 3 and "no Ray cluster answers at RAY_ADDRESS" in proc.stdout, (
        proc.stdout + proc.stderr[-3000:]
    )
