"""A different-initialization zoo (recipes `scratch`, `scratch-llama`, `scratch-t5`): each pretrained
model's loss on WikiText-2 dev before pretraining (the same seeded random initialization) and after (MLM
loss for the BERTs, next-token loss for the decoders, span-corruption loss for the T5s), its training
time and loss curve, and each fine-tune's dev score beside the majority-class rate of that dev set.

    MERGELAB_HOME=/tmp/zoo-home python bench/scratch_zoo.py [--recipe scratch] [--limit N] [--built-only]

Run after `python -m merging_core zoo build --recipe <recipe>`; nothing is trained here. `--built-only`
reports the entries built so far of a zoo still building (and names the others), instead of failing.
"""

from __future__ import annotations

import argparse
import collections
import os
from pathlib import Path

import torch

from common import print_table, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import merging_core as ml  # noqa: E402
from merging_core import data, scratch  # noqa: E402


def majority(task: str) -> float:
    """The dev accuracy of always predicting the most frequent dev label."""
    labels = data.load_split(ml.get_task(task), "dev").labels
    return max(collections.Counter(labels).values()) / len(labels)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default="scratch")
    parser.add_argument("--limit", type=int, default=None, help="first N dev blocks (default: all)")
    parser.add_argument("--built-only", action="store_true", help="skip the entries not built yet")
    args = parser.parse_args()
    recipe = ml.zoo.load_recipe(args.recipe)
    text = ml.get_task("wikitext2")
    rows, curves = [], {}
    built = {name for name in recipe.entries if (ml.settings.zoo_dir() / name / ml.zoo.METADATA).is_file()}
    missing = [name for name in recipe.entries if name not in built]
    if missing and args.built_only:
        print(f"not built yet, left out: {', '.join(missing)}")
    for name, config in recipe.entries.items():
        if args.built_only and name not in built:
            continue
        meta = ml.resolve(name).metadata()
        row = {"model": name, "task": config.task, "kind": meta["kind"], "seed": config.seed, "steps": meta["steps"],
               "train_s": meta["train_seconds"]}
        if scratch.is_scratch(config.base):
            torch.manual_seed(config.seed)  # what training drew before its first step
            initial = ml.evaluate(ml.load(config.base, ml.get_task(config.task), new_head=True), text, limit=args.limit)
            final = ml.evaluate(name, text, limit=args.limit)
            row.update(initial_dev_loss=initial["loss"], dev_loss=final["loss"], dev_perplexity=final["perplexity"])
            curves[name] = meta.get("loss_curve")
        else:
            for task, scores in (meta["scores"]["dev"].items() if meta["kind"] == "multitask"
                                 else [(config.task, meta["scores"]["dev"])]):
                metric = ml.get_task(task).main_metric
                row.update({f"{task}_{metric}": scores[metric], f"{task}_accuracy": scores["accuracy"],
                            f"{task}_majority": majority(task)})
        rows.append(row)
        print(row, flush=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    print_table(rows, columns)
    name = Path(args.recipe).stem.replace("-", "_")
    write_results(f"{name}_zoo", {"recipe": args.recipe, "rows": rows, "loss_curves": curves,
                                   "not_built": missing if args.built_only else []})


if __name__ == "__main__":
    main()
