"""Measuring a model on labelled data: task metrics (scikit-learn), report plots (matplotlib) and
the training report (metrics.json + PNGs) a clinician can read."""
