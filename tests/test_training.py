"""Fine-tuning on pico models: learning, provenance, checkpoints, partitions, LoRA, head-only."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from merging_core import TrainConfig, evaluate, models, partition, tasks, train
from merging_core.errors import MergeLabError

from .helpers import assert_close


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
    assert_close(a, b, atol=0, rtol=0)  # bit-identical weights (and the same names)
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


def test_iid_shards_of_a_token_task(pico, tmp_path):
    # Token tasks have one label per token: shards are still cut over examples.
    config = TrainConfig(task="conll2003", base=str(pico(None)), steps=1, batch_size=4, partition="iid:1/2",
                         eval_limit=4)
    assert train(config, tmp_path / "ner").metadata["train_examples"] == 7021  # 14041 sentences, shard 1 of 2


def test_existing_output_is_refused_before_training(pico, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("keep me")
    with pytest.raises(MergeLabError, match="already exists"):
        train(TrainConfig(task="sst2", base=str(pico(None)), steps=1), tmp_path / "taken")
    assert (tmp_path / "taken" / "file").read_text() == "keep me"


# Multi-task training: one shared encoder, one head per task, saved as a multi-head checkpoint.

MULTI = ("stsb", "conll2003", "mrpc")  # regression, token and pair classification heads on one encoder


@pytest.fixture(scope="module")
def multitask_run(pico, tmp_path_factory):
    config = TrainConfig(task=",".join(MULTI), base=str(pico(None)), seed=2, steps=6, batch_size=4, lr=1e-3,
                         eval_limit=8, sampling="round-robin")
    out = tmp_path_factory.mktemp("multitask") / "mt"
    return out, train(config, out)


def test_multitask_training_writes_a_multihead_checkpoint(multitask_run, pico):
    out, result = multitask_run
    meta = json.loads((out / "mergelab.json").read_text())
    assert meta == result.metadata
    assert (meta["kind"], meta["tasks"], meta["task"], meta["seed"], meta["steps"]) == (
        "multitask", list(MULTI), ",".join(MULTI), 2, 6)
    assert meta["sampling"] == "round-robin" and meta["task_steps"] == {t: 2 for t in MULTI}
    assert meta["heads"] == {t: f"heads/{t}.safetensors" for t in MULTI}
    assert models.head_tasks(models.resolve(str(out))) == list(MULTI)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertModel"]

    base = load_file(pico(None) / "model.safetensors")
    encoder = load_file(out / "model.safetensors")
    assert not torch.equal(encoder["encoder.layer.0.attention.self.query.weight"],
                           base["encoder.layer.0.attention.self.query.weight"])  # the encoder trained
    for task in MULTI:
        model = models.load(str(out), tasks.get_task(task), device="cpu").model
        state = model.state_dict()
        # The same encoder under every head (the token model has no pooler; the sequence models share it).
        for name, tensor in encoder.items():
            assert name.startswith("pooler.") and task == "conll2003" or torch.equal(state[f"bert.{name}"], tensor), name
        head = load_file(out / "heads" / f"{task}.safetensors")
        assert set(head) == {"classifier.weight", "classifier.bias"}
        for k, v in head.items():
            assert_close(state[k], v, atol=0, rtol=0, msg=k)
        scored = evaluate(str(out), task, limit=8)
        recorded = meta["scores"]["dev"][task]
        assert scored["n"] == recorded["n"] == 8
        assert scored["loss"] == pytest.approx(recorded["loss"], rel=1e-5)  # the checkpoint is the trained model
    with pytest.raises(MergeLabError, match=r"has heads for \['conll2003', 'mrpc', 'stsb'\], not for task sst2"):
        evaluate(str(out), "sst2", limit=8)


def test_multitask_zoo_entry(multitask_run, isolated_home):
    from merging_core import zoo

    from .conftest import copy_model

    out, result = multitask_run
    copy_model(out, isolated_home / "zoo" / "mt-pico")
    (row,) = zoo.entries()
    dev = result.metadata["scores"]["dev"]
    assert (row["name"], row["task"], row["tasks"], row["kind"], row["metric"]) == (
        "mt-pico", ",".join(MULTI), list(MULTI), "multitask", "mean")
    expected = (dev["stsb"]["pearson"] + dev["conll2003"]["f1"] + dev["mrpc"]["f1"]) / 3
    assert row["score"] == pytest.approx(expected)


def test_task_sampling_is_seeded():
    from merging_core.training import _task_schedule

    draw = lambda sampling, seed: _task_schedule([3000, 1000], sampling, 4000, torch.Generator().manual_seed(seed))
    assert draw("proportional", 0) == draw("proportional", 0) != draw("proportional", 1)
    assert sum(draw("proportional", 0)) / 4000 == pytest.approx(0.25, abs=0.03)  # task 1 holds 1/4 of the data
    assert sum(draw("sqrt", 0)) / 4000 == pytest.approx(1 / (1 + 3 ** 0.5), abs=0.03)
    assert draw("round-robin", 0)[:4] == [0, 1, 0, 1]


@pytest.mark.parametrize(("task", "extra", "message"), [
    ("sst2,wikitext2", {}, "not wikitext2 \\(MLM\\)"),
    ("sst2,SST-2", {}, "names sst2 more than once"),
    ("sst2,cola", {"peft": "lora"}, "multi-task training is full fine-tuning"),
    ("sst2,nope", {}, "unknown task 'nope'"),
    ("sst2,cola", {"sampling": "random"}, "sampling 'random' is not known"),
])
def test_bad_multitask_configs(pico, tmp_path, task, extra, message):
    with pytest.raises(MergeLabError, match=message):
        train(TrainConfig(task=task, base=str(pico(None)), steps=1, **extra), tmp_path / "x")
    assert not (tmp_path / "x").exists()
