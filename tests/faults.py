"""Faults the resilience tests install from outside the product: a training worker or a scoring
actor dies once, hard (SIGKILL, as a lost node or the OOM killer would do it), and Ray must recover.

A marker file in the run's output makes each fault happen once per run, so the retry Ray makes
succeeds. The classes travel to Ray's processes by value (this module is not installed there)."""

from __future__ import annotations

import os
import signal
import sys

import ray
import ray.cloudpickle
from ray.train import UserCallback

from eyeray import storage
from eyeray.score.predictor import BundlePredictor

MARKER = ".fault-injected"
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def first_time(output: str, message: str) -> bool:
    """Whether this run (`output`) has not had its fault yet; leaves the marker when it has not."""
    fs, path = storage.filesystem(storage.join(output, MARKER))
    if fs.exists(path):
        return False
    fs.pipe(path, f"{message}\n".encode())
    return True


class KillTrainWorkerAfterEpoch(UserCallback):
    """A Ray Train callback (it runs in the run's controller): once the workers reported `epoch`
    (and its checkpoint is registered), one training worker process of this job is killed."""

    def __init__(self, epoch: int, output: str):
        self.epoch, self.output = epoch, output

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if not metrics or metrics[0].get("epoch") != self.epoch:
            return
        from ray.util.state import list_actors

        job = ray.get_runtime_context().get_job_id()
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        pids = sorted(a.pid for a in workers if a.job_id == job)
        if pids and first_time(self.output, f"killed a training worker after epoch {self.epoch}"):
            os.kill(pids[-1], signal.SIGKILL)


class CrashingPredictor(BundlePredictor):
    """A scoring model actor whose first instance to reach `after_batches` batches dies, once per output."""

    after_batches = 3

    def __call__(self, batch):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == self.after_batches and first_time(self.output, f"killed a scoring actor after {self.calls}"):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(batch)
