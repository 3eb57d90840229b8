"""Images in: what counts as an input file, the one decode and preprocess (errors as values),
dataset layouts, records -> Ray Datasets, training augmentation, and the synthetic demo data."""
