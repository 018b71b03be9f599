"""Function-preserving permutations of decoder-only checkpoints (GPT-2 and the Llama layout): a permuted
tiny random model computes the same logits as its source, in memory and through a saved folder that
transformers reloads; permutations that break grouped-query attention or rotary positions are refused,
and doing them by hand does change the function (so the invariant check can fail)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from merging_core.align import (
    KINDS,
    DecoderPermutation,
    HeadOrder,
    Permutation,
    permute_checkpoint,
    permute_state,
    random_permutation,
)
from merging_core.arch import canonical
from merging_core.errors import MergeLabError

from .helpers import assert_close
from .test_families import VOCAB, tiny_tokenizer

REPO = Path(__file__).resolve().parent.parent
# 4 query heads over 2 KV heads (grouped-query attention, 2 query heads per group), head_dim 8
_LLAMA = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64,
          "pad_token_id": 0, "tie_word_embeddings": False}
_GPT2 = {"vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "pad_token_id": 0,
         "bos_token_id": 2, "eos_token_id": 3}

# name -> (config class, config, model class, the Auto class that reloads it)
CASES = {
    "llama": ("LlamaConfig", {**_LLAMA, "tie_word_embeddings": True}, "LlamaForCausalLM", "AutoModelForCausalLM"),
    # untied lm_head, and the optional biases of o_proj and the MLP (writers' biases take the residual order)
    "llama-untied": ("LlamaConfig", {**_LLAMA, "attention_bias": True, "mlp_bias": True}, "LlamaForCausalLM",
                     "AutoModelForCausalLM"),
    "llama-score": ("LlamaConfig", {**_LLAMA, "num_labels": 3}, "LlamaForSequenceClassification",
                    "AutoModelForSequenceClassification"),
    "mistral": ("MistralConfig", _LLAMA, "MistralForCausalLM", "AutoModelForCausalLM"),
    "qwen2": ("Qwen2Config", _LLAMA, "Qwen2ForCausalLM", "AutoModelForCausalLM"),  # q/k/v biases
    "qwen3": ("Qwen3Config", _LLAMA, "Qwen3ForCausalLM", "AutoModelForCausalLM"),  # per-head q_norm / k_norm
    "gemma": ("GemmaConfig", {**_LLAMA, "tie_word_embeddings": True}, "GemmaForCausalLM",
              "AutoModelForCausalLM"),  # stores 1 + γ, tied lm_head
    "gpt2": ("GPT2Config", _GPT2, "GPT2LMHeadModel", "AutoModelForCausalLM"),  # fused Conv1D c_attn, tied
    "gpt2-tokens": ("GPT2Config", {**_GPT2, "num_labels": 3}, "GPT2ForTokenClassification",
                    "AutoModelForTokenClassification"),  # a classifier with a bias on the hidden states
}
COMBINATIONS = [("ff",), ("heads",), ("residual",), KINDS]


def build(case: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model, every parameter perturbed: fresh norms are ones and biases zeros, which would
    hide a permutation that forgot them."""
    config_class, config, model_class, _ = CASES[case]
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config))
    generator = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


def ids() -> torch.Tensor:
    return torch.randint(4, VOCAB, (3, 11), generator=torch.Generator().manual_seed(0))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids()).logits


def canonical_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {canonical(k, model.config.model_type): v for k, v in model.state_dict().items()}


def with_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of `model` holding a canonical state dict."""
    other = copy.deepcopy(model)
    other.load_state_dict({k: state[canonical(k, model.config.model_type)] for k in other.state_dict()})
    return other


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Factory of saved checkpoints (config, safetensors, an offline tokenizer), one per case."""
    root = tmp_path_factory.mktemp("decoders")
    made: dict[str, str] = {}

    def get(case: str) -> str:
        if case not in made:
            build(case).save_pretrained(root / case)
            tiny_tokenizer().save_pretrained(root / case)
            made[case] = str(root / case)
        return made[case]

    return get


@pytest.mark.parametrize("kinds", COMBINATIONS, ids=["+".join(c) for c in COMBINATIONS])
@pytest.mark.parametrize("case", sorted(CASES))
def test_permuted_decoder_computes_the_same_function(case, kinds):
    model = build(case)
    state = canonical_state(model)
    perm = random_permutation(model.config, seed=1, kinds=kinds)
    assert isinstance(perm, DecoderPermutation)
    permuted = permute_state(state, perm, model_type=model.config.model_type)
    moved = {n for n in state if not torch.equal(state[n], permuted[n])}
    gpt2 = case.startswith("gpt2")
    if "ff" in kinds:
        assert {"h.1.mlp.c_fc.weight", "h.1.mlp.c_proj.weight"} <= moved if gpt2 else \
            {"layers.1.mlp.gate_proj.weight", "layers.1.mlp.up_proj.weight", "layers.1.mlp.down_proj.weight"} <= moved
    if "heads" in kinds:
        assert {"h.0.attn.c_attn.weight", "h.0.attn.c_attn.bias", "h.0.attn.c_proj.weight"} <= moved if gpt2 else \
            {"layers.0.self_attn.k_proj.weight", "layers.0.self_attn.v_proj.weight",
             "layers.0.self_attn.o_proj.weight"} <= moved
    if "residual" in kinds:  # every tensor that touches the hidden size moves, norms and embeddings included
        assert {"ln_f.weight", "ln_f.bias", "wte.weight", "wpe.weight", "h.1.ln_2.bias"} <= moved if gpt2 else \
            {"norm.weight", "embed_tokens.weight", "layers.1.post_attention_layernorm.weight"} <= moved
        head = {"llama-score": "score.weight", "llama-untied": "lm_head.weight", "gpt2-tokens": "classifier.weight"}
        assert head.get(case, next(iter(moved))) in moved
    assert moved
    assert_close(logits(with_state(model, permuted)), logits(model), atol=1e-5, msg=f"{case} {kinds}")


@pytest.mark.parametrize("case", ["llama", "gpt2", "qwen2"])
def test_permuting_back_with_the_inverse_returns_the_exact_tensors(case):
    model = build(case)
    state, model_type = canonical_state(model), model.config.model_type
    perm = random_permutation(model.config, seed=4)
    back = permute_state(permute_state(state, perm, model_type=model_type), perm.inverse(), model_type=model_type)
    assert_close(back, state, atol=0, msg=case)
    kept, total = perm.in_place()
    assert 0 <= kept < total


def test_gqa_head_orders_keep_query_heads_with_their_kv_head():
    """Query heads 0, 1 read KV head 0 and 2, 3 read KV head 1: they may swap inside a group, and follow
    their KV head, but never cross to the other group."""
    inner = torch.arange(8).repeat(2, 1)
    # KV heads swapped: the groups move with them, query heads reordered inside each group
    assert HeadOrder(torch.tensor([1, 0]), torch.tensor([3, 2, 0, 1]), inner, inner).group == 2
    for query in ([0, 2, 1, 3], [2, 3, 0, 1]):  # head 2 into group 0; both groups moved but not their KV heads
        with pytest.raises(MergeLabError, match="KV head's group"):
            HeadOrder(torch.tensor([0, 1]), torch.tensor(query), inner, inner)
    with pytest.raises(MergeLabError, match="permutation of 2 KV heads"):
        HeadOrder(torch.tensor([0, 0]), torch.tensor([0, 1, 2, 3]), inner, inner)


def test_moving_a_query_head_to_another_kv_group_changes_the_function():
    """The invariant check can fail: query heads 0 and 2 swapped (in q_proj's rows and o_proj's columns
    alike, a valid order for multi-head attention) now read the other KV head."""
    model = build("llama")
    state = canonical_state(model)
    swap = torch.arange(32).reshape(4, 8)[[2, 1, 0, 3]].reshape(-1)
    broken = dict(state)
    broken["layers.0.self_attn.q_proj.weight"] = state["layers.0.self_attn.q_proj.weight"][swap]
    broken["layers.0.self_attn.o_proj.weight"] = state["layers.0.self_attn.o_proj.weight"][:, swap]
    assert (logits(with_state(model, broken)) - logits(model)).abs().max().item() > 1e-3


def test_no_query_key_order_inside_a_head_under_rotary_positions():
    """RoPE rotates dimension i with i + head_dim/2: one within-head order of q and k keeps every score
    without positions (GPT-2's random orders have one) but not with them (refused for the Llama layout,
    and changing the function when done by hand)."""
    gpt2 = random_permutation(build("gpt2").config, seed=1)
    assert any(not torch.equal(h.qk_inner, torch.arange(8).expand(4, 8)) for h in gpt2.heads.values())
    model = build("llama")
    state = canonical_state(model)
    llama = random_permutation(model.config, seed=1, kinds=("heads",))
    assert all(torch.equal(h.qk_inner, torch.arange(8).expand(2, 8)) for h in llama.heads.values())
    inner = torch.stack([torch.roll(torch.arange(8), 1)] * 2)
    head = HeadOrder(torch.arange(2), torch.arange(4), inner, inner)
    with pytest.raises(MergeLabError, match="rotary positions"):
        permute_state(state, DecoderPermutation(heads={0: head}), model_type="llama")
    rows = head.rows()
    broken = dict(state)
    for role in ("query", "key"):
        name = f"layers.0.self_attn.{role[0]}_proj.weight"
        broken[name] = state[name][rows[role]]
    assert (logits(with_state(model, broken)) - logits(model)).abs().max().item() > 1e-3


def test_a_bert_permutation_is_refused_for_a_decoder():
    model = build("llama")
    with pytest.raises(MergeLabError, match="DecoderPermutation"):
        permute_state(canonical_state(model), Permutation(residual=torch.arange(32)), model_type="llama")


@pytest.mark.parametrize("case", sorted(CASES))
def test_permuted_checkpoint_reloads_and_computes_the_same_logits(case, saved, tmp_path):
    source = saved(case)
    out = permute_checkpoint(source, tmp_path / "permuted", seed=3)
    auto = getattr(transformers, CASES[case][3])
    model, info = auto.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    original = auto.from_pretrained(source).eval()
    assert_close(logits(model.eval()), logits(original), atol=1e-5, msg=case)
    written, before = load_file(Path(out) / "model.safetensors"), load_file(Path(source) / "model.safetensors")
    assert set(written) == set(before)  # a tied lm_head stays implicit: the permuted embeddings are the head
    if model.config.tie_word_embeddings and model.get_output_embeddings() is not None:
        assert_close(model.get_output_embeddings().weight, model.get_input_embeddings().weight, atol=0)
    assert sum(not torch.equal(written[k], before[k]) for k in before) > len(before) // 2
    with pytest.raises(MergeLabError, match="non-empty subset"):
        permute_checkpoint(source, tmp_path / "x", kinds=("rows",))


def test_cli_permutes_a_llama_folder(saved, tmp_path):
    source, out = saved("llama"), tmp_path / "cli"
    done = subprocess.run([sys.executable, "-m", "merging_core", "permute", "--model", source, "--out", str(out),
                           "--seed", "0"], check=False, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"saved {out}" in done.stdout
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert_close(logits(model), logits(transformers.AutoModelForCausalLM.from_pretrained(source).eval()), atol=1e-5)


def test_gpt2_cross_attention_is_refused_rather_than_permuted_wrongly():
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**_GPT2, add_cross_attention=True))
    perm = random_permutation(model.config, seed=0)
    with pytest.raises(MergeLabError, match="cross-attention"):
        permute_state(canonical_state(model), perm, model_type="gpt2")


# ----------------------------------------------------------------------------------------------------
# activation alignment


def saved_reading_text(case: str, folder: Path, tokenizer) -> str:
    """A tiny model of `case` over MiniLM's vocabulary, saved with that tokenizer: it reads WikiText-2 as
    varied tokens (the word tokenizer would read it as mostly <unk>, whose constant features correlate
    with nothing)."""
    config_class, config, model_class, _ = CASES[case]
    config = {**config, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config))
    generator = torch.Generator().manual_seed(1000)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("case", ["llama", "llama-untied", "qwen2", "gpt2"])
def test_aligning_a_permuted_copy_to_its_original_recovers_it_exactly(case, tokenizer, tmp_path):
    """Both read the same text; every matched unit correlates 1 with its original, so the Hungarian solves
    undo the random permutation (feed-forward, GQA heads and their value dimensions, residual stream) and
    the aligned copy is the original tensor for tensor. GPT-2's 64 positions: it reads 64-token blocks."""
    from merging_core.align import align, load_alignment

    original = saved_reading_text(case, tmp_path / "original", tokenizer)
    copy_ = permute_checkpoint(original, tmp_path / "permuted", seed=3)
    result = align(original, str(copy_), merge_type="all", attention="head-perm", residual="all",
                   text="wikitext2", examples=16, batch_size=8, out=tmp_path / "aligned")
    summary = result.summary()
    assert summary["decoder"] and summary["function_preserving"]
    assert all(site["after"] > 0.999 for site in summary["sites"].values()), summary["sites"]
    assert min(site["before"] for site in summary["sites"].values()) < 0.5  # the copy was scrambled
    want, got = load_file(Path(original) / "model.safetensors"), load_file(tmp_path / "aligned" / "model.safetensors")
    scrambled = load_file(Path(copy_) / "model.safetensors")
    assert set(got) == set(want) and any(not torch.equal(scrambled[n], want[n]) for n in want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    again = load_alignment(tmp_path / "aligned")  # the record reads back as the same permutation
    assert again.summary()["sites"] == summary["sites"]
    assert all(torch.equal(a, b) for a, b in zip(again.matching.permutation.tensors().values(),
                                                 result.matching.permutation.tensors().values()))


def test_decoder_alignment_refuses_orders_that_change_the_function(saved, tmp_path):
    from merging_core.align import align

    original = saved("llama")
    for option, message in ((dict(attention="ignore-heads"), "head by head"), (dict(residual="sep", merge_type="all"),
                            "one order"), (dict(qk=True), "no separate Q/K order"), (dict(method="zip"), "ZipIt")):
        with pytest.raises(MergeLabError, match=message) as error:
            align(original, original, out=tmp_path / "never", **option)
        assert "\n" not in str(error.value)
    assert not (tmp_path / "never").exists()
