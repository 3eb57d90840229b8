"""One line per training epoch, instead of Ray's tables: a Ray Train callback (it runs in the run's
controller, whose output Ray forwards to the driver's console) that logs each epoch's report
through eyeray's logger: epoch, phase, loss, validation loss and selection metric, images/s, ETA."""

from __future__ import annotations

import logging
import time
from typing import Any

from ray.train import UserCallback

from eyeray.log import setup

log = logging.getLogger(__name__)


def _number(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else (f"{seconds // 60}:{seconds % 60:02d}")
    )


def epoch_line(metrics: dict[str, Any], total_epochs: int, selection_metric: str, eta_s: float | None) -> str:
    """`epoch 3/15 full: loss 0.52, val_loss 0.48, val_macro_f1 0.81, 60 img/s, ETA 0:41`."""
    key = f"val_{selection_metric}"
    parts = [f"loss {_number(metrics.get('loss'))}", f"val_loss {_number(metrics.get('val_loss'))}"]
    if key in metrics:
        parts.append(f"{key} {_number(metrics[key])}")
    if metrics.get("images_per_s") is not None:
        parts.append(f"{metrics['images_per_s']:.0f} img/s")  # all workers' images (reduced totals)
    if eta_s is not None:
        parts.append(f"ETA {_duration(eta_s)}")
    phase = metrics.get("phase", "") + (" (on cached features)" if metrics.get("inputs") == "features" else "")
    return f"epoch {metrics.get('epoch')}/{total_epochs} {phase}: " + ", ".join(parts)


class EpochLog(UserCallback):
    """Logs rank 0's report of every epoch; the ETA is the mean wall time per epoch so far (the
    whole round trip: training, validation, checkpoint) times the epochs left."""

    def __init__(self, total_epochs: int, selection_metric: str, label: str = ""):
        self.total_epochs = total_epochs
        self.selection_metric = selection_metric
        self.label = label
        self._start: float | None = None
        self._first_epoch: int | None = None

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if not metrics or "epoch" not in metrics[0]:
            return
        setup()  # this runs in the Train controller's process: eyeray's lines and level there
        now, epoch = time.monotonic(), int(metrics[0]["epoch"])
        if self._start is None:  # the first report after a (re)start: time from its epoch's start
            self._start = now - float(metrics[0].get("epoch_seconds") or 0.0)
            self._first_epoch = epoch - 1
        done = epoch - (self._first_epoch or 0)
        eta = (now - self._start) / max(done, 1) * max(self.total_epochs - epoch, 0)
        line = epoch_line(metrics[0], self.total_epochs, self.selection_metric, eta)
        log.info(f"{self.label}{line}")
