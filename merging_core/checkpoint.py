"""The checkpoint layer: open any model lazily under canonical parameter names, check that models fit
together, and copy canonical tensors into a live model.

A `Checkpoint` reads a model's tensors on demand (safetensors, mmap), named *canonically*: the task
wrapper's prefix stripped (`arch.Adapter.canonical`), so a `BertForSequenceClassification`, a
`BertForTokenClassification` and the bare `BertModel` base line up. Merges, curves, alignment and
ensembling all open their inputs here.

A checkpoint of a family without an adapter opens with the generic fallback (`arch.generic`): its
groups are guesses, which data-free merges can use and everything else refuses (`arch.require`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .arch import Adapter, ParamInfo, adapter_for, canonical
from . import scratch
from .errors import MergeLabError
from .models import (ConfigView, HeadInfo, ModelRef, adapter_kind, head_info, load, load_tokenizer, read_config,
                     resolve, vocabulary_fingerprint)
from .tasks import TASKS, get_task
from .tensorio import InMemory, LazyFiles, model_files

# A model's task head: kept per task when label sets differ (heads=separate), free to differ in shape, and
# optional in a base model. A causal / seq2seq LM head is the head of the generation task.
HEAD_GROUPS = ("head", "mlm_head", "lm_head")


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
    adapter: Adapter | None = None  # the family's adapter (generic for a family without one)

    def get(self, name: str, start: int = 0, stop: int | None = None, *, pin: bool = False,
            mapped: bool = False) -> torch.Tensor:
        """Parameter `name`, or the flat slice [start, stop) of its elements; `pin`: in page-locked memory,
        for a fast copy to the GPU; `mapped`: where it comes from a file, a view of the file's cached pages
        rather than a copy (for kernels that only read it)."""
        return self.reader.get(self.names[name], start, stop, pin=pin, mapped=mapped)

    def meta(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self.reader.meta(self.names[name])

    def prefetch(self, name: str, start: int = 0, stop: int | None = None) -> None:
        """Start reading what `get(name, start, stop)` will read, without waiting for it."""
        self.reader.prefetch(self.names[name], start, stop)

    def release(self, name: str, start: int = 0, stop: int | None = None) -> None:
        """Let the page cache drop what `get(name, start, stop)` read: it will not be read again."""
        self.reader.release(self.names[name], start, stop)

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer, loaded on first use (a data-free merge only copies its files)."""
        return load_tokenizer(self.ref)


def head_task(ref: ModelRef, head: HeadInfo) -> str | None:
    """The task a checkpoint's head belongs to: its metadata, else the one task whose labels it has; none for
    a language model trained on several tasks' prompts (its metadata lists them as `tasks`)."""
    if head.kind is None or ref.metadata().get("tasks"):
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
    kind = adapter_kind(ref)
    if kind not in (None, "lora", "ia3"):  # these add modules of their own: there is no weight to fold them into
        raise MergeLabError(f"model {ref.spec!r} is a {kind} module, which cannot be folded into its base's weights; "
                            "merges and weight-space curves take full checkpoints, LoRA or (IA)3 modules "
                            "(combine prefix modules with `ensemble`)", param="models")
    config = read_config(ref)
    head = head_info(ref, config)
    files, index = model_files(ref.path, f"model {ref.spec!r}") if ref.path is not None and not ref.is_adapter \
        else ([], None)
    if files:
        reader: LazyFiles | InMemory = LazyFiles(files, f"model {ref.spec!r}", index)
    else:  # LoRA (folded in), opted-in pickle or hub: the whole state dict in memory
        task = get_task(ref.metadata()["task"]) if ref.is_adapter else None
        model = load(ref, task, allow_pickle=allow_pickle, device="cpu").model
        reader = InMemory({k: v.detach() for k, v in model.state_dict().items()})
    adapter = adapter_for(config.model_type, generic=True)
    names, infos = {}, {}
    for key in reader.keys():
        info = adapter.describe(key)
        if info.group == "buffer":
            continue
        name = adapter.canonical(key)
        names[name], infos[name] = key, info
    return Checkpoint(ref, config, head, head_task(ref, head), reader, names, infos, adapter)


def check_compatible(models: list[Checkpoint], base: Checkpoint | None) -> None:
    first = models[0]
    for other in models[1:] + ([base] if base else []):
        role = "base model" if other is base else "model"
        param = "base" if other is base else "models"
        if other.config.model_type != first.config.model_type:
            raise MergeLabError(f"{role} {other.ref.spec!r} is a {other.config.model_type} model but "
                                f"{first.ref.spec!r} is {first.config.model_type}; merge models of one architecture",
                                param=param)
        prints = vocabulary_fingerprint(other.ref), vocabulary_fingerprint(first.ref)
        # "" = no tokenizer files to compare (a weights-only folder): the vocabulary size still must agree
        if (all(prints) and prints[0] != prints[1]) or other.config.get("vocab_size") != first.config.get("vocab_size"):
            raise MergeLabError(f"{role} {other.ref.spec!r} uses a different vocabulary from {first.ref.spec!r}; "
                                "merged embeddings would mix unrelated tokens", param=param)
        for name, info in first.infos.items():
            if info.group in HEAD_GROUPS or name not in other.names:
                continue
            if other.meta(name)[1] != first.meta(name)[1]:
                raise MergeLabError(f"{role} {other.ref.spec!r} has {name} of shape {list(other.meta(name)[1])}, "
                                    f"{first.ref.spec!r} of shape {list(first.meta(name)[1])}: the architectures "
                                    "differ (hidden size, layers or heads)", param=param)
        if other is not base:
            _check_tied(first, other)
        # The same parameters in both directions: a model missing a layer must fail whichever place it has
        # (the merge walks the first model's parameters, so a gap there would silently drop them).
        for has, lacks in ((first, other), (other, first)):
            missing = [n for n, i in has.infos.items() if i.group not in HEAD_GROUPS + ("pooler",)
                       and n not in lacks.names]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                who = f"{role} {other.ref.spec!r}" if lacks is other else f"model {first.ref.spec!r}"
                raise MergeLabError(f"{who} has no parameter {missing[0]}{more} that "
                                    f"{has.ref.spec!r} has: every model must hold the same parameters (the "
                                    "architectures differ, or a checkpoint file is incomplete)", param=param)


def _check_tied(first: Checkpoint, other: Checkpoint) -> None:
    """Models whose LM head is tied to the input embeddings (GPT-2, Gemma, T5 v1.0: no `lm_head` tensor in
    their files) and models with an untied one (Llama, Flan-T5) cannot be merged tensor by tensor: the tied
    model's output matrix is its embedding matrix, which the untied one merges elsewhere. Both the configs
    and the files must disagree: a tied model loaded from pickle lists its tied copy as a tensor of its own,
    and transformers 5 writes `tie_word_embeddings: true` into every T5 config it saves."""
    if first.head.kind != other.head.kind:
        return
    own = [any(i.group == "lm_head" for i in m.infos.values()) for m in (first, other)]
    ties = [m.config.get("tie_word_embeddings", True) is not False for m in (first, other)]  # transformers' default
    if own[0] != own[1] and ties[0] != ties[1]:
        tied, untied = (first, other) if ties[0] else (other, first)
        raise MergeLabError(f"model {tied.ref.spec!r} ties its output layer to its input embeddings but "
                            f"{untied.ref.spec!r} has its own (lm_head); merge models that tie alike "
                            "(tie_word_embeddings in config.json)", param="models")


def recorded_base(models: list[Checkpoint]) -> str | None:
    """The base every input records in its metadata, when they agree. A random initialization
    (`scratch-t5:mini`, recorded by models pretrained from scratch) is none: the run's seed drew its
    weights, so two models recording it did not start from one tensor, and loading it draws new ones."""
    bases = {m.ref.metadata().get("base") for m in models}
    base = bases.pop() if len(bases) == 1 else None
    return None if scratch.is_scratch(base) else base


def load_canonical(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Copy tensors named canonically (no `bert.` prefix) into `model`; returns how many were set."""
    own = model.state_dict()
    count = 0
    with torch.no_grad():
        for key, tensor in own.items():
            name = canonical(key, model.config.model_type)
            if name in state:
                tensor.copy_(state[name].to(tensor))
                count += 1
    return count
