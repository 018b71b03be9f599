"""Read a task's raw examples from the data root, or from the hub when the root lacks them.

Local formats (the layout of `shared/data`, see its README):

- `glue`: official GLUE TSV files, columns found by header name (CoLA has no header: by position);
  rows whose cell count differs from the header are skipped, as the official files have a few.
- `semicolon`: `text;label` lines with a header (emotion); split on the last `;`.
- `conll`: `token ... TAG` lines, blank line between sentences, `-DOCSTART-` skipped.
- `text`: raw text for MLM (WikiText-2 tokenized form).
- `corpus`: the train split gathers every training text of the data root, one sentence per line
  (pretraining from scratch); other splits are read as `text`.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

from . import settings
from .errors import MergeLabError
from .fingerprint import digest
from .tasks import TASKS, TaskSpec


@dataclass
class RawSplit:
    """One split of a task, before tokenization.

    texts: classification/regression: one tuple of 1-2 strings per example; token: one list of words
    per sentence; mlm: one string per non-empty line. labels: int or float per example; token: a list of
    tag indices per sentence; mlm: None.
    """

    texts: list
    labels: list | None
    source: str  # a path or hub id, for error messages and provenance
    fingerprint: str  # changes when the underlying data changes; part of every cache key


def _local_file(spec: TaskSpec, split: str) -> Path | None:
    folder = settings.data_root() / spec.directory
    for name in (spec.files[split], spec.fallback_files.get(split)):
        if name and (folder / name).is_file():
            return folder / name
    return None


def load_split(spec: TaskSpec, split: str) -> RawSplit:
    """The raw examples of `split` ("train", "dev", "test") from the data root, else from the hub."""
    if split == "validation":
        split = "dev"
    if split not in spec.files:
        raise MergeLabError(f"task {spec.name} has no split {split!r}; choose one of {', '.join(spec.files)}")
    if spec.format == "corpus" and split == "train":
        return _read_corpus()
    path = _local_file(spec, split)
    if path is not None:
        return _read_local(spec, path)
    return _read_hub(spec, split)


def local_fingerprint(spec: TaskSpec, split: str) -> str | None:
    """A cheap fingerprint of the local file(s) behind `split` (None when the data must come from the hub)."""
    if spec.format == "corpus" and split == "train":
        return _corpus_fingerprint(_corpus_sources())
    path = _local_file(spec, split) if split in spec.files else None
    return _fingerprint_file(path) if path is not None else None


def _corpus_sources() -> list[tuple[TaskSpec, Path]]:
    """The train file of every task the data root holds (WikiText-2's falls back to test.txt)."""
    found = [(spec, _local_file(spec, "train")) for spec in TASKS.values() if spec.format != "corpus"]
    return [(spec, path) for spec, path in found if path is not None]


def _corpus_fingerprint(sources: list[tuple[TaskSpec, Path]]) -> str:
    return hashlib.sha1("|".join(_fingerprint_file(p) for _, p in sources).encode()).hexdigest()[:16]


def _read_corpus() -> RawSplit:
    """Every training text of the data root as lines of text: each sentence of a sentence(-pair) task,
    each CoNLL sentence with its words joined, each WikiText line."""
    sources = _corpus_sources()
    if not sources:
        raise MergeLabError(f"the data root {settings.data_root()} holds no training text for the corpus task")
    lines: list[str] = []
    for spec, path in sources:
        raw = _read_local(spec, path)
        for example in raw.texts:
            if spec.kind == "mlm":
                lines.append(example)
            elif spec.kind == "token":
                lines.append(" ".join(example))
            else:
                lines.extend(t for t in example if t.strip())
    source = "corpus:" + ",".join(spec.name for spec, _ in sources)
    return RawSplit(lines, None, source, _corpus_fingerprint(sources))


def _fingerprint_file(path: Path) -> str:
    """A hash of the file's content (not its name, size and mtime, which survive a same-size edit with the
    mtime restored). The digest is remembered under the cache (`fingerprint`), never beside the data: the
    data root is not ours to write into."""
    try:
        folder = path.resolve().parent
        record = settings.cache_dir("fingerprints") / f"data-{hashlib.sha1(str(folder).encode()).hexdigest()[:16]}.json"
    except OSError:  # no writable home: hash without remembering
        return digest(path, remember=False)[:16]
    return digest(path, record=record)[:16]


def _read_local(spec: TaskSpec, path: Path) -> RawSplit:
    readers = {"glue": _read_glue, "semicolon": _read_semicolon, "conll": _read_conll, "text": _read_text,
               "corpus": _read_text}
    texts, labels = readers[spec.format](spec, path)
    if not texts:
        raise MergeLabError(f"{path} holds no examples for task {spec.name}; check the file")
    return RawSplit(texts, labels, str(path), _fingerprint_file(path))


def _label_index(spec: TaskSpec, raw: str, path: Path) -> int | float:
    """A label cell as the model sees it: a float for regression, else its index in `spec.labels`."""
    raw = raw.strip()
    if spec.kind == "regression":
        return float(raw)
    if raw in spec.labels:
        return spec.labels.index(raw)
    if raw.isdigit() and int(raw) < len(spec.labels):
        return int(raw)
    raise MergeLabError(f"{path}: label {raw!r} is not one of {spec.labels} for task {spec.name}")


def _read_glue(spec: TaskSpec, path: Path) -> tuple[list, list]:
    # QUOTE_NONE: GLUE cells contain unbalanced quotes; utf-8-sig: the MRPC header starts with a BOM.
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if spec.positional:
        columns, width, body = spec.positional, None, rows
    else:
        header = [cell.strip() for cell in rows[0]]
        missing = [c for c in (*spec.text_columns, spec.label_column) if c not in header]
        if missing:
            raise MergeLabError(f"{path}: header lacks column(s) {missing} needed by task {spec.name}; "
                                f"found {header}")
        columns, width, body = {c: header.index(c) for c in header}, len(header), rows[1:]
    text_idx = [columns[c] for c in (spec.text_columns if not spec.positional else ("sentence",))]
    label_idx = columns[spec.label_column if not spec.positional else "label"]
    texts, labels = [], []
    for row in body:
        if width is not None and len(row) != width:
            continue  # a malformed row of the official file (QQP, MNLI have a handful)
        if label_idx >= len(row) or not row[label_idx].strip():
            continue  # unlabeled (test files)
        texts.append(tuple(row[i] for i in text_idx))
        labels.append(_label_index(spec, row[label_idx], path))
    return texts, labels


def _read_semicolon(spec: TaskSpec, path: Path) -> tuple[list, list]:
    texts, labels = [], []
    with open(path, encoding="utf-8") as f:
        next(f)  # header: text;label_name
        for line in f:
            if line.strip():
                text, label = line.rstrip("\n").rsplit(";", 1)
                texts.append((text,))
                labels.append(_label_index(spec, label, path))
    return texts, labels


def _read_conll(spec: TaskSpec, path: Path) -> tuple[list, list]:
    sentences, tags, words, word_tags = [], [], [], []
    with open(path, encoding="utf-8") as f:
        for line in [*f, "\n"]:
            parts = line.split()
            if not parts or parts[0] == "-DOCSTART-":
                if words:
                    sentences.append(words)
                    tags.append(word_tags)
                words, word_tags = [], []
                continue
            words.append(parts[0])
            word_tags.append(_label_index(spec, parts[-1], path))
    return sentences, tags


def _read_text(spec: TaskSpec, path: Path) -> tuple[list, None]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()], None


def _read_hub(spec: TaskSpec, split: str) -> RawSplit:
    local = settings.data_root() / spec.directory / spec.files[split]
    hint = (f"task {spec.name} ({split}) is not in the data root (looked for {local}) and ")
    if spec.hub is None or split not in spec.hub.splits:
        raise MergeLabError(hint + "has no hub fallback; set MERGELAB_DATA to a folder that has it")
    if not settings.hub_allowed():
        raise MergeLabError(hint + "the hub is disabled (HF_HUB_OFFLINE=1); set MERGELAB_DATA to a data root")
    hub = spec.hub
    try:
        import datasets  # imported here: only the online fallback needs it

        dataset = datasets.load_dataset(hub.path, hub.config, split=hub.splits[split])
    except Exception as exc:  # network errors come in many types; the message is what matters
        raise MergeLabError(hint + f"loading {hub.path} from the hub failed ({type(exc).__name__}); "
                            "set MERGELAB_DATA to a data root or check the connection") from exc
    columns = [dataset[c] for c in hub.text_columns]
    if spec.kind == "token":
        texts = columns[0]
    elif spec.kind == "mlm":
        texts = [t.strip() for t in columns[0] if t.strip()]
    else:
        texts = list(zip(*columns))
    labels = list(dataset[hub.label_column]) if hub.label_column else None
    if labels is not None and spec.kind == "classification" and min(labels) < 0:
        raise MergeLabError(f"hub split {hub.path}:{hub.splits[split]} is unlabeled; use another split")
    source = f"hub:{hub.path}/{hub.config or ''}:{hub.splits[split]}"
    fingerprint = hashlib.sha1(f"{source}:{dataset._fingerprint}".encode()).hexdigest()[:16]
    return RawSplit(texts, labels, source, fingerprint)


def available_tasks() -> list[str]:
    """Tasks whose dev split is present in the data root (the hub is not probed)."""
    try:
        root_ok = settings.data_root().is_dir()
    except MergeLabError:
        return []
    return [name for name, spec in TASKS.items() if root_ok and _local_file(spec, "dev") is not None]

