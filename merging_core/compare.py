"""Score merges next to what they should beat: the individual models, an output ensemble, a
multi-task model; and greedy incremental merging (Jin et al. 2023, Sec. 5.3).

Every task is scored with its own head: a merged encoder is evaluated on task t with the head of the
model that was trained on t (or the merged head, when the models share a label set). The ensemble for
task t runs every input's encoder under task t's head and averages the outputs (logits, or
probabilities); for models of one task this is the usual output ensemble. Evaluators are built once per
task and shared by every row, so a table of K merges costs K forward passes per task, not K
tokenizations.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from .arch import canonical
from .checkpoint import load_canonical, open_checkpoint
from .errors import MergeLabError
from .evaluation import Evaluator, headline
from .merge import MergeResult, merge
from .models import Loaded, head_tasks, load, resolve
from .progress import ProgressFn, scaled
from .spec import MergeSpec, specs_from_texts
from .tasks import get_task


class Ensemble(torch.nn.Module):
    """Average the outputs of several models that share a head type (logits, or probabilities)."""

    def __init__(self, members: list[torch.nn.Module], mode: str = "logits"):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.mode = mode
        self.config = members[0].config

    def forward(self, **inputs: torch.Tensor) -> SimpleNamespace:
        outputs = torch.stack([m(**inputs).logits.float() for m in self.members])
        if self.mode == "probabilities" and outputs.shape[-1] > 1:
            return SimpleNamespace(logits=F.softmax(outputs, -1).mean(0).clamp_min(1e-12).log())
        return SimpleNamespace(logits=outputs.mean(0))


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
    """One evaluator per task, shared by every row of a table."""

    def __init__(self, inputs: Inputs, limit: int | None, split: str = "dev"):
        self.inputs = inputs
        self.evaluators = {t: Evaluator(t, inputs.templates[t].tokenizer, split, limit)
                           for t in dict.fromkeys(inputs.tasks)}

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

    def ensemble(self, task: str, mode: str) -> dict:
        template = self.inputs.templates[task].model
        members = []
        for spec in self.inputs.specs:
            if spec == self.inputs.owner(task) or self.inputs.tasks[self.inputs.specs.index(spec)] == task:
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


def compare(models: list[str], methods: list[str | tuple[str, dict]], *, base: str | None = None,
            multitask: str | None = None, ensemble: str = "logits", limit: int | None = None, split: str = "dev",
            progress: ProgressFn | None = None) -> Iterator[dict[str, Any]]:
    """Rows of the comparison table, yielded as they are computed: each individual model (on its own
    task), the ensemble, the multi-task model (when given), then one row per merge method."""
    if len(models) < 2:
        raise MergeLabError("compare needs at least two models", param="models")
    merges = specs_from_texts(methods, models, base=base, heads="auto")
    inputs = Inputs.open(models)
    scorer = Scorer(inputs, limit, split)
    tasks = list(dict.fromkeys(inputs.tasks))
    steps = len(models) + 1 + bool(multitask) + len(merges)
    step = 0

    def tick(label: str) -> ProgressFn | None:
        nonlocal step
        part = scaled(progress, step / steps, (step + 1) / steps, f"{label}: ")
        step += 1
        return part

    for spec, task in zip(models, inputs.tasks):
        tick(spec)
        yield _row(spec, "individual", {task: scorer.score(task, load(spec, get_task(task)).model)})
    tick("ensemble")
    yield _row(f"ensemble ({ensemble})", "ensemble", {t: scorer.ensemble(t, ensemble) for t in tasks})
    if multitask:
        tick(multitask)
        have = set(head_tasks(resolve(multitask))) or {None}
        yield _row(multitask, "multi-task", {t: scorer.score(t, load(multitask, get_task(t)).model)
                                             for t in tasks if t in have})
    for label, spec in merges:
        result = merge(spec, progress=tick(spec.method))
        yield _row(label, "merge", {t: scorer.merged(result, t) for t in tasks})


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
