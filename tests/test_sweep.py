"""Model-selection sweeps on a real local Ray cluster: ASHA stops a bad trial, the leaderboard and
report list every trial, the best bundle scores, an interrupted sweep resumes without rerunning
finished trials, and a bad search-space file fails before any trial starts."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from eyeray.data import imaging
from eyeray.model import bundle
from eyeray.sweep import SweepConfig, run, search_space
from eyeray.sweep.driver import concurrency
from eyeray.sweep.results import SCORE

REPO = Path(__file__).resolve().parents[1]

# Tiny trials: a small CNN at 32 px on the embedded default data. The grid fixes the order (one
# trial at a time on this 2-CPU cluster): a learning trial, one that cannot learn (its learning
# rate is ~0, so its validation macro F1 stays at the initial model's), then another learning one.
# ASHA (grace period 2, reduction factor 2) compares each trial at epoch 2 with the median of
# those before it, so the second is stopped there.
SPACE = """
backbone: small_cnn
image_size: 32
learning_rate: {grid: [3.0e-3, 1.0e-7, 3.0e-3]}
dropout: 0.2
augment_strength: 0
batch_size: 16
fine_tune_layers: null
fine_tune_lr_factor: 0.01
"""
EPOCHS = 3


def write_space(tmp_path: Path, text: str, name: str = "space.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def read_leaderboard(output: Path) -> list[dict[str, str]]:
    with open(output / "leaderboard.csv") as f:
        return list(csv.DictReader(f))


def _finished_trials(experiment: Path) -> list[str]:
    """Trials Tune's saved experiment state records as finished (what a restore goes by)."""
    from ray.tune import ExperimentAnalysis

    try:
        trials = ExperimentAnalysis(str(experiment)).trials
    except Exception:  # no state written yet, or caught mid-write
        return []
    return [t.trial_id for t in trials if t.status == "TERMINATED"]


def _interrupt_after_first_trial(cmd: list[str], env: dict[str, str], experiment: Path) -> str:
    """Run a sweep driver until Tune has recorded one finished trial, then kill it outright."""
    log = open(experiment.parent.parent / "driver.log", "w")
    driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while not _finished_trials(experiment):
            assert driver.poll() is None, "the sweep ended before it could be interrupted"
            assert time.monotonic() < deadline, "no trial finished within 10 minutes"
            time.sleep(2)
    finally:
        driver.send_signal(signal.SIGKILL)  # the driver dies: Ray stops its trials with it
        driver.wait()
        log.close()
    [first] = _finished_trials(experiment)
    return first


@pytest.mark.cluster
def test_sweep_stops_a_bad_trial_early_resumes_after_interruption_and_exports_the_best(ray_cluster, tmp_path):
    """One sweep for every end-to-end behaviour (trials are the slow part): started as a job
    script, killed after its first trial, resumed; then ASHA's cut, the leaderboard, the report,
    the best bundle and the ensemble of the top 2 are checked on the finished sweep."""
    output = tmp_path / "sweep"
    space = write_space(tmp_path, SPACE)
    args = [
        "--task",
        "oct",
        "--output",
        str(output),
        "--trials",
        "1",
        "--epochs",
        str(EPOCHS),
        "--grace-period",
        "2",
        "--space",
        space,
        "--ensemble-top",
        "2",
    ]
    first = _interrupt_after_first_trial([sys.executable, "jobs/sweep.py", *args], ray_cluster["env"], output / "tune")
    # a trial's Ray Data runs with the driver's progress settings: no "tqdm is not installed" from Ray
    assert "tqdm" not in (tmp_path / "driver.log").read_text()
    manifest = output / "trials" / first / "bundle" / "manifest.json"
    before = (manifest.stat().st_mtime_ns, json.loads(manifest.read_text())["version"])
    assert not (output / "leaderboard.csv").exists()

    cfg = SweepConfig(
        task="oct", output=str(output), trials=1, epochs=EPOCHS, grace_period=2, space=space, ensemble_top=2
    )
    with pytest.raises(FileExistsError, match="--resume"):
        run(cfg)
    result = run(dataclasses.replace(cfg, resume=True))

    # resumed: the finished trial was not run again
    assert (manifest.stat().st_mtime_ns, json.loads(manifest.read_text())["version"]) == before
    rows = read_leaderboard(output)
    assert len(rows) == 3 and len({r["trial_id"] for r in rows}) == 3 and first in {r["trial_id"] for r in rows}

    # ASHA stopped the trial that cannot learn at its first rung (against the rung record of the
    # trial finished before the interruption, restored with the sweep); the others trained to the end
    by_lr = sorted(rows, key=lambda r: float(r["learning_rate"]))
    frozen = by_lr[0]
    assert float(frozen["learning_rate"]) == pytest.approx(1e-7)
    assert frozen["status"] == "early-stopped" and int(frozen["epochs_run"]) == 2 < EPOCHS
    assert [int(r["epochs_run"]) for r in by_lr[1:]] == [EPOCHS, EPOCHS]
    assert {r["status"] for r in by_lr[1:]} == {"finished"}
    rungs = json.loads((output / "asha_state.json").read_text())["rungs"][0]
    assert set(rungs[-1]) == {r["trial_id"] for r in rows}  # every trial reached the rung at epoch 2
    for row in rows:
        assert float(row["wall_time_s"]) > 0 and row["backbone"] == "small_cnn" and row["image_size"] == "32"
    winner = rows[0]
    assert winner["rank"] == "1" and winner["status"] == "finished"
    assert float(winner["best_val_macro_f1"]) > float(frozen["best_val_macro_f1"] or 0)
    history = result.histories[winner["trial_id"]]  # every epoch reached Tune with the task's metric
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    assert all(h["val_macro_f1"] is not None for h in history)
    # ASHA saw each epoch's best so far (a dip after a good epoch does not count against the trial)
    best_so_far = list(itertools.accumulate((h["val_macro_f1"] for h in history), max))
    assert [h[SCORE] for h in history] == pytest.approx(best_so_far)

    # the best bundle is a normal bundle: it loads, verifies and scores real files
    best = bundle.load(str(output / "best"))
    bundle.verify(best)
    assert best.version == bundle.read_manifest(winner["bundle"])["version"]
    files = [next(d.iterdir()) for d in sorted((output / "demo_data").iterdir())]  # one image per class
    images = np.stack([imaging.preprocess(imaging.decode(f.read_bytes()), best.image_size) for f in files])
    probs = best.predict(images)
    assert probs.shape == (len(files), 4) and np.allclose(probs.sum(axis=1), 1, atol=1e-4)
    assert all(len(labels) == 1 for labels in best.decide(probs).labels)

    # report, curves and the ensemble of the top 2 (mean and vote), with figures either way
    html = (output / "report.html").read_text()
    assert winner["trial_id"] in html and "class=winner" in html
    assert (output / "sweep_curves.png").stat().st_size > 10_000
    summary = json.loads((output / "sweep.json").read_text())
    ensemble = summary["ensemble"]
    assert [m["trial_id"] for m in ensemble["members"]] == [r["trial_id"] for r in rows[:2]]
    assert ensemble["n_test"] > 0 and ensemble["best_single"] == ensemble["members"][0]["macro_f1"]
    for method in ("mean", "vote"):
        assert 0 <= ensemble[method]["macro_f1"] <= 1 and isinstance(ensemble[f"{method}_beats_best"], bool)
    assert (output / "ensemble.png").stat().st_size > 5_000
    assert "majority vote" in html and "single best" in html


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("backbone: [small_cnn, resnet9000]", r"backbone: unknown backbone 'resnet9000'"),
        ("learning_rate: {low: 0.01, high: 0.001, log: true}", r"learning_rate: low \(0.01\) must be below high"),
        ("dropout: lots", r"dropout: 'lots' is not a number"),
        ("batch_size: [16, 0]", r"batch_size: 0 is outside \[1, 4096\]"),
        ("learning_rte: 0.001", r"unknown key\(s\) learning_rte"),
        ("backbone: xception\nimage_size: 32", r"image_size 32 is below xception's minimum"),
        ("dropout: {grid: [0.2], low: 0.1}", r"dropout: grid takes no low/high/log"),
    ],
)
def test_bad_search_space_file_fails_before_any_trial_with_the_key_named(tmp_path, text, message):
    """No cluster: the space is checked before Ray is even initialised."""
    path = write_space(tmp_path, text)
    with pytest.raises(ValueError, match=message):
        search_space.load("oct", demo=True, path=path)
    output = tmp_path / "sweep"
    with pytest.raises(ValueError, match=message):
        run(SweepConfig(task="oct", output=str(output), space=path))
    assert not output.exists()


def test_json_space_file_overrides_only_the_keys_it_names(tmp_path):
    path = write_space(tmp_path, json.dumps({"learning_rate": {"grid": [0.001, 0.01]}, "batch_size": 8}), "s.json")
    space = search_space.load("glaucoma", demo=False, path=path)
    default = search_space.load("glaucoma", demo=False)
    assert space.learning_rate.grid and space.learning_rate.values == (0.001, 0.01)
    assert space.batch_size.values == (8,) and space.backbone == default.backbone
    assert "xception+inception_resnet_v2" in default.backbone.values  # the concatenation ensemble
    assert set(default.backbone.values) >= {"vgg16", "xception", "inception_resnet_v2", "mobilenet_v2", "small_cnn"}


def test_a_trial_that_can_never_fit_the_cluster_is_refused():
    assert concurrency(SweepConfig(cpus_per_trial=0.5), {"CPU": 2.0}) == 2
    assert concurrency(SweepConfig(gpus_per_trial=1), {"CPU": 8.0, "GPU": 2.0}) == 2
    with pytest.raises(ValueError, match="one trial needs 1 CPU \\+ 1 CPU for Ray Data and 1 GPU"):
        concurrency(SweepConfig(gpus_per_trial=1), {"CPU": 8.0})
    with pytest.raises(ValueError, match="cluster has 1 CPU"):
        concurrency(SweepConfig(), {"CPU": 1.0})


def test_job_script_and_eyeray_sweep_parse_the_same_flags_into_one_config():
    from eyeray.cli import add_sweep_arguments, sweep_config

    argv = [
        "--task",
        "glaucoma",
        "--data",
        "s3://bucket/airogs",
        "--trials",
        "48",
        "--gpus-per-trial",
        "1",
        "--time-budget",
        "90m",
        "--space",
        "space.yaml",
        "--ensemble-top",
        "3",
        "--resume",
    ]
    cfg = sweep_config(add_sweep_arguments(argparse.ArgumentParser()).parse_args(argv))
    assert cfg == SweepConfig(
        task="glaucoma",
        data="s3://bucket/airogs",
        trials=48,
        gpus_per_trial=1,
        time_budget=5400.0,
        space="space.yaml",
        ensemble_top=3,
        resume=True,
    )
    resolved = cfg.resolved()
    assert (resolved.weights, resolved.epochs, resolved.fine_tune_epochs) == ("imagenet", 10, 10)
    demo = SweepConfig(task="oct").resolved()
    assert (demo.weights, demo.epochs, demo.fine_tune_epochs) == ("none", 8, 0)
    with pytest.raises(ValueError, match="--ensemble-top K needs K >= 2"):
        SweepConfig(ensemble_top=1).resolved()


def test_asha_rung_records_survive_a_restart_of_the_scheduler(tmp_path):
    """What Tuner.restore does to a scheduler (a fresh copy of the one pickled at the start) must
    not forget the rungs: a weak trial after the restart is still compared with the earlier ones."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from eyeray.sweep.scheduler import ResumableASHA

    def scheduler(state: Path) -> ResumableASHA:
        return ResumableASHA(str(state), time_attr="epoch", metric="score", mode="max", max_t=3, grace_period=1)

    strong, weak = SimpleNamespace(trial_id="strong"), SimpleNamespace(trial_id="weak")
    first = scheduler(tmp_path / "asha.json")
    first.on_trial_add(None, strong)
    assert first.on_trial_result(None, strong, {"epoch": 1, "score": 0.9}) == TrialScheduler.CONTINUE

    restored = scheduler(tmp_path / "asha.json")  # the driver died; a resumed sweep starts here
    restored.on_trial_add(None, weak)
    assert restored.on_trial_result(None, weak, {"epoch": 1, "score": 0.1}) == TrialScheduler.STOP
    forgetful = scheduler(tmp_path / "elsewhere.json")  # plain ASHA after a restore: nothing to compare with
    forgetful.on_trial_add(None, weak)
    assert forgetful.on_trial_result(None, weak, {"epoch": 1, "score": 0.1}) == TrialScheduler.CONTINUE
