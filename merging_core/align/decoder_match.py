"""Activation alignment of decoders (GPT-2, the Llama layout): where their features are read and how their
units are matched into a function-preserving `DecoderPermutation` (the symmetries: `decoders`).

The method is the BERT one (Verma & Elbayad 2024, arXiv:2403.00986, Sec. 3; `match`), read off a decoder's
own layers: both models read the same text and the Pearson correlation of every pair of units is summed
over the real tokens (`features.correlations`) at these sites:

- `ff.<l>`: the input of the MLP's output projection (`down_proj`, GPT-2's `mlp.c_proj`): the neurons
  after the activation (and, in a gated MLP, after the gate's product);
- `attn.<l>`: the input of the attention's output projection (`o_proj`, `attn.c_proj`): every query head's
  attention-weighted values, query head by query head;
- `res.attn.<l>`, `res.ff.<l>`, `res.final`: the outputs of the norms before each sub-layer and of the
  final norm (RMSNorm or LayerNorm): the residual stream as the model reads it, in one unit order;
- `qkv.<l>` (GPT-2): the fused `c_attn`'s output, queries, keys and values side by side.

Matching. Feed-forward neurons: one Hungarian solve per layer. Attention (`head-perm`), under grouped-query
attention (query head h reads KV head h // g): the cost of query heads (j, k) is the summed correlation of
their value dimensions after matching them (a solve on the d x d block); the cost of KV heads (J, K) is the
best assignment of J's g query heads to K's (a g x g solve on those costs); the KV heads are matched on that
cost, each group's query heads follow the assignment found inside it, and a KV head's value dimensions are
matched once for its whole group (their blocks summed over the group's matched query heads), since every
query head of the group reads the same values. `monotonic` keeps every head where it is and matches only
the value dimensions. With rotary positions the query/key dimensions stay in place (nothing else commutes
with the rotations; see `decoders`); GPT-2's are matched inside each matched head pair on the mean of the
query and the key correlations, one order for both, so every score qᵀk is unchanged. Residual stream: one order from the first site (`first`: the first norm's output), the final
norm's (`last`), or all of them (`all`, their mean correlation). Orders that would not preserve the function
(`ignore-heads`, `sep`, a separate Q/K order) are refused for decoders.
"""

from __future__ import annotations

import torch

from ..arch import adapter_for, canonical
from ..errors import MergeLabError
from ..progress import ProgressFn
from .decoders import DecoderPermutation, HeadOrder, shape_of
from .match import MERGE_TYPES, Matching, check_settings, head_blocks, head_pair_costs, match

# arch role -> (site, where its features are read); layer roles get ".<layer>"
_SITES = {"ff_out": ("ff", "input"), "attn_out": ("attn", "input"), "ln_attn": ("res.attn", "output"),
          "ln_ff": ("res.ff", "output"), "ln_final": ("res.final", "output"), "qkv": ("qkv", "output")}


def decoder_taps(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, str]]:
    """site -> (module, "input" | "output") of a decoder (see the module doc)."""
    model_type = model.config.model_type
    adapter = adapter_for(model_type, generic=True)
    taps = {}
    for name, module in model.named_modules():
        if not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        info = adapter.describe(canonical(f"{name}.weight", model_type))
        if info.role in _SITES:
            site, where = _SITES[info.role]
            taps[site if info.layer is None else f"{site}.{info.layer}"] = (module, where)
    return taps


def residual_sites(layers: int) -> list[str]:
    """The residual sites in reading order."""
    return [f"res.{kind}.{layer}" for layer in range(layers) for kind in ("attn", "ff")] + ["res.final"]


def _check(merge_type: str, attention: str, residual: str, qk: bool) -> None:
    check_settings(merge_type, attention, residual)
    kinds = MERGE_TYPES[merge_type]
    if "attn" in kinds and attention == "ignore-heads":
        raise MergeLabError("decoders are aligned head by head (attention head-perm or monotonic): ignore-heads "
                            "would mix heads and change the function", param="attention")
    if "res" in kinds and residual == "sep":
        raise MergeLabError("a decoder's residual stream takes one order (residual first, last or all): sep would "
                            "change the function", param="residual")
    if qk:
        raise MergeLabError("decoders keep each head's query/key dimensions in place (rotary positions rotate them "
                            "in pairs), so there is no separate Q/K order: leave qk off", param="qk")


def match_heads(corr: torch.Tensor, heads: int, kv_heads: int, head_dim: int, mode: str,
                qkv: torch.Tensor | None = None) -> tuple[HeadOrder, torch.Tensor | None]:
    """One layer's head order from the correlation of the attention output projection's inputs (query heads
    x head_dim units of A and of B), and the query-head cost matrix (`head-perm`). `qkv`: the fused q|k|v
    projection's output correlation (GPT-2, no rotary positions), from which each head's q/k order comes."""
    d, group = head_dim, heads // kv_heads
    blocks = head_blocks(corr, heads)  # [j, k]: A query head j x B query head k
    if mode == "monotonic":
        kv, inner, cost = torch.arange(kv_heads), torch.arange(group).repeat(kv_heads, 1), None
    else:
        cost = head_pair_costs(blocks)
        group_cost = torch.zeros(kv_heads, kv_heads)
        assignments = {}
        for big_j in range(kv_heads):
            for big_k in range(kv_heads):
                sub = cost[big_j * group:(big_j + 1) * group, big_k * group:(big_k + 1) * group]
                assignments[big_j, big_k] = match(sub)
                group_cost[big_j, big_k] = sub[torch.arange(group), assignments[big_j, big_k]].sum()
        kv = match(group_cost)
        inner = torch.stack([assignments[big_j, int(kv[big_j])] for big_j in range(kv_heads)])
    query = (kv[:, None] * group + inner).reshape(-1)  # new query head i takes old query head query[i]
    v_inner = torch.stack([match(sum(blocks[big_j * group + a, int(query[big_j * group + a])] for a in range(group)))
                           for big_j in range(kv_heads)])
    qk_inner = torch.arange(d).repeat(kv_heads, 1)
    if qkv is not None:  # one KV head per query head: matched heads (j, kv[j]) share their q/k order
        hidden = heads * d
        qk = (qkv[:hidden, :hidden] + qkv[hidden:2 * hidden, hidden:2 * hidden]) / 2
        qk_blocks = head_blocks(qk, heads)
        qk_inner = torch.stack([match(qk_blocks[j, int(kv[j])]) for j in range(kv_heads)])
    return HeadOrder(kv, query, qk_inner, v_inner), cost


def match_decoder(corrs: dict[str, torch.Tensor], config, *, merge_type: str = "ff+attn",
                  attention: str = "head-perm", residual: str = "first", qk: bool = False,
                  progress: ProgressFn | None = None) -> Matching:
    """B's function-preserving permutation for a merge type, from `features.correlations` of two decoders."""
    _check(merge_type, attention, residual, qk)
    size = shape_of(config)
    kinds = MERGE_TYPES[merge_type]
    perm = DecoderPermutation()
    result = Matching(perm, merge_type, attention, residual, qk)
    steps = [f"{kind}.{layer}" for layer in range(size["layers"]) for kind in ("ff", "attn") if kind in kinds]
    steps += ["residual"] if "res" in kinds else []
    for done, step in enumerate(steps):
        if progress is not None:
            progress(done / len(steps), f"{step} ({done + 1}/{len(steps)})")
        kind, _, layer = step.partition(".")
        if kind == "ff":
            perm.ff[int(layer)] = match(corrs[step])
        elif kind == "attn":
            qkv = corrs.get(f"qkv.{layer}") if not size["rotary"] else None
            order, cost = match_heads(corrs[step], size["heads"], size["kv_heads"], size["head_dim"], attention, qkv)
            perm.heads[int(layer)] = order
            result.head_orders[int(layer)] = order.query
            if cost is not None:
                result.head_costs[int(layer)] = cost
        else:
            sites = residual_sites(size["layers"])
            chosen = {"first": sites[:1], "last": sites[-1:], "all": sites}[residual]
            perm.residual = match(torch.stack([corrs[s] for s in chosen]).mean(0))
    if progress is not None:
        progress(1.0, f"done ({len(steps)}/{len(steps)})")
    return result
