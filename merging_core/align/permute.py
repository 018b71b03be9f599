"""Function-preserving permutations of a BERT-family checkpoint (Verma & Elbayad 2024; algorithms.md A6).

A transformer computes the same function after any consistent relabelling of its hidden units:

- **feed-forward** neurons of layer l, P (intermediate size): W1 ← P W1, b1 ← P b1, W2 ← W2 Pᵀ
  (rows of `intermediate.dense`, columns of `output.dense`);
- **attention heads** of layer l, a head order plus, inside every head, one order of the dimensions
  shared by Q and K (so every score qᵀk is unchanged) and one shared by V and the columns of W_O
  (so every head's output is unchanged): rows of Q, K, V (and biases), columns of `attention.output.dense`;
- **residual stream**, one P_res for the whole model: the hidden columns of the word, position and
  token-type embeddings, every LayerNorm's γ and β, the rows (and bias) of every residual writer
  (`attention.output.dense`, `output.dense`), the columns of every reader (Q, K, V, `intermediate.dense`,
  the pooler, a token classifier, the MLM transform). The MLM transform's output is permuted too, because
  the decoder is tied to the (column-permuted) word embeddings. LayerNorm statistics do not depend on
  the order of the units, so the whole model is invariant.

Tensors are canonical state dicts (`merging_core.stats.canonical` names) with their arch roles.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..arch import adapter_for
from ..errors import MergeLabError

KINDS = ("ff", "heads", "residual")

# Roles whose input (columns, dim 1) is the residual stream, and whose output (rows) is.
READS_RESIDUAL = ("query", "key", "value", "ff_in", "pooler", "mlm_transform", "mlm_decoder")
WRITES_RESIDUAL = ("attn_out", "ff_out", "mlm_transform")
EMBEDDINGS = ("word", "position", "token_type")
LAYER_NORMS = ("ln_embeddings", "ln_attn", "ln_ff", "mlm_layer_norm")


@dataclass
class Permutation:
    """Index orders (new position i takes old unit order[i]); missing entries mean identity."""

    residual: torch.Tensor | None = None  # (hidden,)
    ff: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (intermediate,)
    heads: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (num_heads,)
    qk: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (num_heads, head_dim), per new head
    vo: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (num_heads, head_dim), per new head

    def attention_rows(self, layer: int, num_heads: int, head_dim: int, which: str) -> torch.Tensor | None:
        """The row order of Q/K (`which`="qk") or V and W_O's columns ("vo") in one layer."""
        heads = self.heads.get(layer)
        inner = (self.qk if which == "qk" else self.vo).get(layer)
        if heads is None and inner is None:
            return None
        heads = heads if heads is not None else torch.arange(num_heads)
        inner = inner if inner is not None else torch.arange(head_dim).expand(num_heads, head_dim)
        return (heads[:, None] * head_dim + inner).reshape(-1)


def permute_state(state: dict[str, torch.Tensor], perm: Permutation, *, num_heads: int, model_type: str = "bert",
                  token_head: bool = False) -> dict[str, torch.Tensor]:
    """A permuted copy of a canonical state dict (see the module doc). `token_head`: the classifier reads
    the hidden states (token classification) rather than the pooled output."""
    adapter = adapter_for(model_type)
    out = {}
    for name, tensor in state.items():
        info = adapter.describe(name)
        t = tensor
        if info.group == "buffer" or not t.is_floating_point():
            out[name] = t
            continue
        is_weight = name.endswith("weight")
        layer = info.layer
        # the layer's own units: rows of producers, columns of consumers
        if info.role == "ff_in" and layer in perm.ff:
            t = t[perm.ff[layer]]
        elif info.role == "ff_out" and layer in perm.ff and is_weight:
            t = t[:, perm.ff[layer]]
        elif info.role in ("query", "key", "value", "attn_out") and layer is not None:
            head_dim = (t.shape[0] if info.role != "attn_out" else t.shape[-1]) // num_heads
            rows = perm.attention_rows(layer, num_heads, head_dim, "qk" if info.role in ("query", "key") else "vo")
            if rows is not None:
                if info.role != "attn_out":
                    t = t[rows]
                elif is_weight:
                    t = t[:, rows]
        # the residual stream
        r = perm.residual
        if r is not None:
            if info.role in EMBEDDINGS or (info.role in LAYER_NORMS):
                t = t[..., r]
            else:
                if info.role in WRITES_RESIDUAL:
                    t = t[r]
                reads = info.role in READS_RESIDUAL or (info.role == "classifier" and token_head)
                if reads and is_weight:
                    t = t[:, r]
        out[name] = t.contiguous()
    return out


def random_permutation(config, *, seed: int = 0, kinds: tuple[str, ...] = ("ff", "heads", "residual")) -> Permutation:
    """A random function-preserving permutation of a model with this config (`kinds` ⊆ ff, heads, residual)."""
    if not kinds or set(kinds) - set(KINDS):
        raise MergeLabError(f"permutation kinds must be a non-empty subset of {list(KINDS)}, got {list(kinds)}")
    generator = torch.Generator().manual_seed(seed)
    heads, hidden = config.num_attention_heads, config.hidden_size
    head_dim = hidden // heads
    perm = Permutation()
    for layer in range(config.num_hidden_layers):
        if "ff" in kinds:
            perm.ff[layer] = torch.randperm(config.intermediate_size, generator=generator)
        if "heads" in kinds:
            perm.heads[layer] = torch.randperm(heads, generator=generator)
            perm.qk[layer] = torch.stack([torch.randperm(head_dim, generator=generator) for _ in range(heads)])
            perm.vo[layer] = torch.stack([torch.randperm(head_dim, generator=generator) for _ in range(heads)])
    if "residual" in kinds:
        perm.residual = torch.randperm(hidden, generator=generator)
    return perm


def permute_checkpoint(spec: str, out: str | Path, *, kinds: tuple[str, ...] = ("ff", "heads", "residual"),
                       seed: int = 0, overwrite: bool = False) -> Path:
    """Write a randomly permuted copy of a checkpoint: the same function, another point in weight space
    (so the straight line between a model and its permuted copy crosses a loss barrier)."""
    from ..merge import open_checkpoint  # the engine's lazy reader (canonical names)
    from ..models import METADATA, copy_tokenizer, staging

    source = open_checkpoint(spec)
    if source.ref.is_lora:
        raise MergeLabError(f"model {spec!r} is a LoRA module; permute full checkpoints")
    config = source.config
    perm = random_permutation(config, seed=seed, kinds=kinds)
    state = permute_state({n: source.get(n) for n in source.names}, perm, num_heads=config.num_attention_heads,
                          model_type=config.model_type, token_head=source.head.kind == "token")
    with staging(out, overwrite=overwrite) as tmp:
        save_file({source.names[n]: t for n, t in state.items()}, tmp / "model.safetensors", {"format": "pt"})
        config.save(tmp)
        copy_tokenizer(source.ref, tmp)
        metadata = {"kind": "permuted", "task": source.task, "permuted_from": source.ref.spec,
                    "permutation": {"kinds": list(kinds), "seed": seed}, "seed": source.ref.metadata().get("seed"),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
    return Path(out)
