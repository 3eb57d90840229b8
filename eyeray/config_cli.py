"""Command-line flags generated from a config dataclass, so that each setting's default and help
are written once, on its field, and `eyeray` and `jobs/*.py` read them from there.

A field becomes `--field-name` (underscores become dashes) with the field's type and default; a
field without a default is a required flag. By annotation: `int`, `float`, `str` and `X | None`
take one value; `bool` is a switch, `--name` when the field defaults to False and `--no-name`
when it defaults to True; `list[str]` is a flag given once per item. `field(metadata=...)` says
what the annotation cannot:

    help                          the flag's help text (of a `--no-name` switch: that flag's)
    cli                           False: not a user setting, no flag
    flag                          another spelling (`--bundle` for `bundles`)
    type                          a converter of the typed string; its ValueError is the error shown
                                  (a `bool` with one takes a value: `--gate off`)
    spell                         with `type`: how the default is typed, for the help (True -> "on")
    choices, metavar, required    as for `add_argument`

A field whose type is itself such a dataclass (an options object shared by several commands,
`eyeray.decision.options.DecisionOptions`) adds that dataclass's flags, as if its fields were the
config's own; `config_from_args` builds it back. So every command that takes the options has the
same flags, written once.

The flag's `dest` is always the field's name, so `config_from_args` builds the config back.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

PASSED_ON = ("choices", "metavar", "required")  # metadata keys given to add_argument as they are


def settings(cls: type) -> list[dataclasses.Field]:
    """The fields that are user settings, one per flag: those of `cls`, and in place of an options
    field, its dataclass's settings."""
    out = []
    for f in _own(cls):
        options_type = _options_type(cls, f)
        out.extend(settings(options_type) if options_type else [f])
    return out


def _own(cls: type) -> list[dataclasses.Field]:
    """The fields of `cls` itself that are settings (an options field is one)."""
    return [f for f in dataclasses.fields(cls) if f.init and f.metadata.get("cli", True)]


def _options_type(cls: type, f: dataclasses.Field) -> type | None:
    """The dataclass an options field holds (`ScoreConfig.decision`), None for any other field."""
    kind = typing.get_type_hints(cls)[f.name]
    return kind if dataclasses.is_dataclass(kind) else None


def add_config_arguments(
    parser: argparse.ArgumentParser, cls: type, *, exclude: Iterable[str] = (), positional: Iterable[str] = ()
) -> argparse.ArgumentParser:
    """Add a flag per setting of the dataclass `cls`; the `positional` fields become positional
    arguments (`eyeray train TASK`), the `exclude`d ones get nothing."""
    hints = typing.get_type_hints(cls)
    exclude, positional = set(exclude), set(positional)
    for f in _own(cls):
        if f.name in exclude:
            continue
        if options_type := _options_type(cls, f):
            add_config_arguments(parser, options_type, exclude=exclude, positional=positional)
            continue
        kind, repeated = _value_type(cls, f.name, hints[f.name])
        options = {k: f.metadata[k] for k in PASSED_ON if k in f.metadata}
        options["help"] = f.metadata.get("help")
        convert = _converter(f.metadata.get("type", kind))
        if f.name in positional:
            options.pop("required", None)
            parser.add_argument(f.name, type=convert, **options)
            continue
        default = _default(f)
        if default is dataclasses.MISSING:
            options.setdefault("required", True)
            default = None
        name = f.name.replace("_", "-")
        if kind is bool and "type" not in f.metadata:
            flag = f.metadata.get("flag", f"--no-{name}" if default else f"--{name}")
            options.update(action="store_false" if default else "store_true")
        else:
            flag = f.metadata.get("flag", f"--{name}")
            options.update(type=convert, action="append" if repeated else "store")
            if "spell" in f.metadata:  # argparse converts a string default as if typed
                default = f.metadata["spell"](default)
        parser.add_argument(flag, dest=f.name, default=default, **options)
    return parser


def config_from_args(cls: type, args: argparse.Namespace, **given: Any):
    """The `cls` instance of the parsed flags (a setting without one keeps its field default);
    keywords in `given` take precedence. The config's own checks run as usual."""
    values = {}
    for f in _own(cls):
        if options_type := _options_type(cls, f):
            values[f.name] = config_from_args(options_type, args)
        elif hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return cls(**{**values, **given})


def _value_type(cls: type, name: str, annotation: Any) -> tuple[type, bool]:
    """(type of one value, whether the flag repeats) of a field's annotation."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (types.UnionType, typing.Union):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _value_type(cls, name, rest[0])
    elif origin is list and args and args[0] in (int, float, str):
        return args[0], True
    elif annotation in (bool, int, float, str):
        return annotation, False
    raise TypeError(f"{cls.__name__}.{name}: no flag for a {annotation}; give it metadata 'type', or 'cli': False")


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _converter(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """`convert`, with a ValueError's message as argparse's error (argparse otherwise prints only
    "invalid NAME value"); the built-in types keep argparse's own messages."""
    if convert in (bool, int, float, str):
        return convert

    @functools.wraps(convert)
    def checked(value: str) -> Any:
        try:
            return convert(value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return checked
