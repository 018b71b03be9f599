"""Averaging, task arithmetic and spherical interpolation.

- `average`: θ = Σ_i c_i θ_i with Σ c_i = 1 (Wortsman et al. 2022, "Model soups",
  arXiv:2203.05482).
  Weights are normalised, as mergekit's `linear` does by default.
- `task_arithmetic`: θ = θ_pre + λ Σ_i τ_i, τ_i = θ_i − θ_pre (Ilharco et al. 2023, "Editing models
  with task arithmetic", arXiv:2212.04089, eq. 1). Equals mergekit's `task_arithmetic` with every weight = λ.
- `slerp`: θ = sin((1−t)Ω)/sin Ω · θ_A + sin(tΩ)/sin Ω · θ_B with cos Ω the cosine of the two
  flattened tensors (Shoemake 1985, "Animating rotation with quaternion curves", SIGGRAPH), falling back
  to linear interpolation when they are (anti)parallel. As in mergekit, each whole tensor is one vector,
  and a tensor whose norm is below 1e-8 is not normalised: an all-zero tensor counts as orthogonal to the
  other one (Ω = π/2), so the result is sin(tπ/2) · θ_B when θ_A = 0. The interpolation runs in float32,
  as mergekit's; the dot product and norms that give Ω are accumulated in float64. On the CPU both steps
  take the inputs as stored (bf16, say) and go through them a block of `BLOCK` values at a time, so that
  each block's float32 copy is still in the cache for the next operation on it, and the output block is
  written in its own dtype (the eager expressions unchanged: the same values as whole float32 tensors).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from . import WEIGHTS, Method, Param, TensorJob, kernel_dtype, register, stack, sum_weighted

LAMBDA = Param("lambda", "float", 0.3, "scale λ of the summed task vectors", low=0.0, high=3.0)


def average(job: TensorJob) -> torch.Tensor:
    return sum_weighted(job.tensors, job.weights)


def task_arithmetic(job: TensorJob) -> torch.Tensor:
    # in place where the values are the same either way: one temporary stack, not three
    return stack(job).sub_(job.base).sum(0).mul_(job.params["lambda"]).add_(job.base)


SLERP_EPS = 1e-8  # below this norm a tensor is left unnormalised (mergekit's rule)


BLOCK = 1 << 18  # values: SLERP's steps on the CPU, a block at a time (two float32 copies: 2 MB, in the cache)


def slerp(job: TensorJob) -> torch.Tensor:
    a, b = job.tensors
    if "slerp" in job.context:  # a slice of a large tensor: its coefficients come from the whole (`slerp_scan`)
        coefficients = job.context["slerp"]
    else:
        coefficients = slerp_coefficients(_cosine(*_products(a, b)), job.params)
    t = job.params["t"]
    ca, cb = coefficients if coefficients is not None else (1 - t, t)
    merged = torch.empty(a.shape, dtype=kernel_dtype(job), device=a.device)
    flat, a, b = merged.view(-1), a.flatten(), b.flatten()
    for start, stop in _blocks(a):
        x = a[start:stop].to(torch.float32, copy=True)  # (a copy: never scale the input in place)
        if coefficients is None:  # linear: (1 − t) θ_A + t θ_B, each product rounded, as mergekit's
            flat[start:stop] = x.mul_(ca).add_(b[start:stop].float() * cb)
        else:
            flat[start:stop] = x.mul_(ca).add_(b[start:stop], alpha=cb)
    return merged


def _blocks(t: torch.Tensor) -> Iterator[tuple[int, int]]:
    """[start, stop) of the blocks a CPU tensor is gone through in (one block for a GPU tensor)."""
    step = BLOCK if t.device.type == "cpu" else max(1, t.numel())
    return ((start, min(start + step, t.numel())) for start in range(0, t.numel(), step))


def _products(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """a·b, a·a and b·b, each summed in float64 over the float32 products of one block: as exact as a
    float64 pass for the angle, without float64 copies of the tensors."""
    a, b = a.flatten(), b.flatten()
    dot = aa = bb = 0.0
    for start, stop in _blocks(a):
        x, y = a[start:stop].float(), b[start:stop].float()
        dot, aa, bb = dot + float(x @ y), aa + float(x @ x), bb + float(y @ y)
    return dot, aa, bb


def _cosine(dot: float, aa: float, bb: float) -> float:
    norms = [n if n > SLERP_EPS else 1.0 for n in (aa ** 0.5, bb ** 0.5)]  # below the floor: not normalised
    return dot / (norms[0] * norms[1])


def slerp_coefficients(cosine: float, params: dict) -> tuple[float, float] | None:
    """The weights of θ_A and θ_B for the cosine of the two tensors; None: interpolate linearly (the
    tensors are (anti)parallel beyond `dot_threshold`)."""
    cosine = min(1.0, max(-1.0, cosine))
    if abs(cosine) > params["dot_threshold"]:
        return None
    t = params["t"]
    omega = torch.tensor(cosine, dtype=torch.float64).acos()
    sin = omega.sin()
    return float(((1 - t) * omega).sin() / sin), float((t * omega).sin() / sin)


def slerp_scan(slices, params: dict, sample=None) -> dict:
    """A large tensor's SLERP coefficients, from its dot product and norms summed slice by slice (every
    entry counts: no use for a sample)."""
    dot = aa = bb = 0.0
    for job in slices():
        d, x, y = _products(*job.tensors)
        dot, aa, bb = dot + d, aa + x, bb + y
    return {"slerp": slerp_coefficients(_cosine(dot, aa, bb), params)}


def _linear_yaml(params: dict) -> dict:
    weights = params["weights"]
    return {"merge_method": "linear", "per_model": [{"weight": w} for w in weights] if weights else None,
            "default_weight": 1.0}


def _task_arithmetic_yaml(params: dict) -> dict:
    return {"merge_method": "task_arithmetic", "default_weight": params["lambda"]}


def _slerp_yaml(params: dict) -> dict:
    return {"merge_method": "slerp", "parameters": {"t": params["t"]}, "first_is_base": True}


register(Method(
    name="average", title="Average", family="data-free",
    paper="Wortsman et al. 2022, Model soups, arXiv:2203.05482: θ = Σ c_i θ_i",
    params=(WEIGHTS,), merge_tensor=average, mergekit=_linear_yaml, neutral={}, elementwise=True,
    doc="Uniform or weighted mean of the parameters."))

register(Method(
    name="task_arithmetic", title="Task arithmetic", family="data-free",
    paper="Ilharco et al. 2023, Editing models with task arithmetic, arXiv:2212.04089, eq. 1: θ = θ_pre + λ Σ τ_i",
    params=(LAMBDA,), merge_tensor=task_arithmetic, needs_base=True, mergekit=_task_arithmetic_yaml,
    neutral={"lambda": 1.0}, elementwise=True,
    doc="Add the scaled sum of task vectors to the base model."))

register(Method(
    name="slerp", title="SLERP", family="data-free",
    paper="Shoemake 1985; spherical interpolation per tensor between two models",
    params=(Param("t", "float", 0.5, "position between model A (0) and model B (1)", low=0.0, high=1.0),
            Param("dot_threshold", "float", 0.9995, "|cos| above which to interpolate linearly", low=0.0,
                  high=1.0)),
    merge_tensor=slerp, min_models=2, max_models=2, mergekit=_slerp_yaml, neutral={}, scan=lambda params: slerp_scan,
    raw_inputs="always",
    doc="Spherical interpolation between exactly two models."))
