"""Loss barrier after permutation alignment as a function of the data amount of the activation statistics
(Verma & Elbayad 2024, "Merging Text Transformer Models from Different Initializations", arXiv:2403.00986,
Sec. 6 and Fig. 6: 0.1% to 100% of the alignment data), on two tiny BERTs pretrained from different seeds.

    MERGELAB_HOME=/tmp/align-home MERGELAB_DATA=../shared/data python bench/align_data_amount.py \
        [--a demo-scratch-s0 --b demo-scratch-s1] [--examples 256] [--shares 0.001 0.01 0.1 1]
        [--merge-types ff+attn all] [--points 5] [--limit 128]

The alignment normally reads `--examples` inputs of the `corpus` task's train split (seed 0); each share
keeps the first share x (their token count) non-padding tokens (`align(..., tokens=N)`). For every share
the correlations are computed once, every merge type is matched and B written permuted, and the line
from A to it is scored on the first `--limit` corpus dev blocks (MLM loss, masks from seed 0); the
vanilla line (A to B as it is) is the reference. Barrier = max over the line of the loss above the chord.
Writes bench/results/align_data_amount-<device>.json and docs/results/figures/align-data-amount.html
(the app's figure function, `views.figures.data_amount_figure`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from common import print_table, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import merging_core as ml
from merging_core.align import find_permutation, text_batches, token_budget, write_permuted
from merging_core.align.features import correlations
from merging_core.checkpoint import open_checkpoint
from views.figures import data_amount_figure

FIGURE = Path(__file__).resolve().parents[1] / "docs" / "results" / "figures" / "align-data-amount.html"


def barrier(a: str, b: str, args) -> dict:
    run = ml.curve(a, b, "corpus", points=args.points, limit=args.limit)
    list(run)
    values = run.summary()["barriers"][ml.get_task("corpus").name]
    return {"loss_barrier": values["loss_barrier"], "vs_mean_ends": values["loss_barrier_vs_mean_ends"],
            "midpoint_loss": run.points[len(run.points) // 2]["scores"][ml.get_task("corpus").name]["loss"],
            "ends": values["ends"]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--a", default="demo-scratch-s0")
    parser.add_argument("--b", default="demo-scratch-s1")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--shares", type=float, nargs="+", default=[0.001, 0.01, 0.1, 1.0])
    parser.add_argument("--merge-types", nargs="+", default=["ff+attn", "all"])
    parser.add_argument("--points", type=int, default=5)
    parser.add_argument("--limit", type=int, default=128)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="align_data_amount-"))
    source_a, source_b = open_checkpoint(args.a), open_checkpoint(args.b)
    config = source_b.config
    models = [ml.load(spec).model for spec in (args.a, args.b)]
    device = next(models[0].parameters()).device
    batches = text_batches("corpus", "train", source_a.tokenizer, args.examples, 16, device)
    total = int(sum(int(x["attention_mask"].sum()) for x in batches))
    vanilla = barrier(args.a, args.b, args)
    print("vanilla", vanilla, flush=True)
    rows = []
    for share in args.shares:
        tokens = max(1, round(share * total))
        started = time.perf_counter()
        corrs = correlations(*models, token_budget(batches, tokens), max_tokens=tokens)
        seconds = time.perf_counter() - started
        for merge_type in args.merge_types:
            matching = find_permutation(corrs, layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
                                        merge_type=merge_type)
            folder = write_permuted(source_b, matching.permutation, work / f"{merge_type}-{tokens}",
                                    {"kind": "aligned"}, overwrite=True)
            found = barrier(args.a, str(folder), args)
            ff = [float(corrs[f"ff.{layer}"][:, matching.permutation.ff[layer]].diagonal().mean())
                  for layer in matching.permutation.ff]
            row = {"label": merge_type, "share": share, "tokens": tokens, "features_s": round(seconds, 2),
                   "matched_ff_corr": sum(ff) / len(ff) if ff else None, **found}
            rows.append(row)
            print(row, flush=True)
    print_table([{k: v for k, v in r.items() if k != "ends"} for r in rows],
                ["label", "share", "tokens", "loss_barrier", "vs_mean_ends", "midpoint_loss", "matched_ff_corr",
                 "features_s"])
    print(f"vanilla: loss barrier {vanilla['loss_barrier']:.4f}, ends {vanilla['ends']}")
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    data_amount_figure(rows, vanilla["loss_barrier"]).write_html(FIGURE, include_plotlyjs="cdn")
    write_results("align_data_amount", {
        "a": args.a, "b": args.b, "examples": args.examples, "total_tokens": total, "seed": 0,
        "points": args.points, "limit": args.limit, "vanilla": vanilla, "rows": rows})


if __name__ == "__main__":
    main()
