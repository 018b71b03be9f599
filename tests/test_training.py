"""Fine-tuning on pico models: learning, provenance, checkpoints, partitions, LoRA, head-only."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from merging_core import TrainConfig, evaluate, models, partition, tasks, train
from merging_core.errors import MergeLabError


def test_training_learns_and_records_provenance(pico, tmp_path):
    config = TrainConfig(task="stsb", base=str(pico(None)), seed=3, steps=30, batch_size=16, lr=1e-2,
                         save_every=10, eval_limit=64)
    # The model training starts from: the same seed draws the same fresh head.
    torch.manual_seed(config.seed)
    start = models.load(config.base, tasks.get_task("stsb"), new_head=True, device="cpu")
    before = evaluate(start, "stsb", limit=64)

    result = train(config, tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "mergelab.json").read_text())
    assert meta == result.metadata
    assert (meta["task"], meta["seed"], meta["steps"], meta["partition"], meta["kind"]) == ("stsb", 3, 30, "iid", "full")
    assert meta["base"] == str(pico(None)) and meta["train_examples"] == 5749
    after = meta["scores"]["dev"]
    assert after["n"] == 64 and after["loss"] < before["loss"] / 2  # MSE on 0-5 scores drops fast
    assert [c["step"] for c in meta["checkpoints"]] == [10, 20]
    step10 = json.loads((tmp_path / "run" / "step-10" / "mergelab.json").read_text())
    assert step10["steps"] == 10 and step10["scores"]["dev"] == meta["checkpoints"][0]["dev"]
    assert evaluate(str(tmp_path / "run"), "stsb", limit=64)["pearson"] == after["pearson"]  # as recorded


def test_same_seed_same_weights(pico, tmp_path):
    config = TrainConfig(task="stsb", base=str(pico(None)), seed=1, steps=4, batch_size=8, eval_limit=8)
    train(config, tmp_path / "a")
    train(config, tmp_path / "b")
    other = TrainConfig(task="stsb", base=str(pico(None)), seed=2, steps=4, batch_size=8, eval_limit=8)
    train(other, tmp_path / "c")
    a, b, c = (load_file(tmp_path / x / "model.safetensors") for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["classifier.weight"], c["classifier.weight"])


def test_head_only_keeps_the_encoder_frozen(pico, tmp_path):
    base = load_file(pico("wikitext2") / "model.safetensors")
    config = TrainConfig(task="wikitext2", base=str(pico("wikitext2")), steps=3, batch_size=4, head_only=True,
                         eval_limit=4)
    train(config, tmp_path / "mlm")
    tuned = load_file(tmp_path / "mlm" / "model.safetensors")
    for name, tensor in tuned.items():
        changed = not torch.equal(tensor, base[name])
        # The head trains (transform, LayerNorm, output bias); the decoder matrix is the frozen word embeddings.
        assert changed == (name.startswith("cls.predictions") and name != "cls.predictions.decoder.weight"), name


def test_lora_module_trains_saves_and_loads(pico, tmp_path):
    config = TrainConfig(task="sst2", base=str(pico(None)), steps=5, batch_size=8, peft="lora", eval_limit=16)
    result = train(config, tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "lora" / "model.safetensors").exists()
    assert result.metadata["kind"] == "lora"
    again = evaluate(str(tmp_path / "lora"), "sst2", limit=16)
    assert again["accuracy"] == result.metadata["scores"]["dev"]["accuracy"]
    assert again["loss"] == pytest.approx(result.metadata["scores"]["dev"]["loss"], rel=1e-4)


def test_iid_shards_are_disjoint_and_cover():
    labels = torch.arange(100) % 2
    spec = tasks.get_task("sst2")
    shards = [partition.indices(partition.parse(f"iid:{k}/3"), spec, labels) for k in (1, 2, 3)]
    joined = torch.cat(shards)
    assert len(joined) == 100 and len(set(joined.tolist())) == 100


def test_label_skew_shards():
    labels = torch.arange(4000) % 2
    spec = tasks.get_task("sst2")
    first = partition.indices(partition.parse("label-skew:1/2"), spec, labels)
    second = partition.indices(partition.parse("label-skew:2/2@0.9"), spec, labels)
    assert labels[first].float().mean() == pytest.approx(0.2, abs=0.03)  # 80% label 0 by default
    assert labels[second].float().mean() == pytest.approx(0.9, abs=0.03)
    # Same shard, same data whatever the caller; different shards of one partition never overlap.
    assert torch.equal(first, partition.indices(partition.parse("label-skew:1/2"), spec, labels))
    other_half = partition.indices(partition.parse("label-skew:2/2"), spec, labels)
    assert not set(first.tolist()) & set(other_half.tolist())


def test_regression_label_skew_uses_score_bins():
    scores = torch.linspace(0, 5, 1000)
    low = partition.indices(partition.parse("label-skew:1/2@1"), tasks.get_task("stsb"), scores)
    assert scores[low].max() <= 2.51


@pytest.mark.parametrize(("text", "message"), [
    ("random", "not understood"), ("iid:3/2", "between 1 and N"), ("label-skew:1/1", "N >= 2"),
])
def test_bad_partitions(text, message):
    with pytest.raises(MergeLabError, match=message):
        partition.parse(text)


def test_label_skew_needs_example_labels(pico, tmp_path):
    config = TrainConfig(task="conll2003", base=str(pico(None)), steps=1, partition="label-skew:1/2")
    with pytest.raises(MergeLabError, match="use iid:K/N"):
        train(config, tmp_path / "x")


def test_existing_output_is_refused_before_training(pico, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("keep me")
    with pytest.raises(MergeLabError, match="already exists"):
        train(TrainConfig(task="sst2", base=str(pico(None)), steps=1), tmp_path / "taken")
    assert (tmp_path / "taken" / "file").read_text() == "keep me"
