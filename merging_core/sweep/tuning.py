"""Ray Tune's pieces of a sweep: the search algorithm, and the two hooks the driver runs. The hooks are
pickled with the experiment (a resumed sweep gets them back), so they hold paths, nothing live."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from ray import tune

from .spec import OBJECTIVE, SweepSpec
from .trial import write_json


def searcher(spec: SweepSpec, space: dict, done: list[dict]):
    """Grid and random points from Ray Tune's basic variant generator; TPE and CMA-ES from Optuna, told the
    points `done` already scored (a sweep started afresh over the rows of an unreadable experiment)."""
    if spec.algorithm in ("grid", "random"):
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(max_concurrent=spec.workers or 0, random_state=spec.seed)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = (optuna.samplers.CmaEsSampler(seed=spec.seed) if spec.algorithm == "cmaes"
               else optuna.samplers.TPESampler(seed=spec.seed))
    scored = [r for r in done if math.isfinite(r["reported"][OBJECTIVE])]
    return OptunaSearch(space=space, metric=OBJECTIVE, mode="max", sampler=sampler,
                        points_to_evaluate=[r["point"] for r in scored] or None,
                        evaluated_rewards=[r["reported"][OBJECTIVE] for r in scored] or None)


class Rows(tune.Callback):
    """Writes each finished trial's row file, in the driver, as Ray Tune learns that the trial ended."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        last = trial.last_result or {}
        if last.get("mergelab", {}).get("from"):  # a point finished before a resume: its row is there
            return
        self._write(trial, {OBJECTIVE: last.get(OBJECTIVE, math.nan), "mergelab": last.get("mergelab", {})})

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._write(trial, {OBJECTIVE: math.nan, "mergelab": {"error": f"the trial failed; see {trial.path}"}})

    def _write(self, trial, reported: dict) -> None:
        row = {"trial": trial.trial_id, "point": dict(trial.config), "reported": reported, "finished": time.time()}
        write_json(Path(self.folder) / f"{trial.trial_id}.json", row)


class StopFile(tune.Stopper):
    """Stops the whole sweep once `Sweep.stop` has written its file."""

    def __init__(self, path: str):
        self.path = path

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return os.path.exists(self.path)
