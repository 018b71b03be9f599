"""Families beyond BERT: every adapter maps every parameter of its transformers classes to a group, and
data-free merges of tiny random checkpoints of each family (saved with `save_pretrained`, as a user's
own would be) write a folder transformers loads, equal to the per-tensor formula. A family without an
adapter still merges, tensor by tensor, and says what it cannot do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as token_models

import merging_core as ml
from merging_core import arch
from merging_core.cli import main
from merging_core.errors import MergeLabError
from merging_core.merge import merge
from merging_core.methods import METHODS

from .helpers import assert_close

VOCAB = 100
LAYERS = 2
_LLAMA = {"vocab_size": VOCAB, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": LAYERS,
          "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64, "pad_token_id": 0}
_T5 = {"vocab_size": VOCAB, "d_model": 16, "d_kv": 8, "d_ff": 32, "num_layers": LAYERS, "num_heads": 2,
       "relative_attention_num_buckets": 8, "decoder_start_token_id": 0, "pad_token_id": 0}
_DISTILBERT = {"vocab_size": VOCAB, "dim": 16, "n_layers": LAYERS, "n_heads": 2, "hidden_dim": 32,
               "max_position_embeddings": 64}
_DEBERTA = {"vocab_size": VOCAB, "hidden_size": 16, "num_hidden_layers": LAYERS, "num_attention_heads": 2,
            "intermediate_size": 32, "max_position_embeddings": 64, "relative_attention": True, "position_buckets": 8,
            "max_relative_positions": 16, "pos_att_type": ["p2c", "c2p"], "norm_rel_ebd": "layer_norm"}
_GPT2 = {"vocab_size": VOCAB, "n_embd": 16, "n_layer": LAYERS, "n_head": 2, "n_positions": 64, "pad_token_id": 0}

# name -> (config class, config, model class, transformers Auto class that reloads it)
FAMILIES = {
    "distilbert": ("DistilBertConfig", _DISTILBERT, "DistilBertForSequenceClassification",
                   "AutoModelForSequenceClassification"),
    "distilbert-mlm": ("DistilBertConfig", _DISTILBERT, "DistilBertForMaskedLM",
                       "AutoModelForMaskedLM"),  # vocab_projector tied to the word embeddings
    "deberta-v2": ("DebertaV2Config", _DEBERTA, "DebertaV2ForSequenceClassification",
                   "AutoModelForSequenceClassification"),
    "t5": ("T5Config", _T5, "T5ForConditionalGeneration", "AutoModelForSeq2SeqLM"),  # v1.0: DenseReluDense.wi/wo
    "t5-gated": ("T5Config", {**_T5, "feed_forward_proj": "gated-gelu"}, "T5ForConditionalGeneration",
                 "AutoModelForSeq2SeqLM"),  # v1.1 / Flan-T5: wi_0 / wi_1 / wo
    "gpt2": ("GPT2Config", _GPT2, "GPT2LMHeadModel", "AutoModelForCausalLM"),  # lm_head tied to wte
    "llama": ("LlamaConfig", _LLAMA, "LlamaForCausalLM", "AutoModelForCausalLM"),  # untied lm_head
    "llama-score": ("LlamaConfig", _LLAMA, "LlamaForSequenceClassification", "AutoModelForSequenceClassification"),
    "mistral": ("MistralConfig", _LLAMA, "MistralForCausalLM", "AutoModelForCausalLM"),
    "qwen2": ("Qwen2Config", _LLAMA, "Qwen2ForCausalLM", "AutoModelForCausalLM"),  # q/k/v biases
    "gemma": ("GemmaConfig", {**_LLAMA, "head_dim": 8}, "GemmaForCausalLM", "AutoModelForCausalLM"),  # tied lm_head
}
# Families without an adapter: GPT-NeoX (every name guessable), BART (final_logits_bias is not)
UNKNOWN = {
    "gpt_neox": ("GPTNeoXConfig", {"vocab_size": VOCAB, "hidden_size": 16, "intermediate_size": 32,
                                   "num_hidden_layers": LAYERS, "num_attention_heads": 2,
                                   "max_position_embeddings": 64},
                 "GPTNeoXForCausalLM", "AutoModelForCausalLM"),
    "bart": ("BartConfig", {"vocab_size": VOCAB, "d_model": 16, "encoder_layers": LAYERS, "decoder_layers": LAYERS,
                            "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 32,
                            "decoder_ffn_dim": 32, "max_position_embeddings": 64},
             "BartForConditionalGeneration", "AutoModelForSeq2SeqLM"),
}
ALL = {**FAMILIES, **UNKNOWN}
DATA_FREE = ("average", "task_arithmetic", "ties", "dare", "slerp")

# every class of each adapter's families, for the name -> group mapping (built, never saved)
CLASSES = {
    "distilbert": ["DistilBertModel", "DistilBertForSequenceClassification", "DistilBertForTokenClassification",
                   "DistilBertForMaskedLM"],
    "deberta-v2": ["DebertaV2Model", "DebertaV2ForSequenceClassification", "DebertaV2ForTokenClassification",
                   "DebertaV2ForMaskedLM"],
    "t5": ["T5Model", "T5EncoderModel", "T5ForConditionalGeneration", "T5ForSequenceClassification",
           "T5ForTokenClassification"],
    "t5-gated": ["T5ForConditionalGeneration"],
    "gpt2": ["GPT2Model", "GPT2LMHeadModel", "GPT2ForSequenceClassification", "GPT2ForTokenClassification"],
    "llama": ["LlamaModel", "LlamaForCausalLM", "LlamaForSequenceClassification", "LlamaForTokenClassification"],
    "mistral": ["MistralForCausalLM"],
    "qwen2": ["Qwen2ForCausalLM", "Qwen2ForSequenceClassification"],
    "gemma": ["GemmaForCausalLM"],
}
# the roles every layer (block) of a family has, per stack
LAYER_ROLES = {
    "distilbert": {None: {"query", "key", "value", "attn_out", "ln_attn", "ff_in", "ff_out", "ln_ff"}},
    "deberta-v2": {None: {"query", "key", "value", "pos_query", "pos_key", "attn_out", "ln_attn", "ff_in", "ff_out",
                          "ln_ff"}},
    "t5": {"encoder": {"query", "key", "value", "attn_out", "ln_attn", "ff_in", "ff_out", "ln_ff"},
           "decoder": {"query", "key", "value", "attn_out", "ln_attn", "cross_query", "cross_key", "cross_value",
                       "cross_out", "ln_cross", "ff_in", "ff_out", "ln_ff"}},
    "t5-gated": {"encoder": {"query", "key", "value", "attn_out", "ln_attn", "ff_gate", "ff_in", "ff_out", "ln_ff"},
                 "decoder": {"query", "key", "value", "attn_out", "ln_attn", "cross_query", "cross_key", "cross_value",
                             "cross_out", "ln_cross", "ff_gate", "ff_in", "ff_out", "ln_ff"}},
    "gpt2": {None: {"qkv", "attn_out", "ln_attn", "ff_in", "ff_out", "ln_ff"}},
    "llama": {None: {"query", "key", "value", "attn_out", "ln_attn", "ff_gate", "ff_in", "ff_out", "ln_ff"}},
}
LAYER_ROLES.update({f: LAYER_ROLES["llama"] for f in ("mistral", "qwen2", "gemma")})


def build(family: str, cls: str | None = None, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of `family` (its merge-test class unless `cls`), every parameter perturbed by
    the seed: fresh norms are all ones and fresh biases zeros in every seed, which would hide a merge
    that forgot them."""
    config_class, config, model_class, _ = ALL[family]
    torch.manual_seed(seed)
    model = getattr(transformers, cls or model_class)(getattr(transformers, config_class)(**config))
    generator = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


def tiny_tokenizer():
    """A word-level tokenizer of exactly VOCAB tokens (the models' vocabulary), built offline."""
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 4)])}
    core = Tokenizer(token_models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                                bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Factory of saved checkpoints (config, safetensors, tokenizer), cached per (family, seed)."""
    root = tmp_path_factory.mktemp("families")
    made: dict[tuple[str, int], str] = {}
    tokenizer = tiny_tokenizer()

    def get(family: str, seed: int = 0) -> str:
        if (family, seed) not in made:
            out = root / f"{family}-{seed}"
            build(family, seed=seed).save_pretrained(out)
            tokenizer.save_pretrained(out)
            made[family, seed] = str(out)
        return made[family, seed]

    return get


def tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    return load_file(Path(folder) / "model.safetensors")


def reload(family: str, folder: str | Path) -> torch.nn.Module:
    """The merged folder loaded by transformers, complete (nothing missing or unexpected), run once."""
    auto = getattr(transformers, ALL[family][3])
    model, info = auto.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = torch.randint(4, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    extra = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        logits = model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits
    assert torch.isfinite(logits).all(), f"{family}: non-finite logits after the merge"
    return model


def adapter_of(folder: str) -> arch.Adapter:
    return arch.adapter_for(json.loads((Path(folder) / "config.json").read_text())["model_type"], generic=True)


# ----------------------------------------------------------------------------------------------------
# the adapters


@pytest.mark.parametrize("family", sorted(CLASSES))
def test_every_parameter_maps_to_a_known_group_and_its_layer(family):
    config_class, config, _, _ = FAMILIES[family]
    for cls in CLASSES[family]:
        model = getattr(transformers, cls)(getattr(transformers, config_class)(**config))
        adapter = arch.adapter_for(model.config.model_type)
        assert not adapter.generic
        infos = [adapter.describe(n) for n in model.state_dict()]
        infos += [adapter.describe(n) for n, _ in model.named_buffers()]  # non-persistent ones too
        groups = {i.group for i in infos}
        assert groups <= set(arch.GROUPS) | {"buffer"} and "other" not in groups, (cls, groups)
        assert {"embeddings", "attention", "feed_forward", "layer_norm"} <= groups
        blocks = {i.block for i in infos if i.layer is not None}
        stacks = {s for s, _ in blocks}
        assert {layer for _, layer in blocks} == set(range(LAYERS)), (cls, blocks)
        for stack in stacks:  # every block of each stack has the family's full set of roles
            for layer in range(LAYERS):
                # (T5's relative position bias lives in block 0 only)
                roles = {i.role for i in infos if i.block == (stack, layer) and i.group != "buffer"} - {"position_bias"}
                assert roles == LAYER_ROLES[family][stack], (cls, stack, layer, roles)
        outside = [i for i in infos if i.layer is None and i.group not in ("buffer", "head", "pooler", "mlm_head",
                                                                           "lm_head")]
        assert outside and all(i.group in ("embeddings", "layer_norm", "attention", "feed_forward") for i in outside)


def test_t5_decoder_blocks_do_not_collide_with_encoder_blocks():
    model = build("t5-gated")
    infos = [arch.T5.describe(n) for n in model.state_dict()]
    blocks = {i.block for i in infos if i.layer is not None}
    assert blocks == {(s, layer) for s in ("encoder", "decoder") for layer in range(LAYERS)}
    enc = arch.T5.describe("encoder.block.0.layer.0.SelfAttention.q.weight")
    dec = arch.T5.describe("decoder.block.0.layer.0.SelfAttention.q.weight")
    assert (enc.role, enc.layer) == (dec.role, dec.layer) and enc.block != dec.block
    # layer.1 is the feed-forward block of an encoder block, cross-attention in a decoder block
    assert arch.T5.describe("encoder.block.1.layer.1.DenseReluDense.wi_0.weight").role == "ff_gate"
    assert arch.T5.describe("decoder.block.1.layer.1.EncDecAttention.k.weight").role == "cross_key"
    assert arch.T5.describe("transformer.decoder.block.1.layer.2.layer_norm.weight").block == ("decoder", 1)
    cross = {i.role for i in infos if i.role.startswith("cross_")}
    assert cross and {i.stack for i in infos if i.role.startswith("cross_")} == {"decoder"}
    assert arch.T5.describe("lm_head.weight").group == "lm_head"


def test_lm_heads_are_their_own_group_and_mlm_heads_stay_mlm():
    assert arch.GPT2.describe("lm_head.weight").group == "lm_head"
    assert arch.LLAMA.describe("lm_head.weight").group == "lm_head"
    assert arch.DISTILBERT.describe("vocab_projector.weight").group == "mlm_head"
    assert arch.DEBERTA_V2.describe("lm_predictions.lm_head.dense.weight").group == "mlm_head"
    assert arch.BERT.describe("lm_head.decoder.weight").group == "mlm_head"  # RoBERTa's MLM head, unchanged
    assert arch.GPT2.describe("h.3.attn.c_attn.weight").role == "qkv"  # OpenAI's files: no `transformer.`
    assert arch.GPT2.describe("h.3.attn.bias").group == "buffer"  # an old file's causal mask


def test_unknown_families_get_guessed_groups_only_when_asked():
    with pytest.raises(MergeLabError, match="model type 'gpt_neox' is not supported yet"):
        arch.adapter_for("gpt_neox")
    adapter = arch.adapter_for("gpt_neox", generic=True)
    assert adapter.generic
    guess = {n: adapter.describe(n).group for n in build("gpt_neox").state_dict()}
    assert guess["gpt_neox.layers.1.attention.query_key_value.weight"] == "attention"
    assert guess["gpt_neox.layers.0.mlp.dense_h_to_4h.bias"] == "feed_forward"
    assert guess["gpt_neox.layers.0.post_attention_layernorm.weight"] == "layer_norm"
    assert guess["gpt_neox.embed_in.weight"] == "embeddings" and guess["lm_head.weight"] == "lm_head"
    assert adapter.describe("gpt_neox.layers.1.attention.dense.weight").layer == 1
    assert "other" not in guess.values()
    bart = arch.adapter_for("bart", generic=True)
    assert bart.describe("final_logits_bias").group == "other"
    assert bart.describe("model.decoder.layers.1.self_attn_layer_norm.weight").block == ("decoder", 1)
    with pytest.raises(MergeLabError, match="not supported yet for statistics"):
        arch.require("gpt_neox", "statistics")
    arch.require("bert", "statistics")
    arch.require("gpt_neox", "merge")


# ----------------------------------------------------------------------------------------------------
# data-free merges end to end


@pytest.mark.parametrize("family", sorted(ALL))
def test_average_is_the_mean_of_every_tensor_and_reloads(family, saved, tmp_path):
    a, b = saved(family, 0), saved(family, 1)
    result = merge("average", [a, b], out=tmp_path / "m")
    merged, ta, tb = tensors(tmp_path / "m"), tensors(a), tensors(b)
    assert_close(merged, {k: (ta[k] + tb[k]) / 2 for k in ta}, atol=1e-6, rtol=1e-6, msg=family)
    model = reload(family, tmp_path / "m")
    state = model.state_dict()
    if model.config.tie_word_embeddings and model.get_output_embeddings() is not None:
        # a tied output layer (GPT-2, Gemma, T5 v1.0, DistilBERT's projector) is the merged embedding matrix
        assert_close(model.get_output_embeddings().weight, model.get_input_embeddings().weight, atol=0)
    for key, value in merged.items():  # what transformers loaded is what the merge wrote
        # (transformers 5 renames GPT-NeoX's on-disk `embed_out` when it loads it)
        assert_close(state[{"embed_out.weight": "lm_head.weight"}.get(key, key)], value, atol=0, msg=key)
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "m" / "config.json").read_text())["architectures"] == [ALL[family][2]]
    generic = [n for n in result.notes if "has no architecture adapter" in n]
    assert bool(generic) == (family in UNKNOWN)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_model_comes_back(family, saved, tmp_path):
    a = saved(family, 0)
    merge("average", [a], out=tmp_path / "one")
    assert_close(tensors(tmp_path / "one"), tensors(a), atol=0, msg=family)  # exactly
    for method in ("ties", "dare", "slerp"):  # N copies, under the parameters that make each a no-op
        copies = [a, a] if method == "slerp" else [a]
        state = merge(method, copies, base=saved(family, 2), params=dict(METHODS[method].neutral)).state
        expected = {adapter_of(a).canonical(k): v for k, v in tensors(a).items()}
        assert_close(state, expected, atol=1e-6, rtol=1e-5, msg=f"{family} {method}")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_task_arithmetic_is_base_plus_scaled_task_vectors(family, saved, tmp_path):
    a, b, base = saved(family, 0), saved(family, 1), saved(family, 2)
    merge("task_arithmetic", [a, b], base=base, params={"lambda": 0}, out=tmp_path / "zero")
    assert_close(tensors(tmp_path / "zero"), tensors(base), atol=1e-7, msg=family)
    ta, tb, tc = tensors(a), tensors(b), tensors(base)
    merge("task_arithmetic", [a, b], base=base, params={"lambda": 0.5}, out=tmp_path / "half")
    assert_close(tensors(tmp_path / "half"), {k: tc[k] + 0.5 * ((ta[k] - tc[k]) + (tb[k] - tc[k])) for k in tc},
                 atol=1e-6, rtol=1e-5, msg=family)


@pytest.mark.parametrize("family", sorted(ALL))
@pytest.mark.parametrize("method", DATA_FREE)
def test_every_data_free_method_writes_a_loadable_model(family, method, saved, tmp_path):
    models = [saved(family, 0), saved(family, 1)]
    base = saved(family, 2) if METHODS[method].needs_base else None
    merge(method, models, base=base, out=tmp_path / "m")
    merged = tensors(tmp_path / "m")
    assert set(merged) == set(tensors(models[0]))
    reload(family, tmp_path / "m")


@pytest.mark.parametrize("family", sorted(ALL))
def test_attention_only_changes_attention_tensors(family, saved, tmp_path):
    a, b = saved(family, 0), saved(family, 1)
    ta, tb = tensors(a), tensors(b)
    merge("average", [a, b], components=["attention"], fallback="first", out=tmp_path / "m")
    merged = tensors(tmp_path / "m")
    adapter = adapter_of(a)
    attention = {k for k in ta if adapter.describe(k).group == "attention"}
    assert attention and len(attention) < len(ta)
    for key in ta:
        expected = (ta[key] + tb[key]) / 2 if key in attention else ta[key]
        assert_close(merged[key], expected, atol=1e-6, rtol=1e-6, msg=key)
    roles = {adapter.describe(k).role for k in attention}
    if family.startswith("t5"):  # cross-attention and the relative position bias are attention too
        assert {"cross_query", "cross_out", "position_bias"} <= roles
    if family == "gpt2":
        assert roles == {"qkv", "attn_out"}


@pytest.mark.parametrize("family", ["t5", "gpt2", "llama", "gpt_neox"])
def test_cli_merges_and_prints_the_fallback_note(family, saved, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["merge", "--method", "ties", "--models", saved(family, 0), saved(family, 1), "--base",
                 saved(family, 2), "--components", "attention,feed_forward", "--set", "density=0.5", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert f"saved {out}" in printed.out
    assert ("note: model type 'gpt_neox' has no architecture adapter" in printed.out) == (family == "gpt_neox")
    config = json.loads((out / "merge_config.json").read_text())
    assert config["components"] == ["attention", "feed_forward"]
    reload(family, out)


def test_the_fallback_note_names_what_it_could_not_place(saved, tmp_path):
    result = merge("average", [saved("bart", 0), saved("bart", 1)], out=tmp_path / "m")
    note = next(n for n in result.notes if "has no architecture adapter" in n)
    assert "1 tensor in group 'other' (final_logits_bias)" in note
    assert "permutation alignment" in note and "best-effort" in note
    assert note in json.loads((tmp_path / "m" / "merge_config.json").read_text())["notes"]


def test_a_head_of_an_unknown_kind_is_merged_not_dropped(tmp_path):
    """A multiple-choice model's head is no kind MergeLab scores; it must still come out, merged."""
    folders = []
    for seed in (0, 1):
        folder = tmp_path / f"choice-{seed}"
        build("distilbert", cls="DistilBertForMultipleChoice", seed=seed).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        folders.append(str(folder))
    merge("average", folders, out=tmp_path / "m")
    merged, ta, tb = tensors(tmp_path / "m"), tensors(folders[0]), tensors(folders[1])
    assert {"pre_classifier.weight", "classifier.weight"} <= set(merged)
    assert_close(merged, {k: (ta[k] + tb[k]) / 2 for k in ta}, atol=1e-6, rtol=1e-6)
    model, info = transformers.AutoModelForMultipleChoice.from_pretrained(tmp_path / "m", output_loading_info=True)
    assert not info["missing_keys"] and type(model).__name__ == "DistilBertForMultipleChoice"


def test_pickle_checkpoints_load_with_their_lm_head(tmp_path):
    """A pytorch_model.bin is loaded into a model (opt-in): the class must be the causal LM, not the bare
    model, or the LM head would be lost."""
    folders = []
    for seed in (0, 1):
        folder = tmp_path / f"pickle-{seed}"
        model = build("llama", seed=seed)
        model.config.architectures = [type(model).__name__]  # what save_pretrained would record
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
        tiny_tokenizer().save_pretrained(folder)
        folders.append(str(folder))
    merge("average", folders, out=tmp_path / "m", allow_pickle=True)
    merged = tensors(tmp_path / "m")
    states = [torch.load(Path(f) / "pytorch_model.bin", weights_only=True) for f in folders]
    assert_close(merged["lm_head.weight"], (states[0]["lm_head.weight"] + states[1]["lm_head.weight"]) / 2, atol=1e-6)
    reload("llama", tmp_path / "m")


# ----------------------------------------------------------------------------------------------------
# what does not fit


def test_tied_and_untied_lm_heads_do_not_merge(saved, tmp_path):
    tied = tmp_path / "tied"
    model = build("llama", cls="LlamaForCausalLM", seed=3)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(tied)
    tiny_tokenizer().save_pretrained(tied)
    assert "lm_head.weight" not in tensors(tied)
    with pytest.raises(MergeLabError, match="ties its output layer to its input embeddings"):
        merge("average", [saved("llama", 0), str(tied)])


def test_data_aware_methods_say_the_family_is_not_supported_yet(saved):
    # (every family with an adapter has statistics: tests/test_family_scoring.py, tests/test_t5.py)
    with pytest.raises(MergeLabError, match="model type 'gpt_neox' is not supported yet for statistics"):
        merge("fisher", [saved("gpt_neox", 0), saved("gpt_neox", 1)], stats_tasks=["sst2"])


def test_a_weights_only_folder_merges_without_a_tokenizer(saved, tmp_path):
    bare = []
    for seed in (0, 1):
        folder = tmp_path / f"weights-{seed}"
        build("gpt2", seed=seed).save_pretrained(folder)
        bare.append(str(folder))
    result = merge("average", bare, out=tmp_path / "m")
    assert any("no tokenizer files" in n for n in result.notes)
    assert not (tmp_path / "m" / "tokenizer.json").exists()
    reload("gpt2", tmp_path / "m")
    assert ml.models.vocabulary_fingerprint(ml.resolve(bare[0])) == ""


# ----------------------------------------------------------------------------------------------------
# per-family invariants: RegMean under identical statistics, curve endpoints, component selection

# the task each merge-test class is scored and given statistics on
SCORED = {"distilbert": "sst2", "deberta-v2": "sst2", "llama-score": "sst2", "gpt2": "wikitext2",
          "llama": "wikitext2", "mistral": "wikitext2", "qwen2": "wikitext2", "gemma": "wikitext2"}
# the last layer of each, whose input every other tensor decides: a second model that differs from the first
# only there has the same statistics everywhere. GPT-2 and Gemma tie their output layer to the embeddings,
# so there the "two" models are the same model twice.
OUTPUT_LAYER = {"distilbert": "classifier.", "deberta-v2": "classifier.", "llama-score": "score.",
                "llama": "lm_head.", "mistral": "lm_head.", "qwen2": "lm_head.", "gemma": None, "gpt2": None}




@pytest.fixture(scope="module")
def scored(saved, tmp_path_factory):
    """`saved`, except GPT-2 gets 160 positions: MergeLab cuts wikitext2 into blocks of 128 tokens whatever
    the model's position limit, and the 64 positions of FAMILIES' GPT-2 would fail on them (IndexError)."""
    root = tmp_path_factory.mktemp("scored")

    def get(family: str, seed: int = 0) -> str:
        if family != "gpt2":
            return saved(family, seed)
        out = root / f"gpt2-{seed}"
        if not out.exists():
            _long_gpt2(seed).save_pretrained(out)
            tiny_tokenizer().save_pretrained(out)
        return str(out)

    return get


def _long_gpt2(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**_GPT2, "n_positions": 160}))
    generator = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


@pytest.mark.parametrize("family", sorted(SCORED))
def test_regmean_with_identical_statistics_is_the_average(family, scored, tmp_path):
    a = scored(family, 0)
    b = a
    if OUTPUT_LAYER[family]:
        model = build(family, seed=0)
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            changed = [p.add_(0.5 * torch.randn(p.shape, generator=generator))
                       for n, p in model.named_parameters() if n.startswith(OUTPUT_LAYER[family])]
        assert changed
        b = str(tmp_path / "b")
        model.save_pretrained(b)
        tiny_tokenizer().save_pretrained(b)
    merge("regmean", [a, b], stats_tasks=[SCORED[family]], params={"examples": 4}, out=tmp_path / "m")
    ta, tb = tensors(a), tensors(b)
    assert (a == b) == all(torch.equal(ta[k], tb[k]) for k in ta)  # distinct models, where they can be
    assert_close(tensors(tmp_path / "m"), {k: (ta[k] + tb[k]) / 2 for k in ta}, atol=1e-5, rtol=1e-4, msg=family)


@pytest.mark.parametrize("family", sorted(SCORED))
def test_a_straight_curve_ends_at_each_models_own_score(family, scored):
    a, b, task = scored(family, 0), scored(family, 1), SCORED[family]
    points = [p for p in ml.curve(a, b, task, points=3, limit=6) if p["kind"] == "point"]
    assert [p["t"] for p in points] == [0.0, 0.5, 1.0]
    for point, folder in ((points[0], a), (points[-1], b)):
        own = ml.evaluate(folder, task, limit=6)
        assert point["scores"][task]["loss"] == pytest.approx(own["loss"], abs=1e-5), family
        if task == "sst2":
            assert point["scores"][task]["accuracy"] == pytest.approx(own["accuracy"], abs=1e-9), family
    assert points[0]["scores"][task]["loss"] != pytest.approx(points[-1]["scores"][task]["loss"], abs=1e-6)


def _per_layer(*names: str) -> set[str]:
    return {name.format(i=i) for name in names for i in range(LAYERS)}


_LLAMA_ATTENTION = _per_layer(*(f"model.layers.{{i}}.self_attn.{p}_proj.weight" for p in "qkvo"))
# written by hand from each family's transformers module names (the merge-test class of FAMILIES)
ATTENTION_BY_HAND = {
    "llama": _LLAMA_ATTENTION,
    "mistral": _LLAMA_ATTENTION,
    "gemma": _LLAMA_ATTENTION,
    "qwen2": _LLAMA_ATTENTION | _per_layer(*(f"model.layers.{{i}}.self_attn.{p}_proj.bias" for p in "qkv")),
    "gpt2": _per_layer(*(f"transformer.h.{{i}}.attn.{m}.{w}" for m in ("c_attn", "c_proj") for w in ("weight", "bias"))),
    "distilbert": _per_layer(*(f"distilbert.transformer.layer.{{i}}.attention.{m}.{w}"
                               for m in ("q_lin", "k_lin", "v_lin", "out_lin") for w in ("weight", "bias"))),
    # both stacks' self-attention, the decoder's cross-attention, and the relative position bias of block 0
    "t5": _per_layer(*(f"{stack}.block.{{i}}.layer.0.SelfAttention.{p}.weight" for stack in ("encoder", "decoder")
                       for p in "qkvo"),
                     *(f"decoder.block.{{i}}.layer.1.EncDecAttention.{p}.weight" for p in "qkvo"))
    | {f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight" for stack in ("encoder", "decoder")},
}


@pytest.mark.parametrize("family", sorted(ATTENTION_BY_HAND))
def test_components_attention_selects_the_hand_written_tensors(family, saved, tmp_path, capsys):
    a, b = saved(family, 0), saved(family, 1)
    out = tmp_path / "m"
    code = main(["merge", "--method", "average", "--models", a, b, "--components", "attention", "--fallback", "first",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    ta, tb, merged = tensors(a), tensors(b), tensors(out)
    assert ATTENTION_BY_HAND[family] <= set(ta)
    assert {k for k in ta if adapter_of(a).describe(k).group == "attention"} == ATTENTION_BY_HAND[family]
    changed = {k for k in ta if not torch.equal(merged[k], ta[k])}
    assert changed == ATTENTION_BY_HAND[family]
    for key in ATTENTION_BY_HAND[family]:
        assert_close(merged[key], (ta[key] + tb[key]) / 2, atol=1e-6, rtol=1e-6, msg=key)
