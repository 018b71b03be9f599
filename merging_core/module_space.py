"""Adapter modules in module space: their own tensors, not the weights they fold into.

A LoRA, (IA)³ or bottleneck module on a base model can be treated two ways. In *weight space* it is
folded into its base (W + BA, diag(l) W) and is then a full checkpoint like any other. In *module space*
only the tensors the module trained move: the LoRA factors, the (IA)³ scaling vectors, the adapters,
the task head. Curves walk either space (Qin et al. 2022 compare both, arXiv:2203.06904, Sec. 4). Merges
take (IA)³ modules in module space too: the methods then merge the scaling vectors themselves, from the
(IA)³ initialisation (every vector 1) as the base of task vectors, which is how MaTS merges (IA)³
models (Tam et al. 2024, arXiv:2312.04339, Sec. 5), and the merged vectors are folded into the base for
the output. LoRA factors are not merged in module space: the product of averaged factors is not the
average of the products.

This module holds what curves and merges share: which space a set of checkpoints can use, a module's
own tensors as a `Checkpoint`, live parameters by their file names, and the (IA)³ fold.
"""

from __future__ import annotations

import json
from dataclasses import replace

import torch

from .arch import adapter_for, canonical
from .checkpoint import Checkpoint
from .errors import MergeLabError
from .models import (ADAPTER_FILE, ModelRef, adapter_base, adapter_kind, head_info, load_adapter, peft_file_name,
                     read_config, weights_fingerprint)
from .tasks import get_task
from .tensorio import InMemory, LazyFiles

SPACES = ("auto", "weights", "module")
# Adapter settings that must agree for two modules to share one module space.
ADAPTER_KEYS = ("peft_type", "r", "lora_alpha", "target_modules", "feedforward_modules", "use_rslora", "use_dora",
                "rank_pattern", "alpha_pattern", "bottleneck_size", "nonlinearity")


def adapter_settings(ref: ModelRef) -> dict:
    config = json.loads((ref.path / "adapter_config.json").read_text())
    return {k: (sorted(config[k]) if isinstance(config.get(k), list) else config.get(k)) for k in ADAPTER_KEYS}


def module_space(refs: list[ModelRef], space: str) -> tuple[bool, str | None]:
    """Whether the checkpoints are used in adapter module space, and a note when `auto` falls back to
    weight space. `space="module"` with checkpoints that cannot share one is a one-line error."""
    if space not in SPACES:
        raise MergeLabError(f"space must be one of {list(SPACES)}, got {space!r}", param="space")
    prefix = next((r.spec for r in refs if adapter_kind(r) == "prefix"), None)
    if prefix:  # a prefix adds keys and values: nothing to fold into weights, and no module-space path here
        raise MergeLabError(f"{prefix!r} is a prefix module, which curves cannot walk (it adds attention keys and "
                            "values, not a weight update); use LoRA or (IA)3 modules, or full checkpoints",
                            param="models")
    if space == "weights":
        return False, None
    adapters = [r.is_adapter for r in refs]
    reason = None
    if not all(adapters):
        reason = "not every checkpoint is an adapter module"
    elif len({weights_fingerprint(adapter_base(r)) for r in refs}) > 1:
        reason = "the adapter modules have different base models"
    elif any(adapter_settings(r) != adapter_settings(refs[0]) for r in refs[1:]):
        reason = "the adapter modules differ in kind, rank, alpha or target modules"
    elif adapter_settings(refs[0])["use_dora"]:
        reason = "DoRA modules are not supported in module space"
    if reason is None:
        return True, None
    if space == "module":
        raise MergeLabError(f"space 'module' needs adapter modules of one kind on one base, but {reason}; "
                            "use space 'weights' (adapters folded into their base)", param="space")
    return False, (f"weight space: {reason} (adapters are folded into their base)" if any(adapters) else None)


def module_checkpoint(ref: ModelRef) -> Checkpoint:
    """An adapter module's own tensors (LoRA factors or (IA)³ vectors, and the head), canonically named,
    lazily read."""
    config = read_config(ref)
    reader = LazyFiles([ref.path / ADAPTER_FILE])
    adapter = adapter_for(config.model_type)
    names, infos = {}, {}
    for key in reader.keys():
        name = canonical(key.removeprefix("base_model.model."), config.model_type)
        names[name], infos[name] = key, adapter.describe(key)
    task = get_task(ref.metadata()["task"]).name
    return Checkpoint(ref, config, head_info(ref, config), task, reader, names, infos)


def module_parameters(model: torch.nn.Module, module_space: bool = True) -> dict[str, torch.nn.Parameter]:
    """A model's parameters by canonical name (in module space: PEFT's live names mapped to the module
    file's names, as `module_checkpoint` names them)."""
    model_type = model.config.model_type
    out = {}
    for name, param in model.named_parameters():
        key = peft_file_name(name) if module_space else name
        if key is not None:
            out[canonical(key.removeprefix("base_model.model."), model_type)] = param
    return out


# ----------------------------------------------------------------------------------------------------
# merging (IA)³ modules in module space


def check_mergeable(refs: list[ModelRef]) -> None:
    """Merges take (IA)³ modules in module space, nothing else (one line saying why and what to do)."""
    module_space(refs, "module")
    kind = adapter_kind(refs[0])
    if kind != "ia3":
        raise MergeLabError(f"space 'module' merges (IA)3 scaling vectors, but the models are {kind} modules: "
                            "averaged LoRA factors do not multiply to the averaged update; use space 'weights' "
                            "(the modules folded into their base)", param="space")


def vectors(checkpoint: Checkpoint) -> Checkpoint:
    """The (IA)³ scaling vectors of a module checkpoint (its head left out: heads are handled per task)."""
    keep = {n for n, info in checkpoint.infos.items() if info.factor == "ia3"}
    return replace(checkpoint, names={n: k for n, k in checkpoint.names.items() if n in keep},
                   infos={n: i for n, i in checkpoint.infos.items() if n in keep})


def initialisation(like: Checkpoint) -> Checkpoint:
    """The (IA)³ initialisation as a checkpoint: every scaling vector 1 (the identity), the base that
    task vectors of (IA)³ modules start from."""
    ones = {like.names[n]: torch.ones(like.meta(n)[1], dtype=like.meta(n)[0]) for n in like.names}
    return Checkpoint(like.ref, like.config, like.head, None, InMemory(ones), dict(like.names), dict(like.infos))


def fold(ref: ModelRef, merged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model with merged (IA)³ vectors folded in, canonically named: the module `ref` loaded live,
    its vectors replaced by `merged`, then folded by PEFT (keys and values scaled by row, feed-forward
    outputs by column)."""
    model = load_adapter(ref)
    live = module_parameters(model)
    with torch.no_grad():
        for name, tensor in merged.items():
            live[name].copy_(tensor.to(live[name]))
    folded = model.merge_and_unload()
    model_type = folded.config.model_type
    return {canonical(k, model_type): v.detach() for k, v in folded.state_dict().items()}
