"""Model selection with Ray Tune: many training runs, bad ones stopped early, one leaderboard.

Each trial is a real `eyeray.train.run` (Ray Train inside a Tune function trainable, as Ray's
Train V2 guide does it), with its own run folder OUTPUT/trials/<trial_id>. A Train callback
forwards every epoch's report to Tune, where ASHA compares trials on their best value so far of
the task's validation metric (TaskSpec.selection_metric) and stops the weak ones. Afterwards the
sweep writes the leaderboard and report (eyeray.sweep.report), exports the winner's bundle to
OUTPUT/best, and, with `ensemble_top`, evaluates the top trials together on the test split
(eyeray.decision.ensemble).

OUTPUT/tune holds Tune's own experiment state, so `resume` continues an interrupted sweep
through `Tuner.restore`: finished trials keep their results and are not run again.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from eyeray import cluster, storage
from eyeray.data.layouts import Layout
from eyeray.log import is_verbose
from eyeray.sweep import preflight, results, search_space
from eyeray.tasks import TaskSpec, get_task
from eyeray.train.config import (
    data_field,
    epochs_field,
    fine_tune_epochs_field,
    fraction_field,
    run_folder,
    schedule_defaults,
    task_field,
    weights_field,
)

log = logging.getLogger(__name__)

TUNE_DIR = "tune"  # Tune's experiment folder inside OUTPUT
# eyeray.sweep.scheduler: ASHA's rungs, for a resume. Not inside TUNE_DIR: Tune mirrors that folder
# from a local staging copy, which after a restore would overwrite newer records with old ones.
ASHA_STATE = "asha_state.json"
DATA_CPUS = 1.0  # CPUs left free for Ray Data (decoding, augmentation): map tasks take a whole CPU
# A trial's Tune actor only waits on its Train run, but Tune cannot place an actor that reserves
# nothing: it holds this sliver of the trial's CPUs, its training workers the rest.
DRIVER_CPUS = 0.01
DEMO_EPOCHS = 8


def parse_duration(value: str) -> float:
    """A --time-budget: `3600`, `90m`, `2h`, `45s` -> seconds."""
    scale = {"s": 1, "m": 60, "h": 3600}.get(value[-1:].lower())
    try:
        return float(value[:-1] if scale else value) * (scale or 1)
    except ValueError:
        raise ValueError(f"not a duration: {value!r} (seconds, or 90m, 2h)") from None


@dataclass
class SweepConfig:
    """Every knob of a sweep, each a flag of `eyeray sweep` (eyeray.config_cli). None means "the
    default": the demo's when `data` is None."""

    task: str = task_field()
    data: str | None = data_field()
    output: str | None = field(
        default=None,
        metadata={
            "help": "sweep folder (local or s3://): leaderboard.csv, report.html, best/, trials/, tune/ "
            "(default runs/TASK-sweep-TIME)"
        },
    )
    trials: int = field(default=8, metadata={"help": "samples of the search space (each grid value gets this many)"})
    time_budget: float | None = field(  # seconds
        default=None,
        metadata={"type": parse_duration, "help": "stop running trials after this long (seconds, or 90m, 2h)"},
    )
    gpus_per_trial: int = field(
        default=0, metadata={"help": "GPUs per trial, one data-parallel worker each (0: one CPU worker)"}
    )
    cpus_per_trial: float = field(
        default=1.0, metadata={"help": "CPUs reserved for a trial's training workers, together"}
    )
    max_concurrent: int | None = field(
        default=None, metadata={"help": "trials at once (default: what the cluster holds)"}
    )
    epochs: int | None = epochs_field(demo=str(DEMO_EPOCHS))
    fine_tune_epochs: int | None = fine_tune_epochs_field()
    weights: str | None = weights_field(note="; small_cnn always trains from scratch")
    grace_period: int = field(default=1, metadata={"help": "epochs every trial runs before ASHA may stop it"})
    reduction_factor: float = field(default=2.0, metadata={"help": "ASHA keeps the best 1/this of trials at each rung"})
    space: str | None = field(
        default=None,
        metadata={"help": "YAML/JSON file overriding the task's search space (see eyeray/sweep/search_space.py)"},
    )
    ensemble_top: int = field(
        default=0,
        metadata={
            "metavar": "K",
            "help": "evaluate the top K trials together on the test split (averaged probabilities and majority "
            "vote; 0: off)",
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the demo data, the trials and the search"})
    resume: bool = field(default=False, metadata={"help": "continue the interrupted sweep in --output"})
    val_fraction: float = fraction_field("validation")
    test_fraction: float = fraction_field("test")

    @property
    def is_demo(self) -> bool:
        return self.data is None

    @property
    def total_epochs(self) -> int:
        return int(self.epochs or 0) + int(self.fine_tune_epochs or 0)

    def resolved(self) -> SweepConfig:
        defaults = {"output": run_folder(f"{self.task}-sweep"), **schedule_defaults(self.is_demo, DEMO_EPOCHS)}
        cfg = replace(self, **{name: value for name, value in defaults.items() if getattr(self, name) is None})
        cfg.check()
        return cfg

    def check(self) -> None:
        get_task(self.task)
        problems = [
            (self.trials < 1, f"--trials must be at least 1, not {self.trials}"),
            (self.total_epochs < 1, "a trial needs at least one epoch"),
            (not 1 <= self.grace_period, f"--grace-period must be at least 1, not {self.grace_period}"),
            (self.reduction_factor <= 1, f"--reduction-factor must exceed 1, not {self.reduction_factor}"),
            (
                self.gpus_per_trial < 0 or self.cpus_per_trial <= 2 * DRIVER_CPUS,
                f"--gpus-per-trial must be >= 0 and --cpus-per-trial above {2 * DRIVER_CPUS:g}",
            ),
            (self.time_budget is not None and self.time_budget <= 0, "--time-budget must be positive"),
            (self.ensemble_top < 0 or self.ensemble_top == 1, "--ensemble-top K needs K >= 2 (or 0: off)"),
            (self.max_concurrent is not None and self.max_concurrent < 1, "--max-concurrent must be at least 1"),
        ]
        for bad, message in problems:
            if bad:
                raise ValueError(message)


@dataclass
class SweepResult:
    output: str
    leaderboard: list[dict[str, Any]]
    best: str | None  # OUTPUT/best, the winner's bundle (None when no trial finished)
    report: str
    ensemble: dict[str, Any] | None = None
    histories: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


# --------------------------------------------------------------------------- one trial


class ReportToTune(TuneReportCallback):
    """Forwards each epoch's Ray Train report to Tune, with the trial's best value so far of the
    task's selection metric (`eyeray.train.worker.best_so_far`) under one name (SCORE) that ASHA
    compares. The best so far, not the epoch's own value: a trial's bundle is its best checkpoint,
    and a learning trial whose validation score dips for one epoch at a rung is not stopped for it
    (seen: macro F1 1.0 after epoch 1, 0.45 after epoch 2). An undefined value (one class in a tiny
    validation split) counts as the worst, so the scheduler always has a number."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics, checkpoint):
        scored = [{**m, results.SCORE: results.score(m.get(f"best_{self.metric}"))} for m in metrics]
        super().after_report(run_context, scored, checkpoint)


def selection_key(spec: TaskSpec) -> str:
    return f"val_{spec.selection_metric}"


def trial_config(cfg: SweepConfig, params: dict[str, Any], data: str, output: str):
    """The TrainConfig of one trial: the sampled parameters plus the sweep's fixed settings.
    A trial restarted by Tuner.restore finds its own run folder and resumes from its checkpoint."""
    from eyeray.model.build import backbone_names
    from eyeray.train import TrainConfig
    from eyeray.train.config import RUN_NAME

    fs, path = storage.filesystem(output)
    workers = max(1, cfg.gpus_per_trial)
    scratch = "small_cnn" in backbone_names(params["backbone"])  # no ImageNet weights exist for it
    return TrainConfig(
        task=cfg.task,
        data=data,
        output=output,
        weights="none" if scratch else cfg.weights,
        epochs=cfg.epochs,
        fine_tune_epochs=cfg.fine_tune_epochs,
        workers=workers,
        use_gpu=cfg.gpus_per_trial > 0,
        cpus_per_worker=(cfg.cpus_per_trial - DRIVER_CPUS) / workers,
        resume=fs.exists(f"{path}/{RUN_NAME}"),
        seed=cfg.seed,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        **params,
    )


def _trial(params: dict[str, Any], sweep: SweepConfig, data: str, layout: Layout | None) -> None:
    """The Tune function trainable: one real training run of eyeray.train, on `data` as the sweep's
    preflight read it (`layout`; None: the demo's generated dataset, read by the trial)."""
    from eyeray import train

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(sweep, params, data, results.trial_output(sweep.output, trial_id))
    train.run(cfg, callbacks=[ReportToTune(selection_key(get_task(sweep.task)))], trial=trial_id, layout=layout)


# --------------------------------------------------------------------------- the sweep


def concurrency(cfg: SweepConfig, resources: dict[str, float]) -> int:
    """How many trials run at once: as many as the cluster holds with DATA_CPUS left for Ray Data
    (a trial's training worker never takes the CPUs its own data pipeline needs). Refuses a
    trial that can never fit instead of letting it wait forever."""
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    by_cpu = math.floor((cpus - DATA_CPUS) / cfg.cpus_per_trial + 1e-9)
    by_gpu = math.floor(gpus / cfg.gpus_per_trial + 1e-9) if cfg.gpus_per_trial else by_cpu
    fits = min(by_cpu, by_gpu)
    if fits < 1:
        raise ValueError(
            f"one trial needs {cfg.cpus_per_trial:g} CPU + {DATA_CPUS:g} CPU for Ray Data"
            + (f" and {cfg.gpus_per_trial} GPU" if cfg.gpus_per_trial else "")
            + f", but the cluster has {cpus:g} CPU and {gpus:g} GPU: lower --cpus-per-trial/--gpus-per-trial "
            "or add nodes"
        )
    if cfg.max_concurrent:
        return cfg.max_concurrent
    return fits


def _experiment(cfg: SweepConfig) -> tuple[str, str, Any]:
    """(Tune's storage_path, experiment path, pyarrow filesystem or None) for OUTPUT."""
    root, fs = storage.ray_storage(cfg.output)
    return root, f"{root}/{TUNE_DIR}", fs


@ray.remote(num_cpus=0)
def _state_api_problem() -> str:
    """Why Ray's state API is unreachable from a worker ("" when it works). Ray Train frees a
    stopped run's placement group through it (its PlacementGroupCleaner); without it, every trial
    ASHA stops keeps its CPUs/GPUs and the sweep waits forever."""
    from ray.util.state import list_nodes

    try:
        list_nodes(limit=1, timeout=30)
    except Exception as exc:  # no dashboard, several Ray instances on the node, ...
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
    return ""


def _scheduler(cfg: SweepConfig):
    """ASHA on the epoch counter, its rungs kept across a resume. The last epoch is never a rung
    (max_t below it, surviving trials not stopped): a trial that trained to the end is exported
    and tested, not cut at the finish."""
    from eyeray.sweep.scheduler import ResumableASHA

    if cfg.grace_period >= cfg.total_epochs:
        log.info(f"--grace-period {cfg.grace_period} >= {cfg.total_epochs} epochs: no early stopping")
        return None  # Tune's default: every trial runs to the end
    problem = ray.get(_state_api_problem.remote())
    if problem:
        log.info(
            "WARNING: early stopping is off: a trial stopped early could not release its resources "
            f"on this cluster, since Ray's state API is unreachable from workers ({problem}). Start the cluster "
            "with its dashboard, and with RAY_ADDRESS set when other Ray instances run on the machine."
        )
        return None
    max_t = max(cfg.grace_period, cfg.total_epochs - 1)
    return ResumableASHA(
        storage.join(cfg.output, ASHA_STATE),
        time_attr="epoch",
        max_t=max_t,
        grace_period=cfg.grace_period,
        reduction_factor=cfg.reduction_factor,
        stop_last_trials=False,
    )


def _tuner(cfg: SweepConfig, space: search_space.SearchSpace, data: str, checked: preflight.Checked) -> tune.Tuner:
    """A new Tuner, or the restored one where OUTPUT holds a sweep (which eyeray.sweep.preflight
    allowed only with --resume)."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    trainable = tune.with_resources(
        tune.with_parameters(_trial, sweep=cfg, data=data, layout=checked.layout), {"CPU": DRIVER_CPUS}
    )
    root, path, fs = _experiment(cfg)
    if checked.previous:
        log.info(
            f"resuming the sweep in {cfg.output}: finished trials keep their results; the search "
            "space and schedule are the ones it started with"
        )
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
    if cfg.resume:
        log.info(f"--resume: no earlier sweep in {cfg.output}; starting a new one")
    spec = get_task(cfg.task)
    limit = concurrency(cfg, ray.cluster_resources())
    log.info(
        f"sweep {spec.name}: {cfg.trials} sample(s), up to {limit} at a time, "
        f"ASHA on {selection_key(spec)}, output {cfg.output}"
    )
    return tune.Tuner(
        trainable,
        param_space=space.param_space(),
        tune_config=tune.TuneConfig(
            metric=results.SCORE,
            mode="max",
            scheduler=_scheduler(cfg),
            num_samples=cfg.trials,
            time_budget_s=cfg.time_budget,
            search_alg=BasicVariantGenerator(max_concurrent=limit, random_state=cfg.seed),
            trial_dirname_creator=lambda t: t.trial_id,
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR, storage_path=root, storage_filesystem=fs, verbose=3 if is_verbose() else 0
        ),  # quiet: no Tune tables; each trial's epochs are eyeray lines (eyeray.train.progress)
    )


def _data(cfg: SweepConfig) -> str:
    """The dataset every trial reads: --data, or the embedded default generated once for all
    trials (the same generator and folder `eyeray train` uses for its demo)."""
    if cfg.data is not None:
        return cfg.data
    from eyeray.data import synthetic

    return synthetic.demo_dataset(get_task(cfg.task), cfg.output, cfg.seed)


def run(config: SweepConfig) -> SweepResult:
    """Run (or resume) a sweep, then write the leaderboard, the report and OUTPUT/best."""
    from eyeray.sweep import report as sweep_report

    cfg = config.resolved()
    space = search_space.load(cfg.task, cfg.is_demo, cfg.space)  # all checks before any trial
    # weights, data and output: a one-line SettingError before Ray starts; what it read flows on
    checked = preflight.check(cfg, TUNE_DIR)
    cluster.connect()
    data = _data(cfg)  # generated once for all trials (and the ensemble's test split) without --data
    tuner = _tuner(cfg, space, data, checked)
    grid = tuner.fit()
    spec = get_task(cfg.task)
    rows, histories = sweep_report.collect(grid, cfg, spec, list(space.describe()))
    best = sweep_report.export_best(rows, cfg)
    ensemble = None
    if cfg.ensemble_top:
        from eyeray.sweep.ensemble import evaluate_top

        ensemble = evaluate_top(rows, cfg, spec, data, checked.layout)
    report = sweep_report.write(cfg, spec, rows, histories, space.describe(), ensemble)
    log.info("leaderboard: %s", storage.join(cfg.output, sweep_report.LEADERBOARD))
    log.info("report: %s", report)
    if best:
        log.info(f"best bundle: {best}")
    return SweepResult(
        output=cfg.output, leaderboard=rows, best=best, report=report, ensemble=ensemble, histories=histories
    )
