"""How similar a source module is to a target task: the measures of Lv et al. (2023, Sec. 3.2;
algorithms.md A8), each signed so that higher means more similar.

The paper's modules are text-to-text, so a source module's outputs are already target outputs. Here
modules trained on other tasks have other label sets, so for the output-based measures the source
module's encoder gets a target head fitted on the k shots (a linear probe, the encoder and the module
frozen), and is scored on the target's probe examples (train examples outside the shots):

- `loss`: −CE (regression: −MSE) on the probe examples;
- `kl`: −mean KL(P_t ‖ Q_j), P_t from a module tuned from scratch on the shots (regression: unit
  Gaussians, ½ (ŷ_t − ŷ_j)²);
- `el2n`: −mean ‖softmax(z) − onehot(y)‖ (regression: −mean |ŷ − y|) (Paul et al. 2021);
- `grand`: −mean over probe batches of ‖∇ L‖ over the module's tensors (Paul et al. 2021);
- `cosine`: mean cos(softmax(z), onehot(y)) (regression: cos(ŷ, y) over the probe examples);
- `weight_cosine`: mean over adapted layers of cos(ΔW_t, ΔW_j), ΔW_t from the module tuned on the shots;
- `euclidean`: −Σ over layers of ‖θ_j − θ_j'‖, θ_j' = the source module after tuning on the shots;
- `performance`: the probe examples' headline metric after that tuning minus before.

`weight_cosine` and `euclidean` also give one score per adapted layer, for per-layer and per-block
weights.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import metrics
from ..models import peft_file_name
from ..tasks import TaskSpec
from ..training import task_loss
from .fewshot import Shots, adapter_model, tune
from .modules import Module, deltas

# Default temperatures: the paper's (0.1 for loss, KL, EL2N, GraNd, Euclidean; 0.001 for weight cosine
# and performance); cosine of outputs and labels lives on the loss's scale.
MEASURES = {"loss": 0.1, "kl": 0.1, "el2n": 0.1, "grand": 0.1, "cosine": 0.1, "weight_cosine": 0.001,
            "euclidean": 0.1, "performance": 0.001}
TUNED = ("kl", "weight_cosine")  # need the module tuned from scratch on the shots
MOVED = ("euclidean", "performance")  # need each source module tuned on the shots
HEAD_STEPS, HEAD_LR = 30, 1e-2


@dataclass
class Scores:
    """One target's similarity to each source: scores[measure][source], per-layer scores, seconds."""

    target: str
    seed: int
    shots: int
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    layers: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # per measure, summed over sources


def _head_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if "modules_to_save" in n]


def _body(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A live adapter model's own tensors by file key (no head)."""
    return {key: p for n, p in model.named_parameters()
            if (key := peft_file_name(n)) is not None and ("lora_" in key or key.endswith("ia3_l"))}


@torch.no_grad()
def _outputs(model: torch.nn.Module, shots: Shots) -> torch.Tensor:
    model.eval()
    return torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).logits.float()
                      for b in shots.batches("probe", 32)])


def _headline(spec: TaskSpec, outputs: torch.Tensor, labels: torch.Tensor) -> float:
    return metrics.sequence_metrics(spec, outputs.cpu().numpy(), labels.cpu().numpy())[spec.main_metric]


def _module_of(template: Module, model: torch.nn.Module) -> Module:
    """The live model's adapter as a Module (for its ΔW)."""
    tensors = {k: v.detach().cpu() for k, v in _body(model).items()}
    return Module(template.ref, template.kind, template.config, template.task, tensors,
                  {k: template.roles[k] for k in tensors})


def _layer_cosines(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    return {layer: float(F.cosine_similarity(a[layer].flatten(), b[layer].flatten(), dim=0)) for layer in a}


def output_scores(spec: TaskSpec, outputs: torch.Tensor, labels: torch.Tensor,
                  reference: torch.Tensor | None) -> dict[str, float]:
    """loss, el2n, cosine (and kl against `reference` outputs) of outputs on labelled examples."""
    if spec.kind == "regression":
        prediction = outputs.squeeze(-1)
        out = {"loss": -float(F.mse_loss(prediction, labels)), "el2n": -float((prediction - labels).abs().mean()),
               "cosine": float(F.cosine_similarity(prediction, labels, dim=0))}
        if reference is not None:
            out["kl"] = -float(0.5 * ((reference.squeeze(-1) - prediction) ** 2).mean())
        return out
    probs = F.softmax(outputs, -1)
    onehot = F.one_hot(labels, outputs.shape[-1]).float()
    out = {"loss": -float(F.cross_entropy(outputs, labels)), "el2n": -float((probs - onehot).norm(dim=-1).mean()),
           "cosine": float(F.cosine_similarity(probs, onehot, dim=-1).mean())}
    if reference is not None:
        out["kl"] = -float(F.kl_div(F.log_softmax(outputs, -1), F.log_softmax(reference, -1), log_target=True,
                                    reduction="batchmean"))
    return out


def measure(sources: list[Module], shots: Shots, *, measures: tuple[str, ...] = tuple(MEASURES), steps: int = 50,
            lr: float = 5e-4, progress: Callable[[float, str], None] | None = None) -> Scores:
    """Every measure in `measures` for every source module against the target of `shots`."""
    spec = shots.spec
    result = Scores(spec.name, shots.seed, len(shots.train))
    for name in measures:
        result.scores[name] = {}
        result.seconds[name] = 0.0
    probe_labels = shots.probe.labels.to(shots.device)
    reference, target_deltas = None, None
    if any(m in measures for m in TUNED):  # a module tuned from scratch on the shots: P_t and ΔW_t
        started = time.perf_counter()
        tuned = adapter_model(sources[0], spec, shots.seed)
        tune(tuned, shots, steps=steps, lr=lr)
        reference = _outputs(tuned, shots)
        target_deltas = deltas(_module_of(sources[0], tuned))
        for name in TUNED:
            if name in measures:
                result.seconds[name] += (time.perf_counter() - started) / sum(m in measures for m in TUNED)
    for i, source in enumerate(sources):
        if progress:
            progress(i / len(sources), f"{source.ref.name}")
        started = time.perf_counter()
        model = adapter_model(source, spec, shots.seed, {k: source.tensors[k] for k in source.body})
        for p in model.parameters():
            p.requires_grad_(False)
        head = _head_params(model)
        for p in head:
            p.requires_grad_(True)
        tune(model, shots, steps=HEAD_STEPS, lr=HEAD_LR, params=head)  # the linear probe
        outputs = _outputs(model, shots)
        probe_seconds = time.perf_counter() - started
        found = output_scores(spec, outputs, probe_labels, reference)
        for name in ("loss", "el2n", "cosine", "kl"):
            if name in measures:
                result.scores[name][source.ref.spec] = found[name]
                result.seconds[name] += probe_seconds
        if "grand" in measures:
            started = time.perf_counter()
            body = list(_body(model).values())
            for p in body:
                p.requires_grad_(True)
            norms = []
            for batch in shots.batches("probe", 16):
                model.zero_grad(set_to_none=True)
                task_loss(model, batch, spec).backward()
                norms.append(float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in body if p.grad is not None))))
            result.scores["grand"][source.ref.spec] = -sum(norms) / len(norms)
            result.seconds["grand"] += probe_seconds + time.perf_counter() - started
            model.zero_grad(set_to_none=True)
        if "weight_cosine" in measures:
            started = time.perf_counter()
            cosines = _layer_cosines(target_deltas, deltas(source))
            result.layers.setdefault("weight_cosine", {})[source.ref.spec] = cosines
            result.scores["weight_cosine"][source.ref.spec] = sum(cosines.values()) / len(cosines)
            result.seconds["weight_cosine"] += time.perf_counter() - started
        if any(m in measures for m in MOVED):
            started = time.perf_counter()
            before_metric = _headline(spec, outputs, probe_labels)
            moved = copy.deepcopy(model)
            for p in moved.parameters():
                p.requires_grad_(False)
            params = [*_body(moved).values(), *_head_params(moved)]
            for p in params:
                p.requires_grad_(True)
            tune(moved, shots, steps=steps, lr=lr, params=params)
            after = {k: v.detach().cpu() for k, v in _body(moved).items()}
            per_layer: dict[str, float] = {}
            for key in source.body:
                layer = source.layer_of(key)
                per_layer[layer] = per_layer.get(layer, 0.0) + float((after[key].float() - source.tensors[key].float())
                                                                     .pow(2).sum())
            per_layer = {layer: -value ** 0.5 for layer, value in per_layer.items()}
            seconds = probe_seconds + time.perf_counter() - started
            if "euclidean" in measures:
                result.layers.setdefault("euclidean", {})[source.ref.spec] = per_layer
                result.scores["euclidean"][source.ref.spec] = sum(per_layer.values())
                result.seconds["euclidean"] += seconds
            if "performance" in measures:
                gain = _headline(spec, _outputs(moved, shots), probe_labels) - before_metric
                result.scores["performance"][source.ref.spec] = gain
                result.seconds["performance"] += seconds
    return result
