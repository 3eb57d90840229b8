"""The reference is a MkDocs site (mkdocs.yml, docs/): it builds with `mkdocs build --strict`, so a
broken link or anchor, a missing snippet or a page left out of the navigation fails here; and the
README's links reach files of the repository, never a path outside it."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_the_docs_build_strictly(tmp_path):
    missing = [name for name in ("mkdocs", "material") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"MkDocs is not installed ({', '.join(missing)} missing): pip install -e '.[docs]'")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "index.html").exists()
    training = (tmp_path / "site" / "training" / "index.html").read_text()
    assert "jobs/train_glaucoma.py" in training and "<table>" in training  # the README's snippets were included


def readme_links() -> list[str]:
    text = re.sub(r"```.*?```", "", (REPO / "README.md").read_text(), flags=re.S)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_the_readme_links_reach_files_of_the_repository():
    for link in readme_links():
        if link.startswith(("http://", "https://", "#")):
            continue
        target = (REPO / link.split("#")[0]).resolve()
        assert target.is_relative_to(REPO), f"README.md links outside the repository: {link}"
        assert target.exists(), f"README.md links to a missing file: {link}"


def test_no_user_facing_page_points_outside_the_repository():
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        assert "../shared" not in page.read_text(), f"{page.relative_to(REPO)} sends users to ../shared"
