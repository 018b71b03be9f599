"""Model specs, loading, saving, head checks and the pickle policy."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from merging_core import models, tasks
from merging_core.errors import MergeLabError

from .conftest import copy_model
from .helpers import assert_close


def test_alias_resolves_to_packaged_minilm():
    ref = models.resolve("minilm")
    assert ref.kind == "alias" and (ref.path / "model.safetensors").is_file()
    head = models.head_info(ref)
    assert head.kind is None  # a bare BertModel


def test_zoo_name_comes_before_local_path(isolated_home, pico, tmp_path, monkeypatch):
    copy_model(pico("sst2"), isolated_home / "zoo" / "sst2-pico")
    assert models.resolve("sst2-pico").kind == "zoo"
    assert models.resolve(str(pico("sst2"))).kind == "local"


def test_missing_path_is_a_clear_error():
    with pytest.raises(MergeLabError, match=r"model path './no/such/model' does not exist"):
        models.resolve("./no/such/model")


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(MergeLabError, match=r"hub is disabled \(HF_HUB_OFFLINE=1\)"):
        models.resolve("google/bert_uncased_L-2_H-128_A-2")


def test_folder_without_config(tmp_path):
    with pytest.raises(MergeLabError, match="not a Hugging Face model folder"):
        models.resolve(str(tmp_path))


def test_save_roundtrip_is_atomic_and_refuses_to_overwrite(pico, tmp_path):
    loaded = models.load(str(pico("sst2")), tasks.get_task("sst2"), device="cpu")
    out = tmp_path / "saved"
    models.save(loaded.model, loaded.tokenizer, out, {"task": "sst2", "note": "roundtrip"})
    assert json.loads((out / models.METADATA).read_text())["note"] == "roundtrip"
    assert (out / "model.safetensors").is_file() and not list(tmp_path.glob(".saved.*"))
    again = models.load(str(out), tasks.get_task("sst2"), device="cpu")
    for (name, a), b in zip(loaded.model.state_dict().items(), again.model.state_dict().values()):
        assert_close(a, b, atol=0, rtol=0, msg=name)
    with pytest.raises(MergeLabError, match="^out: output folder .* already exists; choose a new one"):
        models.save(loaded.model, loaded.tokenizer, out, {})
    models.save(loaded.model, loaded.tokenizer, out, {"note": "second"}, overwrite=True)
    assert json.loads((out / models.METADATA).read_text())["note"] == "second"


def test_failed_save_leaves_nothing(pico, tmp_path):
    out = tmp_path / "broken"
    with pytest.raises(RuntimeError):
        with models.staging(out) as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("disk full")
    assert not out.exists() and not list(tmp_path.iterdir())


def _pickle_copy(src, dst):
    folder = copy_model(src, dst)
    weights = load_file(folder / "model.safetensors")
    torch.save(weights, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_pickle_weights_are_refused_unless_opted_in(pico, tmp_path):
    folder = _pickle_copy(pico("sst2"), tmp_path / "pickled")
    with pytest.raises(MergeLabError, match=r"^allow_pickle: .*only pickle weights \(pytorch_model.bin\).*opt in to loading pickle files"):
        models.load(str(folder), tasks.get_task("sst2"), device="cpu")
    loaded = models.load(str(folder), tasks.get_task("sst2"), allow_pickle=True, device="cpu")
    reference = models.load(str(pico("sst2")), tasks.get_task("sst2"), device="cpu")
    for a, b in zip(loaded.model.state_dict().values(), reference.model.state_dict().values()):
        assert_close(a, b, atol=0, rtol=0)


def test_pickle_with_code_is_rejected_even_when_opted_in(pico, tmp_path):
    folder = copy_model(pico("sst2"), tmp_path / "evil")
    (folder / "model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(Exception, match="Weights only load failed|weights_only"):
        models.load(str(folder), tasks.get_task("sst2"), allow_pickle=True, device="cpu")


@pytest.mark.parametrize(("model_task", "eval_task", "message"), [
    (None, "sst2", "bare encoder with no head for task sst2; fine-tune it first"),
    (None, "wikitext2", "has no MLM head"),
    ("conll2003", "sst2", "has a token head but task sst2 needs a sequence, causal or seq2seq head"),
    ("emotion", "sst2", "has a head with 6 outputs but task sst2 has 2"),
    ("mrpc", "sst2", r"predicts labels \['not_equivalent', 'equivalent'\], not task sst2's"),
])
def test_heads_that_do_not_fit(pico, model_task, eval_task, message):
    with pytest.raises(MergeLabError, match=message):
        models.load(str(pico(model_task)), tasks.get_task(eval_task), device="cpu")


def test_generic_label_names_fit_by_count(pico, tmp_path):
    folder = copy_model(pico("sst2"), tmp_path / "generic")
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {"0": "LABEL_0", "1": "LABEL_1"}
    config["label2id"] = {"LABEL_0": 0, "LABEL_1": 1}
    (folder / "config.json").write_text(json.dumps(config))
    models.load(str(folder), tasks.get_task("rte"), device="cpu")  # no error


def test_new_head_for_training_keeps_the_encoder(pico):
    bare = models.load(str(pico(None)), device="cpu").model
    fresh = models.load(str(pico(None)), tasks.get_task("emotion"), new_head=True, device="cpu").model
    assert fresh.config.num_labels == 6 and fresh.config.id2label[5] == "surprise"
    assert_close(bare.embeddings.word_embeddings.weight, fresh.bert.embeddings.word_embeddings.weight, atol=0, rtol=0)


def test_new_head_takes_the_task_labels_and_keeps_same_shape_weights(pico):
    sst2 = models.load(str(pico("sst2")), tasks.get_task("sst2"), device="cpu").model
    rte = models.load(str(pico("sst2")), tasks.get_task("rte"), new_head=True, device="cpu").model
    assert rte.config.id2label == {0: "entailment", 1: "not_entailment"}
    assert_close(rte.classifier.weight, sst2.classifier.weight, atol=0, rtol=0)  # same shape: transferred, not re-drawn
    models.check_head("rte-from-sst2", models.model_head(rte), tasks.get_task("rte"))  # fits its new task


def test_scratch_models_are_random_from_the_seed():
    import torch

    task = tasks.get_task("wikitext2")
    torch.manual_seed(0)
    first = models.load("scratch:tiny", task, new_head=True).model
    torch.manual_seed(0)
    again = models.load("scratch:tiny", task, new_head=True).model
    torch.manual_seed(1)
    other = models.load("scratch:tiny", task, new_head=True).model
    name = "bert.encoder.layer.0.output.dense.weight"
    assert_close(first.state_dict()[name], again.state_dict()[name], atol=0, rtol=0)
    assert not torch.equal(first.state_dict()[name], other.state_dict()[name])
    assert first.config.hidden_size == 128 and first.config.vocab_size == 30522  # MiniLM's tokenizer
    with pytest.raises(MergeLabError, match="unknown scratch size 'scratch:huge'"):
        models.resolve("scratch:huge")
