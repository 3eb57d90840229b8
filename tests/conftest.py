"""Shared fixtures: the real samples beside the checkout, and one local Ray cluster per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("EYERAY_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _sample(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.fail(
            f"real sample folder {path} is missing: tests expect ../shared/data beside the checkout "
            "(or EYERAY_SHARED_DATA pointing at it)"
        )
    return path


@pytest.fixture(scope="session")
def oct_sample() -> Path:
    return _sample("oct-sample")


@pytest.fixture(scope="session")
def glaucoma_sample() -> Path:
    return _sample("glaucoma-sample")


@pytest.fixture(scope="session")
def odir_sample() -> Path:
    return _sample("odir-sample")
