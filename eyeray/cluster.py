"""How every route (train, score, serve, sweep) reaches Ray: `connect()`.

- RAY_ADDRESS set (a job on a cluster, `ray start` beside it): connect to that cluster; unset:
  start a private local Ray for this process.
- Quiet unless -v (eyeray.log.setup records the choice): Ray's INFO lines stay out of the driver's
  console, and every worker of the job (Train workers and controller, Ray Data tasks and actors,
  Serve replicas) gets TensorFlow's C++ log level and EYERAY_VERBOSE through the job's runtime_env,
  and WARNING for its Python loggers through Ray's job LoggingConfig. Warnings, errors and eyeray's
  own lines still reach the console.
- Ray Data keeps its progress bars on a terminal (Ray's rich bars: tqdm is not a dependency);
  in a log file (no terminal) Ray Data's periodic progress tables are INFO lines, shown with -v.
- Token authentication (Ray >= 2.59): a local Ray would otherwise write ~/.ray/auth_token, after
  which a plain `ray start --head` turns token auth on and `ray job submit` without
  RAY_AUTH_MODE=token is refused. When Ray would create that file, the private local Ray gets a
  token of its own in this process's environment instead (auth stays on, ~/.ray is untouched).
  A cluster that asks for a token eyeray does not have, or an address nobody answers at, is a
  `ClusterError`: one line that says what to export.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from eyeray.log import QUIET_ENV, VERBOSE_ENV, is_verbose
from eyeray.preflight import SettingError

log = logging.getLogger(__name__)

AUTH_MODE_ENV, AUTH_TOKEN_ENV, AUTH_TOKEN_PATH_ENV = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")
# Workers also leave Ray's and TensorFlow's deprecation notices (meant for eyeray's developers) out.
QUIET_WORKER_ENV = {**QUIET_ENV, "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning"}
# The driver's Ray core config, read when `ray.init` starts it: no "(raylet) Task ... failed. There
# are N retries remaining" line for a task Ray retries (a PACS read, Serve's controller at
# shutdown); what fails for good still raises. (RAY_BACKEND_LOG_LEVEL, which would also hide the
# core's "constructor arguments in the object store" error of Ray Data's and Train's own actors,
# ray#53727, prints a line of its own in every process: docs/design.md, "Quiet by default".)
QUIET_DRIVER_ENV = {"RAY_enable_output_error_log_if_still_retry": "0"}
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in a submitted job's driver
SETUP_HOOK = "eyeray.log.quiet_worker"  # every worker process: quiet (unless -v), its own cluster


class ClusterError(SettingError):
    """Ray cannot be reached as configured (an address nobody answers at, a token missing): one
    line that says what to export."""


def worker_env(verbose: bool) -> dict[str, str]:
    """Environment variables for every worker process of eyeray's Ray job."""
    return {VERBOSE_ENV: "1" if verbose else "0", **({} if verbose else QUIET_WORKER_ENV)}


def runtime_env(verbose: bool) -> dict[str, Any]:
    """The job's runtime_env: `worker_env` and eyeray.log's worker setup hook, less what a
    submitted job already sets (`ray job submit --runtime-env...`): Ray refuses to merge a key twice."""
    env, hook = worker_env(verbose), SETUP_HOOK
    job = os.environ.get(JOB_CONFIG_ENV)
    if job:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            submitted = json.loads(job).get("runtime_env") or {}
            env = {k: v for k, v in env.items() if k not in (submitted.get("env_vars") or {})}
            hook = None if "worker_process_setup_hook" in submitted else hook
    return {"env_vars": env, **({"worker_process_setup_hook": hook} if hook else {})}


def token_available() -> bool:
    """Whether Ray would find a token without creating one (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
    ~/.ray/auth_token)."""
    if os.environ.get(AUTH_TOKEN_ENV):
        return True
    path = os.environ.get(AUTH_TOKEN_PATH_ENV)
    return Path(path).expanduser().is_file() if path else DEFAULT_TOKEN_FILE.expanduser().is_file()


def private_local_token() -> bool:
    """Before a local `ray.init()`, with RAY_AUTH_MODE unset: token auth, as Ray's default, said
    explicitly (Ray then skips its start-up warning); and if Ray would generate ~/.ray/auth_token
    (no token anywhere), a token for this process's cluster in its environment instead. Returns
    whether it made one. An explicit RAY_AUTH_MODE is left as it is."""
    if os.environ.get(AUTH_MODE_ENV) is not None:
        return False
    made = not token_available()
    if made:
        os.environ[AUTH_TOKEN_ENV] = uuid.uuid4().hex  # the format of Ray's own generated tokens
    os.environ[AUTH_MODE_ENV] = "token"
    _reload_ray_config()
    return made


def _reload_ray_config() -> None:
    """Ray caches its settings (RAY_AUTH_MODE among them) at import: re-read them, as Ray itself
    does when it turns token auth on for a new local cluster."""
    from ray._raylet import Config

    Config.initialize("")


_connect_calls = 0


def connect_calls() -> int:
    """How many times a route has asked for Ray in this process: the command line tells a
    setting refused before its route reached Ray from an error raised once it ran on Ray."""
    return _connect_calls


def connect(verbose: bool | None = None) -> None:
    """Connect to RAY_ADDRESS, or start a local Ray; a no-op when Ray is already initialised
    (a test's cluster, a route called from another route). `verbose=None` follows -v."""
    import ray

    global _connect_calls
    _connect_calls += 1
    if ray.is_initialized():  # a sweep trial's process too: its Ray Data bars still need the same settings
        _progress_bars()
        return
    if verbose is None:
        verbose = is_verbose()
    address = os.environ.get("RAY_ADDRESS") or None
    if address is None:
        private_local_token()
        log.info("starting a local Ray (set RAY_ADDRESS to use a running cluster)")
    else:
        log.info(f"connecting to the Ray cluster at {address}")
        if not _answers(address):  # ray.init would retry for minutes
            raise _connection_error(ConnectionError(f"nothing listens at {address}"), address)
    kwargs: dict[str, Any] = {"runtime_env": runtime_env(verbose)}
    if not verbose:
        for key, value in QUIET_DRIVER_ENV.items():
            os.environ.setdefault(key, value)
        kwargs.update(
            logging_level=logging.WARNING,
            logging_config=ray.LoggingConfig(log_level="WARNING"),
        )
    try:
        ray.init(**kwargs)
    except Exception as exc:
        raise _connection_error(exc, address) from exc
    if not verbose:
        _quiet_driver()
    _progress_bars()


def _answers(address: str, timeout_s: float = 5.0) -> bool:
    """Whether something accepts a TCP connection at a `host:port` or `ray://host:port` address
    (other forms, such as "auto", are left to Ray)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if "://" in address and not address.startswith("ray://") or not host or not port.isdigit():
        return True
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def _connection_error(exc: Exception, address: str | None) -> Exception:
    """A `ClusterError` for the failures a user fixes with an export; anything else unchanged."""
    from ray.exceptions import AuthenticationError

    where = f"the Ray cluster at {address}" if address else "the local Ray"
    text = str(exc)
    if isinstance(exc, AuthenticationError) or "authentication token" in text.lower():
        return ClusterError(
            f"{where} requires token authentication: export {AUTH_MODE_ENV}=token (the token is "
            f"read from ~/.ray/auth_token, or export {AUTH_TOKEN_ENV}=... / {AUTH_TOKEN_PATH_ENV}=... "
            "with the head node's token from `ray get-auth-token`)"
        )
    if address and isinstance(exc, ConnectionError | TimeoutError):
        # A cluster with token auth refuses a driver without a token the same way (Ray retries,
        # then gives up), so without RAY_AUTH_MODE=token the line names both fixes.
        maybe_token = os.environ.get(AUTH_MODE_ENV, "").lower() != "token"
        return ClusterError(
            f"no Ray cluster answers at RAY_ADDRESS={address}: start one (`ray start --head`), "
            "fix RAY_ADDRESS, or unset it to run on a local Ray"
            + (
                f"; if that cluster uses token authentication (`ray start` turns it on when "
                f"~/.ray/auth_token exists), export {AUTH_MODE_ENV}=token"
                if maybe_token
                else ""
            )
        )
    return exc


def _quiet_driver() -> None:
    """Ray's loggers in the driver that `ray.init(logging_level=...)` does not reach (Serve and
    Ray Data configure their own): WARNING."""
    for name in ("ray", "ray.serve", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _progress_bars() -> None:
    """Ray Data's bars on a terminal: Ray's rich bars when tqdm (Ray's default) is not installed."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = True
    if importlib.util.find_spec("tqdm") is None:
        ctx.use_ray_tqdm = False  # else every Ray Data worker warns that tqdm is missing
    if sys.stdout.isatty():
        ctx.enable_rich_progress_bars = True
        ctx.use_ray_tqdm = False


def serve_logging(verbose: bool | None = None, *, controller: bool = False) -> dict[str, Any]:
    """Serve's logging_config: INFO and access logs with -v; else WARNING for the application's
    replicas (eyeray's own warnings) and ERROR for Serve's controller and proxies (`controller`),
    whose warnings are about Serve's bookkeeping."""
    if verbose if verbose is not None else is_verbose():
        return {"log_level": "INFO", "enable_access_log": True}
    return {"log_level": "ERROR" if controller else "WARNING", "enable_access_log": False}


def train_logging(verbose: bool | None = None):
    """Ray Train's console level (`RunConfig(logging_config=...)`): WARNING unless -v."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="INFO" if (verbose if verbose is not None else is_verbose()) else "WARNING")
