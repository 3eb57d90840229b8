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


def epoch_line(
    metrics: dict[str, Any], total_epochs: int, selection_metric: str, eta_s: float | None, untimed: str = ""
) -> str:
    """`epoch 3/15 full: loss 0.52, val_loss 0.48, val_macro_f1 0.81, 60 img/s, ETA 0:41`; `untimed`
    names what the ETA cannot include yet (`ETA 0:02 + 10 fine_tune epochs not timed yet`)."""
    key = f"val_{selection_metric}"
    parts = [f"loss {_number(metrics.get('loss'))}", f"val_loss {_number(metrics.get('val_loss'))}"]
    if key in metrics:
        parts.append(f"{key} {_number(metrics[key])}")
    if metrics.get("images_per_s") is not None:
        parts.append(f"{metrics['images_per_s']:.0f} img/s")  # all workers' images (reduced totals)
    if eta_s is not None:
        parts.append(f"ETA {_duration(eta_s)}" + (f" + {untimed} not timed yet" if untimed else ""))
    phase = metrics.get("phase", "") + (" (on cached features)" if metrics.get("inputs") == "features" else "")
    return f"epoch {metrics.get('epoch')}/{total_epochs} {phase}: " + ", ".join(parts)


class EpochLog(UserCallback):
    """Logs rank 0's report of every epoch, with an ETA per phase: the mean wall time per epoch of
    the current phase so far (the whole round trip: training, validation, checkpoint) times its
    epochs left. Later phases are named, not guessed: a head epoch on cached features takes about
    a second, a fine-tuning epoch minutes, so one phase's pace says nothing of the next."""

    def __init__(self, plan: list[tuple[str, int]], selection_metric: str, label: str = ""):
        self.plan = plan  # (phase, epochs) in order, as eyeray.model.build.phases gives them
        self.total_epochs = sum(n for _, n in plan)
        self.selection_metric = selection_metric
        self.label = label
        self._phase_start: dict[str, tuple[float, int]] = {}  # phase -> (its first timed epoch's start, epochs before)

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if not metrics or "epoch" not in metrics[0]:
            return
        setup()  # this runs in the Train controller's process: eyeray's lines and level there
        now, epoch, phase = time.monotonic(), int(metrics[0]["epoch"]), metrics[0].get("phase", "")
        if phase not in self._phase_start:  # its first report after a (re)start: time from its epoch's start
            self._phase_start[phase] = (now - float(metrics[0].get("epoch_seconds") or 0.0), epoch - 1)
        start, before = self._phase_start[phase]
        eta, untimed = self.remaining(phase, epoch, (now - start) / max(epoch - before, 1))
        log.info(f"{self.label}{epoch_line(metrics[0], self.total_epochs, self.selection_metric, eta, untimed)}")

    def remaining(self, phase: str, epoch: int, seconds_per_epoch: float) -> tuple[float, str]:
        """(seconds left in `phase` after `epoch`, the later phases' epochs as words: "" for none)."""
        names = [name for name, _ in self.plan]
        if phase not in names:
            return seconds_per_epoch * max(self.total_epochs - epoch, 0), ""
        k = names.index(phase)
        phase_end = sum(n for _, n in self.plan[: k + 1])
        later = ", ".join(f"{n} {name} epoch{'s' if n > 1 else ''}" for name, n in self.plan[k + 1 :])
        return seconds_per_epoch * max(phase_end - epoch, 0), later
