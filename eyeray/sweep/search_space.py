"""The model-selection search space, as data: what a sweep may vary, per task, and how a small
YAML/JSON file overrides it.

Every dimension is written the same way in the defaults below and in a file:

    backbone: [xception, inception_resnet_v2, "xception+inception_resnet_v2"]   # choice
    image_size: 299                                                             # fixed
    learning_rate: {low: 1.0e-4, high: 3.0e-3, log: true}                       # range
    dropout: {grid: [0.2, 0.5]}                                                 # every value

A file names only the keys it changes. Everything is checked before a trial starts, so a typo
or an impossible value fails in a second with the key's name, not an hour into a sweep.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from eyeray import storage
from eyeray.tasks import get_task

# Which TrainConfig fields a sweep varies, their type, the closed range a value must lie in, and
# whether null is allowed (fine_tune_layers: null = the backbone's own default).
KNOBS: dict[str, tuple[type, float, float, bool]] = {
    "backbone": (str, 0, 0, False),
    "image_size": (int, 16, 1024, False),
    "learning_rate": (float, 1e-7, 1.0, False),  # phase 1 (or the whole net when not pretrained)
    "fine_tune_lr_factor": (float, 1e-5, 1.0, False),  # phase 2 learning rate = this x learning_rate
    "fine_tune_layers": (int, 0, 10_000, True),  # top backbone layers unfrozen in phase 2; 0 = all
    "dropout": (float, 0.0, 0.95, False),
    "augment_strength": (float, 0.0, 3.0, False),  # x the task's augmentation ranges; 0 = none
    "batch_size": (int, 1, 4096, False),
}

# Defaults shared by every task (pretrained backbones, real data) ...
COMMON: dict[str, Any] = {
    # every backbone of eyeray.model.build, and the glaucoma seed's concatenation ensemble
    "backbone": [
        "vgg16",
        "xception",
        "inception_resnet_v2",
        "mobilenet_v2",
        "small_cnn",
        "xception+inception_resnet_v2",
    ],
    "learning_rate": {"low": 1e-4, "high": 3e-3, "log": True},
    "fine_tune_lr_factor": {"low": 0.003, "high": 0.1, "log": True},
    "fine_tune_layers": [None, 20, 60],
    "dropout": {"low": 0.2, "high": 0.5},
    "augment_strength": [0.5, 1.0, 1.5],
    "batch_size": [16, 32],
}
# ... what differs per task (its input size) ...
PER_TASK: dict[str, dict[str, Any]] = {
    "oct": {"image_size": [224]},
    "glaucoma": {"image_size": [299]},
    "odir": {"image_size": [224]},
}
# ... and the embedded default (no --data): small models from scratch, a laptop CPU's worth.
DEMO: dict[str, Any] = {
    "backbone": ["small_cnn", "mobilenet_v2", "small_cnn+mobilenet_v2"],
    "image_size": [64],
    "learning_rate": {"low": 5e-4, "high": 5e-3, "log": True},
    "fine_tune_layers": None,
}


@dataclass(frozen=True)
class Dimension:
    """One hyperparameter: a fixed value, a choice (sampled), a grid (every value, each one in
    its own trials), or a range [low, high] (uniform, or log-uniform)."""

    values: tuple = ()
    grid: bool = False
    low: float | None = None
    high: float | None = None
    log: bool = False

    @property
    def is_range(self) -> bool:
        return self.low is not None

    def candidates(self) -> tuple:
        """The values a trial can get (a range: its two ends)."""
        return (self.low, self.high) if self.is_range else self.values

    def to_tune(self) -> Any:
        from ray import tune

        if self.is_range:
            return tune.loguniform(self.low, self.high) if self.log else tune.uniform(self.low, self.high)
        if self.grid:
            return tune.grid_search(list(self.values))
        return self.values[0] if len(self.values) == 1 else tune.choice(list(self.values))

    def describe(self) -> str:
        if self.is_range:
            return f"{'log-uniform' if self.log else 'uniform'} [{self.low:g}, {self.high:g}]"
        shown = ", ".join("default" if v is None else str(v) for v in self.values)
        return shown if len(self.values) == 1 else f"{'grid' if self.grid else 'one of'} {shown}"


@dataclass(frozen=True)
class SearchSpace:
    """Every dimension a sweep varies; `param_space()` is what Ray Tune samples trials from."""

    backbone: Dimension
    image_size: Dimension
    learning_rate: Dimension
    fine_tune_lr_factor: Dimension
    fine_tune_layers: Dimension
    dropout: Dimension
    augment_strength: Dimension
    batch_size: Dimension

    def param_space(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name).to_tune() for f in fields(self)}

    def describe(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name).describe() for f in fields(self)}


def defaults(task: str, demo: bool) -> dict[str, Any]:
    """The raw default space of a task (the embedded-default one without --data)."""
    get_task(task)
    return {**COMMON, **PER_TASK.get(task, {}), **(DEMO if demo else {})}


def read_file(uri: str) -> dict[str, Any]:
    """A YAML or JSON mapping of overrides (local path or s3://)."""
    import yaml

    try:
        text = storage.read_bytes(uri).decode()
    except FileNotFoundError:
        raise ValueError(f"search-space file {uri} does not exist") from None
    try:
        data = json.loads(text) if Path(uri).suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(
            f"search-space file {uri} is not valid {'JSON' if uri.endswith('.json') else 'YAML'}: {exc}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"search-space file {uri} must hold a mapping of key: value, not a {type(data).__name__}")
    return data


def load(task: str, demo: bool, path: str | None = None) -> SearchSpace:
    """The task's default space, overridden by the file at `path`, validated."""
    raw = defaults(task, demo)
    if path:
        overrides = read_file(path)
        unknown = sorted(set(overrides) - set(KNOBS))
        if unknown:
            raise ValueError(
                f"search space {path}: unknown key(s) {', '.join(map(str, unknown))}; known keys: {', '.join(KNOBS)}"
            )
        raw = {**raw, **overrides}
    return parse(raw, source=path or f"the default {task} space")


def parse(raw: dict[str, Any], source: str = "search space") -> SearchSpace:
    space = SearchSpace(**{key: _dimension(key, raw.get(key), source) for key in KNOBS})
    _check_sizes(space, source)
    return space


def _dimension(key: str, spec: Any, source: str) -> Dimension:
    where = f"{source}: {key}"
    if isinstance(spec, dict):
        extra = sorted(set(spec) - {"grid", "low", "high", "log"})
        if extra:
            raise ValueError(
                f"{where}: unknown field(s) {', '.join(map(str, extra))}; write a value, a list "
                "(choice), {grid: [...]} or {low: A, high: B, log: true|false}"
            )
        if "grid" in spec:
            if set(spec) != {"grid"}:
                raise ValueError(f"{where}: grid takes no low/high/log")
            return Dimension(values=_values(key, spec["grid"], where), grid=True)
        return _range(key, spec, where)
    return Dimension(values=_values(key, spec, where))


def _values(key: str, spec: Any, where: str) -> tuple:
    items = spec if isinstance(spec, list) else [spec]
    if not items:
        raise ValueError(f"{where}: an empty list leaves nothing to try")
    return tuple(_value(key, item, where) for item in items)


def _range(key: str, spec: dict[str, Any], where: str) -> Dimension:
    kind = KNOBS[key][0]
    if kind is str or "low" not in spec or "high" not in spec:
        raise ValueError(f"{where}: a range needs low and high{' (and a numeric key)' if kind is str else ''}")
    low, high = _value(key, spec["low"], where), _value(key, spec["high"], where)
    log = spec.get("log", False)
    if kind is int:
        raise ValueError(f"{where}: an integer key takes a list of values, not a range")
    if not isinstance(log, bool):
        raise ValueError(f"{where}: log must be true or false, not {log!r}")
    if low is None or high is None or not low < high:
        raise ValueError(f"{where}: low ({spec['low']}) must be below high ({spec['high']})")
    if log and low <= 0:
        raise ValueError(f"{where}: a log range needs low > 0")
    return Dimension(low=low, high=high, log=log)


def _value(key: str, value: Any, where: str) -> Any:
    """One value, converted to the key's type and checked against its allowed range."""
    kind, low, high, nullable = KNOBS[key]
    if value is None:
        if nullable:
            return None
        raise ValueError(f"{where}: null is not allowed")
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: {value!r} is not a name")
        from eyeray.model.build import backbone_names

        try:
            backbone_names(value)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        return value
    try:  # YAML reads 1e-4 (no dot) as a string: accept numeric strings
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or (kind is int and number != int(number)):
        raise ValueError(f"{where}: {value!r} is not {'an integer' if kind is int else 'a number'}")
    if not low <= number <= high:
        raise ValueError(f"{where}: {value!r} is outside [{low:g}, {high:g}]")
    return int(number) if kind is int else number


def _check_sizes(space: SearchSpace, source: str) -> None:
    """Every sampled combination must build: the smallest input size fits every backbone."""
    from eyeray.model.build import BACKBONES, backbone_names

    need = {name: BACKBONES[name].min_size for b in space.backbone.values for name in backbone_names(b)}
    worst = max(need, key=need.get)
    smallest = min(space.image_size.candidates())
    if smallest < need[worst]:
        raise ValueError(
            f"{source}: image_size {smallest} is below {worst}'s minimum input size of "
            f"{need[worst]} (backbone and image_size are sampled independently)"
        )
