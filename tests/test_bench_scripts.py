"""The benchmarks that the GPU check runs still run: `bench/gpu_check.sh` scores with
`bench/score_throughput.py --archive-images`, and a renamed eyeray setting once broke it silently
(the script passed `mixed_precision=` to ScoreConfig after it moved into InferenceOptions). Run as
a script over a few images with a tiny model, on a private local Ray of its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import private_local_ray

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.cluster


@pytest.mark.parametrize("accelerated", [False, True], ids=["plain", "jit-and-16-bit"])
def test_score_throughput_at_archive_size_runs_and_writes_its_figures(accelerated, tmp_path):
    out = tmp_path / "figures.json"
    cmd = [sys.executable, "bench/score_throughput.py", "--archive-images", "6", "--images", "4"]
    cmd += ["--model", "small_cnn:64", "--batch-size", "4", "--out", str(out)]
    cmd += ["--jit-compile", "--mixed-precision"] if accelerated else []
    with private_local_ray(tmp_path) as env:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    figures = json.loads(out.read_text())
    assert figures["pipeline"]["images"] == 6 and figures["pipeline"]["errors"] == 0, figures
    assert figures["pipeline"]["end_to_end_images_per_s"] > 0
    assert [run["images"] for run in figures["bare_model"]["runs"]] == [4, 4], figures
    assert (figures["jit_compile"], figures["mixed_precision"]) == (accelerated, accelerated)
