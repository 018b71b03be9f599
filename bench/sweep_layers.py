"""Per-layer λ found by CMA-ES against the best uniform λ of the same method, on held-out examples.

    MERGELAB_HOME=/tmp/zoo-home python bench/sweep_layers.py [--models sst2-s0 mrpc-s0 emotion-s0]
        [--base minilm] [--method task_arithmetic] [--range 0:1] [--grid 10] [--trials 40]
        [--dev-size 200] [--holdout-size 200] [--workers 2]

Two sweeps with one objective (the mean of the tasks' headline metrics on the first `--dev-size` dev
examples of each task): a grid over one λ for the whole model (`--grid` points of `--range`), and CMA-ES
over one λ per transformer block (`--trials` points, the same range). The best point of each is then
scored on the `--holdout-size` dev examples after the search's, which neither search saw.
"""

from __future__ import annotations

import argparse
import os
import shutil

from common import print_table, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from merging_core import settings  # noqa: E402
from merging_core.sweep import SweepSpec, sweep  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["sst2-s0", "mrpc-s0", "emotion-s0"])
    parser.add_argument("--base", default="minilm")
    parser.add_argument("--method", default="task_arithmetic")
    parser.add_argument("--range", default="0:1")
    parser.add_argument("--grid", type=int, default=10)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--dev-size", type=int, default=200)
    parser.add_argument("--holdout-size", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    common = {"base": args.base, "dev_size": args.dev_size, "holdout_size": args.holdout_size, "workers": args.workers,
              "seed": args.seed}
    uniform = SweepSpec(args.method, tuple(args.models), space=(f"lambda={args.range}:{args.grid}",), **common)
    layered = SweepSpec(args.method, tuple(args.models), space=(f"lambda={args.range}",), per_layer=True,
                        algorithm="cmaes", trials=args.trials, **common)
    rows, found = [], {}
    for label, spec in (("uniform λ, grid", uniform), ("λ per block, CMA-ES", layered)):
        folder = settings.home() / "sweeps" / f"bench-layers-{spec.algorithm}"
        shutil.rmtree(folder, ignore_errors=True)
        summary = sweep(spec, folder=folder).run()
        best, held = summary["best"], summary["holdout"]
        found[label] = {"point": best["point"], "summary": summary}
        rows.append({"search": label, "trials": summary["finished"], "seconds": summary["seconds"],
                     "dev_objective": best["objective"], "holdout_objective": held["objective"],
                     **{f"holdout_{t}": held[t] for t in summary["tasks"]},
                     "best": ", ".join(f"{k}={v:.3f}" for k, v in best["point"].items())})
    print(f"{args.method} on {', '.join(args.models)}; dev {args.dev_size}, held out {args.holdout_size} per task:")
    print_table(rows, [c for c in rows[0] if c != "best"])
    for r in rows:
        print(f"{r['search']}: {r['best']}")
    write_results("sweep_layers", {"models": args.models, "base": args.base, "method": args.method, "range": args.range,
                                   "dev_size": args.dev_size, "holdout_size": args.holdout_size, "rows": rows,
                                   "found": found})


if __name__ == "__main__":
    main()
