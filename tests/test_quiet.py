"""Quiet by default (issue 14): eyeray.log's quiet mode, eyeray.cluster's runtime_env, token and
connection errors, and the one line per training epoch. Fast: no cluster, except one short
subprocess that starts a local Ray the way every route does and counts what it prints."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
from conftest import private_local_ray

from eyeray import cluster, log
from eyeray.train.progress import epoch_line

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_logging(monkeypatch):
    """setup() changes this process's environment, loggers, warning filters and import hooks: undo."""
    for key in (log.VERBOSE_ENV, *log.QUIET_ENV):
        monkeypatch.delenv(key, raising=False)
    levels = {name: logging.getLogger(name).level for name in ("", log.NAME, *log.QUIET_LOGGERS)}
    meta_path = list(sys.meta_path)
    with warnings.catch_warnings():
        yield
    sys.meta_path[:] = meta_path
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_quiet_by_default_and_verbose_restores(clean_logging):
    logger = log.setup()
    assert os.environ[log.VERBOSE_ENV] == "0" and not log.is_verbose()
    assert logger.level == logging.INFO
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3" and os.environ["RAY_DATA_LOG_LEVEL"] == "WARNING"
    assert logging.getLogger("tensorflow").level == logging.WARNING
    assert any(type(f).__name__ == "_SilentImport" for f in sys.meta_path)
    log.setup()
    assert sum(type(f).__name__ == "_SilentImport" for f in sys.meta_path) == 1  # idempotent

    logger = log.setup(verbose=True)
    assert os.environ[log.VERBOSE_ENV] == "1" and log.is_verbose() and logger.level == logging.DEBUG
    assert log.setup(verbose=None).level == logging.DEBUG  # a Ray worker follows the driver's -v


def test_worker_runtime_env_quiet_or_verbose(monkeypatch):
    monkeypatch.delenv(cluster.JOB_CONFIG_ENV, raising=False)
    quiet = cluster.runtime_env(verbose=False)
    assert quiet["env_vars"]["TF_CPP_MIN_LOG_LEVEL"] == "3" and quiet["env_vars"][log.VERBOSE_ENV] == "0"
    assert quiet["worker_process_setup_hook"] == "eyeray.log.quiet_worker"
    verbose = cluster.runtime_env(verbose=True)
    assert verbose["env_vars"] == {log.VERBOSE_ENV: "1"}  # -v: every library at its own default
    assert cluster.serve_logging(False) == {"log_level": "WARNING", "enable_access_log": False}
    assert cluster.serve_logging(True)["log_level"] == "INFO"
    assert cluster.train_logging(False).log_level == "WARNING" and cluster.train_logging(True).log_level == "INFO"


def test_runtime_env_leaves_out_what_a_submitted_job_sets(monkeypatch):
    """Ray refuses to merge a job's runtime_env with ray.init's when a key is given twice."""
    job = {"runtime_env": {"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "0"}, "worker_process_setup_hook": "x.y"}}
    monkeypatch.setenv(cluster.JOB_CONFIG_ENV, json.dumps(job))
    env = cluster.runtime_env(verbose=False)
    assert "TF_CPP_MIN_LOG_LEVEL" not in env["env_vars"] and log.VERBOSE_ENV in env["env_vars"]
    assert "worker_process_setup_hook" not in env


@pytest.fixture
def fresh_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for key in (cluster.AUTH_MODE_ENV, cluster.AUTH_TOKEN_ENV, cluster.AUTH_TOKEN_PATH_ENV):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(cluster, "_reload_ray_config", lambda: None)  # this process's Ray stays as it is
    return tmp_path


def test_local_ray_gets_a_private_token_instead_of_writing_home(fresh_home):
    assert cluster.private_local_token()
    assert os.environ[cluster.AUTH_MODE_ENV] == "token" and len(os.environ[cluster.AUTH_TOKEN_ENV]) == 32
    assert not (fresh_home / ".ray").exists()


def test_existing_token_file_or_explicit_mode_is_respected(fresh_home, monkeypatch):
    (fresh_home / ".ray").mkdir()
    (fresh_home / ".ray" / "auth_token").write_text("abc")
    assert not cluster.private_local_token()
    assert os.environ[cluster.AUTH_MODE_ENV] == "token" and cluster.AUTH_TOKEN_ENV not in os.environ
    monkeypatch.setenv(cluster.AUTH_MODE_ENV, "disabled")
    assert not cluster.private_local_token() and os.environ[cluster.AUTH_MODE_ENV] == "disabled"


def test_token_and_address_failures_say_what_to_export():
    from ray.exceptions import AuthenticationError

    error = cluster._connection_error(AuthenticationError("Authentication token is missing"), "127.0.0.1:1")
    assert isinstance(error, cluster.ClusterError) and "export RAY_AUTH_MODE=token" in str(error)
    assert "\n" not in str(error)
    error = cluster._connection_error(ConnectionError("GCS did not answer"), "10.0.0.9:6379")
    assert isinstance(error, cluster.ClusterError) and "RAY_ADDRESS=10.0.0.9:6379" in str(error)
    other = RuntimeError("something else")
    assert cluster._connection_error(other, None) is other


def test_epoch_line():
    metrics = {
        "epoch": 3,
        "phase": "head",
        "loss": 0.5234,
        "val_loss": 0.481,
        "val_macro_f1": 0.8123,
        "images_per_s": 61.4,
        "workers": 2,
    }
    line = epoch_line(metrics, 15, "macro_f1", eta_s=95)
    assert line == "epoch 3/15 head: loss 0.523, val_loss 0.481, val_macro_f1 0.812, 61 img/s, ETA 1:35"
    assert "ETA" not in epoch_line({**metrics, "val_macro_f1": None}, 15, "macro_f1", None)
    later = epoch_line(metrics, 15, "macro_f1", eta_s=2, untimed="10 fine_tune epochs")
    assert later.endswith(", ETA 0:02 + 10 fine_tune epochs not timed yet")


def test_the_eta_is_per_phase_and_names_the_phases_it_cannot_time_yet():
    """A head epoch on cached features takes a second and a fine-tuning epoch minutes: the head's
    pace must not stand for the fine-tuning's (a real run printed "ETA 0:18" with 10 minutes to go)."""
    from eyeray.train.progress import EpochLog

    two_phase = EpochLog([("head", 10), ("fine_tune", 10)], "macro_f1")
    assert two_phase.total_epochs == 20
    assert two_phase.remaining("head", 4, 1.0) == (6.0, "10 fine_tune epochs")
    assert two_phase.remaining("head", 10, 1.0) == (0.0, "10 fine_tune epochs")
    assert two_phase.remaining("fine_tune", 12, 60.0) == (480.0, "")
    assert EpochLog([("head", 3), ("fine_tune", 1)], "f1").remaining("head", 1, 2.0) == (4.0, "1 fine_tune epoch")
    assert EpochLog([("full", 15)], "macro_f1").remaining("full", 5, 3.0) == (30.0, "")


QUIET_PROBE = """
import logging, sys, ray
from eyeray.log import setup
from eyeray import cluster
setup(verbose=VERBOSE)
cluster.connect()

@ray.remote
def work():
    import tensorflow as tf
    logging.getLogger("ray").info("ray info line from a worker")
    logging.getLogger("eyeray.probe").info("eyeray line from a worker")
    return int(tf.constant(2) * 2)

assert ray.get(work.remote()) == 4

@ray.remote(max_retries=1, retry_exceptions=True)
def fails_once(marker):  # Ray retries it: its "retries remaining" line is Ray's, not the user's
    import os
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError("the first try fails")
    return 1

assert ray.get(fails_once.remote("retried.marker")) == 1
logging.getLogger("eyeray.probe").info("done")
sys.stdin.readline()  # the test says when it has read the worker's line (Ray forwards it asynchronously)
ray.shutdown()
"""


WORKER_LINE = "eyeray line from a worker"


def _run_probe(script: str, env: dict, cwd: Path, expected: tuple[str, ...], timeout: float = 300) -> tuple[int, str]:
    """Run the probe; once every `expected` text has appeared in its output (or `timeout` has
    passed), tell it to shut down and collect the rest. Ray forwards a worker's lines to the
    driver asynchronously, so the probe waits on its stdin instead of racing the forwarder."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        env=env,
        cwd=cwd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    out, missing, deadline = [], set(expected), time.monotonic() + timeout
    while missing and time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            break
        out.append(line)
        missing = {text for text in missing if text not in line}
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.write("go\n")
        proc.stdin.close()
    try:
        proc.wait(timeout=max(deadline - time.monotonic(), 60))
    finally:
        proc.kill()
    reader.join(timeout=10)
    while not lines.empty():
        out.append(lines.get_nowait() or "")
    return proc.returncode, "".join(out)


@pytest.mark.parametrize("verbose", [False, True])
def test_local_ray_and_a_tensorflow_worker_print_only_eyeray_lines(verbose, tmp_path):
    """A route's start (cluster.connect: a local Ray) and a worker importing TensorFlow: quiet,
    nothing but eyeray's lines, the worker's included; with -v, Ray's banner and TensorFlow's
    notices are back."""
    script = QUIET_PROBE.replace("VERBOSE", str(verbose))
    with private_local_ray(tmp_path, strip=("TF_",)) as env:
        returncode, out = _run_probe(script, env, tmp_path, expected=(WORKER_LINE, "done"))
    assert returncode == 0, out[-4000:]
    assert not (tmp_path / ".ray" / "auth_token").exists()  # the token trap: ~/.ray left alone
    lines = [line for line in out.splitlines() if line.strip()]
    assert any(WORKER_LINE in line for line in lines) and any(line.endswith("done") for line in lines), out[-4000:]
    if verbose:
        assert "oneDNN" in out or "cuda" in out.lower() or "Started a local Ray instance" in out, out[-4000:]
    else:
        assert [line for line in lines if "[eyeray]" not in line] == [], out[-4000:]
