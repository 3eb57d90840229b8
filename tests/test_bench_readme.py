"""The documentation's benchmark figures are the benchmark files' figures: bench/readme.py renders
docs/benchmarks.md's and docs/capacity.md's generated sections from bench/results/*.json, so a figure
typed by hand, or a re-measured file without re-rendered pages, fails here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_and_capacity_pages_are_rendered_from_the_result_files():
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
    edited, capacity = tmp_path / "benchmarks.md", tmp_path / "capacity.md"
    edited.write_text(readme.BENCHMARKS.read_text().replace(readme.BEGIN + "\n", readme.BEGIN + "\n| 9.99 |\n", 1))
    capacity.write_text(
        readme.CAPACITY.read_text().replace(readme.CAPACITY_BEGIN + "\n", readme.CAPACITY_BEGIN + "\n1 h\n", 1)
    )
    monkeypatch.setattr(readme, "BENCHMARKS", edited)
    monkeypatch.setattr(readme, "CAPACITY", capacity)
    assert readme.main(["--check"]) == 1
    assert readme.main([]) == 0 and readme.main(["--check"]) == 0  # re-rendered: in step again
    assert "9.99" not in edited.read_text() and "\n1 h\n" not in capacity.read_text()
