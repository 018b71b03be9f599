"""Merge N checkpoints with any registered method, per component, with heads handled per task.

The engine reads every input lazily (safetensors, mmap), walks the parameters in order and asks the
method for one merged tensor at a time, then streams it to the output file: peak memory is about one
tensor per input model. Data-aware methods first get their statistics (`merging_core.stats`: cached,
or loaded from files somebody else computed), then run per tensor on the GPU when there is one.

Names are compared in *canonical* form (the task wrapper's `bert.` prefix stripped), so a
`BertForSequenceClassification`, a `BertForTokenClassification` and the bare `BertModel` base align.

Components: `components` picks parameter groups (embeddings, attention, feed_forward, layer_norm,
pooler, head, mlm_head, lm_head, other: `arch.GROUPS`) that the method merges; the rest follow `fallback`
("average" or "first" = keep model A). Every family with an adapter (`arch`) maps each tensor to its
group; a family without one gets groups guessed from names, and the merge's notes say so.

Heads: models with the same label set may merge their heads (`heads="merge"`, the default when all
label sets agree, and for causal / seq2seq LMs, whose LM head is the head); otherwise every task keeps
its own head (`heads="separate"`) and the output is a multi-head checkpoint: the merged encoder plus
one head file per task. Head tensors of a kind MergeLab does not know (a multiple-choice head) are
merged like the rest, never dropped.

(IA)³ modules can be merged in module space (`space="module"`, see `module_space`): the method then
merges their scaling vectors, with the (IA)³ initialisation (all ones) as the base of task vectors and
statistics of the vectors themselves, and the merged vectors are folded into the base for the output;
heads are handled as above.

The output folder is an HF model (config, tokenizer, safetensors) plus `merge_config.json`, which
`merge_from_config` turns back into the same merge (seed included), and `mergekit.yaml` when mergekit
can express the merge.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from safetensors.torch import save_file

from . import caches, module_space, settings
from ._version import __version__
from .arch import ParamInfo, fallback_note
from .checkpoint import HEAD_GROUPS, Checkpoint, check_compatible, open_checkpoint, recorded_base
from .errors import MergeLabError, writing
from .methods import METHODS, Method, TensorJob, WholeModel, fused, get_method, sum_weighted
from .models import HEAD_SUFFIXES, METADATA, ConfigView, copy_tokenizer, resolve, task_head_kwargs
from .outputs import check_out, staging
from .progress import ProgressFn, scaled, track
from .spec import MergeSpec
from .stats import load_stats, settings_of, statistics
from .tasks import get_task
from .tensorio import OUTPUT_DTYPES, SHARD_SIZE, ShardedWriter, memory_bytes, read_ahead, write_behind


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
    block_lambdas: dict[tuple[str | None, int], float] = field(default_factory=dict)  # (stack, layer) -> λ
    in_place: bool = False  # large tensors read in place (mapped, as stored): longer slices, no process memory
    beyond_memory: bool = False  # inputs and output exceed the memory: the merge releases what it has used

    def by_method(self, name: str) -> bool:
        # from whichever model holds it: a token classifier (first) has no pooler, a sequence one does
        return next(m.infos[name] for m in self.models if name in m.infos).group in self.components


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
    if first.adapter is not None and first.adapter.generic:
        plan.notes.append(fallback_note(first.config.model_type, first.infos.values()))
    # heads "none": no model has a head MergeLab knows the kind of (a bare encoder has no head tensors; a
    # multiple-choice or QA model has some). Those tensors are merged like the rest, not dropped.
    shared = [n for n, info in first.infos.items() if info.group not in HEAD_GROUPS or plan.heads != "separate"]
    extra = [n for m in models[1:] for n, info in m.infos.items() if info.group == "pooler" and n not in first.infos]
    plan.encoder = shared + sorted(set(extra))
    for n in sorted(set(extra)):
        plan.notes.append(f"{n}: only some models have it; averaged over those")
    if plan.heads == "none":
        for n in shared:
            if first.infos[n].group in HEAD_GROUPS and len(_holders(plan, n)) < len(models):
                plan.notes.append(f"{n}: only some models have it; averaged over those")
    return plan


def _block_lambdas(plan: Plan, values: tuple[float, ...]) -> dict[tuple[str | None, int], float]:
    """The blocks of the method's parameters in stack order, each paired with its λ."""
    blocks = list(dict.fromkeys(info.block for name in plan.encoder if plan.by_method(name)
                                for info in [_info(plan, name)] if info.layer is not None))
    if len(values) != len(blocks):
        raise MergeLabError(f"layer_lambdas has {len(values)} values, but {plan.models[0].ref.spec!r} has {len(blocks)} "
                            f"transformer blocks among the merged components; give one λ per block",
                            param="layer_lambdas")
    return dict(zip(blocks, values))


def _job_params(plan: Plan, name: str) -> dict[str, Any]:
    """The method's parameters for one tensor: its block's own λ where `layer_lambdas` gives one."""
    if plan.block_lambdas:
        block = _info(plan, name).block
        if block in plan.block_lambdas:
            return {**plan.params, "lambda": plan.block_lambdas[block]}
    return plan.params


def _holders(plan: Plan, name: str) -> list[int]:
    return [i for i, m in enumerate(plan.models) if name in m.names]


def _stored_in(plan: Plan, name: str) -> list[Checkpoint]:
    """Every input checkpoint that holds parameter `name`: the models that have it, and the base when it does."""
    base = [plan.base] if plan.base is not None and name in plan.base.names else []
    return [plan.models[i] for i in _holders(plan, name)] + base


def _stored_bytes(plan: Plan, name: str) -> int:
    """The bytes parameter `name` takes in all the input checkpoints together."""
    return sum(m.meta(name)[0].itemsize * math.prod(m.meta(name)[1]) for m in _stored_in(plan, name))


def _info(plan: Plan, name: str) -> ParamInfo:
    return next(m.infos[name] for m in plan.models if name in m.infos)


def _weights(params: dict, n: int, device) -> torch.Tensor:
    raw = params.get("weights")
    if raw is None:
        return torch.full((n,), 1.0 / n, device=device)
    if len(raw) != n:
        raise MergeLabError(f"parameter 'weights' has {len(raw)} values for {n} models; give one per model")
    # Normalised in float64: in float32, weights such as 3e38 sum to inf and every weight becomes 0.
    w = torch.tensor(raw, dtype=torch.float64)
    total = float(w.sum())
    if not math.isfinite(total) or total <= 0:
        raise MergeLabError(f"parameter 'weights' ({', '.join(f'{v:g}' for v in raw)}) must have a finite, "
                            "positive sum", param="weights", hint="e.g. weights=3,1")
    return (w / total).to(torch.float32).to(device)


def _seed(seed: int, name: str) -> int:
    return zlib.crc32(f"{seed}:{name}".encode())


# ----------------------------------------------------------------------------------------------------
# the merge


@dataclass
class MergeResult:
    out: Path | None
    spec: MergeSpec  # what ran, resolved (recorded base, statistics tasks, head policy)
    config: dict  # what merge_config.json holds: the spec, the statistics' records, the version
    report: dict[str, dict]  # per-parameter diagnostics (e.g. CG residuals)
    notes: list[str]
    tasks: list[str]  # tasks the merged model has heads for
    seconds: float
    state: dict[str, torch.Tensor] | None = None  # in-memory result (out=None)
    heads: dict[str, dict[str, torch.Tensor]] | None = None


def merge(spec: MergeSpec | str, models: Sequence[str] | None = None, *, out: str | Path | None = None,
          overwrite: bool = False, progress: ProgressFn | None = None, **fields: Any) -> MergeResult:
    """Run the merge `spec` describes and write it to `out` (or keep it in memory when None).

    `spec` is a `MergeSpec`, or a method name with `models` and the spec's other fields as keywords:
    `merge("ties", ["sst2-s0", "sst2-s1"], base="minilm", params={"density": 0.2})`. Every front end
    (CLI, app, compare, greedy, curves) ends here.
    """
    started = time.perf_counter()
    caches.reuse_buffers()  # slices reuse the heap, not fresh maps the kernel must zero; trimmed at the end
    if not isinstance(spec, MergeSpec):
        spec = MergeSpec(spec, tuple(models or ()), **fields)
    elif models is not None or fields:
        raise TypeError("merge(spec) takes the whole request in the MergeSpec; pass no models or fields beside it")
    method = get_method(spec.method)
    params = dict(spec.params)
    if out is not None:
        out = check_out(out, overwrite)

    checkpoints = [open_checkpoint(m, allow_pickle=spec.allow_pickle) for m in spec.models]
    base_spec = spec.base or (recorded_base(checkpoints) if method.base_required(params) else None)
    if method.base_required(params) and base_spec is None:
        raise MergeLabError(f"method {spec.method!r} adds task vectors to a base model, and the inputs record "
                            "none; give the model they were fine-tuned from", param="base", hint="e.g. minilm")
    base_ckpt = open_checkpoint(base_spec, allow_pickle=spec.allow_pickle) if base_spec else None
    check_compatible(checkpoints, base_ckpt)
    plan = _plan(method, params, checkpoints, base_ckpt, spec.components, spec.fallback, spec.heads)
    work = _vector_plan(plan) if spec.space == "module" else plan  # what the method merges
    if spec.layer_lambdas is not None:
        work.block_lambdas = _block_lambdas(work, spec.layer_lambdas)
    device = _device(spec.device)

    kinds = method.stats_required(params)
    stats, stats_records = _gather_stats(work, kinds, params, spec.stats_tasks, spec.stats_files,
                                         scaled(progress, 0.0, 0.5 if kinds else 0.0, "statistics: "), spec.space)
    weights = _weights(params, len(checkpoints), device)
    # compiled kernels (TIES's), where the merge is large enough to repay; a method may read the inputs as
    # stored and write the output's dtype (with its kernels, or always: `Method.raw_inputs`)
    compiled = method.compiled and fused.wanted(
        device, len(work.models) * sum(math.prod(_meta(work, n)[1]) for n in _method_names(work)))
    raw = device.type == "cpu" and (method.raw_inputs == "always" or compiled and method.raw_inputs == "compiled")
    work.in_place = plan.in_place = raw
    work.beyond_memory = plan.beyond_memory = out is not None and _beyond_memory(plan)
    context = {}
    if method.prepare is not None:
        whole = WholeModel(_method_names(work), lambda: _method_tensors(work, device), stats,
                           lambda: _method_sample(work, device),
                           (lambda: _method_stored(work, device)) if raw else None)
        with _spare_core(compiled):
            context = method.prepare(whole, params)
    if raw:
        context = {**context, "raw_inputs": True, "out_dtype": OUTPUT_DTYPES[spec.dtype] if spec.dtype else None}
    if compiled:
        context = {**context, "fused": True}

    merged_progress = scaled(progress, 0.5 if kinds else 0.0, 0.95, "merging: ")
    report: dict[str, dict] = {}

    def merged_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        if spec.space == "module":
            merged = {}
            for name, part in _merged_parts(work, work.encoder, weights, stats, context, report, spec.seed, device,
                                            merged_progress, f"{spec.method} merge of the (IA)3 vectors"):
                merged[name] = part.view(_meta(work, name)[1])  # (IA)3 vectors are small: always whole
            yield from ((name, t.to(_out_dtype(plan, name, spec.dtype))) for name, t in _folded(plan, merged))
            return
        for name, part in _merged_parts(plan, plan.encoder, weights, stats, context, report, spec.seed, device,
                                        merged_progress, f"{spec.method} merge"):
            part = part.to(_out_dtype(plan, name, spec.dtype))
            yield name, part
            del part  # (a streamed slice is written by now)
        if context.get("fused") and fused.failure():
            plan.notes.append(f"compiled kernels unavailable here ({fused.failure()}); merged with eager PyTorch")

    # What ran, fully resolved (recorded base, per-model statistics tasks, the head policy chosen), so
    # that merge_config.json re-runs exactly this merge.
    resolved = replace(spec, models=tuple(c.ref.spec for c in checkpoints), base=base_spec, heads=plan.heads,
                       stats_tasks=(tuple(r.get("task") for r in stats_records)
                                    if stats_records and not spec.stats_files else None))
    records = [{k: v for k, v in r.items() if k != "model_location"} if settings.public_mode() else r
               for r in stats_records]  # no server paths in what a public user downloads
    config = {**resolved.to_dict(), "stats": records, "mergelab_version": __version__}
    head_tensors = {task: _head(plan, members) for task, members in plan.head_groups.items()}
    tasks = sorted(head_tensors) if plan.heads == "separate" else (
        [checkpoints[0].task] if plan.heads == "merge" and checkpoints[0].task else [])
    if out is None:
        state = _assembled(plan, merged_tensors())
        return MergeResult(None, resolved, config, report, plan.notes, tasks, time.perf_counter() - started, state,
                           head_tensors)
    with writing(out), staging(out, overwrite=overwrite) as tmp:  # a full disk: one line naming `out`
        _write(tmp, plan, merged_tensors(), head_tensors, spec.dtype, spec.shard_size or SHARD_SIZE)
        config["seconds"] = round(time.perf_counter() - started, 2)
        yaml_text = mergekit_yaml(plan, base_spec) if spec.space == "weights" else None
        if yaml_text:
            (tmp / "mergekit.yaml").write_text(yaml_text)
        config["mergekit"] = "mergekit.yaml" if yaml_text else (
            "not expressible in mergekit (per-task heads, a subset of components, per-block lambdas, TIES scope "
            "model, a data-aware method, module space, or a base of another architecture class)")
        (tmp / "merge_config.json").write_text(json.dumps({**config, "report": report, "notes": plan.notes},
                                                          indent=2) + "\n")
        metadata = {"kind": "merge", "method": spec.method, "models": config["models"], "base": base_spec,
                    "task": tasks[0] if plan.heads == "merge" and tasks else None,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if plan.heads == "separate":
            metadata["heads"] = {t: f"heads/{t}.safetensors" for t in tasks}
        (tmp / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
    caches.trim()
    if progress:
        progress(1.0, "merged")
    return MergeResult(out, resolved, config, report, plan.notes, tasks, time.perf_counter() - started)


def _device(name: str | None) -> torch.device:
    """Where the merge's math runs: the device asked for, else the GPU when there is one."""
    if not name:
        return settings.device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MergeLabError(f"device {name!r} is not a device; use cpu, cuda or cuda:N", param="device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MergeLabError(f"device {name!r} asked for, but CUDA is not available here; use cpu", param="device")
    return device


def _vector_plan(plan: Plan) -> Plan:
    """The plan of a module-space merge: the (IA)³ vectors of every model, from the all-ones initialisation."""
    module_space.check_mergeable([m.ref for m in plan.models])
    vectors = [module_space.vectors(module_space.module_checkpoint(m.ref)) for m in plan.models]
    base = module_space.initialisation(vectors[0]) if plan.method.base_required(plan.params) else None
    work = Plan(plan.method, plan.params, vectors, base, plan.components, plan.fallback, "none")
    work.encoder = list(vectors[0].names)
    return work


def _folded(plan: Plan, merged: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """A module-space merge's output tensors: the base with the merged vectors folded in; a shared head
    (heads=merge) averaged, as a head the base lacks is in weight space."""
    folded = module_space.fold(plan.models[0].ref, merged)
    for name in plan.encoder:
        if _info(plan, name).group in HEAD_GROUPS or name not in folded:
            tensors = [plan.models[i].get(name).float() for i in _holders(plan, name)]
            yield name, _average(tensors).to(_meta(plan, name)[0])
        else:
            yield name, folded[name].to(_meta(plan, name)[0])


def _head(plan: Plan, members: list[int]) -> dict[str, torch.Tensor]:
    """One task's head (file naming), averaged over the models of that task when there are several."""
    first = plan.models[members[0]]
    names = [n for n, info in first.infos.items() if info.group in HEAD_GROUPS]
    return {first.names[n]: torch.stack([plan.models[i].get(n).float() for i in members]).mean(0).to(first.meta(n)[0])
            for n in names}


def _method_names(plan: Plan) -> list[str]:
    """Every parameter the method merges with all models (and the base, when there is one), for `prepare`."""
    return [name for name in plan.encoder
            if plan.by_method(name) and len(_holders(plan, name)) == len(plan.models)
            and (plan.base is None or name in plan.base.names)]


CHUNK = 1 << 21  # elements: the largest slice of one tensor an elementwise merge holds per input (8 MB in fp32)
IN_PLACE = 4  # slices this many times longer where the inputs are read in place (fewer steps, same memory)
WHOLE = 1 << 22  # elements: the largest tensor a method that scans (SLERP, TIES per tensor) takes whole (16 MB)
SAMPLE_BLOCKS, SAMPLE_BLOCK = 16, 1 << 10  # `WholeModel.sample`: 16 blocks of 1,024 values of each parameter
SCAN_BLOCKS, SCAN_BLOCK = 256, 1 << 10  # the sample of a large tensor a scan may use: 256 blocks of 1,024 values


@dataclass(frozen=True)
class Piece:
    """One parameter, or one flat slice [start, stop) of a large one."""

    name: str
    start: int = 0
    stop: int | None = None  # None: the whole tensor


def _pieces(plan: Plan, names: Sequence[str]) -> Iterator[Piece]:
    """The parameters `names` in order, the large ones cut into flat slices (`_sliced`)."""
    for name in names:
        dtype, shape = _meta(plan, name)
        numel = math.prod(shape)
        if dtype.is_floating_point and _sliced(plan, name, numel):
            size = CHUNK * (IN_PLACE if plan.in_place else 1)
            yield from (Piece(name, start, min(start + size, numel)) for start in range(0, numel, size))
        else:
            yield Piece(name)


def _sliced(plan: Plan, name: str, numel: int) -> bool:
    """Whether a parameter of `numel` values goes through in slices: over `CHUNK` values when the merge
    is elementwise there (the method is, or this parameter gets the fallback average or model A's copy);
    over `WHOLE` when the method scans a tensor first (`Method.scan`), which a smaller tensor is spared
    (it is read once); never otherwise."""
    if plan.method.merges_slices(plan.params) or not _uses_method(plan, name):
        return numel > CHUNK
    return plan.method.scanner(plan.params) is not None and numel > WHOLE


def _needs_scan(plan: Plan, name: str) -> bool:
    return _uses_method(plan, name) and not plan.method.merges_slices(plan.params)


def _uses_method(plan: Plan, name: str) -> bool:
    return plan.by_method(name) and len(_holders(plan, name)) == len(plan.models) and not (
        plan.method.base_required(plan.params) and (plan.base is None or name not in plan.base.names))


@dataclass
class Inputs:
    """A piece's tensors as read: one per model that holds the parameter, and the base's when it has it."""

    tensors: list[torch.Tensor]
    base: torch.Tensor | None


def _reader(plan: Plan, device: torch.device, raw: bool = False):
    """The function that reads one piece of every input; on the reader thread (`read_ahead`). On the CPU
    it also converts to float32, unless `raw` (a method that converts inside its compiled kernels): those
    read the file's cached pages in place, bf16 as stored, with no copy at all. For the GPU it leaves the
    values in page-locked memory, to be copied."""
    keep = raw or device.type == "cuda"
    mapped = raw and device.type == "cpu"

    def read(piece: Piece) -> Inputs:
        def get(model: Checkpoint) -> torch.Tensor:
            t = model.get(piece.name, piece.start, piece.stop, pin=device.type == "cuda", mapped=mapped)
            return t if keep or not t.dtype.is_floating_point else t.to(torch.float32)

        base = plan.base if plan.base is not None and piece.name in plan.base.names else None
        return Inputs([get(plan.models[i]) for i in _holders(plan, piece.name)], get(base) if base else None)
    return read


def _on_device(inputs: Inputs, device: torch.device) -> Inputs:
    """The inputs on the merge's device; a GPU gets them in float32 (on the CPU the reader converted them,
    or left them raw on purpose)."""
    if device.type == "cpu":
        return inputs

    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=True).to(torch.float32) if t.dtype.is_floating_point else t
    return Inputs([move(t) for t in inputs.tensors], move(inputs.base) if inputs.base is not None else None)


def _read_pieces(plan: Plan, pieces: Iterable[Piece], device, read=None) -> Iterator[tuple[Piece, Inputs]]:
    """Every piece with its inputs on `device`, the next one read meanwhile."""
    for piece, inputs in read_ahead(pieces, read or _reader(plan, device)):
        yield piece, _on_device(inputs, device)


def _spread(plan: Plan, name: str, blocks: int, block: int, read, device, cached: bool = False
            ) -> tuple[Inputs, int]:
    """`blocks` blocks of `block` values spread evenly over parameter `name` (all of it when that is no
    more), flat and joined; and the parameter's size. Many short blocks: a weight matrix's task vector
    varies from row to row, and a few long blocks (a few rows) can misplace its quantiles by 10%.
    `cached`: `read` maps the inputs in place and the parameter is in the page cache (prefetched), so the
    blocks are cut from one mapping per input instead of read one by one (on a cold page cache the
    mapping's faults would read far more of the file than the blocks)."""
    numel = math.prod(_meta(plan, name)[1])
    step = max(numel // blocks, block)
    if cached and numel >= blocks * step:  # one mapping per input, the blocks cut from it (no reads)
        whole = read(Piece(name, 0, numel))

        def cut(t: torch.Tensor) -> torch.Tensor:
            return t.flatten()[:blocks * step].view(blocks, step)[:, :block].reshape(-1)
        return Inputs([cut(t) for t in whole.tensors], cut(whole.base) if whole.base is not None else None), numel
    parts = [_on_device(read(Piece(name, start, min(start + block, numel))), device)  # (small reads: no thread)
             for start in range(0, numel, step)[:blocks]]
    tensors = [torch.cat([part.tensors[m] for part in parts]) for m in range(len(parts[0].tensors))]
    base = torch.cat([part.base for part in parts]) if parts[0].base is not None else None
    return Inputs(tensors, base), numel


def _method_sample(plan: Plan, device) -> Iterator[tuple[str, int, list[torch.Tensor], torch.Tensor | None]]:
    """(name, size, tensors, base) with `SAMPLE_BLOCKS` blocks spread over every parameter in
    `_method_names`: a cheap look at the whole model before a `prepare` pass over it (`WholeModel.sample`)."""
    read = _reader(plan, device)
    for name in _method_names(plan):
        inputs, size = _spread(plan, name, SAMPLE_BLOCKS, SAMPLE_BLOCK, read, device)
        yield name, size, inputs.tensors, inputs.base


def _method_tensors(plan: Plan, device) -> Iterator[tuple[str, ParamInfo, list[torch.Tensor], torch.Tensor | None]]:
    """(name, info, tensors, base) of every parameter in `_method_names`, read one at a time (a large one
    as flat slices, for a `prepare` that needs entries, not shapes)."""
    for piece, inputs in _read_pieces(plan, _pieces(plan, _method_names(plan)), device):
        yield piece.name, _info(plan, piece.name), inputs.tensors, inputs.base


def _method_stored(plan: Plan, device) -> Iterator[tuple[str, ParamInfo, list[torch.Tensor], torch.Tensor | None]]:
    """The pieces of `_method_tensors` as stored, the parameters in reverse order (a large one's slices in
    order: the way the disk reads it ahead into the page cache) (`WholeModel.stored`): the merge that
    follows starts with what this pass read last."""
    names = _method_names(plan)[::-1]
    pieces = list(_pieces(plan, names))
    ahead = _Lookahead(plan, [piece.name for piece in pieces if piece.start == 0 and piece.stop is not None],
                       compiled=True)
    with contextlib.closing(ahead):
        for piece, inputs in _read_pieces(plan, pieces, device, _reader(plan, device, raw=True)):
            ahead.reached(piece.name)
            yield piece.name, _info(plan, piece.name), inputs.tensors, inputs.base


def _merged_parts(plan: Plan, names: Sequence[str], weights: torch.Tensor, stats: list[dict] | None,
                  context: dict, report: dict, seed: int, device, progress: ProgressFn | None, what: str
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, merged values) for every parameter in order, on the CPU: a whole tensor, or consecutive flat
    slices of a large one when the merge is elementwise there. Reading runs one piece ahead."""
    pieces = list(_pieces(plan, names))
    read = _reader(plan, device, raw=context.get("raw_inputs", False))
    scanned: dict = {}  # what the method's scan of the current large tensor found
    # The disk reads the next large tensors into the page cache while this one is scanned and merged, or
    # merged in place from mapped pages (which would otherwise wait for the disk inside the kernels).
    ahead = _Lookahead(plan, [piece.name for piece in pieces if piece.start == 0 and piece.stop is not None
                              and (_needs_scan(plan, piece.name) or context.get("raw_inputs"))],
                       compiled=context.get("fused", False))
    # A merge reading its inputs in place leaves a core to the prefetch (only where it streams through it:
    # with every tensor whole, as TIES with mergekit's tie order holds them, the eager selection between
    # kernel calls wants every core)
    with _spare_core(context.get("raw_inputs", False) and bool(ahead.queue)), contextlib.closing(ahead):
        for piece, inputs in track(read_ahead(pieces, read), len(pieces), what, progress):
            here = context
            ahead.reached(piece.name)
            if piece.stop is not None and _needs_scan(plan, piece.name):
                if piece.start == 0:
                    def slices(name: str = piece.name) -> Iterator[TensorJob]:
                        return _slice_jobs(plan, name, read, weights, context, seed, device)
                    def sample(name: str = piece.name) -> tuple[TensorJob, int]:
                        return _sample_job(plan, name, read, weights, context, seed, device)
                    scanned = plan.method.scanner(plan.params)(slices, plan.params, sample)
                here = {**context, **scanned}
            merged = _merge_piece(plan, piece, _on_device(inputs, device), weights, stats, here, report, seed)
            del inputs  # before the next piece is read: at most two pieces' inputs in memory
            if plan.beyond_memory:
                ahead.release(piece)
            yield piece.name, merged
            del merged


def _beyond_memory(plan: Plan) -> bool:
    """Whether a merge's inputs and output together are larger than the machine's memory: then no input is
    still in the page cache when a later merge reads it, and the merge lets the cache drop each piece of
    input it has merged (`_release`) and the output it has written, so that the pages it reads ahead,
    and those a second pass over the model reads again, stay cached instead."""
    size = sum(_stored_bytes(plan, name) for name in plan.encoder)
    return size + size // (len(plan.models) + (plan.base is not None)) > memory_bytes()


def _release(plan: Plan, piece: Piece) -> None:
    """Let the page cache drop every input's pages of a piece that is merged."""
    for checkpoint in _stored_in(plan, piece.name):
        checkpoint.release(piece.name, piece.start, piece.stop)


@contextlib.contextmanager
def _spare_core(spare: bool) -> Iterator[None]:
    """With `spare`, torch computes on every core but one, which the reading, prefetching and writing
    threads need (OpenMP's idle workers would spin on it). Measured on 2 cores: a compiled TIES merge, and
    SLERP's eager blocks (memory-bound: one core does them about as fast as two) both gain at 7B."""
    threads = torch.get_num_threads()
    if spare:
        torch.set_num_threads(max(1, threads - 1))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _slice_jobs(plan: Plan, name: str, read, weights: torch.Tensor, context: dict, seed: int, device
                ) -> Iterator[TensorJob]:
    """A TensorJob per flat slice of one large parameter, read afresh (a method's `scan`)."""
    for _, inputs in _read_pieces(plan, _pieces(plan, [name]), device, read):
        yield _job(plan, name, inputs.tensors, inputs.base, weights, context, seed)


def _sample_job(plan: Plan, name: str, read, weights: torch.Tensor, context: dict, seed: int, device
                ) -> tuple[TensorJob, int]:
    """A TensorJob of `SCAN_BLOCKS` blocks spread evenly over one large parameter (a sample of its values
    that a scan may estimate from), and the parameter's size."""
    inputs, numel = _spread(plan, name, SCAN_BLOCKS, SCAN_BLOCK, read, device, cached=plan.in_place)
    return _job(plan, name, inputs.tensors, inputs.base, weights, context, seed), numel


LOOKAHEAD = 1 << 29  # bytes of input the prefetch thread may read ahead of the merge (more evicts pages before use)
HEAD_START = 8 << 30  # bytes it may read ahead while the kernels load (and at most a quarter of the memory)


class _Lookahead:
    """Reads the inputs of the large tensors ahead of a merge that scans them (two passes over each, the
    second from memory) or reads them in place (mapped pages, which would fault in from the disk inside the
    kernels), on a thread, into the page cache: the disk works while the CPU merges. At most `LOOKAHEAD`
    bytes ahead, so that nothing is evicted before it is used; further at the start of a pass whose
    `compiled` kernels have not run yet in this process (`HEAD_START`): the disk goes on reading while the
    first call loads them."""

    def __init__(self, plan: Plan, names: list[str], compiled: bool = False):
        self.plan, self.queue, self.sizes = plan, list(names), {}
        self.budget = min(HEAD_START, memory_bytes() // 4) if compiled and not fused.loaded() else LOOKAHEAD
        for name in names:
            self.sizes[name] = _stored_bytes(plan, name)
        self.sent: list[str] = []
        self.reads: dict[str, Future] = {}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="mergelab-prefetch")

    def reached(self, name: str) -> None:
        """The merge is at tensor `name`: send what follows it, up to the lookahead, and wait until `name`
        itself is read (the merge touching its pages first would read them too, in small pieces, against
        the prefetch's long reads)."""
        for passed in (self.sent, self.queue):
            if name in passed:
                del passed[:passed.index(name) + 1]
        while self.queue and sum(self.sizes[n] for n in self.sent) < max(self.budget, LOOKAHEAD):
            following = self.queue.pop(0)
            self.sent.append(following)
            self.reads[following] = self.pool.submit(self._read, following)
        self.budget = LOOKAHEAD  # (the head start: once)
        if name in self.reads:
            with contextlib.suppress(Exception):  # (a hint: a failed read is the merge's to report)
                self.reads.pop(name).result()

    def release(self, piece: Piece) -> None:
        """Let the page cache drop the inputs of a merged piece, on the prefetch thread (the calls take
        system time the merge's thread would otherwise spend), after the reads already sent."""
        self.pool.submit(_release, self.plan, piece)

    def _read(self, name: str) -> None:
        for checkpoint in _stored_in(self.plan, name):
            checkpoint.prefetch(name)

    def close(self) -> None:
        """Cancel the reads not started (a merge that failed); the releases sent still run."""
        for read in self.reads.values():
            read.cancel()
        self.pool.shutdown(wait=True)


def _job(plan: Plan, name: str, tensors: list[torch.Tensor], base: torch.Tensor | None, weights: torch.Tensor,
         context: dict, seed: int, stats: list[dict] | None = None) -> TensorJob:
    """What the method sees of parameter `name` (whole, a slice or a sample of it)."""
    return TensorJob(name=name, info=_info(plan, name), tensors=tensors, weights=weights,
                     params=_job_params(plan, name), base=base,
                     stats=[s.get(name, {}) for s in stats] if stats is not None else None,
                     context=context, seed=_seed(seed, name))


def _merge_piece(plan: Plan, piece: Piece, inputs: Inputs, weights: torch.Tensor, stats: list[dict] | None,
                 context: dict, report: dict, seed: int) -> torch.Tensor:
    name = piece.name
    holders = _holders(plan, name)
    tensors, base = inputs.tensors, inputs.base
    if not tensors[0].dtype.is_floating_point:
        return tensors[0]
    uses_method = _uses_method(plan, name)
    if plan.by_method(name) and len(holders) == len(plan.models) and not uses_method and piece.start == 0:
        plan.notes.append(f"{name}: the base model has no such parameter; {plan.fallback} used")  # e.g. a head
    if not uses_method:
        if plan.fallback == "first" and holders[0] == 0:
            merged = tensors[0]
        else:
            merged = _average([t.float() for t in tensors])  # (raw inputs, see `_reader`)
    else:
        job = _job(plan, name, tensors, base, weights, context, seed, stats)
        merged = plan.method.merge_tensor(job)
        if job.report:
            report[name] = job.report
    # One finiteness check on the output (a NaN input shows up there); only then look for its source.
    if not _all_finite(merged):
        inputs_ = [(f"model {plan.models[i].ref.spec!r}", t) for i, t in zip(holders, tensors)]
        for what, t in inputs_ + ([(f"base model {plan.base.ref.spec!r}", base)] if base is not None else []):
            if not _all_finite(t):
                raise MergeLabError(f"parameter {name} of {what} contains NaN or inf values; the checkpoint is "
                                    "broken, retrain or re-export it")
        raise MergeLabError(f"method {plan.method.name!r} produced NaN/inf for {name}; check its parameters "
                            "(e.g. a zero weight sum or an all-zero statistic)")
    return merged.cpu()


def _out_dtype(plan: Plan, name: str, dtype: str | None) -> torch.dtype:
    """The dtype written for a parameter: the one asked for (floats only), else the first holder's."""
    own = _meta(plan, name)[0]
    return OUTPUT_DTYPES[dtype] if dtype and own.is_floating_point else own


def _assembled(plan: Plan, parts: Iterator[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """An in-memory result: each parameter's slices joined back into its shape."""
    pieces: dict[str, list[torch.Tensor]] = {}
    for name, part in parts:
        pieces.setdefault(name, []).append(part)
    shape = {name: _meta(plan, name)[1] for name in pieces}
    return {name: (p[0] if len(p) == 1 else torch.cat(p)).view(shape[name]) for name, p in pieces.items()}


def _average(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The plain mean of the tensors (the fallback of parameters the method does not merge)."""
    return sum_weighted(tensors, torch.full((len(tensors),), 1 / len(tensors)))


def _all_finite(t: torch.Tensor) -> bool:
    """A NaN or inf anywhere makes the sum non-finite; the sum is ~10x cheaper than an element-wise
    isfinite. A sum that overflows on finite values is rechecked element-wise."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _gather_stats(plan: Plan, kinds: tuple[str, ...], params: dict, stats_tasks: list[str] | None,
                  stats_files: list[str] | None, progress: ProgressFn | None, space: str = "weights"
                  ) -> tuple[list[dict] | None, list[dict]]:
    if not kinds:
        return None, []
    n = len(plan.models)
    if stats_files:
        loaded = [load_stats(p) for p in stats_files]
        for (values, rec), path in zip(loaded, stats_files):
            missing = [k for k in kinds if not any(k in v for v in values.values())]
            if missing:
                raise MergeLabError(f"statistics file {path} holds {rec.get('kind')}, but the merge needs {missing[0]}",
                                    param="stats_files")
        return [values for values, _ in loaded], [rec for _, rec in loaded]
    results, records = [], []
    for i, m in enumerate(plan.models):
        task = (stats_tasks[i] if stats_tasks and len(stats_tasks) == n else stats_tasks[0] if stats_tasks else m.task)
        if task is None:
            raise MergeLabError(f"model {m.ref.spec!r} has no recorded task to compute statistics on; name the "
                                "task whose data to use", param="stats_tasks")
        part = scaled(progress, i / n, (i + 1) / n, f"{m.ref.name}: ")
        results.append(statistics(m.ref, task, kinds, params, space=space, progress=part))
        records.append({"model": m.ref.spec, "task": get_task(task).name, "kinds": list(kinds),
                        **({"space": space} if space != "weights" else {}), **settings_of(kinds, params)})
    return results, records


def _write(folder: Path, plan: Plan, tensors: Iterator[tuple[str, torch.Tensor]],
           heads: dict[str, dict[str, torch.Tensor]], dtype: str | None = None, shard_size: int = SHARD_SIZE) -> None:
    """The merged model as an HF folder: one model (shared head) or encoder + heads/ (separate heads), in
    shards of `shard_size` bytes (with an index) when it is larger, its floats in `dtype` when given."""
    first = plan.models[0]
    architectures = first.config.get("architectures")
    headless = not any(_info(plan, n).group in HEAD_GROUPS for n in plan.encoder)
    if plan.heads == "separate" or plan.heads == "none" and first.head.kind is None and headless:
        names = {n: n for n in plan.encoder}  # the bare encoder's naming (BertModel)
        architectures = [_encoder_class(first.config)]
    else:
        names = {n: first.names.get(n) or _prefixed(first, n) for n in plan.encoder}
    layout = {names[n]: (_out_dtype(plan, n, dtype), _meta(plan, n)[1]) for n in plan.encoder}
    with ShardedWriter(folder, layout, shard_size, {"format": "pt"}, release=plan.beyond_memory) as writer:
        write_behind(lambda name, tensor: writer.write(names[name], tensor), tensors)
    changes = {"architectures": architectures}
    if dtype:
        written = str(OUTPUT_DTYPES[dtype]).removeprefix("torch.")
        keys = [key for key in ("dtype", "torch_dtype") if first.config.get(key)] or ["dtype"]
        changes.update(dict.fromkeys(keys, written))
    if first.ref.is_adapter and plan.heads == "merge" and first.task:
        # an adapter module's config is its base's (a bare encoder): the output has the module's head
        head_class = _encoder_class(first.config).removesuffix("Model") + HEAD_SUFFIX[first.head.kind]
        changes = {"architectures": [head_class], **task_head_kwargs(get_task(first.task))}
    first.config.save(folder, **changes)
    if not copy_tokenizer(first.ref, folder):
        plan.notes.append(f"model {first.ref.spec!r} has no tokenizer files, so the merged model has none either; "
                          "copy its tokenizer in before using it")
    if first.ref.path is not None and (first.ref.path / "generation_config.json").is_file():
        # a causal or seq2seq LM's decoding defaults (special token ids, lengths): part of the model
        shutil.copy2(first.ref.path / "generation_config.json", folder / "generation_config.json")
    if plan.heads == "separate":
        (folder / "heads").mkdir()
        for task, tensors_ in heads.items():
            save_file({k: v.contiguous() for k, v in tensors_.items()}, folder / "heads" / f"{task}.safetensors")


HEAD_SUFFIX = {"sequence": "ForSequenceClassification", "token": "ForTokenClassification", "mlm": "ForMaskedLM"}


def _encoder_class(config: ConfigView) -> str:
    """The bare encoder class of a model family, e.g. BertModel for BertForSequenceClassification."""
    for name in config.get("architectures") or []:
        for suffix in HEAD_SUFFIXES:
            if name.endswith(suffix):
                return name.removesuffix(suffix) + "Model"
        if name.endswith("Model"):
            return name
    return {"bert": "BertModel", "roberta": "RobertaModel", "electra": "ElectraModel", "distilbert": "DistilBertModel",
            "deberta-v2": "DebertaV2Model", "t5": "T5Model", "gpt2": "GPT2Model", "llama": "LlamaModel",
            "mistral": "MistralModel", "qwen2": "Qwen2Model", "gemma": "GemmaModel"}.get(config.model_type, "AutoModel")


def _prefixed(first: Checkpoint, name: str) -> str:
    """Model A's naming for a parameter only another model has (e.g. the pooler)."""
    prefix = next(iter(first.names.values())).removesuffix(next(iter(first.names)))
    return prefix + name


def _meta(plan: Plan, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
    holder = plan.models[_holders(plan, name)[0]]
    return holder.meta(name)


def mergekit_yaml(plan: Plan, base: str | None) -> str | None:
    """The same merge as a mergekit config, when mergekit can express it (all components, one head)."""
    present = {info.group for m in plan.models for info in m.infos.values()}
    if plan.method.mergekit is None or plan.heads == "separate" or plan.block_lambdas or \
            not present <= set(plan.components):
        return None  # (a group the models do not have, e.g. a BERT model's lm_head, is no restriction)
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
        lines.append(f"base_model: {resolve(base).shown}")
    lines.append("models:")
    per_model = pieces.get("per_model") or [{"weight": pieces.get("default_weight", 1.0)}] * len(plan.models)
    for m, extra in zip(plan.models, per_model):
        lines.append(f"  - model: {m.ref.shown}")
        values = {**extra, **pieces.get("model_parameters", {})}
        lines.append("    parameters: {" + ", ".join(f"{k}: {v}" for k, v in values.items()) + "}")
    if pieces.get("parameters"):
        lines.append("parameters: {" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in pieces["parameters"].items()) + "}")
    if pieces.get("first_is_base"):
        lines.append(f"base_model: {plan.models[0].ref.shown}")
    lines.append("dtype: float32")
    return "\n".join(lines) + "\n"


def merge_from_config(path: str | Path, out: str | Path | None = None, *, overwrite: bool = False,
                      progress: ProgressFn | None = None, **changes: Any) -> MergeResult:
    """Re-run the merge a `merge_config.json` (or its folder) describes; `changes` replace spec fields."""
    path = Path(path)
    source = path / "merge_config.json" if path.is_dir() or not path.suffix else path
    try:
        config = json.loads(source.read_text())
    except FileNotFoundError:
        raise MergeLabError(f"{source} does not exist; give a merge's output folder or its merge_config.json",
                            param="config") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MergeLabError(f"{source} is not a merge_config.json MergeLab can read ({exc})", param="config") from None
    try:
        if not isinstance(config, dict):
            raise TypeError(f"a JSON {type(config).__name__}, not an object")
        spec = MergeSpec.from_dict(config)
    except MergeLabError as exc:  # MergeSpec's own checks: say which file holds the bad value
        raise MergeLabError(f"{source}: {exc.message}", param=exc.param, hint=exc.hint) from None
    except (TypeError, KeyError, ValueError) as exc:
        raise MergeLabError(f"{source} does not describe a merge ({exc})", param="config") from None
    return merge(replace(spec, **changes) if changes else spec, out=out, overwrite=overwrite, progress=progress)


def available_methods() -> list[dict]:
    """The registry as plain data (for the CLI's listing and the app's controls)."""
    return [{"name": m.name, "title": m.title, "family": m.family, "paper": m.paper, "doc": m.doc,
             "needs_base": m.needs_base if not callable(m.needs_base) else "depends on init",
             "params": [p.__dict__ for p in m.params]} for m in METHODS.values()]
