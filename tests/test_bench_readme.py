"""The README's benchmark figures are the benchmark files' figures: bench/readme.py renders that
section from bench/results/*.json, so a figure typed by hand, or a re-measured file without a
re-rendered README, fails here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_benchmark_section_is_rendered_from_the_result_files():
    proc = subprocess.run(
        [sys.executable, "bench/readme.py", "--check"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr


def test_a_typed_figure_is_caught(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import readme
    finally:
        sys.path.remove(str(REPO / "bench"))
    edited = tmp_path / "README.md"
    edited.write_text(readme.README.read_text().replace(readme.BEGIN + "\n", readme.BEGIN + "\n| 9.99 |\n", 1))
    monkeypatch.setattr(readme, "README", edited)
    assert readme.main(["--check"]) == 1
    assert readme.main([]) == 0 and readme.main(["--check"]) == 0  # re-rendered: in step again
