"""RegMean: merge every linear layer so its outputs best match each model's on that model's data.

Jin et al. 2023, "Dataless knowledge fusion by merging weights of language models", eq. 2 and the
closed form of Sec. 3.2 (arXiv:2212.09849): W_Mᵀ = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ with G_i = X_iᵀX_i the Gram
of the layer's inputs and G̃ = αG + (1−α)·diag(G) (off-diagonals scaled by α). Model weights enter as
G̃_i ← c_i N_i G̃_i (N_i tokens behind the mean Gram). Only `nn.Linear` weights are solved; biases,
layer norms and embeddings are averaged. α = 0 reduces to a per-input-feature weighted average by
diag(G); identical Grams reduce to the plain average.
"""

from __future__ import annotations

import torch

from . import WEIGHTS, Method, Param, TensorJob, register, stack, weighted_mean
from ..stats import setting_params

ALPHA = Param("alpha", "float", 0.9, "scale α of the Grams' off-diagonal entries (1 = full Gram)", low=0.0,
              high=1.0)


def scale_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    return alpha * gram + (1 - alpha) * torch.diag_embed(torch.diagonal(gram))


def weighted_grams(job: TensorJob, key: str = "gram") -> list[torch.Tensor] | None:
    """c_i N_i G̃_i per model for this parameter, or None when it is not a solved linear weight."""
    if not job.stats or any(key not in s for s in job.stats) or job.tensors[0].dim() != 2:
        return None
    dtype = torch.float64
    return [scale_off_diagonal(s[key].to(job.tensors[0].device, dtype), job.params["alpha"])
            * float(c) * float(s.get(f"{key}_count", torch.tensor(1.0)))
            for s, c in zip(job.stats, job.weights)]


def regmean(job: TensorJob) -> torch.Tensor:
    grams = weighted_grams(job)
    if grams is None:
        return weighted_mean(stack(job), job.weights)
    lhs = sum(grams)
    rhs = sum(g @ w.to(g.dtype).T for g, w in zip(grams, job.tensors))
    solution, info = torch.linalg.solve_ex(lhs, rhs)
    if info.item() != 0:  # a singular Gram (e.g. an input feature that is always zero): least squares
        solution = torch.linalg.pinv(lhs, hermitian=True) @ rhs
        job.report["singular_gram"] = True
    return solution.T.to(job.tensors[0].dtype)


register(Method(
    name="regmean", title="RegMean", family="data-aware",
    paper="Jin et al. 2023, Dataless knowledge fusion (RegMean), arXiv:2212.09849, eq. 2: W = (Σ G_i)^-1 Σ G_i W_i",
    params=(WEIGHTS, ALPHA, *setting_params("gram")),
    merge_tensor=regmean, needs_stats=("gram",), neutral={"examples": 8},
    doc="Solve each linear layer for the weights whose outputs match every model's on its own data."))
