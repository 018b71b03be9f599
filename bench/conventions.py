"""What the reference codes' conventions change, measured on real statistics of real fine-tunes.

1. RegMean's model weighting: `models` (c_i G_i with per-token mean Grams, as the RegMean and MaTS code)
   against `tokens` (c_i N_i G_i): per linear layer, how far the merged weights move, and each model's
   output error on its own data, E_i(W) = tr((W − W_i) G_i (W − W_i)ᵀ), under the two.
2. MaTS's conjugate gradient at its defaults (100 iterations, task-arithmetic start) with and without the
   Jacobi preconditioner: per linear layer, the relative distance to the closed form and the condition
   number of the summed Gram.

The merged models' scores under each convention come from `compare` (see docs/results/merging.md).

    MERGELAB_HOME=/tmp/demo-home python bench/conventions.py --models demo-sst2-s0 demo-emotion demo-mrpc
"""

from __future__ import annotations

import argparse
import os
import statistics as stat
import time

import torch

from common import print_table, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import merging_core as ml  # noqa: E402
from merging_core import stats  # noqa: E402
from merging_core.checkpoint import open_checkpoint  # noqa: E402
from merging_core.methods import TensorJob, get_method  # noqa: E402


def _job(method: str, name: str, tensors, grams, base, **params) -> TensorJob:
    spec = get_method(method)
    n = len(tensors)
    return TensorJob(name, None, tensors, torch.full((n,), 1 / n, dtype=torch.float64), spec.parse(params),
                     base=base, stats=grams)


def output_error(w: torch.Tensor, wi: torch.Tensor, gram: torch.Tensor) -> float:
    d = (w - wi).double()
    return float(torch.einsum("oi,ij,oj->", d, gram.double(), d))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["demo-sst2-s0", "demo-emotion", "demo-mrpc"])
    parser.add_argument("--base", default="minilm")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 5],
                        help="transformer layers whose linear weights are solved (every solve of a 1536-wide "
                             "feed-forward output is ~0.2 TFLOP in float64 at 100 iterations)")
    args = parser.parse_args()
    options = {**stats.DEFAULTS, "examples": args.examples}
    refs = [ml.resolve(m) for m in args.models]
    grams = [stats.statistics(r, r.metadata()["task"], ("gram",), options) for r in refs]
    ckpts = [open_checkpoint(m) for m in args.models]
    base = open_checkpoint(args.base)
    names = [n for n in grams[0] if all(n in g for g in grams) and n in base.names
             and any(f"layer.{i}." in n for i in args.layers)]
    weighting_rows, solver_rows = [], []
    for name in names:
        tensors = [c.get(name).double() for c in ckpts]
        per_model = [g[name] for g in grams]
        merged = {w: get_method("regmean").merge_tensor(_job("regmean", name, tensors, per_model, None, weighting=w))
                  for w in ("models", "tokens")}
        errors = [output_error(merged["models"], t, s["gram"]) / max(output_error(merged["tokens"], t, s["gram"]), 1e-30)
                  for t, s in zip(tensors, per_model)]
        weighting_rows.append({
            "parameter": name,
            "tokens": [int(s["gram_count"]) for s in per_model],
            "max_abs_change": float((merged["models"] - merged["tokens"]).abs().max()),
            "relative_change": float((merged["models"] - merged["tokens"]).norm() / merged["tokens"].norm()),
            "error_ratio_min": min(errors), "error_ratio_max": max(errors),
            "error_ratio": errors})
        total = sum(0.9 * s["gram"].double() + 0.1 * torch.diag_embed(s["gram"].double().diagonal()) for s in per_model)
        row = {"parameter": name, "condition": float(torch.linalg.cond(total))}
        exact = merged["models"]
        for preconditioner in ("none", "jacobi"):
            job = _job("mats", name, tensors, per_model, base.get(name).double(), objective="regmean",
                       preconditioner=preconditioner, iterations=args.iterations)
            started = time.perf_counter()
            solution = get_method("mats").merge_tensor(job)
            row[f"{preconditioner}_seconds"] = time.perf_counter() - started
            row[f"{preconditioner}_distance"] = float((solution - exact).norm() / exact.norm())
            row[f"{preconditioner}_steps"] = job.report["steps"]
            row[f"{preconditioner}_residual"] = job.report["residual_after"]
        solver_rows.append(row)
        print(f"{name}: weights moved {weighting_rows[-1]['relative_change']:.3f} (relative), error ratios "
              f"{min(errors):.2f}-{max(errors):.2f}; condition {row['condition']:.2e}, distance to the closed form "
              f"none {row['none_distance']:.2e} / jacobi {row['jacobi_distance']:.2e}", flush=True)
    print_table(weighting_rows, ["parameter", "relative_change", "max_abs_change", "error_ratio_min", "error_ratio_max"])
    print_table(solver_rows, ["parameter", "condition", "none_distance", "jacobi_distance", "none_steps", "jacobi_steps"])
    summary = {
        "weighting": {"tokens_per_model": dict(zip(args.models, weighting_rows[0]["tokens"])),
                      "max_abs_change": max(r["max_abs_change"] for r in weighting_rows),
                      "median_relative_change": stat.median(r["relative_change"] for r in weighting_rows),
                      "error_ratio_range": [min(r["error_ratio_min"] for r in weighting_rows),
                                            max(r["error_ratio_max"] for r in weighting_rows)]},
        "solver": {p: {"median_distance": stat.median(r[f"{p}_distance"] for r in solver_rows),
                       "worst_distance": max(r[f"{p}_distance"] for r in solver_rows),
                       "converged": sum(r[f"{p}_residual"] <= 1e-6 for r in solver_rows),
                       "seconds": sum(r[f"{p}_seconds"] for r in solver_rows)} for p in ("none", "jacobi")},
        "parameters": len(solver_rows),
        "worst_condition": max(r["condition"] for r in solver_rows)}
    print(summary)
    write_results("conventions", {"models": args.models, "examples": args.examples, "iterations": args.iterations,
                                  "layers": args.layers,
                                  "summary": summary, "weighting": weighting_rows, "solver": solver_rows})


if __name__ == "__main__":
    main()
