"""Next-token-loss barriers between decoders pretrained from different seeds, vanilla and after each kind
of permutation alignment (the decoder counterpart of `align_barriers.py`; Verma & Elbayad 2024,
arXiv:2403.00986, Table 1's setting on the Llama layout).

    MERGELAB_HOME=/tmp/llama-home python bench/align_decoders.py [--models scratch-llama-s0 scratch-llama-s1]
        [--points 11] [--limit 256] [--examples 256]

For every pair: B is aligned to A on `--examples` WikiText-2 train blocks with each function-preserving
setting (`merging_core.align`), and the straight line from A to B permuted is scored on the first `--limit`
WikiText-2 dev blocks (next-token loss). Barrier = max over the line of the loss minus the straight line
between the end losses; the midpoint's loss (the average merge) is kept beside it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path

from common import print_table, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import merging_core as ml  # noqa: E402

# (label, merge type, residual); attention is matched head by head (Head-Perm, KV groups kept)
VARIANTS = [
    ("vanilla averaging", "vanilla", "first"),
    ("ff only", "ff_only", "first"),
    ("attention only (Head-Perm)", "attn_only", "first"),
    ("ff + attention", "ff+attn", "first"),
    ("residual only, first", "res_only", "first"),
    ("residual only, all", "res_only", "all"),
    ("all (residual first)", "all", "first"),
    ("all (residual all)", "all", "all"),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["scratch-llama-s0", "scratch-llama-s1"])
    parser.add_argument("--points", type=int, default=11)
    parser.add_argument("--limit", type=int, default=256, help="WikiText-2 dev blocks scored per point")
    parser.add_argument("--examples", type=int, default=256, help="WikiText-2 train blocks the alignment reads")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for a, b in itertools.combinations(args.models, 2):
            for label, merge_type, residual in VARIANTS:
                started = time.perf_counter()
                target = b
                if merge_type != "vanilla":
                    target = str(Path(tmp) / f"{Path(b).name}-{merge_type}-{residual}")
                    ml.align(a, b, merge_type=merge_type, residual=residual, text="wikitext2",
                             examples=args.examples, out=target, overwrite=True)
                run = ml.curve(a, target, "wikitext2", points=args.points, limit=args.limit)
                points = [item for item in run if item["kind"] == "point"]
                barrier = run.summary()["barriers"]["wikitext2"]
                losses = [p["scores"]["wikitext2"]["loss"] for p in points]
                rows.append({"a": a, "b": b, "variant": label, "loss_barrier": barrier["loss_barrier"],
                             "midpoint_loss": losses[len(losses) // 2], "end_losses": [losses[0], losses[-1]],
                             "losses": losses, "seconds": round(time.perf_counter() - started, 1)})
                print({k: v for k, v in rows[-1].items() if k != "losses"}, flush=True)
    print_table(rows, ["a", "b", "variant", "loss_barrier", "midpoint_loss", "seconds"])
    write_results("align_decoders", {"points": args.points, "limit": args.limit, "examples": args.examples,
                                     "rows": rows})


if __name__ == "__main__":
    main()
