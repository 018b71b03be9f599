"""RegMean: merge every linear layer so its outputs best match each model's on that model's data.

Jin et al. 2023, "Dataless knowledge fusion by merging weights of language models", eq. 2 and the
closed form of Sec. 3.2 (arXiv:2212.09849): W_Mᵀ = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ with G_i the Gram of the
layer's inputs and G̃ = αG + (1−α)·diag(G) (off-diagonals scaled by α). Only `nn.Linear` weights are
solved; biases, layer norms and embeddings are averaged. α = 0 reduces to a per-input-feature weighted
average by diag(G). Where Σ G̃_i is singular (an input feature no example activates, as after a ReLU),
the solve is least squares on its range and the models' weighted mean along its null space, which the
objective leaves free: copies of one model then merge back into it.

**Weighting of the models** (`weighting`). MergeLab stores each Gram as a per-token mean, G_i = X_iᵀX_i / N_i.

- `models` (default): G̃_i ← c_i G̃_i. Every model counts by its weight c_i whatever the number of tokens
  behind its statistics, as both reference implementations do (the RegMean authors' code and MaTS's,
  which average the Gram over the examples they ran). Identical Grams then reduce to the plain
  (c-weighted) average.
- `tokens`: G̃_i ← c_i N_i G̃_i, i.e. the summed Grams X_iᵀX_i of eq. 2 taken literally: a model whose
  statistics saw more tokens (longer texts, more examples) pulls the solution towards itself. It needs
  the token count each statistics file records.

**Weights stored (in, out)** (transformers' `Conv1D`, GPT-2: `ParamInfo.transposed`): G is the Gram of the
layer's inputs whatever the storage, so such a weight is turned to (out, in) before the solve and back
after (`linear_layout`): W_M = (Σ G̃_i)⁻¹ Σ G̃_i W_i in its stored layout.

**(IA)³ vectors in module space.** An (IA)³ vector l acts as the diagonal linear map a ↦ l ⊙ a on the
activation a it scales, so eq. 2 restricted to diagonal weights, min_l Σ_i ‖(l − l_i) ⊙ A_i‖², is solved
feature by feature: l_j = Σ_i c_i G_i,jj l_i,j / Σ_i c_i G_i,jj, with only the diagonal of each Gram
(what `stats` records for a vector in module space). α does not enter (it scales off-diagonals only).
"""


from __future__ import annotations

from dataclasses import replace

import torch

from ..errors import MergeLabError
from ..stats import setting_params
from . import WEIGHTS, Method, Param, TensorJob, register, stack, weighted_mean

ALPHA = Param("alpha", "float", 0.9, "scale α of the Grams' off-diagonal entries (1 = full Gram)", low=0.0,
              high=1.0)
WEIGHTING = Param("weighting", "choice", "models", "how models count: by their weights alone (models, as the "
                  "papers' code) or also by the tokens behind their Grams (tokens)", choices=("models", "tokens"))


def scale_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    return alpha * gram + (1 - alpha) * torch.diag_embed(torch.diagonal(gram))


def model_scale(job: TensorJob, stats: dict[str, torch.Tensor], weight: torch.Tensor, key: str) -> float:
    """c_i (weighting `models`) or c_i N_i (weighting `tokens`) for one model's statistic `key`."""
    if job.params.get("weighting", "models") == "models":
        return float(weight)
    count = stats.get(f"{key}_count")
    if count is None:
        raise MergeLabError(f"the statistics for {job.name} record no token count, which weighting=tokens needs; "
                            "use weighting=models or recompute the statistics", param="weighting")
    return float(weight) * float(count)


def weighted_grams(job: TensorJob, key: str = "gram") -> list[torch.Tensor] | None:
    """The scaled Gram of each model for this parameter (see `weighting`), or None when it is not a solved
    linear weight."""
    if not job.stats or any(key not in s or s[key].dim() != 2 for s in job.stats) or job.tensors[0].dim() != 2:
        return None
    dtype = torch.float64
    return [scale_off_diagonal(s[key].to(job.tensors[0].device, dtype), job.params["alpha"])
            * model_scale(job, s, c, key) for s, c in zip(job.stats, job.weights)]


def diagonal_grams(job: TensorJob) -> torch.Tensor | None:
    """For an (IA)³ vector in module space: each model's scaled Gram diagonal in the vector's shape, stacked,
    or None when the parameter has no such statistic."""
    shape = job.tensors[0].shape  # PEFT keeps a vector as (d, 1) or (1, d)
    if not job.stats or any("gram" not in s or s["gram"].dim() != 1 or s["gram"].numel() != shape.numel()
                            for s in job.stats):
        return None
    return torch.stack([s["gram"].to(job.tensors[0].device, torch.float64).reshape(shape)
                        * model_scale(job, s, c, "gram") for s, c in zip(job.stats, job.weights)])


def solve_diagonal(weights: torch.Tensor, job: TensorJob) -> torch.Tensor:
    """Σ_i w_i θ_i / Σ_i w_i feature by feature; the plain weighted mean where no model has any weight."""
    total = weights.sum(0)
    thetas = stack(job).double()
    solved = (weights * thetas).sum(0) / total.clamp_min(torch.finfo(total.dtype).tiny)
    return torch.where(total > 0, solved, weighted_mean(thetas, job.weights.double()))


def solve_regmean(grams: list[torch.Tensor], tensors: list[torch.Tensor], report: dict,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """W_M = ((Σ G̃_i)⁻¹ Σ G̃_i W_iᵀ)ᵀ; when the summed Gram is singular, least squares on its range and the
    models' mean (weighted by `weights`, uniform when None) along its null space."""
    lhs = sum(grams)
    rhs = sum(g @ w.to(g.dtype).T for g, w in zip(grams, tensors))
    solution, info = torch.linalg.solve_ex(lhs, rhs)
    if info.item() != 0:  # a singular Gram (e.g. an input feature that is always zero, as after a ReLU)
        # Input directions no example reaches leave the objective flat: the minimum-norm solution would zero
        # those weights, so they take the models' mean instead (the solution where every model agrees:
        # merging copies of one model returns it), as `solve_diagonal` does for a feature nobody weighs.
        coefficients = (torch.full((len(tensors),), 1 / len(tensors)) if weights is None else weights).to(lhs)
        mean = sum(float(c) * w.to(lhs.dtype).T for c, w in zip(coefficients, tensors))
        solution = _solve_singular(lhs, rhs, mean)
        report["singular_gram"] = True
    return solution.T


def _solve_singular(lhs: torch.Tensor, rhs: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The least-squares solution of a singular `lhs` X = `rhs` on the range of `lhs`, `mean` along its null
    space. A Gram's feature that no example reaches (zero on the diagonal) has a zero row and column, so
    when those are the whole null space (dead ReLU units, the common case) the rest is solved directly and
    those rows are the mean: what the pseudo-inverse gives, without its eigendecomposition (a 1024-wide
    Gram: ~0.14 s on 2 CPU cores, against a few ms)."""
    live = lhs.diagonal() > 0
    if not live.all():
        inner, info = torch.linalg.solve_ex(lhs[live][:, live], rhs[live])
        if info.item() == 0:
            solution = mean.clone()
            solution[live] = inner
            return solution
    inverse = torch.linalg.pinv(lhs, hermitian=True)
    null = torch.eye(lhs.shape[0], dtype=lhs.dtype, device=lhs.device) - inverse @ lhs
    return inverse @ rhs + null @ mean


def linear_layout(job: TensorJob) -> TensorJob:
    """`job` with its weights in `nn.Linear`'s (out, in) layout, the one a layer's input Gram (in x in) and
    output-gradient Gram (out x out) multiply: a weight stored (in, out) (`ParamInfo.transposed`, GPT-2's
    Conv1D) transposed, base included; any other job as it is. Turn the result back with `stored_layout`."""
    if not job.info.transposed or job.tensors[0].dim() != 2:
        return job
    return replace(job, tensors=[t.T for t in job.tensors], base=job.base.T if job.base is not None else None)


def stored_layout(job: TensorJob, merged: torch.Tensor) -> torch.Tensor:
    """A merged weight in (out, in) layout back in the layout `job`'s weights are stored in."""
    return merged.T.contiguous() if job.info.transposed and merged.dim() == 2 else merged


def regmean(job: TensorJob) -> torch.Tensor:
    diagonal = diagonal_grams(job)
    if diagonal is not None:
        return solve_diagonal(diagonal, job).to(job.tensors[0].dtype)
    grams = weighted_grams(job)
    if grams is None:
        return weighted_mean(stack(job), job.weights)
    linear = linear_layout(job)
    return stored_layout(job, solve_regmean(grams, linear.tensors, job.report, job.weights)).to(job.tensors[0].dtype)


register(Method(
    name="regmean", title="RegMean", family="data-aware",
    paper="Jin et al. 2023, Dataless knowledge fusion (RegMean), arXiv:2212.09849, eq. 2: W = (Σ G_i)^-1 Σ G_i W_i",
    params=(WEIGHTS, ALPHA, WEIGHTING, *setting_params("gram")),
    merge_tensor=regmean, needs_stats=("gram",), neutral={"examples": 8},
    doc="Solve each linear layer for the weights whose outputs match every model's on its own data."))
