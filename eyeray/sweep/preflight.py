"""Sweep settings checked before Ray starts, besides `SweepConfig.check` and the search space's
own checks: a --weights file there, --data as the task's layout, --output writable, and a sweep
already there only with --resume. Each failure is a one-line SettingError."""

from __future__ import annotations

from dataclasses import dataclass

from ray import tune

from eyeray import storage
from eyeray.data.layouts import Layout
from eyeray.preflight import SettingError, check_writable
from eyeray.tasks import get_task
from eyeray.train.preflight import check_data, check_weights_exist


class SweepExistsError(SettingError, FileExistsError):
    """--output already holds a sweep and --resume was not given."""


@dataclass(frozen=True)
class Checked:
    """What sweep preflight hands on: whether --output holds a sweep (with --resume, the one to
    continue), and --data's layout as its check read it (None for the demo), for every trial."""

    previous: bool
    layout: Layout | None


def check(cfg, tune_dir: str) -> Checked:
    """`cfg`: a resolved SweepConfig; `tune_dir`: Tune's experiment folder inside --output."""
    check_weights_exist(cfg.weights)
    layout = None
    if cfg.data is not None:
        spec = get_task(cfg.task)
        layout = check_data(spec, cfg.data, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction)
    check_writable(cfg.output, "--output")
    root, fs = storage.ray_storage(cfg.output)
    previous = tune.Tuner.can_restore(f"{root}/{tune_dir}", storage_filesystem=fs)
    if previous and not cfg.resume:
        raise SweepExistsError(
            f"--output {cfg.output} already holds a sweep; pass --resume to continue it, or choose another --output"
        )
    return Checked(previous, layout)
