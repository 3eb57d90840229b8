"""Model selection with Ray Tune: the search space, resumable ASHA, the leaderboard and report, the
best bundle and a top-K ensemble. `run` is the entry point."""

from eyeray.sweep.driver import SweepConfig, SweepResult, run

__all__ = ["SweepConfig", "SweepResult", "run"]
