"""The checkpoint layer: open any model lazily under canonical parameter names, check that models fit
together, and copy canonical tensors into a live model.

A `Checkpoint` reads a model's tensors on demand (safetensors, mmap), named *canonically*: the task
wrapper's prefix stripped (`arch.Adapter.canonical`), so a `BertForSequenceClassification`, a
`BertForTokenClassification` and the bare `BertModel` base line up. Merges, curves, alignment and
ensembling all open their inputs here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .arch import ParamInfo, adapter_for, canonical
from .errors import MergeLabError
from .models import (ConfigView, HeadInfo, ModelRef, adapter_kind, head_info, load, load_tokenizer, read_config,
                     resolve, vocabulary_fingerprint)
from .tasks import TASKS, get_task
from .tensorio import InMemory, LazyFiles

HEAD_GROUPS = ("head", "mlm_head")


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
    kind = adapter_kind(ref)
    if kind not in (None, "lora", "ia3"):  # these add modules of their own: there is no weight to fold them into
        raise MergeLabError(f"model {ref.spec!r} is a {kind} module, which cannot be folded into its base's weights; "
                            "merges and weight-space curves take full checkpoints, LoRA or (IA)3 modules "
                            "(combine prefix modules with `ensemble`)", param="models")
    config = read_config(ref)
    head = head_info(ref, config)
    files = sorted(ref.path.glob("*.safetensors")) if ref.path is not None and not ref.is_adapter else []
    if files:
        reader: LazyFiles | InMemory = LazyFiles(files, f"model {ref.spec!r}")
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
        name = adapter.canonical(key)
        names[name], infos[name] = key, info
    return Checkpoint(ref, config, head, head_task(ref, head), reader, names, infos)


def check_compatible(models: list[Checkpoint], base: Checkpoint | None) -> None:
    first = models[0]
    for other in models[1:] + ([base] if base else []):
        role = "base model" if other is base else "model"
        param = "base" if other is base else "models"
        if other.config.model_type != first.config.model_type:
            raise MergeLabError(f"{role} {other.ref.spec!r} is a {other.config.model_type} model but "
                                f"{first.ref.spec!r} is {first.config.model_type}; merge models of one architecture",
                                param=param)
        if (vocabulary_fingerprint(other.ref) != vocabulary_fingerprint(first.ref)
                or other.config.vocab_size != first.config.vocab_size):
            raise MergeLabError(f"{role} {other.ref.spec!r} uses a different vocabulary from {first.ref.spec!r}; "
                                "merged embeddings would mix unrelated tokens", param=param)
        for name, info in first.infos.items():
            if info.group in HEAD_GROUPS or name not in other.names:
                continue
            if other.meta(name)[1] != first.meta(name)[1]:
                raise MergeLabError(f"{role} {other.ref.spec!r} has {name} of shape {list(other.meta(name)[1])}, "
                                    f"{first.ref.spec!r} of shape {list(first.meta(name)[1])}: the architectures "
                                    "differ (hidden size, layers or heads)", param=param)
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


def recorded_base(models: list[Checkpoint]) -> str | None:
    """The base every input records in its metadata, when they agree."""
    bases = {m.ref.metadata().get("base") for m in models}
    return bases.pop() if len(bases) == 1 else None


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
