"""Shared fixtures: environment, pico BERT checkpoints, a small GLUE-format task folder.

Pico models (2 layers, hidden 32) use the packaged MiniLM tokenizer so they read the real data; they
are saved with `save_pretrained` (safetensors) exactly as MergeLab saves its own checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()

# Set before merging_core is imported anywhere: offline, and a data root that exists.
os.environ.setdefault("MERGELAB_DATA", str(SHARED_DATA))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("MERGELAB_DEVICE", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    if not Path(os.environ["MERGELAB_DATA"]).is_dir():
        raise pytest.UsageError(f"MERGELAB_DATA={os.environ['MERGELAB_DATA']} does not exist; point it at shared/data")


def pytest_collection_modifyitems(config, items):
    """Skip the tests marked `gpu` (e.g. the "cuda" case of `helpers.DEVICES`) where CUDA is not available."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu: needs CUDA, and torch.cuda.is_available() is False here")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def mergelab_home(tmp_path_factory) -> Path:
    """One MergeLab home for the session (tokenization cache shared across tests)."""
    home = tmp_path_factory.mktemp("mergelab-home")
    os.environ["MERGELAB_HOME"] = str(home)
    # a public-mode app under test must not start building the demo zoo by itself (tests that check
    # that it does set this back to "demo")
    os.environ["MERGELAB_PROVISION"] = "off"
    return home


@pytest.fixture(scope="session")
def data_root() -> Path:
    # absolute, so that fixtures may symlink into it from elsewhere (CI sets a relative path)
    return Path(os.environ["MERGELAB_DATA"]).resolve()


@pytest.fixture(scope="session")
def tokenizer():
    from merging_core import models

    return models.load_tokenizer(models.resolve("minilm"))


def make_pico(out: Path, task: str | None, seed: int = 0, **config_overrides) -> Path:
    """A randomly initialised 2-layer BERT with the head of `task` (bare encoder when None)."""
    import torch
    from transformers import BertConfig

    from merging_core import models, tasks

    spec = tasks.get_task(task) if task else None
    sizes = {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 64, "max_position_embeddings": 512, **config_overrides}
    config = BertConfig(**sizes, **(models.task_head_kwargs(spec) if spec else {}))
    torch.manual_seed(seed)
    model = models.head_class(spec.head if spec else None).from_config(config)
    model.save_pretrained(out)
    models.load_tokenizer(models.resolve("minilm")).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def pico(tmp_path_factory):
    """Factory of pico checkpoints, cached per (task, seed)."""
    root = tmp_path_factory.mktemp("pico")
    made: dict[tuple, Path] = {}

    def get(task: str | None = "sst2", seed: int = 0) -> Path:
        key = (task, seed)
        if key not in made:
            made[key] = make_pico(root / f"{task or 'bare'}-{seed}", task, seed)
        return made[key]

    return get


@pytest.fixture(scope="session")
def rte_root(tmp_path_factory, data_root) -> Path:
    """A data root holding the shared data plus an RTE folder in the official GLUE format.

    RTE is not in the offline data, so its files are written here (official header and string labels,
    a few hand-written sentence pairs) to show that a task outside the zoo recipe needs no code beyond
    its registry entry.
    """
    root = tmp_path_factory.mktemp("data-with-rte")
    for child in data_root.iterdir():
        if child.name != "glue":
            (root / child.name).symlink_to(child)
    for child in (data_root / "glue").iterdir():
        (root / "glue").mkdir(exist_ok=True)
        (root / "glue" / child.name).symlink_to(child)
    rte = root / "glue" / "RTE"
    rte.mkdir()
    pairs = [
        ("The cat sat on the mat in the kitchen.", "A cat is on a mat.", "entailment"),
        ("The company reported record profits this year.", "The company lost money.", "not_entailment"),
        ("Paris is the capital of France.", "France has a capital.", "entailment"),
        ("He walked to the station in the rain.", "He drove to work.", "not_entailment"),
        ("The river flooded the village after the storm.", "There was a storm.", "entailment"),
        ("She plays the violin in an orchestra.", "She is a professional boxer.", "not_entailment"),
    ]
    for split, rows in (("train", pairs * 8), ("dev", pairs)):
        lines = ["index\tsentence1\tsentence2\tlabel"] + [f"{i}\t{a}\t{b}\t{l}" for i, (a, b, l) in enumerate(rows)]
        (rte / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture()
def data_env(monkeypatch):
    """Point MERGELAB_DATA somewhere else for one test."""

    def set_root(path: Path | str) -> None:
        monkeypatch.setenv("MERGELAB_DATA", str(path))

    return set_root


@pytest.fixture()
def isolated_home(monkeypatch, tmp_path) -> Path:
    """A fresh, empty MergeLab home (empty zoo) for one test."""
    home = tmp_path / "home"
    monkeypatch.setenv("MERGELAB_HOME", str(home))
    return home


@pytest.fixture()
def app_home(isolated_home, pico, tmp_path, monkeypatch):
    """A home whose zoo holds one pico SST-2 model, and a recipe folder with one tiny recipe."""
    entry = copy_model(pico("sst2"), isolated_home / "zoo" / "pico-sst2")
    (entry / "mergelab.json").write_text(json.dumps({"task": "sst2", "kind": "full", "seed": 0, "steps": 0,
                                                     "scores": {"dev": {"accuracy": 0.5}}}))
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "tiny.yaml").write_text(f"defaults: {{base: '{pico(None)}', steps: 2, batch_size: 4, eval_limit: 8}}\n"
                                       "models:\n  stsb-tiny: {task: stsb}\n")
    import merging_core as ml

    monkeypatch.setattr(ml.zoo, "RECIPES", recipes)
    return isolated_home


def save_family_model(folder: Path, family: str, head: str, metadata: dict, *, labels: tuple[str, ...] = ()) -> Path:
    """A tiny random checkpoint of another family (`tests/test_family_scoring.py`'s builders: "llama",
    "gpt2", "distilbert", ... with a "sequence", "token" or "causal" head), saved with its word-level
    tokenizer and `metadata` as mergelab.json, offline; `labels` names a classifier's labels."""
    from .test_family_scoring import DECODERS, build, word_tokenizer

    model = build(family, head, labels=len(labels) or None)
    if labels:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {label: i for i, label in enumerate(labels)}
    model.save_pretrained(folder)
    word_tokenizer(pad=family not in DECODERS).save_pretrained(folder)
    (folder / "mergelab.json").write_text(json.dumps(metadata))
    return folder


@pytest.fixture()
def family_zoo(app_home) -> Path:
    """app_home's zoo (pico-sst2, a BERT) plus two other families: `tiny-llama`, a Llama causal LM that
    records no task, and `tiny-gpt2-sst2`, a GPT-2 SST-2 classifier."""
    zoo = app_home / "zoo"
    save_family_model(zoo / "tiny-llama", "llama", "causal", {"kind": "full", "seed": 0})
    save_family_model(zoo / "tiny-gpt2-sst2", "gpt2", "sequence", {"task": "sst2", "kind": "full", "seed": 0},
                      labels=("negative", "positive"))
    return app_home


@pytest.fixture()
def public_home(app_home, pico, monkeypatch):
    """app_home (a zoo with pico-sst2, pico-cola) in public mode."""
    entry = copy_model(pico("cola", seed=1), app_home / "zoo" / "pico-cola")
    (entry / "mergelab.json").write_text(json.dumps({"task": "cola", "kind": "full", "seed": 1, "steps": 0}))
    monkeypatch.setenv("MERGELAB_PUBLIC", "1")
    monkeypatch.delenv("MERGELAB_ADMIN_TOKEN", raising=False)
    return app_home


@contextmanager
def running_app() -> Iterator[str]:
    """The app built and served in this process (for gradio_client); yields its URL."""
    from views import build_app

    demo = build_app()
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True)
    try:
        yield url
    finally:
        demo.close()


def app_client(url: str):
    """A gradio_client on `url`: one visitor (one session), quiet, sending no telemetry."""
    import gradio_client

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gradio_client.Client(url, verbose=False, analytics_enabled=False)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
