"""A sweep's search space: which settings vary and over what, checked against the method's spec.

One grammar for the CLI's `--vary`, the Python API and the Sweep tab, one dimension per item:

    density                 the parameter's whole range, as its spec bounds it (choices: all of them)
    density=0.1:0.9         a range
    density=0.1:0.9:5       five evenly spaced points of that range (a grid needs points)
    lambda=0.5,1,1.5        these values
    scope=model,tensor      these choices
    components=attention+feed_forward,all   which parameter groups the method merges
    models=a+b,a+b+c        which of the sweep's models are merged

A per-layer search gives each transformer block its own λ (`per_layer_dimensions`): the dimensions
`lambda@0`, `lambda@1`, ... over the range given for `lambda`, merged as `MergeSpec.layer_lambdas`.
Every value is checked by the method's own `Param` here, before any work starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any
from collections.abc import Sequence

from ..arch import GROUPS
from ..errors import MergeLabError
from ..methods import Method
from ..params import Param

ALL = "all"  # the components choice meaning every group
LAYER = "@"  # `lambda@3`: block 3's λ


@dataclass(frozen=True)
class Dimension:
    """One setting that varies: a range [low, high] (float or int) or discrete values."""

    name: str
    kind: str  # "float" | "int" | "choice"
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] = ()  # points, listed values or choices; empty for a continuous range

    @property
    def points(self) -> int | None:
        return len(self.values) or None

    def domain(self, algorithm: str):
        """The Ray Tune search domain of this dimension under `algorithm`."""
        from ray import tune

        if algorithm == "grid":
            return tune.grid_search(list(self.values))
        if self.values:
            return tune.choice(list(self.values))
        if self.kind == "int":
            return tune.randint(int(self.low), int(self.high) + 1)
        return tune.uniform(float(self.low), float(self.high))

    def describe(self) -> str:
        if self.values:
            return f"{self.name} in {{{', '.join(str(v) for v in self.values)}}}"
        return f"{self.name} in [{self.low:g}, {self.high:g}]"


def parse_dimension(text: str, method: Method, models: Sequence[str]) -> Dimension:
    """One `--vary` item, checked against `method`'s parameters and the sweep's `models`."""
    name, _, rest = str(text).partition("=")
    name, rest = name.strip(), rest.strip()
    where = f"{str(text)[:80]!r}"
    if not name:
        raise MergeLabError(f"{where} names no setting; write e.g. density=0.1:0.9:5", param="space")
    if name == "components":
        return Dimension(name, "choice", values=_choices(rest or ALL, where, _components))
    if name == "models":
        if not rest:
            raise MergeLabError(f"{where}: list the subsets to merge, e.g. models=a+b,a+b+c", param="space")
        return Dimension(name, "choice", values=_choices(rest, where, lambda item: _subset(item, method, models)))
    param = {p.name: p for p in method.params}.get(name)
    if param is None:
        known = ", ".join([p.name for p in method.params if p.kind != "floats"] + ["components", "models"])
        raise MergeLabError(f"method {method.name!r} has no parameter {name[:40]!r} to vary; it has: {known}",
                            param="space")
    owner = f"method {method.name!r}"
    if param.kind == "floats":
        raise MergeLabError(f"{where}: {name} holds one value per model and cannot be a dimension; vary models= "
                            "instead", param="space")
    if param.kind in ("choice", "bool"):
        every = param.choices if param.kind == "choice" else (True, False)
        values = tuple(_parse(param, v, owner) for v in rest.split(",")) if rest else tuple(every)
        return Dimension(name, "choice", values=_distinct(values, where))
    if "," in rest:
        return Dimension(name, param.kind, values=_distinct(tuple(_parse(param, v, owner) for v in rest.split(",")),
                                                            where))
    if not rest:
        if param.low is None or param.high is None:
            raise MergeLabError(f"{where}: {name} has no bounded range; give one, e.g. {name}=0:1", param="space")
        return _range(param, param.low, param.high, None, where)
    parts = rest.split(":")
    if len(parts) not in (2, 3):
        if len(parts) == 1:  # one value: fixed, not varied
            raise MergeLabError(f"{where} gives one value; give a range ({name}=low:high) or values ({name}=a,b), "
                                f"or fix it ({name}={rest[:20]}) as a setting", param="space")
        raise MergeLabError(f"{where} is not low:high or low:high:points", param="space")
    low, high = (_parse(param, v, owner) for v in parts[:2])
    count = None
    if len(parts) == 3:
        try:
            count = int(parts[2])
        except ValueError:
            raise MergeLabError(f"{where}: the number of points {parts[2]!r} is not a whole number", param="space") from None
        if count < 2:
            raise MergeLabError(f"{where}: a range needs at least 2 points, got {count}", param="space")
    return _range(param, low, high, count, where)


def _parse(param: Param, text: str, owner: str):
    """One value of a dimension, checked by the parameter itself; a bad one is the space's error."""
    try:
        return param.parse(text, owner)
    except MergeLabError as exc:
        raise MergeLabError(exc.message, param="space") from None


def _range(param: Param, low: float, high: float, count: int | None, where: str) -> Dimension:
    if not low < high:
        raise MergeLabError(f"{where}: the range [{low:g}, {high:g}] is empty or inverted; give low < high",
                            param="space")
    if count is None:
        return Dimension(param.name, param.kind, low, high)
    step = (high - low) / (count - 1)
    points = [low + i * step for i in range(count)]
    if param.kind == "int":
        points = sorted({round(p) for p in points})
    else:  # 0.2 + 2 * 0.2 is 0.6000000000000001: keep the points a reader typed in mind
        points = [float(f"{p:.12g}") for p in points]
    return Dimension(param.name, param.kind, low, high, tuple(points))


def _choices(text: str, where: str, parse) -> tuple[str, ...]:
    return _distinct(tuple(parse(item.strip()) for item in text.split(",") if item.strip()), where)


def _distinct(values: tuple, where: str) -> tuple:
    if not values:
        raise MergeLabError(f"{where} lists no values", param="space")
    repeated = [v for i, v in enumerate(values) if v in values[:i]]
    if repeated:
        raise MergeLabError(f"{where} lists {repeated[0]!r} twice; give each value once", param="space")
    return values


def _components(item: str) -> str:
    if item == ALL:
        return item
    groups = [g.strip() for g in item.split("+") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups:
        raise MergeLabError(f"unknown component {(unknown or [item])[0]!r} in components=; join groups with + "
                            f"({', '.join(GROUPS)}) or write {ALL}", param="space")
    return "+".join(groups)


def _subset(item: str, method: Method, models: Sequence[str]) -> str:
    members = [m.strip() for m in item.split("+") if m.strip()]
    unknown = [m for m in members if m not in models]
    if unknown:
        raise MergeLabError(f"models= names {unknown[0]!r}, which is not one of the sweep's models "
                            f"({', '.join(models)})", param="space")
    if len(members) < method.min_models or len(set(members)) != len(members):
        raise MergeLabError(f"models={item!r}: method {method.name!r} needs at least {method.min_models} distinct "
                            "models", param="space")
    return "+".join(members)


def components_of(value: str) -> tuple[str, ...]:
    """The groups a `components` choice names."""
    return GROUPS if value == ALL else tuple(value.split("+"))


def per_layer_dimensions(dimensions: Sequence[Dimension], method: Method, blocks: int) -> list[Dimension]:
    """`dimensions` with `lambda` replaced by one λ per block (`lambda@0`, ...), over the same range (the
    spec's whole range when `lambda` was not given). Per-layer weights are searched continuously."""
    param = {p.name: p for p in method.params}.get("lambda")
    if param is None:
        raise MergeLabError(f"method {method.name!r} has no lambda to set per layer; use task_arithmetic, ties or "
                            "dare", param="per_layer")
    given = next((d for d in dimensions if d.name == "lambda"), None)
    low, high = (given.low, given.high) if given is not None and given.low is not None else (param.low, param.high)
    if given is not None and given.low is None:  # listed values: their span
        low, high = min(given.values), max(given.values)
    rest = [d for d in dimensions if d.name != "lambda"]
    return rest + [Dimension(f"lambda{LAYER}{i}", "float", low, high) for i in range(blocks)]


def grid_size(dimensions: Sequence[Dimension]) -> int:
    return math.prod(len(d.values) for d in dimensions)
