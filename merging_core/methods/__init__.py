"""The one registry of merge methods.

A method merges one parameter at a time: it receives the aligned tensors of every input model (and of
the base model, and per-model statistics, when it declared it needs them) and returns the merged
tensor. Everything else (reading checkpoints lazily, choosing components, heads, writing the result)
is the engine's job (`merging_core.merge`), so adding a method is one new file here that calls
`register`. Each method declares its typed parameters (`merging_core.params.Param`); the CLI's `--set
key=value`, the Python API and the app's controls are all generated from that spec, and every method
picker (CLI choices, `compare --methods`, the Merge and Curves tabs) reads `METHODS`.

Following MaTS (Tam et al.), a merge is a statistic (none / diagonal Fisher / Gram / K-FAC) x a solver
(closed form / conjugate gradient) x an initialisation; `needs_stats` names the statistic.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ..arch import ParamInfo
from ..errors import MergeLabError
from ..params import Param

# Shared by every method that weights its models (declared once).
WEIGHTS = Param("weights", "floats", None, "one weight per model (normalised to sum 1); empty = uniform", low=0.0)


@dataclass
class TensorJob:
    """What a method sees for one parameter."""

    name: str  # canonical name (wrapper prefixes stripped)
    info: ParamInfo
    tensors: list[torch.Tensor]  # one per input model, float32 (float64 for solves; see `Method.raw_inputs`)
    weights: torch.Tensor  # model weights c_i, summing to 1
    params: dict[str, Any]
    base: torch.Tensor | None = None
    stats: list[dict[str, torch.Tensor]] | None = None  # per model: {"fisher": ..., "gram": ..., ...}
    context: dict[str, Any] = field(default_factory=dict)  # what `prepare` computed over the whole model
    report: dict[str, Any] = field(default_factory=dict)  # per-parameter diagnostics (e.g. CG residuals)
    seed: int = 0  # this parameter's own seed (derived from the merge seed and the name)


@dataclass
class WholeModel:
    """What a method's `prepare` pass sees: every parameter the method merges with all models.

    `tensors()` iterates (name, info, tensors, base) afresh, loading one parameter at a time, and a large
    one as consecutive flat slices (TIES's model-wide magnitude threshold, which needs entries, not
    shapes); `stats` holds each model's statistics {name: {kind: tensor}}, or None
    for a data-free merge (Fisher's whole-model normalisation); `sample()`, when given, iterates
    (name, size, tensors, base) with a few blocks of values spread over each parameter (a cheap look at
    the whole model before a pass over it). `stored()`, given when the merge runs compiled kernels
    (`fused`), iterates the same pieces as `tensors()` but as stored (bf16 read in place, not converted)
    and in reverse order, the disk reading ahead on a thread: a pass by those kernels that ends where the
    merge starts, on pages the page cache still holds when the model is larger than memory."""

    names: list[str]
    tensors: Callable[[], Iterator[tuple[str, ParamInfo, list[torch.Tensor], torch.Tensor | None]]]
    stats: list[dict[str, dict[str, torch.Tensor]]] | None = None
    sample: Callable[[], Iterator[tuple[str, int, list[torch.Tensor], torch.Tensor | None]]] | None = None
    stored: Callable[[], Iterator[tuple[str, ParamInfo, list[torch.Tensor], torch.Tensor | None]]] | None = None


@dataclass(frozen=True)
class Method:
    name: str
    title: str
    family: str  # "data-free" | "data-aware"
    paper: str  # citation with the equation
    params: tuple[Param, ...]
    merge_tensor: Callable[[TensorJob], torch.Tensor]
    # Whether it reads the base model, and which statistics ("fisher", "gram", "grad_gram"): fixed, or
    # a function of the parameters (MaTS needs what its objective needs).
    needs_base: bool | Callable[[dict[str, Any]], bool] = False
    needs_stats: tuple[str, ...] | Callable[[dict[str, Any]], tuple[str, ...]] = ()
    min_models: int = 1
    max_models: int | None = None
    # An optional pass over the whole model before merging (TIES's model-wide magnitude threshold and
    # zero-sign fallback, Fisher's whole-model normalisation); what it returns is every job's `context`.
    prepare: Callable[[WholeModel, dict[str, Any]], dict[str, Any]] | None = None
    # Checks a combination of parameter values that each parameter alone cannot (raises MergeLabError).
    check: Callable[[dict[str, Any]], None] | None = None
    mergekit: Callable[[dict[str, Any]], dict | None] | None = None  # mergekit YAML pieces, when expressible
    # Whether each output entry depends only on the same entry of the inputs (given `context`): then the
    # engine may merge a large tensor one flat slice at a time, which bounds memory at any model size.
    elementwise: bool | Callable[[dict[str, Any]], bool] = False
    # For a method that is elementwise once it knows a few numbers of the whole tensor (SLERP's angle, TIES's
    # per-tensor threshold): `scan(params)` gives the function `f(slices, params, sample)` that goes over a
    # tensor's flat slices (`slices()` yields a TensorJob per slice, afresh on each call; `sample()` gives a
    # TensorJob of blocks spread over the tensor, and the tensor's size) and returns what each slice's
    # merge needs, which the engine adds to every slice's `context`; or None where these parameters need
    # the whole tensor. Used for tensors too large to hold whole (`merge.WHOLE`).
    scan: Callable[[dict[str, Any]], Callable[[Callable[[], Iterator[TensorJob]], dict[str, Any]],
                                              dict[str, Any]] | None] | None = None
    # Whether the method has compiled kernels (`fused`), which a large merge on the CPU runs
    # (`context["fused"]`, where `fused.wanted`).
    compiled: bool = False
    # Whether `merge_tensor` and `scan` take the inputs on the CPU in their stored dtype (bf16, fp16) and
    # convert them as they compute, which spares the reader a float32 copy of each: "always", or "compiled"
    # (where the merge runs the method's compiled kernels, which convert each value as they read it; its
    # eager code takes float32). Otherwise, and on a GPU, a job's tensors are float32.
    raw_inputs: str | None = None
    doc: str = ""
    # Parameters under which merging one model (or N copies of it) returns that model: the values the
    # invariant tests use, declared by the method itself.
    neutral: Mapping[str, Any] = field(default_factory=dict)

    def base_required(self, params: dict[str, Any]) -> bool:
        return self.needs_base(params) if callable(self.needs_base) else self.needs_base

    def merges_slices(self, params: dict[str, Any]) -> bool:
        return self.elementwise(params) if callable(self.elementwise) else self.elementwise

    def scanner(self, params: dict[str, Any]):
        """The scan of a large tensor under these parameters (`scan`), or None."""
        return self.scan(params) if self.scan is not None else None

    def stats_required(self, params: dict[str, Any]) -> tuple[str, ...]:
        return self.needs_stats(params) if callable(self.needs_stats) else self.needs_stats

    def parse(self, values: dict[str, Any] | None) -> dict[str, Any]:
        """Defaults filled in, every value checked; unknown names are an error."""
        values = dict(values or {})
        known = {p.name: p for p in self.params}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise MergeLabError(f"method {self.name!r} has no parameter {unknown[0]!r}; "
                                f"its parameters are: {', '.join(known) or 'none'}", param=unknown[0])
        parsed = {name: (p.parse(values[name], f"method {self.name!r}") if name in values else p.default)
                  for name, p in known.items()}
        if self.check is not None:
            self.check(parsed)
        return parsed


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise RuntimeError(f"method {method.name!r} registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise MergeLabError(f"unknown merge method {name!r}; choose one of: {', '.join(METHODS)}",
                            param="method") from None


def kernel_dtype(job: TensorJob) -> torch.dtype:
    """The dtype a method writes its merged tensor in: where its inputs come raw (`Method.raw_inputs`), the
    output's (`context["out_dtype"]`, else the inputs' as stored: a bf16 output written as it is computed,
    no conversion pass after it); float32 otherwise (the engine converts)."""
    if not job.context.get("raw_inputs"):
        return torch.float32
    return job.context.get("out_dtype") or job.tensors[0].dtype


def stack(job: TensorJob) -> torch.Tensor:
    return torch.stack(job.tensors)


def weighted_mean(tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ c_i θ_i over the first axis (weights sum to 1)."""
    return torch.tensordot(weights.to(tensors.dtype), tensors, dims=1)


def sum_weighted(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Σ c_i θ_i accumulated in place: no stacked copy of the inputs (memory-bound merges)."""
    total = tensors[0] * float(weights[0])
    for t, w in zip(tensors[1:], weights[1:].tolist()):
        total.add_(t, alpha=w)
    return total


# Importing the method files registers them (order = the order shown to users).
from . import linear, ties_dare, fisher, regmean, mats  # noqa: E402,F401
