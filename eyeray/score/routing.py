"""Mixed archives: bundles of several tasks in one scoring run, each image sent to the task(s)
whose gate accepts it (an OCT scan to the OCT bundle, a fundus photo to the glaucoma and ODIR
bundles, a scanned letter to none).

The rows: one per (file, task that answered), so a fundus photo that two fundus tasks accept gets
two rows, each as a single-task run writes it, with `task` saying which. A file that no task's gate
accepts is one row with status "declined" and gate "out_of_scope" (`eyeray.decision.gate`; its
reason names each task's verdict); a file that fails to decode is one error row. A file's rows are
made in one model batch and written in one shard, so a re-run resumes exactly once by path, as
single-task runs do. Why not
one row per file with a column group per task: the Parquet files would then differ by which tasks a
run had, and a reader would have to know them; here every run has the same columns, and
`task = 'oct'` selects one task's answers. In a routed run, `probabilities` is a map (class ->
probability), since the tasks' classes differ, and `label` is always a list of labels.

Bundles of the same task still form an ensemble (`--ensemble`), within their task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from eyeray.decision import gate
from eyeray.model.bundle import BundleError, check_compatible

SEPARATOR = "::"  # task-prefixed columns between the model stage and the shard writer: "oct::label"


@dataclass
class TaskGroup:
    """The bundles of one task in a scoring run (one, or an ensemble), by position in --bundle."""

    task: str
    members: list[int]
    manifests: list[dict[str, Any]]


def group(manifests: list[dict[str, Any]], gate_on: bool = True) -> list[TaskGroup]:
    """The run's bundles grouped by task, in the order tasks first appear. Several tasks route by
    their gates, so each of their bundles needs one, and the gate must be on."""
    groups: dict[str, TaskGroup] = {}
    for i, manifest in enumerate(manifests):
        groups.setdefault(manifest["task"], TaskGroup(manifest["task"], [], [])).members.append(i)
        groups[manifest["task"]].manifests.append(manifest)
    for g in groups.values():
        check_compatible(g.manifests)
    if len(groups) > 1:
        if not gate_on:
            raise BundleError(f"bundles of {len(groups)} tasks route images by their gates: --gate off needs one task")
        without = [f"{m['task']} {m['version']}" for m in manifests if not m.get("gate")]
        if without:
            raise BundleError(
                f"bundles of several tasks route images by their gates, and {', '.join(without)} has none "
                "(made before eyeray had one): retrain it, or score its task on its own"
            )
    return list(groups.values())


def routed(columns: dict[str, np.ndarray], tasks: list[str]) -> dict[str, np.ndarray]:
    """Per task, whether it answers each row: bool (n,), by `eyeray.decision.gate.routes_to` (its
    gate accepted the image, and a DICOM header's modality, when it names one, is the task's)."""
    modality = np.asarray(columns.get("modality", np.full(len(columns["path"]), "", object)), object)
    return {t: gate.routes_to(t, columns[f"{t}{SEPARATOR}gate"], modality) for t in tasks}


def task_columns(columns: dict[str, np.ndarray], task: str) -> dict[str, np.ndarray]:
    """One task's columns (prefix removed) beside the shared ones (path, error, width, ...)."""
    prefix = f"{task}{SEPARATOR}"
    shared = {k: v for k, v in columns.items() if SEPARATOR not in k}
    return {**shared, **{k[len(prefix) :]: v for k, v in columns.items() if k.startswith(prefix)}}


def out_of_scope_reason(columns: dict[str, np.ndarray], tasks: list[str], row: int) -> str:
    """Why no task answered a row: each task's verdict (`eyeray.decision.gate.out_of_scope_reason`)."""
    verdicts = {
        t: tuple(columns[f"{t}{SEPARATOR}{k}"][row] for k in ("gate", "gate_reason", "gate_score")) for t in tasks
    }
    verdicts = {t: (str(v), str(r), float(s)) for t, (v, r, s) in verdicts.items()}
    return gate.out_of_scope_reason(verdicts, str(columns.get("modality", [""] * (row + 1))[row]))
