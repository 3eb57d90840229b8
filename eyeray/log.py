"""eyeray's own lines: every module logs to a child of the "eyeray" logger, and each entry point
(the CLI, the jobs, a Ray Train worker) calls `setup` once, so a user reads eyeray's progress and
results in one format, apart from library output.

Quiet by default: `setup` also keeps TensorFlow's and Ray's own notices below warnings in this
process (log levels, TensorFlow's C++ log level, Python warnings from Ray), and records the choice
in EYERAY_VERBOSE, which eyeray.cluster passes to every Ray worker. `-v` (`verbose=True`) shows
eyeray's DEBUG lines and leaves every library at its own default."""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import sys
import warnings

NAME = "eyeray"
FORMAT = "[eyeray] %(message)s"
VERBOSE_ENV = "EYERAY_VERBOSE"

# TensorFlow's C++ log level (3: its CUDA probing errors on CPU-only nodes too; eyeray says itself
# when a GPU it was given is not usable) and Ray Data's log level, read when each is imported.
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "RAY_DATA_LOG_LEVEL": "WARNING"}
# Python loggers of the libraries, kept at WARNING unless verbose.
QUIET_LOGGERS = ("tensorflow", "absl", "h5py", "PIL", "fsspec", "s3fs", "botocore", "urllib3", "ray.train")


def is_verbose() -> bool:
    """Whether this process (or the driver that started this Ray worker) runs with -v."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def setup(verbose: bool | None = None) -> logging.Logger:
    """Show eyeray's INFO lines (DEBUG with `verbose`) on stdout and quiet the libraries (unless
    `verbose`); idempotent. `verbose=None` (a Ray worker) follows EYERAY_VERBOSE, set by the driver."""
    if verbose is None:
        verbose = is_verbose()
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    logger = logging.getLogger(NAME)
    if not any(h.get_name() == NAME for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.set_name(NAME)
        handler.setFormatter(logging.Formatter(FORMAT))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False  # one line per message, whatever the application does with the root logger
    if not verbose:
        quiet_libraries()
    return logger


def quiet_libraries() -> None:
    """TensorFlow's and Ray's notices below warnings in this process: TensorFlow's C++ log level
    (effective for a TensorFlow imported after this), the libraries' Python loggers, and Python
    warnings raised inside Ray (advice to Ray's callers, not to eyeray's users)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name in ("", *QUIET_LOGGERS):  # "": the root logger (Ray Train sets it to INFO in its workers)
        logging.getLogger(name).setLevel(logging.WARNING)
    for category in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"ray(\.|$)")
    if not any(isinstance(f, _SilentImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _SilentImport())


class _SilentImport(importlib.abc.MetaPathFinder):
    """TensorFlow writes its start-up notices (oneDNN, CUDA stubs) to stderr while it is imported,
    before its log level applies (TF >= 2.16: "All log messages before absl::InitializeLog() is
    called are written to STDERR"). This finder runs `import tensorflow` with stderr (fd 2) sent
    to /dev/null, once; an import error still raises as usual."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            exec_module = spec.loader.exec_module

            def silent_exec_module(module):
                with _stderr_to_devnull():
                    exec_module(module)

            spec.loader.exec_module = silent_exec_module  # this file's loader object only
        return spec


@contextlib.contextmanager
def _stderr_to_devnull():
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def quiet_worker() -> None:
    """Ray's `worker_process_setup_hook` for eyeray's jobs (eyeray.cluster): every worker process
    shows eyeray's lines and starts quiet unless the driver runs with -v (`setup`), and talks to
    its own cluster (Ray's helpers inside workers otherwise give up when a machine runs more than
    one Ray)."""
    setup()
    if not os.environ.get("RAY_ADDRESS"):
        import ray

        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
