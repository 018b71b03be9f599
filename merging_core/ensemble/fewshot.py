"""Few-shot tuning of an adapter module on a target task (Lv et al. 2023, Sec. 3: the weighted module
initialises few-shot tuning; lr 5e-4, batch 8 in the paper).

The k shots and a disjoint probe set are drawn from the target's train split with a seed (for a token
task such as CoNLL-2003 NER, k sentences, one holding each tag first when k allows); the model is the
base with a fresh head for the target (seeded; a sequence or token head, whatever head the sources were
trained with) and an adapter of the sources' kind and rank, initialised from given module tensors
(module space) or left as PEFT initialises it (a fresh module: LoRA's B = 0, (IA)³'s l = 1, a prefix's fixed
start). A prefix is tuned as the prefix itself (P × 2·L·H, no reparametrization MLP), the tensor its file
holds. Scores come from the target's dev split (span F1 for NER).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import settings
from ..encode import Encoded, encode
from ..errors import MergeLabError
from ..evaluation import Evaluator
from ..models import ModelRef, adapter_base, load, load_tokenizer, peft_file_name
from ..tasks import TaskSpec
from ..losses import task_loss
from ..training import TrainConfig, wrap_peft
from .modules import PREFIX, Module

PROBE = 64  # held-out train examples the similarity measures score on


@dataclass
class Shots:
    """A target's k-shot training examples and probe examples (disjoint), as padded batches on the device."""

    spec: TaskSpec
    seed: int
    train: Encoded
    probe: Encoded
    pad_id: int
    device: torch.device

    def batches(self, which: str, size: int) -> list[dict[str, torch.Tensor]]:
        data = self.train if which == "train" else self.probe
        return [{k: v.to(self.device) for k, v in data.batch(torch.arange(i, min(i + size, len(data))),
                                                               self.pad_id).items()}
                for i in range(0, len(data), size)]


def draw_shots(spec: TaskSpec, tokenizer, k: int, seed: int, probe: int = PROBE) -> Shots:
    """`k` seeded train examples of `spec` (every label represented when k allows; for a token task, a
    sentence holding each tag) and `probe` others."""
    if spec.kind not in ("classification", "regression", "token", "rank"):
        raise MergeLabError(f"task {spec.name} is a {spec.kind} task; few-shot ensembling takes classification, "
                            "regression and token (NER) tasks", param="target")
    if k < 1:
        raise MergeLabError(f"shots must be at least 1, got {k}", param="shots")
    data = encode(spec, "train", tokenizer)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen: list[int] = []
    if spec.kind in ("classification", "token", "rank"):  # one of each label first: a 16-shot emotion set sees every class
        if spec.kind == "token":
            tags = {}

            def holds(i: int, label: int) -> bool:
                if i not in tags:
                    tags[i] = set(data.word_tags(i))
                return label in tags[i]
        else:
            labels = data.labels.tolist()

            def holds(i: int, label: int) -> bool:
                return labels[i] == label
        for label in range(min(spec.num_labels, k)):
            hit = next((i for i in order if holds(i, label) and i not in chosen), None)
            if hit is not None:
                chosen.append(hit)
    taken = set(chosen)
    chosen += [i for i in order if i not in taken][: k - len(chosen)]
    taken = set(chosen)
    rest = [i for i in order if i not in taken][:probe]
    return Shots(spec, seed, data.subset(torch.tensor(chosen)), data.subset(torch.tensor(rest)),
                 tokenizer.pad_token_id or 0, settings.device())


def live_tensors(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """A live adapter model's parameters by the file key they are saved under (heads included): PEFT's names
    for LoRA and (IA)³; a prefix model's prefix (its flat embedding) as `prompt_embeddings`."""
    out = {}
    for name, param in model.named_parameters():
        if name.startswith("prompt_encoder.") and name.endswith(".embedding.weight"):
            out[PREFIX] = param  # `adapter_model` builds prefixes flat: the embedding is the saved prefix
        elif not name.startswith("prompt_encoder.") and (key := peft_file_name(name)) is not None:
            out[key] = param
    return out


def adapter_model(template: Module, spec: TaskSpec, seed: int, init: dict[str, torch.Tensor] | None = None):
    """The base with a fresh `spec` head (from `seed`) and an adapter shaped like `template`'s, holding
    `init` (module-space tensors by file key) or PEFT's fresh initialisation (a prefix: its fixed start)."""
    torch.manual_seed(seed)
    base = load(adapter_base(template.ref), spec, new_head=True, device="cpu").model
    config = TrainConfig(task=spec.name, peft=template.kind, lora_r=template.config.get("r") or 8,
                         lora_alpha=template.config.get("lora_alpha") or 16,
                         prefix_tokens=template.config.get("num_virtual_tokens") or 20, prefix_projection=False)
    model = wrap_peft(base, spec, config)
    if template.kind == "prefix" and not init:  # the start the template's modules were trained from
        init = {PREFIX: template.start()}
    if init:
        live = live_tensors(model)
        with torch.no_grad():
            for key, tensor in init.items():
                if key not in live:
                    raise MergeLabError(f"module tensor {key} has no place in a {template.kind} adapter of this base")
                live[key].copy_(tensor)
    return model.to(settings.device())


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def tune(model: torch.nn.Module, shots: Shots, *, steps: int, lr: float = 5e-4, batch_size: int = 8,
         params: list[torch.nn.Parameter] | None = None) -> list[float]:
    """`steps` AdamW steps on the shots (reshuffled every epoch, seeded); returns the losses."""
    params = params if params is not None else trainable(model)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(shots.seed)
    model.train()
    losses = []
    step = 0
    while step < steps:
        order = torch.randperm(len(shots.train), generator=generator)
        for i in range(0, len(order), batch_size):
            batch = {k: v.to(shots.device) for k, v in shots.train.batch(order[i: i + batch_size], shots.pad_id).items()}
            loss = task_loss(model, batch, shots.spec)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            if step >= steps:
                break
    model.eval()
    return losses


def few_shot_score(template: Module, shots: Shots, init: dict[str, torch.Tensor] | None, *, steps: int,
                   lr: float, evaluator: Evaluator, seed: int) -> dict:
    """Tune an adapter (initialised from `init`, or fresh) on the shots and score it on the target's dev split."""
    model = adapter_model(template, shots.spec, seed, init)
    losses = tune(model, shots, steps=steps, lr=lr)
    result = evaluator(model)
    return {**result, "train_loss_first": losses[0], "train_loss_last": losses[-1]}


def evaluator_for(spec: TaskSpec, ref: ModelRef, limit: int | None) -> Evaluator:
    return Evaluator(spec, load_tokenizer(ref), "dev", limit)
