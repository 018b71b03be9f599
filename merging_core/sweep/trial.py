"""One trial of a sweep, as a Ray worker runs it: merge in memory, score on the dev subset, report.

The worker reads the models lazily (safetensors, mmap) and finds data-aware statistics in the cache,
where the sweep computed them once before the first trial; it writes no model folder. Its evaluators
(tokenized dev subsets, one per task) are built at its first trial and kept for the next ones, since Ray
Tune reuses the worker for them.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..compare import Inputs, Scorer
from ..errors import MergeLabError
from ..evaluation import headline
from ..merge import merge
from ..models import resolve, weights_fingerprint
from ..outputs import staging_file
from .spec import OBJECTIVE, SweepSpec

_SCORERS: dict[tuple, Scorer] = {}  # per worker process: (models, tasks, examples) -> its evaluators


@dataclass(frozen=True)
class Job:
    """What every trial of one run of a sweep shares."""

    spec: SweepSpec
    tasks: tuple[str, ...]  # the objective's tasks, resolved
    rows: str  # the folder of finished trials' rows
    run: str  # this run's id: a resumed sweep's new trials carry another one than the trials before
    env: dict[str, str]  # the driver's MergeLab settings (home, data root, device): Ray may reuse a worker
    #                      that an earlier sweep of this process, with other settings, started
    cwd: str = ""  # the driver's working folder: relative model folders and data roots mean the same there


def run_trial(point: dict, job: Job) -> None:
    """Ray Tune's function trainable: one point of the space, reported once."""
    from ray import tune

    done = finished_row(Path(job.rows), point)
    if done is not None:  # finished before the sweep was stopped: its result stands, nothing runs again
        reported = done["reported"]
        tune.report({**reported, "mergelab": {**reported["mergelab"], "from": done["trial"]}})
        return
    os.environ.update(job.env)
    if job.cwd and os.path.isdir(job.cwd):  # (a node of a cluster may not have it: absolute paths still work)
        os.chdir(job.cwd)
    values = score_point(job, point)
    tune.report({OBJECTIVE: values.pop(OBJECTIVE), "mergelab": values})


def score_point(job: Job, point: dict) -> dict:
    """The merge at `point`, scored: the objective, each task's headline metric, timings and placement.
    A point the method refuses (or whose merge is NaN) scores NaN with the reason in "error"."""
    import ray

    torch.set_num_threads(job.spec.cpus_per_trial)
    where = {"run": job.run, "pid": os.getpid(),
             "node": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None}
    started = time.perf_counter()
    try:
        result = merge(job.spec.merge_spec(point))
        merged = time.perf_counter()
        scorer = scorer_for(job.spec.models, job.tasks, job.spec.dev_size)
        results = {t: scorer.merged(result, t) for t in job.tasks}
    except MergeLabError as exc:
        return {OBJECTIVE: math.nan, "error": exc.render(), **where}
    scores = {t: headline(r)[1] for t, r in results.items()}
    losses = {f"{t}:loss": r["loss"] for t, r in results.items()}
    return {OBJECTIVE: job.spec.objective(scores), **scores, **losses, "merge_seconds": round(merged - started, 4),
            "eval_seconds": round(time.perf_counter() - merged, 4), **where}


def scorer_for(models: tuple[str, ...], tasks: tuple[str, ...], limit: int | None,
               indices: dict[str, range] | None = None) -> Scorer:
    """Evaluators of `tasks` on the first `limit` dev examples (or on `indices`), built once per process."""
    key = (tuple(weights_fingerprint(resolve(m)) for m in models), tasks, limit,
           tuple(sorted((t, r.start, r.stop) for t, r in (indices or {}).items())))  # by content
    if key not in _SCORERS:
        _SCORERS[key] = Scorer(Inputs.open(list(models)), limit, tasks=list(tasks), indices=indices)
    return _SCORERS[key]


def point_key(point: dict) -> str:
    return json.dumps(point, sort_keys=True, default=str)


def finished_row(rows: Path, point: dict) -> dict | None:
    """The row of a finished trial at this point, if there is one (a resumed sweep's finished trials)."""
    key = point_key(point)
    for path in rows.glob("*.json") if rows.is_dir() else ():
        try:
            row = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if point_key(row["point"]) == key:
            return row
    return None


def flat_metrics(reported: dict) -> dict:
    """What a trial reported, as one flat row: the objective, then MergeLab's values."""
    return {OBJECTIVE: reported.get(OBJECTIVE, math.nan),
            **{k: v for k, v in reported.get("mergelab", {}).items() if k != "from"}}


def write_json(path: Path, data: object) -> None:
    """Write `data` to `path` atomically (a reader never sees half a row)."""
    tmp = staging_file(path)
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)
