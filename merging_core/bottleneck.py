"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP",
arXiv:1902.00751, Sec. 2.1 and Fig. 2): a MergeLab-native module kind beside LoRA, (IA)³ and prefixes.

Each adapter is a small residual MLP, h ↦ h + W_up · f(W_down · h + b_down) + b_up, with a bottleneck of
`size` units (m ≪ d). Two are inserted in every transformer layer, as in the paper's Fig. 2: after the
attention block's output projection and after the feed-forward block's output projection, each before
the dropout, the skip connection and the layer norm of its sub-layer. Training updates the adapters, the
layer norms of every layer ("we also train the layer normalization parameters", Sec. 2.1) and the task
head; the pretrained weights stay frozen.

**Initialisation.** The paper starts the adapters near the identity (weights from a zero-mean Gaussian
with standard deviation 1e-2, truncated at two standard deviations). Here the down-projection is drawn
that way and the up-projection starts at exactly zero (as LoRA's second factor does), so a fresh adapter
computes the base model's function exactly and the gradient still reaches both projections after the
first step.

**Why native.** The AdapterHub `adapters` package pins transformers 4.x (MergeLab runs on 5.x), and PEFT
has no bottleneck-adapter tuner. The module is therefore inserted here: `bottleneck` submodules named
`encoder.layer.<i>.attention.output.bottleneck.{down,up}` and `encoder.layer.<i>.output.bottleneck.{down,up}`
run by a forward hook on the sub-layer's output projection, so every pretrained parameter keeps its
name and loads from the base checkpoint unchanged. A module is saved as PEFT modules are (see
`models.write_into`): `adapter_config.json` (`peft_type` "BOTTLENECK") and `adapter_model.safetensors`
holding only the tuned tensors (adapters, layer norms, head) under PEFT's `base_model.model.` prefix,
beside `mergelab.json` naming the base.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .arch import adapter_for
from .errors import MergeLabError

KIND = "bottleneck"  # TrainConfig.peft and the `kind` recorded in mergelab.json
PEFT_TYPE = "BOTTLENECK"  # adapter_config.json's peft_type (read by `models.adapter_kind`)
FILE_PREFIX = "base_model.model."  # tensor names in the module file, as PEFT writes them
INIT_STD = 1e-2  # Houlsby et al. Sec. 3.6: near-identity initialisation
NONLINEARITIES = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}
MAX_SIZE = 4096
# The sub-layers an adapter follows, by canonical module name: the attention output and the feed-forward
# output of every layer. Each has a `dense` output projection and a `LayerNorm`.
_SITE = re.compile(r"encoder\.layer\.(\d+)\.(?:attention\.output|output)")


@dataclass(frozen=True)
class BottleneckConfig:
    """The settings of one bottleneck module (what adapter_config.json records besides its type)."""

    size: int = 64  # bottleneck units m per adapter
    nonlinearity: str = "gelu"

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or not 1 <= self.size <= MAX_SIZE:
            raise MergeLabError(f"bottleneck size must be a whole number from 1 to {MAX_SIZE}, got {self.size!r}",
                                param="bottleneck_size")
        if self.nonlinearity not in NONLINEARITIES:
            raise MergeLabError(f"bottleneck nonlinearity {self.nonlinearity!r} is not known; use one of: "
                                f"{', '.join(NONLINEARITIES)}", param="nonlinearity")

    def to_json(self, task_type: str, base: str) -> dict:
        """The module's adapter_config.json."""
        return {"peft_type": PEFT_TYPE, "bottleneck_size": self.size, "nonlinearity": self.nonlinearity,
                "sites": ["attention.output", "output"], "layer_norms": True, "task_type": task_type,
                "base_model_name_or_path": base, "format": "mergelab-bottleneck-1"}

    @classmethod
    def from_json(cls, config: dict) -> BottleneckConfig:
        if config.get("peft_type") != PEFT_TYPE:
            raise MergeLabError(f"adapter_config.json is of kind {config.get('peft_type')!r}, not a bottleneck module")
        return cls(size=config.get("bottleneck_size"), nonlinearity=config.get("nonlinearity"))


class Bottleneck(nn.Module):
    """One adapter: h + up(f(down(h))), starting as the identity (up = 0)."""

    def __init__(self, hidden: int, config: BottleneckConfig):
        super().__init__()
        self.down = nn.Linear(hidden, config.size)
        self.act = NONLINEARITIES[config.nonlinearity]()
        self.up = nn.Linear(config.size, hidden)
        with torch.no_grad():
            nn.init.trunc_normal_(self.down.weight, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(self.act(self.down(hidden)))

    def after(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on the sub-layer's output projection: its output goes through the adapter. A bound
        method, so that `copy.deepcopy` of the model hooks the copy's own adapter."""
        return self(output)


def _sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    canonical = adapter_for(model.config.model_type).canonical
    found = [(name, module) for name, module in model.named_modules()
             if _SITE.fullmatch(canonical(name)) and isinstance(getattr(module, "dense", None), nn.Linear)]
    if not found:
        raise MergeLabError(f"{type(model).__name__} has no transformer layers with attention and feed-forward "
                            "output projections; bottleneck modules fit BERT-family encoders", param="peft")
    return found


def insert(model: nn.Module, config: BottleneckConfig) -> nn.Module:
    """Insert fresh adapters into `model` (in place; the caller's torch seed draws the down-projections)
    and leave trainable only the adapters, the layers' layer norms and the task head. Returns `model`."""
    if is_adapted(model):
        raise MergeLabError("this model already has bottleneck adapters", param="peft")
    for _, site in _sites(model):
        site.bottleneck = Bottleneck(site.dense.out_features, config).to(site.dense.weight.device)
        site.dense.register_forward_hook(site.bottleneck.after)
    model.mergelab_bottleneck = config
    tuned = set(tuned_names(model))
    for name, param in model.named_parameters():
        param.requires_grad = name in tuned
    return model


def is_adapted(model: nn.Module) -> bool:
    """Whether `model` carries bottleneck adapters (inserted by `insert`)."""
    return isinstance(getattr(model, "mergelab_bottleneck", None), BottleneckConfig)


def config_of(model: nn.Module) -> BottleneckConfig:
    if not is_adapted(model):
        raise MergeLabError("the model has no bottleneck adapters")
    return model.mergelab_bottleneck


def tuned_names(model: nn.Module) -> list[str]:
    """The live names of what a bottleneck module tunes: the adapters, the layer norms of the adapted
    sub-layers and the task head (in `named_parameters` order)."""
    adapter = adapter_for(model.config.model_type)
    sites = {name for name, _ in _sites(model)}
    out = []
    for name, _ in model.named_parameters():
        owner = name.rsplit(".", 2)[0]  # `...attention.output` for `...attention.output.LayerNorm.weight`
        if (".bottleneck." in name or (owner in sites and ".LayerNorm." in name)
                or adapter.describe(name).group == "head"):
            out.append(name)
    return out


def module_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The module file's tensors: the tuned parameters, named as in the file (PEFT's prefix)."""
    params = dict(model.named_parameters())
    return {FILE_PREFIX + name: params[name].detach().cpu().contiguous() for name in tuned_names(model)}


def load_state(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> nn.Module:
    """Copy a module file's tensors into an adapted model; every tuned parameter must be in the file and
    every tensor of the file must have a place of the same shape (`where` names the module in messages)."""
    params = dict(model.named_parameters())
    wanted = set(tuned_names(model))
    found = {name.removeprefix(FILE_PREFIX): tensor for name, tensor in tensors.items()}
    missing, unknown = sorted(wanted - set(found)), sorted(set(found) - wanted)
    if missing or unknown:
        what = f"lacks {missing[0]}" if missing else f"has {unknown[0]}, which the model has no place for"
        raise MergeLabError(f"bottleneck module {where} does not fit its base: its file {what} "
                            f"({len(missing) + len(unknown)} mismatch(es)); re-train it on this base")
    with torch.no_grad():
        for name, tensor in found.items():
            if params[name].shape != tensor.shape:
                raise MergeLabError(f"bottleneck module {where}: {name} has shape {list(tensor.shape)} but the "
                                    f"model's is {list(params[name].shape)}; its adapter_config.json does not "
                                    "match its file")
            params[name].copy_(tensor.to(params[name]))
    return model
