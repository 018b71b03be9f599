"""Fisher merging: a per-entry weighted average by each model's diagonal Fisher information.

Matena & Raffel 2022, "Merging models with Fisher-weighted averaging", arXiv:2111.09832,
eq. 3:
θ_p = Σ_i c_i F̂_{i,p} θ_{i,p} / Σ_i c_i F̂_{i,p}, with F_i the mean over examples of (∇ log p(y|x))²
and F̂ = max(F, ε). The Fisher variants (empirical / true / hard labels, per-example or batch-mean
gradients, number of examples) are statistic settings, computed and cached by `merging_core.stats`.
Parameters without a Fisher are averaged.

**Normalisation** (`normalize`) rescales each model's coefficient so that a model whose Fisher is large
overall does not dominate: c_i ← (c_i / n_i) / Σ_j (c_j / n_j), with

- `none` (default): n_i = 1, eq. 3 as written;
- `model`: n_i = ‖F_i‖₂ over every parameter the method merges, one constant per model, as the
  Fisher-merging authors' code (`normalize_fishers`) and MergeLM / FusionBench
  (`normalize_fisher_weight`) do;
- `parameter`: n_i = ‖F_{i,p}‖₂ of each parameter tensor separately, as the RegMean authors' code
  (`fisher_normalize: param`).
"""

from __future__ import annotations

import math

import torch

from . import WEIGHTS, Method, Param, TensorJob, WholeModel, register, stack, weighted_mean
from ..errors import MergeLabError
from ..stats import setting_params

NORMALIZE = Param("normalize", "choice", "none", "divide each model's coefficient by the norm of its Fisher: "
                  "over the whole model (model), per parameter (parameter), or not (none)",
                  choices=("none", "model", "parameter"),
                  aliases=(("true", "parameter"), ("false", "none"), ("1", "parameter"), ("0", "none")))
EPSILON = Param("epsilon", "float", 1e-8, "floor of the Fisher values", low=0.0, high=1.0)


def fisher_norms(model: WholeModel, params: dict) -> dict:
    """For `normalize=model`: each model's Fisher norm over every parameter the method merges."""
    if params.get("normalize") != "model" or model.stats is None:
        return {}
    norms = []
    for i, stats in enumerate(model.stats):
        total = sum(float(stats[name]["fisher"].double().square().sum())
                    for name in model.names if "fisher" in stats.get(name, {}))
        if not (total > 0 and math.isfinite(total)):
            raise MergeLabError(f"the Fisher of model {i + 1} is zero or not finite over the merged parameters, so "
                                "it cannot be normalised; recompute its statistics or use normalize=none",
                                param="normalize")
        norms.append(math.sqrt(total))
    return {"fisher_norms": norms}


def fisher_weights(job: TensorJob) -> torch.Tensor | None:
    """c_i F̂_i stacked over models (with the coefficients normalised as asked), or None without Fishers."""
    if not job.stats or any("fisher" not in s for s in job.stats):
        return None
    fishers = torch.stack([s["fisher"].to(job.tensors[0]) for s in job.stats]).clamp_min(job.params["epsilon"])
    coefficients = job.weights.to(fishers)
    normalize = job.params.get("normalize", "none")
    if normalize != "none":
        norms = (fishers.flatten(1).norm(dim=1) if normalize == "parameter"
                 else torch.tensor(job.context["fisher_norms"], dtype=fishers.dtype, device=fishers.device))
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
    params=(WEIGHTS, *setting_params("fisher"), NORMALIZE, EPSILON),
    merge_tensor=fisher, needs_stats=("fisher",), prepare=fisher_norms, neutral={"examples": 8},
    doc="Weight each parameter entry by how much each model's predictions depend on it."))
