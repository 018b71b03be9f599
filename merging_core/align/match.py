"""Hungarian matching of two models' hidden units from their cross-correlations (Verma & Elbayad 2024,
"Merging Text Transformer Models from Different Initializations", arXiv:2403.00986, Sec. 3; after
ZipIt!, Stoica et al. 2023, arXiv:2305.03053). Every solve is
`scipy.optimize.linear_sum_assignment(corr, maximize=True)` on the signed correlation; the result is an
order for model B: its unit order[i] goes where A has unit i.

- **Feed-forward** (`ff.<l>`): one solve over the intermediate neurons.
- **Attention** (`attn.<l>`, the heads' outputs): `head-perm` solves every head pair (j, k) on its
  d×d block, cost(j, k) = the summed matched correlation, then matches heads on that H×H cost;
  `monotonic` keeps head j with head j and solves inside each; `ignore-heads` solves the whole
  hidden × hidden matrix at once (not head-structured, so not function-preserving). The order found
  for V and W_O is used for Q and K too, unless `qk` asks for a separate one from the query and key
  outputs (inside the same head matching).
- **Residual stream**: one order from the LayerNorm outputs at the `first` site (embeddings), the
  `last` one, `all` of them (their mean correlation), or `sep`: one per site (not function-preserving).
- **Merge types** choose which of the three are permuted; the rest keep B's order (plain averaging).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import MergeLabError
from ..progress import ProgressFn
from .permute import Permutation, head_rows

ATTENTION = ("head-perm", "monotonic", "ignore-heads")
RESIDUAL = ("first", "last", "all", "sep")
MERGE_TYPES = {
    "vanilla": set(), "ff_only": {"ff"}, "attn_only": {"attn"}, "res_only": {"res"}, "ff+attn": {"ff", "attn"},
    "ff+res": {"ff", "res"}, "res+attn": {"res", "attn"}, "all": {"ff", "attn", "res"},
}


def match(corr: torch.Tensor) -> torch.Tensor:
    """The order of B's units that maximises Σ_i corr[i, order[i]] (a Hungarian solve)."""
    from scipy.optimize import linear_sum_assignment  # imported where used: scipy takes a while to import

    rows, cols = linear_sum_assignment(corr.double().numpy(), maximize=True)
    return torch.as_tensor(cols[np.argsort(rows)], dtype=torch.int64)


def head_blocks(corr: torch.Tensor, num_heads: int) -> torch.Tensor:
    """A heads-major correlation (num_heads x d units per side) as blocks: [j, k] is A head j x B head k."""
    d = corr.shape[0] // num_heads
    return corr.reshape(num_heads, d, num_heads, d).permute(0, 2, 1, 3)


def head_pair_costs(blocks: torch.Tensor) -> torch.Tensor:
    """Head-Perm's cost of every head pair (j, k): the summed correlation of their units once matched."""
    heads, d = blocks.shape[0], blocks.shape[2]
    cost = torch.zeros(heads, heads)
    for j in range(heads):
        for k in range(heads):
            cost[j, k] = blocks[j, k][torch.arange(d), match(blocks[j, k])].sum()
    return cost


@dataclass
class AttentionMatch:
    vo: torch.Tensor  # row order of V (columns of W_O)
    qk: torch.Tensor  # row order of Q and K
    heads: torch.Tensor | None  # head order (None: ignore-heads)
    cost: torch.Tensor | None  # head-perm: summed matched correlation of every head pair (A heads x B heads)


def match_attention(corr: torch.Tensor, num_heads: int, mode: str, qk_corr: torch.Tensor | None = None
                    ) -> AttentionMatch:
    """Orders for one layer's attention from the heads' output correlation (and Q/K's, when given)."""
    if mode not in ATTENTION:
        raise MergeLabError(f"attention matching must be one of {list(ATTENTION)}, got {mode!r}", param="attention")
    if mode == "ignore-heads":
        vo = match(corr)
        return AttentionMatch(vo, match(qk_corr) if qk_corr is not None else vo, None, None)
    blocks = head_blocks(corr, num_heads)
    if mode == "monotonic":
        heads, cost = torch.arange(num_heads), None
    else:
        cost = head_pair_costs(blocks)
        heads = match(cost)
    inner_vo = torch.stack([match(blocks[j, heads[j]]) for j in range(num_heads)])
    vo = head_rows(heads, inner_vo)
    if qk_corr is None:
        return AttentionMatch(vo, vo, heads, cost)
    qk_blocks = head_blocks(qk_corr, num_heads)
    inner_qk = torch.stack([match(qk_blocks[j, heads[j]]) for j in range(num_heads)])
    return AttentionMatch(vo, head_rows(heads, inner_qk), heads, cost)


def residual_sites(layers: int) -> list[str]:
    return ["embeddings"] + [f"{kind}.{layer}" for layer in range(layers) for kind in ("attn", "ff")]


def match_residual(corrs: dict[str, torch.Tensor], layers: int, mode: str) -> torch.Tensor | dict[str, torch.Tensor]:
    """One residual order from the `first` / `last` / `all` sites, or one per site (`sep`)."""
    if mode not in RESIDUAL:
        raise MergeLabError(f"residual matching must be one of {list(RESIDUAL)}, got {mode!r}", param="residual")
    sites = residual_sites(layers)
    if mode == "sep":
        return {site: match(corrs[f"res.{site}"]) for site in sites}
    if mode == "first":
        return match(corrs["res.embeddings"])
    if mode == "last":
        return match(corrs[f"res.{sites[-1]}"])
    return match(torch.stack([corrs[f"res.{site}"] for site in sites]).mean(0))


@dataclass
class Matching:
    """The permutation of B found for one setting, and what it was found from."""

    permutation: Permutation
    merge_type: str
    attention: str
    residual: str
    qk: bool
    head_costs: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> A heads x B heads (head-perm)
    head_orders: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> B's head for each of A's

    @property
    def function_preserving(self) -> bool:
        kinds = MERGE_TYPES[self.merge_type]
        return not ("attn" in kinds and self.attention == "ignore-heads") and not (
            "res" in kinds and self.residual == "sep")


def check_settings(merge_type: str, attention: str, residual: str) -> None:
    """Fail clearly on an unknown merge type or matching mode."""
    for value, known, what, param in ((merge_type, MERGE_TYPES, "merge type", "merge_type"),
                                      (attention, ATTENTION, "attention matching", "attention"),
                                      (residual, RESIDUAL, "residual matching", "residual")):
        if value not in known:
            raise MergeLabError(f"{what} must be one of {list(known)}, got {value!r}", param=param)


def matching_steps(layers: int, merge_type: str) -> list[str]:
    """The sites `find_permutation` solves, in order: `ff.<l>`, `attn.<l>` per layer, then `residual`."""
    kinds = MERGE_TYPES[merge_type]
    steps = [f"{kind}.{layer}" for layer in range(layers) for kind in ("ff", "attn") if kind in kinds]
    return steps + (["residual"] if "res" in kinds else [])


def find_permutation(corrs: dict[str, torch.Tensor], *, layers: int, num_heads: int, merge_type: str = "ff+attn",
                     attention: str = "head-perm", residual: str = "first", qk: bool = False,
                     progress: ProgressFn | None = None) -> Matching:
    """B's permutation for a merge type (see the module doc), from `features.correlations` output.
    `progress` hears each site before it is solved ("ff.2 (5/18)"; one solve takes well under a second
    for MiniLM's sizes on a CPU), so a callback that raises stops the matching there."""
    check_settings(merge_type, attention, residual)
    kinds = MERGE_TYPES[merge_type]
    result = Matching(Permutation(), merge_type, attention, residual, qk)
    steps = matching_steps(layers, merge_type)
    done = 0

    def report(site: str) -> None:
        nonlocal done
        if progress is not None:
            progress(done / max(len(steps), 1), f"{site} ({done + 1}/{len(steps)})")
        done += 1

    for layer in range(layers):
        if "ff" in kinds:
            report(f"ff.{layer}")
            result.permutation.ff[layer] = match(corrs[f"ff.{layer}"])
        if "attn" in kinds:
            report(f"attn.{layer}")
            found = match_attention(corrs[f"attn.{layer}"], num_heads, attention,
                                    corrs[f"qk.{layer}"] if qk else None)
            result.permutation.vo[layer], result.permutation.qk[layer] = found.vo, found.qk
            if found.cost is not None:
                result.head_costs[layer] = found.cost
            if found.heads is not None:
                result.head_orders[layer] = found.heads
    if "res" in kinds:
        report("residual")
        result.permutation.residual = match_residual(corrs, layers, residual)
    if progress is not None:
        progress(1.0, f"done ({len(steps)}/{len(steps)})")
    return result
