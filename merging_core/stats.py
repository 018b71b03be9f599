"""Statistics that data-aware merges need, computed once per (model, data, settings) and reused.

- `gram`: for every linear layer, G = XᵀX / N over its N input rows (tokens; padding left out when
  `mask_padding`), the statistic of RegMean (Jin et al. 2023, Sec. 3.2) and MaTS's RegMean objective.
- `grad_gram`: for every linear layer, B = E[g gᵀ] over the gradients g of log p(y|x) at its outputs,
  the second K-FAC factor (Tam et al. 2024, Table 1; Martens & Grosse 2015).
- `fisher`: for every parameter, the diagonal Fisher F = E[(∇θ log p(y|x))²] (Matena & Raffel 2022,
  eq. 2). Per-example gradients by default (a true diagonal Fisher); `gradients=batch_mean` squares
  the gradient of a batch-mean loss instead (the RegMean codebase's variant, batch 16).
- `block_fisher`: for every (IA)³ scaling vector l, the full Fisher block F = E[∇l log p ∇l log pᵀ]
  (d x d, per-example gradients), the statistic of MaTS's blockwise-Fisher objective for (IA)³ (Tam et
  al. 2024, arXiv:2312.04339, Sec. 5). Module space only.

**Module space** (`space="module"`, (IA)³ modules): the statistics of the module's own tensors, on the
live module (not folded). `fisher` is over the scaling vectors and the head; `gram` of a scaling vector
is the diagonal of the Gram of the activation it scales (the layer's output for keys and values, its
input for the feed-forward output), which is all of RegMean's objective for a diagonal map (see
`methods.regmean`); `block_fisher` as above. The record says `"space": "module"`, so the cache keys of
the two spaces never meet.

**Linear layers** are `nn.Linear` and transformers' `Conv1D` (GPT-2), hooked alike: G is (in x in) and B
(out x out) for both, whatever the weight's storage. A `Conv1D` stores its weight (in, out), the
transpose of `nn.Linear`'s; the merge methods turn such weights to (out, in) before using G and B
(`ParamInfo.transposed`, `methods.regmean`), so the factors line up with the weight in both layouts.
A decoder's sequence head (`score` of GPT-2 and Llama) runs on every position but only its output at
the last real token is read, so its G and B are over those rows only (one per example, as BERT's head
sees its pooled input); the rest of its input rows never reach the loss. In an encoder-decoder (T5)
each layer's padding is its own stack's: encoder layers and the cross-attention keys and values read
encoder positions, masked by the encoder's attention mask; decoder layers and the LM head read target
positions, masked where the targets are padding.

log p(y|x) is the model's own: the classification (or token-tagging) head's, the masked-LM head's on a
text task, for a causal LM on a text task the sum over tokens of log p(x_t | x_<t) (next tokens
after a real token; padding left out), for an encoder-decoder on a text task the sum over its
span-corruption targets (`spans`), and for a language model on prompts the log-softmax of its labels'
rank-classification scores. Labels: `empirical` = gold, `true` = sampled from the model,
`hard` = its argmax. For regression (STS-B), log p is a unit Gaussian around the prediction; `hard`
there would give zero gradients, so it uses the gold score, as the RegMean codebase does.

**Memory.** A decoder's input Grams are computed block by block (`layerwise`) and each statistic file
is written as its parts are computed (the header first, its record's time filled in at the end); a
statistic is read back one tensor at a time (`Stored`), when a merge asks for it. A statistic of
gradients (`fisher`, `grad_gram`) runs a half-precision checkpoint in float32 on the CPU, where bf16
matrix products are many times slower without bf16 instructions (`_float_on_cpu`).

Examples are a seeded random subset of the task's train split. Each statistic is saved under
`$MERGELAB_HOME/cache/stats` as safetensors whose metadata (and a `.json` beside it) records how it
was computed: model, the content fingerprints of its weights, config and tokenizer files (see
`fingerprint`: a same-size rewrite with the mtime restored still changes the key), task, split, examples,
settings, the data file's content fingerprint, seconds. `load_stats(path)` reads such a file back, so statistics computed elsewhere can be used.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import data, layerwise, settings, spans
from .arch import adapter_for, canonical, require
from .encode import IGNORE, encode, mlm_mask, model_inputs, pad_id
from .errors import MergeLabError
from .fingerprint import combined
from .losses import language_model_logits, rank_scores, text_noise
from .models import (ModelRef, config_fingerprint, hf, load, load_adapter, load_tokenizer, model_head, read_config,
                     resolve, tokenizer_files, weights_fingerprint)
from .module_space import check_mergeable, module_checkpoint, module_parameters
from .outputs import staging_file
from .params import Param
from .progress import ProgressFn, track
from .tasks import TaskSpec, get_task, scored_as
from .tensorio import SafetensorsFile, StreamingWriter

FORMAT_VERSION = 1
KINDS = ("gram", "grad_gram", "fisher", "block_fisher")
SEED = 0  # example subset, MLM masks and sampled labels
BATCH = 16

# The settings that shape each statistic, declared once: the methods that need a statistic offer these
# as their parameters, and the cache key holds exactly these (the rest do not change the statistic).
EXAMPLES = Param("examples", "int", 256, "examples per model used to estimate the statistic", low=1, high=100_000)
MASK_PADDING = Param("mask_padding", "bool", True, "leave padding tokens out of the statistics")
FISHER_LABELS = Param("fisher_labels", "choice", "empirical", "labels in log p(y|x): gold (empirical), sampled "
                      "from the model (true), or its argmax (hard)", choices=("empirical", "true", "hard"))
GRADIENTS = Param("gradients", "choice", "per_example", "square per-example gradients (a true diagonal Fisher) "
                  "or the gradient of a batch-mean loss (RegMean codebase)", choices=("per_example", "batch_mean"))
SETTINGS: dict[str, tuple[Param, ...]] = {"gram": (EXAMPLES, MASK_PADDING),
                                          "grad_gram": (EXAMPLES, MASK_PADDING, FISHER_LABELS),
                                          "fisher": (EXAMPLES, FISHER_LABELS, GRADIENTS),
                                          "block_fisher": (EXAMPLES, FISHER_LABELS)}
DEFAULTS = {p.name: p.default for params in SETTINGS.values() for p in params}

Grams = dict[str, dict[str, torch.Tensor]]  # {parameter: {kind: tensor}}


def setting_params(*kinds: str) -> tuple[Param, ...]:
    """The settings of these statistics, each once, in declaration order (a method's parameters)."""
    return tuple({p.name: p for kind in kinds for p in SETTINGS[kind]}.values())


def settings_of(kinds: tuple[str, ...], params: dict[str, Any]) -> dict[str, Any]:
    """The values of the settings these statistics depend on (defaults where `params` has none)."""
    return {p.name: params.get(p.name, p.default) for p in setting_params(*kinds)}


def record(ref: ModelRef, task: TaskSpec, kind: str, options: dict[str, Any], space: str = "weights"
           ) -> dict[str, Any]:
    """How a statistic is computed: everything its cache key depends on, by content: the weights, the config
    (e.g. the activation function), the tokenizer files, the data file, the settings, and the space
    (recorded only for module space, so weight-space records keep their keys)."""
    return {**({"space": space} if space != "weights" else {}), "format": FORMAT_VERSION, "kind": kind,
            "model": ref.spec, "model_location": ref.location, "weights": weights_fingerprint(ref),
            "config": config_fingerprint(ref),
            "tokenizer": combined(tokenizer_files(ref)) if ref.path is not None else ref.location,
            "task": task.name, "split": "train", "data": data.local_fingerprint(task, "train") or "hub",
            **{p.name: options[p.name] for p in SETTINGS[kind]}, "seed": SEED}


def cache_path(rec: dict[str, Any]) -> Path:
    key = hashlib.sha1(json.dumps(rec, sort_keys=True).encode()).hexdigest()[:20]
    name = Path(rec["model"]).name.replace("/", "_")
    return settings.cache_dir("stats") / f"{name}-{rec['task']}-{rec['kind']}-{key}.safetensors"


def load_stats(path: str | Path) -> tuple[dict[str, Mapping[str, torch.Tensor]], dict[str, Any]]:
    """{parameter: {kind: tensor}} and the record of how they were computed, from a statistics file. Each
    tensor is read when asked for (a 1B model's Grams are gigabytes); a layer whose statistic counted no
    rows (it never ran) is left out."""
    path = Path(path)
    if not path.is_file():
        raise MergeLabError(f"statistics file {path} does not exist", param="stats_files")
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise MergeLabError(f"{path} is not a MergeLab statistics file (not a readable safetensors file: {reason})",
                            param="stats_files") from None
    with handle as f:
        try:
            rec = json.loads((f.metadata() or {}).get("record", "{}"))
        except ValueError:
            rec = None
        if not isinstance(rec, dict) or rec.get("kind") not in KINDS:
            raise MergeLabError(f"{path} is not a MergeLab statistics file (no readable record of its kind)",
                                param="stats_files")
        keys = list(f.keys())
        counts = {key for key in keys if key.endswith("_count") and float(f.get_tensor(key)) == 0}
    stored = SafetensorsFile(path, "statistics file")
    per_param: dict[str, dict[str, tuple[SafetensorsFile, str]]] = {}
    for key in keys:
        param, _, kind = key.rpartition("::")
        per_param.setdefault(param, {})[kind] = (stored, key)
    return {param: Stored(sources) for param, sources in per_param.items()
            if not any(key in counts for _, key in sources.values())}, rec


class Stored(Mapping[str, torch.Tensor]):
    """One parameter's statistics ({kind: (file, key)}), each read from its file when asked for."""

    def __init__(self, sources: dict[str, tuple[SafetensorsFile, str]]):
        self.sources = sources

    def __getitem__(self, kind: str) -> torch.Tensor:
        file, key = self.sources[kind]
        return file.get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.sources)

    def __len__(self) -> int:
        return len(self.sources)

    def __or__(self, other: Stored) -> Stored:
        return Stored({**self.sources, **other.sources})


def save_stats(values: Grams | Iterable[Grams], rec: dict[str, Any], path: Path,
               layout: dict[str, tuple[torch.dtype, tuple[int, ...]]] | None = None,
               started: float | None = None) -> None:
    """Write statistics atomically: a {parameter: {kind: tensor}} dict, or (with the file's `layout`)
    parts of one written as they are computed, so that they never sit in memory together. With `started`
    (a `time.perf_counter()`), the record gets the seconds since then and the time it was created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_file(path)

    final = dict(rec)

    def timed() -> dict[str, str]:
        if started is not None:
            final.update(seconds=round(time.perf_counter() - started, 2), created=time.strftime("%Y-%m-%dT%H:%M:%S"))
        return {"record": json.dumps(final)}

    if layout is None:
        flat = {f"{param}::{kind}": t.contiguous().cpu() for param, kinds in values.items() for kind, t in kinds.items()}
        save_file(flat, tmp, metadata=timed())
    else:  # the header goes first, with room for the time, which is known at the end
        room = len(json.dumps({"seconds": 1e9, "created": "2000-01-01T00:00:00"}))
        with StreamingWriter(tmp, layout, {"record": json.dumps(rec)}, reserve=room) as writer:
            for part in values:
                for param, kinds in part.items():
                    for kind, t in kinds.items():
                        writer.write(f"{param}::{kind}", t.contiguous())
            writer.set_metadata(timed())
    os.replace(tmp, path)  # atomic
    path.with_suffix(".json").write_text(json.dumps(final, indent=2) + "\n")


def statistics(model: str | ModelRef, task: str | TaskSpec, kinds: tuple[str, ...], options: dict[str, Any] | None = None,
               *, space: str = "weights", progress: ProgressFn | None = None) -> dict[str, Mapping[str, torch.Tensor]]:
    """{canonical parameter name: {kind: tensor}} for `model` on `task`'s train data, cached, each tensor read
    from the cache when asked for. `space="module"`: an (IA)³ module's own vectors (see the module doc)."""
    ref = model if isinstance(model, ModelRef) else resolve(model)
    require(read_config(ref).model_type, "statistics", ref.spec)  # families whose inputs and heads are handled
    spec = get_task(task) if isinstance(task, str) else task
    options = {**DEFAULTS, **{k: v for k, v in (options or {}).items() if k in DEFAULTS}}
    merged: dict[str, Stored] = {}
    for kind in kinds:
        if kind not in KINDS:
            raise MergeLabError(f"unknown statistic {kind!r}; known: {', '.join(KINDS)}")
        rec = record(ref, spec, kind, options, space)
        path = cache_path(rec)
        values = None
        if path.is_file():
            try:
                values, _ = load_stats(path)
            except MergeLabError:  # a damaged cache entry is computed again, not an error
                values = None
        if values is None:
            started = time.perf_counter()
            layout, parts = compute_parts(ref, spec, kind, options, space=space, progress=progress)
            save_stats(parts, rec, path, layout, started=started)
            values, _ = load_stats(path)
        for param, kv in values.items():
            merged[param] = merged[param] | kv if param in merged else kv
    return merged


# ----------------------------------------------------------------------------------------------------
# computing them


def _examples(spec: TaskSpec, tokenizer, n: int, device: torch.device, *, noise: str | None = "mask"
              ) -> list[dict[str, torch.Tensor]]:
    """A seeded random subset of the train split as a list of single-example batches (text tasks corrupted
    as `noise` says: masked for a masked LM, span-corrupted for an encoder-decoder, whole for a causal LM)."""
    encoded = encode(spec, "train", tokenizer)
    generator = torch.Generator().manual_seed(SEED)
    index = torch.randperm(len(encoded), generator=generator)[:n]
    if not len(index):
        raise MergeLabError(f"task {spec.name} has no training examples to compute statistics on")
    subset = encoded.subset(index)
    if spec.kind == "mlm" and noise == "spans":
        subset = spans.corrupt_split(subset, tokenizer, generator)
    elif spec.kind == "mlm" and noise == "mask":
        masked, labels = mlm_mask(subset.ids, tokenizer, generator)
        subset = replace(subset, ids=masked.to(subset.ids.dtype), labels=labels)
    pad = pad_id(tokenizer)
    return [{k: v.to(device) for k, v in subset.batch(torch.tensor([i]), pad).items()} for i in range(len(subset))]


def _collate(examples: list[dict[str, torch.Tensor]], spec: TaskSpec, pad: int = 0) -> dict[str, torch.Tensor]:
    """Pad single-example batches into one batch, on the right; token ids with `pad` (`encode.pad_id`: a
    decoder's sequence head looks for it to find the last real token)."""
    length = max(e["input_ids"].shape[1] for e in examples)
    out = {}
    for key in examples[0]:
        if key == "choices":  # the labels' verbalizers: one set for the whole task
            out[key] = examples[0][key]
            continue
        parts = []
        for e in examples:
            v = e[key]
            if v.dim() == 2:
                fill = IGNORE if key == "labels" else pad if key == "input_ids" else 0
                v = F.pad(v, (0, length - v.shape[1]), value=fill)
            parts.append(v)
        out[key] = torch.cat(parts)
    return out


def _log_likelihood(model, batch: dict[str, torch.Tensor], spec: TaskSpec, labels_mode: str,
                    generator: torch.Generator) -> torch.Tensor:
    """Σ over examples of log p(y|x), with y gold / sampled / argmax."""
    if spec.kind == "mlm":  # masked tokens of a masked LM, next tokens of a causal LM
        logits, gold = language_model_logits(model, batch)
        mask = torch.ones_like(gold, dtype=torch.bool)
    elif spec.kind == "rank":  # a causal LM on prompts: the labels' verbalizer scores are its classifier
        logits, gold = rank_scores(model, batch), batch["labels"]
    else:
        logits = model(**model_inputs(batch, model.config)).logits.float()
        gold = batch["labels"]
        if spec.kind == "regression":
            prediction = logits.squeeze(-1)
            target = gold
            if labels_mode == "true":
                target = (prediction + torch.randn(prediction.shape, generator=generator).to(prediction)).detach()
            return -0.5 * ((prediction - target) ** 2).sum()
        mask = gold != IGNORE
        logits, gold = logits[mask] if spec.kind == "token" else logits, gold[mask] if spec.kind == "token" else gold
    log_probs = F.log_softmax(logits, -1)
    if labels_mode == "true":
        target = torch.multinomial(log_probs.detach().exp().cpu(), 1, generator=generator).squeeze(-1).to(gold.device)
    elif labels_mode == "hard":
        target = log_probs.detach().argmax(-1)
    else:
        target = gold
    return log_probs.gather(-1, target.unsqueeze(-1)).sum()


def _linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every linear layer by its weight's canonical name: `nn.Linear`, and transformers' `Conv1D` (GPT-2's
    layers: y = x W + b with W stored (in, out))."""
    model_type = model.config.model_type
    conv1d = hf().pytorch_utils.Conv1D
    return {canonical(f"{name}.weight", model_type): m for name, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, conv1d))}


def _sizes(module: torch.nn.Module) -> tuple[int, int]:
    """(in, out) features of a linear layer in either storage."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]  # Conv1D: (in, out)


def _last_token_heads(model: torch.nn.Module, modules: dict[str, torch.nn.Module]) -> set[str]:
    """The layers of a decoder's sequence head: run on every position, read at the last real token only."""
    adapter = adapter_for(model.config.model_type, generic=True)
    if not adapter.last_token_head or model_head(model).kind != "sequence":
        return set()
    return {name for name in modules if adapter.describe(name).group == "head"}


def _target_side(model: torch.nn.Module, modules: dict[str, torch.nn.Module]) -> set[str]:
    """The layers of an encoder-decoder that read decoder (target) positions: the decoder's own layers but
    the cross-attention keys and values (those read the encoder's output), and the LM head."""
    if not getattr(model.config, "is_encoder_decoder", False):
        return set()
    adapter = adapter_for(model.config.model_type, generic=True)
    return {name for name, info in ((n, adapter.describe(n)) for n in modules)
            if (info.stack == "decoder" and info.role not in ("cross_key", "cross_value")) or info.group == "lm_head"}


def _last_tokens(input_ids: torch.Tensor, pad: int | None) -> torch.Tensor:
    """(batch, length) bool: the position a last-token sequence head reads in each row, found as
    transformers finds it (the rightmost token that is not `config.pad_token_id`)."""
    if pad is None:
        index = torch.full(input_ids.shape[:1], input_ids.shape[1] - 1, device=input_ids.device)
    else:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        index = (positions * (input_ids != pad)).argmax(-1)
    return F.one_hot(index, input_ids.shape[1]).bool()


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(tokens, features) from a layer's input or output gradient, padding removed when masked."""
    if x.dim() == 3 and mask is not None and mask.shape == x.shape[:2]:
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


def compute(ref: ModelRef, spec: TaskSpec, kind: str, options: dict[str, Any], *, space: str = "weights",
            progress: ProgressFn | None = None) -> Grams:
    """Compute one statistic for `ref` on `spec` (no cache)."""
    layout, values = compute_parts(ref, spec, kind, options, space=space, progress=progress)
    return values if layout is None else _gathered(values, kind)


def compute_parts(ref: ModelRef, spec: TaskSpec, kind: str, options: dict[str, Any], *, space: str = "weights",
                  progress: ProgressFn | None = None
                  ) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...]]] | None, Grams | Iterator[Grams]]:
    """`compute`, for writing as it goes: a Gram statistic comes as the layout of its file and its parts
    (computed as they are iterated; see `_gram_parts`), any other as (None, the whole statistic)."""
    if space == "module":
        return None, _module_statistic(ref, spec, kind, options, progress)
    if kind == "block_fisher":
        raise MergeLabError("the blockwise Fisher is computed for (IA)3 scaling vectors: merge (IA)3 modules with "
                            "space=module, or use the diagonal_fisher objective", param="objective")
    loaded = load(ref, spec)
    spec = scored_as(spec, model_head(loaded.model).kind)  # a causal LM reads a classification task as prompts
    device = next(loaded.model.parameters()).device
    examples = _examples(spec, loaded.tokenizer, options["examples"], device, noise=text_noise(loaded.model))
    desc = f"{kind} of {ref.name} on {spec.name}"
    if kind == "fisher":
        return None, estimate(loaded, examples, spec, kind, options, desc, progress)
    _trainable(loaded.model, kind)
    return _gram_parts(loaded.model, examples, spec, kind, options, torch.Generator().manual_seed(SEED), desc,
                       progress, pad=pad_id(loaded.tokenizer))


def estimate(loaded, examples: list[dict[str, torch.Tensor]], spec: TaskSpec, kind: str, options: dict[str, Any],
             desc: str, progress: ProgressFn | None = None) -> Grams:
    """One statistic (`gram`, `grad_gram`, `fisher`) of a loaded full model (`models.load`) on these
    examples (batches of one, padded with the tokenizer's pad id): the estimator `statistics` runs on the
    train split's draw, for callers that choose the examples themselves."""
    model = _trainable(loaded.model, kind)
    generator = torch.Generator().manual_seed(SEED)
    pad = pad_id(loaded.tokenizer)
    if kind == "fisher":
        params = {canonical(n, model.config.model_type): p for n, p in model.named_parameters() if p.requires_grad}
        return _fisher(model, params, examples, spec, options, generator, desc, progress, pad=pad)
    return _gathered(_gram_parts(model, examples, spec, kind, options, generator, desc, progress, pad=pad)[1], kind)


GRADIENT_KINDS = ("fisher", "grad_gram")  # the statistics a backward pass gives


def _trainable(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    """The model ready for statistic `kind`: every parameter requiring gradients (an adapter module folded in
    comes back from PEFT frozen), and, for a statistic of gradients on the CPU, in float32 (`_float_on_cpu`)."""
    for p in model.parameters():
        p.requires_grad_(True)
    if kind in GRADIENT_KINDS:
        _float_on_cpu(model)
    return model


def _float_on_cpu(model: torch.nn.Module) -> None:
    """A half-precision model (a bf16 checkpoint as transformers loads it) in float32, where a statistic of
    gradients runs on the CPU. Without bf16 matrix instructions (AVX-512 BF16, AMX), PyTorch multiplies
    bf16 matrices in a reference loop: on a 2-core machine the backward pass through one of TinyLlama's MLP
    layers took about 35x float32's, and a 1.1B model's Fisher over 16 examples ran for over half an hour
    without finishing one model. The statistic is summed in float32 either way; the float32 model doubles
    the weights' memory and gives the more exact gradients."""
    first = next(model.parameters(), None)
    if first is not None and first.device.type == "cpu" and first.dtype in (torch.bfloat16, torch.float16):
        model.float()


def _gathered(parts: Iterator[Grams], kind: str) -> Grams:
    """A statistic's parts as one dict, without the layers that never ran."""
    return {name: kinds for part in parts for name, kinds in part.items() if float(kinds[f"{kind}_count"]) > 0}


def _module_statistic(ref: ModelRef, spec: TaskSpec, kind: str, options: dict[str, Any],
                      progress: ProgressFn | None) -> dict[str, dict[str, torch.Tensor]]:
    """One statistic of an (IA)³ module's own tensors, on the live module."""
    check_mergeable([ref])
    if kind == "grad_gram":
        raise MergeLabError("K-FAC factors are for full linear layers; for (IA)3 modules in module space use the "
                            "block_fisher, diagonal_fisher or regmean objective", param="objective")
    model = load_adapter(ref).to(settings.device()).eval()
    own = module_checkpoint(ref)
    for p in model.parameters():
        p.requires_grad_(False)
    params = {n: p for n, p in module_parameters(model).items() if n in own.names}
    vectors = {n for n in params if own.infos[n].factor == "ia3"}
    # the Fisher covers the vectors and the head; its blocks, the vectors; a Gram needs no gradient
    chosen = {"fisher": params, "block_fisher": {n: p for n, p in params.items() if n in vectors}, "gram": {}}[kind]
    for p in chosen.values():
        p.requires_grad_(True)
    device = next(model.parameters()).device
    examples = _examples(spec, load_tokenizer(ref), options["examples"], device)
    generator = torch.Generator().manual_seed(SEED)
    desc = f"{kind} of {ref.name} on {spec.name} (module space)"
    if kind == "gram":
        return _scaled_activations(model, vectors, examples, spec, options, desc, progress)
    return _fisher(model, chosen, examples, spec, options, generator, desc, progress, block=kind == "block_fisher")


def _gram_parts(model, examples, spec, kind, options, generator, desc, progress, *, pad: int = 0
                ) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...]]], Iterator[Grams]]:
    """The layout of a Gram statistic's file and its parts, computed as they are iterated: the whole model's
    in one part, or (input Grams of a decoder, `layerwise`) one part per block, so that only one block's
    sums are ever in memory. A layer that never ran has a zero Gram with a count of 0."""
    modules = _linear_modules(model)
    sizes = {name: _sizes(m)[0 if kind == "gram" else 1] for name, m in modules.items()}
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(modules, 0)
    heads = _last_token_heads(model, modules)
    targets = _target_side(model, modules)

    def rows_mask(name: str, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if name in heads:
            return _last_tokens(batch["input_ids"], model.config.pad_token_id)
        if not options["mask_padding"]:
            return None
        if name in targets:  # the decoder of an encoder-decoder: padded targets of span corruption;
            # prompts' verbalizers (rank classification) are never padded
            return batch["labels"] != IGNORE if spec.kind == "mlm" else None
        return batch["attention_mask"]

    def accumulate(name: str, x: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        # One batch's XᵀX in float32 (a few hundred rows: relative error ~1e-7; the accumulation runs
        # ~1.7x faster than in float64 on a CPU), summed over batches in float64.
        rows = _rows(x.detach(), rows_mask(name, batch)).float()
        if name not in sums:
            sums[name] = torch.zeros(sizes[name], sizes[name], dtype=torch.float64, device=rows.device)
        sums[name] += rows.T @ rows
        counts[name] += rows.shape[0]

    def finish(names: list[str]) -> Grams:
        return {name: {kind: (sums.pop(name) / counts[name]).float() if counts[name] else
                       torch.zeros(sizes[name], sizes[name]),
                       f"{kind}_count": torch.tensor(float(counts[name]))} for name in names}

    batches = [_collate(examples[i: i + BATCH], spec, pad) for i in range(0, len(examples), BATCH)]
    stack = layerwise.block_stack(model) if kind == "gram" else None
    if stack is not None:
        order, parts = layerwise.block_grams(stack, modules, batches, lambda b: _forward_only(model, b, spec),
                                             accumulate, finish, desc, progress)
    else:
        order = list(modules)

        def whole_model() -> Iterator[Grams]:
            _whole_model_pass(model, modules, batches, spec, kind, options, generator, accumulate, desc, progress)
            yield finish(order)

        parts = whole_model()
    layout = {}
    for name in order:
        layout[f"{name}::{kind}"] = (torch.float32, (sizes[name], sizes[name]))
        layout[f"{name}::{kind}_count"] = (torch.float32, ())
    return layout, parts


def _whole_model_pass(model, modules, batches, spec, kind, options, generator, accumulate, desc, progress) -> None:
    """Every linear layer hooked at once: inputs (`gram`) or output gradients (`grad_gram`)."""
    current: dict[str, dict[str, torch.Tensor]] = {}
    handles = []
    for name, module in modules.items():
        if kind == "gram":
            handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: accumulate(name, args[0], current["batch"])))
        else:
            handles.append(module.register_full_backward_hook(
                lambda m, grad_in, grad_out, name=name: accumulate(name, grad_out[0], current["batch"])))
    try:
        for batch in track(batches, len(batches), desc, progress):
            current["batch"] = batch
            if kind == "gram":
                with torch.inference_mode():
                    _forward_only(model, batch, spec)
            else:
                model.zero_grad(set_to_none=True)
                _log_likelihood(model, batch, spec, options["fisher_labels"], generator).backward()
    finally:
        for h in handles:
            h.remove()


def _forward_only(model, batch, spec: TaskSpec) -> None:
    if spec.kind == "mlm":
        language_model_logits(model, batch)
    elif spec.kind == "rank":
        rank_scores(model, batch)
    else:
        model(**model_inputs(batch, model.config))


def _fisher(model, params: dict[str, torch.nn.Parameter], examples, spec, options, generator, desc, progress,
            block: bool = False, *, pad: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """The diagonal Fisher of `params`, or (`block`) the full Fisher block of each vector in `params`."""
    if block:
        sums = {name: torch.zeros(p.numel(), p.numel(), dtype=torch.float32, device=p.device)
                for name, p in params.items()}
    else:
        sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    rows = _SparseEmbeddingGrad.attach(model, params)
    size = 1 if block or options["gradients"] == "per_example" else BATCH
    batches = [_collate(examples[i: i + size], spec, pad) for i in range(0, len(examples), size)]
    try:
        for batch in track(batches, len(batches), desc, progress):
            n = batch["input_ids"].shape[0]
            log_p = _log_likelihood(model, batch, spec, options["fisher_labels"], generator) / n
            wanted = [p for name, p in params.items() if rows is None or name != rows.name]
            extra = [rows.output] if rows is not None else []
            grads = torch.autograd.grad(log_p, wanted + extra, allow_unused=True)
            for name, g in zip([n_ for n_ in params if rows is None or n_ != rows.name], grads):
                if g is None:
                    continue
                g = g.float()
                if block:
                    sums[name] += torch.outer(g.reshape(-1), g.reshape(-1))
                else:
                    sums[name] += g ** 2
            if rows is not None:
                rows.accumulate(sums[rows.name], batch["input_ids"], grads[-1])
            del grads, log_p  # (the next batch's gradients would be allocated beside them: the model's size)
    finally:
        if rows is not None:
            rows.detach()
    # (divided in place: a copy would hold the model's size in float32 once more at the end)
    return {name: {"block_fisher" if block else "fisher": s.div_(len(batches))} for name, s in sums.items()}


def _scaled_activations(model, vectors: set[str], examples, spec, options, desc, progress
                        ) -> dict[str, dict[str, torch.Tensor]]:
    """Per (IA)³ vector: E[a²] feature by feature over the tokens of the activation a it scales (the diagonal
    of that activation's Gram), with the token count."""
    owners = {id(p): n for n, p in module_parameters(model).items() if n in vectors}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    state: dict[str, torch.Tensor | None] = {"mask": None}

    def accumulate(name: str, x: torch.Tensor) -> None:
        rows = _rows(x.detach(), state["mask"] if options["mask_padding"] else None).double()
        sums[name] = sums.get(name, 0) + (rows ** 2).sum(0)
        counts[name] = counts.get(name, 0) + rows.shape[0]

    handles = []
    for module in model.modules():
        scaling = getattr(module, "ia3_l", None)
        if scaling is None or not hasattr(module, "base_layer"):
            continue
        name = next(owners[id(p)] for p in scaling.values() if id(p) in owners)
        if module.is_feedforward:  # l scales the layer's input: y = W (l ⊙ x) + b
            handles.append(module.register_forward_pre_hook(lambda m, args, name=name: accumulate(name, args[0])))
        else:  # l scales the layer's output: y = l ⊙ (W x + b)
            handles.append(module.base_layer.register_forward_hook(
                lambda m, args, out, name=name: accumulate(name, out)))
    batches = [_collate(examples[i: i + BATCH], spec) for i in range(0, len(examples), BATCH)]
    try:
        for batch in track(batches, len(batches), desc, progress):
            state["mask"] = batch["attention_mask"]
            with torch.inference_mode():
                _forward_only(model, batch, spec)
    finally:
        for h in handles:
            h.remove()
    return {name: {"gram": (sums[name] / counts[name]).float(), "gram_count": torch.tensor(float(counts[name]))}
            for name in sums if counts[name] > 0}


class _SparseEmbeddingGrad:
    """The word-embedding part of the Fisher without the dense (vocabulary x hidden) gradient.

    Row v of the embedding gradient is Σ over positions holding token v of the gradient at the
    embedding output, so squaring those per-token sums gives exactly the dense result at O(tokens x
    hidden) per step instead of O(vocabulary x hidden). Not used when the decoder is tied to the
    embeddings (then every row gets a gradient from the output projection).
    """

    def __init__(self, module: torch.nn.Embedding, name: str):
        self.module, self.name, self.output = module, name, None
        module.weight.requires_grad_(False)
        self.handle = module.register_forward_hook(self._capture)

    @classmethod
    def attach(cls, model, params: dict[str, torch.nn.Parameter]) -> _SparseEmbeddingGrad | None:
        embedding = model.get_input_embeddings()
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if output is not None and output.weight is embedding.weight:
            return None
        if getattr(model.config, "is_encoder_decoder", False):  # T5's encoder and decoder share the embedding
            return None
        if type(embedding) is not torch.nn.Embedding:  # Gemma's scales its output: not ∂/∂ of a row as is
            return None
        name = next((n for n, p in params.items() if p is embedding.weight), None)
        return cls(embedding, name) if name else None

    def _capture(self, module, inputs, output: torch.Tensor) -> torch.Tensor:
        self.output = output.detach().requires_grad_(True)
        return self.output

    def accumulate(self, fisher: torch.Tensor, input_ids: torch.Tensor, grad: torch.Tensor | None) -> None:
        if grad is None:
            return
        ids = input_ids.reshape(-1)
        unique, inverse = torch.unique(ids, return_inverse=True)
        per_token = torch.zeros(len(unique), grad.shape[-1], dtype=torch.float32, device=grad.device)
        per_token.index_add_(0, inverse, grad.reshape(-1, grad.shape[-1]).float())
        fisher.index_add_(0, unique, per_token ** 2)

    def detach(self) -> None:
        self.handle.remove()
        self.module.weight.requires_grad_(True)
