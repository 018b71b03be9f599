"""MaTS: merging as matching in task parameter subspaces, solved by conjugate gradient.

Tam et al. 2024, "Merging by matching models in task parameter subspaces", eq. 6 (the merge solves
(Σ_i F_i) θ = Σ_i F_i θ_i) and Table 1 (the objectives), arXiv:2312.04339. Every objective is solved
per parameter, matrix-free, with conjugate gradient from an initialisation:

| objective       | operator A(X)          | right-hand side b       | diagonal of A (Jacobi)       |
| average         | X                      | Σ c_i θ_i               | 1                            |
| diagonal_fisher | (Σ c_i F_i) ⊙ X        | Σ c_i F_i ⊙ θ_i         | Σ c_i F_i                    |
| regmean         | (Σ G̃_i) X, X = Wᵀ      | Σ G̃_i W_iᵀ              | diag(Σ G̃_i) along each column |
| kfac            | Σ G̃_i X B̃_i            | Σ G̃_i W_iᵀ B̃_i          | Σ diag(G̃_i) diag(B̃_i)ᵀ       |
| block_fisher    | (Σ c_i F̂_i) X          | Σ c_i F̂_i θ_i           | diag(Σ c_i F̂_i)              |

G_i is the Gram of a linear layer's inputs, B_i the Gram of the gradients at its outputs (K-FAC
factors), both with off-diagonals scaled by α; the models count as RegMean's `weighting` says (c_i, or
c_i N_i). Parameters without statistics are averaged. A weight stored (in, out) (GPT-2's `Conv1D`) is
solved in `nn.Linear`'s layout under the Gram objectives (`regmean.linear_layout`), where G and B apply.

**(IA)³ modules** are merged in module space (`merge(..., space="module")`): the objectives act on the
scaling vectors. `block_fisher` is the objective MaTS uses for (IA)³ (Sec. 5): each vector's full Fisher
block F_i = E[g gᵀ] (d x d, `stats`' `block_fisher`), floored as F̂_i = F_i + ε I so that directions no
example moves take the average; `regmean` there is RegMean's diagonal form (`methods.regmean`);
`diagonal_fisher` and `average` are unchanged; `kfac` does not apply. `normalize` acts on the diagonal
Fisher only.

**Convergence.** Linear layers' Grams are ill-conditioned (condition numbers of 1e6 on a feed-forward
output are common), and plain CG from the task-arithmetic start is then far from the solution after
100 iterations. The Jacobi preconditioner (`preconditioner=jacobi`, the default; Saad 2003, "Iterative
methods for sparse linear systems", Sec. 9.2) divides the residual by A's diagonal, which removes the
differences of scale between input features: it solves `diagonal_fisher` in one step and cuts the
iterations `regmean` needs by orders of magnitude (measured in docs/results/merging.md). `solver=closed_form`
skips the iterations where a direct solution exists (average, diagonal_fisher, regmean: RegMean's
solve; block_fisher: one d x d solve per vector), and is refused for `kfac`, whose system
Σ G̃_i X B̃_i = C has no direct solution short of a Kronecker-sized matrix. The relative residual
‖Ax − b‖ / ‖b‖ before and after, the steps and whether the tolerance was reached are recorded per
parameter (the merge's report).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import MergeLabError
from ..stats import setting_params
from . import WEIGHTS, Method, Param, TensorJob, register, stack, weighted_mean
from .fisher import EPSILON, NORMALIZE, fisher_norms, fisher_weights
from .regmean import (
    ALPHA,
    WEIGHTING,
    diagonal_grams,
    linear_layout,
    scale_off_diagonal,
    solve_diagonal,
    solve_regmean,
    stored_layout,
    weighted_grams,
)

Operator = Callable[[torch.Tensor], torch.Tensor]


def conjugate_gradient(apply: Operator, b: torch.Tensor, x: torch.Tensor, iterations: int, tol: float,
                       diagonal: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Solve A x = b for a symmetric positive (semi)definite operator, from x; returns (x, steps).

    With `diagonal` (A's diagonal, positive), preconditioned CG with M = diag(A): the search directions
    follow M⁻¹ r instead of r. The stopping test is on the true residual ‖r‖ ≤ tol · ‖b‖ either way."""
    r = b - apply(x)
    z = r / diagonal if diagonal is not None else r
    p = z.clone()
    rz = torch.sum(r * z)
    stop = (tol * b.norm()) ** 2
    for step in range(iterations):
        if torch.sum(r * r) <= stop:
            return x, step
        ap = apply(p)
        curvature = torch.sum(p * ap)
        if curvature <= 0:  # the operator is singular along p: x is as good as it gets
            return x, step
        alpha = rz / curvature
        x = x + alpha * p
        r = r - alpha * ap
        z = r / diagonal if diagonal is not None else r
        rz_new = torch.sum(r * z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x, iterations


@dataclass(frozen=True)
class _Problem:
    """One parameter's linear system: A (matrix-free), b, A's diagonal, and a direct solution when one exists."""

    apply: Operator
    b: torch.Tensor
    diagonal: torch.Tensor
    transposed: bool  # solved for X = Wᵀ
    direct: Callable[[], torch.Tensor] | None


def _problem(job: TensorJob) -> _Problem | None:
    """This parameter's system, or None when it has no statistics (then: average)."""
    objective = job.params["objective"]
    thetas = [t.double() for t in job.tensors]
    if objective == "average":
        b = weighted_mean(torch.stack(thetas), job.weights.double())
        return _Problem(lambda x: x, b, torch.ones_like(b), False, lambda: b)
    if objective == "diagonal_fisher":
        weighted = fisher_weights(job)
        if weighted is None:
            return None
        total = weighted.double().sum(0)
        b = (weighted.double() * torch.stack(thetas)).sum(0)
        return _Problem(lambda x: total * x, b, total, False, lambda: b / total)
    if objective == "block_fisher":
        return _block_problem(job, thetas)
    diagonal = diagonal_grams(job) if objective == "regmean" else None
    if diagonal is not None:  # an (IA)³ vector: RegMean of a diagonal map
        total = diagonal.sum(0)
        b = (diagonal * torch.stack(thetas)).sum(0)
        return _Problem(lambda x: total * x, b, total.clamp_min(torch.finfo(total.dtype).tiny), False,
                        lambda: solve_diagonal(diagonal, job).double())
    grams = weighted_grams(job)
    if grams is None:
        return None
    columns = thetas[0].shape[0]  # X = Wᵀ has one column per output
    if objective == "regmean":
        total = sum(grams)
        diagonal = torch.diagonal(total).clamp_min(torch.finfo(total.dtype).tiny).unsqueeze(1).expand(-1, columns)
        return _Problem(lambda x: total @ x, sum(g @ w.T for g, w in zip(grams, thetas)), diagonal, True,
                        lambda: solve_regmean(grams, thetas, job.report, job.weights))
    outs = [scale_off_diagonal(s["grad_gram"].to(grams[0]), job.params["alpha"]) for s in job.stats]
    diagonal = sum(torch.outer(torch.diagonal(g), torch.diagonal(o)) for g, o in zip(grams, outs))
    return _Problem(lambda x: sum(g @ x @ o for g, o in zip(grams, outs)),
                    sum(g @ w.T @ o for g, w, o in zip(grams, thetas, outs)),
                    diagonal.clamp_min(torch.finfo(diagonal.dtype).tiny), True, None)


def _block_problem(job: TensorJob, thetas: list[torch.Tensor]) -> _Problem | None:
    """(Σ c_i F̂_i) θ = Σ c_i F̂_i θ_i over one vector's Fisher blocks, F̂ = F + εI."""
    if not job.stats or any("block_fisher" not in s for s in job.stats):
        return None
    eye = torch.eye(thetas[0].numel(), dtype=torch.float64, device=thetas[0].device)
    blocks = [float(c) * (s["block_fisher"].to(eye) + job.params["epsilon"] * eye)
              for s, c in zip(job.stats, job.weights)]
    total = sum(blocks)
    b = sum(f @ t.reshape(-1) for f, t in zip(blocks, thetas)).reshape(thetas[0].shape)
    return _Problem(lambda x: (total @ x.reshape(-1)).reshape(x.shape), b,
                    torch.diagonal(total).reshape(b.shape).clamp_min(torch.finfo(total.dtype).tiny), False,
                    lambda: torch.linalg.solve(total, b.reshape(-1)).reshape(b.shape))


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
    if job.params["objective"] in ("regmean", "kfac") and job.info.transposed:
        # the Grams multiply the weight in (out, in) layout; Fisher objectives are elementwise, layout-free
        return stored_layout(job, _solve(linear_layout(job)))
    return _solve(job)


def _solve(job: TensorJob) -> torch.Tensor:
    problem = _problem(job)
    if problem is None:
        return weighted_mean(stack(job), job.weights)
    apply, b = problem.apply, problem.b
    b_norm = float(b.norm()) or 1.0
    if job.params["solver"] == "closed_form":
        x = problem.direct()
        x = x.T if problem.transposed else x  # the direct solutions are in the parameter's own layout
        residual = float((apply(x) - b).norm()) / b_norm
        job.report.update(solver="closed_form", residual_after=residual, steps=0)
        return (x.T if problem.transposed else x).to(job.tensors[0].dtype)
    x0 = _initial(job).double()
    x0 = x0.T if problem.transposed else x0
    before = float((apply(x0) - b).norm()) / b_norm
    diagonal = problem.diagonal if job.params["preconditioner"] == "jacobi" else None
    x, steps = conjugate_gradient(apply, b, x0, job.params["iterations"], job.params["tolerance"], diagonal)
    after = float((apply(x) - b).norm()) / b_norm
    job.report.update(residual_before=before, residual_after=after, steps=steps,
                      converged=after <= job.params["tolerance"])
    return (x.T if problem.transposed else x).to(job.tensors[0].dtype)


def _check(params: dict) -> None:
    if params["solver"] == "closed_form" and params["objective"] == "kfac":
        raise MergeLabError("method 'mats': the kfac objective has no closed form; use solver=cg", param="solver")


def _needs_base(params: dict) -> bool:
    return params["init"] in ("base", "task_arithmetic")


OBJECTIVE_STATS = {"average": (), "diagonal_fisher": ("fisher",), "regmean": ("gram",),
                   "kfac": ("gram", "grad_gram"), "block_fisher": ("block_fisher",)}


register(Method(
    name="mats", title="MaTS (conjugate gradient)", family="data-aware",
    paper="Tam et al. 2024, Merging by matching models in task parameter subspaces (MaTS), arXiv:2312.04339, eq. 6 and Table 1, solved by conjugate gradient",
    params=(Param("objective", "choice", "regmean", "the merging objective whose linear system is solved",
                  choices=("average", "diagonal_fisher", "regmean", "kfac", "block_fisher")),
            Param("init", "choice", "task_arithmetic", "where conjugate gradient starts (first = model A)",
                  choices=("average", "task_arithmetic", "base", "first")),
            Param("init_lambda", "float", 0.3, "λ of the task-arithmetic initialisation", low=0.0, high=3.0),
            Param("iterations", "int", 100, "conjugate-gradient iterations per parameter", low=0, high=10_000),
            Param("tolerance", "float", 1e-6, "stop when ‖Ax − b‖ ≤ tolerance · ‖b‖", low=0.0, high=1.0),
            Param("preconditioner", "choice", "jacobi", "divide the residual by the diagonal of the system "
                  "(jacobi) or not (none)", choices=("jacobi", "none")),
            Param("solver", "choice", "cg", "conjugate gradient, or the direct solution where one exists "
                  "(average, diagonal_fisher, regmean, block_fisher)", choices=("cg", "closed_form")),
            WEIGHTS, ALPHA, WEIGHTING, *setting_params("gram", "grad_gram", "fisher", "block_fisher"),
            NORMALIZE, EPSILON),
    merge_tensor=mats, needs_stats=lambda params: OBJECTIVE_STATS[params["objective"]], needs_base=_needs_base,
    prepare=fisher_norms, check=_check,
    neutral={"examples": 8, "objective": "regmean", "init": "average", "tolerance": 1e-10, "iterations": 300},
    doc="Solve the merge objective's linear system per parameter with conjugate gradient."))


def convergence(report: dict[str, dict]) -> list[dict]:
    """Per solved parameter, from a merge's report: residual before / after, steps, converged, worst first."""
    rows = [{"parameter": name, "residual_before": r.get("residual_before"), "residual_after": r["residual_after"],
             "steps": r.get("steps", 0), "converged": r.get("converged", r.get("solver") == "closed_form")}
            for name, r in report.items() if "residual_after" in r]
    return sorted(rows, key=lambda row: -row["residual_after"])
