"""T5 as a language model: span corruption, statistics, training and data-aware merges.

On tiny random T5s (v1.1's gated feed-forward, tied LM head, as `scratch-t5`) reading MiniLM's vocabulary
plus T5's sentinel tokens (the `scratch-t5` tokenizer), so the real WikiText-2 and GLUE files tokenize as
they do for the scratch T5 zoo:

- span corruption drops round(15%) of a block's tokens in round(noise / 3) spans, keeps the framing
  tokens, and its input and target together restore the block exactly; a split's corruption is fixed by
  its seed and does not depend on how many examples follow;
- the span-corruption loss MergeLab scores (batched, padded) equals transformers' own seq2seq loss
  computed one example at a time;
- Grams are XᵀX / N over each stack's real positions: encoder layers and the cross-attention keys and
  values over encoder tokens, decoder layers and the LM head over target tokens, padding left out, on
  text and on prompts;
- a T5 trains by span corruption (pretraining lowers its loss) and by rank classification (full, LoRA
  as a seq2seq module, multi-task as one checkpoint); tasks it cannot learn are one line; its LoRA modules
  ensemble on a new task's prompts;
- RegMean of a T5 with itself returns it, Fisher and MaTS merges are finite, a curve's endpoints
  reproduce each model's own score, and a Bezier bend trains on the models' own loss, on text and on
  prompts; components select the hand-written list of T5's attention tensors (`test_families`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import merging_core as ml
from merging_core import scratch, spans, stats
from merging_core.encode import encode
from merging_core.errors import MergeLabError
from merging_core.evaluation import MASK_SEED
from merging_core.merge import merge
from merging_core.stats import statistics
from merging_core.training import TrainConfig, train

from .helpers import assert_close

LIMIT = 6


@pytest.fixture(scope="module")
def t5_tokenizer(tokenizer):
    return scratch.tokenizer("scratch-t5:tiny", tokenizer)


def build_t5(tokenizer, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                                   relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                                   pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.sep_token_id)
    return transformers.T5ForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def t5s(tmp_path_factory, t5_tokenizer):
    """Factory of saved tiny T5s, cached per seed."""
    root = tmp_path_factory.mktemp("t5")
    made: dict[int, str] = {}

    def get(seed: int = 0) -> str:
        if seed not in made:
            out = root / f"t5-{seed}"
            build_t5(t5_tokenizer, seed).save_pretrained(out)
            t5_tokenizer.save_pretrained(out)
            made[seed] = str(out)
        return made[seed]

    return get


def _rows(encoded, i: int) -> list[int]:
    return encoded.ids[encoded.offsets[i]: encoded.offsets[i + 1]].tolist()


# ----------------------------------------------------------------------------------------------------
# span corruption


def test_span_corruption_drops_fifteen_percent_in_spans_and_its_target_restores_them(t5_tokenizer):
    tok = t5_tokenizer
    sentinels = spans.sentinel_ids(tok)
    assert len(sentinels) == spans.SENTINELS and tok.convert_ids_to_tokens(sentinels[:2]) == ["<extra_id_0>",
                                                                                                "<extra_id_1>"]
    blocks = encode(ml.get_task("wikitext2"), "dev", tok).head(20)
    corrupted = spans.corrupt_split(blocks, tok, torch.Generator().manual_seed(0))
    assert len(corrupted) == 20
    for i in range(20):
        block, source, target = _rows(blocks, i), _rows(corrupted.inputs, i), _rows(corrupted.targets, i)
        body = len(block) - 2
        noise, count = round(0.15 * body), max(1, round(round(0.15 * body) / 3))
        assert source[0] == tok.cls_token_id and source[-1] == tok.sep_token_id  # framing kept in place
        assert target[-2:] == [sentinels[count], tok.sep_token_id]  # the closing sentinel, then EOS
        assert [t for t in source if t in sentinels] == sentinels[:count]
        assert [t for t in target if t in sentinels] == sentinels[: count + 1]
        assert len(target) - 2 - count == noise and len(source) == len(block) - noise + count
        # each sentinel of the input stands for the span that follows it in the target
        dropped, at = {}, None
        for t in target[:-2]:
            if t in sentinels:
                at = t
                dropped[at] = []
            else:
                dropped[at].append(t)
        assert all(dropped.values())  # every span holds at least one token
        restored = [t for s in source for t in (dropped[s] if s in sentinels else [s])]
        assert restored == block
    # fixed by the seed, example by example: a shorter split is a prefix of the longer one's corruption
    again = spans.corrupt_split(blocks.head(5), tok, torch.Generator().manual_seed(0))
    assert [_rows(again.targets, i) for i in range(5)] == [_rows(corrupted.targets, i) for i in range(5)]
    other = spans.corrupt_split(blocks.head(5), tok, torch.Generator().manual_seed(1))
    assert [_rows(other.targets, i) for i in range(5)] != [_rows(corrupted.targets, i) for i in range(5)]


def test_t5_s_own_framing_text_with_no_start_token_gets_eos_on_both_sides(tokenizer):
    """A T5 tokenizer frames nothing at the start and closes text with </s>: blocks of WikiText-2 carry no
    framing (`encode`), and span corruption closes the input and the target with EOS, as T5's own data."""
    plain = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, unk_token="[UNK]",
                                                 pad_token="[PAD]", eos_token="[SEP]")
    # four sentinels: a 128-token block's 6 spans are capped at 3 (the fourth closes the target)
    plain.add_special_tokens({"additional_special_tokens": spans.sentinel_names(4)})
    sentinels = spans.sentinel_ids(plain)
    assert len(sentinels) == 4
    blocks = encode(ml.get_task("wikitext2"), "dev", plain).head(6)
    corrupted = spans.corrupt_split(blocks, plain, torch.Generator().manual_seed(0))
    for i in range(6):
        block, source, target = _rows(blocks, i), _rows(corrupted.inputs, i), _rows(corrupted.targets, i)
        assert block[0] not in (plain.eos_token_id, plain.cls_token_id) and block[-1] != plain.eos_token_id
        assert source[-1] == plain.eos_token_id and target[-1] == plain.eos_token_id
        count = len([t for t in source if t in sentinels])
        assert count == min(3, max(1, round(round(0.15 * len(block)) / 3)))
        dropped, at = {}, None
        for t in target[:-2]:
            at = t if t in sentinels else at
            dropped.setdefault(at, []).extend([] if t in sentinels else [t])
        assert [t for s in source[:-1] for t in (dropped[s] if s in sentinels else [s])] == block


def test_a_block_too_short_to_split_and_a_tokenizer_without_sentinels(t5_tokenizer, tokenizer):
    framing = spans._framing(t5_tokenizer)
    sentinels = spans.sentinel_ids(t5_tokenizer)
    cls, sep = t5_tokenizer.cls_token_id, t5_tokenizer.sep_token_id
    source, target = spans.corrupt([cls, 2000, sep], sentinels, framing, torch.Generator().manual_seed(0))
    assert source == [cls, sentinels[0], sep] and target == [sentinels[0], 2000, sentinels[1], sep]
    with pytest.raises(MergeLabError, match="no <extra_id_0>, <extra_id_1>, ... sentinel tokens"):
        spans.sentinel_ids(tokenizer)  # MiniLM's own: no sentinels


def test_the_span_loss_is_transformers_seq2seq_loss_one_example_at_a_time(t5s, t5_tokenizer):
    folder = t5s(0)
    result = ml.evaluate(folder, "wikitext2", limit=LIMIT)
    blocks = encode(ml.get_task("wikitext2"), "dev", t5_tokenizer).head(LIMIT)
    corrupted = spans.corrupt_split(blocks, t5_tokenizer, torch.Generator().manual_seed(MASK_SEED))
    model = transformers.T5ForConditionalGeneration.from_pretrained(folder).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(LIMIT):
            source, target = _rows(corrupted.inputs, i), _rows(corrupted.targets, i)
            loss = model(input_ids=torch.tensor([source]), labels=torch.tensor([target])).loss
            total += loss.item() * len(target)
            count += len(target)
    assert result["target_tokens"] == count
    assert result["loss"] == pytest.approx(total / count, abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-6)
    assert ml.metrics.metric_label("loss", result) == "span loss"  # how tables and plots name it


# ----------------------------------------------------------------------------------------------------
# statistics

# layers read by the hand-written Grams: (module path, which positions its input lives on)
SIDES = {"encoder.block.1.layer.0.SelfAttention.q": "encoder", "encoder.block.0.layer.1.DenseReluDense.wo": "encoder",
         "decoder.block.0.layer.1.EncDecAttention.k": "encoder", "decoder.block.1.layer.1.EncDecAttention.v": "encoder",
         "decoder.block.0.layer.1.EncDecAttention.q": "decoder", "decoder.block.1.layer.0.SelfAttention.o": "decoder",
         "decoder.block.1.layer.2.DenseReluDense.wi_0": "decoder", "lm_head": "decoder"}


@pytest.mark.parametrize("task", ["wikitext2", "sst2"])
def test_grams_are_over_each_stack_s_real_positions(task, t5s):
    folder = t5s(0)
    found = statistics(folder, task, ("gram",), {"examples": 10})
    loaded = ml.load(folder, device="cpu")
    model = loaded.model
    spec = ml.tasks.scored_as(ml.get_task(task), "seq2seq")
    # the statistic's own draw of examples, each alone: no padding anywhere
    examples = stats._examples(spec, loaded.tokenizer, 10, torch.device("cpu"), noise="spans")
    sums = {name: 0 for name in SIDES}
    rows = dict.fromkeys(SIDES, 0)
    modules = dict(model.named_modules())

    def hook(name):
        def record(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums[name] + x.T @ x
            rows[name] += x.shape[0]
        return record

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in SIDES]
    with torch.no_grad():
        for example in examples:
            stats._forward_only(model, example, spec)
    for h in handles:
        h.remove()
    lengths = {"encoder": sum(int(e["attention_mask"].sum()) for e in examples)}
    lengths["decoder"] = (sum(int((e["labels"] != -100).sum()) for e in examples) if task == "wikitext2"
                          else len(examples))  # one-token verbalizers: one decoder position per example
    for name, side in SIDES.items():
        gram = found[f"{name}.weight"]
        assert int(gram["gram_count"]) == rows[name] == lengths[side], name
        assert_close(gram["gram"].cpu(), sums[name] / rows[name], atol=1e-5, rtol=1e-4, msg=name)


# ----------------------------------------------------------------------------------------------------
# training


def test_a_t5_pretrains_by_span_corruption_and_fine_tunes_by_rank_classification(t5s, tmp_path):
    before = ml.evaluate(t5s(0), "wikitext2", limit=LIMIT)
    pretrained = train(TrainConfig(task="corpus", base=t5s(0), steps=25, batch_size=8, lr=1e-2, eval_limit=LIMIT),
                       tmp_path / "pre")
    assert pretrained.metadata["head"] == "seq2seq"
    after = ml.evaluate(str(tmp_path / "pre"), "wikitext2", limit=LIMIT)
    assert after["loss"] < before["loss"] - 0.5  # from about ln(vocabulary) towards the unigram distribution
    tuned = train(TrainConfig(task="sst2", base=str(tmp_path / "pre"), steps=3, batch_size=8, eval_limit=LIMIT),
                  tmp_path / "sst2")
    # the LM head is kept (no classifier added): the same tensors as the base, one more task learned
    assert tuned.metadata["head"] == "seq2seq" and tuned.metadata["task"] == "sst2"
    config = json.loads((tmp_path / "sst2" / "config.json").read_text())
    assert config["architectures"] == ["T5ForConditionalGeneration"]
    assert set(load_file(tmp_path / "sst2" / "model.safetensors")) == set(load_file(tmp_path / "pre" / "model.safetensors"))
    scored = ml.evaluate(str(tmp_path / "sst2"), "sst2", limit=LIMIT)
    assert scored["accuracy"] == pytest.approx(tuned.metadata["scores"]["dev"]["accuracy"])
    lora = train(TrainConfig(task="sst2", base=str(tmp_path / "pre"), steps=3, batch_size=8, eval_limit=LIMIT,
                             peft="lora"), tmp_path / "lora")
    adapter = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_2_SEQ_LM" and sorted(adapter["target_modules"]) == ["q", "v"]
    assert ml.evaluate(str(tmp_path / "lora"), "sst2", limit=LIMIT)["loss"] == pytest.approx(
        lora.metadata["scores"]["dev"]["loss"], abs=1e-5)
    multi = train(TrainConfig(task="sst2,mrpc", base=str(tmp_path / "pre"), steps=2, batch_size=8, eval_limit=LIMIT),
                  tmp_path / "multi")
    assert multi.metadata["prompted"] and not multi.metadata.get("heads")  # one ordinary checkpoint
    assert ml.evaluate(str(tmp_path / "multi"), "mrpc", limit=LIMIT)["n"] == LIMIT


@pytest.mark.parametrize(("task", "prompt", "why"), [("stsb", True, "a regression task, with no prompt"),
                                                     ("conll2003", True, "a token task"),
                                                     ("sst2", False, "with prompt=False")])
def test_tasks_a_t5_cannot_learn_are_one_line(task, prompt, why, t5s, tmp_path):
    with pytest.raises(MergeLabError, match="is an encoder-decoder \\(t5\\)") as error:
        train(TrainConfig(task=task, base=t5s(0), steps=1, prompt=prompt), tmp_path / "out")
    assert why in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------
# data-aware merges and curves


@pytest.mark.parametrize("task", ["wikitext2", "sst2"])
def test_regmean_of_a_t5_with_itself_returns_it_and_fisher_and_mats_are_finite(task, t5s, tmp_path):
    a = t5s(0)
    merge("regmean", [a, a], stats_tasks=[task], params={"examples": 4}, out=tmp_path / "same")
    original = load_file(Path(a) / "model.safetensors")
    assert_close(load_file(tmp_path / "same" / "model.safetensors"), original, atol=1e-5, rtol=1e-4)
    for method in ("fisher", "regmean", "mats"):
        merge(method, [a, t5s(1)], base=t5s(2) if method == "mats" else None, stats_tasks=[task],
              params={"examples": 4}, out=tmp_path / method)
        merged = load_file(tmp_path / method / "model.safetensors")
        assert set(merged) == set(original)
        assert all(torch.isfinite(t).all() for t in merged.values()), method
        assert ml.evaluate(str(tmp_path / method), task, limit=LIMIT)["loss"] > 0


@pytest.mark.parametrize("task", ["wikitext2", "sst2"])
def test_a_straight_t5_curve_ends_at_each_model_s_own_score(task, t5s):
    a, b = t5s(0), t5s(1)
    points = [p for p in ml.curve(a, b, task, points=3, limit=LIMIT) if p["kind"] == "point"]
    assert [p["t"] for p in points] == [0.0, 0.5, 1.0]
    for point, folder in ((points[0], a), (points[-1], b)):
        assert point["scores"][task]["loss"] == pytest.approx(ml.evaluate(folder, task, limit=LIMIT)["loss"], abs=1e-5)
    assert points[0]["scores"][task]["loss"] != pytest.approx(points[-1]["scores"][task]["loss"], abs=1e-6)


@pytest.mark.parametrize("task", ["wikitext2", "sst2"])
def test_a_bezier_bend_between_t5s_trains_on_their_own_loss(task, t5s):
    """The bend learns as the models do (span corruption on text, rank classification on prompts); the ends
    stay the models."""
    a, b = t5s(0), t5s(1)
    items = list(ml.curve(a, b, task, points=3, path="bezier", bend_steps=3, batch_size=4, limit=LIMIT))
    bend, points = items[0], [i for i in items if i["kind"] == "point"]
    assert bend["kind"] == "bend" and bend["distance_from_midpoint"] > 0
    assert math.isfinite(bend["train_loss_first"]) and math.isfinite(bend["train_loss_last"])
    for point, folder in ((points[0], a), (points[-1], b)):
        assert point["scores"][task]["loss"] == pytest.approx(ml.evaluate(folder, task, limit=LIMIT)["loss"], rel=1e-5)


# ----------------------------------------------------------------------------------------------------
# the scratch T5


def test_the_scratch_t5_is_t5_v1_1_with_minilm_s_vocabulary_and_sentinels(tokenizer):
    torch.manual_seed(0)
    loaded = ml.load("scratch-t5:tiny", ml.get_task("corpus"), new_head=True, device="cpu")
    model, config = loaded.model, loaded.model.config
    assert type(model).__name__ == "T5ForConditionalGeneration"
    assert (config.d_model, config.num_layers, config.num_decoder_layers, config.num_heads, config.d_ff) == \
        (128, 2, 2, 4, 384)
    assert config.is_gated_act and config.dense_act_fn == "gelu_new" and config.dropout_rate == 0.0
    assert config.vocab_size == len(tokenizer) + spans.SENTINELS == len(loaded.tokenizer)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    assert (config.pad_token_id, config.decoder_start_token_id, config.eos_token_id) == (0, 0, 102)
    assert spans.sentinel_ids(loaded.tokenizer) == list(range(len(tokenizer), len(tokenizer) + spans.SENTINELS))
    assert len(tokenizer) == 30522  # MiniLM's own tokenizer is left as it was
    torch.manual_seed(1)
    other = ml.load("scratch-t5:tiny", ml.get_task("corpus"), new_head=True, device="cpu").model
    assert not torch.equal(other.shared.weight, model.shared.weight)  # the seed decides the initialization
    with pytest.raises(MergeLabError, match="unknown scratch size 'scratch-t5:huge'; use one of: scratch-t5:tiny"):
        ml.resolve("scratch-t5:huge")


def test_a_scratch_t5_recipe_runs_the_whole_chain(isolated_home, tmp_path):
    """Pretrain two seeds, fine-tune (full and LoRA), then the engine's merge, evaluation and curve on them."""
    recipe = tmp_path / "t5.yaml"
    recipe.write_text(
        "defaults: {base: 'scratch-t5:tiny', task: corpus, steps: 2, batch_size: 4, eval_limit: 4}\n"
        "models:\n"
        "  e0: {seed: 0}\n"
        "  e1: {seed: 1}\n"
        "  e0-sst2: {base: e0, task: sst2, seed: 0}\n"
        "  e0-mrpc: {base: e0, task: mrpc, seed: 0}\n"
        "  e1-sst2: {base: e1, task: sst2, seed: 0}\n"
        "  e0-lora-sst2: {base: e0, task: sst2, peft: lora}\n"
        "  e0-lora-mrpc: {base: e0, task: mrpc, peft: lora}\n")
    rows = ml.zoo.build(recipe)
    assert [r["status"] for r in rows] == ["built"] * 7
    kinds = {(p["a"], p["b"]): p["kind"] for p in ml.zoo.pairs()}
    assert kinds[("e0", "e1")] == "different initializations"
    assert kinds[("e0-sst2", "e1-sst2")] == "different initializations"
    assert ml.evaluate("e0", "wikitext2", limit=4)["perplexity"] > 1  # span corruption on held-out text
    # two models pretrained from different seeds record the same scratch spec, which is no common base: its
    # weights are drawn anew on every load
    run = ml.curve("e0", "e1", "wikitext2", points=2, limit=4)
    assert run.distances["task_cosine"] is None
    with pytest.raises(MergeLabError, match="the inputs record none; give the model they were fine-tuned from"):
        ml.merge("task_arithmetic", ["e0", "e1"])
    merged = tmp_path / "merged"
    ml.merge("regmean", ["e0-sst2", "e0-mrpc"], stats_tasks=["sst2", "mrpc"], params={"examples": 4}, out=merged)
    for task in ("sst2", "mrpc"):
        assert 0 <= ml.evaluate(str(merged), task, limit=4)["accuracy"] <= 1
    points = [p for p in ml.curve("e0-sst2", "e1-sst2", "sst2", points=3, limit=4) if p["kind"] == "point"]
    assert points[0]["scores"]["sst2"]["loss"] == pytest.approx(ml.evaluate("e0-sst2", "sst2", limit=4)["loss"],
                                                                abs=1e-5)
    assert ml.evaluate("e0-lora-sst2", "sst2", limit=4)["n"] == 4
    # similarity-weighted ensembling of the seq2seq LoRA modules, on a new task's prompts
    result = ml.ensemble("cola", ["e0-lora-sst2", "e0-lora-mrpc"], similarity="loss", shots=8, steps=1, limit=4)
    assert sum(result.weights[0].values()) == pytest.approx(1.0)
    assert {row["init"] for row in result.rows} == {"fresh", "uniform", "weighted"}
    assert all(row["metric"] == "mcc" and math.isfinite(row["loss"]) for row in result.rows)
