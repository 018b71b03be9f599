"""Evaluation throughput per task: MergeLab's evaluator vs the naive loop, in one run.

MergeLab: tokenize once (cached), length-sorted batches with dynamic padding, MLM logits only at the
masked positions. Naive: what evaluation scripts usually do, batches padded to max_length=128 in data
order, full *ForMaskedLM forward for MLM. Both score the same examples with the same weights; the
benchmark checks that they agree before it reports times.

    python bench/eval_throughput.py [--tasks sst2 cola ...] [--limit N]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from common import naive_loss, print_table, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import merging_core as ml  # noqa: E402
from merging_core.encode import encode  # noqa: E402

TASKS = ["sst2", "cola", "mrpc", "stsb", "emotion", "conll2003", "wikitext2"]


def model_for(task: ml.tasks.TaskSpec) -> ml.Loaded:
    """A full MiniLM fine-tune of the task from the zoo when there is one, else MiniLM with a fresh
    head (same cost). Adapters and the scratch models are skipped: they would time another network."""
    for row in ml.zoo.entries():
        if (row["task"] == task.name and "/" not in row["name"] and row["kind"] == "full"
                and row["base"] == "minilm"):
            return ml.load(row["name"], task)
    torch.manual_seed(0)
    return ml.load("minilm", task, new_head=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    rows = []
    for name in args.tasks:
        task = ml.get_task(name)
        loaded = model_for(task)
        started = time.perf_counter()
        encode(task, "dev", loaded.tokenizer)  # cold tokenization (or disk cache)
        tokenize_s = time.perf_counter() - started
        evaluator = ml.Evaluator(task, loaded.tokenizer, "dev", args.limit)
        evaluator(loaded.model)  # warm-up
        started = time.perf_counter()
        result = evaluator(loaded.model)
        ours_s = time.perf_counter() - started
        batch_size = 256 if torch.cuda.is_available() else 64
        started = time.perf_counter()
        naive = naive_loss(loaded, evaluator, batch_size)
        naive_s = time.perf_counter() - started
        agree = abs(naive - result["loss"]) <= 1e-3 * max(1.0, abs(result["loss"]))
        rows.append({"task": task.name, "examples": evaluator.n, "tokens": int(evaluator.encoded.lengths.sum()),
                     "tokenize_s": round(tokenize_s, 3), "mergelab_s": round(ours_s, 3),
                     "mergelab_ex_per_s": round(evaluator.n / ours_s, 1), "naive_s": round(naive_s, 3),
                     "naive_ex_per_s": round(evaluator.n / naive_s, 1), "speedup": round(naive_s / ours_s, 2),
                     "loss_agrees": agree, "model": loaded.ref.name})
        print(rows[-1], flush=True)
    print_table(rows, ["task", "examples", "tokenize_s", "mergelab_ex_per_s", "naive_ex_per_s", "speedup",
                       "loss_agrees", "model"])
    write_results("eval_throughput", {"rows": rows})


if __name__ == "__main__":
    main()
