"""`MergeSpec`: one merge, fully described, checked on construction, and serializable.

Every way into a merge builds one: the Python API (`merge(MergeSpec(...))` or `merge("ties", [...],
...)`), the CLI, the Merge tab, `compare`, `greedy`, and curves placing merges on a path. The spec is
what `merge_config.json` records (with the run's report beside it), so `merge_from_config` re-runs
exactly the same merge, from shared statistics files too.

Method parameters are checked against the method's typed spec in the registry (`merging_core.methods`)
and stored with every default filled in; method parameters given as text have one grammar everywhere
(`merging_core.params.parse_assignments`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable, Mapping

from .arch import GROUPS
from .errors import MergeLabError
from .methods import METHODS, get_method
from .params import parse_assignments
from .tensorio import OUTPUT_DTYPES, parse_size

FALLBACKS = ("average", "first")  # what the components outside `components` get
HEAD_POLICIES = ("auto", "merge", "separate")
MERGE_SPACES = ("weights", "module")  # adapters folded into their base, or (IA)³ vectors merged themselves


class FrozenParams(dict):
    """A method's parameters inside a frozen spec: a read-only dict (still JSON- and pickle-friendly)."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("a MergeSpec's params are read-only; build a new spec with dataclasses.replace")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _refuse  # type: ignore[assignment]

    def __reduce__(self):
        return FrozenParams, (dict(self),)


@dataclass(frozen=True)
class MergeSpec:
    """What to merge, how, and from which statistics. Invalid specs cannot be built."""

    method: str  # a registered method (`merging_core.methods.METHODS`)
    models: tuple[str, ...]  # zoo names, folders, 'minilm', hub ids
    base: str | None = None  # the model the inputs were fine-tuned from (task vectors)
    params: Mapping[str, Any] = field(default_factory=dict)  # the method's parameters (defaults filled in)
    components: tuple[str, ...] = GROUPS  # parameter groups the method merges; the rest follow `fallback`
    fallback: str = "average"  # "average" or "first" (keep model A)
    heads: str = "auto"  # "merge" heads of one label set, keep one per task ("separate"), or decide ("auto")
    #                      ("none" is what a merge of models without heads records)
    stats_tasks: tuple[str, ...] | None = None  # data of each model's statistics (one, or one per model)
    stats_files: tuple[str, ...] | None = None  # precomputed statistics files instead (one per model)
    seed: int = 0  # seeds everything random in the merge (a method's own `seed` parameter wins)
    allow_pickle: bool = False  # accept pytorch_model.bin (loaded weights_only)
    device: str | None = None  # where the math runs (default: the GPU when present)
    space: str = "weights"  # "module": merge (IA)³ modules' scaling vectors, then fold them (`module_space`)
    dtype: str | None = None  # the floats of the output: "fp32", "bf16" or "fp16" (default: the inputs')
    shard_size: int | None = None  # bytes per output file; a larger model is sharded (default 5 GB)
    # λ of each transformer block, in stack order (an encoder-decoder's encoder blocks first): the method's
    # `lambda` for that block's parameters; everything outside the blocks keeps `params["lambda"]`. What a
    # per-layer search (`merging_core.sweep`) finds, as a merge that re-runs.
    layer_lambdas: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        method = get_method(self.method)
        setter = object.__setattr__.__get__(self)
        if isinstance(self.models, str):
            raise MergeLabError("models must be a list of model names, not one string", param="models")
        models = tuple(str(m).strip() for m in self.models)
        if any(not m for m in models):
            raise MergeLabError("a model name is empty", param="models")
        if len(models) < method.min_models or (method.max_models and len(models) > method.max_models):
            need = (f"exactly {method.min_models}" if method.min_models == method.max_models
                    else f"at least {method.min_models}")
            raise MergeLabError(f"method {self.method!r} needs {need} models, got {len(models)}", param="models")
        setter("models", models)
        setter("base", (str(self.base).strip() or None) if self.base is not None else None)
        params = method.parse(dict(self.params or {}))
        setter("params", FrozenParams(params))
        if "seed" in params:
            setter("seed", params["seed"])
        components = tuple(self.components) if self.components else GROUPS
        unknown = [c for c in components if c not in GROUPS]
        if unknown:
            raise MergeLabError(f"unknown component {unknown[0]!r}; choose from: {', '.join(GROUPS)}",
                                param="components")
        setter("components", components)
        if self.fallback not in FALLBACKS:
            raise MergeLabError(f"fallback must be one of {list(FALLBACKS)}, got {self.fallback!r}", param="fallback")
        if self.heads not in HEAD_POLICIES + ("none",):  # "none": what a run of head-less models records
            raise MergeLabError(f"heads must be one of {list(HEAD_POLICIES)}, got {self.heads!r}", param="heads")
        for name in ("stats_tasks", "stats_files"):
            value = getattr(self, name)
            setter(name, tuple(str(v) for v in value) if value else None)
        if self.stats_tasks and len(self.stats_tasks) not in (1, len(models)):
            raise MergeLabError(f"{len(self.stats_tasks)} statistics tasks for {len(models)} models; give one, or "
                                "one per model", param="stats_tasks")
        if self.stats_files and len(self.stats_files) != len(models):
            raise MergeLabError(f"{len(self.stats_files)} statistics files for {len(models)} models; give one per "
                                "model", param="stats_files")
        setter("seed", int(self.seed))
        if self.space not in MERGE_SPACES:
            raise MergeLabError(f"space must be one of {list(MERGE_SPACES)}, got {self.space!r}", param="space")
        if self.dtype is not None and self.dtype not in OUTPUT_DTYPES:
            raise MergeLabError(f"dtype must be one of {list(OUTPUT_DTYPES)}, got {self.dtype!r}", param="dtype")
        if self.shard_size is not None:
            setter("shard_size", parse_size(self.shard_size))
        if self.layer_lambdas is not None:
            setter("layer_lambdas", _layer_lambdas(method, self.layer_lambdas))

    # -- serialization ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data; `MergeSpec.from_dict` turns it back into an equal spec."""
        return plain(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MergeSpec":
        """A spec from `to_dict()` output or a `merge_config.json` (whose report keys are ignored)."""
        return from_plain(cls, data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "MergeSpec":
        return cls.from_dict(json.loads(text))


def plain(spec: Any) -> dict[str, Any]:
    """A spec dataclass with `params` as JSON-ready data: its tuples as lists, its params a plain dict."""
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(spec).items()}
    data["params"] = dict(spec.params)
    return data


def from_plain(cls: type, data: Mapping[str, Any]) -> Any:
    """`cls` built from `plain` output, keys that are not its fields ignored (a saved record's extras)."""
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})


def _layer_lambdas(method, values) -> tuple[float, ...]:
    """Per-block λs checked as the method checks its own `lambda` (same bounds)."""
    known = {p.name: p for p in method.params}
    if "lambda" not in known:
        with_lambda = [m.name for m in METHODS.values() if any(p.name == "lambda" for p in m.params)]
        raise MergeLabError(f"method {method.name!r} has no lambda, so layer_lambdas cannot set one per block; "
                            f"use one of: {', '.join(with_lambda)}", param="layer_lambdas")
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    parsed = tuple(known["lambda"].parse(v, f"method {method.name!r} (layer_lambdas)") for v in values)
    if not parsed:
        raise MergeLabError("layer_lambdas is empty; give one λ per transformer block, or leave it out",
                            param="layer_lambdas")
    return parsed


def parse_method_text(text: str) -> tuple[str, dict[str, str]]:
    """`ties:density=0.2,scope=tensor` -> ("ties", {"density": "0.2", "scope": "tensor"}), checked against
    the method's parameters (a bad name or value fails here, before any work)."""
    name, _, rest = str(text).partition(":")
    name = name.strip()
    params = parse_assignments([rest], where=f"method settings {str(text)[:80]!r}") if rest.strip() else {}
    get_method(name).parse(params)
    return name, params


def method_label(name: str, params: Mapping[str, Any]) -> str:
    """`ties (density=0.2)`: a method with the settings it was given, for tables and plots."""
    return name + (" (" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")" if params else "")


def specs_from_texts(texts: Iterable[str | tuple[str, dict]], models: Iterable[str], **common: Any
                     ) -> list[tuple[str, MergeSpec]]:
    """(label, spec) for method texts such as `ties:density=0.2` over the same models (compare, curves)."""
    out = []
    for item in texts:
        name, params = parse_method_text(item) if isinstance(item, str) else (item[0], dict(item[1]))
        out.append((method_label(name, params), MergeSpec(name, tuple(models), params=params, **common)))
    return out
