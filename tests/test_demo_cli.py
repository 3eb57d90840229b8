"""`eyeray demo` as a newcomer runs it: the installed command, no RAY_ADDRESS (it starts its own
Ray), a fresh home folder. It must succeed, say what it did in few lines, and show the archive's
broken files as error rows and the service's 422."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
from conftest import free_port

from eyeray.decision.gate import Verdict

pytestmark = pytest.mark.cluster
MAX_LINES = 60  # issue 14: every line means something to a user


def test_eyeray_demo_from_the_command_line(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") or k == "RAY_USAGE_STATS_ENABLED"}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0")
    cmd = [shutil.which("eyeray"), "demo", "--epochs", "2", "--image-size", "32", "--port", str(free_port())]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 0, "\n".join(lines[-60:])
    assert len(lines) <= MAX_LINES, f"{len(lines)} lines:\n" + "\n".join(lines)
    assert "[eyeray demo] done" in proc.stdout
    summary = json.loads(next(line for line in proc.stdout.splitlines() if line.strip().startswith('{"files_seen"')))
    assert summary["errors"] == 3 and summary["scored"] + summary["declined"] == 40  # answered, or declined by the gate
    served = next(line for line in proc.stdout.splitlines() if line.strip().startswith("served"))
    assert served.count("-> 200") == 3 and served.count("-> 422") == 1
    scores = next(Path(p) for p in tmp_path.glob("runs/oct-demo-*/scores"))
    rows = pads.dataset(scores, format="parquet", exclude_invalid_files=True).to_table().to_pylist()
    assert sum(r["status"] == "error" for r in rows) == 3 and len(rows) == 43
    # the service answered each posted file as the batch scorer did (the same bundle, the same decode)
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in rows}
    answers = [a.split(" -> ") for a in served.split(None, 1)[1].split("; ")]
    for name, answer in answers:
        if not answer.startswith("200 "):
            continue
        row, said = by_name[name], answer.removeprefix("200 ")
        if row["status"] == "declined":  # the gate's reason instead of a label, on both routes
            verdict = Verdict(np.array([row["gate"]], object), np.array([row["gate_reason"] or ""], object), np.ones(1))
            assert said == verdict.answer(0)["reason"], (name, answer, row)
        else:
            assert said.split(" (confidence ")[0] == row["label"], (name, answer, row)
