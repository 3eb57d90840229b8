"""The `eyeray` command and the parsers the thin `jobs/*.py` scripts share.

The flags of train, score and sweep are generated from the fields of `TrainConfig`, `ScoreConfig`
and `SweepConfig` (eyeray.config_cli), so a default or help text is written once, on its field;
serve's flags take their defaults from `ServeArgs`. `get_train_parser` returns an unparsed parser
(as torchvision's references do), so `jobs/train_oct.py`, `eyeray train oct` and `eyeray demo`
parse the same flags into the same `TrainConfig` and call the same `eyeray.train.run`.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections.abc import Callable

from eyeray import cluster
from eyeray.config_cli import add_config_arguments, config_from_args
from eyeray.dicomweb import PacsError
from eyeray.log import setup


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help with each flag's default, except a switch's or None (the help says what unset means)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None or action.nargs == 0 else super()._get_help_string(action)


def _parser(description: str, **kwargs) -> argparse.ArgumentParser:
    """A parser of its own (the `eyeray` command, a job script), with -v."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter, **kwargs)
    parser.add_argument("-v", "--verbose", action="store_true", help="show eyeray's DEBUG lines too")
    return parser


def _run(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Every entry point: parse, set up eyeray's log lines, call the command (set_defaults(func=...)).

    A setting the user must change (a `SettingError` from a route's preflight, or a ValueError,
    FileExistsError or FileNotFoundError raised before Ray started: config validation, a missing
    input) prints `eyeray: error: MESSAGE` on one line and returns 2, as argparse does for a bad
    flag; with -v the traceback comes first. Anything raised once the route reached Ray (started
    it, or asked `cluster.connect` for the caller's own) keeps its traceback."""
    args = parser.parse_args(argv)
    setup(verbose=args.verbose)
    ray = sys.modules.get("ray")
    ray_before = ray is not None and ray.is_initialized()  # a caller's own Ray (a notebook, a test)
    calls_before = cluster.connect_calls()
    try:
        return args.func(args)
    except PacsError as exc:  # the PACS stayed down or slow through Ray's retries: what to do is in the line
        print(f"eyeray: error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        from eyeray.preflight import SettingError, one_line

        ray = sys.modules.get("ray")
        started = ray is not None and ray.is_initialized() and not ray_before
        if not isinstance(exc, SettingError) and (started or cluster.connect_calls() > calls_before):
            raise
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"eyeray: error: {one_line(exc)}", file=sys.stderr)
        return 2


def _default(function: Callable, name: str):
    """The default of a function's keyword argument, so that a flag's default is the function's."""
    return inspect.signature(function).parameters[name].default


# --------------------------------------------------------------------------- train and demo


def add_train_arguments(parser: argparse.ArgumentParser, **how) -> argparse.ArgumentParser:
    """A flag per `TrainConfig` field (`how`: `exclude` or `positional` names, e.g. the task).
    Unset flags take the task's defaults, or the demo configuration when --data is absent."""
    from eyeray.train import TrainConfig

    return add_config_arguments(parser, TrainConfig, **how)


def get_train_parser(task: str | None = None) -> argparse.ArgumentParser:
    """The parser of jobs/train_TASK.py (the task fixed), or with the task as an argument."""
    if task is None:
        parser = add_train_arguments(_parser("Fine-tune a classifier."), positional=["task"])
    else:
        parser = add_train_arguments(_parser(f"Fine-tune the {task} classifier with Ray Train."), exclude=["task"])
        parser.set_defaults(task=task)
    parser.set_defaults(func=_train)
    return parser


def train_config(args: argparse.Namespace, task: str | None = None):
    from eyeray.train import TrainConfig

    return config_from_args(TrainConfig, args, **({"task": task} if task else {}))


def _train(args: argparse.Namespace) -> int:
    from eyeray.train import run

    run(train_config(args))
    return 0


def train_main(task: str, argv: list[str] | None = None) -> int:
    """Entry point of jobs/train_TASK.py."""
    return _run(get_train_parser(task), argv)


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from eyeray import demo

    parser.add_argument(
        "--port", type=int, default=_default(demo.run, "serve_port"), help="HTTP port of the short-lived demo service"
    )
    return add_train_arguments(parser)


def _demo(args: argparse.Namespace) -> int:
    from eyeray import demo

    out = demo.run(train_config(args), serve_port=args.port)
    result, summary = out["train"], out["score"]
    print("\n[eyeray demo] done. Look at:")
    print(f"  bundle   {result.bundle}/manifest.json")
    print(f"  report   {result.report}/index.html (the model card), metrics.json and the PNG plots beside it")
    headline = {k: v for k, v in result.metrics.items() if isinstance(v, float)}
    print("  test set " + json.dumps(headline, indent=None))
    print(f"  scores   {out['scores']}/ (Parquet, one row per archive file), report.html and summary.json:")
    from eyeray.score.pipeline import SUMMARY_PRINTED

    keys = [k for k in SUMMARY_PRINTED if k != "wall_seconds" and k in summary]  # no time; volumes only if any
    print("           " + json.dumps({k: summary[k] for k in keys}))
    print("  served   " + "; ".join(f"{a['file']} -> {a['status']} {_served(a)}" for a in out["serve"]))
    return 0


def _served(answer: dict) -> str:
    if "detail" in answer:
        return answer["detail"]
    if answer["confidence"] is None:  # the gate declined it
        return answer["gate"]["reason"]
    refer = "" if answer.get("referral") is None else (", refer" if answer["referral"] else ", no referral")
    return f"{answer.get('label') or answer.get('labels')} (confidence {answer['confidence']:.2f}{refer})"


# --------------------------------------------------------------------------- score


def add_score_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """A flag per `ScoreConfig` user setting."""
    from eyeray.score import ScoreConfig

    return add_config_arguments(parser, ScoreConfig)


def score_config(args: argparse.Namespace):
    from eyeray.score import ScoreConfig

    return config_from_args(ScoreConfig, args)


def _score(args: argparse.Namespace) -> int:
    from eyeray.score import run

    run(score_config(args))
    return 0


def score_main(argv: list[str] | None = None) -> int:
    """Entry point of jobs/score_archive.py."""
    parser = add_score_arguments(_parser("Score an image archive with Ray Data."))
    parser.set_defaults(func=_score)
    return _run(parser, argv)


# --------------------------------------------------------------------------- options of score, serve, explain


def add_options_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of `DecisionOptions` and `InferenceOptions`, as score generates them from its config."""
    from eyeray.decision.options import DecisionOptions
    from eyeray.model.options import InferenceOptions

    return add_config_arguments(add_config_arguments(parser, DecisionOptions), InferenceOptions)


def options(args: argparse.Namespace) -> dict:
    """`decision` and `inference` of the parsed flags of `add_options_arguments`."""
    from eyeray.decision.options import DecisionOptions
    from eyeray.model.options import InferenceOptions

    return {"decision": config_from_args(DecisionOptions, args), "inference": config_from_args(InferenceOptions, args)}


# --------------------------------------------------------------------------- serve


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of `eyeray serve`: those of the decision and inference options, generated as for
    score; the rest are not: --max-body-mb and --max-replicas set `ServeArgs` fields in other units
    (bytes, the autoscaling config), --host and --port are `run`'s. Every default is read from there."""
    from eyeray.serve import ServeArgs, run

    field = ServeArgs.model_fields
    default = {name: info.get_default(call_default_factory=True) for name, info in field.items()}
    add = parser.add_argument
    add(
        "--bundle",
        dest="bundles",
        action="append",
        required=True,
        metavar="DIR_OR_S3_URI",
        help="model bundle folder or s3:// URI; repeat for more tasks (one bundle per task)",
    )
    add("--host", default=_default(run, "host"), help="address to listen on (0.0.0.0: every interface)")
    add("--port", type=int, default=_default(run, "port"), help="HTTP port")
    add(
        "--gpus-per-replica",
        type=float,
        default=default["gpus_per_replica"],
        help=field["gpus_per_replica"].description,
    )
    add("--max-batch-size", type=int, default=default["max_batch_size"], help=field["max_batch_size"].description)
    add(
        "--max-replicas",
        type=int,
        default=default["autoscaling"]["max_replicas"],
        help="model replicas per task under load (autoscaling)",
    )
    add("--max-body-mb", type=float, default=default["max_body_bytes"] / 2**20, help="larger uploads get 413")
    return add_options_arguments(parser)


def serve_args(args: argparse.Namespace):
    """The `ServeArgs` of `eyeray serve`'s flags (what it does not set keeps its default)."""
    from eyeray.serve import ServeArgs

    autoscaling = ServeArgs.model_fields["autoscaling"].get_default(call_default_factory=True)
    return ServeArgs(
        bundles=args.bundles,
        gpus_per_replica=args.gpus_per_replica,
        max_batch_size=args.max_batch_size,
        max_body_bytes=int(args.max_body_mb * 2**20),
        autoscaling={**autoscaling, "max_replicas": args.max_replicas},
        **options(args),
    )


def _serve(args: argparse.Namespace) -> int:
    """`eyeray serve`: the Serve application of `jobs/serve_config.yaml`, until interrupted.
    The optional API token comes from EYERAY_API_TOKEN or EYERAY_API_TOKEN_FILE."""
    from eyeray.serve import run

    run(serve_args(args), host=args.host, port=args.port)
    return 0


# --------------------------------------------------------------------------- explain


def add_explain_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from eyeray.model.overlay import ALPHA_HELP, DEFAULT_ALPHA

    add = parser.add_argument
    add("--bundle", required=True, metavar="DIR_OR_S3_URI", help="model bundle folder or s3:// URI")
    add("images", nargs="+", metavar="IMAGE", help="image files (local or s3://): JPEG, PNG, TIFF, BMP, DICOM")
    add("--output", help="folder or s3:// URI for NAME.gradcam.png (default: beside each image)")
    add("--class", dest="class_name", help="class to explain (default: the decided class the model is most sure of)")
    add("--alpha", type=float, default=DEFAULT_ALPHA, help=ALPHA_HELP)
    return add_options_arguments(parser)


def _explain(args: argparse.Namespace) -> int:
    """One JSON line per image (overlay path, labels, calibrated probabilities, referral); exit 1 if any failed."""
    from eyeray.model.gradcam import explain_files

    rows = explain_files(
        args.bundle, args.images, output=args.output, class_name=args.class_name, alpha=args.alpha, **options(args)
    )
    for row in rows:
        print(json.dumps(row))
    return 1 if any(row["error"] for row in rows) else 0


def explain_main(argv: list[str] | None = None) -> int:
    parser = add_explain_arguments(_parser("Grad-CAM overlays (PNG) for images, by a model bundle."))
    parser.set_defaults(func=_explain)
    return _run(parser, argv)


# --------------------------------------------------------------------------- sweep


def add_sweep_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """A flag per `SweepConfig` field. Unset flags take the task's defaults, or the demo's (small
    models from scratch on generated data) when --data is absent."""
    from eyeray.sweep import SweepConfig

    return add_config_arguments(parser, SweepConfig)


def sweep_config(args: argparse.Namespace):
    from eyeray.sweep import SweepConfig

    return config_from_args(SweepConfig, args)


def _sweep(args: argparse.Namespace) -> int:
    from eyeray.sweep import run

    run(sweep_config(args))
    return 0


def sweep_main(argv: list[str] | None = None) -> int:
    """Entry point of jobs/sweep.py."""
    parser = add_sweep_arguments(
        _parser("Model selection with Ray Tune: many trainings, ASHA early stopping, a leaderboard.")
    )
    parser.set_defaults(func=_sweep)
    return _run(parser, argv)


# --------------------------------------------------------------------------- eyeray


def get_parser() -> argparse.ArgumentParser:
    """The `eyeray` command: one subcommand per route, each calling its function (set_defaults)."""
    parser = _parser(__doc__.splitlines()[0], prog="eyeray")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, add: Callable, func: Callable, **how) -> None:
        subparser = sub.add_parser(
            name, help=help, description=help[0].upper() + help[1:] + ".", formatter_class=HelpFormatter
        )
        # Here too (`eyeray train oct -v`); SUPPRESS keeps a `-v` given before the command.
        subparser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="as eyeray -v")
        add(subparser, **how).set_defaults(func=func)

    command("train", "fine-tune a classifier with Ray Train", add_train_arguments, _train, positional=["task"])
    command(
        "demo", "train on generated data end to end: no dataset, no cluster, no download", add_demo_arguments, _demo
    )
    command("score", "score an image archive with Ray Data (Parquet out)", add_score_arguments, _score)
    command("serve", "online predictions over HTTP with Ray Serve", add_serve_arguments, _serve)
    command("explain", "Grad-CAM overlays (PNG) of a bundle's decision for images", add_explain_arguments, _explain)
    command("sweep", "model selection with Ray Tune: ASHA, leaderboard, best bundle", add_sweep_arguments, _sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    return _run(get_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
