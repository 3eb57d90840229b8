"""Fault injection for the resilience tests: a training worker or a scoring actor dies once, hard.

Switched on by the environment of the driver (`EYERAY_FAULT_AT_EPOCH`, `EYERAY_FAULT_AFTER_BATCHES`),
never by a user-facing config or flag; the drivers hand the value to their Ray workers. A marker
file in the run's output makes the fault happen once per run, so the retry Ray makes succeeds.
"""

from __future__ import annotations

import os
import signal
import time

from eyeray import storage

AT_EPOCH_ENV = "EYERAY_FAULT_AT_EPOCH"  # the last training worker dies after checkpointing this epoch
AFTER_BATCHES_ENV = "EYERAY_FAULT_AFTER_BATCHES"  # the first scoring actor to reach this many batches dies
MARKER = ".fault-injected"


def from_env(name: str) -> int | None:
    """The fault point set in the driver's environment, or None (the normal case)."""
    value = os.environ.get(name, "").strip()
    return int(value) if value else None


def kill_once(output: str, message: str, delay_s: float = 0.0) -> None:
    """Die with SIGKILL unless this run (`output`) already had its fault; leaves the marker first."""
    fs, path = storage.filesystem(storage.join(output, MARKER))
    if fs.exists(path):
        return
    fs.pipe(path, f"{message}\n".encode())
    time.sleep(delay_s)
    os.kill(os.getpid(), signal.SIGKILL)
