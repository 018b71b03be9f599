"""How similar a source module is to a target task: the measures of Lv et al. 2023 ("Parameter-Efficient
Weight Ensembling Facilitates Task-Level Knowledge Transfer", ACL 2023, Sec. 3.2), one registry.

Every measure is a `Measure` registered here (`MEASURES`, `get_measure`; the CLI's `--similarity`
choices and the Ensemble tab's picker both read `MEASURES`), signed so that higher means more similar:
the paper's "lower is better" quantities are negated. Adding a measure is one `register_measure` call
with a small function of a `Context`.

The paper's modules are text-to-text, so a source module's outputs are already target outputs. Here
modules trained on other tasks have other label sets, so for the output-based measures the source
module's encoder gets a target head fitted on the k shots (a linear probe, the encoder and the module
frozen), and is scored on the target's probe examples (train examples outside the shots). What a
measure reads is prepared once and shared (`Measure.needs`):

- "outputs", "gradients": the probed source model (one per source), its outputs on the probe examples;
- "weights": the modules' own tensors (no model run);
- "tuning of the reference module": a module tuned from scratch on the shots (once per target): its
  probe outputs P_t and its updates ΔW_t;
- "tuning of every source": a copy of the probed source model, module and head tuned on the shots.

`weight_cosine` and `euclidean` also give one score per adapted layer, for per-layer and per-block
weights.

Prefix modules (Li & Liang 2021, arXiv:2101.00190) are measured on their one tensor, the prefix's keys and
values (`modules.py`): weight cosine compares prefix − start (what training changed, per layer), the
Euclidean distance how far tuning on the shots moves the prefix (per layer); the output measures run the
model with the prefix, as for the other kinds.

Token tasks (CoNLL-2003 NER): the output measures read one output per labelled token (each word's first
sub-word) of the probe sentences: loss, KL, EL2N and cosine are averaged over tokens, and the performance
gain is in span F1 over the probe sentences' labelled tokens.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import metrics
from ..encode import IGNORE, model_inputs
from ..errors import MergeLabError
from ..tasks import TaskSpec
from ..losses import rank_scores, task_loss
from .fewshot import Shots, adapter_model, live_tensors, tune
from .modules import PREFIX, Module, deltas

HEAD_STEPS, HEAD_LR = 30, 1e-2  # the linear probe's tuning

# What a measure reads (`Measure.needs`); each is prepared once and shared by every measure that needs it.
OUTPUTS = "outputs"  # the probed source model's outputs on the probe examples
GRADIENTS = "gradients"  # gradients through the probed source model on the probe examples
WEIGHTS = "weights"  # the modules' own tensors
TUNED_REFERENCE = "tuning of the reference module"  # a module tuned from scratch on the shots (per target)
TUNED_SOURCES = "tuning of every source"  # each probed source tuned on the shots
NEEDS = (OUTPUTS, GRADIENTS, WEIGHTS, TUNED_REFERENCE, TUNED_SOURCES)
_PROBED = (OUTPUTS, GRADIENTS, TUNED_SOURCES)  # the needs that run the probed source model

PAPER = ('Lv et al. 2023, "Parameter-Efficient Weight Ensembling Facilitates Task-Level Knowledge Transfer", '
         "ACL 2023")
DATA_DIET = ('Paul et al. 2021, "Deep Learning on a Data Diet: Finding Important Examples Early in Training", '
             "NeurIPS 2021")


@dataclass(frozen=True)
class Measured:
    """A measure's result for one source: the whole-model score and, optionally, one score per adapted layer."""

    score: float
    layers: dict[str, float] | None = None


@dataclass(frozen=True)
class Measure:
    """One similarity measure: what it is, how it is signed, what it reads, where it comes from."""

    name: str
    title: str
    direction: str  # how the raw quantity is signed so that higher = more similar
    needs: tuple[str, ...]  # what it reads (subset of NEEDS), prepared once and shared
    paper: str  # citation with the section
    compute: Callable[[Context], float | Measured]
    default_temperature: float = 0.1  # the softmax temperature T used when none is given
    doc: str = ""

    def __post_init__(self):
        unknown = [n for n in self.needs if n not in NEEDS]
        if unknown:
            raise ValueError(f"measure {self.name!r} needs {unknown[0]!r}; needs are: {', '.join(NEEDS)}")


MEASURES: dict[str, Measure] = {}


def register_measure(m: Measure) -> Measure:
    if m.name in MEASURES:
        raise RuntimeError(f"similarity measure {m.name!r} registered twice")
    MEASURES[m.name] = m
    return m


def get_measure(name: str) -> Measure:
    try:
        return MEASURES[name]
    except KeyError:
        raise MergeLabError(f"unknown similarity {name!r}; choose one of: {', '.join(MEASURES)}",
                            param="similarity") from None


@dataclass
class Scores:
    """One target's similarity to each source: scores[measure][source], per-layer scores, seconds."""

    target: str
    seed: int
    shots: int
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    layers: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # per measure, summed over sources


# -- shared preparation ----------------------------------------------------------------------------------

def _head_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if "modules_to_save" in n]


def _body(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A live adapter model's own tensors by file key (no head)."""
    return {key: p for key, p in live_tensors(model).items()
            if "lora_" in key or key.endswith("ia3_l") or key == PREFIX}


def _probe_batches(shots: Shots) -> list[dict[str, torch.Tensor]]:
    return shots.batches("probe", 32)


@torch.no_grad()
def _outputs(model: torch.nn.Module, shots: Shots) -> torch.Tensor:
    """The model's outputs on the probe examples: one row per example, or per labelled token (token tasks)."""
    model.eval()
    out = []
    for b in _probe_batches(shots):
        # a causal LM's module on prompts: its label scores (rank classification) are its outputs
        logits = (rank_scores(model, b) if shots.spec.kind == "rank"
                  else model(**model_inputs(b, getattr(model, "config", None))).logits).float()
        out.append(logits[b["labels"] != IGNORE] if shots.spec.kind == "token" else logits)
    return torch.cat(out)


def probe_labels(shots: Shots) -> torch.Tensor:
    """The probe examples' labels, in `_outputs`' order (token tasks: of the labelled tokens), on the device."""
    if shots.spec.kind != "token":
        return shots.probe.labels.to(shots.device)
    return torch.cat([b["labels"][b["labels"] != IGNORE] for b in _probe_batches(shots)])


def _headline(shots: Shots, outputs: torch.Tensor, labels: torch.Tensor) -> float:
    spec = shots.spec
    if spec.kind != "token":
        return metrics.sequence_metrics(spec, outputs.cpu().numpy(), labels.cpu().numpy())[spec.main_metric]
    sizes = [int(n) for b in _probe_batches(shots) for n in (b["labels"] != IGNORE).sum(1)]
    names = spec.labels
    predicted, gold = outputs.argmax(-1).cpu().split(sizes), labels.cpu().split(sizes)
    found = metrics.span_metrics([[names[t] for t in p.tolist()] for p in predicted],
                                 [[names[t] for t in g.tolist()] for g in gold])
    return found[spec.main_metric]


def _module_of(template: Module, model: torch.nn.Module) -> Module:
    """The live model's adapter as a Module (for its ΔW)."""
    tensors = {k: v.detach().cpu() for k, v in _body(model).items()}
    return Module(template.ref, template.kind, template.config, template.task, tensors,
                  {k: template.roles[k] for k in tensors})


@dataclass
class Reference:
    """A module tuned from scratch on the shots (the target's stand-in): its probe outputs P_t, its ΔW_t."""

    outputs: torch.Tensor
    deltas: dict[str, torch.Tensor]
    seconds: float


def tuned_reference(template: Module, shots: Shots, *, steps: int, lr: float) -> Reference:
    """A fresh module shaped like `template`'s, tuned on the shots (once per target and seed)."""
    started = time.perf_counter()
    tuned = adapter_model(template, shots.spec, shots.seed)
    tune(tuned, shots, steps=steps, lr=lr)
    outputs = _outputs(tuned, shots)
    return Reference(outputs, deltas(_module_of(template, tuned)), time.perf_counter() - started)


@dataclass
class Context:
    """What a measure reads for one source module. `prepare(needs)` fills in the shared pieces once."""

    source: Module
    shots: Shots
    labels: torch.Tensor  # the probe examples' labels, on the device
    steps: int  # tuning steps (reference module, tuning of every source)
    lr: float
    reference: Reference | None = None  # "tuning of the reference module"
    model: torch.nn.Module | None = None  # the source with a target head fitted on the shots (linear probe)
    outputs: torch.Tensor | None = None  # the probed model's outputs on the probe examples
    moved: torch.nn.Module | None = None  # a copy of the probed model, module and head tuned on the shots
    seconds: dict[str, float] = field(default_factory=dict)  # preparation -> seconds

    @property
    def spec(self) -> TaskSpec:
        return self.shots.spec

    def _probe(self) -> None:
        started = time.perf_counter()
        source = self.source
        model = adapter_model(source, self.spec, self.shots.seed, {k: source.tensors[k] for k in source.body})
        for p in model.parameters():
            p.requires_grad_(False)
        head = _head_params(model)
        for p in head:
            p.requires_grad_(True)
        if head:  # the linear probe; a causal LM's module reads the target's prompts with no head to fit
            tune(model, self.shots, steps=HEAD_STEPS, lr=HEAD_LR, params=head)
        self.model, self.outputs = model, _outputs(model, self.shots)
        self.seconds["probe"] = time.perf_counter() - started

    def _move(self) -> None:
        started = time.perf_counter()
        moved = copy.deepcopy(self.model)
        for p in moved.parameters():
            p.requires_grad_(False)
        params = [*_body(moved).values(), *_head_params(moved)]
        for p in params:
            p.requires_grad_(True)
        tune(moved, self.shots, steps=self.steps, lr=self.lr, params=params)
        self.moved = moved
        self.seconds["moved"] = time.perf_counter() - started

    def prepare(self, needs: tuple[str, ...]) -> float:
        """Compute what `needs` reads and is not there yet; returns the seconds of the per-source
        preparation it reads (counted for every measure that reads it)."""
        seconds = 0.0
        if any(n in needs for n in _PROBED):
            if self.model is None:
                self._probe()
            seconds += self.seconds["probe"]
        if TUNED_SOURCES in needs:
            if self.moved is None:
                self._move()
            seconds += self.seconds["moved"]
        if TUNED_REFERENCE in needs and self.reference is None:
            raise RuntimeError("the reference module is prepared once per target, before the sources")
        return seconds


# -- the measures ----------------------------------------------------------------------------------------

def _regression(ctx: Context) -> bool:
    return ctx.spec.kind == "regression"


def loss_score(ctx: Context) -> float:
    if _regression(ctx):
        return -float(F.mse_loss(ctx.outputs.squeeze(-1), ctx.labels))
    return -float(F.cross_entropy(ctx.outputs, ctx.labels))


def kl_score(ctx: Context) -> float:
    outputs, reference = ctx.outputs, ctx.reference.outputs
    if _regression(ctx):  # unit Gaussians: KL = ½ (ŷ_t − ŷ_j)²
        return -float(0.5 * ((reference.squeeze(-1) - outputs.squeeze(-1)) ** 2).mean())
    return -float(F.kl_div(F.log_softmax(outputs, -1), F.log_softmax(reference, -1), log_target=True,
                           reduction="batchmean"))


def el2n_score(ctx: Context) -> float:
    if _regression(ctx):
        return -float((ctx.outputs.squeeze(-1) - ctx.labels).abs().mean())
    onehot = F.one_hot(ctx.labels, ctx.outputs.shape[-1]).float()
    return -float((F.softmax(ctx.outputs, -1) - onehot).norm(dim=-1).mean())


def grand_score(ctx: Context) -> float:
    model, spec = ctx.model, ctx.spec
    body = list(_body(model).values())
    for p in body:
        p.requires_grad_(True)
    norms = []
    for batch in ctx.shots.batches("probe", 16):
        model.zero_grad(set_to_none=True)
        task_loss(model, batch, spec).backward()
        norms.append(float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in body if p.grad is not None))))
    model.zero_grad(set_to_none=True)
    return -sum(norms) / len(norms)


def cosine_score(ctx: Context) -> float:
    if _regression(ctx):
        return float(F.cosine_similarity(ctx.outputs.squeeze(-1), ctx.labels, dim=0))
    onehot = F.one_hot(ctx.labels, ctx.outputs.shape[-1]).float()
    return float(F.cosine_similarity(F.softmax(ctx.outputs, -1), onehot, dim=-1).mean())


def weight_cosine_score(ctx: Context) -> Measured:
    target, source = ctx.reference.deltas, deltas(ctx.source)
    cosines = {layer: float(F.cosine_similarity(target[layer].flatten(), source[layer].flatten(), dim=0))
               for layer in target}
    return Measured(sum(cosines.values()) / len(cosines), cosines)


def euclidean_score(ctx: Context) -> Measured:
    source = ctx.source
    after = {k: v.detach().cpu().float() for k, v in _body(ctx.moved).items()}
    before = {k: source.tensors[k].float() for k in source.body}
    squares: dict[str, float] = {}
    for (layer, a), (_, b) in zip(source.pieces(after), source.pieces(before)):
        squares[layer] = squares.get(layer, 0.0) + float((a - b).pow(2).sum())
    per_layer = {layer: -value ** 0.5 for layer, value in squares.items()}
    return Measured(sum(per_layer.values()), per_layer)


def performance_score(ctx: Context) -> float:
    before = _headline(ctx.shots, ctx.outputs, ctx.labels)
    return _headline(ctx.shots, _outputs(ctx.moved, ctx.shots), ctx.labels) - before


SEC = f"{PAPER}, Sec. 3.2"
# Default temperatures: the paper's (0.1 for loss, KL, EL2N, GraNd, Euclidean; 0.001 for weight cosine
# and performance); cosine of outputs and labels lives on the loss's scale.
register_measure(Measure(
    "loss", "Loss on the target", "−CE (regression: −MSE): a lower loss is more similar", (OUTPUTS,),
    SEC, loss_score, 0.1,
    "Cross-entropy (regression: mean squared error) of the probed source model on the probe examples."))
register_measure(Measure(
    "kl", "KL divergence from a target module", "−mean KL(P_t ‖ Q_j): a smaller divergence is more similar",
    (OUTPUTS, TUNED_REFERENCE), SEC, kl_score, 0.1,
    "Mean KL divergence of the source's output distribution Q_j from P_t, that of a module tuned from "
    "scratch on the shots (regression: unit Gaussians, ½ (ŷ_t − ŷ_j)²)."))
register_measure(Measure(
    "el2n", "EL2N score", "−mean ‖softmax(z) − onehot(y)‖ (regression: −mean |ŷ − y|): a smaller error is "
    "more similar", (OUTPUTS,), f"{SEC}; EL2N from {DATA_DIET}", el2n_score, 0.1,
    "Mean L2 norm of the error vector of the probed source model on the probe examples."))
register_measure(Measure(
    "grand", "GraNd score", "−mean ‖∇L‖: a smaller gradient is more similar", (GRADIENTS,),
    f"{SEC}; GraNd from {DATA_DIET}", grand_score, 0.1,
    "Mean over probe batches (16 examples) of the norm of the loss's gradient over the module's own tensors."))
register_measure(Measure(
    "cosine", "Cosine of outputs and labels", "+mean cos(softmax(z), onehot(y)) (regression: cos(ŷ, y)): "
    "higher is more similar as it is", (OUTPUTS,), SEC, cosine_score, 0.1,
    "Cosine between the probed source model's probabilities and the one-hot labels, averaged over the probe "
    "examples (regression: between the predictions and the labels over the probe examples). Its temperature "
    "is the loss's."))
register_measure(Measure(
    "weight_cosine", "Cosine of the module updates", "+mean over layers of cos(ΔW_t, ΔW_j): higher is more "
    "similar as it is", (WEIGHTS, TUNED_REFERENCE), SEC, weight_cosine_score, 0.001,
    "Cosine of each adapted layer's update ΔW_j with ΔW_t, that of a module tuned from scratch on the shots, "
    "averaged over layers; also one score per layer."))
register_measure(Measure(
    "euclidean", "Distance moved on the target", "−Σ over layers of ‖θ_j − θ_j'‖: a module that moves less is "
    "more similar", (WEIGHTS, TUNED_SOURCES), SEC, euclidean_score, 0.1,
    "Euclidean distance between the source module θ_j and θ_j', the same module (with its probe head) tuned "
    "on the shots, summed over adapted layers; also one score per layer."))
register_measure(Measure(
    "performance", "Gain from tuning on the target", "+(score after − score before): a larger gain is more "
    "similar", (OUTPUTS, TUNED_SOURCES), SEC, performance_score, 0.001,
    "The probe examples' headline metric of the source module after tuning on the shots minus before."))


def measure(sources: list[Module], shots: Shots, *, measures: tuple[str, ...] | None = None, steps: int = 50,
            lr: float = 5e-4, progress: Callable[[float, str], None] | None = None) -> Scores:
    """Every measure in `measures` (default: every registered one) for every source module against the
    target of `shots`."""
    chosen = [get_measure(name) for name in (MEASURES if measures is None else measures)]
    result = Scores(shots.spec.name, shots.seed, len(shots.train))
    for m in chosen:
        result.scores[m.name] = {}
        result.seconds[m.name] = 0.0
    order = [m for m in MEASURES.values() if m in chosen]  # computed in registry order, whatever was asked
    labels = probe_labels(shots)
    reference = None
    tuned = [m for m in order if TUNED_REFERENCE in m.needs]
    if tuned:  # once per target: the module tuned from scratch on the shots, its P_t and ΔW_t
        reference = tuned_reference(sources[0], shots, steps=steps, lr=lr)
        for m in tuned:
            result.seconds[m.name] += reference.seconds / len(tuned)
    for i, source in enumerate(sources):
        if progress:
            progress(i / len(sources), f"{source.ref.name}")
        ctx = Context(source, shots, labels, steps, lr, reference)
        for m in order:
            seconds = ctx.prepare(m.needs)
            started = time.perf_counter()
            found = m.compute(ctx)
            if not isinstance(found, Measured):
                found = Measured(found)
            result.scores[m.name][source.ref.spec] = found.score
            if found.layers is not None:
                result.layers.setdefault(m.name, {})[source.ref.spec] = found.layers
            result.seconds[m.name] += seconds + time.perf_counter() - started
    return result
