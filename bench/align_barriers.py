"""MLM-loss barriers of interpolation between models pretrained from different seeds, vanilla and after
each kind of permutation alignment (Verma & Elbayad 2024, arXiv:2403.00986, Table 1's setting at small scale).

    MERGELAB_HOME=/tmp/zoo-home python bench/align_barriers.py [--models scratch-s0 scratch-s1 scratch-s2]
        [--points 11] [--limit 256] [--examples 256] [--glue [--glue-tasks sst2 mrpc stsb] [--glue-limit N]]
        [--no-mlm]

For every pair of the models: the correlations are computed once (`align.features`), then every
variant is matched, B is written permuted into A's basis, and the line from A to it is scored on
WikiText-2 dev (MLM loss; `--limit` 128-token blocks). Barrier = max over the line of the loss minus
the straight line between the end losses; the variant against the mean of the end losses is kept too.
`--glue` adds the same for the GLUE fine-tunes of the models (`<model>-<task>`, SST-2 by default), each on its
task's dev split, aligned on that task's own text, with the merged model's (midpoint's) score beside the
end models' mean: the vanilla vs aligned table of every merge type. `--no-mlm` skips the MLM pairs.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import print_table, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import merging_core as ml  # noqa: E402
from merging_core.align import find_permutation, text_batches, write_permuted  # noqa: E402
from merging_core.align.features import correlations  # noqa: E402
from merging_core.checkpoint import open_checkpoint  # noqa: E402

# (label, merge type, attention, residual)
VARIANTS = [
    ("vanilla averaging", "vanilla", "head-perm", "first"),
    ("ff only", "ff_only", "head-perm", "first"),
    ("attention, monotonic", "attn_only", "monotonic", "first"),
    ("attention, ignore-heads", "attn_only", "ignore-heads", "first"),
    ("attention, Head-Perm", "attn_only", "head-perm", "first"),
    ("ff + attention (Head-Perm)", "ff+attn", "head-perm", "first"),
    ("residual only, first", "res_only", "head-perm", "first"),
    ("residual only, last", "res_only", "head-perm", "last"),
    ("residual only, all", "res_only", "head-perm", "all"),
    ("residual only, sep", "res_only", "head-perm", "sep"),
    ("ff + residual (first)", "ff+res", "head-perm", "first"),
    ("all (Head-Perm, residual first)", "all", "head-perm", "first"),
]


def pair_barriers(a: str, b: str, task: str, text: str, limit: int | None, args, work: Path) -> dict[str, dict]:
    """Barrier of every variant for one pair."""
    source_a, source_b = open_checkpoint(a), open_checkpoint(b)
    config = source_b.config
    models = [ml.load(spec).model for spec in (a, b)]
    batches = text_batches(text, "train", source_a.tokenizer, args.examples, 16, next(models[0].parameters()).device)
    corrs = correlations(*models, batches)
    del models
    out = {}
    for label, merge_type, attention, residual in VARIANTS:
        started = time.perf_counter()
        matching = find_permutation(corrs, layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
                                    merge_type=merge_type, attention=attention, residual=residual)
        folder = write_permuted(source_b, matching.permutation, work / f"{Path(a).name}-{Path(b).name}-{merge_type}"
                                f"-{attention}-{residual}", {"kind": "aligned"}, overwrite=True)
        run = ml.curve(a, str(folder), task, points=args.points, limit=limit)
        list(run)
        spec = ml.get_task(task)
        barrier = run.summary()["barriers"][spec.name]
        middle = run.points[len(run.points) // 2]
        out[label] = {"metric": spec.main_metric, "midpoint_metric": middle["scores"][spec.name][spec.main_metric],
                      "ends_metric": [run.points[i]["scores"][spec.name][spec.main_metric] for i in (0, -1)],
                      "loss_barrier": barrier["loss_barrier"], "vs_mean_ends": barrier["loss_barrier_vs_mean_ends"],
                      "metric_barrier": barrier["metric_barrier"], "midpoint_loss": run.points[len(run.points) // 2][
                          "scores"][ml.get_task(task).name]["loss"], "ends": barrier["ends"]["loss"],
                      "function_preserving": matching.function_preserving,
                      "seconds": round(time.perf_counter() - started, 1)}
        print(a, b, label, {k: v for k, v in out[label].items() if k != "ends"}, flush=True)
    return out


def table(models: list[str], task: str, text: str, limit: int | None, args, work: Path) -> tuple[list[dict], dict]:
    per_pair = {f"{a} ~ {b}": pair_barriers(a, b, task, text, limit, args, work)
                for a, b in itertools.combinations(models, 2)}
    rows = []
    for label, *_ in VARIANTS:
        values = [pair[label] for pair in per_pair.values()]
        barriers = [v["loss_barrier"] for v in values]
        rows.append({"task": task, "variant": label, "pairs": len(values),
                     "loss_barrier_mean": statistics.mean(barriers),
                     "loss_barrier_sd": statistics.stdev(barriers) if len(barriers) > 1 else 0.0,
                     "vs_mean_ends": statistics.mean(v["vs_mean_ends"] for v in values),
                     "metric_barrier_mean": statistics.mean(v["metric_barrier"] for v in values),
                     "metric": values[0]["metric"],
                     "midpoint_metric_mean": statistics.mean(v["midpoint_metric"] for v in values),
                     "ends_metric_mean": statistics.mean(statistics.mean(v["ends_metric"]) for v in values),
                     "function_preserving": values[0]["function_preserving"]})
    return rows, per_pair


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["scratch-s0", "scratch-s1", "scratch-s2"])
    parser.add_argument("--points", type=int, default=11)
    parser.add_argument("--limit", type=int, default=256)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--glue", action="store_true", help="also the GLUE fine-tunes, each on its own task")
    parser.add_argument("--glue-tasks", nargs="+", default=["sst2"], help="the fine-tunes' tasks (default: sst2)")
    parser.add_argument("--glue-limit", type=int, default=None, help="first N dev examples (default: all)")
    parser.add_argument("--no-mlm", action="store_true", help="skip the pretrained models' MLM barriers")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="align_barriers-"))
    rows, details = ([], {}) if args.no_mlm else table(args.models, "wikitext2", "wikitext2", args.limit, args, work)
    for task in args.glue_tasks if args.glue else []:
        glue_rows, glue_details = table([f"{m}-{task}" for m in args.models], task, task, args.glue_limit, args, work)
        rows += glue_rows
        details.update(glue_details)
    print_table(rows, ["task", "variant", "pairs", "loss_barrier_mean", "loss_barrier_sd", "vs_mean_ends",
                       "metric_barrier_mean", "midpoint_metric_mean", "ends_metric_mean", "function_preserving"])
    write_results("align_barriers_glue" if args.no_mlm else "align_barriers", {"models": args.models, "points": args.points,
                                     "limit": args.limit, "glue_limit": args.glue_limit,
                                     "glue_tasks": args.glue_tasks if args.glue else [], "examples": args.examples,
                                     "rows": rows, "pairs": details})


if __name__ == "__main__":
    main()
