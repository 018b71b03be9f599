"""Caches are keyed by content: a changed config, tokenizer, weight file or data file is never served a
statistic (or a tokenization) computed from the old one, even when the file keeps its size and mtime;
an unchanged checkpoint still hits the cache, and its weights are hashed once (the record beside it)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merging_core import encode, fingerprint, models, stats, tasks

EXAMPLES = {"examples": 4}


@pytest.fixture()
def small_data(tmp_path, data_env, data_root) -> Path:
    """A data root with a 100-example SST-2 (fast to tokenize), private to the test (it is edited)."""
    root = tmp_path / "data"
    folder = root / "glue" / "SST-2"
    folder.mkdir(parents=True)
    lines = (data_root / "glue" / "SST-2" / "train.tsv").read_text().splitlines()[:101]
    (folder / "train.tsv").write_text("\n".join(lines) + "\n")
    shutil.copy(data_root / "glue" / "SST-2" / "dev.tsv", folder / "dev.tsv")
    data_env(root)
    return root


@pytest.fixture()
def model(pico, tmp_path) -> Path:
    """A private copy of a pico SST-2 checkpoint (the tests edit its files)."""
    return Path(shutil.copytree(pico("sst2", 0), tmp_path / "model"))


@pytest.fixture()
def calls(monkeypatch) -> list:
    """The statistics actually computed (not served from the cache)."""
    made: list = []
    real = stats.compute_parts
    monkeypatch.setattr(stats, "compute_parts", lambda ref, spec, kind, *a, **kw: made.append((ref.spec, kind))
                        or real(ref, spec, kind, *a, **kw))
    return made


@pytest.fixture()
def trusted(monkeypatch):
    """Trust recorded digests at once (normally a file changed in the last seconds is re-hashed, as git does
    for racily clean files), so that these tests exercise the recorded stamps themselves."""
    monkeypatch.setattr(fingerprint, "RACY_NS", 0)


def gram(folder: Path) -> dict:
    return stats.statistics(str(folder), "sst2", ("gram",), EXAMPLES)


def edit_keeping_stamp(path: Path, change) -> None:
    """Rewrite `path` as `change(old bytes)`, then restore its access and modification times."""
    before = path.stat()
    path.write_bytes(change(path.read_bytes()))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[n]["gram"], b[n]["gram"]) for n in a)


def test_unchanged_checkpoint_hits_the_cache_and_is_hashed_once(model, small_data, calls, trusted, monkeypatch):
    first = gram(model)
    assert calls == [(str(model), "gram")]
    record = json.loads((model / fingerprint.RECORD).read_text())
    assert record["model.safetensors"]["sha256"] == hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()
    fingerprint._MEMORY.clear()  # as a new process: only the record beside the checkpoint is left
    hashed = []
    real = fingerprint._sha256
    monkeypatch.setattr(fingerprint, "_sha256", lambda path: hashed.append(Path(path).name) or real(path))
    again = gram(model)
    assert calls == [(str(model), "gram")]  # served from the cache
    assert "model.safetensors" not in hashed  # the weights' digest came from the record
    assert same(first, again)
    assert not [p for p in model.iterdir() if p.name.endswith(".tmp")]  # the record was written atomically


def test_changed_config_recomputes(model, small_data, calls):
    first = gram(model)
    edit_keeping_stamp(model / "config.json", lambda b: b.replace(b'"hidden_act": "gelu"', b'"hidden_act": "relu"'))
    second = gram(model)
    assert len(calls) == 2 and not same(first, second)


def test_changed_tokenizer_recomputes(model, small_data, calls):
    first = gram(model)

    def swap(text: bytes) -> bytes:  # "the" and "and" trade ids: same size, other token ids
        return re.sub(rb'"the": 1996|"and": 1998', lambda m: b'"the": 1998' if m.group(0).startswith(b'"the')
                      else b'"and": 1996', text)

    edit_keeping_stamp(model / "tokenizer.json", swap)
    second = gram(model)
    assert len(calls) == 2 and not same(first, second)
    assert models.load_tokenizer(models.resolve(str(model))).convert_tokens_to_ids("the") == 1998


@pytest.mark.parametrize("memory", ["in-process", "record"])
def test_same_size_weights_rewrite_recomputes(memory, model, small_data, calls, trusted):
    first = gram(model)
    if memory == "record":
        fingerprint._MEMORY.clear()

    def doubled(data: bytes) -> bytes:
        scratch = model.parent / "scratch.safetensors"
        scratch.write_bytes(data)
        save_file({k: v * 2 for k, v in load_file(scratch).items()}, scratch, {"format": "pt"})
        return scratch.read_bytes()

    edit_keeping_stamp(model / "model.safetensors", doubled)
    second = gram(model)
    assert len(calls) == 2 and not same(first, second)
    record = json.loads((model / fingerprint.RECORD).read_text())
    assert record["model.safetensors"]["sha256"] == hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("memory", ["in-process", "record"])
def test_same_size_data_change_recomputes(memory, model, small_data, calls, trusted, tokenizer):
    spec = tasks.get_task("sst2")
    fisher = stats.statistics(str(model), "sst2", ("fisher",), EXAMPLES)
    labels = encode.encode(spec, "train", tokenizer).labels.clone()
    if memory == "record":
        fingerprint._MEMORY.clear()
    train = small_data / "glue" / "SST-2" / "train.tsv"
    lines = train.read_bytes().split(b"\n")
    # every label flipped (same size): the Fisher at gold labels changes whichever examples are drawn
    flipped = [lines[0]] + [l[:-1] + (b"1" if l.endswith(b"0") else b"0") if l else l for l in lines[1:]]
    edit_keeping_stamp(train, lambda _: b"\n".join(flipped))
    again = stats.statistics(str(model), "sst2", ("fisher",), EXAMPLES)
    assert calls == [(str(model), "fisher")] * 2
    assert not all(torch.equal(fisher[n]["fisher"], again[n]["fisher"]) for n in fisher)
    assert torch.equal(encode.encode(spec, "train", tokenizer).labels, 1 - labels)  # the tokenization cache too
    assert not list(small_data.rglob(fingerprint.RECORD))  # nothing is ever written into the data root


def test_read_only_checkpoint_is_not_recorded(model, small_data, calls, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(fingerprint.tempfile, "mkstemp", refuse)  # the folder refuses new files
    first = gram(model)
    assert not (model / fingerprint.RECORD).exists()
    assert same(gram(model), first) and len(calls) == 1


def test_statistics_record_names_what_it_was_computed_from(model, small_data):
    gram(model)
    rec = stats.record(models.resolve(str(model)), tasks.get_task("sst2"), "gram", {**stats.DEFAULTS, **EXAMPLES})
    beside = json.loads(stats.cache_path(rec).with_suffix(".json").read_text())
    assert {"weights", "config", "tokenizer", "data"} <= set(beside)
    assert beside["weights"] == rec["weights"] and beside["examples"] == 4
