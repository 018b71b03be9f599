"""`python -m merging_core <command>`: the engine from a shell.

Commands: train, eval, zoo build, zoo list, tasks. Results go to stdout (JSON with --json); progress
bars go to stderr; a bad input ends with one line `error: ...` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import data, tasks, zoo
from .errors import MergeLabError
from .evaluation import evaluate
from .training import TrainConfig, train


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m merging_core", description="MergeLab engine")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train", help="fine-tune one model on one task")
    p.add_argument("--base", default="minilm", help="model to start from (zoo name, folder, 'minilm', hub id)")
    p.add_argument("--task", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=_positive_int, default=300)
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--lr", type=float, default=None, help="default: 1e-4 full, 5e-4 LoRA, 1e-3 head-only")
    p.add_argument("--partition", default="iid", help="iid | iid:K/N | label-skew:K/N[@P]")
    p.add_argument("--save-every", type=_positive_int, default=None, help="also save a checkpoint every N steps")
    p.add_argument("--peft", choices=["lora"], default=None)
    p.add_argument("--head-only", action="store_true", help="freeze the encoder, train the task head only")
    p.add_argument("--eval-limit", type=_positive_int, default=None, help="score on the first N dev examples")
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
    li = zoo_commands.add_parser("list", help="the zoo's models and their dev scores")
    li.add_argument("--json", action="store_true")

    p = commands.add_parser("tasks", help="the task registry and which tasks the data root holds")
    p.add_argument("--json", action="store_true")
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
                             save_every=args.save_every, peft=args.peft, head_only=args.head_only,
                             eval_limit=args.eval_limit)
        result = train(config, args.out, overwrite=args.overwrite)
        summary = {"out": str(result.out), **{k: result.metadata[k] for k in ("task", "seed", "steps", "partition")},
                   "dev": result.metadata["scores"]["dev"]}
        print(json.dumps(summary) if args.json else f"saved {result.out}: dev {_scores(summary['dev'])}")
    elif args.command == "eval":
        result = evaluate(args.model, args.task, args.split, args.limit, batch_size=args.batch_size,
                          allow_pickle=args.allow_pickle)
        print(json.dumps(result) if args.json else f"{result['task']} {result['split']} n={result['n']}: "
                                                   f"{_scores(result)}")
    elif args.command == "zoo" and args.zoo_command == "build":
        rows = zoo.build(args.recipe, only=args.only, rebuild=args.rebuild)
        print(json.dumps(rows) if args.json else "\n".join(f"{r['name']}: {r['status']} ({r['seconds']} s)"
                                                           for r in rows))
    elif args.command == "zoo":
        rows = zoo.entries()
        if args.json:
            print(json.dumps(rows, indent=2))
        elif not rows:
            print("the zoo is empty; build it with: python -m merging_core zoo build")
        else:
            _print_table(rows, ["name", "task", "kind", "seed", "steps", "partition", "metric", "score"])
    elif args.command == "tasks":
        here = set(data.available_tasks())
        rows = [{"task": s.name, "title": s.title, "kind": s.kind, "labels": len(s.labels) or None,
                 "metrics": ",".join(s.metrics), "in_data_root": s.name in here} for s in tasks.TASKS.values()]
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            _print_table(rows, ["task", "title", "kind", "labels", "metrics", "in_data_root"])


def _scores(result: dict) -> str:
    skip = {"task", "split", "n"}
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items() if k not in skip)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _run(args)
    except MergeLabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
