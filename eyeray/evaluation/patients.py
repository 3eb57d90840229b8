"""Per-eye rows to per-patient rows: the ODIR-2019 challenge scores one row per patient.

eyeray classifies each eye image; the ODIR-2019 ground truth and submissions have one label and
one probability vector per patient (both eyes together). `by_patient` turns the first into the
second so `eyeray.evaluation.metrics` can compute the official score on the challenge's rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PatientRows:
    ids: list[str]  # sorted patient ids, one per row
    labels: np.ndarray  # (patients, C)
    probs: np.ndarray  # (patients, C)
    images: np.ndarray  # (patients,) number of eye images aggregated into each row


def known(patients: Sequence[str] | np.ndarray | None) -> bool:
    """Whether every row has a patient id (None, or any "" entry: not all are known)."""
    return patients is not None and len(patients) > 0 and all(str(p) for p in patients)


def by_patient(y_true, probs, patients: Sequence[str] | np.ndarray) -> PatientRows:
    """Aggregate (n, C) per-eye labels and probabilities to one row per patient id.

    Labels: the element-wise max (the union) of the patient's eyes' labels. The ODIR-5K sheet
    labels the patient, not the eye: `eyeray.data.layouts.read_odir_sheet` gives each eye image the
    patient's full label vector, so for ODIR the union is that vector itself; the max only matters
    for a layout whose eyes carry labels of their own.

    Probabilities: the element-wise max over the patient's eyes. The challenge's question is
    whether the patient has a finding, and a patient has one if either eye shows it: a disease
    seen in one eye only must not be diluted by the healthy other eye, as a mean would. With a
    threshold, `max > th` is "some eye is above th", the union of the eyes' decisions, which
    matches the union of the labels. (The "N" (normal) column is aggregated the same way; the
    challenge's own N means both eyes are normal, which no per-column rule on N alone can give.)
    """
    y = np.asarray(y_true, dtype=float)
    p = np.asarray(probs, dtype=float)
    ids = np.asarray([str(i) for i in patients])
    if y.ndim != 2 or p.shape != y.shape or ids.shape != (len(y),):
        raise ValueError(f"by_patient: labels {y.shape}, probabilities {p.shape} and {ids.shape[0]} ids disagree")
    unique, row = np.unique(ids, return_inverse=True)
    labels = np.full((len(unique), y.shape[1]), -np.inf)
    scores = np.full((len(unique), y.shape[1]), -np.inf)
    np.maximum.at(labels, row, y)
    np.maximum.at(scores, row, p)
    return PatientRows([str(u) for u in unique], labels, scores, np.bincount(row, minlength=len(unique)))
