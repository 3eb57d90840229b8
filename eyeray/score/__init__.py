"""Batch scoring of an archive with Ray Data: the pipeline, the predictor actor, Parquet shards
committed exactly once, and the HTML report. `run` is the entry point."""

from eyeray.score.pipeline import ScoreConfig, run

__all__ = ["ScoreConfig", "run"]
