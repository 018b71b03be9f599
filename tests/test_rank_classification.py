"""Rank classification: a causal LM scores and learns classification tasks from prompts, with no head.

On tiny random Llama and GPT-2 causal LMs reading the packaged MiniLM vocabulary (so the real SST-2, MRPC
and emotion files tokenize as they do for the scratch decoders):

- prompts are the template filled with the example's columns, the closing words kept whole when the text
  is cut, and fit `max_length` with the longest verbalizer;
- a label's score is the log-likelihood of its verbalizer after the prompt, equal to a hand-written
  forward over the whole model (one-token verbalizers from one pass, longer ones as a mean over their
  tokens); accuracy and loss are those of the scores;
- training a causal LM on a classification task keeps its LM head (no classifier is added), LoRA modules
  are causal-LM modules, a multi-task model is one ordinary causal LM, and statistics, merges and output
  ensembles of such models run on the same prompts;
- tasks a causal LM cannot read (regression, token tasks) are one-line errors naming model and task.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

import merging_core as ml
from merging_core import prompts, tasks
from merging_core.arch import canonical
from merging_core.compare import Ensemble, _reference_tasks, combine
from merging_core.encode import encode
from merging_core.errors import MergeLabError
from merging_core.losses import rank_scores, task_loss
from merging_core.merge import merge
from merging_core.stats import statistics
from merging_core.training import TrainConfig, train

from .helpers import assert_close

LIMIT = 24  # dev examples scored per check


def build_lm(family: str, tokenizer, seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM over MiniLM's vocabulary, its [CLS]/[SEP]/[PAD] as BOS/EOS/pad."""
    torch.manual_seed(seed)
    special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.cls_token_id,
               "eos_token_id": tokenizer.sep_token_id}
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=2, n_head=2, n_positions=160,
                                         **special)
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=160, **special)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def lms(tmp_path_factory, tokenizer):
    """Factory of saved tiny causal LMs, cached per (family, seed)."""
    root = tmp_path_factory.mktemp("rank-lms")
    made: dict[tuple[str, int], str] = {}

    def get(family: str = "llama", seed: int = 0) -> str:
        if (family, seed) not in made:
            out = root / f"{family}-{seed}"
            build_lm(family, tokenizer, seed).save_pretrained(out)
            tokenizer.save_pretrained(out)
            made[family, seed] = str(out)
        return made[family, seed]

    return get


def prompted(task: str) -> tasks.TaskSpec:
    return tasks.scored_as(ml.get_task(task), "causal")


def by_hand(model: torch.nn.Module, prompt: list[int], verbalizer: list[int]) -> float:
    """Mean log-likelihood of `verbalizer` after `prompt`, from the whole model's own logits, unpadded."""
    ids = torch.tensor([prompt + verbalizer])
    with torch.no_grad():
        log_probs = F.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return sum(log_probs[len(prompt) - 1 + i, token].item() for i, token in enumerate(verbalizer)) / len(verbalizer)


# ----------------------------------------------------------------------------------------------------
# the registry and the prompts


def test_causal_lms_score_every_task_with_a_prompt_and_nothing_else():
    assert tasks.tasks_for_head("causal") == ["cola", "sst2", "mrpc", "rte", "qnli", "wnli", "qqp", "mnli",
                                              "emotion", "wikitext2"]
    for name in ("sst2", "emotion", "mnli"):
        spec = ml.get_task(name)
        assert spec.heads == ("sequence", "causal", "seq2seq")
        assert len(spec.prompt.verbalizers) == len(spec.labels)
        assert prompted(name).kind == "rank" and prompted(name).name == name
        assert tasks.scored_as(spec, "sequence") is spec
    assert ml.get_task("stsb").heads == ("sequence",) and ml.get_task("conll2003").heads == ("token",)
    assert tasks.scored_as(ml.get_task("stsb"), "causal").kind == "regression"


def test_a_prompt_is_the_filled_template_after_the_start_token(tokenizer):
    spec = prompted("mrpc")
    [ids] = prompts.tokenize(spec, [("The cat sat.", "A cat was sitting.")], tokenizer, 128)
    expected = tokenizer("Sentence 1: The cat sat. Sentence 2: A cat was sitting. Do they mean the same?",
                         add_special_tokens=False)["input_ids"]
    assert ids == [tokenizer.cls_token_id] + expected
    assert prompts.verbalizer_ids(spec, tokenizer) == [tokenizer(" no", add_special_tokens=False)["input_ids"],
                                                       tokenizer(" yes", add_special_tokens=False)["input_ids"]]


def test_long_texts_are_cut_longest_first_and_the_question_is_kept(tokenizer):
    spec = prompted("mrpc")
    long, short = " ".join(["word"] * 300), "short text"
    [ids] = prompts.tokenize(spec, [(long, short)], tokenizer, 48)
    tail = tokenizer(" Do they mean the same?", add_special_tokens=False)["input_ids"]
    assert len(ids) + 1 <= 48  # room for the one-token verbalizer
    assert ids[-len(tail):] == tail
    assert tokenizer.decode(ids).count("short text") == 1  # the short column is whole, the long one cut
    with pytest.raises(MergeLabError, match="max_length 8 leaves no room"):
        prompts.tokenize(spec, [(long, short)], tokenizer, 8)


def test_prompted_splits_are_cached_apart_from_the_plain_ones(tokenizer):
    plain, ranked = encode(ml.get_task("sst2"), "dev", tokenizer), encode(prompted("sst2"), "dev", tokenizer)
    assert len(plain) == len(ranked) and torch.equal(plain.labels, ranked.labels)
    assert plain.choices is None and ranked.choices.tolist() == [[4997], [3893]]  # " negative", " positive"
    assert int(ranked.lengths[0]) > int(plain.lengths[0])  # the template's words
    batch = ranked.batch(torch.arange(3), 0)
    assert torch.equal(batch["choices"], ranked.choices) and "choices" not in ml.encode.model_inputs(batch)


# ----------------------------------------------------------------------------------------------------
# scores


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_label_scores_are_the_verbalizer_log_likelihoods(family, tokenizer):
    model = build_lm(family, tokenizer)
    data = encode(prompted("emotion"), "dev", tokenizer).head(6)
    batch = data.batch(torch.arange(6), tokenizer.pad_token_id)  # right-padded prompts of several lengths
    with torch.no_grad():
        scores = rank_scores(model, batch)
    words = prompts.verbalizer_ids(prompted("emotion"), tokenizer)
    expected = [[by_hand(model, data.ids[data.offsets[i]: data.offsets[i + 1]].tolist(), w) for w in words]
                for i in range(6)]
    assert_close(scores, torch.tensor(expected), atol=1e-5)


def test_longer_verbalizers_score_by_their_mean_token_log_likelihood(tokenizer):
    spec = replace(prompted("sst2"), prompt=tasks.Prompt("Review: {0} Sentiment:", ("quite negative", "positive")))
    model = build_lm("llama", tokenizer)
    data = encode(spec, "dev", tokenizer).head(5)
    assert data.choices.tolist()[1][1] == -1  # one-token " positive" padded to the two-token verbalizer
    with torch.no_grad():
        scores = rank_scores(model, data.batch(torch.arange(5), tokenizer.pad_token_id))
    words = prompts.verbalizer_ids(spec, tokenizer)
    expected = [[by_hand(model, data.ids[data.offsets[i]: data.offsets[i + 1]].tolist(), w) for w in words]
                for i in range(5)]
    assert_close(scores, torch.tensor(expected), atol=1e-5)


def test_a_causal_lm_is_scored_on_a_classification_task_by_its_label_scores(lms, tokenizer):
    folder = lms("llama")
    result = ml.evaluate(folder, "sst2", limit=LIMIT)
    model = ml.load(folder, ml.get_task("sst2"), device="cpu").model
    data = encode(prompted("sst2"), "dev", tokenizer).head(LIMIT)
    with torch.no_grad():
        scores = rank_scores(model, data.batch(torch.arange(LIMIT), tokenizer.pad_token_id))
    assert result["accuracy"] == pytest.approx((scores.argmax(-1) == data.labels).float().mean().item())
    assert result["loss"] == pytest.approx(F.cross_entropy(scores, data.labels).item(), rel=1e-5)
    # one evaluator serves a classifier and a causal LM alike (the prompts are built on first use)
    evaluator = ml.Evaluator("sst2", tokenizer, limit=LIMIT, device="cpu")
    assert evaluator(model)["accuracy"] == result["accuracy"]
    assert evaluator.last_logits.shape == (LIMIT, 2)


def test_tasks_a_causal_lm_cannot_read_are_one_line(lms):
    for task, needs in (("stsb", "sequence"), ("conll2003", "token")):
        with pytest.raises(MergeLabError) as error:
            ml.evaluate(lms("gpt2"), task, limit=4)
        message = str(error.value)
        assert "\n" not in message and lms("gpt2") in message and f"task {task} needs a {needs} head" in message
        assert "can be scored on cola, sst2" in message


# ----------------------------------------------------------------------------------------------------
# training, statistics, merges, ensembles


@pytest.fixture(scope="module")
def tuned(lms, tmp_path_factory):
    """A tiny Llama fine-tuned on SST-2 and on emotion by rank classification, and a LoRA module on SST-2."""
    root = tmp_path_factory.mktemp("rank-tuned")
    out = {}
    for name, task, peft in (("sst2", "sst2", None), ("emotion", "emotion", None), ("lora", "sst2", "lora"),
                             ("lora-emotion", "emotion", "lora"), ("lora-mrpc", "mrpc", "lora")):
        config = TrainConfig(base=lms("llama"), task=task, steps=6, batch_size=8, eval_limit=LIMIT, peft=peft, lr=1e-2)
        out[name] = str(train(config, root / name).out)
    return out


def test_training_on_prompts_keeps_the_lm_head(tuned, lms):
    meta = json.loads((Path(tuned["sst2"]) / "mergelab.json").read_text())
    config = json.loads((Path(tuned["sst2"]) / "config.json").read_text())
    assert meta["head"] == "causal" and config["architectures"] == ["LlamaForCausalLM"]
    assert len(meta["loss_curve"]) == 6 and meta["loss_curve"][-1][0] == 6
    before = ml.load(lms("llama"), device="cpu").model.state_dict()
    after = ml.load(tuned["sst2"], device="cpu").model.state_dict()
    assert (after["model.layers.0.mlp.up_proj.weight"] - before["model.layers.0.mlp.up_proj.weight"]).abs().max() > 1e-3
    adapter = json.loads((Path(tuned["lora"]) / "adapter_config.json").read_text())
    assert adapter["task_type"] == "CAUSAL_LM" and not adapter.get("modules_to_save")
    assert ml.evaluate(tuned["lora"], "sst2", limit=LIMIT)["n"] == LIMIT


def test_the_rank_loss_fits_a_causal_lm_to_its_labels(tokenizer):
    """The loss is the cross-entropy of the label scores: minimising it on a few prompts makes the model
    rank every gold verbalizer first."""
    model = build_lm("llama", tokenizer).train()
    spec = prompted("emotion")
    batch = encode(spec, "train", tokenizer).head(8).batch(torch.arange(8), tokenizer.pad_token_id)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = task_loss(model, batch, spec).item()
    for _ in range(40):
        optimizer.zero_grad()
        loss = task_loss(model, batch, spec)
        loss.backward()
        optimizer.step()
    assert first == pytest.approx(F.cross_entropy(torch.zeros(1, 6), torch.zeros(1, dtype=torch.long)).item(), abs=0.05)
    assert loss.item() < 0.05
    with torch.no_grad():
        assert torch.equal(rank_scores(model.eval(), batch).argmax(-1), batch["labels"])


def test_statistics_of_a_causal_lm_on_a_classification_task_read_its_prompts(tuned):
    fisher = statistics(tuned["sst2"], "sst2", ("fisher",), {"examples": 8})
    grams = statistics(tuned["sst2"], "sst2", ("gram",), {"examples": 8})
    assert all(torch.isfinite(v["fisher"]).all() for v in fisher.values())
    assert fisher["layers.0.mlp.down_proj.weight"]["fisher"].abs().sum() > 0
    # every real prompt token passes every layer: the Gram counts the prompts' tokens
    data = encode(prompted("sst2"), "train", ml.load(tuned["sst2"]).tokenizer)
    index = torch.randperm(len(data), generator=torch.Generator().manual_seed(ml.stats.SEED))[:8]
    assert grams["layers.0.self_attn.q_proj.weight"]["gram_count"].item() == float(data.lengths[index].sum())


def test_merges_of_rank_classifiers_score_both_tasks(tuned):
    for method in ("average", "regmean", "fisher"):
        result = merge(method, [tuned["sst2"], tuned["emotion"]], params={"examples": 8} if method != "average" else {})
        assert all(torch.isfinite(t).all() for t in result.state.values())
    # RegMean of a model with itself (identical statistics) is that model, every tensor
    same = merge("regmean", [tuned["sst2"], tuned["sst2"]], params={"examples": 8})
    alone = {canonical(k, "llama"): v for k, v in ml.load(tuned["sst2"], device="cpu").model.state_dict().items()}
    assert len(same.state) >= 2 * 7 + 3 and set(same.state) <= set(alone)
    for name, tensor in same.state.items():
        assert_close(tensor, alone[name], atol=1e-5)


def test_an_output_ensemble_of_causal_lms_combines_their_label_scores(tuned, tokenizer):
    members = [ml.load(tuned[name], device="cpu").model for name in ("sst2", "emotion")]
    batch = encode(prompted("sst2"), "dev", tokenizer).head(8).batch(torch.arange(8), tokenizer.pad_token_id)
    with torch.no_grad():
        expected = combine([rank_scores(m, batch) for m in members], "probabilities")
        assert_close(rank_scores(Ensemble(members, "probabilities"), batch), expected, atol=1e-6)
    evaluator = ml.Evaluator("sst2", tokenizer, limit=8, device="cpu")
    result = evaluator(Ensemble(members, "probabilities"))
    assert result["accuracy"] == pytest.approx((expected.argmax(-1) == batch["labels"]).float().mean().item())


def test_a_multitask_causal_lm_is_one_ordinary_checkpoint(lms, tmp_path):
    result = train(TrainConfig(base=lms("gpt2"), task="sst2,emotion", steps=4, batch_size=4, eval_limit=8),
                   tmp_path / "mt")
    meta = result.metadata
    assert meta["prompted"] and meta["kind"] == "multitask" and "heads" not in meta
    assert not (tmp_path / "mt" / "heads").exists()
    for task in ("sst2", "emotion"):
        assert ml.evaluate(str(tmp_path / "mt"), task, limit=8)["accuracy"] == meta["scores"]["dev"][task]["accuracy"]
    # beside merges, it is the multi-task reference of the tasks it was trained on
    assert _reference_tasks(str(tmp_path / "mt"), ["mrpc", "sst2", "emotion"]) == ["sst2", "emotion"]


@pytest.mark.parametrize("task", ["sst2", "wikitext2"])
def test_a_bezier_bend_between_causal_lms_trains_on_their_own_loss(tuned, task):
    """The bend learns as the models did (prompts for a classification task, next-token loss on text), and
    the ends stay the models."""
    items = list(ml.curve(tuned["sst2"], tuned["emotion"], task, points=3, path="bezier", bend_steps=3,
                          batch_size=4, limit=8))
    bend, points = items[0], [i for i in items if i["kind"] == "point"]
    assert bend["kind"] == "bend" and bend["distance_from_midpoint"] > 0
    assert math.isfinite(bend["train_loss_first"]) and math.isfinite(bend["train_loss_last"])
    for point, model in ((points[0], "sst2"), (points[-1], "emotion")):
        assert point["scores"][task]["loss"] == pytest.approx(ml.evaluate(tuned[model], task, limit=8)["loss"],
                                                              rel=1e-5)
    assert all(math.isfinite(p["scores"][task]["loss"]) for p in points)


def test_lora_modules_of_a_causal_lm_transfer_to_a_new_task_s_prompts(tuned):
    """Similarity-weighted ensembling (Lv et al. 2023) of rank-classification LoRA modules: the target is
    learnt from its own prompts, and every start (fresh, uniform, weighted) is scored on them."""
    sources = [tuned["lora"], tuned["lora-emotion"], tuned["lora-mrpc"]]
    result = ml.ensemble("cola", sources, similarity="loss", shots=8, steps=2, limit=8)
    weights = result.weights[0]
    assert set(weights) == set(sources) and sum(weights.values()) == pytest.approx(1.0)
    assert all(math.isfinite(s) for s in result.scores[0].scores["loss"].values())
    rows = {row["init"]: row for row in result.rows}
    assert set(rows) == {"fresh", "uniform", "weighted"}
    for row in rows.values():  # scored on CoLA's prompts: the metrics of a classifier on its 2 labels
        assert row["metric"] == "mcc" and -1.0 <= row["score"] <= 1.0 and math.isfinite(row["loss"])


# ----------------------------------------------------------------------------------------------------
# an encoder-decoder: T5


@pytest.fixture(scope="module")
def t5(tmp_path_factory, tokenizer) -> str:
    """A tiny random T5 (gated feed-forward, as v1.1 / Flan-T5) over MiniLM's vocabulary, saved with a copy of
    that tokenizer that has no [CLS]/[SEP] (so its prompts end with EOS, as T5's inputs do)."""
    out = tmp_path_factory.mktemp("rank-t5") / "t5"
    config = transformers.T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                   num_heads=2, feed_forward_proj="gated-gelu", decoder_start_token_id=0,
                                   pad_token_id=0, eos_token_id=tokenizer.sep_token_id)
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(config).save_pretrained(out)
    plain = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, unk_token="[UNK]",
                                                 pad_token="[PAD]", eos_token="[SEP]")
    plain.save_pretrained(out)
    return str(out)


def test_a_t5_scores_each_label_as_the_decoder_s_target_after_the_prompt(t5):
    model = ml.load(t5, ml.get_task("emotion"), device="cpu").model
    spec, tok = prompted("emotion"), ml.load(t5, device="cpu").tokenizer
    data = encode(spec, "dev", tok).head(4)
    assert data.ids[data.offsets[1] - 1] == tok.eos_token_id  # the encoder reads the prompt closed by EOS
    with torch.no_grad():
        scores = rank_scores(model, data.batch(torch.arange(4), tok.pad_token_id))
        words = prompts.verbalizer_ids(spec, tok)
        for i in range(4):
            prompt = data.ids[data.offsets[i]: data.offsets[i + 1]].long()[None]
            for c, word in enumerate(words):
                decoder = torch.tensor([[0] + word[:-1]])
                log_probs = F.log_softmax(model(input_ids=prompt, decoder_input_ids=decoder).logits[0], -1)
                expected = sum(log_probs[j, t].item() for j, t in enumerate(word)) / len(word)
                assert scores[i, c].item() == pytest.approx(expected, abs=1e-5)
    # a two-token verbalizer: its own decoder pass, the mean of its tokens' log-likelihoods
    longer = replace(prompted("sst2"), prompt=tasks.Prompt("Review: {0} Sentiment:", ("quite negative", "positive")))
    data = encode(longer, "dev", tok).head(3)
    with torch.no_grad():
        scores = rank_scores(model, data.batch(torch.arange(3), tok.pad_token_id))
        word = prompts.verbalizer_ids(longer, tok)[0]
        assert len(word) == 2
        for i in range(3):
            prompt = data.ids[data.offsets[i]: data.offsets[i + 1]].long()[None]
            logits = model(input_ids=prompt, decoder_input_ids=torch.tensor([[0, word[0]]])).logits[0]
            log_probs = F.log_softmax(logits, -1)
            assert scores[i, 0].item() == pytest.approx((log_probs[0, word[0]] + log_probs[1, word[1]]).item() / 2,
                                                        abs=1e-5)
    result = ml.evaluate(t5, "emotion", limit=8)
    assert result["n"] == 8 and 0.0 <= result["accuracy"] <= 1.0 and math.isfinite(result["loss"])
    with pytest.raises(MergeLabError, match="seq2seq head but task stsb needs a sequence head"):
        ml.evaluate(t5, "stsb", limit=2)
    # statistics on the same prompts: the encoder's layers see every prompt token, the decoder's one position
    # per example (every emotion verbalizer is one token; tests/test_t5.py checks the values themselves)
    grams = statistics(t5, "emotion", ("gram",), {"examples": 4})
    drawn = ml.stats._examples(spec, tok, 4, torch.device("cpu"))
    assert int(grams["encoder.block.0.layer.0.SelfAttention.q.weight"]["gram_count"]) == sum(
        int(e["attention_mask"].sum()) for e in drawn)
    assert int(grams["decoder.block.0.layer.0.SelfAttention.q.weight"]["gram_count"]) == 4
