"""Merge N checkpoints with any registered method, per component, with heads handled per task.

The engine reads every input lazily (safetensors, mmap), walks the parameters in order and asks the
method for one merged tensor at a time, then streams it to the output file: peak memory is about one
tensor per input model. Data-aware methods first get their statistics (`merging_core.stats`: cached,
or loaded from files somebody else computed), then run per tensor on the GPU when there is one.

Names are compared in *canonical* form (the task wrapper's `bert.` prefix stripped), so a
`BertForSequenceClassification`, a `BertForTokenClassification` and the bare `BertModel` base align.

Components: `components` picks parameter groups (embeddings, attention, feed_forward, layer_norm,
pooler, head, mlm_head) that the method merges; the rest follow `fallback` ("average" or "first" =
keep model A). Heads: models with the same label set may merge their heads (`heads="merge"`, the
default when all label sets agree); otherwise every task keeps its own head (`heads="separate"`)
and the output is a multi-head checkpoint: the merged encoder plus one head file per task.

The output folder is an HF model (config, tokenizer, safetensors) plus `merge_config.json`, which
`merge_from_config` turns back into the same merge (seed included), and `mergekit.yaml` when mergekit
can express the merge.
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file

from . import __version__, settings
from .arch import GROUPS, ParamInfo, adapter_for
from .errors import MergeLabError
from .methods import METHODS, Method, TensorJob, get_method, sum_weighted
from .models import (HEAD_SUFFIXES, METADATA, ConfigView, HeadInfo, ModelRef, check_out, copy_tokenizer, head_info,
                     load, load_tokenizer, read_config, resolve, staging, vocabulary_fingerprint)
from .progress import ProgressFn, scaled, track
from .stats import canonical, load_stats, statistics
from .tasks import TASKS, get_task
from .tensorio import InMemory, LazyFiles, StreamingWriter

HEAD_GROUPS = ("head", "mlm_head")
FALLBACKS = ("average", "first")
HEAD_POLICIES = ("auto", "merge", "separate")


@dataclass
class Checkpoint:
    """One input model, read lazily: canonical name -> tensor on demand."""

    ref: ModelRef
    config: ConfigView
    head: HeadInfo
    task: str | None  # the task its head was trained for
    reader: LazyFiles | InMemory
    names: dict[str, str]  # canonical -> name in the file
    infos: dict[str, ParamInfo]  # canonical -> group / role / layer

    def get(self, name: str) -> torch.Tensor:
        return self.reader.get(self.names[name])

    def meta(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self.reader.meta(self.names[name])

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer, loaded on first use (a data-free merge only copies its files)."""
        return load_tokenizer(self.ref)


def head_task(ref: ModelRef, head: HeadInfo) -> str | None:
    """The task a checkpoint's head belongs to: its metadata, else the one task whose labels it has."""
    if head.kind is None:
        return None
    recorded = ref.metadata().get("task")
    if recorded:
        return get_task(recorded).name
    fits = [t.name for t in TASKS.values() if t.head == head.kind and (
        head.kind == "mlm" or (t.num_labels == head.num_labels and [l.lower() for l in t.labels] ==
                               [l.lower() for l in head.labels]))]
    return fits[0] if len(fits) == 1 else None


def open_checkpoint(spec: str | ModelRef, *, allow_pickle: bool = False) -> Checkpoint:
    ref = spec if isinstance(spec, ModelRef) else resolve(spec)
    if ref.metadata().get("heads"):
        raise MergeLabError(f"model {ref.spec!r} is a multi-head checkpoint; merges and curves take single-task "
                            "checkpoints, so use the models it came from")
    config = read_config(ref)
    head = head_info(ref, config)
    files = sorted(ref.path.glob("*.safetensors")) if ref.path is not None and not ref.is_adapter else []
    if files:
        reader: LazyFiles | InMemory = LazyFiles(files)
    else:  # LoRA (folded in), opted-in pickle or hub: the whole state dict in memory
        task = get_task(ref.metadata()["task"]) if ref.is_adapter else None
        model = load(ref, task, allow_pickle=allow_pickle, device="cpu").model
        reader = InMemory({k: v.detach() for k, v in model.state_dict().items()})
    adapter = adapter_for(config.model_type)
    names, infos = {}, {}
    for key in reader.keys():
        info = adapter.describe(key)
        if info.group == "buffer":
            continue
        name = canonical(key, config.model_type)
        names[name], infos[name] = key, info
    return Checkpoint(ref, config, head, head_task(ref, head), reader, names, infos)


# ----------------------------------------------------------------------------------------------------
# checks


def check_compatible(models: list[Checkpoint], base: Checkpoint | None) -> None:
    first = models[0]
    for other in models[1:] + ([base] if base else []):
        role = "base model" if other is base else "model"
        if other.config.model_type != first.config.model_type:
            raise MergeLabError(f"{role} {other.ref.spec!r} is a {other.config.model_type} model but "
                                f"{first.ref.spec!r} is {first.config.model_type}; merge models of one architecture")
        if (vocabulary_fingerprint(other.ref) != vocabulary_fingerprint(first.ref)
                or other.config.vocab_size != first.config.vocab_size):
            raise MergeLabError(f"{role} {other.ref.spec!r} uses a different vocabulary from {first.ref.spec!r}; "
                                "merged embeddings would mix unrelated tokens")
        for name, info in first.infos.items():
            if info.group in HEAD_GROUPS or name not in other.names:
                continue
            if other.meta(name)[1] != first.meta(name)[1]:
                raise MergeLabError(f"{role} {other.ref.spec!r} has {name} of shape {list(other.meta(name)[1])}, "
                                    f"{first.ref.spec!r} of shape {list(first.meta(name)[1])}: the architectures "
                                    "differ (hidden size, layers or heads)")
        missing = [n for n, i in first.infos.items() if i.group not in HEAD_GROUPS + ("pooler",)
                   and n not in other.names]
        if missing:
            raise MergeLabError(f"{role} {other.ref.spec!r} has no parameter {missing[0]} that "
                                f"{first.ref.spec!r} has: the architectures differ")


# ----------------------------------------------------------------------------------------------------
# the plan: which tensor goes where, how


@dataclass
class Plan:
    method: Method
    params: dict[str, Any]
    models: list[Checkpoint]
    base: Checkpoint | None
    components: tuple[str, ...]
    fallback: str
    heads: str  # "merge" | "separate" | "none"
    encoder: list[str] = field(default_factory=list)  # canonical names merged into the shared model
    head_groups: dict[str, list[int]] = field(default_factory=dict)  # separate heads: task -> model indices
    notes: list[str] = field(default_factory=list)

    def by_method(self, name: str) -> bool:
        return self.models[0].infos[name].group in self.components


def _plan(method: Method, params: dict, models: list[Checkpoint], base: Checkpoint | None,
          components: tuple[str, ...], fallback: str, heads: str) -> Plan:
    with_heads = [m for m in models if m.head.kind is not None]
    same = bool(with_heads) and len(with_heads) == len(models) and len({m.head for m in models}) == 1
    if heads == "auto":
        heads = "merge" if same else ("separate" if with_heads else "none")
    elif heads == "merge" and not same:
        labels = ", ".join(f"{m.ref.spec}: {m.task or m.head.kind}" for m in models)
        raise MergeLabError(f"heads=merge needs models with one label set, but they differ ({labels}); "
                            "use heads=separate to keep one head per task")
    plan = Plan(method, params, models, base, components, fallback, heads if with_heads else "none")
    first = models[0]
    if plan.heads == "separate":
        for i, m in enumerate(models):
            if m.head.kind is None:
                continue
            if m.task is None:
                raise MergeLabError(f"model {m.ref.spec!r} has a {m.head.kind} head but MergeLab cannot tell its "
                                    f"task (no {METADATA}); give models with recorded tasks, or heads=merge")
            plan.head_groups.setdefault(m.task, []).append(i)
        for task, members in plan.head_groups.items():
            if len(members) > 1:
                plan.notes.append(f"{task} head: {len(members)} models share it; their heads are averaged")
    shared = [n for n, info in first.infos.items() if info.group not in HEAD_GROUPS or plan.heads == "merge"]
    extra = [n for m in models[1:] for n, info in m.infos.items() if info.group == "pooler" and n not in first.infos]
    plan.encoder = shared + sorted(set(extra))
    for n in sorted(set(extra)):
        plan.notes.append(f"{n}: only some models have it; averaged over those")
    return plan


def _holders(plan: Plan, name: str) -> list[int]:
    return [i for i, m in enumerate(plan.models) if name in m.names]


def _info(plan: Plan, name: str) -> ParamInfo:
    return next(m.infos[name] for m in plan.models if name in m.infos)


def _weights(params: dict, n: int, device) -> torch.Tensor:
    raw = params.get("weights")
    if raw is None:
        return torch.full((n,), 1.0 / n, device=device)
    if len(raw) != n:
        raise MergeLabError(f"parameter 'weights' has {len(raw)} values for {n} models; give one per model")
    w = torch.tensor(raw, dtype=torch.float32, device=device)
    if w.sum() <= 0:
        raise MergeLabError("parameter 'weights' must not be all zero")
    return w / w.sum()


def _seed(seed: int, name: str) -> int:
    return zlib.crc32(f"{seed}:{name}".encode())


# ----------------------------------------------------------------------------------------------------
# the merge


@dataclass
class MergeResult:
    out: Path | None
    config: dict  # what merge_config.json holds
    report: dict[str, dict]  # per-parameter diagnostics (e.g. CG residuals)
    notes: list[str]
    tasks: list[str]  # tasks the merged model has heads for
    seconds: float
    state: dict[str, torch.Tensor] | None = None  # in-memory result (out=None)
    heads: dict[str, dict[str, torch.Tensor]] | None = None


def merge(method: str, models: list[str], *, out: str | Path | None = None, base: str | None = None,
          params: dict[str, Any] | None = None, components: list[str] | tuple[str, ...] | None = None,
          fallback: str = "average", heads: str = "auto", stats_tasks: list[str] | None = None,
          stats_files: list[str] | None = None, seed: int = 0, overwrite: bool = False,
          allow_pickle: bool = False, device: str | None = None,
          progress: ProgressFn | None = None) -> MergeResult:
    """Merge `models` with `method` and write the result to `out` (or keep it in memory when None).

    `params` are the method's parameters (see `merging_core.methods.METHODS[name].params`),
    `components` the parameter groups the method applies to (default: all), the rest following
    `fallback`. `stats_tasks` names the data each model's statistics come from (default: its own
    task); `stats_files` gives precomputed statistics files instead (one per model, or none).
    """
    started = time.perf_counter()
    spec = get_method(method)
    params = spec.parse(params)
    if "seed" in params:
        seed = params["seed"]
    components = tuple(components) if components else GROUPS
    unknown = [c for c in components if c not in GROUPS]
    if unknown:
        raise MergeLabError(f"unknown component {unknown[0]!r}; choose from: {', '.join(GROUPS)}")
    if fallback not in FALLBACKS:
        raise MergeLabError(f"fallback must be one of {list(FALLBACKS)}, got {fallback!r}")
    if heads not in HEAD_POLICIES:
        raise MergeLabError(f"heads must be one of {list(HEAD_POLICIES)}, got {heads!r}")
    models = list(models)
    if len(models) < spec.min_models or (spec.max_models and len(models) > spec.max_models):
        need = (f"exactly {spec.min_models}" if spec.min_models == spec.max_models else f"at least {spec.min_models}")
        raise MergeLabError(f"method {method!r} needs {need} models, got {len(models)}")
    if out is not None:
        out = check_out(out, overwrite)

    checkpoints = [open_checkpoint(m, allow_pickle=allow_pickle) for m in models]
    base_spec = base or (recorded_base(checkpoints) if spec.base_required(params) else None)
    if spec.base_required(params) and base_spec is None:
        raise MergeLabError(f"method {method!r} adds task vectors to a base model; pass --base "
                            "(e.g. --base minilm), the model the inputs were fine-tuned from")
    base_ckpt = open_checkpoint(base_spec, allow_pickle=allow_pickle) if base_spec else None
    check_compatible(checkpoints, base_ckpt)
    plan = _plan(spec, params, checkpoints, base_ckpt, components, fallback, heads)
    device = torch.device(device) if device else settings.device()

    kinds = spec.stats_required(params)
    stats, stats_records = _gather_stats(plan, kinds, params, stats_tasks, stats_files,
                                         scaled(progress, 0.0, 0.5 if kinds else 0.0, "statistics: "))
    weights = _weights(params, len(checkpoints), device)
    context = {}
    if spec.prepare is not None:
        context = spec.prepare(lambda: _method_tensors(plan, device), params)

    merged_progress = scaled(progress, 0.5 if kinds else 0.0, 0.95, "merging: ")
    report: dict[str, dict] = {}

    def merged_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name in track(plan.encoder, len(plan.encoder), f"{method} merge", merged_progress):
            yield name, _merge_one(plan, name, weights, stats, context, report, seed, device)

    config = {
        "method": method, "models": [c.ref.spec for c in checkpoints], "base": base_spec, "params": params,
        "components": list(components), "fallback": fallback, "heads": plan.heads, "seed": seed,
        "stats_tasks": [r["task"] for r in stats_records] if stats_records else None, "stats": stats_records,
        "mergelab_version": __version__,
    }
    head_tensors = {task: _head(plan, members) for task, members in plan.head_groups.items()}
    tasks = sorted(head_tensors) if plan.heads == "separate" else (
        [checkpoints[0].task] if plan.heads == "merge" and checkpoints[0].task else [])
    if out is None:
        state = dict(merged_tensors())
        return MergeResult(None, config, report, plan.notes, tasks, time.perf_counter() - started, state, head_tensors)
    with staging(out, overwrite=overwrite) as tmp:
        _write(tmp, plan, merged_tensors(), head_tensors)
        config["seconds"] = round(time.perf_counter() - started, 2)
        yaml_text = mergekit_yaml(plan, base_spec)
        if yaml_text:
            (tmp / "mergekit.yaml").write_text(yaml_text)
        config["mergekit"] = "mergekit.yaml" if yaml_text else (
            "not expressible in mergekit (per-task heads, a subset of components, TIES scope model, "
            "a data-aware method, or a base of another architecture class)")
        (tmp / "merge_config.json").write_text(json.dumps({**config, "report": report, "notes": plan.notes},
                                                          indent=2) + "\n")
        metadata = {"kind": "merge", "method": method, "models": config["models"], "base": base_spec,
                    "task": tasks[0] if plan.heads == "merge" and tasks else None,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if plan.heads == "separate":
            metadata["heads"] = {t: f"heads/{t}.safetensors" for t in tasks}
        (tmp / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
    if progress:
        progress(1.0, "merged")
    return MergeResult(out, config, report, plan.notes, tasks, time.perf_counter() - started)


def _head(plan: Plan, members: list[int]) -> dict[str, torch.Tensor]:
    """One task's head (file naming), averaged over the models of that task when there are several."""
    first = plan.models[members[0]]
    names = [n for n, info in first.infos.items() if info.group in HEAD_GROUPS]
    return {first.names[n]: torch.stack([plan.models[i].get(n).float() for i in members]).mean(0).to(first.meta(n)[0])
            for n in names}


def recorded_base(models: list[Checkpoint]) -> str | None:
    """The base every input records in its metadata, when they agree."""
    bases = {m.ref.metadata().get("base") for m in models}
    return bases.pop() if len(bases) == 1 else None


def _method_tensors(plan: Plan, device) -> Iterator[tuple[str, ParamInfo, list[torch.Tensor], torch.Tensor | None]]:
    """(name, info, tensors, base) of every parameter the method merges with all models, for `prepare`."""
    for name in plan.encoder:
        if not plan.by_method(name) or len(_holders(plan, name)) != len(plan.models):
            continue
        base = plan.base.get(name).to(device, torch.float32) if plan.base and name in plan.base.names else None
        if plan.base is not None and base is None:
            continue
        yield name, _info(plan, name), [m.get(name).to(device, torch.float32) for m in plan.models], base


def _merge_one(plan: Plan, name: str, weights: torch.Tensor, stats: list[dict] | None, context: dict,
               report: dict, seed: int, device) -> torch.Tensor:
    holders = _holders(plan, name)
    first = plan.models[holders[0]]
    dtype = first.meta(name)[0]
    if not dtype.is_floating_point:
        return first.get(name)
    tensors = [plan.models[i].get(name).to(device, torch.float32) for i in holders]
    base = None
    if plan.base is not None and name in plan.base.names:
        base = plan.base.get(name).to(device, torch.float32)
    uses_method = plan.by_method(name) and len(holders) == len(plan.models)
    if uses_method and base is None and plan.method.base_required(plan.params):
        uses_method = False  # e.g. a head the base model does not have
        plan.notes.append(f"{name}: the base model has no such parameter; {plan.fallback} used")
    if not uses_method:
        if plan.fallback == "first" and holders[0] == 0:
            merged = tensors[0]
        else:
            merged = sum_weighted(tensors, torch.full((len(tensors),), 1 / len(tensors)))
    else:
        job = TensorJob(name=name, info=_info(plan, name), tensors=tensors, weights=weights, params=plan.params,
                        base=base, stats=[s.get(name, {}) for s in stats] if stats is not None else None,
                        context=context, seed=_seed(seed, name))
        merged = plan.method.merge_tensor(job)
        if job.report:
            report[name] = job.report
    # One finiteness check on the output (a NaN input shows up there); only then look for its source.
    if not _all_finite(merged):
        inputs = [(f"model {plan.models[i].ref.spec!r}", t) for i, t in zip(holders, tensors)]
        for what, t in inputs + ([(f"base model {plan.base.ref.spec!r}", base)] if base is not None else []):
            if not _all_finite(t):
                raise MergeLabError(f"parameter {name} of {what} contains NaN or inf values; the checkpoint is "
                                    "broken, retrain or re-export it")
        raise MergeLabError(f"method {plan.method.name!r} produced NaN/inf for {name}; check its parameters "
                            "(e.g. a zero weight sum or an all-zero statistic)")
    return merged.to(dtype).cpu()


def _all_finite(t: torch.Tensor) -> bool:
    """A NaN or inf anywhere makes the sum non-finite; the sum is ~10x cheaper than an element-wise
    isfinite. A sum that overflows on finite values is rechecked element-wise."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _gather_stats(plan: Plan, kinds: tuple[str, ...], params: dict, stats_tasks: list[str] | None,
                  stats_files: list[str] | None, progress: ProgressFn | None) -> tuple[list[dict] | None, list[dict]]:
    if not kinds:
        return None, []
    n = len(plan.models)
    if stats_files:
        if len(stats_files) != n:
            raise MergeLabError(f"{len(stats_files)} statistics files for {n} models; give one per model")
        loaded = [load_stats(p) for p in stats_files]
        for (values, rec), path in zip(loaded, stats_files):
            missing = [k for k in kinds if not any(k in v for v in values.values())]
            if missing:
                raise MergeLabError(f"statistics file {path} holds {rec.get('kind')}, but the merge needs {missing[0]}")
        return [values for values, _ in loaded], [rec for _, rec in loaded]
    if stats_tasks and len(stats_tasks) not in (1, n):
        raise MergeLabError(f"{len(stats_tasks)} statistics tasks for {n} models; give one, or one per model")
    results, records = [], []
    for i, m in enumerate(plan.models):
        task = (stats_tasks[i] if stats_tasks and len(stats_tasks) == n else stats_tasks[0] if stats_tasks else m.task)
        if task is None:
            raise MergeLabError(f"model {m.ref.spec!r} has no recorded task to compute statistics on; "
                                "pass --stats-task TASK")
        part = scaled(progress, i / n, (i + 1) / n, f"{m.ref.name}: ")
        results.append(statistics(m.ref, task, kinds, params, progress=part))
        records.append({"model": m.ref.spec, "task": get_task(task).name, "kinds": list(kinds),
                        **{k: params[k] for k in ("examples", "mask_padding", "fisher_labels", "gradients")
                           if k in params}})
    return results, records


def _write(folder: Path, plan: Plan, tensors: Iterator[tuple[str, torch.Tensor]],
           heads: dict[str, dict[str, torch.Tensor]]) -> None:
    """The merged model as an HF folder: one model (shared head) or encoder + heads/ (separate heads)."""
    first = plan.models[0]
    architectures = first.config.get("architectures")
    if plan.heads == "separate" or plan.heads == "none" and first.head.kind is None:
        names = {n: n for n in plan.encoder}  # the bare encoder's naming (BertModel)
        architectures = [_encoder_class(first.config)]
    else:
        names = {n: first.names.get(n) or _prefixed(first, n) for n in plan.encoder}
    layout = {names[n]: _meta(plan, n) for n in plan.encoder}
    with StreamingWriter(folder / "model.safetensors", layout, {"format": "pt"}) as writer:
        for name, tensor in tensors:
            writer.write(names[name], tensor)
    first.config.save(folder, architectures=architectures)
    copy_tokenizer(first.ref, folder)
    if plan.heads == "separate":
        (folder / "heads").mkdir()
        for task, tensors_ in heads.items():
            save_file({k: v.contiguous() for k, v in tensors_.items()}, folder / "heads" / f"{task}.safetensors")


def _encoder_class(config: ConfigView) -> str:
    """The bare encoder class of a model family, e.g. BertModel for BertForSequenceClassification."""
    for name in config.get("architectures") or []:
        for suffix in HEAD_SUFFIXES:
            if name.endswith(suffix):
                return name.removesuffix(suffix) + "Model"
        if name.endswith("Model"):
            return name
    return {"bert": "BertModel", "roberta": "RobertaModel", "electra": "ElectraModel"}.get(config.model_type, "AutoModel")


def _prefixed(first: Checkpoint, name: str) -> str:
    """Model A's naming for a parameter only another model has (e.g. the pooler)."""
    prefix = next(iter(first.names.values())).removesuffix(next(iter(first.names)))
    return prefix + name


def _meta(plan: Plan, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
    holder = plan.models[_holders(plan, name)[0]]
    return holder.meta(name)


def mergekit_yaml(plan: Plan, base: str | None) -> str | None:
    """The same merge as a mergekit config, when mergekit can express it (all components, one head)."""
    if plan.method.mergekit is None or plan.heads == "separate" or set(plan.components) != set(GROUPS):
        return None
    if plan.base is not None and plan.method.base_required(plan.params) and \
            plan.base.config.get("architectures") != plan.models[0].config.get("architectures"):
        return None  # e.g. a bare BertModel base under classifiers: mergekit refuses mixed architectures
    pieces = plan.method.mergekit(plan.params)
    if pieces is None:
        return None
    lines = [f"# written by MergeLab {__version__}: the same merge in mergekit", f"merge_method: {pieces['merge_method']}"]
    if pieces.get("note"):
        lines.insert(1, f"# note: {pieces['note']}")
    if base and plan.method.base_required(plan.params):
        lines.append(f"base_model: {_location(base)}")
    lines.append("models:")
    per_model = pieces.get("per_model") or [{"weight": pieces.get("default_weight", 1.0)}] * len(plan.models)
    for m, extra in zip(plan.models, per_model):
        lines.append(f"  - model: {m.ref.location}")
        values = {**extra, **pieces.get("model_parameters", {})}
        lines.append("    parameters: {" + ", ".join(f"{k}: {v}" for k, v in values.items()) + "}")
    if pieces.get("parameters"):
        lines.append("parameters: {" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in pieces["parameters"].items()) + "}")
    if pieces.get("first_is_base"):
        lines.append(f"base_model: {plan.models[0].ref.location}")
    lines.append("dtype: float32")
    return "\n".join(lines) + "\n"


def _location(spec: str) -> str:
    return resolve(spec).location


def merge_from_config(path: str | Path, out: str | Path | None = None, **overrides: Any) -> MergeResult:
    """Re-run the merge a `merge_config.json` (or its folder) describes."""
    path = Path(path)
    config = json.loads((path / "merge_config.json" if path.is_dir() else path).read_text())
    kwargs = {k: config[k] for k in ("models", "base", "params", "components", "fallback", "heads", "seed")}
    kwargs["stats_tasks"] = config.get("stats_tasks")
    return merge(config["method"], out=out, **{**kwargs, **overrides})


def available_methods() -> list[dict]:
    """The registry as plain data (for the CLI's listing and the app's controls)."""
    return [{"name": m.name, "title": m.title, "family": m.family, "paper": m.paper, "doc": m.doc,
             "needs_base": m.needs_base if not callable(m.needs_base) else "depends on init",
             "params": [p.__dict__ for p in m.params]} for m in METHODS.values()]
