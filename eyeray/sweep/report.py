"""What a sweep leaves for people: OUTPUT/leaderboard.csv, report.html with its PNGs, sweep.json,
and the winner's bundle at OUTPUT/best.

Rows come from Tune's results (every epoch each trial reported) and from the trials' own run
folders (a bundle exists only for a trial that trained to the end and passed its test-split
evaluation), so the leaderboard says what happened to every trial, stopped or failed ones too.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from eyeray import storage
from eyeray.evaluation import pages
from eyeray.evaluation.model_card import CARD_FILE
from eyeray.evaluation.plots import save_figure, series
from eyeray.model import bundle
from eyeray.sweep.results import BEST_DIR, SCORE, TRIALS_DIR, UNDEFINED_SCORE, trial_output
from eyeray.tasks import TaskSpec

log = logging.getLogger(__name__)

LEADERBOARD = "leaderboard.csv"
REPORT = "report.html"
SUMMARY = "sweep.json"
CURVES_PNG = "sweep_curves.png"
ENSEMBLE_PNG = "ensemble.png"
STATUSES = ("finished", "early-stopped", "error", "not run")


def collect(grid, cfg, spec: TaskSpec, params: list[str]) -> tuple[list[dict[str, Any]], dict[str, list[dict]]]:
    """One row per trial, best first (finished trials, by best validation score, ties by the
    validation loss at that epoch), and each trial's per-epoch history."""
    rows, histories = [], {}
    for result in grid:
        trial_id = os.path.basename(str(result.path).rstrip("/"))
        history = _history(result.metrics_dataframe)
        histories[trial_id] = history
        best = max(history, key=lambda h: h[SCORE]) if history else None
        uri = storage.join(trial_output(cfg.output, trial_id), "bundle")
        manifest = _manifest(uri)
        status = "error" if result.error else "finished" if manifest else "early-stopped" if history else "not run"
        test = (manifest or {}).get("metrics", {}).get(spec.selection_metric)
        rows.append(
            {
                "trial_id": trial_id,
                "status": status,
                **{p: (result.config or {}).get(p) for p in params},
                f"best_val_{spec.selection_metric}": None
                if best is None or best[SCORE] == UNDEFINED_SCORE
                else best[SCORE],
                "best_epoch": best["epoch"] if best else None,
                "val_loss_at_best": best.get("val_loss") if best else None,  # breaks ties of the metric
                "epochs_run": len(history),
                "wall_time_s": round(history[-1].get("time_total_s", 0.0), 1) if history else None,
                f"test_{spec.selection_metric}": test,
                "bundle": uri if manifest else "",
                "error": _first_line(result.error),
            }
        )
    key = f"best_val_{spec.selection_metric}"
    rows.sort(
        key=lambda r: (
            r["status"] != "finished",
            -(r[key] if r[key] is not None else -math.inf),
            r["val_loss_at_best"] if r["val_loss_at_best"] is not None else math.inf,
        )
    )
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    return rows, histories


def _history(frame) -> list[dict[str, Any]]:
    """Per-epoch reports, one per epoch (a trial restarted by a resume may report an epoch twice)."""
    if frame is None or "epoch" not in frame:
        return []
    by_epoch = {}
    for record in frame.to_dict("records"):
        if record.get("epoch") is not None and not _nan(record["epoch"]):
            by_epoch[int(record["epoch"])] = {k: (None if _nan(v) else v) for k, v in record.items()}
    return [by_epoch[e] for e in sorted(by_epoch)]


def _nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _first_line(error: Exception | None) -> str:
    return "" if error is None else (str(error).strip().splitlines() or [type(error).__name__])[-1][:300]


def _manifest(uri: str) -> dict[str, Any] | None:
    try:
        return bundle.read_manifest(uri)
    except bundle.BundleError:
        return None


def winner(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((r for r in rows if r["status"] == "finished"), None)


def export_best(rows: list[dict[str, Any]], cfg) -> str | None:
    """The winner's bundle, copied as is (same model file, same manifest and version) to OUTPUT/best."""
    top = winner(rows)
    if top is None:
        log.info("no trial finished: no best bundle")
        return None
    target = storage.join(cfg.output, BEST_DIR)
    local, tmp = storage.local_copy(top["bundle"])
    try:
        storage.publish_dir(local, target, commit_file=bundle.MANIFEST)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return target


# --------------------------------------------------------------------------- files


def write(
    cfg,
    spec: TaskSpec,
    rows: list[dict[str, Any]],
    histories: dict[str, list[dict]],
    space: dict[str, str],
    ensemble: dict[str, Any] | None,
) -> str:
    """Write the leaderboard, plots, summary JSON and report.html to OUTPUT; return the report's URI."""
    from dataclasses import asdict

    top = winner(rows)
    with tempfile.TemporaryDirectory(prefix="eyeray-sweep-") as tmp:
        out = Path(tmp)
        _write_csv(rows, out / LEADERBOARD)
        plot_curves(spec, histories, rows, out / CURVES_PNG)
        files = [LEADERBOARD, CURVES_PNG]
        if ensemble and ensemble.get("members") and "mean" in ensemble:
            plot_ensemble(spec, ensemble, out / ENSEMBLE_PNG)
            files.append(ENSEMBLE_PNG)
        summary = {
            "config": asdict(cfg),
            "space": space,
            "selection_metric": f"val_{spec.selection_metric}",
            "winner": top,
            "best_bundle": storage.join(cfg.output, BEST_DIR) if top else None,
            "statuses": {s: sum(r["status"] == s for r in rows) for s in STATUSES},
            "leaderboard": rows,
            "ensemble": ensemble,
        }
        (out / SUMMARY).write_text(json.dumps(summary, indent=2, default=str))
        (out / REPORT).write_text(_html(cfg, spec, rows, space, ensemble, files))
        fs, path = storage.filesystem(cfg.output)
        fs.makedirs(path, exist_ok=True)
        for name in [*files, SUMMARY, REPORT]:
            fs.put_file(str(out / name), f"{path}/{name}")
    return storage.join(cfg.output, REPORT)


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    columns = ["rank", *[k for k in rows[0] if k != "rank"]] if rows else ["rank", "trial_id", "status"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def plot_curves(spec: TaskSpec, histories: dict[str, list[dict]], rows: list[dict[str, Any]], path: Path) -> None:
    """Every trial's validation metric per epoch in one plot; the winner thick, stopped trials dashed."""
    key = f"val_{spec.selection_metric}"
    top = winner(rows)
    status = {r["trial_id"]: r["status"] for r in rows}
    fig = Figure(figsize=(9, 5))
    ax = fig.subplots()
    for trial_id, history in histories.items():
        xs, ys = series(history, key)
        if not xs:
            continue
        is_top = top is not None and trial_id == top["trial_id"]
        style = "-" if status.get(trial_id) == "finished" else "--"
        ax.plot(
            xs,
            ys,
            style,
            marker="o",
            markersize=3,
            linewidth=3 if is_top else 1,
            alpha=1 if is_top else 0.6,
            color="crimson" if is_top else None,
            zorder=3 if is_top else 2,
            label=f"{trial_id} (winner)" if is_top else (trial_id if len(histories) <= 12 else None),
        )
    ax.set(
        title=f"{spec.title}\nvalidation {spec.selection_metric} per epoch, every trial (dashed: stopped early)",
        xlabel="Epoch",
        ylabel=spec.selection_metric,
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    save_figure(fig, path)


def plot_ensemble(spec: TaskSpec, ensemble: dict[str, Any], path: Path) -> None:
    """Test-split metric of each member, the averaged ensemble and the majority vote."""
    metric = spec.selection_metric
    names = [m["trial_id"] for m in ensemble["members"]] + ["mean", "vote"]
    values = [m[metric] for m in ensemble["members"]] + [ensemble["mean"][metric], ensemble["vote"][metric]]
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    colors = ["steelblue"] * len(ensemble["members"]) + ["darkorange", "seagreen"]
    bars = ax.bar(range(len(names)), [v if v is not None else 0 for v in values], color=colors)
    ax.bar_label(bars, labels=[_fmt(v) if v is not None else "undefined" for v in values], fontsize=8)
    best = ensemble["members"][0][metric]
    if best is not None:
        ax.axhline(best, color="crimson", linestyle="--", label=f"single best ({names[0]})")
        ax.legend(loc="lower right")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set(
        title=f"Top {len(ensemble['members'])} trials on the test split ({ensemble['n_test']} images)",
        ylabel=f"test {metric}",
    )
    save_figure(fig, path)


def _fmt(value: Any) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(rows: list[dict[str, Any]], highlight: str | None = None) -> dict[str, Any]:
    """Rows of dicts as a table of formatted cells (the columns are the first row's keys)."""
    columns = list(rows[0]) if rows else []
    return {
        "columns": columns,
        "rows": [
            {"cells": [_fmt(r.get(c)) for c in columns], "winner": bool(highlight) and r.get("trial_id") == highlight}
            for r in rows
        ],
    }


def _ensemble(spec: TaskSpec, ensemble: dict[str, Any] | None, files: list[str]) -> dict[str, Any] | None:
    """The top-K ensemble's section: members, averaged and voted, against the single best model."""
    if not ensemble:
        return None
    if "mean" not in ensemble:
        return {"heading": f"Ensemble of the top {ensemble['k']}", "note": ensemble.get("note", ""), "table": None}
    metric = spec.selection_metric
    verdicts = [
        f"{'averaged probabilities' if method == 'mean' else 'majority vote'}: "
        f"{_fmt(ensemble[method][metric])} {'beats' if ensemble[f'{method}_beats_best'] else 'does not beat'} "
        f"the single best model's {_fmt(ensemble['best_single'])}"
        for method in ("mean", "vote")
    ]
    rows = [
        *ensemble["members"],
        {"trial_id": "ensemble: mean", **ensemble["mean"]},
        {"trial_id": "ensemble: vote", **ensemble["vote"]},
    ]
    return {
        "heading": f"Ensemble of the top {len(ensemble['members'])} (test split, {ensemble['n_test']} images)",
        "verdicts": verdicts,
        "image": ENSEMBLE_PNG if ENSEMBLE_PNG in files else None,
        "table": _table(rows),
    }


def _winner(spec: TaskSpec, top: dict[str, Any] | None) -> dict[str, Any] | None:
    """The winner, and its model card: every trial is an `eyeray.train.run`, whose report/index.html
    is written before its bundle, so a finished trial (one with a bundle) has one."""
    if top is None:
        return None
    card = "/".join((TRIALS_DIR, top["trial_id"], "report", CARD_FILE))
    return {"trial_id": top["trial_id"], "score": _fmt(top[f"best_val_{spec.selection_metric}"]), "card": card}


def _html(cfg, spec: TaskSpec, rows: list[dict[str, Any]], space: dict[str, str], ensemble, files: list[str]) -> str:
    """The page as a string: values are prepared here, eyeray/templates/sweep_report.html prints them."""
    top = winner(rows)
    settings = {
        "task": cfg.task,
        "data": cfg.data or "synthetic (embedded default)",
        "trials": cfg.trials,
        "epochs": f"{cfg.epochs} + {cfg.fine_tune_epochs} fine-tuning",
        "weights": cfg.weights,
        "ASHA": f"grace period {cfg.grace_period}, reduction factor {cfg.reduction_factor:g}",
        "time budget": f"{cfg.time_budget:g} s" if cfg.time_budget else "none",
    }
    return pages.render(
        "sweep_report.html",
        title=spec.title,
        metric=spec.selection_metric,
        winner=_winner(spec, top),
        n_trials=len(rows),
        counts=", ".join(f"{sum(r['status'] == s for r in rows)} {s}" for s in STATUSES),
        curves=CURVES_PNG,
        leaderboard=_table(rows, top["trial_id"] if top else None),
        ensemble=_ensemble(spec, ensemble, files),
        space=_table([{"parameter": k, "values": v} for k, v in space.items()]),
        settings=_table([{"setting": k, "value": v} for k, v in settings.items()]),
    )
