"""Architecture adapters: which component every parameter of a checkpoint belongs to.

Merging methods select parameters by group (embeddings, attention, feed-forward, layer norms, pooler,
task head, MLM head) and permutation alignment needs each parameter's role (query, key, ff_in, ...)
and layer. An adapter knows this for one model family from parameter names alone, so it works on
state dicts read lazily from safetensors, without building the model.

Names are matched after stripping wrapper prefixes (`bert.`, `roberta.`, PEFT's `base_model.model.`);
LoRA factors (`lora_A` / `lora_B`), (IA)³ scaling vectors (`ia3_l`), bottleneck adapters
(`bottleneck.down` / `bottleneck.up`, following the output projection they adapt) and PEFT head copies
(`modules_to_save`) map to the group of the layer they adapt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from torch import nn

from .errors import MergeLabError

GROUPS = ("embeddings", "attention", "feed_forward", "layer_norm", "pooler", "head", "mlm_head")


@dataclass(frozen=True)
class ParamInfo:
    name: str  # the full name as it appears in the state dict
    group: str  # one of GROUPS, or "buffer" for non-trainable entries such as position ids
    role: str  # finer: word, query, key, value, attn_out, ff_in, ff_out, ln_attn, classifier, ...
    layer: int | None  # transformer layer index, None outside the layer stack
    factor: str | None = None  # an adapter's own tensor: "A" / "B" (LoRA factors), "ia3" ((IA)³ scaling vector),
    # "down" / "up" (a bottleneck adapter's projections, see `bottleneck`)


@dataclass(frozen=True)
class Adapter:
    family: str
    model_types: tuple[str, ...]
    prefixes: tuple[str, ...]
    rules: tuple[tuple[str, str, str], ...]  # (regex on the stripped name, group, role)
    mlm_head_attr: str  # attribute of the *ForMaskedLM model holding the vocabulary projection

    def canonical(self, name: str) -> str:
        """A parameter's name without the task wrapper's prefix (`bert.encoder...` -> `encoder...`), so a
        classifier, a token tagger and the bare encoder of one family name their shared tensors alike."""
        for prefix in self.prefixes:
            if name.startswith(prefix):
                return name[len(prefix):]
        return name

    def describe(self, name: str) -> ParamInfo:
        core, factor = _strip_peft(name)
        core = self.canonical(core)
        for pattern, group, role in self._compiled:
            match = pattern.fullmatch(core)
            if match:
                layer = match.groupdict().get("layer")
                return ParamInfo(name, group, role, int(layer) if layer is not None else None, factor)
        raise MergeLabError(f"parameter {name!r} is not known to the {self.family} adapter; "
                            "MergeLab cannot tell which component it belongs to")

    @cached_property
    def _compiled(self) -> list[tuple[re.Pattern, str, str]]:
        return [(re.compile(pattern), group, role) for pattern, group, role in self.rules]

    def mlm_head(self, model: nn.Module) -> nn.Module:
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


def _strip_peft(name: str) -> tuple[str, str | None]:
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


_LAYER = r"encoder\.layer\.(?P<layer>\d+)\."
_WB = r"\.(?:weight|bias)"

BERT = Adapter(
    family="bert",
    model_types=("bert", "roberta", "xlm-roberta", "electra"),
    prefixes=("bert.", "roberta.", "electra."),
    mlm_head_attr="cls",
    rules=(
        (r"embeddings\.word_embeddings\.weight", "embeddings", "word"),
        (r"embeddings\.position_embeddings\.weight", "embeddings", "position"),
        (r"embeddings\.token_type_embeddings\.weight", "embeddings", "token_type"),
        (r"embeddings\.LayerNorm" + _WB, "layer_norm", "ln_embeddings"),
        (r"embeddings\.(?:position_ids|token_type_ids)", "buffer", "buffer"),
        (_LAYER + r"attention\.self\.query" + _WB, "attention", "query"),
        (_LAYER + r"attention\.self\.key" + _WB, "attention", "key"),
        (_LAYER + r"attention\.self\.value" + _WB, "attention", "value"),
        (_LAYER + r"attention\.output\.dense" + _WB, "attention", "attn_out"),
        (_LAYER + r"attention\.output\.LayerNorm" + _WB, "layer_norm", "ln_attn"),
        (_LAYER + r"intermediate\.dense" + _WB, "feed_forward", "ff_in"),
        (_LAYER + r"output\.dense" + _WB, "feed_forward", "ff_out"),
        (_LAYER + r"output\.LayerNorm" + _WB, "layer_norm", "ln_ff"),
        (r"pooler\.dense" + _WB, "pooler", "pooler"),
        (r"classifier(?:\.dense|\.out_proj)?" + _WB, "head", "classifier"),
        (r"(?:cls\.predictions\.transform\.dense|lm_head\.dense)" + _WB, "mlm_head", "mlm_transform"),
        (r"(?:cls\.predictions\.transform\.LayerNorm|lm_head\.layer_norm)" + _WB, "mlm_head", "mlm_layer_norm"),
        (r"(?:cls\.predictions|lm_head)\.decoder" + _WB, "mlm_head", "mlm_decoder"),
        (r"(?:cls\.predictions|lm_head)\.bias", "mlm_head", "mlm_bias"),
    ),
)

ADAPTERS = (BERT,)


def adapter_for(model_type: str) -> Adapter:
    """The adapter of a config's `model_type` ("bert", "roberta", ...)."""
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    known = ", ".join(t for a in ADAPTERS for t in a.model_types)
    raise MergeLabError(f"model type {model_type!r} is not supported yet (supported: {known})")


def canonical(name: str, model_type: str = "bert") -> str:
    """`name` in canonical form for its family (see `Adapter.canonical`)."""
    return adapter_for(model_type).canonical(name)


def group_params(names: list[str], model_type: str = "bert") -> dict[str, list[str]]:
    """Parameter names by group, in GROUPS order (buffers left out)."""
    adapter = adapter_for(model_type)
    groups: dict[str, list[str]] = {g: [] for g in GROUPS}
    for name in names:
        info = adapter.describe(name)
        if info.group in groups:
            groups[info.group].append(name)
    return groups
