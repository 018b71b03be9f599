"""`SweepSpec`: one sweep or search, fully described, checked on construction, and serializable.

What is merged (a method, its models and base, the settings held fixed), what varies (`space`), what is
maximised (the objective: a task's dev metric, or a weighted mean over tasks, on the first `dev_size`
examples of each dev split; a loss counts negated), how the space is searched (`ALGORITHMS`), and on
which examples the best point is reported afterwards (`holdout_size` examples after the dev subset,
disjoint from it). `sweep.json` in the sweep's folder holds it, so a killed sweep resumes from there.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Mapping

from .. import settings
from ..arch import GROUPS
from ..errors import MergeLabError
from ..methods import get_method
from ..spec import FALLBACKS, HEAD_POLICIES, MergeSpec, from_plain, plain
from ..tasks import get_task
from .space import LAYER, Dimension, components_of, grid_size, parse_dimension

ALGORITHMS = {
    "grid": "every point of the space (each dimension given as points or values)",
    "random": "points drawn at random from the ranges (Ray Tune's basic variant generator)",
    "tpe": "Optuna's tree-structured Parzen estimator, through Ray Tune's Optuna integration",
    "cmaes": "Optuna's CMA-ES, for continuous ranges and per-layer weights",
}
OBJECTIVE = "objective"  # the metric Ray Tune maximises


@dataclass(frozen=True)
class SweepSpec:
    """What to merge, what varies, what to maximise, and how to search."""

    method: str
    models: tuple[str, ...]
    base: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)  # settings held fixed (text or values)
    space: tuple[str, ...] = ()  # the dimensions, in `space.parse_dimension`'s grammar
    per_layer: bool = False  # one λ per transformer block (`lambda@i`), searched continuously
    tasks: tuple[str, ...] | None = None  # the objective's tasks (default: every model's task)
    task_weights: tuple[float, ...] | None = None  # their weights in the objective (default: equal)
    dev_size: int = 200  # the first examples of each dev split the objective is measured on
    holdout_size: int = 0  # the examples after them, on which the best point is reported
    algorithm: str = "grid"
    trials: int | None = None  # how many points (grid: all of them)
    seed: int = 0  # of the search algorithm (the merges keep their own seeds)
    components: tuple[str, ...] = GROUPS
    fallback: str = "average"
    heads: str = "auto"
    cpus_per_trial: int = 1
    workers: int | None = None  # trials at once (default: the cluster's CPUs / cpus_per_trial)

    def __post_init__(self) -> None:
        setter = object.__setattr__.__get__(self)
        method = get_method(self.method)
        if isinstance(self.models, str):
            raise MergeLabError("models must be a list of model names, not one string", param="models")
        setter("models", tuple(str(m).strip() for m in self.models))
        setter("space", tuple(str(s).strip() for s in ([self.space] if isinstance(self.space, str) else self.space)
                              if str(s).strip()))
        # the merge with every setting at its fixed value or default: checks models, base and fixed params
        fixed = self.template().params
        setter("params", {k: fixed[k] for k in dict(self.params)})
        dims = self.dimensions()
        names = [d.name for d in dims]
        repeated = [n for i, n in enumerate(names) if n in names[:i]]
        if repeated:
            raise MergeLabError(f"{repeated[0]} is varied twice; give each setting once", param="space")
        both = [n for n in names if n in self.params]
        if both:
            raise MergeLabError(f"{both[0]} is both fixed and varied; give it once", param="space")
        if not dims and not self.per_layer:
            raise MergeLabError("nothing varies; give at least one setting to vary (e.g. lambda=0:1:5), or λ per layer",
                                param="space")
        if self.per_layer and "lambda" not in {p.name for p in method.params}:
            raise MergeLabError(f"method {self.method!r} has no lambda to set per layer; use task_arithmetic, ties "
                                "or dare", param="per_layer")
        if self.algorithm not in ALGORITHMS:
            raise MergeLabError(f"unknown search algorithm {self.algorithm!r}; choose one of: {', '.join(ALGORITHMS)}",
                                param="algorithm")
        if self.algorithm == "grid":
            if self.per_layer:
                raise MergeLabError("a per-layer search has one continuous λ per block; search it with cmaes, tpe "
                                    "or random", param="algorithm")
            ranges = [d.name for d in dims if not d.values]
            if ranges:
                raise MergeLabError(f"a grid needs points, but {ranges[0]} is a range; write e.g. "
                                    f"{ranges[0]}=low:high:5, or search it at random", param="space")
            if self.trials is not None and self.trials != grid_size(dims):
                raise MergeLabError(f"the grid has {grid_size(dims)} points, not {self.trials}; leave trials out",
                                    param="trials")
        elif self.algorithm == "cmaes":
            choices = [d.name for d in dims if d.values]
            if choices:
                raise MergeLabError(f"CMA-ES searches continuous ranges, but {choices[0]} is a list of values; give a "
                                    "range (low:high) or search with tpe", param="space")
        trials = self.trial_count()
        if trials < 1:
            raise MergeLabError(f"trials must be at least 1, got {trials}", param="trials")
        for name in ("dev_size", "cpus_per_trial"):
            if int(getattr(self, name)) < 1:
                raise MergeLabError(f"{name} must be at least 1, got {getattr(self, name)}", param=name)
        if int(self.holdout_size) < 0:
            raise MergeLabError(f"holdout_size must be 0 or more, got {self.holdout_size}", param="holdout_size")
        if self.workers is not None and int(self.workers) < 1:
            raise MergeLabError(f"workers must be at least 1, got {self.workers}", param="workers")
        if self.fallback not in FALLBACKS or self.heads not in HEAD_POLICIES:
            raise MergeLabError(f"fallback must be one of {list(FALLBACKS)} and heads one of {list(HEAD_POLICIES)}",
                                param="fallback" if self.fallback not in FALLBACKS else "heads")
        if self.tasks is not None:
            setter("tasks", tuple(get_task(t).name for t in self.tasks))
        if self.task_weights is not None:
            weights = tuple(float(w) for w in self.task_weights)
            count = len(self.tasks) if self.tasks else None
            if count is not None and len(weights) != count:
                raise MergeLabError(f"{len(weights)} task weights for {count} tasks; give one per task",
                                    param="task_weights")
            if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
                raise MergeLabError("task weights must be finite, not negative, and not all zero", param="task_weights")
            setter("task_weights", weights)
        bounds = settings.limits()
        if bounds is not None:  # a public app: every request bounded
            if trials > bounds.trials:
                raise MergeLabError(f"{trials} trials is more than this app allows ({bounds.trials}); use fewer points",
                                    param="space" if self.algorithm == "grid" else "trials")  # a grid's count
            if self.dev_size + self.holdout_size > bounds.examples:
                raise MergeLabError(f"{self.dev_size + self.holdout_size} dev and held-out examples per task is more "
                                    f"than this app allows ({bounds.examples})", param="dev_size")
            if self.workers is not None and self.workers > 2:
                raise MergeLabError(f"{self.workers} workers is more than this app allows (2)", param="workers")

    # -- the merges it makes ---------------------------------------------------------------------------

    def template(self, **changes: Any) -> MergeSpec:
        """The merge of one point: the fixed settings, then `changes` (MergeSpec fields)."""
        fields_ = {"base": self.base, "params": dict(self.params), "components": self.components,
                   "fallback": self.fallback, "heads": self.heads, **changes}
        models = fields_.pop("models", self.models)
        return MergeSpec(self.method, tuple(models), **fields_)

    def merge_spec(self, point: Mapping[str, Any]) -> MergeSpec:
        """The merge at `point` (a Tune config: dimension name -> value)."""
        params = dict(self.params)
        layers: dict[int, float] = {}
        changes: dict[str, Any] = {}
        for name, value in point.items():
            if LAYER in name:
                layers[int(name.split(LAYER)[1])] = float(value)
            elif name == "components":
                changes["components"] = components_of(value)
            elif name == "models":
                changes["models"] = tuple(value.split("+"))
            else:
                params[name] = value
        if layers:
            changes["layer_lambdas"] = tuple(layers[i] for i in sorted(layers))
        return self.template(params=params, **changes)

    def dimensions(self) -> list[Dimension]:
        """The varied settings (per-layer λs are added once the number of blocks is known)."""
        method = get_method(self.method)
        return [parse_dimension(text, method, self.models) for text in self.space]

    def trial_count(self) -> int:
        return grid_size(self.dimensions()) if self.algorithm == "grid" else int(self.trials or 20)

    # -- the objective ---------------------------------------------------------------------------------

    def objective(self, scores: Mapping[str, float]) -> float:
        """The weighted mean of the tasks' headline metrics (a loss or perplexity counts negated)."""
        tasks = list(scores)
        weights = self.task_weights or (1.0,) * len(tasks)
        signed = [(-1.0 if get_task(t).lower_is_better else 1.0) * scores[t] for t in tasks]
        return sum(w * s for w, s in zip(weights, signed)) / sum(weights)

    # -- serialization ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return plain(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepSpec:
        return from_plain(cls, data)

    def key(self) -> str:
        """A name for the sweep, from its content: running the same command again resumes it."""
        what = {k: v for k, v in self.to_dict().items() if k not in ("workers", "cpus_per_trial")}
        digest = hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:10]
        return f"{self.method}-{digest}"
