"""Where the real sample images are: the folder the EYERAY_SAMPLES setting names.

One setting for the tests (tests/conftest.py) and the benchmarks (which import it from here; the
tests import no bench module). A relative value is taken from the
repository root; without the setting, the folder the development machines keep beside the checkout.
What each sample folder holds and where it comes from: docs/testing.md.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository
SETTING = "EYERAY_SAMPLES"
SAMPLES = (ROOT / os.environ.get(SETTING, str(Path("..") / "shared" / "data"))).resolve()

# each sample folder, and the public dataset its images come from
FOLDERS = {
    "oct-sample": "Kermany 2018 OCT",
    "oct-train": "Kermany 2018 OCT",
    "glaucoma-sample": "EyePACS-AIROGS-light",
    "odir-sample": "ODIR-5K",
}


def missing(name: str) -> str:
    """Why a test or benchmark that needs sample folder `name` cannot run."""
    return (
        f"real sample folder {name!r} not found in {SAMPLES}: set {SETTING} to a folder holding small samples "
        "of the public datasets Kermany 2018 OCT, EyePACS-AIROGS-light and ODIR-5K "
        f"({name!r} comes from {FOLDERS.get(name, 'one of them')}; layouts in docs/testing.md)"
    )
