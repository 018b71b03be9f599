"""What a model picker and `zoo list` say about a checkpoint, read from its files without loading it.

`describe(spec)` gives a checkpoint's family (its config's `model_type`, through the arch adapter), its
parameter count (from the safetensors headers: no tensor is read), its head and the task(s) it was trained
for. `ModelInfo.label(name)` is the line the app's model pickers show ("sst2-s0 · bert · 22.7M · SST-2");
`zoo list` prints the same fields as columns (`columns`). `ModelInfo.scorable_tasks()` says which tasks the
checkpoint's head can be scored on, by the rule scoring itself applies (`models.check_head`), so task
pickers offer only those; `unsupported(spec, feature)` is `arch.require`'s one line for a family that lacks
a feature (alignment, training, ...), or "".

Descriptions are kept in an engine cache (`caches`), keyed by the checkpoint's location and the stamp
(size, mtime, ctime, inode) of every file they read: the stamp `fingerprint` trusts its digests by, so a
rewritten file is read again. Content digests are not used: hashing a multi-GB checkpoint to label a
dropdown would cost far more than reading its headers, and the app lists the pickers on every page load.

A label holds names only (the name the caller gives, the family, a size, task titles), never a path, so
public mode can show it as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import caches
from .arch import adapter_for, require
from .checkpoint import head_task
from .errors import MergeLabError
from .models import HeadInfo, ModelRef, adapter_kind, check_head, head_info, load_config, read_config, resolve
from .tasks import get_task, tasks_for_head, title
from .tensorio import LazyFiles

# How a head kind reads in a label when the checkpoint records no task (a causal LM, a bare encoder).
HEAD_NAMES = {"sequence": "classifier", "token": "token tagger", "mlm": "masked LM", "causal": "causal LM",
              "seq2seq": "seq2seq LM", None: "no head"}
SHOWN_TASKS = 3  # task titles in a label; more are counted ("+2")
ADAPTER_NAMES = {"lora": "LoRA", "ia3": "(IA)³"}  # adapter kinds as papers write them; others as they are
# The files a description reads: their stamps are its cache key.
READ = ("config.json", "adapter_config.json", "mergelab.json", "*.safetensors", "heads/*.safetensors")
_INFOS = caches.Cache("model infos", lambda info: 1024, max_entries=2048)


def count_text(count: int | None) -> str:
    """A parameter count as people write it: 22.7M, 7.2B, 110M, 5.1K ("" when unknown)."""
    if count is None:
        return ""
    value, unit = float(count), ""
    for bigger in ("K", "M", "B"):
        if value < 999.5:  # what rounds to 1000 of a unit is 1.0 of the next
            break
        value, unit = value / 1000, bigger
    if not unit:
        return str(count)
    return f"{value:.1f}{unit}" if value < 99.95 else f"{value:.0f}{unit}"


@dataclass(frozen=True)
class ModelInfo:
    """A checkpoint as a picker describes it; every field is None / empty where its files do not say."""

    family: str | None  # the arch adapter's family ("bert", "llama"); the model type itself without an adapter
    model_type: str | None  # config.json's model_type ("qwen2" is in the llama family)
    parameters: int | None  # values in its safetensors files (an adapter module: the module's own)
    head: HeadInfo | None  # None: unknown (a hub id, an unreadable config)
    tasks: tuple[str, ...] = ()  # the task(s) it was trained for (a multi-head checkpoint: one per head)
    adapter: str | None = None  # "lora", "ia3", "prefix", "bottleneck" for an adapter module
    multihead: bool = False

    @property
    def head_kind(self) -> str | None:
        return self.head.kind if self.head is not None else None

    @property
    def size(self) -> str:
        """"22.7M", or for an adapter module its own size and kind ("150K LoRA")."""
        text = count_text(self.parameters)
        return f"{text} {ADAPTER_NAMES.get(self.adapter, self.adapter)}" if text and self.adapter else text

    @property
    def what(self) -> str:
        """Its task titles ("SST-2", "SST-2, CoLA, MRPC +2"), else what its head is ("causal LM"): also for a
        model pretrained on internal text (`corpus`), which says how it was trained, not what it scores."""
        listed = [t for t in self.tasks if get_task(t).listed]
        if listed:
            shown = ", ".join(title(t) for t in listed[:SHOWN_TASKS])
            more = len(listed) - SHOWN_TASKS
            return shown + (f" +{more}" if more > 0 else "")
        return HEAD_NAMES.get(self.head_kind, "") if self.head is not None else ""

    def label(self, name: str) -> str:
        """The picker's line: "sst2-s0 · bert · 22.7M · SST-2" (fields the files do not give are left out)."""
        return " · ".join(part for part in (name, self.family, self.size, self.what) if part)

    def scorable_tasks(self) -> list[str] | None:
        """The listed tasks its head can be scored on (a causal LM: wikitext2; a 2-label classifier: the
        2-label tasks whose label names fit); None when its head is unknown (offer every task)."""
        if self.head is None:
            return None
        if self.multihead:
            return list(self.tasks)
        found = []
        for name in tasks_for_head(self.head.kind):
            try:
                check_head("", self.head, get_task(name))
            except MergeLabError:
                continue
            found.append(name)
        return found


UNKNOWN = ModelInfo(None, None, None, None)


def _stamps(folder: Path) -> tuple:
    files = sorted({p for pattern in READ for p in folder.glob(pattern) if p.is_file()})
    stamps = []
    for path in files:
        stat = path.stat()
        stamps.append((path.relative_to(folder).as_posix(), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns,
                       stat.st_ino))
    return tuple(stamps)


def describe(spec: str | Path | ModelRef) -> ModelInfo:
    """What `spec`'s files say about it (see `ModelInfo`), without loading weights; cached per file stamps.
    `spec` is a model spec, or a `Path` to a checkpoint folder found by listing (a zoo entry: read where it
    is, also in public mode, where specs are names). A spec that does not resolve is the resolver's
    one-line error; a folder whose files cannot be read gets the fields it could read. Hub ids read
    nothing (no download for a label)."""
    if isinstance(spec, Path):
        ref = ModelRef(spec.name, "local", str(spec))
    else:
        ref = spec if isinstance(spec, ModelRef) else resolve(spec)
    if ref.kind == "hub":
        return UNKNOWN
    if ref.path is None:  # a random initialization (scratch spec): its family, from the config it builds
        key: tuple = (ref.location,)
    else:
        try:
            key = (ref.location, _stamps(ref.path))
        except OSError:
            return UNKNOWN
    found = _INFOS.get(key)
    if found is None:
        found = _INFOS.put(key, _read(ref))
    return found


def _read(ref: ModelRef) -> ModelInfo:
    try:
        config = load_config(ref) if ref.path is None else read_config(ref)
        model_type = str(config.model_type)
    except (MergeLabError, OSError, ValueError, AttributeError):
        return UNKNOWN
    adapter = adapter_for(model_type, generic=True)
    family = model_type if adapter.generic else adapter.family
    try:
        meta = ref.metadata()
        head = head_info(ref, config)
        recorded = meta.get("tasks") or list(meta.get("heads") or []) or ([meta["task"]] if meta.get("task") else [])
        if not recorded and (inferred := head_task(ref, head)):  # an upload's head: the one task its labels fit
            recorded = [inferred]
        tasks = tuple(dict.fromkeys(name for name in map(_task_name, recorded) if name))
        kind = adapter_kind(ref)
    except (MergeLabError, KeyError, TypeError, ValueError):
        return ModelInfo(family, model_type, _parameters(ref.path), None)
    return ModelInfo(family, model_type, _parameters(ref.path), head, tasks, kind, bool(meta.get("heads")))


def _task_name(task: object) -> str | None:
    """A recorded task's id; None for one this version does not know (the label leaves it out)."""
    try:
        return get_task(str(task)).name
    except MergeLabError:
        return None


def _parameters(folder: Path | None) -> int | None:
    """The values in the folder's safetensors files (a multi-head checkpoint: its head files too); None when
    it has none (pickle files) or one is unreadable."""
    if folder is None:
        return None
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("heads/*.safetensors"))
    try:
        return LazyFiles(files).numel() if files else None
    except MergeLabError:  # a truncated or corrupt file: no size, the label leaves it out
        return None


def safe_describe(spec: str | Path | ModelRef) -> ModelInfo:
    """`describe`, or `UNKNOWN` for a spec that does not resolve: a listing never fails over one model."""
    try:
        return describe(spec)
    except MergeLabError:
        return UNKNOWN


def label(name: str, spec: str | Path | ModelRef | None = None) -> str:
    """The picker line of the model shown as `name` (read from `spec`, default `name`)."""
    return safe_describe(name if spec is None else spec).label(name)


def columns(spec: str | Path | ModelRef) -> dict:
    """The fields `zoo list` prints beside an entry's provenance: family, params (as text and exact), head."""
    info = safe_describe(spec)
    return {"family": info.family, "model_type": info.model_type, "params": info.size,
            "parameters": info.parameters, "head": info.head_kind}


def unsupported(spec: str | Path | ModelRef, feature: str, who: str | None = None) -> str:
    """`arch.require`'s one line when `spec`'s family cannot do `feature` yet ("alignment", "training", ...),
    naming the model as `who`; "" when it can, or when its family is unknown (the request's own checks
    then say what is wrong)."""
    try:
        model_type = describe(spec).model_type
    except MergeLabError:
        return ""
    if model_type is None:
        return ""
    try:
        require(model_type, feature, who)
    except MergeLabError as exc:
        return exc.message
    return ""
