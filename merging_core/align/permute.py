"""Permutations of a BERT-family checkpoint's hidden units (Verma & Elbayad 2024, "Merging Text
Transformer Models from Different Initializations", arXiv:2403.00986, Sec. 3).

A transformer computes the same function after any consistent relabelling of its hidden units:

- **feed-forward** neurons of layer l, P (intermediate size): W1 ← P W1, b1 ← P b1, W2 ← W2 Pᵀ
  (rows of `intermediate.dense`, columns of `output.dense`);
- **attention**: one row order of Q and K (so every score qᵀk is unchanged) and one of V and the
  columns of W_O (so the attention output is unchanged), per layer. They preserve the function when
  they are head-structured (a head order plus an order of the dimensions inside each head, `head_rows`),
  because the softmax runs per head; an unstructured order (ignore-heads matching) does not;
- **residual stream**, P_res: the hidden columns of the word, position and token-type embeddings,
  every LayerNorm's γ and β, the rows (and bias) of every residual writer (`attention.output.dense`,
  `output.dense`), the columns of every reader (Q, K, V, `intermediate.dense`, the pooler, a token
  classifier, the MLM transform). The MLM transform's output takes the embeddings' order, because the
  decoder is tied to the (column-permuted) word embeddings. LayerNorm statistics do not depend on the
  order of the units, so one P_res for every site preserves the function. One order per LayerNorm site
  ("sep") does not: the residual additions then mix differently ordered units.

Residual sites are named after the LayerNorm that closes them: `embeddings`, `attn.<l>` (after the
attention block of layer l), `ff.<l>` (after its feed-forward block). Tensors are canonical state dicts
(`merging_core.arch.canonical` names) described by their arch roles.

Decoder-only checkpoints (GPT-2, the Llama layout) have their own orders (`decoders.DecoderPermutation`:
gated MLPs, grouped-query attention, rotary positions, RMSNorm); `random_permutation`, `permute_state`
and `permute_checkpoint` hand them to `decoders` by model type.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..arch import adapter_for, require
from ..checkpoint import Checkpoint, open_checkpoint
from ..errors import MergeLabError, writing
from ..models import METADATA, copy_tokenizer
from ..outputs import staging
from .decoders import DecoderPermutation, permute_decoder_state, random_decoder_permutation, supports

KINDS = ("ff", "heads", "residual")
EMBEDDINGS = ("word", "position", "token_type", "ln_embeddings")


@dataclass
class Permutation:
    """Index orders (new position i takes old unit order[i]); a missing entry means identity."""

    residual: torch.Tensor | dict[str, torch.Tensor] | None = None  # one order for every site, or one per site
    ff: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (intermediate,)
    qk: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (hidden,) rows of Q and K
    vo: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (hidden,) rows of V, columns of W_O

    def site(self, name: str) -> torch.Tensor | None:
        """The residual order at one site."""
        if isinstance(self.residual, dict):
            return self.residual.get(name)
        return self.residual

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> order, e.g. for a safetensors file (`ff.3`, `qk.0`, `residual` or `residual.attn.2`)."""
        out = {f"{kind}.{layer}": order for kind in ("ff", "qk", "vo") for layer, order in getattr(self, kind).items()}
        if isinstance(self.residual, dict):
            out.update({f"residual.{site}": order for site, order in self.residual.items()})
        elif self.residual is not None:
            out["residual"] = self.residual
        return {k: v.to(torch.int64).clone() for k, v in out.items()}  # Q/K may share V's order: own copies

    def in_place(self) -> tuple[int, int]:
        """(units the orders leave where they were, units they order), over every order it holds."""
        orders = list(self.tensors().values())
        kept = sum(int((order == torch.arange(len(order))).sum()) for order in orders)
        return kept, sum(len(order) for order in orders)


def head_rows(heads: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """A head-structured row order: new head i is old head heads[i], its dimensions in order inner[i]."""
    head_dim = inner.shape[-1]
    return (heads[:, None] * head_dim + inner).reshape(-1)


def _sites(role: str, layer: int | None, last: int) -> tuple[str | None, str | None]:
    """(the residual site a parameter reads from, the site it writes to) for its role."""
    before = "embeddings" if layer == 0 else f"ff.{layer - 1}" if layer is not None else None
    return {
        "query": (before, None), "key": (before, None), "value": (before, None),
        "attn_out": (None, f"attn.{layer}"), "ln_attn": (None, f"attn.{layer}"),
        "ff_in": (f"attn.{layer}", None), "ff_out": (None, f"ff.{layer}"), "ln_ff": (None, f"ff.{layer}"),
        "pooler": (f"ff.{last}", None), "classifier": (f"ff.{last}", None),
        "mlm_transform": (f"ff.{last}", "embeddings"), "mlm_layer_norm": (None, "embeddings"),
        "mlm_decoder": ("embeddings", None),
    }.get(role, ("embeddings", "embeddings") if role in EMBEDDINGS else (None, None))


def permute_state(state: dict[str, torch.Tensor], perm: Permutation | DecoderPermutation, *,
                  model_type: str = "bert", token_head: bool = False) -> dict[str, torch.Tensor]:
    """A permuted copy of a canonical state dict (see the module doc). `token_head`: the classifier reads
    the hidden states (token classification) rather than the pooled output. A decoder (GPT-2, Llama
    layout) takes a `DecoderPermutation` (`decoders`), every other family a `Permutation`."""
    if isinstance(perm, DecoderPermutation) or supports(model_type):
        if not isinstance(perm, DecoderPermutation):  # BERT's flat q/k orders ignore GQA and rotary positions
            raise MergeLabError(f"a {model_type} model is permuted by a DecoderPermutation (random_permutation "
                                "of its config), not a Permutation", param="permutation")
        return permute_decoder_state(state, perm, model_type=model_type)
    adapter = adapter_for(model_type)
    infos = {name: adapter.describe(name) for name in state}
    last = max((i.layer for i in infos.values() if i.layer is not None), default=0)
    out = {}
    for name, tensor in state.items():
        info, t = infos[name], tensor
        if info.group == "buffer" or not t.is_floating_point():
            out[name] = t
            continue
        is_weight, layer = name.endswith("weight"), info.layer
        # the layer's own units: rows of producers, columns of consumers
        if info.role == "ff_in" and layer in perm.ff:
            t = t[perm.ff[layer]]
        elif info.role == "ff_out" and layer in perm.ff and is_weight:
            t = t[:, perm.ff[layer]]
        elif info.role in ("query", "key") and layer in perm.qk:
            t = t[perm.qk[layer]]
        elif info.role == "value" and layer in perm.vo:
            t = t[perm.vo[layer]]
        elif info.role == "attn_out" and layer in perm.vo and is_weight:
            t = t[:, perm.vo[layer]]
        # the residual stream
        reads, writes = _sites(info.role, layer, last)
        if info.role == "classifier" and not token_head:
            reads = None  # a sequence classifier reads the pooled output, not the residual stream
        if info.role in EMBEDDINGS or info.role in ("ln_attn", "ln_ff", "mlm_layer_norm"):
            order = perm.site(writes)
            if order is not None:
                t = t[..., order]
            out[name] = t.contiguous()
            continue
        if writes is not None and perm.site(writes) is not None:
            t = t[perm.site(writes)]
        if reads is not None and is_weight and perm.site(reads) is not None:
            t = t[:, perm.site(reads)]
        out[name] = t.contiguous()
    return out


def random_permutation(config, *, seed: int = 0, kinds: tuple[str, ...] = KINDS) -> Permutation | DecoderPermutation:
    """A random function-preserving permutation of a model with this config (`kinds` ⊆ ff, heads, residual):
    a `DecoderPermutation` for GPT-2 and the Llama layout, a `Permutation` otherwise."""
    if not kinds or set(kinds) - set(KINDS):
        raise MergeLabError(f"permutation kinds must be a non-empty subset of {list(KINDS)}, got {list(kinds)}",
                            param="kinds")
    if supports(config.model_type):
        return random_decoder_permutation(config, seed=seed, kinds=kinds)
    generator = torch.Generator().manual_seed(seed)
    heads, hidden = config.num_attention_heads, config.hidden_size
    head_dim = hidden // heads
    perm = Permutation()

    def inner() -> torch.Tensor:
        return torch.stack([torch.randperm(head_dim, generator=generator) for _ in range(heads)])

    for layer in range(config.num_hidden_layers):
        if "ff" in kinds:
            perm.ff[layer] = torch.randperm(config.intermediate_size, generator=generator)
        if "heads" in kinds:
            order = torch.randperm(heads, generator=generator)
            perm.qk[layer], perm.vo[layer] = head_rows(order, inner()), head_rows(order, inner())
    if "residual" in kinds:
        perm.residual = torch.randperm(hidden, generator=generator)
    return perm


def write_permuted(source: Checkpoint, perm: Permutation | DecoderPermutation, out: str | Path, metadata: dict, *,
                   overwrite: bool = False) -> Path:
    """Write `source` (an open checkpoint) permuted by `perm` as an HF folder, atomically."""
    state = permute_state({n: source.get(n) for n in source.names}, perm, model_type=source.config.model_type,
                          token_head=source.head.kind == "token")
    return write_state(source, state, out, metadata, overwrite=overwrite)


def write_state(source: Checkpoint, state: dict[str, torch.Tensor], out: str | Path, metadata: dict, *,
                overwrite: bool = False) -> Path:
    """Write a canonical state dict with `source`'s names, config and tokenizer as an HF folder, atomically."""
    with writing(out), staging(out, overwrite=overwrite) as tmp:
        save_file({source.names[n]: t for n, t in state.items()}, tmp / "model.safetensors", {"format": "pt"})
        source.config.save(tmp)
        copy_tokenizer(source.ref, tmp)
        meta = {"task": source.task, "seed": source.ref.metadata().get("seed"),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **metadata}
        (tmp / METADATA).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out)


def permute_checkpoint(spec: str, out: str | Path, *, kinds: tuple[str, ...] = KINDS, seed: int = 0,
                       overwrite: bool = False) -> Path:
    """Write a randomly permuted copy of a checkpoint: the same function, another point in weight space
    (so the straight line between a model and its permuted copy crosses a loss barrier)."""
    source = open_checkpoint(spec)
    if source.ref.is_adapter:
        raise MergeLabError(f"model {spec!r} is an adapter module (LoRA, (IA)3); permute full checkpoints",
                            param="model")
    if not supports(source.config.model_type):  # decoders are permuted here, before they can be aligned
        require(source.config.model_type, "alignment", spec)
    perm = random_permutation(source.config, seed=seed, kinds=kinds)
    return write_permuted(source, perm, out, {"kind": "permuted", "permuted_from": source.ref.spec,
                                              "permutation": {"kinds": list(kinds), "seed": seed}},
                          overwrite=overwrite)
