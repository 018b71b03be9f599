"""Run a sweep as a Ray Tune experiment: on this machine (Ray started inside MergeLab with its cores) or on
a cluster (`address`, or `RAY_ADDRESS`), with the same code.

Ray Tune schedules the trials, runs the search algorithm and persists the experiment; MergeLab adds the
trial itself (`trial.run_trial`), statistics computed once before the first trial, and the table. The
sweep's folder (`$MERGELAB_HOME/sweeps/<name>`, the name derived from the spec unless given) holds:

    sweep.json      the spec (a different spec under the same name is refused)
    rows/           one JSON file per finished trial, written as it finishes
    trials.csv      the table: the point, the objective, each task's score, timings, where it ran
    summary.json    the best point, its held-out scores, the statistics' and the sweep's time
    (Ray Tune's own experiment files: tuner.pkl, experiment_state-*.json, one folder per trial)

Running the same sweep again resumes it: Ray Tune restores the experiment and runs only the trials that
had not finished; a finished trial is never merged again (its row stands, and a trial at its point reports
it). A kill while Ray Tune wrote its state (in place) leaves it unreadable: the sweep then starts Ray Tune
afresh over the same rows. On a cluster, the models, the data and the
sweep's folder must be on a filesystem every node sees.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import settings, stats
from ..checkpoint import open_checkpoint
from ..data import load_split
from ..errors import MergeLabError, writing
from ..evaluation import headline
from ..merge import MergeResult, merge
from ..methods import get_method
from ..outputs import staging_file
from ..progress import ProgressFn, time_left
from ..tasks import get_task
from .space import per_layer_dimensions
from .spec import OBJECTIVE, SweepSpec
from .trial import Job, flat_metrics, run_trial, scorer_for, write_json

SPEC_FILE, ROWS, TABLE, SUMMARY, STOP = "sweep.json", "rows", "trials.csv", "summary.json", "stop"
_POLL = 0.25  # seconds between looks at the rows folder while trials run
_HEARTBEAT = 1.0  # seconds between progress reports while no trial finishes
_STATE_EVERY = 5  # seconds between saves of Ray Tune's experiment state
_TUNE_FILES = ("tuner.pkl", "experiment_state-*", "basic-variant-state-*", "searcher-state-*", "run_trial_*",
               ".validate_storage_marker")  # what Ray Tune writes into a sweep's folder
_ENV = ("MERGELAB_", "HF_", "TRANSFORMERS_", "TOKENIZERS_")  # what a worker must see as the driver does


def sweeps_dir() -> Path:
    return settings.home() / "sweeps"


# ----------------------------------------------------------------------------------------------------
# Ray


def connect(address: str | None = None) -> str:
    """Ray, attached to `address` (else `RAY_ADDRESS`) or started here with this machine's cores; returns
    where it runs. An address nothing answers at fails at once, in one line."""
    import ray

    target = address or os.environ.get("RAY_ADDRESS") or "local"
    if target != "local":
        _check_reachable(target)
        _use_token()
    if ray.is_initialized():
        if getattr(connect, "target", None) == target:
            return target
        ray.shutdown()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's and Ray Tune's info lines (and Tune's complaint that the trial folders hold no result files:
    # MergeLab keeps its rows itself) would drown the sweep's own output; their errors still show
    logging.getLogger("ray").setLevel(logging.ERROR)
    # the workers import merging_core from where this process does, wherever Ray starts them
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    options: dict[str, Any] = {"runtime_env": {"env_vars": {"PYTHONPATH": path}}, "log_to_driver": False,
                               "configure_logging": False}
    try:
        if target == "local":
            _on_keeper(lambda: ray.init(address="local", include_dashboard=False, **options))
        else:
            _on_keeper(lambda: ray.init(address=target, **options))
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise MergeLabError(f"could not attach to the Ray cluster at {target} ({' '.join(str(exc).split())[:200]}); "
                            "check the address, or leave RAY_ADDRESS unset to run on this machine",
                            param="address") from None
    connect.target = target
    return target


_calls: queue.Queue = queue.Queue()
_keeper: threading.Thread | None = None
_keeper_lock = threading.Lock()


def _on_keeper(call):
    """Run `call` on one thread that lives as long as the process, and return what it returns. Ray starts its
    local processes (GCS, raylet) with Linux's parent-death signal, which follows the *thread* that started
    them: started from an app's request thread, they would be killed when that request ends."""
    global _keeper
    with _keeper_lock:
        if _keeper is None:
            def serve() -> None:
                while True:
                    work, box, done = _calls.get()
                    try:
                        box["value"] = work()
                    except BaseException as exc:  # noqa: BLE001  (raised again in the caller)
                        box["error"] = exc
                    done.set()
            _keeper = threading.Thread(target=serve, name="mergelab-ray", daemon=True)
            _keeper.start()
    box: dict = {}
    done = threading.Event()
    _calls.put((call, box, done))
    done.wait()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _use_token() -> None:
    """Send the cluster's token: `ray start` turns token authentication on and keeps the token in ~/.ray,
    but a client sends it only in token mode (`RAY_AUTH_MODE=token`), which Ray reads into its cached
    config once; set it (unless the user chose a mode) and refresh that config as Ray itself does."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return
    if not (os.environ.get("RAY_AUTH_TOKEN") or Path(path).is_file()):
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    try:
        from ray._raylet import Config

        Config.initialize("")
    except (ImportError, AttributeError):  # another Ray release: it reads the variable when it connects
        pass


def _check_reachable(address: str) -> None:
    if address == "auto":
        return  # Ray finds the cluster this machine runs, or says there is none
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise MergeLabError(f"Ray address {address!r} is not host:port (e.g. 127.0.0.1:6379) or auto",
                            param="address")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as exc:
        raise MergeLabError(f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one with "
                            "`ray start --head`, or leave RAY_ADDRESS unset to run on this machine",
                            param="address") from None


# ----------------------------------------------------------------------------------------------------
# the sweep


class Sweep:
    """A sweep as it runs. Iterate for the rows of finished trials, as they finish (the rows a resumed sweep
    had already come first); `stop()` ends it early (resumable); `table()`, `best()` and `summary()` read
    what is there."""

    def __init__(self, spec: SweepSpec, folder: Path, address: str | None = None,
                 progress: ProgressFn | None = None):
        self.spec, self.folder, self.address, self.progress = spec, folder, address, progress
        self.tasks: tuple[str, ...] = ()
        self.blocks = 0
        self.stats_seconds = 0.0
        self.seconds = 0.0

    # -- running ---------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        started = time.perf_counter()
        self._prepare()
        stop = self.folder / STOP
        stop.unlink(missing_ok=True)
        seen: set[str] = set()
        for row in self.rows():  # a resumed sweep's finished trials
            seen.add(row["trial"])
            yield row
        total, before = self.spec.trial_count(), len(seen)
        if before >= total:  # finished before: nothing to start
            self._finish()
            return
        connect(self.address)
        tuner = self._tuner()
        failure: list[BaseException] = []

        def fit() -> None:
            try:
                tuner.fit()
            except BaseException as exc:  # noqa: BLE001  (raised again in the iterating thread)
                failure.append(exc)

        runner = threading.Thread(target=fit, name="mergelab-sweep", daemon=True)
        runner.start()
        try:
            reported = time.monotonic()
            while True:
                alive = runner.is_alive()
                for row in self.rows():
                    if row["trial"] not in seen:
                        seen.add(row["trial"])
                        self._report(len(seen), total, len(seen) - before, started)
                        reported = time.monotonic()
                        yield row
                if not alive:
                    break
                if time.monotonic() - reported > _HEARTBEAT:  # also while trials run: a Stop is heard there
                    self._report(len(seen), total, len(seen) - before, started)
                    reported = time.monotonic()
                runner.join(_POLL)
        finally:
            if runner.is_alive():  # the caller stopped iterating (or Stop was pressed): end the work too
                self.stop()
        if failure:
            raise failure[0]
        self.seconds = time.perf_counter() - started
        self._finish()

    def stop(self) -> None:
        """End the sweep after the trials now running; running it again resumes it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / STOP).touch()

    def run(self) -> dict:
        """Run to the end (or to `stop`); the summary."""
        for _ in self:
            pass
        return self.summary()

    def _report(self, done: int, total: int, new: int, started: float) -> None:
        """Progress, with the time left at this run's pace (`new` of its trials finished so far)."""
        if self.progress is not None:
            left = time_left(time.perf_counter() - started, new, new + max(total - done, 0))
            self.progress(min(done / total, 1.0), f"{done}/{total} trials{', ' + left if left else ''}")

    def _prepare(self) -> None:
        """Check everything a trial needs before the first one starts, write the spec, and compute the
        statistics of a data-aware method once (each trial then reads them from the cache)."""
        spec = self.spec
        checkpoints = [open_checkpoint(m) for m in spec.models]
        owned = [c.task for c in checkpoints if c.task is not None]
        tasks = spec.tasks or tuple(dict.fromkeys(owned))
        if not tasks:
            raise MergeLabError("the models record no task to score merges on; give --tasks", param="tasks")
        foreign = [t for t in tasks if t not in owned]
        if foreign:
            raise MergeLabError(f"task {foreign[0]} is not the task of any of the models ({', '.join(owned)}); the "
                                "objective scores each task with its model's head", param="tasks")
        if spec.task_weights and len(spec.task_weights) != len(tasks):
            raise MergeLabError(f"{len(spec.task_weights)} task weights for {len(tasks)} tasks; give one per task",
                                param="task_weights")
        for task in tasks:
            size = len(load_split(get_task(task), "dev").texts)
            if spec.dev_size + spec.holdout_size > size:
                raise MergeLabError(f"{task} dev has {size} examples, fewer than dev_size {spec.dev_size} + "
                                    f"holdout_size {spec.holdout_size}; lower one of them", param="dev_size")
        self.tasks = tasks
        if spec.per_layer:
            self.blocks = len({info.block for info in checkpoints[0].infos.values()
                               if info.layer is not None and info.group in spec.components})
        self._claim_folder()
        method = get_method(spec.method)
        params = dict(spec.template().params)
        kinds = method.stats_required(params)
        varied = {d.name for d in spec.dimensions()}
        if kinds and not varied & {p.name for p in stats.setting_params(*kinds)}:
            started = time.perf_counter()
            for checkpoint in checkpoints:
                stats.statistics(checkpoint.ref, checkpoint.task, kinds, params)
            self.stats_seconds = time.perf_counter() - started

    def _claim_folder(self) -> None:
        path = self.folder / SPEC_FILE
        mine = self.spec.to_dict()
        if path.is_file():
            theirs = json.loads(path.read_text())
            if {k: v for k, v in theirs.items() if k not in ("workers", "cpus_per_trial")} != \
                    {k: v for k, v in mine.items() if k not in ("workers", "cpus_per_trial")}:
                raise MergeLabError(f"sweep {self.folder.name!r} exists with other settings; choose another name, "
                                    "or remove that sweep", param="name")
        elif self.folder.exists() and any(self.folder.iterdir()):
            raise MergeLabError(f"{self.folder} exists and is not a sweep; choose another name", param="name")
        with writing(self.folder, "name"):
            (self.folder / ROWS).mkdir(parents=True, exist_ok=True)
            write_json(path, mine)

    def _tuner(self):
        """Ray Tune's experiment: restored when there is one, else new."""
        from ray import tune

        from .tuning import Rows, StopFile, searcher  # (imports Ray Tune: 1.5 s only a running sweep pays)

        # The experiment's state is saved every few seconds; a trial that finished since is short-circuited
        # by its row when Ray Tune runs it again after a resume.
        os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = str(_STATE_EVERY)
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no console tables
        env = {k: v for k, v in os.environ.items() if k.startswith(_ENV)}
        for key in ("MERGELAB_HOME", "MERGELAB_DATA"):  # CI sets MERGELAB_DATA=../shared/data
            if env.get(key):
                env[key] = str(Path(env[key]).expanduser().resolve())
        job = Job(self.spec, self.tasks, str(self.folder.resolve() / ROWS), secrets.token_hex(4), env, os.getcwd())
        trainable = tune.with_resources(tune.with_parameters(run_trial, job=job), {"cpu": self.spec.cpus_per_trial})
        path = str(self.folder)
        if tune.Tuner.can_restore(path) and _readable_state(self.folder):
            return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
        # New, or killed while Ray Tune wrote its state (it writes in place): start Ray Tune afresh; the
        # rows stay, and their points are not merged again
        _clear_tune_files(self.folder)
        done = [json.loads(p.read_text()) for p in sorted((self.folder / ROWS).glob("*.json"))]
        dims = self.spec.dimensions()
        if self.spec.per_layer:
            dims = per_layer_dimensions(dims, get_method(self.spec.method), self.blocks)
        space = {d.name: d.domain(self.spec.algorithm) for d in dims}
        grid = self.spec.algorithm == "grid"
        searched = self.spec.algorithm in ("tpe", "cmaes")  # Optuna holds the space itself
        config = tune.TuneConfig(metric=OBJECTIVE, mode="max", search_alg=searcher(self.spec, space, done),
                                 num_samples=1 if grid else max(self.spec.trial_count() - (len(done) if searched
                                                                                           else 0), 1),
                                 max_concurrent_trials=self.spec.workers if searched else None, reuse_actors=True)
        run = tune.RunConfig(name=self.folder.name, storage_path=str(self.folder.parent), verbose=0,
                             callbacks=[Rows(str(self.folder / ROWS))], stop=StopFile(str(self.folder / STOP)))
        return tune.Tuner(trainable, param_space={} if searched else space, tune_config=config, run_config=run)

    # -- reading ---------------------------------------------------------------------------------------

    def rows(self) -> list[dict]:
        """Every finished trial, in the order they finished."""
        rows = []
        folder = self.folder / ROWS
        for path in folder.glob("*.json") if folder.is_dir() else []:
            try:
                rows.append(_flat(json.loads(path.read_text())))
            except (OSError, ValueError):
                continue  # (written atomically: only a foreign file can be unreadable)
        return sorted(rows, key=lambda r: (r["finished"], r["trial"]))

    def table(self):
        """The rows as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.rows())

    def best(self) -> dict | None:
        scored = [r for r in self.rows() if isinstance(r.get(OBJECTIVE), float) and math.isfinite(r[OBJECTIVE])]
        return max(scored, key=lambda r: r[OBJECTIVE]) if scored else None

    def summary(self) -> dict:
        path = self.folder / SUMMARY
        return json.loads(path.read_text()) if path.is_file() else self._summary()

    def _summary(self) -> dict:
        rows = self.rows()
        return {"name": self.folder.name, "trials": self.spec.trial_count(), "finished": len(rows),
                "errors": sum(1 for r in rows if r.get("error")), "best": self.best(), "tasks": list(self.tasks),
                "stats_seconds": round(self.stats_seconds, 2), "seconds": round(self.seconds, 2)}

    def _finish(self) -> None:
        rows = self.rows()
        if rows:
            _write_table(self.folder / TABLE, rows)
        summary = self._summary()
        best = summary["best"]
        if best is not None and self.spec.holdout_size:
            summary["holdout"] = holdout(self.spec, best["point"], self.tasks)
        write_json(self.folder / SUMMARY, summary)


def sweep(spec: SweepSpec, *, name: str | None = None, folder: str | Path | None = None, address: str | None = None,
          progress: ProgressFn | None = None) -> Sweep:
    """The sweep `spec` describes, ready to run: iterate it for the rows as trials finish, or `run()` it.
    It lives in `folder` (default `$MERGELAB_HOME/sweeps/<name>`, the name derived from the spec); running
    it again resumes it."""
    if folder is None:
        folder = sweeps_dir() / (name or spec.key())
    return Sweep(spec, Path(folder), address, progress)


def open_sweep(folder: str | Path) -> Sweep:
    """A sweep from its folder (to read its table or resume it)."""
    folder = Path(folder)
    if not folder.is_dir() and not folder.is_absolute() and (sweeps_dir() / folder).is_dir():
        folder = sweeps_dir() / folder
    path = folder / SPEC_FILE
    if not path.is_file():
        raise MergeLabError(f"{folder} is not a sweep (no {SPEC_FILE}); give a sweep's folder or name", param="sweep")
    return Sweep(SweepSpec.from_dict(json.loads(path.read_text())), folder)


def holdout(spec: SweepSpec, point: dict, tasks: tuple[str, ...]) -> dict:
    """The merge at `point` scored on each task's held-out examples (after the dev subset)."""
    indices = {t: range(spec.dev_size, spec.dev_size + spec.holdout_size) for t in tasks}
    scorer = scorer_for(spec.models, tasks, None, indices)
    result = merge(spec.merge_spec(point))
    scores = {t: headline(scorer.merged(result, t))[1] for t in tasks}
    return {"examples": spec.holdout_size, OBJECTIVE: spec.objective(scores), **scores}


def materialize(folder: str | Path, out: str | Path, *, trial: str | None = None, overwrite: bool = False,
                progress: ProgressFn | None = None) -> MergeResult:
    """Write the sweep's best point (or `trial`'s) as a normal merge: its `merge_config.json` re-runs it."""
    run = open_sweep(folder)
    if trial is None:
        row = run.best()
        if row is None:
            raise MergeLabError(f"sweep {run.folder.name!r} has no finished trial with a score yet", param="sweep")
    else:
        row = next((r for r in run.rows() if r["trial"] == trial), None)
        if row is None:
            raise MergeLabError(f"sweep {run.folder.name!r} has no finished trial {trial!r}", param="trial")
    return merge(run.spec.merge_spec(row["point"]), out=out, overwrite=overwrite, progress=progress)


def _flat(row: dict) -> dict:
    """A row file as a table row: trial, point, objective, scores, timings."""
    return {"trial": row["trial"], **row["point"], **flat_metrics(row["reported"]), "point": row["point"],
            "finished": row["finished"]}


def _readable_state(folder: Path) -> bool:
    """Whether Ray Tune can restore the experiment: an experiment state a killed write left empty or cut
    short is removed, and an older one is used if there is one."""
    readable = False
    for path in sorted(folder.glob("experiment_state-*.json")):
        try:
            json.loads(path.read_text())
            readable = True
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
    return readable


def _clear_tune_files(folder: Path) -> None:
    for pattern in _TUNE_FILES:
        for path in folder.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def _write_table(path: Path, rows: list[dict]) -> None:
    import pandas as pd

    tmp = staging_file(path)
    pd.DataFrame([{k: v for k, v in r.items() if k != "point"} for r in rows]).to_csv(tmp, index=False)
    os.replace(tmp, path)
