"""Sweep throughput: a Ray Tune sweep with 1 and 2 workers against the sequential loop, and the time the
statistics computed once save against computing them in every trial.

    MERGELAB_HOME=/tmp/zoo-home python bench/sweep_speed.py [--models sst2-s0 sst2-s1] [--base minilm]
        [--grid 4] [--dev-size 200] [--stats-trials 2]

Part 1 (data-free): a TIES grid (λ x density, `--grid` points each) three ways, each timed from start to
the last score: the sequential loop a user would write (one process, torch on every core: `merge(spec)` in
memory, then the same evaluators, built once, on the merged model), and `sweep` with 1 and with 2
concurrent trials of one torch thread each (Ray started fresh, worker start-up included). The scores of
the three must agree trial by trial.

Part 2 (data-aware): RegMean over α. The sweep computes each model's Grams once, before the first trial,
and the trials read them from the cache; the alternative is a trial that computes them itself. Both are
measured: `--stats-trials` trials run with an empty statistics cache each (the recompute), the sweep's
trials with the shared cache.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from common import print_table, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ray  # noqa: E402

from merging_core import settings  # noqa: E402
from merging_core.checkpoint import open_checkpoint  # noqa: E402
from merging_core.sweep import SweepSpec, sweep  # noqa: E402
from merging_core.sweep.trial import Job, score_point  # noqa: E402


def sequential(spec: SweepSpec, points: list[dict], tasks: tuple[str, ...]) -> tuple[float, list[dict]]:
    """The loop without Ray: each point merged in memory and scored, one after another."""
    job = Job(spec, tasks, "", "sequential", {})
    started = time.perf_counter()
    rows = [{**point, **score_point(job, point)} for point in points]
    return time.perf_counter() - started, rows


def run_sweep(spec: SweepSpec, name: str) -> tuple[float, list[dict]]:
    ray.shutdown()  # every variant starts Ray afresh, as a new user would
    folder = settings.home() / "sweeps" / name
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    run = sweep(spec, folder=folder)
    rows = list(run)
    seconds = time.perf_counter() - started
    ray.shutdown()
    return seconds, rows


def key(row: dict, names: list[str]) -> tuple:
    return tuple(row[n] for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["sst2-s0", "sst2-s1"])
    parser.add_argument("--base", default="minilm")
    parser.add_argument("--grid", type=int, default=4)
    parser.add_argument("--dev-size", type=int, default=200)
    parser.add_argument("--stats-trials", type=int, default=2)
    args = parser.parse_args()
    g = args.grid
    ties = SweepSpec("ties", tuple(args.models), base=args.base, space=(f"lambda=0.4:1.6:{g}", f"density=0.1:0.7:{g}"),
                     dev_size=args.dev_size, workers=1)
    tasks = tuple(dict.fromkeys(open_checkpoint(m).task for m in args.models))
    from ray.tune.search.variant_generator import generate_variants  # the grid's points, as Tune makes them

    dims = ties.dimensions()
    points = [dict(v) for _, v in generate_variants({d.name: d.domain("grid") for d in dims})]
    names = [d.name for d in dims]

    rows = []
    # the loop a user would write uses every core for each merge and evaluation (torch's threads)
    loop = SweepSpec.from_dict({**ties.to_dict(), "cpus_per_trial": os.cpu_count() or 1})
    seconds, seq = sequential(loop, points, tasks)
    rows.append({"variant": "sequential loop", "trials": len(seq), "seconds": seconds})
    reference = {key(r, names): r["objective"] for r in seq}
    for workers in (1, 2):
        spec = SweepSpec.from_dict({**ties.to_dict(), "workers": workers})
        seconds, found = run_sweep(spec, f"bench-ties-{workers}")
        agree = all(abs(reference[key(r, names)] - r["objective"]) < 1e-9 for r in found)
        rows.append({"variant": f"sweep, {workers} worker{'s' * (workers > 1)}", "trials": len(found),
                     "seconds": seconds, "scores_agree": agree})
    for r in rows:
        r["trials_per_min"] = 60 * r["trials"] / r["seconds"]
        r["vs_sequential"] = rows[0]["seconds"] / r["seconds"]
    print(f"TIES grid {g}x{g} on {', '.join(args.models)} (dev {args.dev_size} examples per task):")
    print_table(rows, ["variant", "trials", "seconds", "trials_per_min", "vs_sequential", "scores_agree"])

    # -- statistics computed once vs in every trial ---------------------------------------------------
    regmean = SweepSpec("regmean", tuple(args.models), space=("alpha=0.5:0.95:4",), dev_size=args.dev_size,
                        workers=2)
    real_home = settings.home()
    recompute = []
    for i in range(args.stats_trials):  # each in a home whose statistics cache alone is empty
        scratch = Path(tempfile.mkdtemp(prefix="bench-stats-"))
        (scratch / "zoo").symlink_to(real_home / "zoo")
        (scratch / "cache").mkdir()
        for kind in (real_home / "cache").iterdir():  # tokenized data and the rest stay warm
            if kind.name != "stats":
                (scratch / "cache" / kind.name).symlink_to(kind)
        os.environ["MERGELAB_HOME"] = str(scratch)
        point = {"alpha": 0.5 + 0.15 * i}
        started = time.perf_counter()
        score_point(Job(regmean, tasks, "", "recompute", {}), point)
        recompute.append(time.perf_counter() - started)
        os.environ["MERGELAB_HOME"] = str(real_home)
        shutil.rmtree(scratch, ignore_errors=True)
    shutil.rmtree(real_home / "cache" / "stats", ignore_errors=True)  # the sweep starts from an empty cache too
    ray.shutdown()
    folder = real_home / "sweeps" / "bench-regmean"
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    run = sweep(regmean, folder=folder)
    found = list(run)
    sweep_seconds = time.perf_counter() - started
    stats_seconds = run.summary()["stats_seconds"]
    trial = sum(r["merge_seconds"] + r["eval_seconds"] for r in found) / len(found)
    per_recompute = sum(recompute) / len(recompute)
    stats_rows = [{"trials": len(found), "statistics_once_s": stats_seconds, "trial_shared_s": trial,
                   "trial_recomputing_s": per_recompute,
                   "saved_s": len(found) * (per_recompute - trial) - stats_seconds, "sweep_s": sweep_seconds}]
    print(f"\nRegMean over alpha ({len(found)} trials, 2 workers): statistics once vs in every trial")
    print_table(stats_rows, list(stats_rows[0]))
    write_results("sweep_speed", {"models": args.models, "base": args.base, "dev_size": args.dev_size,
                                  "grid": g, "throughput": rows, "statistics": stats_rows})


if __name__ == "__main__":
    main()
