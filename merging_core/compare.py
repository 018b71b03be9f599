"""Score merges next to what they should beat: the individual models, an output ensemble, a
multi-task model; merges of every pair (or every subset of K) of the models, averaged over the subsets;
and greedy incremental merging. All follow Jin et al. 2023, Dataless knowledge fusion by merging weights
of language models (RegMean), arXiv:2212.09849: individual models, their ensemble and the multi-task
model as the references of a merge; pairwise tables, where every pair of models is merged and each row
is the mean over the pairs; greedy incremental merging (Sec. 5.3).

Every task is scored with its own head: a merged encoder is evaluated on task t with the head of the
model that was trained on t (or the merged head, when the models share a label set). The ensemble for
task t runs every input's encoder under task t's head and averages the outputs (logits, or
probabilities, per example or per token for token classification); for models of one task this is the
usual output ensemble. Evaluators are built once per task and shared by every row, so a table of K
merges costs K forward passes per task, not K tokenizations.

Models of one task trained on different data (partitions of its training set, `partition`) are
compared the same way: every row is scored on the task's whole dev set (the union of the partitions'
distributions), and the multi-task reference is then the model trained on the union of the partitions.
Token-classification models (CoNLL-2003 NER) are scored by span F1; their heads are merged when the
label sets agree and kept per task otherwise, exactly as sequence heads (`merge`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from itertools import combinations
from pathlib import Path
from types import SimpleNamespace
from collections.abc import Callable, Sequence
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from . import partition, stats
from .arch import canonical
from .checkpoint import load_canonical, open_checkpoint
from .encode import encode, pad_id
from .errors import MergeLabError
from .evaluation import Evaluator, headline
from .merge import MergeResult, merge
from .methods import get_method
from .losses import rank_scores
from .models import Loaded, head_tasks, load, model_head, resolve
from .progress import ProgressFn, scaled
from .spec import MergeSpec, specs_from_texts
from .tasks import get_task

STATS_DATA = ("task", "own")  # statistics on the task's whole train split, or on each model's own partition


class Ensemble(torch.nn.Module):
    """Average the outputs of several models that share a head type (logits, or probabilities)."""

    def __init__(self, members: list[torch.nn.Module], mode: str = "logits"):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.mode = mode
        self.config = members[0].config
        self.head_kind = model_head(members[0]).kind  # causal LMs: scored by rank classification

    def forward(self, **inputs: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=combine([m(**inputs).logits.float() for m in self.members], self.mode))

    def rank_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Causal LMs on prompts: the members' label scores (`losses.rank_scores`) combined as logits are."""
        return combine([rank_scores(m, batch) for m in self.members], self.mode)


def combine(outputs: list[torch.Tensor], mode: str) -> torch.Tensor:
    """The ensemble of members' outputs (per example, or per token): their mean logits, or the log of their
    mean probabilities."""
    stacked = torch.stack(outputs)
    if mode == "probabilities" and stacked.shape[-1] > 1:
        return F.softmax(stacked, -1).mean(0).clamp_min(1e-12).log()
    return stacked.mean(0)


class _Recorder(torch.nn.Module):
    """A model whose outputs on an evaluator's batches are kept, in order, for ensembles of it."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.config, self.outputs = model, model.config, []
        self.head_kind = model_head(model).kind

    def forward(self, **inputs: torch.Tensor) -> SimpleNamespace:
        logits = self.model(**inputs).logits.float()
        self.outputs.append(logits)
        return SimpleNamespace(logits=logits)

    def rank_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        scores = rank_scores(self.model, batch).float()
        self.outputs.append(scores)
        return scores


class _Replay(torch.nn.Module):
    """An ensemble of recorded members, replayed batch by batch: the same evaluator calls it with the
    same batches in the same order, so it scores exactly what `Ensemble` of the members would, with no
    forward pass (pairwise tables reuse each model's outputs in every pair)."""

    def __init__(self, recorded: list[list[torch.Tensor]], mode: str, like: "_Recorder"):
        super().__init__()
        self.recorded, self.mode, self.calls = recorded, mode, 0
        # scored as the recorded models were (a causal LM's outputs are label scores on prompts)
        self.config, self.head_kind = like.config, like.head_kind

    def _next(self) -> torch.Tensor:
        i, self.calls = self.calls, self.calls + 1
        return combine([outputs[i] for outputs in self.recorded], self.mode)

    def forward(self, **inputs: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self._next())

    def rank_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._next()


@dataclass
class Inputs:
    """The models of a comparison, their tasks, and a model with each task's head."""

    specs: list[str]
    tasks: list[str]  # one per model (its own task)
    templates: dict[str, Loaded]  # task -> a loaded model with that task's head

    @classmethod
    def open(cls, specs: list[str]) -> "Inputs":
        tasks, templates = [], {}
        for spec in specs:
            ckpt = open_checkpoint(spec)
            if ckpt.task is None:
                raise MergeLabError(f"model {spec!r} has no task head MergeLab can score; compare fine-tuned models")
            tasks.append(ckpt.task)
            if ckpt.task not in templates:
                templates[ckpt.task] = load(spec, get_task(ckpt.task))
        return cls(list(specs), tasks, templates)

    def owner(self, task: str) -> str:
        return self.specs[self.tasks.index(task)]


class Scorer:
    """One evaluator per task, shared by every row of a table; `indices`: these examples of each task's
    split (a sweep's held-out part), else the first `limit`."""

    def __init__(self, inputs: Inputs, limit: int | None, split: str = "dev", tasks: list[str] | None = None,
                 indices: dict[str, Sequence[int]] | None = None):
        self.inputs = inputs
        self.evaluators = {t: Evaluator(t, inputs.templates[t].tokenizer, split, limit,
                                        indices=(indices or {}).get(t))
                           for t in dict.fromkeys(tasks or inputs.tasks)}

    def score(self, task: str, model: torch.nn.Module, progress: ProgressFn | None = None) -> dict:
        return self.evaluators[task](model, progress)

    def merged(self, result: MergeResult, task: str) -> dict:
        """Score a merge (kept in memory) on `task` with that task's head."""
        template = self.inputs.templates[task].model
        model = copy.deepcopy(template)
        load_canonical(model, result.state)
        if result.heads and task in result.heads:
            load_canonical(model, {canonical(k): v for k, v in result.heads[task].items()})
        return self.score(task, model)

    def ensemble(self, task: str, mode: str, specs: list[str] | None = None) -> dict:
        """Score the output ensemble of `specs` (default: every model) on `task`: each member under its
        own head when it was trained on `task`, else its encoder under the head of `task`'s owner."""
        template = self.inputs.templates[task].model
        members = []
        for spec in self.inputs.specs if specs is None else specs:
            if self.inputs.tasks[self.inputs.specs.index(spec)] == task:
                members.append(load(spec, get_task(task)).model)  # its own head
                continue
            member = copy.deepcopy(template)
            ckpt = open_checkpoint(spec)
            load_canonical(member, {n: ckpt.get(n) for n, i in ckpt.infos.items() if i.group not in ("head", "mlm_head")})
            members.append(member)
        return self.score(task, Ensemble(members, mode))


def _row(label: str, kind: str, results: dict[str, dict]) -> dict[str, Any]:
    row: dict[str, Any] = {"model": label, "kind": kind}
    values = []
    for task, result in results.items():
        metric, value = headline(result)
        row[task] = value
        values.append(value)
    row["mean"] = sum(values) / len(values) if values else None
    return row


def _ticker(progress: ProgressFn | None, steps: int) -> Callable[[str], ProgressFn | None]:
    """`tick(label)` hands out the next of `steps` equal shares of `progress`, labelled."""
    done = 0

    def tick(label: str) -> ProgressFn | None:
        nonlocal done
        part = scaled(progress, done / steps, (done + 1) / steps, f"{label}: ")
        done += 1
        return part

    return tick


def compare(models: list[str], methods: list[str | tuple[str, dict]], *, base: str | None = None,
            multitask: str | None = None, ensemble: str = "logits", limit: int | None = None, split: str = "dev",
            stats_data: str = "task", space: str = "weights", progress: ProgressFn | None = None
            ) -> Iterator[dict[str, Any]]:
    """Rows of the comparison table, yielded as they are computed: each individual model (on its own
    task), the ensemble, the multi-task model (when given), then one row per merge method.

    `stats_data`: where data-aware methods take each model's statistics: its task's train split
    ("task", as `merge`), or its own training partition ("own", `own_data_statistics`). `space`: how
    (IA)³ modules are merged (`MergeSpec.space`)."""
    if len(models) < 2:
        raise MergeLabError("compare needs at least two models", param="models")
    _check_stats_data(stats_data)
    merges = specs_from_texts(methods, models, base=base, heads="auto", space=space)
    inputs = Inputs.open(models)
    scorer = Scorer(inputs, limit, split)
    tasks = list(dict.fromkeys(inputs.tasks))
    steps = len(models) + 1 + bool(multitask) + len(merges)
    tick = _ticker(progress, steps)

    for spec, task in zip(models, inputs.tasks):
        tick(spec)
        yield _row(spec, "individual", {task: scorer.score(task, load(spec, get_task(task)).model)})
    tick("ensemble")
    yield _row(f"ensemble ({ensemble})", "ensemble", {t: scorer.ensemble(t, ensemble) for t in tasks})
    if multitask:
        tick(multitask)
        yield _row(multitask, "multi-task", {t: scorer.score(t, load(multitask, get_task(t)).model)
                                             for t in _reference_tasks(multitask, tasks)})
    for label, spec in merges:
        result = merge(_with_stats(spec, stats_data), progress=tick(spec.method))
        yield _row(label, "merge", {t: scorer.merged(result, t) for t in tasks})


def own_data_statistics(model: str, kinds: tuple[str, ...], params: dict[str, Any] | None = None) -> Path:
    """A statistics file (`merge(stats_files=...)`) of `model` computed on its own training data: the
    partition of its task's train split it was trained on (`partition` in its `mergelab.json`).

    RegMean's Grams and Fisher's diagonal are each model's statistics on its own training set (Jin et al.
    2023, Sec. 3): for models of one task trained on non-i.i.d. partitions, statistics drawn from the
    whole train split (what `merge` computes from a task name) would describe the same data for every
    model. The estimators and settings are those of `merging_core.stats` (the same seeded draw of
    `examples` examples, here from the partition); the file holds every kind in `kinds`, is cached
    under `$MERGELAB_HOME/cache/stats` and is keyed by content and partition like the others."""
    ref = resolve(model)
    task = open_checkpoint(ref).task
    if task is None:
        raise MergeLabError(f"model {model!r} records no task, so its own training data is unknown; use "
                            "statistics on a task's train split instead", param="stats_data")
    spec = get_task(task)
    part = partition.of_model(ref.metadata())
    options = {**stats.DEFAULTS, **{k: v for k, v in (params or {}).items() if k in stats.DEFAULTS}}
    record = {**stats.record(ref, spec, kinds[0], options), **stats.settings_of(kinds, options),
              "kinds": list(kinds), "partition": str(part)}
    path = stats.cache_path(record)
    if path.is_file():
        return path
    loaded = load(ref, spec)
    device = next(loaded.model.parameters()).device
    encoded = encode(spec, "train", loaded.tokenizer)
    index = partition.training_indices(part, spec, len(encoded), None if encoded.token_level else encoded.labels)
    index = index[torch.randperm(len(index), generator=torch.Generator().manual_seed(stats.SEED))[:options["examples"]]]
    subset = encoded.subset(index)
    pad = pad_id(loaded.tokenizer)
    examples = [{k: v.to(device) for k, v in subset.batch(torch.tensor([i]), pad).items()} for i in range(len(subset))]
    values: dict[str, dict[str, torch.Tensor]] = {}
    for kind in kinds:
        # merging_core.stats' estimators on these examples (`statistics` draws its own from the whole split)
        computed = stats.estimate(loaded, examples, spec, kind, options, f"{kind} of {ref.name} on its {part} data")
        for name, kv in computed.items():
            values.setdefault(name, {}).update(kv)
    stats.save_stats(values, record, path)
    return path


def _with_stats(spec: MergeSpec, stats_data: str) -> MergeSpec:
    """`spec` reading each model's own-data statistics files (stats_data "own") when its method needs any."""
    kinds = get_method(spec.method).stats_required(dict(spec.params))
    if stats_data == "task" or not kinds or spec.stats_files:
        return spec
    return replace(spec, stats_files=tuple(str(own_data_statistics(m, kinds, dict(spec.params))) for m in spec.models))


def _check_stats_data(stats_data: str) -> None:
    if stats_data not in STATS_DATA:
        raise MergeLabError(f"statistics data must be one of {list(STATS_DATA)}, got {stats_data!r}",
                            param="stats_data")


def _reference_tasks(reference: str, tasks: list[str]) -> list[str]:
    """The tasks of `tasks` a reference model can score: those it has heads for (a multi-task model),
    or its one task (a single-task model, e.g. one trained on the union of the partitions)."""
    ref = resolve(reference)
    have = set(head_tasks(ref) or ref.metadata().get("tasks") or ())  # heads, or a language model's prompted tasks
    if not have:
        ckpt = open_checkpoint(ref)
        have = {ckpt.task} if ckpt.task else set()
    found = [t for t in tasks if t in have]
    if not found:
        raise MergeLabError(f"reference model {reference!r} has no head for the compared tasks "
                            f"({', '.join(tasks)}); give a model trained on them", param="multitask")
    return found


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def compare_subsets(models: list[str], methods: list[str | tuple[str, dict]], *, size: int = 2,
                    base: str | None = None, multitask: str | None = None, ensemble: str = "logits",
                    limit: int | None = None, split: str = "dev", stats_data: str = "task",
                    space: str = "weights", progress: ProgressFn | None = None) -> Iterator[dict[str, Any]]:
    """Merge every subset of `size` models (every pair by default; `size=len(models)`: all together)
    with each method, and average over the subsets (the pairwise tables of Jin et al. 2023).

    For each subset, in order, rows (each with "subset": the models in it) score the subset's tasks:
    the mean of its individual models (for a task, the mean of the members trained on it, each with its
    own head), their ensemble, the reference model `multitask` when given (a multi-task model, or for
    models of one task the model trained on the union of their data), and one row per method. When there
    is more than one subset, summary rows follow, one per row label, with "subset" "mean of K": each
    task's column is the mean over the subsets that have that task, and "mean" the mean over the
    subsets of their rows' means. Individual and reference scores are computed once per model and task.
    `stats_data`, `space`: as in `compare` ("own": each model's statistics on its own training partition).
    """
    if len(models) < 2:
        raise MergeLabError("compare needs at least two models", param="models")
    if len(set(models)) != len(models):
        raise MergeLabError("a model is named twice; subsets of the same model twice are not pairs of models",
                            param="models")
    if not 2 <= size <= len(models):
        raise MergeLabError(f"subset size must be between 2 and the number of models ({len(models)}), got {size}",
                            param="size")
    _check_stats_data(stats_data)
    subsets = [list(s) for s in combinations(models, size)]
    # Every merge of every subset is described (and checked) before any work.
    plans = [specs_from_texts(methods, subset, base=base, heads="auto", space=space) for subset in subsets]
    inputs = Inputs.open(models)
    scorer = Scorer(inputs, limit, split)
    tasks = list(dict.fromkeys(inputs.tasks))
    reference_tasks = _reference_tasks(multitask, tasks) if multitask else []
    task_of = dict(zip(models, inputs.tasks))
    steps = len(models) + bool(multitask) + len(subsets) * (1 + len(methods))
    tick = _ticker(progress, steps)

    own: dict[str, float] = {}  # model -> headline score on its own task
    recorders: dict[str, _Recorder] = {}  # model -> its outputs on its task's batches
    for spec in models:
        tick(spec)
        recorders[spec] = _Recorder(load(spec, get_task(task_of[spec])).model)
        own[spec] = headline(scorer.score(task_of[spec], recorders[spec]))[1]

    def ensemble_of(subset: list[str], task: str) -> float:
        if all(task_of[s] == task for s in subset):  # every member has its own head: replay their outputs
            replay = _Replay([recorders[s].outputs for s in subset], ensemble, recorders[subset[0]])
            return headline(scorer.score(task, replay))[1]
        return headline(scorer.ensemble(task, ensemble, subset))[1]
    reference: dict[str, float] = {}
    if multitask:
        tick(multitask)
        reference = {t: headline(scorer.score(t, load(multitask, get_task(t)).model))[1] for t in reference_tasks}

    summary: dict[str, dict[str, Any]] = {}  # row label -> {"kind", task -> [values], "mean" -> [values]}

    def emit(label: str, kind: str, subset: list[str], values: dict[str, float]) -> dict[str, Any]:
        row: dict[str, Any] = {"model": label, "kind": kind, "subset": subset, **values,
                               "mean": _mean(list(values.values())) if values else None}
        entry = summary.setdefault(label, {"kind": kind, "tasks": {}, "mean": []})
        for task, value in values.items():
            entry["tasks"].setdefault(task, []).append(value)
        if row["mean"] is not None:
            entry["mean"].append(row["mean"])
        return row

    for subset, merges in zip(subsets, plans):
        here = list(dict.fromkeys(task_of[s] for s in subset))
        yield emit("individual models (mean)", "individual", subset,
                   {t: _mean([own[s] for s in subset if task_of[s] == t]) for t in here})
        tick("ensemble")
        yield emit(f"ensemble ({ensemble})", "ensemble", subset, {t: ensemble_of(subset, t) for t in here})
        if multitask:
            yield emit(multitask, "multi-task", subset, {t: reference[t] for t in here if t in reference})
        for label, spec in merges:
            result = merge(_with_stats(spec, stats_data), progress=tick(spec.method))
            yield emit(label, "merge", subset, {t: headline(scorer.merged(result, t))[1] for t in here})
    if len(subsets) > 1:
        for label, entry in summary.items():
            yield {"model": label, "kind": entry["kind"], "subset": f"mean of {len(subsets)}",
                   "subsets": len(subsets), **{t: _mean(v) for t, v in entry["tasks"].items()},
                   "mean": _mean(entry["mean"]) if entry["mean"] else None}


def greedy(models: list[str], method: str, params: dict | None = None, *, base: str | None = None,
           limit: int | None = None, progress: ProgressFn | None = None) -> Iterator[dict[str, Any]]:
    """Greedy incremental merging: rank models by their own-task score, merge the top k for k = 2..N,
    and score each merge on the tasks of the models in it."""
    template = MergeSpec(method, tuple(models), base=base, params=params or {})  # checked before any work
    inputs = Inputs.open(models)
    scorer = Scorer(inputs, limit)
    own = {spec: headline(scorer.score(task, load(spec, get_task(task)).model))[1]
           for spec, task in zip(models, inputs.tasks)}
    order = sorted(models, key=lambda s: -own[s])
    for k in range(2, len(order) + 1):
        chosen = order[:k]
        part = scaled(progress, (k - 2) / (len(order) - 1), (k - 1) / (len(order) - 1), f"top {k}: ")
        result = merge(replace(template, models=tuple(chosen)), progress=part)
        tasks = list(dict.fromkeys(inputs.tasks[models.index(s)] for s in chosen))
        row = _row(f"top {k}", "greedy", {t: scorer.merged(result, t) for t in tasks})
        yield {**row, "added": order[k - 1], "models": chosen}
