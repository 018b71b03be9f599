"""MaTS: merging as matching in task parameter subspaces, solved by conjugate gradient.

Tam et al. 2024, "Merging by matching models in task parameter subspaces", eq. 6 (the merge solves
(Σ_i F_i) θ = Σ_i F_i θ_i) and Table 1 (the objectives), arXiv:2312.04339. Every objective is solved
per parameter, matrix-free, with conjugate gradient from an initialisation:

| objective       | operator A(X)          | right-hand side b       |
| average         | X                      | Σ c_i θ_i               |
| diagonal_fisher | (Σ c_i F_i) ⊙ X        | Σ c_i F_i ⊙ θ_i         |
| regmean         | (Σ G̃_i) X, X = Wᵀ      | Σ G̃_i W_iᵀ              |
| kfac            | Σ G̃_i X B̃_i            | Σ G̃_i W_iᵀ B̃_i          |

G_i is the Gram of a linear layer's inputs, B_i the Gram of the gradients at its outputs (K-FAC
factors), both with off-diagonals scaled by α and weighted by c_i N_i; parameters without statistics
are averaged. The residual ‖Ax − b‖ / ‖b‖ before and after the solve is recorded per parameter.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import WEIGHTS, Method, Param, TensorJob, register, stack, weighted_mean
from ..stats import setting_params
from .fisher import fisher_weights
from .regmean import ALPHA, scale_off_diagonal, weighted_grams

Operator = Callable[[torch.Tensor], torch.Tensor]


def conjugate_gradient(apply: Operator, b: torch.Tensor, x: torch.Tensor, iterations: int,
                       tol: float) -> tuple[torch.Tensor, int]:
    """Solve A x = b for a symmetric positive (semi)definite operator, from x; returns (x, steps)."""
    r = b - apply(x)
    p = r.clone()
    rs = torch.sum(r * r)
    stop = (tol * b.norm()) ** 2
    for step in range(iterations):
        if rs <= stop:
            return x, step
        ap = apply(p)
        curvature = torch.sum(p * ap)
        if curvature <= 0:  # the operator is singular along p: x is as good as it gets
            return x, step
        alpha = rs / curvature
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = torch.sum(r * r)
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x, iterations


def _problem(job: TensorJob) -> tuple[Operator, torch.Tensor, bool] | None:
    """(A, b, transposed) for this parameter, or None when it has no statistics (then: average)."""
    objective = job.params["objective"]
    thetas = [t.double() for t in job.tensors]
    if objective == "average":
        return (lambda x: x), weighted_mean(torch.stack(thetas), job.weights.double()), False
    if objective == "diagonal_fisher":
        weighted = fisher_weights(job)
        if weighted is None:
            return None
        total = weighted.double().sum(0)
        return (lambda x: total * x), (weighted.double() * torch.stack(thetas)).sum(0), False
    grams = weighted_grams(job)
    if grams is None:
        return None
    if objective == "regmean":
        total = sum(grams)
        return (lambda x: total @ x), sum(g @ w.T for g, w in zip(grams, thetas)), True
    outs = [scale_off_diagonal(s["grad_gram"].to(grams[0]), job.params["alpha"]) for s in job.stats]
    return ((lambda x: sum(g @ x @ o for g, o in zip(grams, outs))),
            sum(g @ w.T @ o for g, w, o in zip(grams, thetas, outs)), True)


def _initial(job: TensorJob) -> torch.Tensor:
    init = job.params["init"]
    if init == "first":
        return job.tensors[0]
    if init in ("base", "task_arithmetic") and job.base is not None:
        if init == "base":
            return job.base
        return job.base + job.params["init_lambda"] * (stack(job) - job.base).sum(0)
    return weighted_mean(stack(job), job.weights)


def mats(job: TensorJob) -> torch.Tensor:
    problem = _problem(job)
    if problem is None:
        return weighted_mean(stack(job), job.weights)
    apply, b, transposed = problem
    x0 = _initial(job).double()
    x0 = x0.T if transposed else x0
    b_norm = float(b.norm()) or 1.0
    before = float((apply(x0) - b).norm()) / b_norm
    x, steps = conjugate_gradient(apply, b, x0, job.params["iterations"], job.params["tolerance"])
    job.report.update(residual_before=before, residual_after=float((apply(x) - b).norm()) / b_norm, steps=steps)
    return (x.T if transposed else x).to(job.tensors[0].dtype)


def _needs_base(params: dict) -> bool:
    return params["init"] in ("base", "task_arithmetic")


OBJECTIVE_STATS = {"average": (), "diagonal_fisher": ("fisher",), "regmean": ("gram",),
                   "kfac": ("gram", "grad_gram")}


register(Method(
    name="mats", title="MaTS (conjugate gradient)", family="data-aware",
    paper="Tam et al. 2024, Merging by matching models in task parameter subspaces (MaTS), arXiv:2312.04339, eq. 6 and Table 1, solved by conjugate gradient",
    params=(Param("objective", "choice", "regmean", "the merging objective whose linear system is solved",
                  choices=("average", "diagonal_fisher", "regmean", "kfac")),
            Param("init", "choice", "task_arithmetic", "where conjugate gradient starts (first = model A)",
                  choices=("average", "task_arithmetic", "base", "first")),
            Param("init_lambda", "float", 0.3, "λ of the task-arithmetic initialisation", low=0.0, high=3.0),
            Param("iterations", "int", 100, "conjugate-gradient iterations per parameter", low=0, high=10_000),
            Param("tolerance", "float", 1e-6, "stop when ‖Ax − b‖ ≤ tolerance · ‖b‖", low=0.0, high=1.0),
            WEIGHTS, ALPHA, *setting_params("gram", "grad_gram", "fisher"),
            Param("normalize", "bool", False, "diagonal_fisher: divide each model's coefficient by ‖F_i‖"),
            Param("epsilon", "float", 1e-8, "diagonal_fisher: floor of the Fisher values", low=0.0, high=1.0)),
    merge_tensor=mats, needs_stats=lambda params: OBJECTIVE_STATS[params["objective"]], needs_base=_needs_base,
    neutral={"examples": 8, "objective": "regmean", "init": "average", "tolerance": 1e-10, "iterations": 300},
    doc="Solve the merge objective's linear system per parameter with conjugate gradient."))
