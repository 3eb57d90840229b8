"""The benchmarks that the GPU check runs still run: `bench/gpu_check.sh` scores with
`bench/score_throughput.py --archive-images`, and a renamed eyeray setting once broke it silently
(the script passed `mixed_precision=` to ScoreConfig after it moved into InferenceOptions). Run as
a script over a few images with a tiny model, on a private local Ray of its own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import stop_cluster

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.cluster


@pytest.mark.parametrize("accelerated", [False, True], ids=["plain", "jit-and-16-bit"])
def test_score_throughput_at_archive_size_runs_and_writes_its_figures(accelerated, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "EYERAY_"))}
    ray_tmp = tempfile.mkdtemp(prefix="rb-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env.update(HOME=str(tmp_path), RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0")
    out = tmp_path / "figures.json"
    cmd = [sys.executable, "bench/score_throughput.py", "--archive-images", "6", "--images", "4"]
    cmd += ["--model", "small_cnn:64", "--batch-size", "4", "--out", str(out)]
    cmd += ["--jit-compile", "--mixed-precision"] if accelerated else []
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    finally:
        stop_cluster(ray_tmp, "no-such-address")  # only if the script did not shut its Ray down
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    figures = json.loads(out.read_text())
    assert figures["pipeline"]["images"] == 6 and figures["pipeline"]["errors"] == 0, figures
    assert figures["pipeline"]["end_to_end_images_per_s"] > 0
    assert [run["images"] for run in figures["bare_model"]["runs"]] == [4, 4], figures
    assert (figures["jit_compile"], figures["mixed_precision"]) == (accelerated, accelerated)
