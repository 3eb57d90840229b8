"""eyeray: train, score and serve retinal-disease image classifiers on Ray."""

__version__ = "0.1.0"
