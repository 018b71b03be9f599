"""Parameter-efficient modules (LoRA, (IA)³, prefix) as plain tensors: read them, combine them, write them.

A module file holds, per adapted layer, LoRA's factors A (r × d_in) and B (d_out × r), whose update is
ΔW = (α / r) B A (Hu et al. 2022, eq. 3), or an (IA)³ vector l that rescales the layer (Liu et al. 2022,
eq. 1: a key / value layer's outputs are multiplied by l, ΔW = (diag(l) − I) W; the feed-forward output
layer's inputs, ΔW = W (diag(l) − I)); plus the task head (PEFT's `modules_to_save`).

A prefix module (Li & Liang 2021, "Prefix-Tuning", arXiv:2101.00190, Sec. 4.2) holds one tensor,
`prompt_embeddings` (P × 2·L·H, as PEFT saves it): for each of its P virtual tokens, the key and the value
vector every one of the L layers' attention sees before the input's (layer l's key at column block 2l, its
value at 2l + 1). That tensor is the module's weight vector; a reparametrization MLP it was trained through
(`prefix_projection`) is not saved, as Li & Liang drop it after training (Sec. 4.3). Per-layer views split it
into each layer's P keys and values (P × 2 × H), named `encoder.layer.<l>.attention.self.prefix`. Its
"update" (`deltas`) is prefix − start, the fixed draw every prefix module MergeLab trains with one
configuration starts from (`models.prefix_start`), so that measures on updates compare what training changed, and slot j of one
module means slot j of another (a prefix's slots carry no position: with independent starts a slot-wise
average would mix unrelated slots).

Modules are combined with weights w (Σ w = 1) in one of two spaces, always labelled:

- **module space**: θ = Σ_j w_j θ_j over the module's own tensors (A, B, l or the prefix), as Lv et al.
  (2023) average adapter parameters; the result is again a module of the same kind and rank (prefix
  length), so it can initialise few-shot tuning. For LoRA this is *not* the average of the updates
  (B̄Ā ≠ mean of B_j A_j); for a prefix it is (start + Σ w_j (prefix_j − start)).
- **weight space**: ΔW = Σ_j w_j ΔW_j, the exact average of the updates (rank up to Σ r_j); the same as
  `merging_core.merge("average", modules, params={"weights": w})` on the folded models. A prefix module
  cannot be folded into weights; its weight-space result is Σ_j w_j (prefix_j − start) per layer.

Heads are left out of both: modules trained on other tasks have other label sets or head kinds (a
sentence classifier's module can start a token tagger's), and a target task gets its own head.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..arch import adapter_for, canonical
from ..checkpoint import open_checkpoint
from ..errors import MergeLabError, writing
from ..models import (
    ADAPTER_FILE,
    METADATA,
    ModelRef,
    adapter_base,
    adapter_kind,
    copy_tokenizer,
    prefix_start,
    read_config,
    resolve,
)
from ..outputs import staging
from ..tensorio import LazyFiles

SPACES = ("module", "weights")
KINDS = ("lora", "ia3", "prefix")
PREFIX = "prompt_embeddings"  # a prefix module's one tensor in its file
_LAYER = re.compile(r"encoder\.layer\.(\d+)\.")


def prefix_layer(layer: int) -> str:
    """The name of layer `layer`'s part of a prefix (its P keys and values), like an adapted layer's name."""
    return f"encoder.layer.{layer}.attention.self.prefix"


@dataclass
class Module:
    """One adapter module: its own tensors by file name, what they are, and what it was trained for."""

    ref: ModelRef
    kind: str  # "lora" | "ia3" | "prefix"
    config: dict  # adapter_config.json
    task: str
    tensors: dict[str, torch.Tensor]  # file key -> tensor (heads included)
    roles: dict[str, tuple[str, int | None, str | None]]  # file key -> (group, layer, factor)

    @property
    def body(self) -> list[str]:
        """The keys of the module's own tensors (LoRA factors, (IA)³ vectors, the prefix), without the head."""
        return [k for k, (group, _, factor) in self.roles.items() if factor is not None]

    @property
    def tokens(self) -> int | None:
        """A prefix module's number of virtual tokens P (None for other kinds)."""
        return self.config.get("num_virtual_tokens") if self.kind == "prefix" else None

    def start(self) -> torch.Tensor:
        """A prefix module's starting prefix (`models.prefix_start`), computed once."""
        if "_start" not in self.__dict__:
            self.__dict__["_start"] = prefix_start(self.config)
        return self.__dict__["_start"]

    def pieces(self, tensors: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        """(adapted layer, tensor) for each of the module's own tensors in `tensors` (file key -> tensor, the
        layout of this module): a LoRA factor or (IA)³ vector whole, a prefix cut into its layers' parts."""
        if self.kind != "prefix":
            return [(self.layer_of(key), tensors[key]) for key in self.body]
        flat = tensors[PREFIX]
        layers = flat.shape[-1] // (2 * self.config["token_dim"])
        parts = flat.reshape(flat.shape[0], 2 * layers, -1)
        return [(prefix_layer(layer), parts[:, 2 * layer: 2 * layer + 2]) for layer in range(layers)]

    @property
    def scale(self) -> float:
        """LoRA's α / r (α / √r with rsLoRA)."""
        r, alpha = self.config["r"], self.config["lora_alpha"]
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    def layer_of(self, key: str) -> str:
        """The adapted layer a tensor belongs to (its canonical weight name)."""
        core = key.removeprefix("base_model.model.")
        core = re.sub(r"\.lora_[AB](\.weight)?$|\.ia3_l$", ".weight", core)
        return canonical(core)


def read_module(spec: str | ModelRef) -> Module:
    """An adapter module's tensors, read from its file."""
    ref = spec if isinstance(spec, ModelRef) else resolve(spec)
    if not ref.is_adapter:
        raise MergeLabError(f"model {ref.spec!r} is not an adapter module (no adapter_config.json)", param="sources",
                            hint="train a LoRA, (IA)3 or prefix module (PEFT training) and name that")
    config = json.loads((ref.path / "adapter_config.json").read_text())
    kind = adapter_kind(ref)
    if kind not in KINDS:
        raise MergeLabError(f"module {ref.spec!r} is a {config.get('peft_type')} module; MergeLab combines LoRA, "
                            "(IA)3 and prefix modules", param="sources")
    reader = LazyFiles([ref.path / ADAPTER_FILE])
    adapter = adapter_for(read_config(ref).model_type)
    roles = {}
    for key in reader.keys():
        if kind == "prefix":  # the prefix, and the head copy (`base_model.classifier.*`)
            roles[key] = ("prefix", None, "prefix") if key == PREFIX else ("head", None, None)
            continue
        info = adapter.describe(key)
        roles[key] = (info.group, info.layer, info.factor)
    if kind == "prefix" and PREFIX not in roles:
        raise MergeLabError(f"prefix module {ref.spec!r} has no {PREFIX} tensor; re-train or re-export it",
                            param="sources")
    return Module(ref, kind, config, ref.metadata().get("task"), {k: reader.get(k) for k in reader.keys()}, roles)


def check_combinable(modules: list[Module]) -> None:
    """Modules combine in module space only when they have one kind, one base and the same tensors."""
    if not modules:
        raise MergeLabError("no modules to combine; pick at least one source module")
    first = modules[0]
    for m in modules[1:]:
        if m.kind != first.kind:
            raise MergeLabError(f"modules {first.ref.spec!r} ({first.kind}) and {m.ref.spec!r} ({m.kind}) are of "
                                "different kinds; combine modules of one kind")
        if adapter_base(m.ref).location != adapter_base(first.ref).location:
            raise MergeLabError(f"modules {first.ref.spec!r} and {m.ref.spec!r} adapt different base models")
        if m.tokens != first.tokens:  # slot j of one prefix has no counterpart in a shorter one
            raise MergeLabError(f"prefix modules {first.ref.spec!r} ({first.tokens} virtual tokens) and {m.ref.spec!r} "
                                f"({m.tokens}) have different prefix lengths; combine prefix modules of one length",
                                param="sources")
        shapes = {k: tuple(m.tensors[k].shape) for k in m.body}
        if shapes != {k: tuple(first.tensors[k].shape) for k in first.body}:
            raise MergeLabError(f"modules {first.ref.spec!r} and {m.ref.spec!r} adapt different layers or ranks")


def _normalised(weights: list[float] | torch.Tensor, n: int) -> list[float]:
    w = [float(x) for x in weights]
    if len(w) != n:
        raise MergeLabError(f"{len(w)} weights for {n} modules; give one per module")
    if any(x < 0 or not math.isfinite(x) for x in w) or not 0 < sum(w) < math.inf:
        raise MergeLabError(f"module weights must be finite, non-negative and not all zero, got {w}")
    total = sum(w)
    return [x / total for x in w]


def combine(modules: list[Module], weights: list[float] | torch.Tensor | dict[str, list[float]],
            space: str = "module") -> dict[str, torch.Tensor]:
    """Σ_j w_j (module tensors) in module space, or Σ_j w_j ΔW_j (canonical layer name -> update) in weight
    space. `weights` may be one list for the whole module or a dict {layer name: list} (per-layer weights)."""
    if space not in SPACES:
        raise MergeLabError(f"space must be one of {list(SPACES)}, got {space!r}")
    check_combinable(modules)
    first = modules[0]

    def w_for(layer: str) -> list[float]:
        raw = weights.get(layer) if isinstance(weights, dict) else weights
        if raw is None:
            raise MergeLabError(f"no weights for layer {layer}")
        return _normalised(raw, len(modules))

    out: dict[str, torch.Tensor] = {}
    if space == "module" and first.kind == "prefix":  # one tensor, weighted layer by layer
        for key in first.body:
            total = torch.empty_like(first.tensors[key], dtype=torch.float32)
            parts = [m.pieces({key: m.tensors[key].float()}) for m in modules]
            for i, (layer, into) in enumerate(first.pieces({key: total})):  # views of `total`
                w = w_for(layer)
                piece = parts[0][i][1] * w[0]  # exact for a single module with weight 1
                for m_parts, c in zip(parts[1:], w[1:]):
                    piece = piece + c * m_parts[i][1]
                into.copy_(piece)
            out[key] = total.to(first.tensors[key].dtype)
        return out
    if space == "module":
        for key in first.body:
            w = w_for(first.layer_of(key))
            total = modules[0].tensors[key].float() * w[0]  # exact for a single module with weight 1
            for m, c in zip(modules[1:], w[1:]):
                total = total + c * m.tensors[key].float()
            out[key] = total.to(first.tensors[key].dtype)
        return out
    for layer, deltas in zip(*_layers_and_deltas(modules)):
        w = w_for(layer)
        out[layer] = sum(c * d for c, d in zip(w, deltas))
    return out


def _layers_and_deltas(modules: list[Module]) -> tuple[list[str], list[list[torch.Tensor]]]:
    per_module = [deltas(m) for m in modules]
    layers = list(per_module[0])
    return layers, [[d[layer] for d in per_module] for layer in layers]


def deltas(module: Module, base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The update ΔW of every adapted layer (canonical weight name -> tensor): LoRA's (α/r) B A; for
    (IA)³, (diag(l) − I) W or W (diag(l) − I), which needs the base weights (read when not given); for a
    prefix, each layer's part of prefix − start (P × 2 × H: keys and values)."""
    out: dict[str, torch.Tensor] = {}
    if module.kind == "prefix":  # what training changed: prefix − its fixed start, layer by layer
        moved = {key: module.tensors[key].float() - module.start() for key in module.body}
        return {layer: piece.clone() for layer, piece in module.pieces(moved)}
    if module.kind == "lora":
        for key in module.body:
            if module.roles[key][2] != "A":
                continue
            b_key = key.replace("lora_A", "lora_B")
            out[module.layer_of(key)] = module.scale * (module.tensors[b_key].float() @ module.tensors[key].float())
        return out
    if base is None:
        ckpt = open_checkpoint(adapter_base(module.ref))
        base = {layer: ckpt.get(layer) for layer in map(module.layer_of, module.body)}
    feedforward = re.compile(module.config.get("feedforward_modules") or r"$^")
    for key in module.body:
        layer = module.layer_of(key)
        scale = module.tensors[key].float().flatten() - 1.0
        weight = base[layer].float()
        core = layer.removesuffix(".weight")
        on_inputs = bool(feedforward.fullmatch(core)) or bool(feedforward.fullmatch("bert." + core))
        out[layer] = weight * scale[None, :] if on_inputs else scale[:, None] * weight
    return out


def layer_groups(layers: list[str], granularity: str, blocks: int = 2) -> dict[str, str]:
    """layer name -> the group whose weights it takes: one group ("model"), one per transformer layer
    ("layer"), or `blocks` contiguous groups of transformer layers ("block")."""
    if granularity == "model":
        return dict.fromkeys(layers, "model")
    numbers = {name: int(m.group(1)) if (m := _LAYER.search(name)) else -1 for name in layers}
    if granularity == "layer":
        return {name: f"layer {n}" for name, n in numbers.items()}
    if granularity == "block":
        top = max(numbers.values()) + 1
        size = max(1, math.ceil(top / blocks))
        return {name: f"block {max(n, 0) // size}" for name, n in numbers.items()}
    raise MergeLabError(f"granularity must be model, layer or block, got {granularity!r}")


def write_module(template: Module, tensors: dict[str, torch.Tensor], out: str | Path, *, task: str,
                 metadata: dict, overwrite: bool = False) -> Path:
    """Write combined module tensors (module space) as an adapter folder loadable by PEFT and MergeLab,
    for `task` (the head is left to the task: a fresh one for a new task)."""
    with writing(out), staging(out, overwrite=overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / ADAPTER_FILE)
        (tmp / "adapter_config.json").write_text(json.dumps(template.config, indent=2) + "\n")
        copy_tokenizer(template.ref, tmp)
        base = template.ref.metadata()
        meta = {"kind": template.kind, "task": task, "base": base.get("base"), "base_location": base.get("base_location"),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **metadata}
        (tmp / METADATA).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out)
