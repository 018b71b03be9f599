"""Few-shot transfer by similarity-weighted module ensembling, leave-one-out over the zoo's tasks
(Lv et al. 2023, "Parameter-efficient Weight Ensembling Facilitates Task-level Knowledge Transfer",
ACL 2023: Table 2's protocol at small scale).

    MERGELAB_HOME=/tmp/zoo-home python bench/ensemble_transfer.py [--kind lora|ia3|prefix] [--shots 32]
        [--seeds 0 1 2] [--measures loss kl el2n weight_cosine] [--steps 50] [--limit N] [--lr 5e-4]
        [--targets conll2003 ...] [--name NAME]

For every target task with a module in the zoo (recipe `peft`, or `prefix` for prefix modules), or each
of `--targets` (e.g. CoNLL-2003 NER, scored by span F1), the sources are the other tasks' modules of the
kind. Per seed: the k shots are drawn, every measure scores every source, and the same few-shot
tuning (same shots, head and seed) starts from (a) a fresh module, (b) the uniform average of the
sources, (c) the average weighted by softmax(similarity / T) for each measure (T: the measure's
default). Score: the target's headline dev metric. Writes bench/results/ensemble_transfer-<device>.json
(ensemble_transfer_<kind>-<device>.json for another --kind; `--name` replaces the file's stem).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from common import print_table, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import merging_core as ml  # noqa: E402
from merging_core.ensemble import MEASURES, combine, default_sources, read_module, softmax_weights  # noqa: E402
from merging_core.ensemble.fewshot import draw_shots, evaluator_for, few_shot_score  # noqa: E402
from merging_core.ensemble.similarity import measure  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", default="lora")
    parser.add_argument("--shots", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--measures", nargs="+", default=["loss", "kl", "el2n", "weight_cosine"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--lr", type=float, default=5e-4, help="few-shot learning rate (the paper's 5e-4)")
    parser.add_argument("--targets", nargs="+", default=None, help="target tasks (default: the modules' tasks)")
    parser.add_argument("--name", default=None, help="results file stem")
    args = parser.parse_args()
    targets = args.targets or [row["task"] for row in ml.zoo.entries()
                               if row["kind"] == args.kind and "/" not in row["name"]]
    targets = [ml.get_task(t).name for t in targets]
    raw, rows = [], []
    for target in targets:
        spec = ml.get_task(target)
        modules = [read_module(s) for s in default_sources(target, args.kind)]
        tokenizer = ml.models.load_tokenizer(modules[0].ref)
        evaluator = evaluator_for(spec, modules[0].ref, args.limit)
        for seed in args.seeds:
            shots = draw_shots(spec, tokenizer, args.shots, seed)
            started = time.perf_counter()
            scores = measure(modules, shots, measures=tuple(args.measures), steps=args.steps, lr=args.lr)
            print(f"{target} seed {seed}: similarities in {time.perf_counter() - started:.1f} s", flush=True)
            weights = {name: softmax_weights(scores.scores[name], MEASURES[name].default_temperature)
                       for name in args.measures}
            starts = {"fresh": None, "uniform": combine(modules, [1.0] * len(modules))}
            for name in args.measures:
                starts[f"weighted by {name}"] = combine(modules, [weights[name][m.ref.spec] for m in modules])
            for init, tensors in starts.items():
                found = few_shot_score(modules[0], shots, tensors, steps=args.steps, lr=args.lr, evaluator=evaluator,
                                       seed=seed)
                raw.append({"target": target, "seed": seed, "init": init, "metric": spec.main_metric,
                            "score": found[spec.main_metric], "loss": found["loss"],
                            "weights": weights.get(init.removeprefix("weighted by "))})
                print(raw[-1]["target"], seed, init, round(raw[-1]["score"], 4), flush=True)
    for target in targets:
        for init in dict.fromkeys(r["init"] for r in raw):
            values = [r["score"] for r in raw if r["target"] == target and r["init"] == init]
            rows.append({"target": target, "init": init, "metric": ml.get_task(target).main_metric,
                         "mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                         "seeds": len(values)})
    for init in dict.fromkeys(r["init"] for r in raw):  # mean over targets of the per-target means
        means = [r["mean"] for r in rows if r["init"] == init and r["target"] != "all"]
        rows.append({"target": "all", "init": init, "metric": "mean", "mean": statistics.mean(means), "sd": None,
                     "seeds": len(args.seeds)})
    print_table(rows, ["target", "init", "metric", "mean", "sd", "seeds"])
    name = args.name or ("ensemble_transfer" if args.kind == "lora" else f"ensemble_transfer_{args.kind}")
    write_results(name, {"kind": args.kind, "shots": args.shots, "seeds": args.seeds,
                                        "measures": args.measures, "steps": args.steps, "limit": args.limit,
                                        "lr": args.lr,
                                        "rows": rows, "runs": raw})


if __name__ == "__main__":
    main()
