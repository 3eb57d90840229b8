"""The names a sweep's results go by, shared by the sweep driver and its report: where each trial
and the winner are written, and the score Tune and ASHA rank trials by."""

from __future__ import annotations

import math
from typing import Any

from eyeray import storage

TRIALS_DIR = "trials"  # OUTPUT/trials/<trial_id>: each trial's training run (bundle/, report/, checkpoints)
BEST_DIR = "best"
SCORE = "sweep_score"  # what Tune and ASHA rank by: the selection metric, UNDEFINED_SCORE when undefined
UNDEFINED_SCORE = -1.0  # below any value of macro F1, partial AUC or the ODIR score


def score(value: Any) -> float:
    """A validation metric as Tune ranks it: UNDEFINED_SCORE when it is undefined (None, NaN)."""
    return float(value) if value is not None and math.isfinite(float(value)) else UNDEFINED_SCORE


def trial_output(output: str, trial_id: str) -> str:
    return storage.join(output, TRIALS_DIR, trial_id)
