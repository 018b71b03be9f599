"""Fisher merging: a per-entry weighted average by each model's diagonal Fisher information.

Matena & Raffel 2022, "Merging models with Fisher-weighted averaging", arXiv:2111.09832,
eq. 3:
θ_p = Σ_i c_i F̂_{i,p} θ_{i,p} / Σ_i c_i F̂_{i,p}, with F_i the mean over examples of (∇ log p(y|x))²
and F̂ = max(F, ε). The Fisher variants (empirical / true / hard labels, per-example or batch-mean
gradients, number of examples) are statistic settings, computed and cached by `merging_core.stats`.
With `normalize`, each model's coefficient is divided by ‖F_{i,p}‖ and renormalised (the RegMean
codebase's `fisher_normalize: param`). Parameters without a Fisher are averaged.
"""

from __future__ import annotations

import torch

from . import WEIGHTS, Method, Param, TensorJob, register, stack, weighted_mean
from ..stats import setting_params


def fisher_weights(job: TensorJob) -> torch.Tensor | None:
    """c_i F̂_i stacked over models (normalised per parameter when asked), or None without Fishers."""
    if not job.stats or any("fisher" not in s for s in job.stats):
        return None
    fishers = torch.stack([s["fisher"].to(job.tensors[0]) for s in job.stats]).clamp_min(job.params["epsilon"])
    coefficients = job.weights.to(fishers)
    if job.params.get("normalize"):
        norms = fishers.flatten(1).norm(dim=1)
        coefficients = coefficients / norms
        coefficients = coefficients / coefficients.sum()
    return fishers * coefficients.view(-1, *([1] * (fishers.dim() - 1)))


def fisher(job: TensorJob) -> torch.Tensor:
    weighted = fisher_weights(job)
    if weighted is None:
        return weighted_mean(stack(job), job.weights)
    return (weighted * stack(job)).sum(0) / weighted.sum(0)


register(Method(
    name="fisher", title="Fisher merging", family="data-aware",
    paper="Matena & Raffel 2022, Fisher-weighted averaging, arXiv:2111.09832, eq. 3: θ = Σ c_i F_i θ_i / Σ c_i F_i",
    params=(WEIGHTS, *setting_params("fisher"),
            Param("normalize", "bool", False, "divide each model's coefficient by ‖F_i‖ per parameter"),
            Param("epsilon", "float", 1e-8, "floor of the Fisher values", low=0.0, high=1.0)),
    merge_tensor=fisher, needs_stats=("fisher",), neutral={"examples": 8},
    doc="Weight each parameter entry by how much each model's predictions depend on it."))
