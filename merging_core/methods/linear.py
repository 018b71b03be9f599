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
  as mergekit's; the dot product and norms that give Ω are accumulated in float64. On a large CPU merge
  both steps run as compiled loops over the inputs as stored (`fused`, one pass each instead of a
  conversion and three dot products, then a product, a sum and a conversion): the same values within
  rounding (the sums added in another order; the product and sum rounded separately, not fused).
"""

from __future__ import annotations

import torch

from . import WEIGHTS, Method, Param, TensorJob, fused, kernel_dtype, register, stack, sum_weighted

LAMBDA = Param("lambda", "float", 0.3, "scale λ of the summed task vectors", low=0.0, high=3.0)


def average(job: TensorJob) -> torch.Tensor:
    return sum_weighted(job.tensors, job.weights)


def task_arithmetic(job: TensorJob) -> torch.Tensor:
    # in place where the values are the same either way: one temporary stack, not three
    return stack(job).sub_(job.base).sum(0).mul_(job.params["lambda"]).add_(job.base)


SLERP_EPS = 1e-8  # below this norm a tensor is left unnormalised (mergekit's rule)


def slerp(job: TensorJob) -> torch.Tensor:
    a, b = job.tensors
    compiled = job.context.get("fused", False)
    if "slerp" in job.context:  # a slice of a large tensor: its coefficients come from the whole (`slerp_scan`)
        coefficients = job.context["slerp"]
    else:
        coefficients = slerp_coefficients(_cosine(*_products(a, b, compiled)), job.params)
    t = job.params["t"]
    ca, cb = coefficients if coefficients is not None else (1 - t, t)
    merged = fused.interpolate(a, b, ca, cb, kernel_dtype(job)) if compiled else None
    if merged is not None:
        return merged
    a, b = a.float(), b.float()  # (as stored, when the kernels were asked for but could not be compiled)
    if coefficients is None:
        return (1 - t) * a + t * b
    return (a * ca).add_(b, alpha=cb)


def _products(a: torch.Tensor, b: torch.Tensor, compiled: bool = False) -> tuple[float, float, float]:
    """a·b, a·a and b·b, each summed in float64 over float32 products of 1M-value blocks: as exact as a
    float64 pass for the angle, without float64 copies of the tensors. Compiled: one loop over the inputs
    as stored (the same sums within rounding)."""
    found = fused.slerp_products(a, b) if compiled else None
    if found is not None:
        return found
    a, b = a.flatten().float(), b.flatten().float()
    dot = aa = bb = 0.0
    for start in range(0, a.numel(), 1 << 20):
        x, y = a[start:start + (1 << 20)], b[start:start + (1 << 20)]
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
        d, x, y = _products(*job.tensors, job.context.get("fused", False))
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
    raw_inputs=True,
    doc="Spherical interpolation between exactly two models."))
