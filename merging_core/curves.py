"""Interpolation curves and planes between checkpoints, scored on tasks and streamed point by point.

Mode connectivity (Qin et al. 2022, "Exploring Mode Connectivity for Pre-trained Language Models",
arXiv:2210.14102): walk a path between two checkpoints and record every task's loss and metric at
each point. A path whose loss never rises above the line through its end values (barrier 0) joins the
two in one basin. The geometry (paths, barriers, distances) is `merging_core.paths`; this module scores it.

**Speed.** Each task gets one model object carrying that task's head and one `Evaluator` (its split
tokenized once, the batches kept on the device). A point is written into the model's parameters in
place, θ = Σ_k c_k θ_k, from vertex tensors that also live on the device, then scored: K points cost K
forward passes over the data, not K model loads and K tokenizations. The GPU is used when present.

**Heads.** The parameters every checkpoint has (same shape) move along the path. A task's head moves
too when every checkpoint has a head fitting that task (same task, other seed or step); otherwise the
task is scored with the head of the checkpoint trained on it, held fixed (different tasks), or with the
head of `head_from` (e.g. the zoo's `mlm-head`, for the MLM loss along a path between two classifiers).

**Adapters.** Between two PEFT modules of one kind on one base (LoRA, (IA)³), the path moves the tuned
parameters only, the LoRA factors or (IA)³ vectors and the task head ("module space", as Qin et al.
interpolate adapters); the base stays fixed and is never folded. Two bottleneck modules (`bottleneck`,
Houlsby et al. 2019) of one size move their adapters, layer norms and head the same way. Any other
pair, adapters folded into their base included, moves in weight space.

**Bezier curves** train their bend θ_C from the midpoint (Garipov et al. 2018, "Loss surfaces, mode
connectivity, and fast ensembling of DNNs", arXiv:1802.10026, Sec. 3.2): every step
draws t ~ U(0, 1), takes a training batch at θ(t) and moves θ_C along ∂L/∂θ_C = 2t(1 − t) ∂L/∂θ(t)
(Adam, learning rate decaying linearly to 0). A bend that ends with a higher barrier than the straight
line found no better path (`bend_warnings` says so); its distance from the midpoint is reported beside
the distance between the two checkpoints, to show how far the curve strays.

**Progress.** Every stage reports through `progress` (loading, each bend training step, each point, each
merge) with an estimate of the time left from the rate so far (`progress.time_left`), so a callback raising
`progress.Cancelled` stops a run within one training step or one point.

**Knowledge along the path** (Qin et al. 2022, the knowledge change along the path). With `examples=True` a curve also keeps, for
every classification task, which examples each point answers correctly (read from the logits of the
point's own scoring pass, so it costs no extra forward pass; the examples are the `limit` ones scored,
bounded in public mode like every curve). `Curve.knowledge()` summarizes the (examples x points)
matrix with `merging_core.knowledge`. With `datamap=<checkpoint>` the curve scores the training
examples of that checkpoint's data map (`merging_core.cartography`) and relates forgetting to them.

**Requests.** A `CurveSpec` / `PlaneSpec` describes one run (checked on construction, JSON-ready);
merges placed on the path are `MergeSpec`s of the same checkpoints.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from . import cartography, knowledge, paths, settings
from .arch import canonical
from .checkpoint import HEAD_GROUPS, Checkpoint, check_compatible, load_canonical, open_checkpoint, recorded_base
from .errors import MergeLabError
from .evaluation import Evaluator
from .losses import task_loss, text_noise
from .merge import merge
from .module_space import SPACES, module_checkpoint, module_parameters, module_space
from .models import check_head, load, load_adapter, model_head, resolve
from .progress import ProgressFn, scaled, time_left, track
from .spec import MergeSpec, parse_method_text, specs_from_texts
from .tasks import TaskSpec, get_task, scored_as
from .training import train_batches



def _merge_text(item: str | tuple[str, dict]) -> str:
    """A merge to place on a path as text (`ties:density=0.2`), checked against the registry."""
    if not isinstance(item, str):
        name, params = item
        item = name + (":" + ",".join(f"{k}={v}" for k, v in params.items()) if params else "")
    parse_method_text(item)
    return item


@dataclass(frozen=True)
class PathSpec:
    """What every path run shares: the checkpoints, the tasks and data it is scored on, merges to place."""

    models: tuple[str, ...]
    tasks: tuple[str, ...] = ()  # default: the checkpoints' own tasks
    split: str = "dev"
    limit: int | None = None  # first N examples of each task
    head_from: str | None = None  # score tasks neither checkpoint has a head for with this model's head
    space: str = "auto"  # adapters: "module" (interpolate the modules) or "weights" (folded)
    base: str | None = None  # the pretrained model (task-vector cosine; task-vector merges)
    merges: tuple[str, ...] = ()  # merges of the checkpoints to place on the path, e.g. "ties:density=0.2"

    def __post_init__(self) -> None:
        setter = object.__setattr__.__get__(self)
        setter("models", tuple(str(m).strip() for m in self.models))
        tasks = self.tasks.split(",") if isinstance(self.tasks, str) else (self.tasks or ())
        setter("tasks", tuple(t.strip() for t in tasks if t and t.strip()))
        if self.space not in SPACES:
            raise MergeLabError(f"space must be one of {list(SPACES)}, got {self.space!r}", param="space")
        if self.limit is not None and int(self.limit) < 1:
            raise MergeLabError(f"limit must be at least 1, got {self.limit}", param="limit")
        setter("head_from", self.head_from or None)
        setter("base", self.base or None)
        setter("merges", tuple(_merge_text(m) for m in self.merges))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class CurveSpec(PathSpec):
    """A path between two checkpoints (`models` = (A, B))."""

    points: int = 26  # evenly spaced in t, both ends included
    path: str = "line"  # "line" or "bezier" (a trained bend)
    bend_steps: int = 200  # Bezier: training steps of the bend
    bend_lr: float = 1e-3  # Bezier: Adam learning rate of the bend
    batch_size: int = 32  # Bezier: training batch size
    seed: int = 0  # Bezier: batches and t draws
    examples: bool = False  # record which examples each point answers correctly (see `knowledge`)
    datamap: str | None = None  # score the training examples of this checkpoint's data map (implies examples)

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.models) != 2:
            raise MergeLabError(f"a curve joins two checkpoints, got {len(self.models)}", param="models")
        object.__setattr__(self, "datamap", str(self.datamap).strip() if self.datamap else None)
        if self.datamap:
            if self.split != "train":
                raise MergeLabError(f"a data map's examples come from the train split; set split 'train', not "
                                    f"{self.split!r}", param="split")
            object.__setattr__(self, "examples", True)
        object.__setattr__(self, "examples", bool(self.examples))
        if self.path not in paths.PATHS:
            raise MergeLabError(f"path must be one of {list(paths.PATHS)}, got {self.path!r}", param="path")
        paths.positions(self.points)  # checks the count
        if self.path == "bezier" and self.bend_steps < 1:
            raise MergeLabError(f"a Bezier curve needs at least 1 bend training step, got {self.bend_steps}",
                                param="bend_steps")
        if not 0 < self.bend_lr < math.inf:  # NaN fails too
            raise MergeLabError(f"the bend's learning rate must be a finite number above 0, got {self.bend_lr}",
                                param="bend_lr")


@dataclass(frozen=True)
class PlaneSpec(PathSpec):
    """The plane through three checkpoints (`models` = (A, B, C)), scored on a grid."""

    grid: int = 7  # grid points per axis
    margin: float = 0.25  # room around the three models, as a share of the span

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.models) != 3:
            raise MergeLabError(f"a plane passes through three checkpoints, got {len(self.models)}", param="models")
        if not 0 <= self.margin < math.inf:  # NaN fails too
            raise MergeLabError(f"margin must be a finite number of at least 0, got {self.margin}", param="margin")


@dataclass
class Rig:
    """One task's scoring setup: a model with the task's head, its evaluator, what the path writes."""

    spec: TaskSpec
    model: torch.nn.Module
    evaluator: Evaluator
    params: dict[str, torch.nn.Parameter]  # canonical name -> the model parameter the path overwrites
    head: str  # how the task's head is handled (for the summary)
    spare: torch.nn.Module | None = None  # a copy to score merges in, made on first use


def _fits(checkpoint: Checkpoint, spec: TaskSpec) -> bool:
    try:
        check_head(checkpoint.ref.spec, checkpoint.head, spec)
    except MergeLabError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------
# paths through two or three checkpoints


class _Path:
    """Shared set-up of curves and planes: vertices on the device, one rig per task, geometry."""

    def __init__(self, spec: PathSpec, progress: ProgressFn | None):
        started = time.perf_counter()
        self.spec = spec
        self.specs = list(spec.models)
        self.notes: list[str] = []
        self.progress = progress
        self._report(0.0, "loading the checkpoints")
        self.split, self.limit = spec.split, spec.limit
        self.device = settings.device()
        refs = [resolve(s) for s in self.specs]
        self.module_space, note = module_space(refs, spec.space)
        if note:
            self.notes.append(note)
        self.space = "module" if self.module_space else "weights"
        self.checkpoints = [(module_checkpoint if self.module_space else open_checkpoint)(r) for r in refs]
        check_compatible(self.checkpoints, None)
        self.tasks = self._tasks(spec.tasks)
        # merges get the base as given (they find a recorded base themselves)
        self.merges = specs_from_texts(spec.merges, self.specs, base=spec.base)
        if self.merges and self.module_space:
            raise MergeLabError("merge points are placed on weight-space paths; drop the merges or use space "
                                "'weights' for adapter modules", param="merges")
        self.base = spec.base or recorded_base(self.checkpoints)

        first = self.checkpoints[0]
        shared = [n for n in first.names if first.meta(n)[0].is_floating_point
                  and all(n in c.names and c.meta(n) == first.meta(n) for c in self.checkpoints[1:])]
        self.encoder = [n for n in shared if first.infos[n].group not in HEAD_GROUPS]
        self.head_names = [n for n in shared if first.infos[n].group in HEAD_GROUPS]
        for c in self.checkpoints:
            fixed = sorted(n for n, info in c.infos.items() if n not in shared and info.group not in HEAD_GROUPS)
            if fixed:
                self.notes.append(f"{c.ref.spec} has {len(fixed)} parameter(s) the others lack ({fixed[0]}, ...): "
                                  "held at its own values where its head scores a task")
        self.vertices = [{n: c.get(n).to(self.device, torch.float32) for n in shared} for c in self.checkpoints]
        self.indices = self._indices()  # task -> which examples of the split each task is scored on
        self.rigs = []
        for task in self.tasks:
            self._report(0.0, f"loading the model for {task.name} and tokenizing its {self.split} split")
            self.rigs.append(self._rig(task, spec.head_from))
        self._report(0.0, "measuring the distance between the checkpoints")
        moving = set(self.encoder) | {n for rig in self.rigs for n in rig.params}
        self.names = [n for n in shared if n in moving]
        self.geometry = paths.geometry(self.vertices, self.names)
        self.items: list[dict] = []
        self._iterated = False
        self.seconds = 0.0
        self.setup_seconds = time.perf_counter() - started

    def _indices(self) -> dict[str, list[int]]:
        """Examples of the split to score, per task (default: the first `limit` of every task)."""
        return {}

    def _tasks(self, names: Sequence[str]) -> list[TaskSpec]:
        if not names:  # default: the checkpoints' own tasks
            names = [c.task for c in self.checkpoints if c.task]
            if not names:
                raise MergeLabError("no task given and the checkpoints have no task heads; name the tasks to score",
                                    param="tasks")
        specs = [get_task(t) for t in names]
        return list({s.name: s for s in specs}.values())

    def _rig(self, spec: TaskSpec, head_from: str | None) -> Rig:
        fitting = [c for c in self.checkpoints if _fits(c, spec)]
        names = list(self.encoder)
        if len(fitting) == len(self.checkpoints):
            owner, how = self.checkpoints[0].ref, "interpolated (every checkpoint has a head for it)"
            names += self.head_names
        elif fitting:
            owner, how = fitting[0].ref, f"fixed: {fitting[0].ref.spec}'s head"
        elif head_from:
            if self.module_space:
                raise MergeLabError("head_from works on weight-space paths; use space 'weights' for adapter modules")
            donor = open_checkpoint(head_from)
            check_compatible([self.checkpoints[0], donor], None)
            check_head(head_from, donor.head, spec)
            owner, how = donor.ref, f"fixed: {head_from}'s head"
        else:
            raise MergeLabError(f"none of {', '.join(self.specs)} has a head for task {spec.name}; pick one of their "
                                "tasks, or score it with the head of a model that has one", param="head_from",
                                hint="e.g. mlm-head for MLM")
        if self.module_space:
            model = load_adapter(owner).to(self.device).eval()
        else:
            model = load(owner, spec, device=self.device).model
        params = module_parameters(model, self.module_space)
        # MLM and token models have no pooler: nothing of theirs reads it, so it need not move
        names = [n for n in names if n in params or self.checkpoints[0].infos[n].group != "pooler"]
        missing = [n for n in names if n not in params]
        if missing:
            raise MergeLabError(f"the model scoring {spec.name} ({owner.spec}) has no parameter {missing[0]}; "
                                "the checkpoints differ in architecture")
        evaluator = Evaluator(spec, self.checkpoints[0].tokenizer, self.split, self.limit, device=self.device,
                              indices=self.indices.get(spec.name))
        return Rig(spec, model, evaluator, {n: params[n] for n in names}, how)

    # scoring ---------------------------------------------------------------------------------------

    def write(self, rig: Rig, coefficients: Sequence[float]) -> None:
        with torch.no_grad():
            for name, param in rig.params.items():
                paths.combine_into(param, [v[name] for v in self.vertices], coefficients)

    def score(self, coefficients: Sequence[float]) -> dict[str, dict]:
        """Every task's scores at the point Σ c_k θ_k."""
        out = {}
        for rig in self.rigs:
            self.write(rig, coefficients)
            out[rig.spec.name] = rig.evaluator(rig.model)
        return out

    def merged(self, spec: MergeSpec) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
        """A merge of the checkpoints (kept in memory): its moving tensors, and its scores on every task."""
        result = merge(spec)
        point = {n: result.state[n].to(self.device, torch.float32) for n in self.names if n in result.state}
        scores = {}
        for rig in self.rigs:
            if rig.spare is None:
                rig.spare = copy.deepcopy(rig.model)
            load_canonical(rig.spare, result.state)
            if result.heads and rig.spec.name in result.heads:
                load_canonical(rig.spare, {canonical(k): v for k, v in result.heads[rig.spec.name].items()})
            scores[rig.spec.name] = rig.evaluator(rig.spare)
        return point, scores

    def _heads(self) -> dict[str, str]:
        return {rig.spec.name: rig.head for rig in self.rigs}

    # streaming -------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        """Compute the path, yielding items as they are ready; a later iteration replays them."""
        if self._iterated:
            yield from self.items
            return
        self._iterated = True
        started = time.perf_counter()
        for item in self._compute():
            self.items.append(item)
            yield item
        self.seconds = time.perf_counter() - started + self.setup_seconds
        self._report(1.0, "done")

    def _compute(self) -> Iterator[dict]:
        raise NotImplementedError

    def _report(self, fraction: float, desc: str) -> None:
        if self.progress is not None:
            self.progress(fraction, desc)


# ----------------------------------------------------------------------------------------------------
# curves


class Curve(_Path):
    """A path between two checkpoints, scored on tasks. Iterating computes it and yields, in order:
    a "bend" item (Bezier: the trained bend), one "point" per position, one "merge" per merge method.
    `summary()` then holds the barriers and distances; `distances` is known before the first point.
    With `examples` it also records which examples each point answers correctly (`knowledge()`)."""

    def __init__(self, spec: CurveSpec, progress: ProgressFn | None = None):
        self.ts = paths.positions(spec.points)
        self.path = spec.path
        self.bend_settings = {"steps": spec.bend_steps, "lr": spec.bend_lr, "batch_size": spec.batch_size,
                              "seed": spec.seed}
        self.datamap = cartography.require(spec.datamap) if spec.datamap else None
        self.correct: dict[str, list[np.ndarray]] = {}  # task -> one boolean column per point
        self._knowledge: dict[str, dict] | None = None
        super().__init__(spec, progress)
        self.distances = self._distances()
        self.bend: dict | None = None

    def _distances(self) -> dict:
        base_geo = None
        if self.base and not self.module_space:
            base = open_checkpoint(self.base)
            names = [n for n in self.encoder if n in base.names and base.meta(n) == self.checkpoints[0].meta(n)]
            base_tensors = {n: base.get(n).to(self.device, torch.float32) for n in names}
            base_geo = paths.geometry([self.vertices[0], self.vertices[1], base_tensors], names)
        return paths.distances(self.geometry, 0, 1, base_geo, 2)

    def _compute(self) -> Iterator[dict]:
        steps = len(self.ts) + len(self.merges)
        bend_share = 0.4 if self.path == "bezier" else 0.0
        if self.path == "bezier":
            self.bend = self._train_bend(scaled(self.progress, 0.0, bend_share))
            yield self.bend
        coefficients = paths.line if self.path == "line" else paths.bezier
        started = time.perf_counter()
        for i, t in enumerate(self.ts):
            left = time_left(time.perf_counter() - started, i, len(self.ts))
            self._report(bend_share + (1 - bend_share) * i / steps,
                         _joined(f"point {i + 1}/{len(self.ts)} (t = {t:.2f})", left))
            scores = self.score(coefficients(t))
            if self.spec.examples:  # the logits of this point's pass: no extra forward pass
                for rig in self.rigs:
                    if rig.spec.kind == "classification":
                        right = rig.evaluator.last_logits.argmax(-1) == rig.evaluator.encoded.labels
                        self.correct.setdefault(rig.spec.name, []).append(right.numpy())
            yield {"kind": "point", "index": i, "t": t, "scores": scores}
        for j, (label, merge_spec) in enumerate(self.merges):
            self._report(bend_share + (1 - bend_share) * (len(self.ts) + j) / steps,
                         f"placing merge {j + 1}/{len(self.merges)}: {label}")
            point, scores = self.merged(merge_spec)
            geo = paths.geometry([self.vertices[0], self.vertices[1], point], list(point))
            alpha, off = paths.project_on_line(geo, 2)
            yield {"kind": "merge", "method": label, "t": alpha, "off_line": off,
                   "scores": scores}

    @property
    def points(self) -> list[dict]:
        return [item for item in self.items if item["kind"] == "point"]

    def summary(self) -> dict:
        """Barriers (per task, loss and headline metric), distances, heads, bend, merges, notes."""
        points = self.points
        if len(points) < len(self.ts):
            raise MergeLabError("the curve has not been computed yet; iterate it first")
        ts = [p["t"] for p in points]
        barriers = {rig.spec.name: task_barriers(rig.spec, ts, [p["scores"][rig.spec.name] for p in points])
                    for rig in self.rigs}
        return {"kind": "summary", "a": self.specs[0], "b": self.specs[1], "path": self.path, "space": self.space,
                "points": len(points), "split": self.split, "limit": self.limit, "distances": self.distances,
                "base": self.base, "heads": self._heads(), "barriers": barriers, "bend": self.bend,
                "merges": [i for i in self.items if i["kind"] == "merge"], "notes": self.notes,
                **({"knowledge": self.knowledge()} if self.spec.examples else {}),
                "seconds": round(self.seconds, 2)}

    def _indices(self) -> dict[str, list[int]]:
        if self.datamap is None:
            return {}
        if self.datamap.task not in {t.name for t in self.tasks}:
            raise MergeLabError(f"the data map of {self.spec.datamap} is of task {self.datamap.task}, which this curve "
                                f"does not score; add {self.datamap.task} to the tasks", param="datamap")
        return {self.datamap.task: self.datamap.indices}

    def knowledge(self) -> dict[str, dict]:
        """Per classification task: which examples each point answers correctly and what that says
        (`knowledge.summarize`): {"split", "indices" (the examples' indices in the split, one per row),
        "matrix" (examples x points, 0/1), the summary, "most_forgotten" with each example's text fields
        and gold label, and "datamap" (`cartography.relate`) for a curve scored on a data map's examples}."""
        points = self.points
        if not self.spec.examples or len(points) < len(self.ts):
            raise MergeLabError("per-example knowledge needs a curve run with examples on, computed to the end")
        if self._knowledge is not None:
            return self._knowledge
        out = {}
        for rig in self.rigs:
            name = rig.spec.name
            if name not in self.correct:
                continue
            matrix = np.stack(self.correct[name], axis=1)
            indices = list(self.indices.get(name, range(rig.evaluator.n)))[: rig.evaluator.n]
            barrier = knowledge.barrier_column(self.ts, [p["scores"][name]["loss"] for p in points])
            summary = knowledge.summarize(matrix, self.ts, barrier)
            texts = {r["index"]: r for r in knowledge.example_rows(
                name, self.split, [indices[m["index"]] for m in summary["most_forgotten"]])}
            summary["most_forgotten"] = [{**m, **{k: v for k, v in texts[indices[m["index"]]].items() if k != "index"},
                                          "example": indices[m["index"]]} for m in summary["most_forgotten"]]
            entry = {"task": name, "split": self.split, "indices": [int(i) for i in indices],
                     "matrix": matrix.astype(int).tolist(), **summary}
            if self.datamap is not None and self.datamap.task == name:
                entry["datamap"] = {"model": self.spec.datamap, **cartography.relate(self.datamap, matrix, indices,
                                                                                       barrier)}
            out[name] = entry
        self._knowledge = out
        return out

    def _train_bend(self, progress: ProgressFn | None) -> dict:
        """Fit the Bezier bend on the first task's training data (see the module doc). Reports every step
        ("training the bend: step k/N, ~X s left"), so a callback raising `Cancelled` stops it within a step."""
        started = time.perf_counter()
        rig, settings_ = self.rigs[0], self.bend_settings
        total = settings_["steps"]
        if progress is not None:
            progress(0.0, f"training the bend: tokenizing {rig.spec.name} train")
        bend = {n: (self.vertices[0][n] + self.vertices[1][n]) / 2 for n in self.names}
        trained = {n: bend[n].clone().requires_grad_(True) for n in rig.params}
        optimizer = torch.optim.Adam(trained.values(), lr=settings_["lr"])
        # linear decay to 0, as in fine-tuning: the last steps settle the bend instead of jittering it
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / settings_["steps"])
        # the path's model learns as it was fine-tuned: a language model on prompts, or on its own text noise
        spec = scored_as(rig.spec, model_head(rig.model).kind)
        batches = train_batches(spec, self.checkpoints[0].tokenizer, settings_["batch_size"], settings_["seed"],
                                self.device, noise=text_noise(rig.model))
        batches = itertools.chain([next(batches)], batches)  # tokenize now, outside the time per step
        generator = torch.Generator().manual_seed(settings_["seed"])
        requires = {p: p.requires_grad for p in rig.model.parameters()}
        for p in rig.model.parameters():  # only the path's parameters need gradients
            p.requires_grad_(False)
        for p in rig.params.values():
            p.requires_grad_(True)
        self.vertices.append({**bend, **trained})
        losses = []
        stepping = time.perf_counter()
        try:
            steps = range(total) if progress is not None else track(range(total), total, "training the bend", None)
            for step in steps:
                if progress is not None:  # every step: Stop ends the training within one step
                    left = time_left(time.perf_counter() - stepping, step, total)
                    progress(step / total, _joined(f"training the bend: step {step + 1}/{total}", left))
                t = float(torch.rand((), generator=generator))
                coefficients = paths.bezier(t)
                self.write(rig, coefficients)
                rig.model.zero_grad(set_to_none=True)
                loss = task_loss(rig.model, next(batches), spec)
                loss.backward()
                for name, tensor in trained.items():  # chain rule: dθ(t)/dθ_C = 2t(1 − t)
                    grad = rig.params[name].grad
                    tensor.grad = None if grad is None else grad * coefficients[2]
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
        finally:
            for p, flag in requires.items():
                p.requires_grad_(flag)
            rig.model.zero_grad(set_to_none=True)
            self.vertices[-1] = {**bend, **{n: t.detach() for n, t in trained.items()}}
        if progress is not None:
            progress(1.0, f"training the bend: {total}/{total} steps done")
        moved = paths.geometry([self.vertices[-1], {n: bend[n] for n in self.names}], self.names).distance(0, 1)
        between = self.distances["l2"]  # over the same moving parameters
        window = max(1, min(10, len(losses) // 4))
        return {"kind": "bend", "task": rig.spec.name, **settings_, "trained_params": len(trained),
                "train_loss_first": float(np.mean(losses[:window])), "train_loss_last": float(np.mean(losses[-window:])),
                "distance_from_midpoint": moved, "distance_between_ends": between,
                "relative_distance": moved / between if between > 0 else None,
                "seconds": round(time.perf_counter() - started, 2)}


def task_barriers(spec: TaskSpec, ts: Sequence[float], results: Sequence[dict]) -> dict:
    """Loss and headline-metric barriers of one task along a path, its end values and path means."""
    metric = spec.main_metric
    losses = [r["loss"] for r in results]
    values = [r[metric] for r in results]
    higher = not spec.lower_is_better
    loss_height, loss_at = paths.barrier(ts, losses, higher_is_better=False)
    metric_height, metric_at = paths.barrier(ts, values, higher_is_better=higher)
    return {"metric": metric, "n": results[0].get("n"), "loss_barrier": loss_height, "loss_barrier_at": loss_at,
            "metric_barrier": metric_height, "metric_barrier_at": metric_at,
            "loss_barrier_vs_mean_ends": paths.barrier_vs_mean_ends(losses, higher_is_better=False),
            "ends": {"loss": [losses[0], losses[-1]], metric: [values[0], values[-1]]},
            "path_mean": {"loss": float(np.mean(losses)), metric: float(np.mean(values))}}


def bend_warnings(line: dict, bezier: dict, *, tolerance: float = 1e-9) -> list[str]:
    """Warnings when a trained Bezier curve has a higher barrier (loss or headline metric) than the straight
    line between the same checkpoints, for any task: the bend found no better path. `line` and `bezier` are
    the two curves' summaries (`Curve.summary()`); [] when the bend is no worse everywhere. A bend that
    also moved farther from the midpoint than A is from B gets a second warning saying how far."""
    bend = bezier.get("bend") or {}
    steps = f" ({bend['steps']} steps)" if bend.get("steps") else ""
    warnings = []
    for task, curved in bezier["barriers"].items():
        straight = line["barriers"].get(task)
        if straight is None:
            continue
        worse = [f"{name} barrier ({curved[key]:.4f} vs {straight[key]:.4f})"
                 for name, key in (("loss", "loss_barrier"), (curved["metric"], "metric_barrier"))
                 if curved[key] > straight[key] + tolerance]
        if worse:
            warnings.append(f"⚠ The Bezier bend{steps} has a higher {' and a higher '.join(worse)} than the "
                            f"straight line on {task}: the bend did not find a better path; try fewer steps or a "
                            "lower learning rate")
    if warnings and (bend.get("relative_distance") or 0) > 1:  # it strayed farther than A is from B
        warnings.append(f"⚠ The bend moved {bend['distance_from_midpoint']:.3g} from the midpoint of A and B, "
                        f"{bend['relative_distance']:.2g}× the distance between them "
                        f"({bend['distance_between_ends']:.3g})")
    return warnings


def _joined(desc: str, left: str) -> str:
    return f"{desc}, {left}" if left else desc


def curve(a: str | CurveSpec, b: str | None = None, tasks: Sequence[str] | str | None = None, *,
          progress: ProgressFn | None = None, **options: Any) -> Curve:
    """The path from `a` to `b` scored on `tasks`; iterate it to stream the points (see `Curve`).
    Takes a `CurveSpec`, or its fields: `curve("sst2-s0", "sst2-s1", "sst2", points=11)`."""
    spec = a if isinstance(a, CurveSpec) else CurveSpec((a, b), tasks or (), **options)
    return Curve(spec, progress)


# ----------------------------------------------------------------------------------------------------
# planes


class Plane(_Path):
    """The plane through three checkpoints, scored on a grid (Garipov et al. 2018, Sec. 4).

    Iterating yields one "vertex" item per checkpoint (its exact scores and plane coordinates), one
    "cell" per grid point, row by row, then one "merge" per merge method of the three (its projection
    onto the plane and its distance from it)."""

    def __init__(self, spec: PlaneSpec, progress: ProgressFn | None = None):
        super().__init__(spec, progress)
        self.frame = paths.PlaneFrame.through(self.geometry)
        self.xs, self.ys = self.frame.grid(spec.grid, spec.margin)

    def _compute(self) -> Iterator[dict]:
        cells = len(self.xs) * len(self.ys)
        total, done = 3 + cells + len(self.merges), 0
        for k, (x, y) in enumerate(self.frame.vertices()):
            self._report(done / total, f"checkpoint {self.specs[k]}")
            done += 1
            unit = tuple(float(k == j) for j in range(3))
            yield {"kind": "vertex", "model": self.specs[k], "x": x, "y": y, "scores": self.score(unit)}
        for i, y in enumerate(self.ys):
            for j, x in enumerate(self.xs):
                self._report(done / total, f"grid point {done - 2}/{cells}")
                done += 1
                yield {"kind": "cell", "row": i, "col": j, "x": x, "y": y,
                       "scores": self.score(self.frame.coefficients(x, y))}
        for label, merge_spec in self.merges:
            self._report(done / total, f"merge {merge_spec.method}")
            done += 1
            point, scores = self.merged(merge_spec)
            geo = paths.geometry([*self.vertices, point], list(point))
            x, y, off = self.frame.project(geo.dot(3, 1), geo.dot(3, 2), geo.dot(3, 3))
            yield {"kind": "merge", "method": label, "x": x, "y": y, "off_plane": off,
                   "scores": scores}

    def summary(self) -> dict:
        cells = [i for i in self.items if i["kind"] == "cell"]
        best = {}
        for rig in self.rigs:
            name, metric = rig.spec.name, rig.spec.main_metric
            pick = (min if rig.spec.lower_is_better else max)(cells, key=lambda c: c["scores"][name][metric])
            best[name] = {"metric": metric, "value": pick["scores"][name][metric], "x": pick["x"], "y": pick["y"]}
        return {"kind": "summary", "models": self.specs, "space": self.space, "frame": self.frame.__dict__,
                "xs": self.xs, "ys": self.ys, "heads": self._heads(), "best": best, "notes": self.notes,
                "seconds": round(self.seconds, 2)}


def plane(a: str | PlaneSpec, b: str | None = None, c: str | None = None,
          tasks: Sequence[str] | str | None = None, *, progress: ProgressFn | None = None, **options: Any) -> Plane:
    """The plane through `a`, `b`, `c` scored on a grid; iterate it to stream the cells (see `Plane`).
    Takes a `PlaneSpec`, or its fields."""
    spec = a if isinstance(a, PlaneSpec) else PlaneSpec((a, b, c), tasks or (), **options)
    return Plane(spec, progress)
