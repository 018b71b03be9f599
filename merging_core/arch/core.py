"""What every architecture adapter is made of: `ParamInfo`, `Adapter`, the component groups, and how PEFT
names map back to the base-model parameter they adapt.

An adapter is a table of rules (a regex on the parameter name without the task wrapper's prefix ->
group, role), so it works on state dicts read lazily from safetensors, without building the model.
The families themselves live beside this module (`bert`, `t5`, `decoders`, `generic`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from torch import nn

from ..errors import MergeLabError

# The groups a merge can select (`components`). `lm_head` is the vocabulary projection of a causal or
# seq2seq language model (GPT-2, Llama, T5): kept apart from `mlm_head` (BERT's masked-LM head, with its
# transform and LayerNorm) because the two are different tasks, so selecting one never moves the other.
# `other` only ever holds tensors of a family without an adapter that no name pattern recognised.
GROUPS = ("embeddings", "attention", "feed_forward", "layer_norm", "pooler", "head", "mlm_head", "lm_head", "other")

# What MergeLab can do with a family (`Adapter.features`, checked with `arch.require`): data-free merges,
# component selection, statistics (Fisher, Gram, K-FAC), scoring on tasks, permutation alignment,
# fine-tuning and public-mode uploads. Only the BERT family has them all so far: each of the last five
# reads a family's module layout or its inputs (token type ids, an MLM head module), not just names.
# Statistics and scoring run a model's own forward with generic hooks, so the encoders and decoders whose
# inputs and heads MergeLab handles have those two as well (`SCORED`). Training runs the same forward with
# PEFT's own target modules per model type, so GPT-2, the Llama layout and T5 train too.
FEATURES = ("merge", "components", "statistics", "scoring", "alignment", "training", "uploads")
DATA_FREE = ("merge", "components")
SCORED = DATA_FREE + ("statistics", "scoring")


@dataclass(frozen=True)
class ParamInfo:
    name: str  # the full name as it appears in the state dict
    group: str  # one of GROUPS, or "buffer" for non-trainable entries such as position ids
    role: str  # finer: word, query, key, value, attn_out, ff_in, ff_out, ln_attn, classifier, ...
    layer: int | None  # transformer layer index, None outside the layer stack
    factor: str | None = None  # an adapter's own tensor: "A" / "B" (LoRA factors), "ia3" ((IA)³ scaling vector),
    # "down" / "up" (a bottleneck adapter's projections, see `bottleneck`)
    stack: str | None = None  # "encoder" / "decoder" in an encoder-decoder model (T5); None in one-stack models
    transposed: bool = False  # a layer weight stored (in, out), the transpose of `nn.Linear`'s (out, in):
    # transformers' `Conv1D` (GPT-2). Per-tensor merges ignore it; methods that multiply a weight by its
    # layer's input Gram (RegMean, MaTS) turn it to (out, in) first.

    @property
    def block(self) -> tuple[str | None, int | None]:
        """The transformer block the parameter belongs to: (stack, layer). Layer indices restart at 0 in a
        T5 decoder, so anything that gathers parameters per layer keys on this, not on `layer` alone."""
        return self.stack, self.layer


@dataclass(frozen=True)
class Adapter:
    """One model family: its config `model_type`s, the task wrappers' prefixes, and name -> group, role rules."""

    family: str
    model_types: tuple[str, ...]
    prefixes: tuple[str, ...]
    rules: tuple[tuple[str, str, str], ...]  # (regex on the stripped name, group, role); `(?P<layer>)` and
    # `(?P<stack>)` groups in the regex fill `ParamInfo.layer` and `.stack`
    mlm_head_attr: str | None = None  # attribute of the *ForMaskedLM model holding the vocabulary projection
    features: tuple[str, ...] = DATA_FREE
    transposed_roles: tuple[str, ...] = ()  # roles whose weights are stored (in, out) (`ParamInfo.transposed`)
    last_token_head: bool = False  # the sequence head reads the last non-padding token (GPT-2, Llama), which
    # transformers finds through `config.pad_token_id`; else the first token or a pooler (BERT)

    @property
    def generic(self) -> bool:
        """True for the fallback of families without an adapter (groups guessed from names)."""
        return False

    def canonical(self, name: str) -> str:
        """A parameter's name without the task wrapper's prefix (`bert.encoder...` -> `encoder...`), so a
        classifier, a token tagger and the bare encoder of one family name their shared tensors alike."""
        for prefix in self.prefixes:
            if name.startswith(prefix):
                return name[len(prefix):]
        return name

    def describe(self, name: str) -> ParamInfo:
        core, factor = strip_peft(name)
        core = self.canonical(core)
        for pattern, group, role in self._compiled:
            match = pattern.fullmatch(core)
            if match:
                found = match.groupdict()
                layer = found.get("layer")
                # an adapter's own factors (LoRA, (IA)³) are nn.Linear-shaped or vectors whatever the layer
                transposed = role in self.transposed_roles and factor is None and core.endswith(".weight")
                return ParamInfo(name, group, role, int(layer) if layer is not None else None, factor,
                                 found.get("stack"), transposed)
        raise MergeLabError(f"parameter {name!r} is not known to the {self.family} adapter; "
                            "MergeLab cannot tell which component it belongs to")

    @cached_property
    def _compiled(self) -> list[tuple[re.Pattern, str, str]]:
        return [(re.compile(pattern), group, role) for pattern, group, role in self.rules]

    def mlm_head(self, model: nn.Module) -> nn.Module:
        if self.mlm_head_attr is None:
            raise MergeLabError(f"MergeLab cannot score masked-LM heads of {self.family} models yet")
        return getattr(model, self.mlm_head_attr)


# PEFT wrappers: `query.lora_A.<adapter>.weight` (a live model) or `query.lora_A.weight` (a saved module
# file), `query.base_layer.weight`, `classifier.modules_to_save.<adapter>.weight`, `classifier.original_module.weight`.
_PEFT_WRAPPERS = re.compile(
    r"\.lora_[AB](?:\.[^.]+)?(?=\.(?:weight|bias)$)|\.modules_to_save\.[^.]+(?=\.(?:weight|bias)$)"
    r"|\.(?:original_module|base_layer)(?=\.)"
)


# (IA)³: `key.ia3_l.<adapter>` (live) or `key.ia3_l` (file), a vector scaling the layer `key`.
_IA3 = re.compile(r"\.ia3_l(?:\.[^.]+)?$")
# Bottleneck adapters (`bottleneck`): `attention.output.bottleneck.down.weight` follows `attention.output.dense`.
_BOTTLENECK = re.compile(r"\.bottleneck\.(down|up)\.(weight|bias)$")


def strip_peft(name: str) -> tuple[str, str | None]:
    """The name of the base-model parameter behind a PEFT name, and the adapter factor ("A"/"B" for LoRA,
    "ia3" for an (IA)³ vector) if any."""
    core = name.removeprefix("base_model.model.")
    if _IA3.search(core):
        return _IA3.sub(".weight", core), "ia3"
    bottleneck = _BOTTLENECK.search(core)
    if bottleneck:
        return _BOTTLENECK.sub(r".dense.\2", core), bottleneck.group(1)
    lora = re.search(r"\.lora_([AB])\.", name)
    return _PEFT_WRAPPERS.sub("", core), lora.group(1) if lora else None


WB = r"\.(?:weight|bias)"  # a module's weight or bias
