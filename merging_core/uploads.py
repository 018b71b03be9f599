"""A user's own checkpoint, uploaded: checked as untrusted input, then written atomically.

Accepted files, by name: `model.safetensors` (exactly one) and `config.json`, both required, plus the
tokenizer files `tokenizer.json`, `tokenizer_config.json`, `vocab.txt` and `special_tokens_map.json`.
Anything else (pickle weights such as `pytorch_model.bin`, Python files, adapter files, other names) is
refused, so nothing uploaded can run code when loaded.

Everything is checked before anything is written: the total size; the JSON files parse, and
config.json is an object naming a model family the engine supports, with no `auto_map` (remote code)
and no quantization; the safetensors header parses and every tensor is a float or int tensor; the
tensors are exactly those of the model config.json describes (built on the `meta` device: no memory,
no weights), with the same shapes; every floating tensor is finite (checked one tensor at a time, in
chunks). Only then are the files copied into a staging folder that becomes `out` when complete; the
tokenizer is loaded there once (when it does not load, nothing is left behind). Without tokenizer
files a model with MiniLM's vocabulary gets MiniLM's tokenizer; any other is refused.

Messages name the uploaded files and config fields, never where the server keeps them.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from .arch import adapter_for, require
from .errors import MergeLabError, writing
from .fingerprint import RECORD
from .models import HEAD_SUFFIXES, METADATA, MINILM, head_class, hf, load_tokenizer, read_config, resolve
from .outputs import check_out, staging

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
ACCEPTED = (WEIGHTS, CONFIG) + TOKENIZER
JSON_FILES = (CONFIG, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
INT_DTYPES = ("I8", "I16", "I32", "I64", "U8")
MAX_LAYERS = 512  # a config asking for more layers than any model this engine merges is refused before it is built
REFUSED_KEYS = {"auto_map": "names custom model code (auto_map), which MergeLab never runs",
                "quantization_config": "describes a quantized model, which MergeLab cannot merge"}
_CHUNK = 1 << 22  # elements checked for finiteness at a time
_PATHS = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][^\\/\s'\"]+)+[\\/]")  # directory parts of a path, for scrubbing


def import_upload(files: list[str | Path], out: Path, *, max_bytes: int) -> Path:
    """Check the uploaded `files` (paths; their names are what counts) and write them into `out`,
    atomically; nothing is written unless every check passes. Returns `out`. What the upload lacked
    (no tokenizer: MiniLM's was copied in) is recorded in `out`/mergelab.json; see `notes`."""
    out = check_out(out, False)
    named = _named(files)
    _check_size(named, max_bytes)
    texts = {name: _read_json(name, path) for name, path in named.items() if name in JSON_FILES}
    if "vocab.txt" in named:
        _check_text("vocab.txt", named["vocab.txt"])
    config = _check_config(texts[CONFIG])
    if "tokenizer_config.json" in texts and "auto_map" in texts["tokenizer_config.json"]:
        raise MergeLabError("tokenizer_config.json names custom tokenizer code (auto_map), which MergeLab never runs; "
                            "remove auto_map or leave the tokenizer files out", param="files")
    _check_weights(named[WEIGHTS], config)
    tokenizer_given = [n for n in TOKENIZER if n in named]
    notes = []
    if tokenizer_given and not {"tokenizer.json", "vocab.txt"} & set(tokenizer_given):
        raise MergeLabError(f"the tokenizer files ({', '.join(tokenizer_given)}) lack the vocabulary: upload "
                            "tokenizer.json or vocab.txt with them, or no tokenizer files at all", param="files")
    if not tokenizer_given:
        minilm = read_config(resolve(MINILM)).get("vocab_size")
        if config["vocab_size"] != minilm:
            raise MergeLabError(f"no tokenizer files were uploaded, and the model's vocabulary ({config['vocab_size']} "
                                f"tokens, config.json's vocab_size) is not MiniLM's ({minilm}), so no tokenizer here "
                                "fits it; upload tokenizer.json (or vocab.txt) and tokenizer_config.json too",
                                param="files")
        notes.append("no tokenizer files were uploaded: the model's vocabulary size matches MiniLM's, so MiniLM's "
                     "tokenizer was added")
    with writing(out), staging(out) as tmp:
        for name, path in named.items():
            shutil.copyfile(path, tmp / name)
        if tokenizer_given:
            _check_tokenizer(tmp, config["vocab_size"])
        else:
            load_tokenizer(resolve(MINILM)).save_pretrained(tmp)
        record = {"source": "upload", "files": sorted(named), "tokenizer": "uploaded" if tokenizer_given else MINILM,
                  "notes": notes}
        (tmp / METADATA).write_text(json.dumps(record, indent=2) + "\n")
    return out


def notes(path: str | Path) -> list[str]:
    """What `import_upload` noted about the upload in `path` (e.g. that a tokenizer was added)."""
    try:
        record = json.loads((Path(path) / METADATA).read_text())
    except (OSError, ValueError):
        return []
    found = record.get("notes") if isinstance(record, dict) else None
    return [str(n) for n in found] if isinstance(found, list) else []


# -- names and sizes -------------------------------------------------------------------------------------


def _shown(name: str) -> str:
    return repr(name[:80])


def _named(files: list[str | Path]) -> dict[str, Path]:
    """{accepted name: path}, or the first refused file, named."""
    if not files:
        raise MergeLabError(f"no files uploaded; upload {WEIGHTS} and {CONFIG} (and the tokenizer files)",
                            param="files")
    named: dict[str, Path] = {}
    for f in files:
        path = Path(f)
        name = path.name
        if name == RECORD:  # MergeLab's own digest record of a checkpoint folder: recomputed, never trusted
            continue
        if name not in ACCEPTED:
            raise MergeLabError(f"file {_shown(name)} is not accepted: {_why_refused(name)}", param="files")
        if name in named:
            what = "one weights file" if name == WEIGHTS else "one of each file"
            raise MergeLabError(f"{name} was uploaded twice; upload {what}", param="files")
        named[name] = path
    for required in (WEIGHTS, CONFIG):
        if required not in named:
            raise MergeLabError(f"{required} is missing from the upload; upload {WEIGHTS} and {CONFIG} "
                                "(and the tokenizer files)", param="files")
    return named


def _why_refused(name: str) -> str:
    lower = name.lower()
    accepted = f"upload only {WEIGHTS}, {CONFIG} and the tokenizer files ({', '.join(TOKENIZER)})"
    if lower.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib")):
        return f"pickle and other code-carrying weight formats can run code when loaded; save the model as {WEIGHTS}"
    if lower.endswith((".py", ".pyc", ".so", ".sh", ".exe", ".dll")):
        return f"MergeLab never runs uploaded code; {accepted}"
    if lower.startswith("adapter_"):
        return f"adapter modules are not accepted; fold the adapter into the model and save it as {WEIGHTS}"
    if lower.endswith((".safetensors", ".safetensors.index.json")):
        return f"the weights must be one file named {WEIGHTS} (not sharded, not renamed)"
    return accepted


def _check_size(named: dict[str, Path], max_bytes: int) -> None:
    total = 0
    for name, path in named.items():
        try:
            if not path.is_file():
                raise MergeLabError(f"{name} is not a file", param="files")
            total += path.stat().st_size
        except OSError as exc:
            raise MergeLabError(f"{name} could not be read ({exc.strerror or type(exc).__name__})",
                                param="files") from None
    if total > max_bytes:
        raise MergeLabError(f"the upload is {_mb(total)}, more than the {_mb(max_bytes)} allowed", param="files")


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f} MB" if size >= 2**20 else f"{size} bytes"


# -- JSON and text ---------------------------------------------------------------------------------------


def _read_json(name: str, path: Path) -> dict:
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = _scrub(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:120]
        raise MergeLabError(f"{name} is not valid JSON ({reason})", param="files") from None
    except OSError as exc:
        raise MergeLabError(f"{name} could not be read ({exc.strerror or type(exc).__name__})", param="files") from None
    if not isinstance(value, dict):
        raise MergeLabError(f"{name} must hold a JSON object, not {type(value).__name__}", param="files")
    return value


def _check_text(name: str, path: Path) -> None:
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise MergeLabError(f"{name} is not UTF-8 text", param="files") from None


def _check_config(config: dict) -> dict:
    """config.json's family is supported, and loading it runs nothing of the uploader's."""
    for key, why in REFUSED_KEYS.items():
        if key in config:
            raise MergeLabError(f"config.json {why}; remove {key!r} from it", param="files")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise MergeLabError("config.json has no model_type (e.g. \"bert\"); export it with save_pretrained",
                            param="files")
    try:
        require(model_type, "uploads")  # a Space scores and aligns what it accepts: the fully supported families
    except MergeLabError as exc:
        raise MergeLabError(f"config.json: {exc.message}", param="files") from None
    for key in ("vocab_size", "num_hidden_layers"):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise MergeLabError(f"config.json's {key} must be a positive whole number, not {str(value)[:40]!r}",
                                param="files")
    if config["num_hidden_layers"] > MAX_LAYERS:
        raise MergeLabError(f"config.json's num_hidden_layers is {config['num_hidden_layers']}, more than MergeLab "
                            f"accepts ({MAX_LAYERS})", param="files")
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise MergeLabError("config.json's architectures must be a list of class names", param="files")
    return config


def _model_for(config: dict) -> torch.nn.Module:
    """The model config.json describes, built on the meta device (shapes only, nothing allocated)."""
    architecture = (config.get("architectures") or [""])[0]
    kind = next((k for suffix, k in HEAD_SUFFIXES.items() if architecture.endswith(suffix)), None)
    try:
        built = hf().AutoConfig.for_model(**config)
        with torch.device("meta"):
            return head_class(kind).from_config(built)
    except Exception as exc:  # noqa: BLE001  (any value transformers cannot build a model from)
        reason = _scrub((str(exc).strip().splitlines() or [type(exc).__name__])[0])[:160]
        raise MergeLabError(f"config.json does not describe a model MergeLab can build ({reason})",
                            param="files") from None


# -- weights ---------------------------------------------------------------------------------------------


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # noqa: BLE001  (truncated, garbage or oversized header: whatever the library raises)
        raise MergeLabError(f"{WEIGHTS} is not a valid safetensors file ({_reason(exc, path)}); it is truncated or "
                            "corrupt: save it again with save_pretrained", param="files") from None


def _reason(exc: BaseException, path: Path) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return _scrub(text.replace(str(path), path.name))[:160]


def _scrub(text: str) -> str:
    """`text` without directory parts of any path in it (a library message may name the server's files)."""
    return _PATHS.sub("", text)


def _label(key: str) -> str:
    """A tensor name as a message shows it: plain when short and printable, else quoted and cut (one line)."""
    return key if key.isprintable() and len(key) <= 120 else repr(key[:120])


def _some(names: list[str], shown: int = 3) -> str:
    names = sorted(names)
    return ", ".join(_label(n) for n in names[:shown]) + (f" (and {len(names) - shown} more)" if len(names) > shown else "")


def _check_weights(path: Path, config: dict) -> None:
    with _open(path) as handle:
        _check_tensors(handle, path, config)


def _check_tensors(handle, path: Path, config: dict) -> None:
    try:
        keys = list(handle.keys())
        if not keys:
            raise MergeLabError(f"{WEIGHTS} holds no tensors", param="files")
        meta = {}
        for key in keys:
            view = handle.get_slice(key)
            dtype = view.get_dtype()
            if dtype not in FLOAT_DTYPES + INT_DTYPES:
                raise MergeLabError(f"{WEIGHTS}: tensor {key[:120]!r} has dtype {dtype}; only float "
                                    f"({', '.join(FLOAT_DTYPES)}) and integer tensors are accepted", param="files")
            meta[key] = (dtype, tuple(view.get_shape()))
        _check_layers(keys, config)
        _check_shapes(meta, config)
        for key in keys:
            if meta[key][0] in FLOAT_DTYPES:
                _check_finite(handle, key)
    except MergeLabError:
        raise
    except Exception as exc:  # noqa: BLE001  (a tensor whose data the library cannot read)
        raise MergeLabError(f"{WEIGHTS} is not a valid safetensors file ({_reason(exc, path)}); it is truncated or "
                            "corrupt: save it again with save_pretrained", param="files") from None


def _check_layers(keys: list[str], config: dict) -> None:
    """The file holds every layer config.json counts (checked before a model of that depth is built)."""
    adapter = adapter_for(config["model_type"])
    layers = set()
    for key in keys:
        try:
            layer = adapter.describe(key).layer
        except MergeLabError:
            continue  # an unknown name: reported by the shape check
        if layer is not None:
            layers.add(layer)
    wanted = config["num_hidden_layers"]
    missing = sorted(set(range(wanted)) - layers)
    if missing:
        shown = ", ".join(str(i) for i in missing[:3]) + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else "")
        raise MergeLabError(f"{WEIGHTS} lacks the tensors of layer {shown} of the {wanted} layers config.json's "
                            "num_hidden_layers describes; the file is incomplete or belongs to another config",
                            param="files")


def _check_shapes(meta: dict[str, tuple[str, tuple[int, ...]]], config: dict) -> None:
    """The file's tensors are exactly the model's (canonical names: with or without the `bert.` prefix),
    with its shapes; a bare encoder may lack the pooler, and tied copies (an MLM decoder) may be absent."""
    adapter = adapter_for(config["model_type"])
    model = _model_for(config)
    expected: dict[str, torch.Tensor] = {}
    owners: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        expected[adapter.canonical(name)] = tensor
        owners.setdefault(id(tensor), []).append(adapter.canonical(name))
    given: dict[str, str] = {}
    for key in meta:
        canon = adapter.canonical(key)
        if canon in given:
            raise MergeLabError(f"{WEIGHTS} holds {given[canon][:120]!r} and {key[:120]!r}, the same tensor twice", param="files")
        given[canon] = key
    unknown = [key for canon, key in given.items() if canon not in expected and not _buffer(adapter, key)]
    if unknown:
        raise MergeLabError(f"{WEIGHTS} holds tensors the {type(model).__name__} model of config.json has no place for: "
                            f"{_some(unknown)}", param="files")
    bare = not any(type(model).__name__.endswith(s) for s in HEAD_SUFFIXES)
    missing = [canon for canon, tensor in expected.items() if canon not in given
               and not any(other in given for other in owners[id(tensor)])  # tied to a tensor the file holds
               and not (bare and canon.startswith("pooler."))]
    if missing:
        raise MergeLabError(f"{WEIGHTS} lacks tensors the {type(model).__name__} model of config.json needs: "
                            f"{_some(missing)}", param="files")
    wrong = []
    for canon, key in given.items():
        if canon not in expected:
            continue
        dtype, shape = meta[key]
        tensor = expected[canon]
        if tuple(tensor.shape) != shape:
            wrong.append(f"{_label(key)} {list(shape)} (config.json: {list(tensor.shape)})")
        elif tensor.is_floating_point() and dtype not in FLOAT_DTYPES:
            raise MergeLabError(f"{WEIGHTS}: tensor {key[:120]!r} is an integer tensor ({dtype}) where the model has float "
                                "weights", param="files")
    if wrong:
        raise MergeLabError(f"{WEIGHTS} has tensors whose shapes disagree with config.json (hidden size, layers, "
                            f"heads or vocabulary): {'; '.join(sorted(wrong)[:3])}"
                            + (f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""), param="files")


def _buffer(adapter, key: str) -> bool:
    try:
        return adapter.describe(key).group == "buffer"
    except MergeLabError:
        return False


def _check_finite(handle, key: str) -> None:
    tensor = handle.get_tensor(key).reshape(-1)
    for start in range(0, tensor.numel(), _CHUNK):
        if not bool(torch.isfinite(tensor[start:start + _CHUNK]).all()):
            chunk = tensor[start:start + _CHUNK]
            what = "NaN" if bool(torch.isnan(chunk).any()) else "infinite"
            raise MergeLabError(f"{WEIGHTS}: tensor {key[:120]!r} holds {what} values; the checkpoint is broken (a diverged "
                                "run?): upload a finite one", param="files")


# -- tokenizer -------------------------------------------------------------------------------------------


def _check_tokenizer(folder: Path, vocab_size: int) -> None:
    """The uploaded tokenizer loads (transformers' own classes only) and its ids fit the embeddings."""
    try:
        tokenizer = hf().AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        size = len(tokenizer)
    except Exception as exc:  # noqa: BLE001  (whatever a broken tokenizer file makes the library raise)
        text = (str(exc).strip().splitlines() or [""])[0].replace(str(folder), "")
        reason = _scrub(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)[:160]
        raise MergeLabError(f"the uploaded tokenizer files do not load ({reason}); upload the files the model's "
                            "tokenizer.save_pretrained writes", param="files") from None
    if size > vocab_size:
        raise MergeLabError(f"the uploaded tokenizer has {size} tokens but config.json's vocab_size is {vocab_size}; "
                            "upload the model's own tokenizer", param="files")

