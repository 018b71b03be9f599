"""Time to build a zoo recipe from scratch, with each entry's dev score.

    MERGELAB_HOME=/tmp/fresh-home python bench/zoo_build.py [--recipe default|demo|...]

Use a fresh MERGELAB_HOME: entries that already exist are kept, not rebuilt, and would not be timed.
"""

from __future__ import annotations

import argparse
import os
import time

from common import print_table, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import merging_core as ml  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default="default")
    args = parser.parse_args()
    started = time.perf_counter()
    status = ml.zoo.build(args.recipe)
    total = time.perf_counter() - started
    scores = {row["name"]: row for row in ml.zoo.entries()}
    rows = [{"entry": s["name"], "status": s["status"], "seconds": s["seconds"],
             "task": scores[s["name"]]["task"], "metric": scores[s["name"]]["metric"],
             "dev_score": round(scores[s["name"]]["score"], 4)} for s in status]
    rows += [{"entry": name, "status": "checkpoint", "seconds": "", "task": row["task"], "metric": row["metric"],
              "dev_score": round(row["score"], 4)} for name, row in scores.items() if "/" in name]
    print_table(rows, ["entry", "task", "metric", "dev_score", "status", "seconds"])
    print(f"total: {total:.0f} s")
    name = "zoo_build" if args.recipe == "default" else f"zoo_build_{args.recipe}"
    write_results(name, {"recipe": args.recipe,
                                "total_seconds": round(total, 1), "rows": rows})


if __name__ == "__main__":
    main()
