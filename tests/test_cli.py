"""The `eyeray` command and the job scripts' parsers, generated from the config dataclasses: real
parsing, no Ray cluster. Every user setting has one flag whose default is the field's, so the
command line and the configs cannot drift apart again."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from eyeray import cli
from eyeray.config_cli import add_config_arguments, config_from_args, settings
from eyeray.decision.options import DecisionOptions
from eyeray.model.options import InferenceOptions
from eyeray.score import ScoreConfig
from eyeray.serve import ServeArgs
from eyeray.sweep import SweepConfig
from eyeray.train import TrainConfig

SCORE_NEEDS = ["--bundle", "a", "--input", "i", "--output", "o"]
OPTIONS = (DecisionOptions, InferenceOptions)


@pytest.fixture(scope="module")
def eyeray_parser() -> argparse.ArgumentParser:
    return cli.get_parser()


def subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return commands.choices[name]


def flags_of(parser: argparse.ArgumentParser) -> dict[str, list[argparse.Action]]:
    """dest -> the actions writing it, without -h and -v."""
    out: dict[str, list[argparse.Action]] = {}
    for action in parser._actions:
        if action.dest not in ("help", "verbose"):
            out.setdefault(action.dest, []).append(action)
    return out


@pytest.mark.parametrize(
    "command, cls, argv, expected, extra",
    [
        ("train", TrainConfig, ["oct"], TrainConfig(task="oct"), set()),
        ("demo", TrainConfig, [], TrainConfig(), {"port"}),
        ("score", ScoreConfig, SCORE_NEEDS, ScoreConfig(bundles=["a"], input="i", output="o"), set()),
        ("sweep", SweepConfig, [], SweepConfig(), set()),
    ],
)
def test_every_setting_has_one_flag_with_the_fields_default(eyeray_parser, command, cls, argv, expected, extra):
    parser = subcommand(eyeray_parser, command)
    flags = flags_of(parser)
    names = {f.name for f in settings(cls)}
    assert set(flags) == names | extra, "a flag per user setting, and no other"
    assert all(len(flags[name]) == 1 for name in names), "one flag per setting"
    args = eyeray_parser.parse_args([command, *argv])
    for f in settings(cls):
        if f.default is not dataclasses.MISSING:
            assert getattr(args, f.name) == f.default, f.name
    assert config_from_args(cls, args) == expected


def test_only_internal_fields_have_no_flag_and_every_flag_has_help():
    options = {"decision", "inference"}  # options objects: their fields are settings (below)
    internal = {
        cls.__name__: {f.name for f in dataclasses.fields(cls)} - {f.name for f in settings(cls)} - options
        for cls in (TrainConfig, ScoreConfig, SweepConfig)
    }
    assert internal == {
        "TrainConfig": set(),
        "ScoreConfig": {"memory_per_actor", "block_batches"},
        "SweepConfig": set(),
    }
    assert {f.name for f in settings(ScoreConfig)} >= {f.name for cls in OPTIONS for f in dataclasses.fields(cls)}
    assert all(f.metadata.get("help") for cls in (TrainConfig, ScoreConfig, SweepConfig) for f in settings(cls))


def test_a_job_scripts_parser_fixes_the_task_and_has_every_other_setting():
    parser = cli.get_train_parser("glaucoma")
    assert set(flags_of(parser)) == {f.name for f in settings(TrainConfig)} - {"task"}
    assert cli.train_config(parser.parse_args([])) == TrainConfig(task="glaucoma")


def test_score_serve_and_explain_share_the_options_flags(eyeray_parser):
    """The decision and inference options have one flag each, generated once from their fields:
    the same spelling, default and help on every command that takes them."""

    def described(command: str) -> dict[str, tuple]:
        actions = flags_of(subcommand(eyeray_parser, command))
        names = [f.name for cls in OPTIONS for f in dataclasses.fields(cls)]
        return {n: [(a.option_strings, a.default, a.help, a.metavar) for a in actions[n]] for n in names}

    assert described("score") == described("serve") == described("explain")
    argv = ["--thresholds", "0.3", "--review-below", "0.7", "--gate", "off", "--tta", "--jit-compile"]
    decision = DecisionOptions(thresholds="0.3", review_below=0.7, gate=False)
    inference = InferenceOptions(tta=True, jit_compile=True)
    score = cli.score_config(eyeray_parser.parse_args(["score", *SCORE_NEEDS, *argv]))
    served = cli.serve_args(eyeray_parser.parse_args(["serve", "--bundle", "a", "--bundle", "b", *argv]))
    explained = cli.options(eyeray_parser.parse_args(["explain", "--bundle", "a", "x.png", *argv]))
    assert (score.decision, score.inference) == (served.decision, served.inference) == (decision, inference)
    assert explained == {"decision": decision, "inference": inference}
    with pytest.raises(SystemExit):  # a bad value fails as argparse fails, naming the flag
        eyeray_parser.parse_args(["score", *SCORE_NEEDS, "--gate", "maybe"])
    with pytest.raises(TypeError, match="on or off"):  # from Python, "off" must not read as a gate that is on
        DecisionOptions(gate="off")
    with pytest.raises(ValueError, match="review_below"):
        DecisionOptions(review_below=1.5)


def test_serve_flags_default_to_the_application_arguments(eyeray_parser):
    args = eyeray_parser.parse_args(["serve", "--bundle", "a"])
    assert cli.serve_args(args) == ServeArgs(bundles=["a"])
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    args = eyeray_parser.parse_args(["serve", "--bundle", "a", "--max-replicas", "3", "--max-body-mb", "1"])
    served = cli.serve_args(args)
    assert served.autoscaling["max_replicas"] == 3 and served.max_body_bytes == 2**20


def test_train_flags_become_the_config(eyeray_parser):
    args = eyeray_parser.parse_args(["train", "oct", "--dropout", "0.5", "--no-augment", "--weights", "None"])
    cfg = cli.train_config(args)
    assert (cfg.task, cfg.dropout, cfg.augment, cfg.weights) == ("oct", 0.5, False, "none")
    assert args.func is not None and not args.verbose


def test_score_takes_a_repeated_bundle_flag(eyeray_parser):
    args = eyeray_parser.parse_args(["score", "--bundle", "a", "--bundle", "b", "--input", "x", "--output", "y"])
    cfg = cli.score_config(args)
    assert (cfg.bundles, cfg.input, cfg.output) == (["a", "b"], "x", "y")


def test_sweep_reads_durations_and_says_what_is_wrong(eyeray_parser, capsys):
    assert cli.sweep_config(eyeray_parser.parse_args(["sweep", "--time-budget", "90m"])).time_budget == 5400.0
    with pytest.raises(SystemExit):
        eyeray_parser.parse_args(["sweep", "--time-budget", "5x"])
    assert "not a duration: '5x'" in capsys.readouterr().err


def test_verbose_before_or_after_the_command(eyeray_parser):
    assert eyeray_parser.parse_args(["-v", "train", "oct"]).verbose
    assert eyeray_parser.parse_args(["train", "oct", "--verbose"]).verbose
    assert not eyeray_parser.parse_args(["train", "oct"]).verbose
    assert cli.get_train_parser("oct").parse_args(["-v"]).verbose


def test_each_command_calls_its_own_function(eyeray_parser):
    argvs = {
        "train": ["oct"],
        "demo": [],
        "score": SCORE_NEEDS,
        "serve": ["--bundle", "a"],
        "explain": ["--bundle", "a", "x.png"],
        "sweep": [],
    }
    funcs = {name: eyeray_parser.parse_args([name, *argv]).func for name, argv in argvs.items()}
    assert len(set(funcs.values())) == len(argvs) and all(map(callable, funcs.values()))


@pytest.mark.parametrize("argv", [[], ["nope"], ["train"], ["train", "nope"], ["score", "--input", "x"]])
def test_bad_command_lines_fail(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 2 and "usage: eyeray" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["train"], ["demo"], ["score"], ["serve"], ["explain"], ["sweep"]])
def test_help_exits_0(command, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main([*command, "--help"])
    assert exit.value.code == 0 and "usage: eyeray" in capsys.readouterr().out


@pytest.mark.parametrize(
    "entry",
    [lambda a: cli.train_main("oct", a), cli.score_main, cli.sweep_main, cli.explain_main],
)
def test_job_scripts_help_exits_0(entry, capsys):
    with pytest.raises(SystemExit) as exit:
        entry(["--help"])
    assert exit.value.code == 0 and "--verbose" in capsys.readouterr().out


@dataclasses.dataclass
class Toy:
    paths: list[str] = dataclasses.field(metadata={"flag": "--path", "help": "repeat"})
    size: int | None = None
    rate: float = 0.5
    fast: bool = False
    report: bool = True
    mode: str = dataclasses.field(default="a", metadata={"choices": ["a", "b"]})
    level: float = dataclasses.field(default=1.0, metadata={"type": lambda s: float(s.rstrip("x"))})
    internal: dict = dataclasses.field(default_factory=dict, metadata={"cli": False})


def test_field_types_become_flags():
    parser = add_config_arguments(argparse.ArgumentParser(), Toy)
    assert config_from_args(Toy, parser.parse_args(["--path", "p"])) == Toy(paths=["p"])
    args = parser.parse_args("--path p --path q --size 3 --rate 2 --fast --no-report --mode b --level 3x".split())
    assert config_from_args(Toy, args) == Toy(["p", "q"], 3, 2.0, True, False, "b", 3.0)
    for bad in ([], ["--path", "p", "--mode", "c"], ["--path", "p", "--size", "1.5"], ["--path", "p", "--internal"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_a_field_without_a_flag_type_must_say_so():
    @dataclasses.dataclass
    class Odd:
        table: dict = dataclasses.field(default_factory=dict)

    with pytest.raises(TypeError, match="Odd.table"):
        add_config_arguments(argparse.ArgumentParser(), Odd)
