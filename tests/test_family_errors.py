"""Bad input across model families: each is one line that names the input at fault.

- a model of a family with no adapter: merges data-free with a note, and scoring, statistics and training
  refuse it by name and list the families that can;
- two models of different families, in a merge, a curve and a comparison;
- two models of one family whose vocabularies differ (same size, different tokenizer files; or a
  different size);
- a decoder asked for a task it cannot read (token tags, regression).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers

import merging_core as ml
from merging_core.errors import MergeLabError
from merging_core.merge import merge
from merging_core.training import TrainConfig, train

from .conftest import save_family_model
from .test_families import UNKNOWN
from .test_family_scoring import word_tokenizer


def one_line(error: pytest.ExceptionInfo, *names: str) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    for name in names:
        assert name in message, (name, message)
    return message


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("family-errors")
    made = {
        "llama": save_family_model(root / "llama", "llama", "causal", {"kind": "full", "seed": 0}),
        "llama2": save_family_model(root / "llama2", "llama", "causal", {"kind": "full", "seed": 1}),
        "gpt2": save_family_model(root / "gpt2", "gpt2", "causal", {"kind": "full", "seed": 0}),
    }
    # one Llama whose tokenizer maps the same number of ids to other words
    other = save_family_model(root / "llama-other-vocab", "llama", "causal", {"kind": "full", "seed": 0})
    vocab = json.loads((other / "tokenizer.json").read_text())
    words = vocab["model"]["vocab"]
    renamed = {("x" + w if i > 10 else w): i for w, i in words.items()}
    vocab["model"]["vocab"] = renamed
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    made["llama-other-vocab"] = other
    config_class, config, model_class, _ = UNKNOWN["gpt_neox"]
    neox = root / "neox"
    getattr(transformers, model_class)(getattr(transformers, config_class)(**config)).save_pretrained(neox)
    word_tokenizer(pad=False).save_pretrained(neox)
    made["neox"] = neox
    return {k: str(v) for k, v in made.items()}


def test_an_unsupported_family_merges_data_free_and_is_refused_by_name_elsewhere(folders, tmp_path):
    result = merge("average", [folders["neox"], folders["neox"]])
    assert any("gpt_neox" in note for note in result.notes)
    with pytest.raises(MergeLabError) as error:
        ml.evaluate(folders["neox"], "wikitext2", limit=2)
    message = one_line(error, folders["neox"], "'gpt_neox' is not supported yet for scoring on tasks")
    assert "llama" in message and "data-free merges" in message
    with pytest.raises(MergeLabError) as error:
        merge("regmean", [folders["neox"], folders["neox"]], stats_tasks=("wikitext2", "wikitext2"))
    one_line(error, "gpt_neox", "statistics")
    with pytest.raises(MergeLabError) as error:
        train(TrainConfig(base=folders["neox"], task="sst2", steps=1), tmp_path / "out")
    one_line(error, folders["neox"], "fine-tuning")
    assert not (tmp_path / "out").exists()


def test_models_of_different_families_are_refused_by_name(folders):
    for run in (lambda: merge("average", [folders["llama"], folders["gpt2"]]),
                lambda: ml.curve(folders["llama"], folders["gpt2"], "wikitext2", points=2).result()):
        with pytest.raises(MergeLabError) as error:
            run()
        one_line(error, folders["gpt2"], "gpt2 model", "llama", "merge models of one architecture")
    with pytest.raises(MergeLabError) as error:
        merge("task_arithmetic", [folders["llama"]], base=folders["gpt2"])
    one_line(error, f"base model {folders['gpt2']!r}", "llama")


def test_a_different_vocabulary_is_refused_by_name(folders, tmp_path):
    with pytest.raises(MergeLabError) as error:
        merge("average", [folders["llama"], folders["llama-other-vocab"]])
    one_line(error, folders["llama-other-vocab"], "different vocabulary")
    # same tokenizer files, a smaller vocabulary in the weights and config
    small = save_family_model(tmp_path / "small", "llama", "causal", {"kind": "full", "seed": 0})
    config = json.loads((small / "config.json").read_text())
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**config, "vocab_size": 50}))
    model.save_pretrained(small)
    with pytest.raises(MergeLabError) as error:
        merge("average", [folders["llama"], str(small)])
    one_line(error, str(small), "different vocabulary")
    assert merge("average", [folders["llama"], folders["llama2"]]).state  # the control: one vocabulary merges


def test_a_decoder_asked_for_a_task_it_cannot_read_is_one_line(folders):
    for task, head in (("conll2003", "token"), ("stsb", "sequence")):
        with pytest.raises(MergeLabError) as error:
            ml.evaluate(folders["llama"], task, limit=2)
        one_line(error, folders["llama"], f"task {task} needs a {head} head", "can be scored on")
    with pytest.raises(MergeLabError) as error:
        train(TrainConfig(base=folders["gpt2"], task="conll2003", steps=1, peft="prefix"), Path(folders["gpt2"]) / "x")
    one_line(error, "prefix modules", "'gpt2'")
