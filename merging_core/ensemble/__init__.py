"""Similarity-weighted ensembling of parameter-efficient modules (Lv et al. 2023, "Parameter-Efficient
Weight Ensembling Facilitates Task-Level Knowledge Transfer", ACL 2023).

To transfer to a target task, average modules (LoRA, (IA)³, prefix: Li & Liang 2021, arXiv:2101.00190)
trained on other tasks, weighted by w = softmax(s / T) of their similarity s to the target (Sec. 3.2), and
use the average as the starting point of few-shot tuning on the target (Sec. 3). Targets and sources are
sentence classification, regression and token (CoNLL-2003 NER) tasks: a module brings its encoder-side
tensors whatever head it was trained with, and the target always gets a fresh head of its own; modules of
a causal LM trained on prompts (rank classification) transfer to the target's prompts, with no head at
all (the similarity measures' linear probe has nothing to fit, so it is skipped). `similarity.py` has the measures (the registry
`MEASURES`), `modules.py` the combination (module space, the paper's; or weight space, exact),
`fewshot.py` the tuning protocol. The weights can also be the model weights of any merge method
(`merging_core.merge(..., params={"weights": ...})`): `merge_command` writes that merge for any
temperature, from the similarities a result stores (`EnsembleResult.summary`, `command_at`), so a view
can re-weight without measuring again. Errors about missing modules say what is missing and how to get
it, in words for both the app and the command line.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .. import zoo
from ..errors import MergeLabError
from ..models import load_tokenizer
from ..progress import ProgressFn, scaled
from ..tasks import get_task, scored_as
from .fewshot import draw_shots, evaluator_for, few_shot_score
from .modules import KINDS, SPACES, Module, check_combinable, combine, deltas, layer_groups, read_module, write_module
from .similarity import MEASURES, Measure, Scores, get_measure, measure, register_measure

GRANULARITIES = ("model", "layer", "block")
INITS = ("fresh", "uniform", "weighted")
MATRIX_MODULES = 3  # the leave-one-out matrix needs modules of at least this many
TARGET_KINDS = ("classification", "regression", "token")  # the tasks modules are weighted for (and trained on)


def softmax_weights(scores: dict[str, float], temperature: float) -> dict[str, float]:
    """w = softmax(s / T) over the sources, summing to 1. T = 0: all weight on the most similar source
    (shared on a tie); T = ∞: the uniform average."""
    if math.isnan(temperature) or temperature < 0:
        raise MergeLabError(f"temperature must be at least 0, got {temperature}", param="temperature")
    if not scores:
        raise MergeLabError("no similarity scores to weight; pick at least one source module", param="sources")
    names = list(scores)
    s = torch.tensor([scores[n] for n in names], dtype=torch.float64)
    if math.isinf(temperature):
        w = torch.full_like(s, 1.0 / len(s))
    elif temperature == 0:
        best = s == s.max()
        w = best.double() / best.sum()
    else:
        w = torch.softmax(s / temperature, 0)
    return {n: float(x) for n, x in zip(names, w)}


def layer_weights(result: Scores, name: str, temperature: float, granularity: str,
                  modules: list[Module]) -> dict[str, list[float]]:
    """Weights per adapted layer (canonical name -> one weight per module): one softmax per group of
    layers (the whole model, each transformer layer, or each block), from the measure's per-layer scores
    when it has them (weight cosine, Euclidean), its whole-model score otherwise."""
    if granularity not in GRANULARITIES:
        raise MergeLabError(f"granularity must be one of {list(GRANULARITIES)}, got {granularity!r}",
                            param="granularity")
    layers = list(deltas(modules[0]))
    groups = layer_groups(layers, granularity)
    specs = [m.ref.spec for m in modules]
    per_layer = result.layers.get(name)
    out = {}
    for group in dict.fromkeys(groups.values()):
        members = [layer for layer in layers if groups[layer] == group]
        if per_layer and granularity != "model":
            scores = {s: sum(per_layer[s][layer] for layer in members) / len(members) for s in specs}
        else:
            scores = {s: result.scores[name][s] for s in specs}
        w = softmax_weights(scores, temperature)
        for layer in members:
            out[layer] = [w[s] for s in specs]
    return out


def _recipes_with(kind: str, most: int = 2) -> list[str]:
    """The zoo recipes that train the most modules of `kind` (at most `most` of them), the demo recipe first:
    advice names the quick recipe and the full one, not every experiment that happens to train one."""
    counts = {}
    for path in sorted(zoo.RECIPES.glob("*.yaml")):
        try:
            entries = zoo.load_recipe(path).entries.values()
        except MergeLabError:
            continue
        found = sum(config.peft == kind for config in entries)
        if found:
            counts[path.stem] = found
    return sorted(counts, key=lambda name: (name != "demo", -counts[name], name))[:most]


def build_advice(kind: str) -> str:
    """How to get modules of `kind` into the zoo, for the app (Zoo tab) and the command line alike."""
    recipes = _recipes_with(kind)
    if not recipes:
        return f"train {kind} modules (PEFT training) into the zoo"
    named = " or ".join(f"`{name}`" for name in recipes)
    return f"build the {named} recipe (Zoo tab, or `zoo build --recipe {recipes[0]}`)"


def zoo_modules(kind: str = "lora") -> list[dict]:
    """The zoo's final (not intermediate) adapter modules of `kind`, as `zoo.entries` rows."""
    return [row for row in zoo.entries() if row["kind"] == kind and "/" not in row["name"]]


def default_sources(target: str, kind: str = "lora") -> list[str]:
    """The zoo's modules of `kind` trained on tasks other than the target (leave-one-out)."""
    spec = get_task(target)
    found = [row["name"] for row in zoo_modules(kind) if row["task"] and row["task"] != spec.name
             and get_task(row["task"]).kind in TARGET_KINDS]
    if not found:
        have = len(zoo_modules(kind))
        what = (f"the zoo has 0 {kind} modules" if not have else
                f"none of the zoo's {have} {kind} module{'s' if have > 1 else ''} is of a classification, "
                f"regression or token task other than {spec.title}")
        raise MergeLabError(f"{what}; transfer to {spec.title} needs at least one {kind} module of another task: "
                            f"{build_advice(kind)}, or pick source modules", param="sources")
    return found


def default_target(candidates: Sequence[str], kind: str = "lora") -> str | None:
    """The first of `candidates` (task names) for which the zoo has `kind` modules of other tasks, preferring
    a task the zoo has a module of too (its transfer compares with that module's own training)."""
    tasks = {row["task"] for row in zoo_modules(kind) if row["task"]}
    usable = [t for t in candidates if tasks - {get_task(t).name}]
    return next((t for t in usable if get_task(t).name in tasks), usable[0] if usable else None)


def matrix_modules(kind: str = "lora") -> list[str]:
    """The zoo's modules of `kind` for the leave-one-out matrix (at least `MATRIX_MODULES` of them)."""
    found = [row["name"] for row in zoo_modules(kind)]
    if len(found) < MATRIX_MODULES:
        raise MergeLabError(f"the zoo has {len(found)} {kind} module{'s' if len(found) != 1 else ''}; the matrix "
                            f"needs at least {MATRIX_MODULES}: {build_advice(kind)}", param="kind")
    return found


def merge_command(sources: Sequence[str], weights: dict[str, float]) -> str:
    """The registry merge (average, these model weights) of the (folded) source modules, as a command."""
    shown = ",".join(f"{weights[s]:.4f}" for s in sources)
    return (f"python -m merging_core merge --method average --models {' '.join(sources)} "
            f"--set weights={shown} --out OUT")


def command_at(summary: dict, temperature: float) -> str:
    """`merge_command` for the first seed's similarities in an `EnsembleResult.summary()`, re-weighted at
    `temperature` (nothing measured again)."""
    return merge_command(summary["sources"], softmax_weights(summary["similarities"][0], temperature))


@dataclass
class EnsembleResult:
    """Similarities, weights and few-shot scores of one target (per seed)."""

    target: str
    sources: list[str]
    similarity: str
    temperature: float
    granularity: str
    shots: int
    scores: list[Scores] = field(default_factory=list)  # per seed
    weights: list[dict[str, float]] = field(default_factory=list)  # per seed, whole-model view
    rows: list[dict] = field(default_factory=list)  # few-shot: init, seed, metric, score, loss

    def table(self) -> list[dict]:
        """Per initialisation: mean and spread of the target's dev score over seeds."""
        out = []
        for init in dict.fromkeys(r["init"] for r in self.rows):
            values = [r["score"] for r in self.rows if r["init"] == init]
            out.append({"init": init, "seeds": len(values), "metric": self.rows[0]["metric"],
                        "mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0})
        return out

    def merge_command(self, temperature: float | None = None) -> str:
        """The first seed's weights (at `temperature`; default: the measured one) as the model weights of a
        registry merge of the (folded) modules."""
        if temperature is None:
            return merge_command(self.sources, self.weights[0])
        return merge_command(self.sources, softmax_weights(self.scores[0].scores[self.similarity], temperature))

    def summary(self) -> dict:
        return {"target": self.target, "sources": self.sources, "similarity": self.similarity,
                "temperature": self.temperature, "granularity": self.granularity, "shots": self.shots,
                "similarities": [s.scores[self.similarity] for s in self.scores], "weights": self.weights,
                "few_shot": self.table(), "rows": self.rows, "merge_command": self.merge_command()}


def ensemble(target: str, sources: Sequence[str] | None = None, *, similarity: str = "loss",
             temperature: float | None = None, shots: int = 32, seeds: Sequence[int] = (0,), granularity: str = "model",
             steps: int = 50, lr: float = 5e-4, limit: int | None = None, inits: Sequence[str] = INITS,
             kind: str = "lora", progress: ProgressFn | None = None) -> EnsembleResult:
    """Weight `sources` (default: the zoo's `kind` modules of other tasks) by their `similarity` to
    `target`, and compare few-shot tuning on `shots` target examples from the weighted average with a
    fresh module and the uniform average (`inits`), for each seed; scores on the target's dev split."""
    chosen = get_measure(similarity)
    unknown = [i for i in inits if i not in INITS]
    if unknown:
        raise MergeLabError(f"unknown initialisation {unknown[0]!r}; choose from {list(INITS)}", param="inits")
    spec = get_task(target)
    temperature = chosen.default_temperature if temperature is None else float(temperature)
    modules = [read_module(s) for s in (sources or default_sources(spec.name, kind))]
    check_combinable(modules)
    # modules of a language model trained on prompts transfer to the target's prompts (rank classification)
    spec = scored_as(spec, modules[0].ref.metadata().get("head"))
    mine = [m.ref.spec for m in modules if m.task == spec.name]
    if mine:
        raise MergeLabError(f"source {mine[0]!r} was trained on the target task {spec.name}; leave it out",
                            param="sources")
    tokenizer = load_tokenizer(modules[0].ref)
    evaluator = evaluator_for(spec, modules[0].ref, limit)
    result = EnsembleResult(spec.name, [m.ref.spec for m in modules], similarity, temperature, granularity, shots)
    for n, seed in enumerate(seeds):
        part = scaled(progress, n / len(seeds), (n + 1) / len(seeds), f"seed {seed}: ")
        drawn = draw_shots(spec, tokenizer, shots, seed)
        scores = measure(modules, drawn, measures=(similarity,), steps=steps, lr=lr,
                         progress=scaled(part, 0.0, 0.4, "similarity: "))
        result.scores.append(scores)
        result.weights.append(softmax_weights(scores.scores[similarity], temperature))
        starts = {"fresh": None, "uniform": combine(modules, [1.0] * len(modules)),
                  "weighted": combine(modules, layer_weights(scores, similarity, temperature, granularity, modules))}
        for i, init in enumerate(inits):
            if part:
                part(0.4 + 0.6 * i / len(inits), f"few-shot from the {init} module")
            started = time.perf_counter()
            found = few_shot_score(modules[0], drawn, starts[init], steps=steps, lr=lr, evaluator=evaluator, seed=seed)
            result.rows.append({"init": init, "seed": seed, "metric": spec.main_metric, "score": found[spec.main_metric],
                                "loss": found["loss"], "seconds": round(time.perf_counter() - started, 2)})
    if progress:
        progress(1.0, "done")
    return result


def similarity_matrix(modules: Sequence[str], measure_name: str, *, shots: int = 32, seed: int = 0, steps: int = 50,
                      progress: ProgressFn | None = None) -> dict:
    """Leave-one-out over the modules' tasks: for each task as the target, the similarity of every other
    task's module to it. {"tasks", "modules", "scores": {target: {module: score}}}."""
    get_measure(measure_name)
    loaded = [read_module(s) for s in modules]
    check_combinable(loaded)
    tokenizer = load_tokenizer(loaded[0].ref)
    tasks = list(dict.fromkeys(m.task for m in loaded))
    out: dict[str, dict[str, float]] = {}
    for i, task in enumerate(tasks):
        others = [m for m in loaded if m.task != task]
        drawn = draw_shots(get_task(task), tokenizer, shots, seed)
        found = measure(others, drawn, measures=(measure_name,), steps=steps,
                        progress=scaled(progress, i / len(tasks), (i + 1) / len(tasks), f"{task}: "))
        out[task] = found.scores[measure_name]
    return {"tasks": tasks, "modules": [m.ref.spec for m in loaded], "measure": measure_name, "scores": out}


__all__ = ["GRANULARITIES", "INITS", "KINDS", "MEASURES", "SPACES", "EnsembleResult", "Measure", "Module",
           "build_advice", "check_combinable", "combine", "command_at", "default_sources", "default_target", "deltas", "ensemble", "get_measure",
           "layer_weights", "matrix_modules", "merge_command", "read_module", "register_measure", "similarity_matrix",
           "softmax_weights", "write_module", "zoo_modules"]
