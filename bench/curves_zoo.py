"""The mode-connectivity table (docs/results/curves.md): 26-point curves between default-zoo checkpoints
on the full SST-2 dev set.

    MERGELAB_HOME=/tmp/zoo-home python bench/curves_zoo.py [--points 26] [--bend-steps 1000] [--limit N]

Pairs: the two SST-2 seeds (with merges placed on the line), two checkpoints of one SST-2 run (steps
100 and 400), SST-2 vs CoLA (each task with its own head), and SST-2 seed 0 vs a copy of seed 1 with
every unit permuted (the same function elsewhere in weight space: a pair with a barrier), walked on
the line and on a trained Bezier curve. Writes every point to bench/results/curves_zoo-<device>.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import print_table, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import merging_core as ml  # noqa: E402
from merging_core.align import permute_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", type=int, default=26)
    parser.add_argument("--bend-steps", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    permuted = str(permute_checkpoint("sst2-s1", Path(tempfile.mkdtemp(prefix="curves_zoo-")) / "sst2-s1-permuted"))
    runs = [
        ("same task, different seeds", "sst2-s0", "sst2-s1", ["sst2"], "line",
         ["average", "task_arithmetic", "ties"]),
        ("same run, different steps", "sst2-s0/step-100", "sst2-s0", ["sst2"], "line", []),
        ("different tasks", "sst2-s0", "cola-s0", ["sst2", "cola"], "line", []),
        ("seed 1 permuted (same function)", "sst2-s0", permuted, ["sst2"], "line", []),
        ("seed 1 permuted (same function)", "sst2-s0", permuted, ["sst2"], "bezier", []),
    ]
    rows, curves = [], []
    for kind, a, b, tasks, path, merges in runs:
        started = time.perf_counter()
        run = ml.curve(a, b, tasks, points=args.points, path=path, limit=args.limit, merges=merges,
                       bend_steps=args.bend_steps)
        items = list(run)
        summary = run.summary()
        curves.append({"kind": kind, "items": items, "summary": summary})
        for task, barrier in summary["barriers"].items():
            points = [i for i in items if i["kind"] == "point"]
            metric = barrier["metric"]
            rows.append({
                "pair": kind, "a": a, "b": "sst2-s1 permuted" if b == permuted else b, "path": path, "task": task,
                "metric": metric, "at_A": barrier["ends"][metric][0], "at_B": barrier["ends"][metric][1],
                "worst_on_path": min(p["scores"][task][metric] for p in points),
                "metric_barrier": barrier["metric_barrier"], "loss_barrier": barrier["loss_barrier"],
                "loss_barrier_at": barrier["loss_barrier_at"], "l2": summary["distances"]["l2"],
                "cosine": summary["distances"]["cosine"], "task_cosine": summary["distances"]["task_cosine"],
                "seconds": round(time.perf_counter() - started, 1)})
        print(rows[-1], flush=True)
        for m in summary["merges"]:
            print(f"  {m['method']}: t = {m['t']:.3f}, {m['off_line']:.3f} from the line, "
                  + ", ".join(f"{t} {s[ml.get_task(t).main_metric]:.4f}" for t, s in m["scores"].items()), flush=True)
    print_table(rows, ["pair", "path", "task", "at_A", "at_B", "worst_on_path", "metric_barrier", "loss_barrier",
                       "l2", "cosine", "task_cosine", "seconds"])
    write_results("curves_zoo", {"points": args.points,
                                 "bend_steps": args.bend_steps, "limit": args.limit, "rows": rows, "curves": curves})


if __name__ == "__main__":
    main()
