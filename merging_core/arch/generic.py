"""The fallback for a `model_type` without an adapter: groups guessed from common name patterns.

Data-free merges need only a group per tensor (for `components`) and per-tensor math, so a checkpoint
of any family still merges: every tensor gets the group its name suggests, checked in this order
(the first match wins, so `self_attn_layer_norm` is a norm, not attention):

1. buffers: `position_ids`, `token_type_ids`, `inv_freq`, `masked_bias` (left out of merges, as the
   adapters' buffers are: the model rebuilds them);
2. `lm_head`: a segment `lm_head`, `embed_out` or `output_projection` (GPT-NeoX, OPT, fairseq ports);
3. `mlm_head`: `cls.predictions.*`, `vocab_*` segments;
4. `head`: a segment `classifier`, `score`, `qa_outputs`, `pre_classifier`, `classification_head`,
   or one ending in `head`;
5. `layer_norm`: a segment containing `norm` (LayerNorm, RMSNorm, `*_layer_norm`) or named `ln`, `ln_f`,
   `ln_1`, ...;
6. `embeddings`: a segment containing `embed`, or `wte`, `wpe`, `shared`;
7. `attention`: a segment containing `attn` or `attention`, or a projection named `q_proj`, `query`,
   `query_key_value`, ... ;
8. `feed_forward`: a segment containing `mlp`, `ffn`, `feed_forward` or `intermediate`, or `fc1`,
   `c_fc`, `gate_proj`, `up_proj`, `down_proj`, `wi`, `wo`, `w1`-`w3`;
9. `pooler`: a segment `pooler`;
10. everything else: `other`, merged by the method like any selected group and listed in the merge's
    note, so nothing is skipped silently.

The layer is the first number in the name; `stack` is `encoder` / `decoder` when the name has such a
segment. Roles are all `guessed`: nothing that needs a real role (permutation alignment, statistics)
accepts this adapter. Names are made canonical by stripping one leading `<model_type>.`, `model.` or
`transformer.` segment, which is how most transformers task wrappers nest their base model.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from .core import Adapter, ParamInfo, strip_peft

_BUFFERS = {"position_ids", "token_type_ids", "inv_freq", "masked_bias"}
_LM_HEAD = {"lm_head", "embed_out", "output_projection"}
_HEAD = {"classifier", "score", "qa_outputs", "pre_classifier", "classification_head"}
_ATTENTION = {"q", "k", "v", "o", "q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "query", "key", "value",
              "qkv", "qkv_proj", "query_key_value", "wq", "wk", "wv"}
_FEED_FORWARD = {"fc", "fc1", "fc2", "c_fc", "gate_proj", "up_proj", "down_proj", "gate_up_proj", "wi", "wi_0",
                 "wi_1", "wo", "w1", "w2", "w3", "dense_h_to_4h", "dense_4h_to_h"}
_LN = re.compile(r"ln(?:_\w+|\d+)?|.*norm.*")


def _guess(segments: list[str]) -> str:
    lower = [s.lower() for s in segments]
    if lower[-1] in _BUFFERS:
        return "buffer"
    if any(s in _LM_HEAD for s in lower):
        return "lm_head"
    if "predictions" in lower or any(s.startswith("vocab_") for s in lower):
        return "mlm_head"
    if any(s in _HEAD or s.endswith("head") for s in lower):
        return "head"
    if any(_LN.fullmatch(s) for s in lower):
        return "layer_norm"
    if any("embed" in s or s in ("wte", "wpe", "shared") for s in lower):
        return "embeddings"
    if any("attn" in s or "attention" in s or s in _ATTENTION for s in lower):
        return "attention"
    if any(any(w in s for w in ("mlp", "ffn", "feed_forward", "intermediate")) or s in _FEED_FORWARD
           for s in lower):
        return "feed_forward"
    if "pooler" in lower:
        return "pooler"
    return "other"


@dataclass(frozen=True)
class GenericAdapter(Adapter):
    """An adapter for one unknown `model_type` whose `describe` guesses instead of looking rules up."""

    @property
    def generic(self) -> bool:
        return True

    def describe(self, name: str) -> ParamInfo:
        core, factor = strip_peft(name)
        segments = self.canonical(core).split(".")
        # the parameter's own name (`weight`, `bias`) says nothing about its module
        owner = segments[:-1] if len(segments) > 1 and segments[-1] in ("weight", "bias") else segments
        group = _guess(owner)
        layer = next((int(s) for s in segments if s.isdigit()), None)
        stack = next((s for s in segments if s in ("encoder", "decoder")), None)
        return ParamInfo(name, group, "buffer" if group == "buffer" else "guessed", layer, factor, stack)


@lru_cache(maxsize=64)
def generic_adapter(model_type: str) -> GenericAdapter:
    """The fallback adapter of `model_type` (see the module doc)."""
    own = model_type.replace("-", "_")
    return GenericAdapter(family=f"{model_type} (no adapter: groups guessed from names)", model_types=(model_type,),
                          prefixes=(f"{own}.", "model.", "transformer."), rules=())


def fallback_note(model_type: str, infos: Iterable[ParamInfo]) -> str:
    """The one line a merge of a family without an adapter reports: what was guessed, what is unavailable."""
    infos = list(infos)
    groups = Counter(info.group for info in infos if info.group != "buffer")
    counts = ", ".join(f"{g} {n}" for g, n in sorted(groups.items(), key=lambda kv: -kv[1]))
    other = [info.name for info in infos if info.group == "other"]
    listed = (" (" + ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "") + ")"
              if other else "")
    return (f"model type {model_type!r} has no architecture adapter: merged tensor by tensor with groups guessed "
            f"from parameter names ({counts}); {len(other)} tensor{'s' if len(other) != 1 else ''} in group "
            f"'other'{listed}; "
            "component selection is best-effort; permutation alignment, statistics (data-aware methods), "
            "scoring and fine-tuning are unavailable")
