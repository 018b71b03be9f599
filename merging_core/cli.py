"""`python -m merging_core <command>`: the engine from a shell.

Commands: train, eval, zoo build, zoo download, zoo list, tasks, merge, methods, compare, greedy, curve, plane, align, permute,
ensemble, sweep run, sweep show, sweep materialize. Results go to
stdout (JSON with --json; `curve` and `plane` print one JSON line per point as it is computed); progress bars go
to stderr; a bad input ends with one line `error: ...` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from . import data, tasks, zoo
from .arch import GROUPS
from .align import ATTENTION, MERGE_TYPES, RESIDUAL, align, permute_checkpoint
from .align import METHODS as ALIGN_METHODS
from .compare import STATS_DATA, compare, compare_subsets, greedy
from .curves import SPACES, CurveSpec, PlaneSpec, curve, plane
from .ensemble import GRANULARITIES, ensemble
from .ensemble import MEASURES as ENSEMBLE_MEASURES
from .errors import MergeLabError
from .evaluation import evaluate
from .merge import available_methods, merge
from .methods import METHODS
from .methods.mats import convergence
from .params import parse_assignments
from .paths import PATHS
from .tensorio import OUTPUT_DTYPES
from .spec import FALLBACKS, HEAD_POLICIES, MERGE_SPACES, MergeSpec, parse_method_text
from .sweep import ALGORITHMS, SweepSpec, materialize, open_sweep, sweep
from .training import MODULE_KINDS, PEFT_KINDS, SAMPLING, TrainConfig, train


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _methods() -> str:
    """The registered methods, for a flag's help (read when the parser is built: the registry is the list)."""
    return f"(methods: {', '.join(METHODS)})"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m merging_core", description="MergeLab engine")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train", help="fine-tune one model on one task, or one multi-task model on several")
    p.add_argument("--base", default="minilm", help="model to start from (zoo name, folder, 'minilm', hub id)")
    p.add_argument("--task", required=True,
                   help="a task, or a comma-separated list (sst2,cola,mrpc) for a multi-task model with one head each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=_positive_int, default=300)
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--lr", type=float, default=None,
                   help="default: 1e-4 full, 5e-4 LoRA, 3e-3 (IA)3, 1e-3 bottleneck and head-only")
    p.add_argument("--partition", default="iid", help="iid | iid:K/N | label-skew:K/N[@P]")
    p.add_argument("--save-every", type=_positive_int, default=None, help="also save a checkpoint every N steps")
    p.add_argument("--peft", choices=list(MODULE_KINDS), default=None,
                   help="train a LoRA, (IA)3, prefix or bottleneck (Houlsby adapter) module")
    p.add_argument("--bottleneck-size", type=_positive_int, default=64, help="bottleneck modules: units per adapter")
    p.add_argument("--prefix-tokens", type=_positive_int, default=20, help="prefix modules: virtual tokens")
    p.add_argument("--prefix-projection", action="store_true",
                   help="prefix modules: train the prefix through an MLP (only the prefix is saved)")
    p.add_argument("--head-only", action="store_true", help="freeze the encoder, train the task head only")
    p.add_argument("--no-prompt", dest="prompt", action="store_false",
                   help="a causal LM on a classification task: train a fresh classification head instead of "
                        "learning the task's prompt with its LM head (rank classification)")
    p.add_argument("--eval-limit", type=_positive_int, default=None, help="score on the first N dev examples")
    p.add_argument("--sampling", choices=list(SAMPLING), default="proportional",
                   help="multi-task: which task each step trains on (proportional to train set sizes, sqrt, round-robin)")
    p.add_argument("--cartography", type=_positive_int, default=None, metavar="N",
                   help="record a data map of the first N training examples (cartography.json beside the model)")
    p.add_argument("--cartography-every", type=_positive_int, default=None, metavar="K",
                   help="steps between data-map records (default: an epoch, or an eighth of a shorter run)")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true")

    p = commands.add_parser("eval", help="score one model on one task split")
    p.add_argument("--model", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--split", default="dev")
    p.add_argument("--limit", type=_positive_int, default=None, help="first N examples only")
    p.add_argument("--batch-size", type=_positive_int, default=None)
    p.add_argument("--allow-pickle", action="store_true", help="accept pytorch_model.bin (loaded weights_only)")
    p.add_argument("--json", action="store_true")

    p = commands.add_parser("zoo", help="build or list the model zoo")
    zoo_commands = p.add_subparsers(dest="zoo_command", required=True)
    b = zoo_commands.add_parser("build", help="train the recipe's missing models")
    b.add_argument("--recipe", default="default", help="a recipe name in assets/recipes or a YAML path")
    b.add_argument("--only", nargs="+", default=None, help="build only these entries")
    b.add_argument("--rebuild", action="store_true", help="retrain entries that already exist")
    b.add_argument("--json", action="store_true")
    d = zoo_commands.add_parser("download", help="copy a published zoo from the hub (default: MERGELAB_ZOO_REPO)")
    d.add_argument("--repo", default=None, help="a hub repository id holding one folder per zoo entry")
    d.add_argument("--json", action="store_true")
    li = zoo_commands.add_parser("list", help="the zoo's models: family, size, task and dev score")
    li.add_argument("--json", action="store_true")

    p = commands.add_parser("merge", help="merge two or more models with one method")
    p.add_argument("--method", required=True, help=f"a merge method {_methods()}")
    p.add_argument("--models", nargs="+", required=True, help="the models to merge (zoo names, folders, hub ids)")
    p.add_argument("--base", default=None, help="the model they were fine-tuned from (task vectors)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="method parameters, e.g. lambda=0.5 (repeat --set, or comma-separate; each key once)")
    p.add_argument("--components", default=None,
                   help="comma list of groups the method merges: " + ",".join(GROUPS) + " (default: all)")
    p.add_argument("--fallback", choices=list(FALLBACKS), default="average",
                   help="what the other components get: their average, or model A's (first)")
    p.add_argument("--heads", choices=list(HEAD_POLICIES), default="auto",
                   help="merge heads of one label set, or keep one per task (auto: merge when they agree)")
    p.add_argument("--stats-task", nargs="+", default=None, help="data for each model's statistics (default: its task)")
    p.add_argument("--stats-file", nargs="+", default=None, help="precomputed statistics files, one per model")
    p.add_argument("--space", choices=list(MERGE_SPACES), default="weights",
                   help="(IA)3 modules: merge their scaling vectors (module), or the weights they fold into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=list(OUTPUT_DTYPES), default=None,
                   help="the floats of the output (default: the inputs' dtype)")
    p.add_argument("--shard-size", default=None,
                   help="largest output file, e.g. 5GB (the default) or 500MB; a larger model is sharded with an index")
    p.add_argument("--device", default=None,
                   help="where the math runs: cpu, cuda, cuda:1 (default: the GPU when present)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--eval", action="store_true", help="score the merged model on each of its tasks")
    p.add_argument("--limit", type=_positive_int, default=None, help="with --eval: first N dev examples")
    p.add_argument("--allow-pickle", action="store_true", help="accept pytorch_model.bin (loaded weights_only)")
    p.add_argument("--json", action="store_true")

    p = commands.add_parser("methods", help="the merge methods and their parameters")
    p.add_argument("--json", action="store_true")

    for name, help_text in (("compare", "a table: individual models, ensemble, multi-task model and merges"),
                            ("greedy", "greedy incremental merging: the top-k models for k = 2..N")):
        p = commands.add_parser(name, help=help_text)
        p.add_argument("--models", nargs="+", required=True)
        if name == "compare":
            p.add_argument("--methods", nargs="+", required=True,
                           help=f"methods with settings, e.g. average ties:density=0.2 {_methods()}")
            p.add_argument("--multitask", default=None, help="a multi-task model to show beside the merges (for "
                           "models of one task: the model trained on the union of their data)")
            p.add_argument("--ensemble", choices=["logits", "probabilities"], default="logits")
            p.add_argument("--markdown", action="store_true", help="print a Markdown table")
            p.add_argument("--pairwise", action="store_true",
                           help="merge every pair of the models; rows per pair, then each row's mean over the pairs")
            p.add_argument("--subsets", type=_positive_int, default=None, metavar="K",
                           help="merge every subset of K models (2: --pairwise; the number of models: all together)")
            p.add_argument("--stats-data", choices=list(STATS_DATA), default="task",
                           help="statistics of data-aware methods: on each model's task's train split, or on its "
                                "own training partition (own)")
            p.add_argument("--space", choices=list(MERGE_SPACES), default="weights",
                           help="(IA)3 modules: merge their scaling vectors (module), or the weights they fold into")
        else:
            p.add_argument("--method", required=True, help=f"a method with settings, e.g. regmean:alpha=0.9 "
                                                                 f"{_methods()}")
        p.add_argument("--base", default=None)
        p.add_argument("--limit", type=_positive_int, default=None, help="first N dev examples of each task")
        p.add_argument("--json", action="store_true", help="one JSON object per row, as it is computed")

    p = commands.add_parser("curve", help="loss and metrics along a path between two checkpoints (mode connectivity)")
    p.add_argument("--a", required=True, help="checkpoint at t = 0")
    p.add_argument("--b", required=True, help="checkpoint at t = 1")
    p.add_argument("--points", type=int, default=26, help="evenly spaced points, both ends included")
    p.add_argument("--path", choices=list(PATHS), default="line", help="straight line, or a trained Bezier curve")
    p.add_argument("--bend-steps", type=_positive_int, default=200, help="Bezier: training steps of the bend")
    p.add_argument("--bend-lr", type=float, default=1e-3, help="Bezier: Adam learning rate of the bend")
    p.add_argument("--examples", action="store_true",
                   help="record which examples each point gets right; the summary gets the matrix and what flips")
    p.add_argument("--datamap", default=None, metavar="MODEL",
                   help="score the training examples of this model's data map (needs --split train; implies --examples)")

    p_plane = commands.add_parser("plane", help="a grid of scores on the plane through three checkpoints")
    p_plane.add_argument("--a", required=True)
    p_plane.add_argument("--b", required=True)
    p_plane.add_argument("--c", required=True)
    p_plane.add_argument("--grid", type=int, default=7, help="grid points per axis")
    p_plane.add_argument("--margin", type=float, default=0.25, help="room around the three models, as a share of the span")
    for q in (p, p_plane):
        q.add_argument("--task", action="append", default=None,
                       help="task to score (repeat, or comma-separate; default: the models' own tasks)")
        q.add_argument("--split", default="dev")
        q.add_argument("--limit", type=_positive_int, default=None, help="first N examples of each task")
        q.add_argument("--head-from", default=None, help="score tasks neither model has a head for with this model's head")
        q.add_argument("--space", choices=list(SPACES), default="auto",
                       help="adapter modules (LoRA, (IA)3): interpolate the modules (module) or the folded weights (weights)")
        q.add_argument("--base", default=None, help="the pretrained model (task-vector cosine; task-vector merges)")
        q.add_argument("--merges", nargs="+", default=[], metavar="METHOD",
                       help=f"merges to place on the path, e.g. average ties:density=0.2 {_methods()}")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--json", action="store_true", help="one JSON object per line, as computed, then the summary")

    p = commands.add_parser("align", help="permute model B into model A's basis (permutation alignment)")
    p.add_argument("--a", required=True, help="the model whose basis B is aligned to")
    p.add_argument("--b", required=True, help="the model that is permuted")
    p.add_argument("--merge-type", default="ff+attn", choices=list(MERGE_TYPES),
                   help="which sites are permuted (the rest keep B's order)")
    p.add_argument("--attention", default="head-perm", choices=list(ATTENTION))
    p.add_argument("--residual", default="first", choices=list(RESIDUAL),
                   help="which LayerNorm outputs give the residual order (sep: one per site)")
    p.add_argument("--qk", action="store_true", help="a separate order for Q and K, from their outputs")
    p.add_argument("--text", default="wikitext2", help="the task whose inputs give the activations")
    p.add_argument("--split", default="train")
    p.add_argument("--examples", type=_positive_int, default=256)
    p.add_argument("--tokens", type=int, default=0,
                   help="use only the first N non-padding tokens of the examples (the data amount; 0 = all)")
    p.add_argument("--method", default="permute", choices=list(ALIGN_METHODS),
                   help="permute: write B permuted into A's basis; zip: write the ZipIt merge of A and B")
    p.add_argument("--zip-same", type=float, default=0.0,
                   help="zip: share (0-1) of each model's ff and residual features that may pair with its own")
    p.add_argument("--out", required=True, help="folder for B permuted (HF) + permutation, correlations, summary")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true")

    p = commands.add_parser("permute", help="write a randomly permuted copy of a checkpoint (same function)")
    p.add_argument("--model", required=True)
    p.add_argument("--kinds", default="ff,heads,residual", help="comma list of: ff, heads, residual")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = commands.add_parser("ensemble", help="weight adapter modules by similarity to a target; few-shot transfer")
    p.add_argument("--target", required=True, help="the target task")
    p.add_argument("--sources", nargs="+", default=None,
                   help="adapter modules (default: the zoo's modules of --kind trained on other tasks)")
    p.add_argument("--kind", choices=list(PEFT_KINDS), default="lora", help="which zoo modules are the default sources")
    p.add_argument("--similarity", default="loss", choices=list(ENSEMBLE_MEASURES))
    p.add_argument("--temperature", type=float, default=None, help="softmax temperature (default: the measure's)")
    p.add_argument("--granularity", choices=list(GRANULARITIES), default="model",
                   help="one set of weights, one per layer, or one per block (per-layer measures)")
    p.add_argument("--shots", type=_positive_int, default=32, help="target training examples")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=_positive_int, default=50, help="few-shot tuning steps (batch 8)")
    p.add_argument("--limit", type=_positive_int, default=None, help="first N target dev examples")
    p.add_argument("--json", action="store_true")

    p = commands.add_parser("tasks", help="the task registry and which tasks the data root holds")
    p.add_argument("--json", action="store_true")

    p = commands.add_parser("sweep", help="sweep or search a method's settings on Ray Tune (run, show, materialize)")
    sweep_commands = p.add_subparsers(dest="sweep_command", required=True)
    r = sweep_commands.add_parser("run", help="run a sweep (running it again resumes it)")
    r.add_argument("--method", required=True, help=f"a merge method {_methods()}")
    r.add_argument("--models", nargs="+", required=True, help="the models to merge (zoo names, folders, hub ids)")
    r.add_argument("--base", default=None, help="the model they were fine-tuned from (task vectors)")
    r.add_argument("--vary", nargs="+", action="extend", default=[], metavar="SETTING",
                   help="the dimensions: density=0.1:0.9:5 (points), lambda=0:2 (a range), scope=model,tensor "
                        "(values), components=attention+feed_forward,all, models=a+b,a+b+c")
    r.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="settings held fixed, e.g. scope=tensor")
    r.add_argument("--per-layer", action="store_true", help="one lambda per transformer block (searched "
                   "continuously: --algorithm cmaes, tpe or random), over the --vary lambda range")
    r.add_argument("--algorithm", choices=list(ALGORITHMS), default="grid")
    r.add_argument("--trials", type=_positive_int, default=None, help="points to try (grid: all; else 20)")
    r.add_argument("--task", nargs="+", default=None, help="the objective's tasks (default: every model's task)")
    r.add_argument("--task-weights", nargs="+", type=float, default=None, help="their weights (default: equal)")
    r.add_argument("--dev-size", type=_positive_int, default=200,
                   help="the objective is measured on the first N dev examples of each task")
    r.add_argument("--holdout-size", type=int, default=0,
                   help="the best point is reported on the N dev examples after those (disjoint)")
    r.add_argument("--components", default=None,
                   help="comma list of groups the method merges: " + ",".join(GROUPS) + " (default: all)")
    r.add_argument("--seed", type=int, default=0, help="of the search algorithm")
    r.add_argument("--workers", type=_positive_int, default=None, help="trials at once (default: CPUs per trial)")
    r.add_argument("--cpus-per-trial", type=_positive_int, default=1)
    r.add_argument("--address", default=None, help="a Ray cluster, e.g. 10.0.0.1:6379 (default: RAY_ADDRESS, "
                   "else Ray starts on this machine)")
    r.add_argument("--name", default=None, help="the sweep's name (default: derived from its settings)")
    r.add_argument("--json", action="store_true", help="one JSON object per finished trial, then the summary")
    for name, help_text in (("show", "a sweep's table and best point"),
                            ("materialize", "write a sweep's best point (or --trial) as a normal merge")):
        s = sweep_commands.add_parser(name, help=help_text)
        s.add_argument("sweep", help="the sweep's name or folder")
        if name == "materialize":
            s.add_argument("--out", required=True)
            s.add_argument("--trial", default=None, help="this trial instead of the best")
            s.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        s.add_argument("--json", action="store_true")
    return parser


def _print_table(rows: list[dict], columns: list[str]) -> None:
    cells = [[("" if r.get(c) is None else f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r[c]))
              for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _run(args: argparse.Namespace) -> None:
    if args.command == "train":
        config = TrainConfig(task=args.task, base=args.base, seed=args.seed, steps=args.steps,
                             batch_size=args.batch_size, lr=args.lr, partition=args.partition,
                             save_every=args.save_every, peft=args.peft, head_only=args.head_only, prompt=args.prompt,
                             prefix_tokens=args.prefix_tokens, prefix_projection=args.prefix_projection,
                             bottleneck_size=args.bottleneck_size, eval_limit=args.eval_limit, sampling=args.sampling,
                             cartography=args.cartography, cartography_every=args.cartography_every)
        result = train(config, args.out, overwrite=args.overwrite)
        summary = {"out": str(result.out), **{k: result.metadata[k] for k in ("task", "seed", "steps", "partition")},
                   "dev": result.metadata["scores"]["dev"]}
        if "tasks" in result.metadata:  # multi-task: dev scores per task
            dev = "; ".join(f"{task}: {_scores(scores)}" for task, scores in summary["dev"].items())
        else:
            dev = _scores(summary["dev"])
        print(json.dumps(summary) if args.json else f"saved {result.out}: dev {dev}")
    elif args.command == "eval":
        result = evaluate(args.model, args.task, args.split, args.limit, batch_size=args.batch_size,
                          allow_pickle=args.allow_pickle)
        print(json.dumps(result) if args.json else f"{result['task']} {result['split']} n={result['n']}: "
                                                   f"{_scores(result)}")
    elif args.command == "zoo" and args.zoo_command in ("build", "download"):
        rows = (zoo.build(args.recipe, only=args.only, rebuild=args.rebuild) if args.zoo_command == "build"
                else zoo.download(args.repo))
        print(json.dumps(rows) if args.json else "\n".join(f"{r['name']}: {r['status']} ({r['seconds']} s)"
                                                           for r in rows))
    elif args.command == "zoo":
        rows = zoo.listing()
        if args.json:
            print(json.dumps(rows, indent=2))
        elif not rows:
            print("the zoo is empty; build it with: python -m merging_core zoo build --recipe demo (a few minutes) "
                  "or zoo build (the default recipe)")
        else:
            _print_table(rows, ["name", "family", "params", "head", "task", "kind", "seed", "steps", "partition",
                                "metric", "score", "recipe"])
    elif args.command == "merge":
        _merge(args)
    elif args.command == "methods":
        rows = available_methods()
        if args.json:
            print(json.dumps(rows, indent=2))
        for m in [] if args.json else rows:
            print(f"{m['name']} ({m['family']}): {m['doc']}  [{m['paper']}]")
            for p in m["params"]:
                bounds = f" in [{p['low']}, {p['high']}]" if p["low"] is not None or p["high"] is not None else ""
                choices = f" one of {list(p['choices'])}" if p["choices"] else ""
                print(f"    {p['name']} ({p['kind']}, default {p['default']}{bounds}{choices}): {p['doc']}")
    elif args.command in ("compare", "greedy"):
        if args.command == "compare" and (args.pairwise or args.subsets):
            if args.pairwise and args.subsets not in (None, 2):
                raise MergeLabError(f"--pairwise merges pairs, but --subsets asks for {args.subsets}; give one of them",
                                    param="subsets")
            rows = compare_subsets(args.models, args.methods, size=args.subsets or 2, base=args.base,
                                   multitask=args.multitask, ensemble=args.ensemble, limit=args.limit,
                                   stats_data=args.stats_data, space=args.space)
        elif args.command == "compare":
            rows = compare(args.models, args.methods, base=args.base, multitask=args.multitask,
                           ensemble=args.ensemble, limit=args.limit, stats_data=args.stats_data, space=args.space)
        else:
            name, params = parse_method_text(args.method)
            rows = greedy(args.models, name, params, base=args.base, limit=args.limit)
        table = []
        for row in rows:
            table.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
        if not args.json:
            # subsets (compare --pairwise / --subsets) print as "a + b"
            table = [{**r, "subset": " + ".join(r["subset"])} if isinstance(r.get("subset"), list) else r
                     for r in table]
            columns = ["model", "kind"] + [c for c in dict.fromkeys(k for r in table for k in r)
                                           if c not in ("model", "kind", "mean", "added", "models", "subsets")] + ["mean"]
            (_print_markdown if getattr(args, "markdown", False) else _print_table)(table, columns)
    elif args.command in ("curve", "plane"):
        _path(args)
    elif args.command == "align":
        result = align(args.a, args.b, merge_type=args.merge_type, attention=args.attention, residual=args.residual,
                       qk=args.qk, text=args.text, split=args.split, examples=args.examples, tokens=args.tokens,
                       method=args.method, zip_same=args.zip_same, out=args.out, overwrite=args.overwrite)
        summary = result.summary()
        if args.json:
            print(json.dumps(summary))
            return
        what = f"{args.a} and {args.b} zipped" if args.method == "zip" else f"{args.b} in {args.a}'s basis"
        print(f"saved {result.out}: {what} ({args.merge_type}, attention {args.attention}, "
              f"residual {args.residual}{', separate Q/K' if args.qk else ''}); function-preserving: "
              f"{'yes' if summary['function_preserving'] else 'no'}")
        for site, values in summary["sites"].items():
            if values["permuted"]:
                print(f"  {site}: mean matched correlation {values['before']:.3f} -> {values['after']:.3f}")
        print(f"  {summary['text']['tokens']} tokens; seconds: " + ", ".join(f"{k} {v}" for k, v in summary["seconds"].items()))
    elif args.command == "ensemble":
        result = ensemble(args.target, args.sources, similarity=args.similarity, temperature=args.temperature,
                          shots=args.shots, seeds=args.seeds, granularity=args.granularity, steps=args.steps,
                          limit=args.limit, kind=args.kind)
        summary = result.summary()
        if args.json:
            print(json.dumps(summary))
            return
        print(f"{result.target}: {result.similarity} similarity, temperature {result.temperature}, {result.shots} shots")
        for source in result.sources:
            scores = ", ".join(f"{s.scores[result.similarity][source]:.4f}" for s in result.scores)
            weights = ", ".join(f"{w[source]:.3f}" for w in result.weights)
            print(f"  {source}: similarity {scores}; weight {weights}")
        _print_table(result.table(), ["init", "seeds", "metric", "mean", "sd"])
    elif args.command == "permute":
        kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
        out = permute_checkpoint(args.model, args.out, kinds=kinds, seed=args.seed, overwrite=args.overwrite)
        print(f"saved {out}: {args.model} with its {', '.join(kinds)} units permuted (seed {args.seed})")
    elif args.command == "sweep":
        _sweep(args)
    elif args.command == "tasks":
        here = set(data.available_tasks())
        rows = [{"task": s.name, "title": s.title, "kind": s.kind, "labels": len(s.labels) or None,
                 "metrics": ",".join(s.metrics), "in_data_root": s.name in here} for s in tasks.TASKS.values()]
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            _print_table(rows, ["task", "title", "kind", "labels", "metrics", "in_data_root"])


def _sweep(args: argparse.Namespace) -> None:
    if args.sweep_command == "materialize":
        result = materialize(args.sweep, args.out, trial=args.trial, overwrite=args.overwrite)
        summary = {"out": str(result.out), "spec": result.spec.to_dict(), "seconds": round(result.seconds, 2)}
        print(json.dumps(summary) if args.json else f"saved {result.out} ({result.spec.method}, "
                                                        f"{result.seconds:.1f} s); its merge_config.json re-runs it")
        return
    if args.sweep_command == "show":
        run = open_sweep(args.sweep)
        rows = run.rows()
        if args.json:
            print(json.dumps({"rows": rows, "summary": run.summary()}, default=str))
            return
    else:
        components = [c.strip() for c in args.components.split(",") if c.strip()] if args.components else None
        spec = SweepSpec(args.method, tuple(args.models), base=args.base, params=parse_assignments(args.set, "--set"),
                         space=tuple(args.vary), per_layer=args.per_layer, tasks=args.task,
                         task_weights=args.task_weights, dev_size=args.dev_size, holdout_size=args.holdout_size,
                         algorithm=args.algorithm, trials=args.trials, seed=args.seed,
                         components=tuple(components) if components else GROUPS, cpus_per_trial=args.cpus_per_trial,
                         workers=args.workers)
        run = sweep(spec, name=args.name, address=args.address, progress=None if args.json else _stderr_progress())
        rows = []
        for row in run:
            rows.append(row)
            if args.json:
                print(json.dumps({k: v for k, v in row.items() if k != "point"}, default=str), flush=True)
        if args.json:
            print(json.dumps(run.summary(), default=str))
            return
    point = list(dict.fromkeys(k for r in rows for k in r["point"]))
    meta = {"trial", "objective", "error", "point", "finished", "merge_seconds", "eval_seconds", "run", "pid", "node"}
    scores = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in meta and k not in point]
    _print_table(rows, [c for c in ["trial", *point, "objective", *scores, "merge_seconds", "eval_seconds", "error"]
                        if any(r.get(c) is not None for r in rows)])
    summary = run.summary()
    best = summary.get("best")
    print(f"sweep {summary['name']}: {summary['finished']} of {summary['trials']} trials finished"
          + (f", {summary['errors']} failed" if summary["errors"] else "") + f" ({run.folder})")
    if best:
        print(f"best: {', '.join(f'{k}={v}' for k, v in best['point'].items())}: objective {best['objective']:.4f}")
    if summary.get("holdout"):
        print(f"held out ({summary['holdout']['examples']} examples per task): objective "
              f"{summary['holdout']['objective']:.4f}")


def _stderr_progress():
    """A progress line on stderr each time the fraction moves (a sweep repeats its report while trials run)."""
    last = [-1.0]

    def report(fraction: float, desc: str) -> None:
        if fraction != last[0]:
            print(f"[{fraction:4.0%}] {desc}", file=sys.stderr, flush=True)
            last[0] = fraction
    return report


def _merge(args: argparse.Namespace) -> None:
    components = [c.strip() for c in args.components.split(",") if c.strip()] if args.components else None
    spec = MergeSpec(args.method, tuple(args.models), base=args.base, params=parse_assignments(args.set, "--set"),
                     components=components, fallback=args.fallback, heads=args.heads, stats_tasks=args.stats_task,
                     stats_files=args.stats_file, seed=args.seed, allow_pickle=args.allow_pickle, space=args.space,
                     dtype=args.dtype, shard_size=args.shard_size, device=args.device)
    result = merge(spec, out=args.out, overwrite=args.overwrite)
    solved = convergence(result.report)
    summary = {"out": str(result.out), "method": args.method, "tasks": result.tasks,
               "seconds": round(result.seconds, 2), "notes": result.notes, "convergence": solved}
    if args.eval:
        summary["scores"] = {t: evaluate(str(result.out), t, limit=args.limit) for t in result.tasks}
    if args.json:
        print(json.dumps(summary))
        return
    print(f"saved {result.out} ({args.method}, {result.seconds:.1f} s); heads for: {', '.join(result.tasks) or 'none'}")
    for note in result.notes:
        print(f"note: {note}")
    if solved:
        reached = sum(row["converged"] for row in solved)
        print(f"solved {len(solved)} parameters, {reached} to the tolerance; worst relative residuals:")
        for row in solved[:5]:
            print(f"  {row['parameter']}: {row['residual_after']:.2e} after {row['steps']} steps")
    for task, scores in summary.get("scores", {}).items():
        print(f"{task}: {_scores(scores)}")


def _path(args: argparse.Namespace) -> None:
    """`curve` / `plane`: stream the items as they are computed, then the summary."""
    tasks = tuple(t for item in args.task or [] for t in item.split(",") if t.strip())
    common = {"tasks": tasks, "split": args.split, "limit": args.limit, "head_from": args.head_from,
              "space": args.space, "base": args.base, "merges": tuple(args.merges)}
    if args.command == "curve":
        run = curve(CurveSpec((args.a, args.b), points=args.points, path=args.path, bend_steps=args.bend_steps,
                              bend_lr=args.bend_lr, seed=args.seed, examples=args.examples, datamap=args.datamap,
                              **common))
    else:
        run = plane(PlaneSpec((args.a, args.b, args.c), grid=args.grid, margin=args.margin, **common))
    for item in run:
        if args.json:
            print(json.dumps(item), flush=True)
        elif item["kind"] == "bend":
            print(f"bend trained on {item['task']}: {item['steps']} steps, train loss {item['train_loss_first']:.4f} -> "
                  f"{item['train_loss_last']:.4f} ({item['seconds']} s)", flush=True)
        else:
            where = (f"t={item['t']:.3f}" if "t" in item else f"x={item['x']:.3f} y={item['y']:.3f}")
            label = item.get("method") or item.get("model") or ""
            print(f"{item['kind']:<6} {where}  {label}  " + "; ".join(
                f"{task}: {_scores(scores)}" for task, scores in item["scores"].items()), flush=True)
    summary = run.summary()
    if args.json:
        print(json.dumps(summary))
        return
    for task, b in summary.get("barriers", {}).items():
        print(f"{task}: loss barrier {b['loss_barrier']:.4f} at t={b['loss_barrier_at']:.2f}; {b['metric']} barrier "
              f"{b['metric_barrier']:.4f} at t={b['metric_barrier_at']:.2f}")
    if "distances" in summary:
        d = summary["distances"]
        task_cos = f", task-vector cosine {d['task_cosine']:.4f}" if d["task_cosine"] is not None else ""
        print(f"distance: L2 {d['l2']:.4f}, RMS {d['rms']:.3e}, cosine {d['cosine']:.6f}{task_cos} ({d['params']} params)")
    for task, best in summary.get("best", {}).items():
        print(f"{task}: best {best['metric']} {best['value']:.4f} at x={best['x']:.3f} y={best['y']:.3f}")
    for task, k in summary.get("knowledge", {}).items():
        share = k["forgotten_at_barrier_share"]
        print(f"{task} examples ({k['examples']} {k['split']}): {len(k['flips'])} flip along the path; of "
              f"{k['known_both']} right at both ends, {k['forgotten_at_barrier']} "
              f"({'–' if share is None else f'{share:.1%}'}) are wrong at the barrier (t={k['barrier_t']:.2f}) and "
              f"{k['forgotten_ever']} at some point (--json for the matrix)")
    for note in summary["notes"]:
        print(f"note: {note}")


def _print_markdown(rows: list[dict], columns: list[str]) -> None:
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for r in rows:
        print("| " + " | ".join("" if r.get(c) is None else f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c])
                                for c in columns) + " |")


def _scores(result: dict) -> str:
    skip = {"task", "split", "n"}
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items() if k not in skip)


# Engine inputs whose flag is not simply --<name> (`param` of a MergeLabError -> the option's dest).
_DESTS = {"stats_tasks": "stats_task", "stats_files": "stats_file", "tasks": "task", "similarity": "similarity",
          "models": ("models", "a"), "params": "set", "size": "subsets", "space": "vary"}


def _flag(parser: argparse.ArgumentParser, args: argparse.Namespace, param: str) -> str:
    """How a shell user names the engine input `param` in this command: its flag, or --set KEY=..."""
    command = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    if args.command in ("zoo", "sweep"):
        command = next(a for a in command._actions if isinstance(a, argparse._SubParsersAction)).choices[
            getattr(args, f"{args.command}_command")]
    options = {a.dest: a.option_strings[-1] for a in command._actions if a.option_strings}
    wanted = _DESTS.get(param, param)
    for dest in (wanted if isinstance(wanted, tuple) else (wanted,)):
        if dest in options:
            return options[dest] + ("/--b" if dest == "a" and "b" in options else "")
    if "set" in options and getattr(args, "method", None) in METHODS:
        return f"--set {param}=..."
    return param


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        with _exit_on_terminate():
            _run(args)
    except MergeLabError as exc:
        text = exc.render(lambda param: _flag(parser, args, param))
        print("error: " + " ".join(text.split()), file=sys.stderr)  # one line, always
        return 2
    return 0


@contextmanager
def _exit_on_terminate() -> Iterator[None]:
    """SIGTERM (`kill`, `timeout`, a job scheduler) ends the command as Ctrl-C does, by an exception: a
    merge's staging folder and the output folder it claimed are then removed, not left behind to block
    the next run."""
    if threading.current_thread() is not threading.main_thread():  # (signals reach the main thread only)
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _terminated(signum: int, frame) -> None:
    raise SystemExit(128 + signum)
