"""Architecture adapters: which component every parameter of a checkpoint belongs to.

Merging methods select parameters by group (embeddings, attention, feed-forward, layer norms, pooler,
task head, MLM head, LM head) and permutation alignment needs each parameter's role (query, key, ff_in,
...) and layer. An adapter knows this for one model family from parameter names alone, so it works on
state dicts read lazily from safetensors, without building the model.

Families (one adapter each, see their modules for exactly which transformers classes they reproduce):

| adapter      | model types                              | module     |
|--------------|------------------------------------------|------------|
| `BERT`       | bert, roberta, xlm-roberta, electra      | `encoders` |
| `DISTILBERT` | distilbert                               | `encoders` |
| `DEBERTA_V2` | deberta-v2 (DeBERTa v2 and v3)           | `encoders` |
| `T5`         | t5, mt5, umt5 (T5 v1.0, v1.1, Flan-T5)   | `t5`       |
| `GPT2`       | gpt2                                     | `decoders` |
| `LLAMA`      | llama, mistral, qwen2, qwen3, gemma      | `decoders` |

Any other `model_type` gets the generic fallback (`generic`) when the caller asks for it
(`adapter_for(model_type, generic=True)`, as opening a checkpoint for a merge does): groups guessed
from name patterns, unrecognised tensors in the `other` group, and a note saying what is unavailable.

Design choices shared by the families:

- **Groups** (`GROUPS`): BERT's seven, plus `lm_head` (the vocabulary projection of a causal or seq2seq
  LM: GPT-2, Llama, T5), kept apart from `mlm_head` so that selecting a masked-LM head never selects a
  generation head or back, and `other` (only the generic fallback uses it). BERT checkpoints have neither,
  so their merges are unchanged.
- **Roles** are one vocabulary for all families: `word`, `position`, `query`, `key`, `value`,
  `attn_out`, `ff_in`, `ff_out`, `ln_attn`, `ln_ff`, ...; plus `qkv` (GPT-2's fused projection), `ff_gate`
  (the gate of a gated MLP: Llama's `gate_proj`, T5 v1.1's `wi_0`; in the `feed_forward` group, so
  selecting feed-forward selects the whole MLP), `cross_*` (T5's and GPT-2's cross-attention), `ln_final`
  (a stack's last norm) and `lm_decoder`.
- **Stacks**: an encoder-decoder's decoder restarts its layer count at 0, so `ParamInfo.stack` says which
  stack a parameter is in and `ParamInfo.block` = (stack, layer) is the per-layer key (see `t5`).
- **Features** (`Adapter.features`, `require`): data-free merges and component selection work for every
  adapter; statistics and scoring for BERT, DistilBERT, DeBERTa-v2, T5, GPT-2 and the Llama layout
  (`SCORED`); training for BERT, T5, GPT-2 and the Llama layout; alignment for BERT, GPT-2 and the Llama
  layout; uploads for the BERT family only so far.

Names are matched after stripping wrapper prefixes (`bert.`, `roberta.`, PEFT's `base_model.model.`);
LoRA factors (`lora_A` / `lora_B`), (IA)³ scaling vectors (`ia3_l`), bottleneck adapters
(`bottleneck.down` / `bottleneck.up`, following the output projection they adapt) and PEFT head copies
(`modules_to_save`) map to the group of the layer they adapt.
"""

from __future__ import annotations

from ..errors import MergeLabError
from .core import DATA_FREE, FEATURES, GROUPS, SCORED, Adapter, ParamInfo, strip_peft
from .decoders import GPT2, LLAMA
from .encoders import BERT, DEBERTA_V2, DISTILBERT
from .generic import GenericAdapter, fallback_note, generic_adapter
from .t5 import T5

__all__ = ["ADAPTERS", "BERT", "DATA_FREE", "DEBERTA_V2", "DISTILBERT", "FEATURES", "GPT2", "GROUPS", "LLAMA",
           "SCORED", "T5",
           "Adapter", "GenericAdapter", "ParamInfo", "adapter_for", "canonical", "fallback_note", "generic_adapter",
           "group_params", "require", "strip_peft"]

ADAPTERS = (BERT, DISTILBERT, DEBERTA_V2, T5, GPT2, LLAMA)


def adapter_for(model_type: str, *, generic: bool = False) -> Adapter:
    """The adapter of a config's `model_type` ("bert", "roberta", ...). An unknown type is an error, or
    with `generic=True` gets the fallback that guesses groups from names (data-free merges only)."""
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    if generic:
        return generic_adapter(model_type)
    known = ", ".join(t for a in ADAPTERS for t in a.model_types)
    raise MergeLabError(f"model type {model_type!r} is not supported yet (supported: {known})")


def require(model_type: str, feature: str, who: str | None = None) -> None:
    """Fail clearly when MergeLab cannot yet do `feature` (one of FEATURES) with models of `model_type`:
    e.g. statistics of a T5 model. `who` names the model in the message."""
    if feature in adapter_for(model_type, generic=True).features:
        return
    able = ", ".join(t for a in ADAPTERS if feature in a.features for t in a.model_types)
    what = {"merge": "merges", "components": "component selection", "statistics": "statistics (data-aware "
            "methods)", "scoring": "scoring on tasks", "alignment": "permutation alignment", "training":
            "fine-tuning", "uploads": "uploads"}.get(feature, feature)
    raise MergeLabError(f"{f'model {who!r}: ' if who else ''}model type {model_type!r} is not supported yet for "
                        f"{what} (supported: {able}); data-free merges (average, task arithmetic, TIES, DARE, "
                        "SLERP, ...) work for every family")


def canonical(name: str, model_type: str = "bert") -> str:
    """`name` in canonical form for its family (see `Adapter.canonical`)."""
    return adapter_for(model_type, generic=True).canonical(name)


def group_params(names: list[str], model_type: str = "bert", *, generic: bool = False) -> dict[str, list[str]]:
    """Parameter names by group, in GROUPS order (buffers left out)."""
    adapter = adapter_for(model_type, generic=generic)
    groups: dict[str, list[str]] = {g: [] for g in GROUPS}
    for name in names:
        info = adapter.describe(name)
        if info.group in groups:
            groups[info.group].append(name)
    return groups
