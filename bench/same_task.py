"""Same task, different data (Jin et al. 2023, RegMean, arXiv:2212.09849, non-i.i.d. partitions): what the
partitions of the `same-task` recipe hold, and the learning curve of a multi-task model.

    python bench/same_task.py partitions [--recipe same-task]
    python bench/same_task.py curve --model multitask-demo [--individual demo-sst2-s0 demo-mrpc demo-emotion]
        [--records RUN/step-75/mergelab.json ...]

`partitions` counts, for every partitioned entry of the recipe, its training examples per label (how
skewed each shard is). `curve` reads the dev scores a zoo entry recorded at every checkpoint
(`save_every`) and at the end: for a multi-task model, one headline score per task per checkpoint;
`--individual` adds the recorded dev scores of single-task models to compare with. Both write
`bench/results/same_task-cpu.json` (one key per subcommand, merged with what is there).

The comparison tables themselves are `compare` runs (see docs/results/same-task.md); their rows are in
`bench/results/same_task_*-cpu.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

from common import RESULTS, environment, print_table

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import merging_core as ml  # noqa: E402
from merging_core import data, partition, zoo  # noqa: E402


def partitions(recipe: str) -> list[dict]:
    """Examples per label of every partitioned entry of `recipe` (token tasks: sentences only)."""
    import torch

    rows = []
    for name, config in zoo.load_recipe(recipe).entries.items():
        spec = config.task_specs[0]
        part = partition.parse(config.partition)
        raw = data.load_split(spec, "train")
        if spec.kind == "token":
            index = partition.indices(part, spec, torch.zeros(len(raw.texts), dtype=torch.long))
            rows.append({"entry": name, "task": spec.name, "partition": str(part), "examples": len(index)})
            continue
        labels = torch.tensor(raw.labels)
        index = partition.indices(part, spec, labels)
        counts = Counter(labels[index].tolist())
        row = {"entry": name, "task": spec.name, "partition": str(part), "examples": len(index)}
        row.update({label: round(counts.get(i, 0) / len(index), 3) for i, label in enumerate(spec.labels)})
        rows.append(row)
    return rows


def curve(model: str, individual: list[str], records: list[str] | None = None) -> dict:
    """Headline dev score per task per checkpoint of zoo entry `model`, plus single-task references.
    `records`: read the checkpoints from these `mergelab.json` files instead (a run stopped before its
    end keeps its intermediate checkpoints' records)."""
    if records:
        metas = sorted((json.loads(Path(r).read_text()) for r in records), key=lambda m: m["steps"])
        meta = {**metas[-1], "checkpoints": [{"step": m["steps"], "dev": m["scores"]["dev"]} for m in metas[:-1]]}
    else:
        meta = ml.resolve(model).metadata()
    tasks = meta.get("tasks") or [meta["task"]]

    def scores(dev: dict) -> dict:
        if "task" in dev:  # a single-task record: {metric: value}
            dev = {dev["task"]: dev}
        return {t: dev[t][ml.get_task(t).main_metric] for t in tasks if t in dev}

    points = [{"step": c["step"], **scores(c["dev"])} for c in meta.get("checkpoints", [])]
    points.append({"step": meta["steps"], **scores(meta["scores"]["dev"])})
    for row in points:
        row["mean"] = sum(row[t] for t in tasks) / len(tasks)
    refs = []
    for name in individual:
        other = ml.resolve(name).metadata()
        task = other["task"]
        refs.append({"entry": name, "task": task, "steps": other["steps"],
                     "score": other["scores"]["dev"][ml.get_task(task).main_metric],
                     "eval_limit": other["train"].get("eval_limit")})
    return {"model": model, "tasks": tasks, "sampling": meta.get("sampling"), "task_steps": meta.get("task_steps"),
            "planned_steps": meta["train"].get("steps"), "eval_limit": meta["train"].get("eval_limit"),
            "train_seconds": meta.get("train_seconds"), "points": points, "individual": refs}


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("partitions")
    p.add_argument("--recipe", default="same-task")
    p = commands.add_parser("curve")
    p.add_argument("--model", default="multitask-demo")
    p.add_argument("--individual", nargs="*", default=["demo-sst2-s0", "demo-mrpc", "demo-emotion"])
    p.add_argument("--records", nargs="*", default=None, help="checkpoint mergelab.json files of a stopped run")
    args = parser.parse_args()
    path = RESULTS / "same_task-cpu.json"
    payload = json.loads(path.read_text()) if path.is_file() else {}
    if args.command == "partitions":
        rows = partitions(args.recipe)
        for task in dict.fromkeys(r["task"] for r in rows):
            these = [r for r in rows if r["task"] == task]
            print_table(these, list(dict.fromkeys(k for r in these for k in r)))
        payload["partitions"] = {"environment": environment(), "recipe": args.recipe, "rows": rows}
    else:
        result = curve(args.model, args.individual, args.records)
        print_table(result["points"], ["step", *result["tasks"], "mean"])
        if result["individual"]:
            print_table(result["individual"], ["entry", "task", "steps", "score", "eval_limit"])
        payload["curve"] = {"environment": environment(), **result}
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
