"""What a training checkpoint holds: the weights, the optimizer's slots and the run's state
(epoch, phase, history), so a restarted worker group or `--resume` continues where it stopped."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
from ray.train import Checkpoint

from eyeray import storage

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.weights.h5"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.npz"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's registered checkpoints


@dataclass
class RunState:
    epoch: int = 0
    phase: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_after: list[int] = field(default_factory=list)  # epochs after which a restart resumed


def restore(model, checkpoint: Checkpoint | None) -> tuple[RunState, list[np.ndarray] | None]:
    if checkpoint is None:
        return RunState(), None
    with checkpoint.as_directory() as d:
        model.load_weights(os.path.join(d, WEIGHTS_FILE))
        state = RunState(**json.loads(Path(d, STATE_FILE).read_text()))
        state.resumed_after.append(state.epoch)
        opt_path = Path(d, OPTIMIZER_FILE)
        optimizer = list(np.load(opt_path).values()) if opt_path.exists() else None
    log.info(f"resumed from checkpoint after epoch {state.epoch} ({state.phase})")
    return state, optimizer


def report(model, fitter, state: RunState, metrics: dict[str, Any], rank: int) -> None:
    """Every worker reports (a barrier); only rank 0 writes the checkpoint, since weights are mirrored."""
    with tempfile.TemporaryDirectory(prefix="eyeray-ckpt-") as tmp:
        checkpoint = None
        if rank == 0:
            model.save_weights(os.path.join(tmp, WEIGHTS_FILE))
            np.savez(os.path.join(tmp, OPTIMIZER_FILE), *fitter.optimizer_state())
            Path(tmp, STATE_FILE).write_text(json.dumps(asdict(state)))
            checkpoint = Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def registered_epoch(run_dir: str) -> int:
    """The epoch of the newest checkpoint Ray Train registered for the run in `run_dir` (local or
    `s3://`): the one a `--resume` restores. A checkpoint folder copied but not registered when the
    driver died is not restored, so the folders on storage cannot tell. 0 when there is none, or
    when Ray's record cannot be read: callers take 0 as "from the start", which is always safe."""
    fs, path = storage.filesystem(run_dir)
    try:
        snapshot = json.loads(fs.cat_file(f"{path}/{SNAPSHOT_FILE}"))
        return int(snapshot["latest_checkpoint_result"]["metrics"]["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def final_state(checkpoint: Checkpoint) -> RunState:
    with checkpoint.as_directory() as d:
        return RunState(**json.loads(Path(d, STATE_FILE).read_text()))
