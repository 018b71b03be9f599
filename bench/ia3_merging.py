"""Full fine-tunes against (IA)³ modules under every merge method: the full-model vs (IA)³ comparison of
MaTS (Tam et al. 2024, arXiv:2312.04339, Table 1's two settings) at small scale.

    MERGELAB_HOME=/tmp/zoo-home python bench/ia3_merging.py [--full sst2-s0 mrpc-s0 emotion-s0]
        [--ia3 ia3-sst2 ia3-mrpc ia3-emotion] [--limit 500] [--no-weights]

The full models come from the `default` recipe, the (IA)³ modules from `peft`, all on MiniLM. Each
side is one `compare` run (individual models, ensemble, one row per method). The (IA)³ modules are
merged in module space (their scaling vectors, from the all-ones initialisation), and, unless
`--no-weights`, also in weight space (folded into MiniLM first) for contrast. MaTS runs with each
objective the side has: K-FAC for full models, the blockwise Fisher for (IA)³. Reported per row: each
task's headline metric, their mean, and the mean of merged / individual per task (normalised score).
"""

from __future__ import annotations

import argparse
import os
import time

from common import print_table, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import merging_core as ml  # noqa: E402
from merging_core.checkpoint import open_checkpoint  # noqa: E402

COMMON = ["average", "task_arithmetic", "ties", "fisher", "regmean", "mats:objective=diagonal_fisher",
          "mats:objective=regmean"]
FULL = COMMON + ["mats:objective=kfac"]
MODULE = COMMON + ["mats:objective=block_fisher"]


def side(models: list[str], methods: list[str], base: str, limit: int | None, space: str
         ) -> tuple[list[dict], float]:
    started = time.perf_counter()
    rows = []
    for row in ml.compare(models, methods, base=base, limit=limit, space=space):
        print(space, row, flush=True)
        rows.append(row)
    return rows, time.perf_counter() - started


def normalised(rows: list[dict], tasks: list[str]) -> None:
    """Add each row's mean over tasks of its score divided by the individual model's on that task."""
    own = {t: next(r[t] for r in rows if r["kind"] == "individual" and r.get(t) is not None) for t in tasks}
    for row in rows:
        values = [row[t] / own[t] for t in tasks if row.get(t) is not None and own[t]]
        row["normalised"] = sum(values) / len(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", nargs="+", default=["sst2-s0", "mrpc-s0", "emotion-s0"])
    parser.add_argument("--ia3", nargs="+", default=["ia3-sst2", "ia3-mrpc", "ia3-emotion"])
    parser.add_argument("--base", default="minilm", help="the model both sides were tuned from")
    parser.add_argument("--limit", type=int, default=500, help="first N dev examples per task")
    parser.add_argument("--no-weights", action="store_true", help="skip the (IA)3 weight-space merges")
    args = parser.parse_args()
    tasks = [open_checkpoint(m).task for m in args.full]
    runs = {"full": side(args.full, FULL, args.base, args.limit, "weights"),
            "ia3 module": side(args.ia3, MODULE, args.base, args.limit, "module")}
    if not args.no_weights:
        runs["ia3 weights"] = side(args.ia3, COMMON, args.base, args.limit, "weights")
    for rows, _ in runs.values():
        normalised(rows, tasks)
    labels = list(dict.fromkeys(r["model"] if r["kind"] != "individual" else "individual models"
                                for rows, _ in runs.values() for r in rows))
    table = []
    for label in labels:
        line = {"row": label}
        for name, (rows, _) in runs.items():
            picked = [r for r in rows if (r["model"] == label or (label == "individual models"
                                                                  and r["kind"] == "individual"))]
            if not picked:
                continue
            if label == "individual models":  # one row per model, each on its own task
                line[f"{name} mean"] = sum(r["mean"] for r in picked) / len(picked)
                line[f"{name} normalised"] = 1.0
            else:
                line[f"{name} mean"], line[f"{name} normalised"] = picked[0]["mean"], picked[0]["normalised"]
        table.append(line)
    columns = ["row"] + [f"{name} {what}" for name in runs for what in ("mean", "normalised")]
    print_table(table, columns)
    write_results("ia3_merging", {
        "full": args.full, "ia3": args.ia3, "tasks": tasks, "limit": args.limit, "table": table,
        "seconds": {name: round(seconds, 1) for name, (_, seconds) in runs.items()},
        "rows": {name: rows for name, (rows, _) in runs.items()}})


if __name__ == "__main__":
    main()
