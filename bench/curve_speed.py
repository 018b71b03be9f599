"""A 26-point interpolation curve on the full SST-2 dev set: MergeLab's way vs the naive loop, in one run.

    MERGELAB_HOME=/tmp/zoo-home python bench/curve_speed.py [--a sst2-s0] [--b sst2-s1] [--points 26]

- MergeLab: `merging_core.curve(a, b, "sst2", points=26)`, iterated to the end: the two checkpoints'
  tensors on the device, one model whose weights are overwritten in place per point, the dev split
  tokenized once and scored in length-sorted, dynamically padded batches. Set-up (loading) included.
- naive (the loop of the mode-connectivity papers' scripts): for every point, build the
  interpolated state dict, load a fresh model (`from_pretrained` + `load_state_dict`), evaluate it with
  the usual loop (batches padded to 128 in data order). The tokenized data is shared with MergeLab, so
  tokenization is not what is measured.
- naive load + MergeLab evaluator: the same fresh model per point, scored with MergeLab's evaluator,
  to show how much of the gap is loading and how much is evaluation.

The three must agree on every point's loss (checked), so the figures compare equal work.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from safetensors.torch import load_file

from common import naive_loss, print_table, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import merging_core as ml  # noqa: E402


def naive_curve(a: str, b: str, ts: list[float], evaluator: ml.Evaluator, use_evaluator: bool) -> list[float]:
    """Per point: interpolated state dict -> fresh model -> evaluate. Returns the losses."""
    task = evaluator.spec
    ref_a, ref_b = ml.resolve(a), ml.resolve(b)
    state_a, state_b = load_file(ref_a.path / "model.safetensors"), load_file(ref_b.path / "model.safetensors")
    losses = []
    for t in ts:
        state = {k: (1 - t) * state_a[k] + t * state_b[k] if state_a[k].is_floating_point() else state_a[k]
                 for k in state_a}
        loaded = ml.load(a, task)  # a fresh model every point
        loaded.model.load_state_dict(state)
        batch_size = 256 if torch.cuda.is_available() else 64
        losses.append(evaluator(loaded.model)["loss"] if use_evaluator else naive_loss(loaded, evaluator, batch_size))
    return losses


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--a", default="sst2-s0")
    parser.add_argument("--b", default="sst2-s1")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--points", type=int, default=26)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()

    # Warm-up for every variant alike: the tokenization cache, the imports a first model load triggers,
    # the first forward pass's one-off costs (measured on its own, the first of three runs is ~20% slower).
    for _ in ml.curve(args.a, args.b, args.task, points=2, limit=8):
        pass
    started = time.perf_counter()
    run = ml.curve(args.a, args.b, args.task, points=args.points, limit=args.limit)
    ours = [p["scores"][args.task]["loss"] for p in run]
    ours_s = time.perf_counter() - started

    evaluator = run.rigs[0].evaluator
    timings, agreement = {}, {}
    for label, use_evaluator in (("naive", False), ("naive load + MergeLab evaluator", True)):
        started = time.perf_counter()
        losses = naive_curve(args.a, args.b, run.ts, evaluator, use_evaluator)
        timings[label] = time.perf_counter() - started
        agreement[label] = max(abs(x - y) for x, y in zip(losses, ours))

    rows = [{"variant": "MergeLab curve", "seconds": round(ours_s, 2), "s_per_point": round(ours_s / args.points, 3),
             "speedup_vs_naive": round(timings["naive"] / ours_s, 2), "max_loss_diff": 0.0}]
    for label, seconds in timings.items():
        rows.append({"variant": label, "seconds": round(seconds, 2), "s_per_point": round(seconds / args.points, 3),
                     "speedup_vs_naive": round(timings["naive"] / seconds, 2), "max_loss_diff": agreement[label]})
    print_table(rows, list(rows[0]))
    summary = run.summary()["barriers"][args.task]
    print(f"{args.points} points, {evaluator.n} {args.task} dev examples; loss barrier {summary['loss_barrier']:.4f}")
    write_results("curve_speed", {"a": args.a, "b": args.b, "task": args.task,
                                  "points": args.points, "examples": evaluator.n, "rows": rows,
                                  "agree_1e-4": all(v <= 1e-4 for v in agreement.values()),
                                  "load_average": os.getloadavg()})


if __name__ == "__main__":
    main()
