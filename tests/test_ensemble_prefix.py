"""Prefix modules (Li & Liang 2021, arXiv:2101.00190) and token-level (CoNLL-2003 NER) targets in
similarity-weighted ensembling, on pico modules: the prefix forward against a hand-written BERT, the
ensembling invariants, the refusal of mixed prefix lengths, and NER as target and source."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import merging_core as ml
from merging_core.ensemble import (
    MEASURES,
    check_combinable,
    combine,
    deltas,
    layer_weights,
    read_module,
    softmax_weights,
)
from merging_core.ensemble.fewshot import adapter_model, draw_shots, live_tensors
from merging_core.ensemble.modules import PREFIX
from merging_core.ensemble.similarity import Context, measure, probe_labels
from merging_core.models import load_adapter, prefix_start

TOKENS = 4


@pytest.fixture(scope="module")
def modules(pico, tmp_path_factory):
    """Pico prefix modules (4 virtual tokens) of SST-2, CoLA and NER, one of 3 tokens, and an NER LoRA module."""
    from merging_core.cli import main

    root = tmp_path_factory.mktemp("prefix-modules")
    base = str(pico(None))
    out = {}
    for seed, (kind, task) in enumerate([("prefix", "sst2"), ("prefix", "cola"), ("prefix", "conll2003"),
                                         ("lora", "conll2003")]):
        config = ml.TrainConfig(task=task, base=base, steps=2, batch_size=8, peft=kind, eval_limit=4, seed=seed,
                                lr=1e-2, prefix_tokens=TOKENS)
        out[(kind, task)] = str(ml.train(config, root / f"{kind}-{task}").out)
    short = root / "prefix-sst2-short"  # through the command line, with the prefix knobs
    assert main(["train", "--base", base, "--task", "sst2", "--peft", "prefix", "--prefix-tokens", "3",
                 "--prefix-projection", "--steps", "2", "--batch-size", "8", "--eval-limit", "4", "--lr", "0.01",
                 "--out", str(short)]) == 0
    out[("short", "sst2")] = str(short)
    return out


def _bert_with_prefix(model, keys: list[torch.Tensor], values: list[torch.Tensor], batch) -> torch.Tensor:
    """BERT sequence-classifier logits written out by hand, each layer's attention also attending to the
    prefix keys / values (P x H) of that layer; input positions 0..L-1."""
    bert, c = model.bert, model.config
    ids, mask = batch["input_ids"], batch["attention_mask"]
    heads, size = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    e = bert.embeddings
    x = e.word_embeddings(ids) + e.position_embeddings(torch.arange(ids.shape[1]))[None] \
        + e.token_type_embeddings(torch.zeros_like(ids))
    x = e.LayerNorm(x)
    full = torch.cat([torch.ones(ids.shape[0], keys[0].shape[0]), mask.float()], 1)  # the prefix is always seen
    split = lambda t: t.view(t.shape[0], -1, heads, size).transpose(1, 2)
    for layer, k_prefix, v_prefix in zip(bert.encoder.layer, keys, values):
        a = layer.attention
        rows = x.shape[0]
        q = split(a.self.query(x))
        k = split(torch.cat([k_prefix.expand(rows, -1, -1), a.self.key(x)], 1))
        v = split(torch.cat([v_prefix.expand(rows, -1, -1), a.self.value(x)], 1))
        scores = q @ k.transpose(-1, -2) / math.sqrt(size) + (1 - full[:, None, None, :]) * -1e9
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(rows, -1, c.hidden_size)
        x = a.output.LayerNorm(a.output.dense(context) + x)
        x = layer.output.LayerNorm(layer.output.dense(F.gelu(layer.intermediate.dense(x))) + x)
    pooled = torch.tanh(bert.pooler.dense(x[:, 0]))
    return model.classifier(pooled)


def _batch(tokenizer, task: str = "sst2", n: int = 4) -> dict[str, torch.Tensor]:
    shots = draw_shots(ml.get_task(task), tokenizer, n, seed=0)
    return {k: v for k, v in shots.batches("train", n)[0].items() if k != "labels"}


def test_prefix_forward_is_attention_over_the_prefix(modules, tokenizer):
    """The module's live model equals BERT written out by hand with each layer's prefix keys and values
    (the layout `Module.pieces` reads: layer l's keys at block 2l, its values at 2l + 1)."""
    ref = ml.resolve(modules[("prefix", "sst2")])
    live = load_adapter(ref).eval()
    module = read_module(ref)
    parts = [piece for _, piece in module.pieces(module.tensors)]
    batch = _batch(tokenizer)
    with torch.no_grad():
        expected = _bert_with_prefix(live.get_base_model(), [p[:, 0] for p in parts], [p[:, 1] for p in parts], batch)
        torch.testing.assert_close(live(**batch).logits, expected, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(live.get_base_model()(**batch).logits, expected, atol=1e-4)  # the prefix acts
    evaluated = ml.evaluate(modules[("prefix", "sst2")], "sst2", limit=4)  # loading and scoring a prefix module
    assert evaluated["n"] == 4 and 0 <= evaluated["accuracy"] <= 1


def test_prefix_files_and_start(modules):
    """The file holds P x 2·L·H; every module starts from one fixed prefix, whatever the seed, and the
    reparametrized (projection) module saves its projected prefix, the same shape."""
    a, b = read_module(modules[("prefix", "sst2")]), read_module(modules[("prefix", "cola")])
    assert a.kind == "prefix" and a.body == [PREFIX] and a.tokens == TOKENS
    assert a.tensors[PREFIX].shape == (TOKENS, 2 * 2 * 32)
    torch.testing.assert_close(a.start(), b.start())  # seeds 0 and 1: the same start
    fresh = adapter_model(a, ml.get_task("sst2"), seed=5)
    torch.testing.assert_close(live_tensors(fresh)[PREFIX].detach(), prefix_start(a.config))
    for layer, delta in deltas(a).items():
        assert layer.endswith(".attention.self.prefix") and delta.shape == (TOKENS, 2, 32)
    short = read_module(modules[("short", "sst2")])
    assert short.config["prefix_projection"] and short.tensors[PREFIX].shape == (3, 128)


def test_one_prefix_module_with_weight_one_gives_its_logits(modules, tokenizer):
    module = read_module(modules[("prefix", "sst2")])
    combined = combine([module], [1.0])
    assert torch.equal(combined[PREFIX], module.tensors[PREFIX])
    head = {k: v for k, v in module.tensors.items() if k not in module.body}
    rebuilt = adapter_model(module, ml.get_task("sst2"), seed=3, init={**combined, **head}).eval()
    batch = _batch(tokenizer)
    with torch.no_grad():
        assert torch.equal(rebuilt(**batch).logits, load_adapter(module.ref).eval()(**batch).logits)


def test_temperature_zero_picks_the_most_similar_prefix(modules, tokenizer):
    sources = [read_module(modules[("prefix", t)]) for t in ("cola", "conll2003")]
    found = measure(sources, draw_shots(ml.get_task("sst2"), tokenizer, 8, seed=0), measures=("weight_cosine",),
                    steps=2)
    scores = found.scores["weight_cosine"]
    best = max(scores, key=scores.get)
    assert softmax_weights(scores, 0.0)[best] == 1.0
    whole = combine(sources, layer_weights(found, "weight_cosine", 0.0, "model", sources))
    assert torch.equal(whole[PREFIX], next(s for s in sources if s.ref.spec == best).tensors[PREFIX])
    # per layer: each layer's keys and values come from the module most similar in that layer
    per_layer = combine(sources, layer_weights(found, "weight_cosine", 0.0, "layer", sources))
    layers = found.layers["weight_cosine"]
    for (layer, piece), *source_pieces in zip(sources[0].pieces(per_layer),
                                              *[s.pieces(s.tensors) for s in sources]):
        winner = max(range(len(sources)), key=lambda j: layers[sources[j].ref.spec][layer])
        assert torch.equal(piece, source_pieces[winner][1])


def test_prefix_lengths_must_match(modules):
    four, three = read_module(modules[("prefix", "cola")]), read_module(modules[("short", "sst2")])
    with pytest.raises(ml.MergeLabError, match="different prefix lengths") as caught:
        check_combinable([four, three])
    assert "\n" not in str(caught.value) and "4 virtual tokens" in str(caught.value) and caught.value.param == "sources"
    with pytest.raises(ml.MergeLabError, match="different prefix lengths"):
        ml.ensemble("emotion", [modules[("prefix", "cola")], modules[("short", "sst2")]], shots=8, steps=1)
    with pytest.raises(ml.MergeLabError, match="different kinds"):
        check_combinable([four, read_module(modules[("lora", "conll2003")])])


def test_ner_target_takes_sentence_modules_and_gets_its_own_head(modules, tokenizer):
    """Sequence-classification sources start an NER target: their module tensors, a fresh token head; the
    token-level loss measure is the mean cross-entropy over labelled tokens; scores are span F1."""
    spec = ml.get_task("conll2003")
    shots = draw_shots(spec, tokenizer, 9, seed=0)
    seen = set().union(*(set(shots.train.word_tags(i)) for i in range(len(shots.train))))
    assert seen == set(range(9))  # a sentence for every tag
    sources = [read_module(modules[("prefix", "sst2")]), read_module(modules[("prefix", "conll2003")])]
    start = combine(sources, [0.25, 0.75])
    model = adapter_model(sources[0], spec, seed=0, init=start)
    live = live_tensors(model)
    assert all(torch.equal(live[k].detach(), start[k]) for k in start)
    assert live["base_model.classifier.weight"].shape == (9, 32)  # the target's own (token) head
    ctx = Context(sources[0], shots, probe_labels(shots), steps=1, lr=1e-3)
    ctx.prepare(MEASURES["loss"].needs)
    with torch.no_grad():
        batches = shots.batches("probe", 32)
        total = sum(ctx.model(**b).loss * (b["labels"] != -100).sum() for b in batches)
        count = sum(int((b["labels"] != -100).sum()) for b in batches)
    assert MEASURES["loss"].compute(ctx) == pytest.approx(-float(total / count), rel=1e-4)
    result = ml.ensemble("conll2003", [modules[("prefix", "sst2")], modules[("prefix", "cola")]],
                         similarity="weight_cosine", shots=8, steps=1, limit=8)
    assert [r["metric"] for r in result.rows] == ["f1"] * 3 and all(0 <= r["score"] <= 1 for r in result.rows)


def test_ner_modules_are_sources_for_sentence_targets(modules, tokenizer):
    shots = draw_shots(ml.get_task("sst2"), tokenizer, 8, seed=0)
    for kind, name in (("lora", "loss"), ("prefix", "euclidean")):
        found = measure([read_module(modules[(kind, "conll2003")])], shots, measures=(name,), steps=1)
        assert all(math.isfinite(v) and v <= 0 for v in found.scores[name].values())


def test_the_ensemble_tab_offers_prefix_modules_and_ner_targets():
    pytest.importorskip("gradio")
    from merging_core.training import PEFT_KINDS
    from views import ensemble_tab

    assert "prefix" in PEFT_KINDS
    assert ("CoNLL-2003 NER", "conll2003") in ensemble_tab.target_choices()


def test_prefix_modules_are_refused_by_merges_in_one_line(modules):
    with pytest.raises(ml.MergeLabError, match=r"is a prefix module, which cannot be folded") as caught:
        ml.merge("average", [modules[("prefix", "sst2")], modules[("prefix", "cola")]])
    assert "\n" not in str(caught.value) and "ensemble" in str(caught.value)
