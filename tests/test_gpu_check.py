"""bench/gpu_check.sh, the one command a borrowed GPU machine runs (issue 15): its GPU steps cannot run
here, so their `eyeray` command lines are checked against the real CLI parser (a flag the CLI lacks
fails here, not during the few minutes a GPU is lent), and the script itself is run on this CPU
machine, where it must skip the GPU steps, say so, and still measure the bare model on the CPU."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import gpu_check  # noqa: E402

GPU_STEPS = ("train", "score", "serve", "train_mixed_precision", "score_accelerated")


def parse(argv: list[str]):
    """`eyeray ARGV` through the real parser; a rejected flag or value fails the test with argparse's words."""
    from eyeray.cli import get_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return get_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"eyeray rejects `eyeray {' '.join(argv)}`: {err.getvalue().strip()}")


def test_every_gpu_command_line_is_accepted_by_the_eyeray_parser(tmp_path):
    from eyeray.cli import serve_args

    flags = gpu_check.cli_flags()
    cmds = gpu_check.commands(tmp_path, "vgg16", 224, flags, port=18123)
    assert {"train", "score", "serve"} <= set(cmds)
    for argv in cmds.values():
        parse(argv)
    train = parse(cmds["train"])
    assert (train.command, train.task, train.backbone, train.image_size) == ("train", "oct", "vgg16", 224)
    assert train.use_gpu and train.epochs == 1 and train.weights == "none" and train.data is None
    score = parse(cmds["score"])
    assert score.gpus_per_actor == 1 and score.bundles == [str(tmp_path / "bundle")]
    serve = serve_args(parse(cmds["serve"]))  # the ServeArgs the serve step builds its application from
    assert serve.gpus_per_replica == 1
    # The variants follow the CLI as it is now: present exactly when their flags are.
    assert ("train_mixed_precision" in cmds) == ("--mixed-precision" in flags["train"])
    accel = {"--jit-compile", "--mixed-precision"} & flags["score"]
    assert ("score_accelerated" in cmds) == bool(accel)
    if accel:
        assert accel <= set(cmds["score_accelerated"])


def test_a_flag_the_cli_lacks_fails_the_check():
    parse(["train", "oct", "--use-gpu"])
    with pytest.raises(pytest.fail.Exception, match="--no-such-flag"):
        parse(["train", "oct", "--use-gpu", "--no-such-flag"])


def test_variant_steps_only_with_their_flags_and_gpu_steps_skipped_without_a_gpu(tmp_path):
    none = {"train": set(), "score": set(), "serve": set()}
    assert set(gpu_check.commands(tmp_path, "vgg16", 224, none)) == {"train", "score", "serve"}
    every = {"train": {"--mixed-precision"}, "score": {"--jit-compile", "--mixed-precision"}, "serve": set()}
    cmds = gpu_check.commands(tmp_path, "vgg16", 224, every)
    assert "--mixed-precision" in cmds["train_mixed_precision"]
    assert {"--jit-compile", "--mixed-precision"} <= set(cmds["score_accelerated"])

    steps = gpu_check.settle(gpu_check.plan(tmp_path, "small_cnn", 32, every, "no NVIDIA GPU (test)", 18123))
    skipped = {s.name: s.skip for s in steps if s.skip}
    assert set(skipped) == {"prepare", *GPU_STEPS}
    assert all(skipped[name].startswith("needs a GPU: no NVIDIA GPU") for name in GPU_STEPS)
    steps = gpu_check.settle(gpu_check.plan(tmp_path, "small_cnn", 32, none, None, 18123))
    skipped = {s.name: s.skip for s in steps if s.skip}
    assert set(skipped) == {"train_mixed_precision", "score_accelerated"}  # with a GPU, only absent flags skip
    assert "--mixed-precision" in skipped["train_mixed_precision"]


def test_missing_packages_are_named_and_the_check_stops_at_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(gpu_check.REQUIRED, "no_such_module_eyeray", "no-such-package==1")
    start = time.monotonic()
    assert gpu_check.main(["--out", str(tmp_path)]) == 3
    assert time.monotonic() - start < 5
    out = capsys.readouterr().out
    assert "missing Python packages: no_such_module_eyeray (pip install no-such-package==1)" in out
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["exit_code"] == 3 and "no_such_module_eyeray" in summary["reason"]


def test_a_step_over_its_limit_is_stopped_with_its_processes(tmp_path):
    """The throughput step cannot even import TensorFlow in 1 s: it is stopped, reported as not
    finished, and no process of it is left."""
    psutil = pytest.importorskip("psutil")
    step = gpu_check.Step("throughput", "bare model", 90, needs_gpu=False)
    ctx = {"work": str(tmp_path), "bundle": str(tmp_path / "bundle"), "backbone": "small_cnn", "image_size": 32}
    ctx.update(images=8, archive_images=0, repeats=1, serve_requests=1, variants="plain")
    start = time.monotonic()
    record = gpu_check.run_step(step, ctx, 1.0, tmp_path, sample_gpu=False)
    assert record["status"] == "failed" and record["timed_out"] and "did not finish within" in record["reason"]
    assert time.monotonic() - start < 1.0 + gpu_check.KILL_GRACE_S + 10
    left = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert not left


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="checks the path of a machine without a GPU")
def test_gpu_check_script_on_this_cpu_machine(tmp_path):
    out = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = ["bash", str(REPO / "bench" / "gpu_check.sh"), "--model", "small_cnn:32", "--images", "32", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for name in GPU_STEPS:  # one clear line per skipped GPU step
        assert sum(line.startswith(f"gpu_check: SKIPPED {name} ") for line in lines) == 1, proc.stdout
        assert any(f"SKIPPED {name} " in line and "needs a GPU: no NVIDIA GPU" in line for line in lines)

    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["exit_code"] == 0 and summary["gpu"]["usable"] is False
    assert summary["seconds"] < gpu_check.BUDGET_S
    status = {s["step"]: s for s in summary["steps"]}
    assert status["throughput"]["status"] == "ran" and status["throughput"]["seconds"] > 0
    assert all(status[name]["status"] == "skipped" and status[name]["reason"] for name in GPU_STEPS)
    assert summary["counts"] == {"ran": 1, "skipped": 6, "failed": 0}

    throughput = json.loads((out / "gpu_throughput.json").read_text())
    result = throughput["result"]
    assert result["device"] == "cpu" and result["model"] == "small_cnn:32"
    assert [r["batch_size"] for r in result["runs"]] == [64, 256]
    assert all(r["images"] == 32 and r["images_per_s"] > 0 and not r["mixed_precision"] for r in result["runs"])
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_throughput.json"]
