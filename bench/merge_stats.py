"""Statistics throughput (examples/s) for Gram, K-FAC gradient Gram and diagonal Fisher, and the solve
time of RegMean (closed form) and MaTS (conjugate gradient) once the statistics exist.

The naive reference for the Fisher is what the MaTS and RegMean scripts do: one example at a time,
`loss.backward()`, square `p.grad` for every parameter. MergeLab's per-example path is the same
algorithm (a true per-example Fisher cannot batch the squares), so the table reports it side by side
with the batch-mean variant (the RegMean codebase's cheaper approximation).

    python bench/merge_stats.py [--models sst2-s0 cola-s0] [--examples 256]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from common import print_table, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import merging_core as ml  # noqa: E402
from merging_core import stats  # noqa: E402


def naive_fisher(model_spec: str, task: str, examples: int) -> float:
    """The reference scripts' loop: batch 1, backward, square .grad. Returns seconds."""
    loaded = ml.load(model_spec, ml.get_task(task))
    model = loaded.model
    batches = stats._examples(ml.get_task(task), loaded.tokenizer, examples, next(model.parameters()).device)
    sums = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    started = time.perf_counter()
    for batch in batches:
        model.zero_grad()
        model(**batch).loss.backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                sums[n] += p.grad ** 2
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["sst2-s0", "cola-s0", "mrpc-s0", "stsb-s0", "emotion-s0"])
    parser.add_argument("--examples", type=int, default=256)
    args = parser.parse_args()
    rows = []
    spec = args.models[0]
    task = ml.resolve(spec).metadata()["task"]
    settings = {"examples": args.examples}
    # Warm-up, not timed: the first model load of a process imports transformers' model classes.
    stats.compute(ml.resolve(spec), ml.get_task(task), "gram", {**stats.DEFAULTS, "examples": 8},
                  progress=lambda *_: None)
    for kind, extra in (("gram", {}), ("grad_gram", {}), ("fisher", {"gradients": "per_example"}),
                        ("fisher", {"gradients": "batch_mean"})):
        options = {**stats.DEFAULTS, **settings, **extra}
        started = time.perf_counter()
        stats.compute(ml.resolve(spec), ml.get_task(task), kind, options, progress=lambda *_: None)
        seconds = time.perf_counter() - started
        label = kind + (f" ({extra['gradients']})" if extra else "")
        rows.append({"what": f"{label} on {task}", "examples": args.examples, "seconds": round(seconds, 2),
                     "examples_per_s": round(args.examples / seconds, 1)})
        print(rows[-1], flush=True)
    naive = naive_fisher(spec, task, args.examples)
    rows.append({"what": f"naive per-example Fisher loop on {task}", "examples": args.examples,
                 "seconds": round(naive, 2), "examples_per_s": round(args.examples / naive, 1)})
    print(rows[-1], flush=True)

    # Solve times: statistics come from the cache (computed first, not timed).
    n = len(args.models)
    for method, params in (("regmean", {}), ("mats", {"objective": "regmean"}), ("mats", {"objective": "kfac"}),
                           ("fisher", {}), ("average", {})):
        ml.merge(method, args.models, base="minilm", params={**params, **settings} if method != "average" else {},
                 progress=lambda *_: None)  # warm: statistics cached
        started = time.perf_counter()
        result = ml.merge(method, args.models, base="minilm",
                          params={**params, **settings} if method != "average" else {}, progress=lambda *_: None)
        seconds = time.perf_counter() - started
        residuals = [r["residual_after"] for r in result.report.values() if "residual_after" in r]
        rows.append({"what": f"{method} {params or ''} solve, {n} models".replace(" {}", "").strip(),
                     "examples": None, "seconds": round(seconds, 2), "examples_per_s": None,
                     "median_cg_residual": round(sorted(residuals)[len(residuals) // 2], 6) if residuals else None})
        print(rows[-1], flush=True)
    print_table(rows, ["what", "examples", "seconds", "examples_per_s", "median_cg_residual"])
    write_results("merge_stats", {"models": args.models, "rows": rows})


if __name__ == "__main__":
    main()
