"""ASHA whose rung records survive an interrupted sweep.

`Tuner.restore` brings trials back but not the scheduler's state: the scheduler comes from the
Tuner as it was pickled at the start, with empty rungs. A resumed sweep would then compare new
trials against nothing and stop none of them. This subclass writes its rung records (trial id ->
metric per rung, and each trial's bracket) to a small JSON file in the sweep's output after every
decision, and reads it back before the first trial is added after a restore.
"""

from __future__ import annotations

import json
import logging

from ray.tune.schedulers import ASHAScheduler

from eyeray import storage

log = logging.getLogger(__name__)


class ResumableASHA(ASHAScheduler):
    def __init__(self, state_uri: str, **kwargs):
        super().__init__(**kwargs)
        self.state_uri = state_uri
        self._loaded = False

    def on_trial_add(self, tune_controller, trial):
        if not self._loaded:
            self._load()
        if trial.trial_id not in self._trial_info:  # a restored trial keeps its bracket
            super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        action = super().on_trial_result(tune_controller, trial, result)
        self._save()
        return action

    def on_trial_complete(self, tune_controller, trial, result):
        super().on_trial_complete(tune_controller, trial, result)
        self._save()

    def _state(self) -> dict:
        index = {id(b): i for i, b in enumerate(self._brackets)}
        return {
            "rungs": [[dict(recorded) for _, recorded in b._rungs] for b in self._brackets],
            "brackets": {trial_id: index[id(b)] for trial_id, b in self._trial_info.items()},
            "stopped": self._num_stopped,
        }

    def _save(self) -> None:
        fs, path = storage.filesystem(self.state_uri)
        fs.pipe(f"{path}.tmp", json.dumps(self._state()).encode())
        fs.mv(f"{path}.tmp", path)  # a crash mid-write leaves the previous state, not half a file

    def _load(self) -> None:
        self._loaded = True
        fs, path = storage.filesystem(self.state_uri)
        if not fs.exists(path):
            return
        state = json.loads(fs.cat(path))
        for bracket, rungs in zip(self._brackets, state["rungs"]):
            for (_, recorded), saved in zip(bracket._rungs, rungs):
                recorded.update(saved)
        self._trial_info.update({t: self._brackets[i] for t, i in state["brackets"].items()})
        self._num_stopped = state["stopped"]
        log.info(f"ASHA resumed with the rung records of {sum(map(len, state['rungs'][0]))} trial result(s)")
