"""Training settings checked in the driver before Ray starts: the backbone against the image
size and the weights (eyeray.model.build.check_backbone), the weights file against the backbone,
--data as the task's layout, and --output (writable; a run already there needs --resume). Each
failure is a one-line SettingError."""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from eyeray import storage
from eyeray.preflight import SettingError, check_exists, check_writable
from eyeray.tasks import TaskSpec, get_task
from eyeray.train.config import AUGMENT_ON, GATE_METHODS, MIXED_DTYPES, RUN_NAME, TrainConfig

if TYPE_CHECKING:
    from eyeray.data.layouts import Layout

log = logging.getLogger(__name__)


class RunExistsError(SettingError, FileExistsError):
    """--output already holds a run and --resume was not given."""


@dataclass(frozen=True)
class Checked:
    """What preflight hands on: the resolved config, and --data's layout as its check read it
    (None for the demo, whose dataset is generated once Ray runs)."""

    config: TrainConfig
    layout: Layout | None


def check(config: TrainConfig) -> TrainConfig:
    """Every check (see `checked`); returns the resolved config."""
    return checked(config).config


def checked(config: TrainConfig, layout: Layout | None = None) -> Checked:
    """Every check, the cheap ones first. Loading a weights file into its backbone (built without
    weights, on the CPU) is the one that takes seconds. `layout`: --data's layout, read and checked
    already by the caller (a sweep, for its trials), so not read again."""
    from eyeray.model.build import check_backbone

    start = time.perf_counter()
    cfg = config.resolved()
    spec = get_task(cfg.task)
    choices = (("mixed_dtype", MIXED_DTYPES), ("augment_on", AUGMENT_ON), ("gate_method", GATE_METHODS))
    for name, allowed in choices:  # the CLI checks its own
        if getattr(cfg, name) not in allowed:
            flag = "--" + name.replace("_", "-")
            raise SettingError(f"{flag} must be one of {', '.join(allowed)}, not {getattr(cfg, name)!r}")
    if cfg.threshold_confidence and not 0.5 <= cfg.threshold_confidence < 1.0:
        raise SettingError(
            f"--threshold-confidence must be 0 (the point estimate) or at least 0.5 and below 1, "
            f"not {cfg.threshold_confidence}"
        )
    if not 0.5 <= cfg.gate_keep < 1.0:
        raise SettingError(f"--gate-keep must be at least 0.5 and below 1, not {cfg.gate_keep}")
    if cfg.gate_fit_images < 2:
        raise SettingError(f"--gate-fit-images must be at least 2, not {cfg.gate_fit_images}")
    names = check_backbone(spec, cfg.backbone, cfg.image_size, cfg.weights)
    check_weights_exist(cfg.weights)
    if cfg.data is not None and layout is None:
        layout = check_data(spec, cfg.data, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction)
    check_writable(cfg.output, "--output")
    if not check_resume(cfg) and cfg.resume:
        log.info(f"--resume: no earlier run in {cfg.output}; starting a new one")
    check_weights_file(names[0], cfg.image_size, cfg.weights)
    log.debug(f"training settings checked in {time.perf_counter() - start:.1f}s")
    return Checked(cfg, layout)


def check_weights_exist(weights: str | None) -> None:
    """A --weights PATH (not imagenet or none) exists and can be read."""
    from eyeray.model.build import resolve_weights

    _, weights_file = resolve_weights(weights)
    if weights_file:
        check_exists(weights_file, "--weights", "; give a backbone weights file, or --weights imagenet or none")


def check_data(spec: TaskSpec, data: str, *, val_fraction: float, test_fraction: float) -> Layout:
    """--data lists as the task's layout (`read_layout` only lists files; no image is read); returns it."""
    from eyeray.data.layouts import LayoutError, read_layout

    try:
        return read_layout(spec, data, val_fraction=val_fraction, test_fraction=test_fraction)
    except LayoutError as exc:  # its message starts with the folder
        raise SettingError(f"--data {exc}" if str(exc).startswith(str(data)) else f"--data {data}: {exc}") from exc
    except ValueError as exc:  # fractions that leave no training data
        raise SettingError(f"--val-fraction/--test-fraction: {exc}") from exc
    except OSError as exc:  # unreadable (permissions, credentials)
        raise SettingError(f"--data {data} cannot be read ({' '.join(str(exc).split())})") from exc


def check_resume(cfg: TrainConfig) -> bool:
    """Whether --output holds a training run; one there without --resume is refused."""
    fs, path = storage.filesystem(cfg.output)
    previous = fs.exists(f"{path}/{RUN_NAME}")
    if previous and not cfg.resume:
        raise RunExistsError(
            f"--output {cfg.output} already holds a training run; pass --resume to continue it, "
            "or choose another --output"
        )
    return previous


def check_weights_file(backbone: str, image_size: int, weights: str | None) -> None:
    """A --weights PATH loads into `backbone` built without weights, on the CPU, as the workers will
    load it (measured here: VGG16 0.4 s, MobileNetV2 1 s, Xception 2 s, InceptionResNetV2 5 s)."""
    import keras

    from eyeray.model.build import BACKBONES, resolve_weights

    _, weights_file = resolve_weights(weights)
    if not weights_file:
        return
    local, tmp = storage.local_copy(weights_file)
    try:
        with warnings.catch_warnings(), keras.device("cpu:0"):
            warnings.simplefilter("ignore")  # Keras warns about every layer it cannot match
            base = BACKBONES[backbone].build((image_size, image_size, 3), None)
            base.load_weights(local)
    except (ValueError, OSError) as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        first = first.split(". Example")[0]  # Keras: "A total of 13 objects could not be loaded. Example ..."
        raise SettingError(
            f"--weights {weights_file} does not load into {backbone} ({first[:160]}); give a weights file saved "
            f"from {backbone} (its backbone's save_weights), or another --backbone"
        ) from exc
    finally:
        if tmp is not None:
            tmp.cleanup()
