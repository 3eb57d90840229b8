"""The `eyeray` command and the parsers the thin `jobs/*.py` scripts share.

`get_train_parser` returns an unparsed parser (as torchvision's references do), so
`jobs/train_oct.py`, `eyeray train oct` and `eyeray demo` parse the same flags into the same
`TrainConfig` and call the same `eyeray.train.run`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from eyeray.decision.decide import DEFAULT_REVIEW_BELOW
from eyeray.decision.ensemble import METHODS
from eyeray.tasks import TASKS


def _weights(value: str) -> str:
    return value if value.lower() not in ("none", "null", "") else "none"


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags shared by every training entry point. Unset flags take the task's defaults, or the
    demo configuration when --data is absent."""
    from eyeray.train import TrainConfig

    add = parser.add_argument
    add("--data", help="dataset root: local folder or s3://bucket/prefix (absent: a generated demo dataset)")
    add("--output", help="run folder (local or s3://) for bundle/, report/ and checkpoints (default runs/TASK-TIME)")
    add(
        "--backbone",
        help="vgg16 | xception | inception_resnet_v2 | mobilenet_v2 | small_cnn, or A+B for a "
        "concatenation ensemble (default: the task's; small_cnn for the demo)",
    )
    add(
        "--weights",
        type=_weights,
        help="imagenet (download Keras' weights) | none | PATH or s3:// URI of a "
        "backbone weights file (default imagenet; none for the demo)",
    )
    add("--image-size", type=int, help="input size in pixels (default: the task's; 64 for the demo)")
    add("--epochs", type=int, help="epochs with the backbone frozen (or of the whole net when not pretrained)")
    add("--fine-tune-epochs", type=int, help="epochs with the top backbone layers unfrozen")
    add("--fine-tune-layers", type=int, help="how many top backbone layers to unfreeze (default per backbone)")
    add(
        "--fine-tune-lr-factor",
        type=float,
        default=TrainConfig.fine_tune_lr_factor,
        help="fine-tuning learning rate = this x --learning-rate",
    )
    add("--batch-size", type=int, help="images per worker per step")
    add("--learning-rate", type=float, help="Adam learning rate of the first phase")
    add("--dropout", type=float, default=0.3, help="dropout in the classification head")
    add("--no-augment", dest="augment", action="store_false", help="turn training augmentation off")
    add("--augment-strength", type=float, default=1.0, help="scale the task's augmentation ranges (0: none)")
    add("--workers", type=int, default=1, help="Ray Train workers (data-parallel replicas)")
    add("--use-gpu", action="store_true", help="one GPU per worker")
    add("--cpus-per-worker", type=float, help="CPUs reserved per worker (default: leave one CPU for Ray Data)")
    add("--max-failures", type=int, default=2, help="worker-group restarts from the last checkpoint")
    add("--resume", action="store_true", help="continue the interrupted run in --output")
    add("--val-fraction", type=float, default=0.15, help="share of patients for validation when the layout has none")
    add("--test-fraction", type=float, default=0.15, help="share of patients for test when the layout has none")
    add("--seed", type=int, default=0)
    return parser


def get_train_parser(task: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=f"Fine-tune the {task} classifier with Ray Train." if task else "Fine-tune a classifier.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    if task is None:
        parser.add_argument("task", choices=sorted(TASKS))
    return add_train_arguments(parser)


def train_config(args: argparse.Namespace, task: str | None = None):
    from eyeray.train import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    return TrainConfig(**{**values, "task": task or args.task})


def train_main(task: str, argv: list[str] | None = None) -> int:
    """Entry point of jobs/train_TASK.py."""
    from eyeray.train import run

    args = get_train_parser(task).parse_args(argv)
    run(train_config(args, task))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from eyeray import demo

    out = demo.run(train_config(args), serve_port=args.port)
    result, summary = out["train"], out["score"]
    print("\n[eyeray demo] done. Look at:")
    print(f"  bundle   {result.bundle}/manifest.json")
    print(f"  report   {result.report}/metrics.json and the PNG plots beside it")
    headline = {k: v for k, v in result.metrics.items() if isinstance(v, float)}
    print("  test set " + json.dumps(headline, indent=None))
    print(f"  scores   {out['scores']}/ (Parquet, one row per archive file), report.html and summary.json:")
    keys = ("files_seen", "scored", "errors", "errors_by_reason", "predictions", "referred", "needs_review")
    print("           " + json.dumps({k: summary[k] for k in keys}))
    print("  served   " + "; ".join(f"{a['file']} -> {a['status']} {_served(a)}" for a in out["serve"]))
    return 0


def _served(answer: dict) -> str:
    if "detail" in answer:
        return answer["detail"]
    refer = "" if answer.get("referral") is None else (", refer" if answer["referral"] else ", no referral")
    return f"{answer.get('label') or answer.get('labels')} (confidence {answer['confidence']:.2f}{refer})"


def add_score_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add = parser.add_argument
    add(
        "--bundle",
        dest="bundles",
        action="append",
        required=True,
        metavar="DIR_OR_S3_URI",
        help="model bundle folder or s3:// URI (from training); repeat for an ensemble of one task",
    )
    add("--input", required=True, help="archive to score: local folder or s3://bucket/prefix (recursive)")
    add("--output", required=True, help="results folder or s3:// URI (Parquet shards, summary.json, report.html)")
    add(
        "--ensemble",
        choices=METHODS,
        default="mean",
        help="with several bundles: average the probabilities, or majority vote",
    )
    add("--actors", type=int, default=1, help="model actors (each loads the bundles once)")
    add("--gpus-per-actor", type=float, default=0.0, help="GPUs per model actor")
    add("--cpus-per-actor", type=float, default=1.0, help="CPUs Ray reserves per model actor")
    add("--batch-size", type=int, default=32, help="images per model call")
    add("--rows-per-shard", type=int, default=1000, help="rows per Parquet shard (the unit of commit and resume)")
    add("--no-report", dest="report", action="store_false", help="skip report.html")
    add_decision_arguments(parser)
    add(
        "--explain",
        default="review",
        help="rows that get Grad-CAM overlays (PNG under OUTPUT/explanations/, named in the rows): "
        "none, review, referred, top-K (every row, its K most probable classes), or a comma list",
    )
    return parser


def add_decision_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """How probabilities become answers, the same flags for score, serve and explain."""
    add = parser.add_argument
    add(
        "--thresholds",
        default=None,
        metavar="T",
        help="override the bundle's operating point: 0.3 (referral rules), 0.3,0.4,... (one per label) "
        "or LABEL=0.3,LABEL=0.2 (default: the thresholds chosen on validation data)",
    )
    add("--tta", action="store_true", help="test-time augmentation: mean over the image and its mirror (2x model time)")
    add(
        "--review-below",
        type=float,
        default=DEFAULT_REVIEW_BELOW,
        help="calibrated confidence below which a case is marked needs_review",
    )
    return parser


def score_config(args: argparse.Namespace):
    from eyeray.score import ScoreConfig

    names = (
        "bundles",
        "input",
        "output",
        "ensemble",
        "actors",
        "gpus_per_actor",
        "cpus_per_actor",
        "batch_size",
        "rows_per_shard",
        "report",
        "thresholds",
        "tta",
        "review_below",
        "explain",
    )
    return ScoreConfig(**{k: getattr(args, k) for k in names})


def score_main(argv: list[str] | None = None) -> int:
    """Entry point of jobs/score_archive.py."""
    from eyeray.score import run

    parser = argparse.ArgumentParser(
        description="Score an image archive with Ray Data.", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    run(score_config(add_score_arguments(parser).parse_args(argv)))
    return 0


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add = parser.add_argument
    add(
        "--bundle",
        dest="bundles",
        action="append",
        required=True,
        help="model bundle folder or s3:// URI; repeat for more tasks (one bundle per task)",
    )
    add("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    add("--port", type=int, default=8000, help="HTTP port")
    add("--gpus-per-replica", type=float, default=0.0, help="GPUs per model replica")
    add("--max-replicas", type=int, default=1, help="model replicas per task under load (autoscaling)")
    add("--max-batch-size", type=int, default=16, help="requests scored in one model call")
    add("--max-body-mb", type=float, default=64, help="larger uploads get 413")
    return add_decision_arguments(parser)


def serve_main(args: argparse.Namespace) -> int:
    """`eyeray serve`: the Serve application of `jobs/serve_config.yaml`, until interrupted.
    The optional API token comes from EYERAY_API_TOKEN or EYERAY_API_TOKEN_FILE."""
    from eyeray.model.bundle import read_manifest
    from eyeray.serve import ServeArgs, run

    thresholds = {}
    if args.thresholds is not None:
        if len(args.bundles) != 1:
            raise SystemExit(
                "--thresholds takes one bundle; with several, give `thresholds: {task: ...}` "
                "in a Serve config file (jobs/serve_config.yaml)"
            )
        thresholds = {read_manifest(args.bundles[0])["task"]: args.thresholds}
    run(
        ServeArgs(
            bundles=args.bundles,
            gpus_per_replica=args.gpus_per_replica,
            max_batch_size=args.max_batch_size,
            max_body_bytes=int(args.max_body_mb * 2**20),
            tta=args.tta,
            review_below=args.review_below,
            thresholds=thresholds,
            autoscaling={"min_replicas": 1, "max_replicas": args.max_replicas, "target_ongoing_requests": 8},
        ),
        host=args.host,
        port=args.port,
    )
    return 0


def add_explain_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add = parser.add_argument
    add("--bundle", required=True, metavar="DIR_OR_S3_URI", help="model bundle folder or s3:// URI")
    add("images", nargs="+", metavar="IMAGE", help="image files (local or s3://): JPEG, PNG, TIFF, BMP, DICOM")
    add("--output", help="folder or s3:// URI for NAME.gradcam.png (default: beside each image)")
    add("--class", dest="class_name", help="class to explain (default: the decided class the model is most sure of)")
    add("--alpha", type=float, default=0.5, help="heatmap opacity where the heat is highest")
    add("--thresholds", default=None, metavar="T", help="override the bundle's operating point (as for score)")
    return parser


def _explain(args: argparse.Namespace) -> int:
    """One JSON line per image (overlay path, labels, calibrated probabilities, referral); exit 1 if any failed."""
    from eyeray.decision.operating_points import parse_thresholds
    from eyeray.model.gradcam import explain_files

    rows = explain_files(
        args.bundle,
        args.images,
        output=args.output,
        class_name=args.class_name,
        alpha=args.alpha,
        thresholds=parse_thresholds(args.thresholds),
    )
    for row in rows:
        print(json.dumps(row))
    return 1 if any(row["error"] for row in rows) else 0


def explain_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Grad-CAM overlays (PNG) for images, by a model bundle.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    return _explain(add_explain_arguments(parser).parse_args(argv))


def _seconds(value: str) -> float:
    """`3600`, `90m`, `2h`, `45s` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    scale = units.get(value[-1:].lower())
    try:
        return float(value[:-1] if scale else value) * (scale or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {value!r} (seconds, or 90m, 2h)") from None


def add_sweep_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of `eyeray sweep` and jobs/sweep.py. Unset flags take the task's defaults, or the demo's
    (small models from scratch on generated data) when --data is absent."""
    add = parser.add_argument
    add("--task", default="oct", choices=sorted(TASKS))
    add("--data", help="dataset root: local folder or s3://bucket/prefix (absent: a generated demo dataset)")
    add(
        "--output",
        help="sweep folder (local or s3://): leaderboard.csv, report.html, best/, trials/, tune/ "
        "(default runs/TASK-sweep-TIME)",
    )
    add("--trials", type=int, default=8, help="samples of the search space (each grid value gets this many)")
    add("--time-budget", type=_seconds, help="stop running trials after this long (seconds, or 90m, 2h)")
    add("--gpus-per-trial", type=int, default=0, help="GPUs per trial, one data-parallel worker each (0: CPU)")
    add("--cpus-per-trial", type=float, default=1.0, help="CPUs reserved for a trial's training workers")
    add("--max-concurrent", type=int, help="trials at once (default: what the cluster holds)")
    add(
        "--epochs",
        type=int,
        help="epochs with the backbone frozen, or of the whole net when not pretrained (default 10; 8 for the demo)",
    )
    add("--fine-tune-epochs", type=int, help="epochs with the top backbone layers unfrozen (default 10; demo 0)")
    add(
        "--weights",
        type=_weights,
        help="imagenet | none | PATH (default imagenet; none for the demo; small_cnn always trains from scratch)",
    )
    add("--grace-period", type=int, default=1, help="epochs every trial runs before ASHA may stop it")
    add("--reduction-factor", type=float, default=2.0, help="ASHA keeps the best 1/this of trials at each rung")
    add("--space", help="YAML/JSON file overriding the task's search space (see eyeray/sweep/search_space.py)")
    add(
        "--ensemble-top",
        type=int,
        default=0,
        metavar="K",
        help="evaluate the top K trials together on the test split (averaged probabilities and majority vote)",
    )
    add("--seed", type=int, default=0)
    add("--resume", action="store_true", help="continue the interrupted sweep in --output")
    return parser


def sweep_config(args: argparse.Namespace):
    from eyeray.sweep import SweepConfig

    names = {f.name for f in fields(SweepConfig)}
    return SweepConfig(**{k: v for k, v in vars(args).items() if k in names})


def sweep_main(argv: list[str] | None = None) -> int:
    """Entry point of jobs/sweep.py."""
    from eyeray.sweep import run

    parser = argparse.ArgumentParser(
        description="Model selection with Ray Tune: many trainings, ASHA early stopping, a leaderboard.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run(sweep_config(add_sweep_arguments(parser).parse_args(argv)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eyeray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="fine-tune a classifier with Ray Train")
    train.add_argument("task", choices=sorted(TASKS))
    add_train_arguments(train)
    demo = sub.add_parser("demo", help="train on generated data end to end: no dataset, no cluster, no download")
    demo.add_argument("--task", default="oct", choices=sorted(TASKS))
    demo.add_argument("--port", type=int, default=8000, help="HTTP port of the short-lived demo service")
    add_train_arguments(demo)
    add_score_arguments(sub.add_parser("score", help="score an image archive with Ray Data (Parquet out)"))
    add_serve_arguments(sub.add_parser("serve", help="online predictions over HTTP with Ray Serve"))
    add_explain_arguments(sub.add_parser("explain", help="Grad-CAM overlays (PNG) of a bundle's decision for images"))
    add_sweep_arguments(sub.add_parser("sweep", help="model selection with Ray Tune: ASHA, leaderboard, best bundle"))
    args = parser.parse_args(argv)
    if args.command == "sweep":
        from eyeray.sweep import run as sweep

        sweep(sweep_config(args))
        return 0
    if args.command == "serve":
        return serve_main(args)
    if args.command == "explain":
        return _explain(args)
    if args.command == "score":
        from eyeray.score import run as score

        score(score_config(args))
        return 0
    if args.command == "train":
        from eyeray.train import run

        run(train_config(args))
        return 0
    return _demo(args)


if __name__ == "__main__":
    sys.exit(main())
