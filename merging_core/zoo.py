"""The zoo: the checkpoints a user explores, built from recipes and listed with their scores.

A recipe (`assets/recipes/<name>.yaml`, or any YAML path) maps entry names to training settings
(the fields of `TrainConfig`) over shared `defaults`. Building trains every entry that is missing into
`$MERGELAB_HOME/zoo/<name>`; entries already there are kept (an interrupted build resumes where it
stopped; nothing is retrained or overwritten unless `rebuild=True`). Every folder under the zoo with a
`mergelab.json` is an entry, intermediate checkpoints included (`sst2-s0/step-100`).

A multi-head entry (a multi-task model, recipe `multitask`) is listed with its tasks comma-joined in
`task`, the list in `tasks`, and as `score` the mean of the tasks' headline dev metrics (`metric` "mean").
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from . import catalog, settings
from .errors import MergeLabError, writing
from .models import METADATA
from .outputs import staging, sweep
from .progress import ProgressFn, remaining, scaled
from .scratch import is_scratch
from .tasks import get_task, listed_as
from .training import TrainConfig, train

RECIPES = Path(__file__).resolve().parent.parent / "assets" / "recipes"


@dataclass(frozen=True)
class Recipe:
    name: str
    entries: dict[str, TrainConfig]
    about: str = ""  # one line: what the recipe builds
    minutes: float | None = None  # measured build time on a 2-core CPU, shown before a build starts

    def missing(self) -> list[str]:
        """The entries not built yet in this zoo."""
        return [name for name in self.entries if not (settings.zoo_dir() / name / METADATA).is_file()]


def load_recipe(recipe: str | Path = "default") -> Recipe:
    path = Path(recipe)
    if not path.suffix:
        path = RECIPES / f"{recipe}.yaml"
    if not path.is_file():
        known = ", ".join(p.stem for p in sorted(RECIPES.glob("*.yaml")))
        raise MergeLabError(f"recipe {str(recipe)!r} not found; give a YAML path or one of: {known}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:  # its own message runs over several lines: the problem and where
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or ["unreadable"])[0]
        raise MergeLabError(f"recipe {path.name} is not valid YAML: {problem}{where}", param="recipe") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MergeLabError(f"recipe {path.name} cannot be read: {exc}", param="recipe") from None
    raw = {} if raw is None else raw
    shape = "a mapping with 'defaults' (settings shared by every entry) and 'models' (entry name -> settings)"
    if not isinstance(raw, dict):
        raise MergeLabError(f"recipe {path.name} must be {shape}, not a {type(raw).__name__}", param="recipe")
    defaults, models = raw.get("defaults") or {}, raw.get("models") or {}
    for key, value in (("defaults", defaults), ("models", models)):
        if not isinstance(value, dict):
            raise MergeLabError(f"recipe {path.name}: '{key}' must be a mapping, not a {type(value).__name__}; "
                                f"a recipe is {shape}", param="recipe")
    types = {f.name: f.type for f in fields(TrainConfig)}
    entries = {}
    for name, settings_ in models.items():
        where = f"recipe {path.name}, entry {name!r}"
        if settings_ is not None and not isinstance(settings_, dict):
            raise MergeLabError(f"{where}: its settings must be a mapping (e.g. {{task: sst2, seed: 0}}), not "
                                f"{settings_!r}", param="recipe")
        merged = {**defaults, **(settings_ or {})}
        unknown = sorted(set(merged) - set(types))
        if unknown:
            raise MergeLabError(f"{where}: unknown setting(s) {unknown}; allowed: {sorted(types)}", param="recipe")
        if "task" not in merged:
            raise MergeLabError(f"{where}: no task; give one, e.g. task: sst2", param="recipe")
        merged = {key: _setting(where, key, value, types[key]) for key, value in merged.items()}
        try:
            entries[name] = TrainConfig(**merged)
        except MergeLabError as exc:
            raise MergeLabError(f"{where}: {exc.message}", param="recipe", hint=exc.hint) from None
    about, minutes = raw.get("about") or "", raw.get("minutes")
    if not isinstance(about, str) or not (minutes is None or isinstance(minutes, (int, float))):
        raise MergeLabError(f"recipe {path.name}: 'about' must be text and 'minutes' a number", param="recipe")
    return Recipe(path.stem, entries, about, minutes)


def recipes() -> list[Recipe]:
    """Every recipe shipped in assets/recipes, by name."""
    return [load_recipe(p.stem) for p in sorted(RECIPES.glob("*.yaml"))]


def _setting(where: str, key: str, value, annotation: str):
    """A recipe value checked against the TrainConfig field's annotation ("int", "float | None", ...).
    YAML 1.1 reads `1e-4` as text, so a float field also takes a numeric string."""
    kinds = {part.strip() for part in str(annotation).split("|")}
    if value is None and "None" in kinds:
        return value
    if "bool" in kinds and isinstance(value, bool):
        return value
    if not isinstance(value, bool):
        if "int" in kinds and isinstance(value, int):
            return value
        if "float" in kinds:
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        if "str" in kinds and isinstance(value, str):
            return value
        if "Sequence[str]" in kinds and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    wanted = " or ".join(k for k in ("a whole number" if "int" in kinds else "", "a number" if "float" in kinds
                                     else "", "true/false" if "bool" in kinds else "", "text" if "str" in kinds
                                     else "") if k)
    raise MergeLabError(f"{where}: setting {key!r} must be {wanted or annotation}, got {value!r}", param="recipe")


def build(recipe: str | Path = "default", *, only: list[str] | None = None, rebuild: bool = False,
          progress: ProgressFn | None = None) -> list[dict]:
    """Train the recipe's missing entries; returns one status row per entry."""
    plan = load_recipe(recipe)
    names = list(plan.entries)
    if only:
        missing = sorted(set(only) - set(names))
        if missing:
            raise MergeLabError(f"recipe {plan.name} has no entries {missing}; it has {names}")
        names = [n for n in names if n in only]
    rows = []
    # A build killed midway leaves its claimed, empty entry folder and its staging folder behind: clear
    # them (only those of processes that are gone) so the entry is built again instead of refused.
    sweep(settings.zoo_dir())
    todo = [n for n in names if rebuild or not (settings.zoo_dir() / n / METADATA).is_file()]
    refused = untrainable(plan, todo)
    if refused:  # before the first entry trains: a later entry's base would fail only minutes from now
        raise MergeLabError(refused, param="recipe")
    # Progress and the time left are shared out by training steps, the bulk of every entry's time.
    weight = {n: plan.entries[n].steps for n in todo}
    total, done, spent = sum(weight.values()) or 1, 0, 0.0
    for name in names:
        target = settings.zoo_dir() / name
        if name not in todo:
            rows.append({"name": name, "status": "kept", "seconds": 0.0})
            continue
        started = time.perf_counter()
        rest = total - done - weight[name]  # steps of the entries after this one
        after = remaining(spent / done * rest) if done and rest else ""
        prefix = f"[{todo.index(name) + 1}/{len(todo)}] {name}: "
        step_progress = scaled(progress, done / total, (done + weight[name]) / total, prefix)
        if step_progress is not None and after:
            step_progress = _suffixed(step_progress, f" · then {after.replace(' left', '')} for the rest")
        train(plan.entries[name], target, overwrite=rebuild, progress=step_progress, recipe=plan.name)
        seconds = time.perf_counter() - started
        spent, done = spent + seconds, done + weight[name]
        rows.append({"name": name, "status": "built", "seconds": round(seconds, 1)})
    return rows


def untrainable(plan: Recipe, names: list[str] | None = None) -> str:
    """The one-line reason the first of `names` (default: every entry) whose base model's family cannot be
    fine-tuned yet cannot be built (`arch.require`'s message), or "". A base that does not exist yet (an
    earlier entry's checkpoint) is left to the build to check."""
    for name in plan.entries if names is None else names:
        base = plan.entries[name].base
        refused = catalog.unsupported(base, "training", base)
        if refused:
            return f"entry {name!r}: {refused}"
    return ""


def _suffixed(progress: ProgressFn, suffix: str) -> ProgressFn:
    return lambda fraction, desc: progress(fraction, desc + suffix)


def download(repo: str | None = None, *, cache_dir: str | Path | None = None,
             progress: ProgressFn | None = None) -> list[dict]:
    """Copy a published zoo from the hub (`repo`, default `MERGELAB_ZOO_REPO`) into this zoo.

    The repository holds one folder per entry, as `build` writes them (`<entry>/mergelab.json`, weights,
    tokenizer). It is fetched with `huggingface_hub.snapshot_download` (into `cache_dir`, default the hub's
    cache; offline, a copy already in that cache is used), then every entry missing here is copied in
    atomically. Entries already in the zoo are kept. Returns one status row per entry."""
    repo = repo or settings.zoo_repo()
    if not repo:
        raise MergeLabError("no published zoo configured; set MERGELAB_ZOO_REPO to a hub repository id, "
                            "or build a recipe instead", param="repo")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if progress:
        progress(0.0, f"downloading the zoo from {repo}")
    try:
        # the cache's location is read now (the hub library reads HF_HUB_CACHE once, on import)
        snapshot = Path(snapshot_download(repo, cache_dir=cache_dir or os.environ.get("HF_HUB_CACHE") or None))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise MergeLabError(f"could not download the zoo {repo!r}: {reason}", param="repo") from None
    found = sorted(m.parent for m in snapshot.glob(f"*/{METADATA}"))
    if not found:
        raise MergeLabError(f"the hub repository {repo!r} holds no zoo entries (folders with {METADATA})",
                            param="repo")
    rows = []
    for i, folder in enumerate(found):
        target = settings.zoo_dir() / folder.name
        if (target / METADATA).is_file():
            rows.append({"name": folder.name, "status": "kept", "seconds": 0.0})
            continue
        started = time.perf_counter()
        if progress:
            progress(i / len(found), f"[{i + 1}/{len(found)}] copying {folder.name}")
        with writing(target), staging(target) as tmp:
            # the hub's cache holds links into its blob store: copy the files they point to
            shutil.copytree(folder, tmp, dirs_exist_ok=True, symlinks=False)
        rows.append({"name": folder.name, "status": "downloaded", "seconds": round(time.perf_counter() - started, 1)})
    if progress:
        progress(1.0, "zoo downloaded")
    return rows


# What each tab of the app needs from the zoo, as a test on its entries, and the recipes that provide it.
_NEEDS = {
    "Evaluate": ("a fine-tuned model", ("demo", "default"),
                 lambda rows, pairs: any(r["kind"] in ("full", "lora", "ia3", "bottleneck", "multitask") for r in rows)),
    "Merge": ("two models fine-tuned from one pretrained model", ("demo", "default"),
              lambda rows, pairs: sum(r["kind"] == "full" and not is_scratch(r["base"])
                                      for r in rows) >= 2),
    "Curves": ("a pair of checkpoints", ("demo", "default"), lambda rows, pairs: bool(pairs)),
    "Permute": ("two models pretrained from different random initializations", ("demo", "scratch"),
                lambda rows, pairs: any(p["kind"] == "different initializations" for p in pairs)),
    "Ensemble": ("LoRA modules of at least two tasks", ("demo", "peft"),
                 lambda rows, pairs: len({r["task"] for r in rows if r["kind"] == "lora"}) >= 2),
}
_NEEDS["Sweep"] = _NEEDS["Merge"]  # a sweep merges what the Merge tab merges


def readiness() -> list[dict]:
    """For each tab of the app: whether the zoo has what it needs, what that is, and which recipes build
    it. Each: {"tab", "ready", "needs", "recipes"}."""
    rows, found = entries(), pairs()
    return [{"tab": tab, "ready": bool(test(rows, found)), "needs": needs, "recipes": list(recipes_)}
            for tab, (needs, recipes_, test) in _NEEDS.items()]


def entries() -> list[dict]:
    """Every zoo checkpoint with its provenance and headline dev score, sorted by name."""
    root = settings.zoo_dir()
    if not root.is_dir():
        return []
    rows = []
    for meta_path in sorted(root.rglob(METADATA)):
        folder = meta_path.parent
        if any(part.startswith(".") for part in folder.relative_to(root).parts):
            continue  # a build in progress (staging folder)
        meta = json.loads(meta_path.read_text())
        dev = meta.get("scores", {}).get("dev", {})
        heads = list(meta.get("heads", {}))
        if heads:  # a multi-head checkpoint (multi-task model, merge): dev scores per task
            tasks = list(meta.get("tasks") or heads)
            task, metric, score = ",".join(tasks), "mean", _mean_headline(tasks, dev)
        else:
            tasks = [meta["task"]] if meta.get("task") else []
            spec = _spec(meta.get("task"))
            task, metric = meta.get("task"), spec.main_metric if spec else None
            score = dev.get(metric) if spec else None
        rows.append({
            "name": folder.relative_to(root).as_posix(),
            "task": task,
            "tasks": tasks,
            "kind": meta.get("kind"),
            "base": meta.get("base"),
            "seed": meta.get("seed"),
            "steps": meta.get("steps"),
            "partition": meta.get("partition"),
            "recipe": meta.get("recipe"),
            "metric": metric,
            "score": score,
            "dev": dev,
            "path": str(folder),
        })
    return rows


def listing() -> list[dict]:
    """`entries()`, each with what the app's model pickers show of it (`catalog.columns`): family, model type,
    parameter count (as text in "params"), head kind."""
    return [{**row, **catalog.columns(Path(row["path"]))} for row in entries()]


def _spec(name: str | None):
    try:
        return get_task(name) if name else None
    except MergeLabError:  # a task this version does not know: list the entry without a score
        return None


def _mean_headline(tasks: list[str], dev: dict) -> float | None:
    """The mean of the tasks' headline dev metrics (higher-is-better ones); None when one is missing."""
    values = []
    for name in tasks:
        spec, scores = _spec(name), dev.get(name)
        if spec is None or spec.lower_is_better or not isinstance(scores, dict) or spec.main_metric not in scores:
            return None
        values.append(float(scores[spec.main_metric]))
    return sum(values) / len(values) if values else None


def pairs() -> list[dict]:
    """Pairs of zoo checkpoints worth a curve, by what separates them: the seed, the initialization (models
    pretrained from scratch), the pretraining step they were fine-tuned from, the training step, the data
    partition, or the task. Each: {"kind", "label",
    "a", "b", "tasks"}."""
    rows = [r for r in entries() if r["task"] and len(r["tasks"]) == 1
            and r["kind"] in ("full", "lora", "ia3", "bottleneck")]
    found: list[dict] = []

    def add(kind: str, a: dict, b: dict, tasks: list[str]) -> None:
        # scored on listed tasks: models pretrained on the data-root text on WikiText-2 (its dev text)
        found.append({"kind": kind, "label": f"{kind}: {a['name']} ↔ {b['name']}", "a": a["name"], "b": b["name"],
                      "tasks": [listed_as(t) for t in tasks]})

    finals = [r for r in rows if "/" not in r["name"]]
    by_name = {r["name"]: r for r in rows}
    for i, a in enumerate(finals):
        for b in finals[i + 1:]:
            same_run_settings = a["kind"] == b["kind"] and a["steps"] == b["steps"]
            origins = _origin(a, by_name), _origin(b, by_name)
            if a["task"] == b["task"] and None not in origins and origins[0] != origins[1]:
                add("different initializations", a, b, [a["task"]])
            elif (a["task"] == b["task"] and a["kind"] == b["kind"] and a["base"] != b["base"]
                  and _run(a["base"]) in by_name and _run(a["base"]) == _run(b["base"])):
                # fine-tunes of two checkpoints of one pretraining run (`scratch-s0/step-100`, `scratch-s0`)
                add("different pretraining steps", a, b, [a["task"]])
            elif a["task"] == b["task"] and a["partition"] == b["partition"] and a["seed"] != b["seed"] and same_run_settings:
                add("same task, different seeds", a, b, [a["task"]])
            elif a["task"] == b["task"] and a["partition"] != b["partition"]:
                add("same task, different data partitions", a, b, [a["task"]])
    for r in rows:
        if "/" in r["name"]:
            final = next((f for f in finals if r["name"].startswith(f["name"] + "/")), None)
            if final:
                add("same run, different steps", r, final, [r["task"]])
    first_per_task = {}
    for r in finals:
        if r["kind"] == "full":
            first_per_task.setdefault(r["task"], r)
    tasks = list(first_per_task.values())
    for i, a in enumerate(tasks):
        for b in tasks[i + 1:]:
            add("different tasks", a, b, [a["task"], b["task"]])
    return found


def _origin(row: dict, by_name: dict[str, dict]) -> str | None:
    """The zoo entry pretrained from scratch that a checkpoint descends from (None: from a pretrained model);
    a fine-tune of an intermediate checkpoint (`scratch-s0/step-100`) descends from its run (`scratch-s0`)."""
    seen = set()
    while row is not None and row["name"] not in seen:
        seen.add(row["name"])
        base = str(row.get("base") or "")
        if is_scratch(base):
            return _run(row["name"])
        row = by_name.get(base)
    return None


def _run(name: str | None) -> str:
    """The zoo entry a checkpoint name belongs to: `scratch-s0` for `scratch-s0/step-100` and for itself."""
    return str(name or "").split("/")[0]
