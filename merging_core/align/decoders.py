"""Function-preserving permutations of decoder-only checkpoints: GPT-2 and the Llama layout (Llama,
Mistral, Qwen2, Qwen3, Gemma). The symmetries are those Verma & Elbayad use for BERT ("Merging Text
Transformer Models from Different Initializations", 2024, arXiv:2403.00986, Sec. 3; see `permute`),
adapted to what a decoder adds: a gated MLP, grouped-query attention, rotary positions and RMSNorm.

- **Feed-forward** neurons of layer l, one order P (intermediate size). Llama's gated MLP computes
  W_down (act(W_gate x) ⊙ W_up x): the product is elementwise, so the gate and the up projection take
  the *same* row order (and bias), and `down_proj` the matching column order; the output is unchanged.
  GPT-2's `c_fc` / `c_proj` are `Conv1D`s, stored (in, out): P permutes the storage *columns* (and
  bias) of `c_fc` and the storage *rows* of `c_proj`.
- **Attention heads** (`HeadOrder`). Every head is a separate softmax, so heads can be relabelled as
  blocks. Under grouped-query attention (Ainslie et al. 2023, "GQA", arXiv:2305.13245) query head h
  reads KV head h // g (g = heads / KV heads), so the KV heads are permuted as blocks (rows of `k_proj`
  and `v_proj`) and each KV head's group of g query heads moves with it; inside a group the query heads
  may be reordered freely, since they all read the same keys and values. An order that moves a query
  head to another group is refused (`HeadOrder` checks it): that head would attend with other keys.
  Inside a head, the value dimensions may be permuted (rows of `v_proj`, the matching columns of
  `o_proj` for every query head of the group): values are never rotated. The query / key dimensions
  may be permuted (the same order for q and k, so every score qᵀk is unchanged) only without rotary
  positions, i.e. in GPT-2: RoPE (HF's rotate_half convention) rotates dimension i with i + d/2 at a
  frequency of its own, and the only permutations that commute with every one of those rotations keep
  each dimension in place (the frequencies are distinct; swapping i with i + d/2 reverses the angle).
  So for the Llama layout the q/k dimension order inside a head is always the identity, which also
  leaves Qwen3's per-head `q_norm` / `k_norm` (shared by all heads) as they are. The columns of
  `o_proj` follow the query heads' order, Qwen2's q/k/v biases their rows. GPT-2's fused `c_attn`
  holds the q, k and v blocks side by side in its storage columns ([hidden, 3 x hidden]): the same
  head order is applied to all three (q and k also share their dimension order, v has its own), and
  the storage rows of `attn.c_proj` follow the value order.
- **Residual stream**, one order P_res for the whole model. RMSNorm (Zhang & Sennrich 2019,
  arXiv:1910.07467) divides by the root mean square of the units and multiplies by a per-unit γ, and
  LayerNorm also subtracts their mean: both statistics ignore the order of the units, so the norms are
  permutation-equivariant when γ (and β) take P_res. Gemma stores 1 + γ: still one number per unit.
  P_res permutes the columns of the token (and GPT-2's position) embeddings, every norm's γ and β, the
  columns of every reader of the stream (q/k/v or `c_attn`, gate/up or `c_fc`, an untied `lm_head`,
  a `score` / `classifier` head, which read the final norm's output), and the rows (and biases) of
  every writer (`o_proj` / `attn.c_proj`, `down_proj` / `mlp.c_proj`). A tied `lm_head` has no tensor
  of its own: it is the (column-permuted) embedding matrix, so the logits keep the vocabulary order.

Orders read like `permute.Permutation`'s: new position i takes old unit order[i]. State dicts are
canonical (`merging_core.arch.canonical` names), each tensor described by its arch role.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..arch import adapter_for
from ..errors import MergeLabError

FAMILIES = ("gpt2", "llama")  # the adapters whose checkpoints this module permutes
ROTARY = ("llama",)  # families with rotary positions: no q/k dimension order inside a head
CONV1D = ("gpt2",)  # families whose block projections are `Conv1D`s, stored (in, out)
_CONV1D_ROLES = ("qkv", "attn_out", "ff_in", "ff_out")  # (GPT-2's embeddings and heads are not)

# role -> (the order of its output units: rows of a Linear weight, its bias, a norm's vector;
#          the order of its input units: columns of a Linear weight, of an embedding matrix)
_ROLES: dict[str, tuple[str | None, str | None]] = {
    "word": (None, "residual"), "position": (None, "residual"),
    "ln_attn": ("residual", None), "ln_ff": ("residual", None), "ln_final": ("residual", None),
    "query": ("query", "residual"), "key": ("key", "residual"), "value": ("value", "residual"),
    "qkv": ("qkv", "residual"), "attn_out": ("residual", "out"),
    "ff_gate": ("ff", "residual"), "ff_in": ("ff", "residual"), "ff_out": ("residual", "ff"),
    "lm_decoder": (None, "residual"), "classifier": (None, "residual"),
    "ln_query": (None, None), "ln_key": (None, None),  # over head_dim, whose q/k order never moves (RoPE)
}


def supports(model_type: str) -> bool:
    """True when this module can permute checkpoints of `model_type` (GPT-2 and the Llama layout)."""
    return adapter_for(model_type, generic=True).family in FAMILIES


def _is_order(order: torch.Tensor, size: int) -> bool:
    return order.dim() == 1 and len(order) == size and torch.equal(torch.sort(order).values, torch.arange(size))


@dataclass
class HeadOrder:
    """One layer's attention order: new KV head j is old KV head `kv[j]`, new query head i is old query
    head `query[i]`; inside new KV head j (and the query heads of its group) the q/k dimensions are in
    order `qk_inner[j]` and the value dimensions in order `v_inner[j]`. Construction refuses an order
    that moves a query head out of its KV head's group (see the module doc)."""

    kv: torch.Tensor  # (kv_heads,)
    query: torch.Tensor  # (heads,)
    qk_inner: torch.Tensor  # (kv_heads, head_dim)
    v_inner: torch.Tensor  # (kv_heads, head_dim)

    def __post_init__(self) -> None:
        kv_heads, heads = len(self.kv), len(self.query)
        if not kv_heads or heads % kv_heads or not _is_order(self.kv, kv_heads) or not _is_order(self.query, heads):
            raise MergeLabError(f"a head order needs a permutation of {kv_heads} KV heads and one of {heads} query "
                                "heads, a multiple of them", param="permutation")
        for name in ("qk_inner", "v_inner"):
            inner = getattr(self, name)
            if inner.dim() != 2 or len(inner) != kv_heads or not all(_is_order(o, inner.shape[1]) for o in inner):
                raise MergeLabError(f"{name} must hold one permutation of the head dimensions per KV head",
                                    param="permutation")
        group = self.group
        # new query head i sits in new group i // group, whose KV head is old kv[i // group]: the old query
        # head it takes must have read that KV head
        kept = self.query // group == self.kv[torch.arange(heads) // group]
        if not bool(kept.all()):
            moved = [int(i) for i in torch.nonzero(~kept).flatten()]
            raise MergeLabError(f"the head order moves query heads {moved} away from their KV head's group (of "
                                f"{group}): under grouped-query attention a query head must move with its KV head",
                                param="permutation")

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return len(self.query) // len(self.kv)

    @property
    def head_dim(self) -> int:
        return self.qk_inner.shape[1]

    def rows(self) -> dict[str, torch.Tensor]:
        """Flat unit orders: rows of q, k, v and the columns of the output projection (`out`)."""
        of_query = torch.arange(len(self.query)) // self.group  # each new query head's new KV head
        return {"query": _head_rows(self.query, self.qk_inner[of_query]), "key": _head_rows(self.kv, self.qk_inner),
                "value": _head_rows(self.kv, self.v_inner), "out": _head_rows(self.query, self.v_inner[of_query])}

    def inverse(self) -> HeadOrder:
        """The order that puts every head and dimension back."""
        kv = torch.argsort(self.kv)
        return HeadOrder(kv, torch.argsort(self.query), torch.argsort(self.qk_inner, dim=1)[kv],
                         torch.argsort(self.v_inner, dim=1)[kv])


def _head_rows(heads: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """New head i is old head heads[i], its dimensions in order inner[i]."""
    return (heads[:, None] * inner.shape[1] + inner).reshape(-1)


@dataclass
class DecoderPermutation:
    """A decoder's orders (see the module doc); a missing entry means identity."""

    residual: torch.Tensor | None = None  # (hidden,) one order for the whole residual stream
    ff: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (intermediate,)
    heads: dict[int, HeadOrder] = field(default_factory=dict)  # layer -> its attention order

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> order (`ff.3`, `kv.0`, `query.0`, `qk_inner.0`, `v_inner.0`, `residual`)."""
        out = {f"ff.{layer}": order for layer, order in self.ff.items()}
        for layer, head in self.heads.items():
            out.update({f"{part}.{layer}": getattr(head, part) for part in ("kv", "query", "qk_inner", "v_inner")})
        if self.residual is not None:
            out["residual"] = self.residual
        return {k: v.to(torch.int64).clone() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> DecoderPermutation:
        """The permutation `tensors()` flattened (as an alignment's record stores it)."""
        perm = cls(residual=tensors.get("residual"))
        for name, order in tensors.items():
            part, _, layer = name.rpartition(".")
            if part == "ff":
                perm.ff[int(layer)] = order
            elif part == "kv":
                perm.heads[int(layer)] = HeadOrder(*(tensors[f"{p}.{layer}"]
                                                     for p in ("kv", "query", "qk_inner", "v_inner")))
        return perm

    def order_at(self, site: str) -> torch.Tensor | None:
        """The order B's units take at a correlation site (`decoder_match`): `ff.<l>`, `attn.<l>` (the attention
        output projection's inputs: query heads' value dimensions), `qkv.<l>` (GPT-2's fused q|k|v output),
        `res.*`; None where they stay."""
        kind, _, rest = site.partition(".")
        if kind == "res":
            return self.residual
        layer = int(rest.split(".")[0])
        if kind == "ff":
            return self.ff.get(layer)
        if layer not in self.heads:
            return None
        rows = self.heads[layer].rows()
        if kind == "qkv":  # GPT-2's fused projection: q, k and v blocks side by side
            width = len(rows["query"])
            return torch.cat([rows["query"], rows["key"] + width, rows["value"] + 2 * width])
        return rows["out"] if kind == "attn" else None

    def in_place(self) -> tuple[int, int]:
        """(units the orders leave where they were, units they order), over every order it holds."""
        orders = [o.reshape(-1) for name, o in self.tensors().items() if not name.endswith("_inner")]
        orders += [row for head in self.heads.values() for row in (*head.qk_inner, *head.v_inner)]
        kept = sum(int((order == torch.arange(len(order))).sum()) for order in orders)
        return kept, sum(len(order) for order in orders)

    def inverse(self) -> DecoderPermutation:
        """The permutation that undoes this one."""
        return DecoderPermutation(None if self.residual is None else torch.argsort(self.residual),
                                  {layer: torch.argsort(order) for layer, order in self.ff.items()},
                                  {layer: head.inverse() for layer, head in self.heads.items()})


def _setting(config, *names: str, default=None):
    """The first of `names` a config has (a transformers config or a `ConfigView` of config.json, where
    GPT-2 spells `n_embd` what others call `hidden_size`)."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def shape_of(config) -> dict[str, int | bool]:
    """What the orders are sized by: layers, hidden, intermediate, heads, kv_heads, head_dim, rotary."""
    family = adapter_for(config.model_type, generic=True).family
    if family not in FAMILIES:
        raise MergeLabError(f"model type {config.model_type!r} is not a decoder MergeLab can permute "
                            f"(families: {', '.join(FAMILIES)})", param="model")
    hidden = _setting(config, "n_embd", "hidden_size")
    heads = _setting(config, "n_head", "num_attention_heads")
    return {"layers": _setting(config, "n_layer", "num_hidden_layers"), "hidden": hidden, "heads": heads,
            "intermediate": _setting(config, "n_inner", "intermediate_size", default=4 * hidden),
            # no num_key_value_heads: multi-head attention, one KV head per query head
            "kv_heads": _setting(config, "num_key_value_heads", default=heads),
            "head_dim": _setting(config, "head_dim", default=hidden // heads), "rotary": family in ROTARY}


def random_decoder_permutation(config, *, seed: int = 0,
                               kinds: tuple[str, ...] = ("ff", "heads", "residual")) -> DecoderPermutation:
    """A random function-preserving permutation of a decoder with this config (`kinds` ⊆ ff, heads, residual;
    checked by the caller, `permute.random_permutation`)."""
    size = shape_of(config)
    generator = torch.Generator().manual_seed(seed)
    heads, kv_heads, head_dim = size["heads"], size["kv_heads"], size["head_dim"]
    group = heads // kv_heads

    def orders(count: int, length: int) -> torch.Tensor:
        return torch.stack([torch.randperm(length, generator=generator) for _ in range(count)])

    perm = DecoderPermutation()
    for layer in range(size["layers"]):
        if "ff" in kinds:
            perm.ff[layer] = torch.randperm(size["intermediate"], generator=generator)
        if "heads" in kinds:
            kv = torch.randperm(kv_heads, generator=generator)
            # each new group j holds old group kv[j]'s query heads, in an order of its own
            query = (kv[:, None] * group + orders(kv_heads, group)).reshape(-1)
            qk_inner = torch.arange(head_dim).repeat(kv_heads, 1) if size["rotary"] else orders(kv_heads, head_dim)
            perm.heads[layer] = HeadOrder(kv, query, qk_inner, orders(kv_heads, head_dim))
    if "residual" in kinds:
        perm.residual = torch.randperm(size["hidden"], generator=generator)
    return perm


def _apply(tensor: torch.Tensor, out: torch.Tensor | None, inp: torch.Tensor | None, conv1d: bool) -> torch.Tensor:
    """Reorder a weight's output units (`out`) and input units (`inp`); a vector takes `out` only."""
    if tensor.dim() == 1:
        return tensor if out is None else tensor[out]
    t = tensor.T if conv1d else tensor  # a Conv1D stores (in, out): work on the Linear layout
    if out is not None:
        t = t[out]
    if inp is not None:
        t = t[:, inp]
    return t.T if conv1d else t


def permute_decoder_state(state: dict[str, torch.Tensor], perm: DecoderPermutation, *,
                          model_type: str) -> dict[str, torch.Tensor]:
    """A permuted copy of a decoder's canonical state dict (see the module doc)."""
    adapter = adapter_for(model_type, generic=True)
    if adapter.family not in FAMILIES:
        raise MergeLabError(f"model type {model_type!r} is not a decoder MergeLab can permute", param="model")
    rotary, conv1d = adapter.family in ROTARY, adapter.family in CONV1D
    for layer, head in perm.heads.items():
        if rotary and not torch.equal(head.qk_inner, torch.arange(head.head_dim).expand_as(head.qk_inner)):
            raise MergeLabError(f"layer {layer}: a {model_type} model uses rotary positions, under which no order of "
                                "the query/key dimensions inside a head preserves the function; keep qk_inner the "
                                "identity", param="permutation")
    rows = {layer: head.rows() for layer, head in perm.heads.items()}
    out = {}
    for name, tensor in state.items():
        info = adapter.describe(name)
        if info.group == "buffer" or not tensor.is_floating_point():
            out[name] = tensor
            continue
        if info.role not in _ROLES:  # e.g. GPT-2's cross-attention: refused rather than permuted wrongly
            raise MergeLabError(f"parameter {name!r} (role {info.role}) cannot be permuted yet: MergeLab permutes "
                                "decoder-only GPT-2 and Llama-layout checkpoints without cross-attention",
                                param="model")
        orders = {"residual": perm.residual, "ff": perm.ff.get(info.layer)}
        if info.layer in rows:
            orders.update(rows[info.layer])
            hidden = len(rows[info.layer]["query"])
            # GPT-2's fused projection: q, k and v blocks side by side, each in its own head order
            orders["qkv"] = torch.cat([orders["query"], hidden + orders["key"], 2 * hidden + orders["value"]])
        out_role, in_role = _ROLES[info.role]
        out[name] = _apply(tensor, orders.get(out_role), orders.get(in_role),
                           conv1d and info.role in _CONV1D_ROLES).contiguous()
    return out
