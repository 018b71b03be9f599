"""The different-initialization zoo (recipe `scratch`): each model's MLM loss on WikiText-2 dev
before pretraining (the same seeded random initialization) and after, its training time, and the SST-2
accuracy of its fine-tune.

    MERGELAB_HOME=/tmp/zoo-home python bench/scratch_zoo.py [--recipe scratch] [--limit N]

Run after `python -m merging_core zoo build --recipe scratch`; nothing is trained here.
"""

from __future__ import annotations

import argparse
import os

import torch

from common import print_table, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import merging_core as ml  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default="scratch")
    parser.add_argument("--limit", type=int, default=None, help="first N dev blocks (default: all)")
    args = parser.parse_args()
    recipe = ml.zoo.load_recipe(args.recipe)
    mlm = ml.get_task("wikitext2")
    rows = []
    for name, config in recipe.entries.items():
        meta = ml.resolve(name).metadata()
        if str(config.base).startswith("scratch:"):
            torch.manual_seed(config.seed)  # what training drew before its first step
            initial = ml.evaluate(ml.load(config.base, ml.get_task(config.task), new_head=True), mlm, limit=args.limit)
            final = ml.evaluate(name, mlm, limit=args.limit)
            rows.append({"model": name, "task": "MLM (corpus)", "seed": config.seed, "steps": meta["steps"],
                         "train_s": meta["train_seconds"], "initial_dev_loss": initial["loss"],
                         "dev_loss": final["loss"], "dev_perplexity": final["perplexity"], "sst2_accuracy": None})
        else:
            rows.append({"model": name, "task": config.task, "seed": config.seed, "steps": meta["steps"],
                         "train_s": meta["train_seconds"], "initial_dev_loss": None, "dev_loss": None,
                         "dev_perplexity": None, "sst2_accuracy": meta["scores"]["dev"].get("accuracy")})
        print(rows[-1], flush=True)
    print_table(rows, list(rows[0]))
    write_results("scratch_zoo", {"recipe": args.recipe, "rows": rows})


if __name__ == "__main__":
    main()
