"""Merge and unmerge matrices (ZipIt!, arXiv:2305.03053; Verma & Elbayad, arXiv:2403.00986): the matrix
identities, zipping a model with a permuted copy of itself and unmerging it back, the unmerged MLM decoder,
same-model pairs, and the activations' data amount (`tokens`)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import merging_core as ml
from merging_core.align import (
    AlignSpec,
    Matching,
    Permutation,
    align,
    load_alignment,
    permute_checkpoint,
    permute_state,
    random_permutation,
    text_batches,
    unmerge_state,
    zip_state,
    zips_for,
)
from merging_core.align.features import correlations
from merging_core.align.match import match
from merging_core.align.zip import check_tied, from_order, zip_match
from merging_core.arch import canonical

from .helpers import randomised, token_batch

EXAMPLES = 8
TOKENS = 256  # enough to tell every pico unit apart; fewer tokens keep the test fast


def _logits(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.Tensor:
    other = copy.deepcopy(model)
    other.load_state_dict({k: state[canonical(k)] for k in other.state_dict()})
    with torch.no_grad():
        return other(**token_batch()).logits


def _check_identities(z) -> None:
    d = z.width
    m, u = z.merge.double(), z.unmerge.double()
    assert torch.equal(m @ u, torch.eye(d, dtype=torch.float64))  # M U = I: merging what was unmerged is lossless
    p = u @ m
    assert torch.allclose(p @ p, p, atol=1e-12)  # U M is a projection
    assert torch.equal(m.sum(1), torch.ones(d, dtype=torch.float64))  # merged features are averages
    assert torch.equal(u.sum(1), torch.ones(2 * d, dtype=torch.float64))  # each feature comes from one merged one
    counts = z.pairs()
    assert counts["a-a"] == counts["b-b"] and sum(counts.values()) == d


def test_permutation_zip_is_average_with_b_permuted_and_a_projection():
    d = 10
    order = torch.randperm(d, generator=torch.Generator().manual_seed(0))
    z = from_order(order)
    _check_identities(z)
    p = torch.eye(d)[order]  # P[i, order[i]] = 1
    assert torch.equal(z.merge, torch.cat([torch.eye(d) / 2, p / 2], 1))
    assert torch.equal(z.unmerge, torch.cat([torch.eye(d), p.T], 0))
    x = torch.randn(d, dtype=torch.float64)
    agree = torch.cat([x, p.T.double() @ x])  # B's features are A's, in B's order: U M keeps them
    assert torch.allclose(z.unmerge.double() @ (z.merge.double() @ agree), agree)
    disagree = torch.randn(2 * d, dtype=torch.float64)  # otherwise each pair is replaced by its mean
    merged = z.merge.double() @ disagree
    assert torch.allclose(merged, (disagree[:d] + disagree[d:][order]) / 2)
    assert not torch.allclose(z.unmerge.double() @ merged, disagree)


def test_zipit_matching_with_same_model_pairs_keeps_the_identities():
    d = 16
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(200, 3 * d, generator=gen)
    a = feats[:, :d] + 0.3 * feats[:, d: 2 * d]
    b = torch.cat([feats[:, :d // 2], feats[:, 2 * d: 2 * d + d // 2]], 1)
    both = torch.corrcoef(torch.cat([a, b], 1).T)
    cross, own_a, own_b = both[:d, d:], both[:d, :d], both[d:, d:]
    for same, most in ((0.0, 0), (0.25, 2), (1.0, d // 2)):
        z = zip_match(cross, own_a, own_b, same)
        _check_identities(z)
        assert z.pairs()["a-a"] <= most
    assert zip_match(cross, own_a, own_b, 1.0).pairs()["b-b"] > 0  # B's duplicated half is zipped with itself
    # no same-model pairs: the Hungarian solve, exactly permutation alignment
    assert torch.equal(zip_match(cross, own_a, own_b, 0.0).merge, from_order(match(cross)).merge)


@pytest.mark.parametrize("task", ["sst2", "conll2003", "wikitext2"])
def test_zip_with_a_permuted_copy_returns_the_model_and_unmerges_to_both(pico, task):
    """Merge A with A permuted (the true orders), then unmerge: A and its copy come back, same function."""
    model = randomised(ml.load(str(pico(task)), ml.get_task(task)).model)
    state = {canonical(k): v for k, v in model.state_dict().items()}
    perm = random_permutation(model.config, seed=1)
    token_head = task == "conll2003"
    copy_state = permute_state(state, perm, token_head=token_head)
    # the copy's unit perm[i] sits at i: A's unit j is the copy's argsort(perm)[j]
    inverse = Permutation(torch.argsort(perm.residual), *({layer: torch.argsort(o) for layer, o in orders.items()}
                                                           for orders in (perm.ff, perm.qk, perm.vo)))
    zips = zips_for(Matching(inverse, "all", "head-perm", "first", True), model.config)
    merged = zip_state(state, copy_state, zips, token_head=token_head, tied=task == "wikitext2")
    assert all(torch.isfinite(t).all() for t in merged.values() if t.is_floating_point())
    for name, tensor in state.items():
        assert torch.allclose(merged[name], tensor, atol=1e-6), name
    for side, expected in ((0, state), (1, copy_state)):
        unmerged = unmerge_state(merged, zips, side, token_head=token_head)
        for name, tensor in expected.items():
            assert torch.allclose(unmerged[name], tensor, atol=1e-6), (side, name)
    reference = _logits(model, state)
    assert (_logits(model, merged) - reference).abs().max() <= 1e-4
    assert (_logits(model, unmerge_state(merged, zips, 1, token_head=token_head)) - reference).abs().max() <= 1e-4


def test_unmerged_decoder_is_the_tied_embeddings_and_keeps_vocabulary_order(pico):
    """The MLM decoder reads the residual stream: unmerged (½ Σ E_s U^s) it equals the merged word embeddings
    it is tied to, and the logits of two different models' merge stay in vocabulary order."""
    models = [randomised(ml.load(str(pico("wikitext2", s)), ml.get_task("wikitext2")).model) for s in (0, 1)]
    states = [{canonical(k): v for k, v in m.state_dict().items()} for m in models]
    orders = random_permutation(models[0].config, seed=5)
    zips = zips_for(Matching(orders, "all", "head-perm", "first", True), models[0].config)
    merged = zip_state(*states, zips)
    decoder = check_tied(*states, zips, merged)
    word = "embeddings.word_embeddings.weight"
    p = torch.eye(len(orders.residual))[orders.residual]
    assert torch.allclose(decoder, (states[0][word] + states[1][word] @ p.T) / 2, atol=1e-6)
    assert torch.allclose(decoder, merged[word], atol=1e-6)
    # the logits of the merged model, computed with the unmerged decoder by hand, are the model's own logits
    merged_model = copy.deepcopy(models[0])
    merged_model.load_state_dict({k: merged[canonical(k)] for k in merged_model.state_dict()})
    with torch.no_grad():
        hidden = merged_model.bert(**token_batch()).last_hidden_state
        by_hand = merged_model.cls.predictions.transform(hidden) @ decoder.T + merged["cls.predictions.bias"]
        assert torch.allclose(merged_model(**token_batch()).logits, by_hand, atol=1e-4)
    bad = dict(merged)
    bad[word] = bad[word][:, torch.randperm(bad[word].shape[1], generator=torch.Generator().manual_seed(0))]
    with pytest.raises(RuntimeError, match="tied"):  # the check can fail
        check_tied(*states, zips, bad)


def test_align_zip_end_to_end(pico, tmp_path):
    """`align(method="zip")` on A and its permuted copy writes A back; zip with no same-model pairs of two
    different models is the average of A and B permuted; same-model pairs give a finite model."""
    a = pico("wikitext2", 0)
    permuted = permute_checkpoint(str(a), tmp_path / "permuted", seed=3)
    result = align(str(a), str(permuted), merge_type="all", qk=True, examples=EXAMPLES, tokens=TOKENS, method="zip",
                   out=tmp_path / "zipped")
    original, zipped = load_file(a / "model.safetensors"), load_file(result.out / "model.safetensors")
    assert original.keys() == zipped.keys()
    assert all(torch.allclose(original[k], zipped[k], atol=1e-6) for k in original)
    assert result.summary()["zip_pairs"]["a-a"] == 0 and result.summary()["method"] == "zip"
    again = load_alignment(result.out)
    assert again.zips.keys() == result.zips.keys()
    assert all(torch.equal(again.zips[k].unmerge, z.unmerge) for k, z in result.zips.items())
    unmerged = unmerge_state({canonical(k): v for k, v in zipped.items()}, again.zips, 1)
    copy_weights = load_file(permuted / "model.safetensors")
    assert all(torch.allclose(unmerged[canonical(k)], v, atol=1e-6) for k, v in copy_weights.items())

    b = pico("wikitext2", 1)
    options = {"merge_type": "ff+attn", "examples": EXAMPLES, "tokens": TOKENS}
    zipped = align(str(a), str(b), method="zip", out=tmp_path / "ab-zip", **options)
    aligned = align(str(a), str(b), out=tmp_path / "ab-perm", **options)
    wa, wz, wb = (load_file(f / "model.safetensors") for f in (a, zipped.out, aligned.out))
    assert all(torch.allclose(wz[k], (wa[k] + wb[k]) / 2, atol=1e-6) for k in wa)

    same = align(str(a), str(b), method="zip", zip_same=0.5, merge_type="all", out=tmp_path / "same", examples=EXAMPLES,
                 tokens=TOKENS)
    pairs = same.summary()["zip_pairs"]
    assert pairs["a-a"] == pairs["b-b"] > 0
    for z in same.zips.values():
        _check_identities(z)
    loaded = ml.load(str(same.out)).model
    with torch.no_grad():
        assert torch.isfinite(loaded(**token_batch()).logits).all()


def test_tokens_cap_the_data_amount(pico):
    """`tokens` = the first k batches' token count gives exactly the correlations of those k batches."""
    models = [ml.load(str(pico("wikitext2", s))).model for s in (0, 1)]
    tokenizer = ml.load(str(pico("wikitext2", 0))).tokenizer
    batches = text_batches("wikitext2", "train", tokenizer, 12, 4, "cpu")
    first = int(batches[0]["attention_mask"].sum())
    capped = correlations(*models, batches, max_tokens=first)
    alone = correlations(*models, batches[:1])
    assert capped.keys() == alone.keys()
    assert all(torch.allclose(capped[k], alone[k], atol=1e-6) for k in alone)
    fewer = correlations(*models, batches, max_tokens=first // 2)
    assert not torch.allclose(fewer["ff.0"], alone["ff.0"])
    assert all(torch.isfinite(v).all() for v in fewer.values())


def test_spec_checks_method_tokens_and_zip_share():
    AlignSpec("x", "y", method="zip", zip_same=0.25, tokens=100)  # valid
    for options, param in (({"method": "blend"}, "method"), ({"tokens": -1}, "tokens"), ({"tokens": 1.5}, "tokens"),
                           ({"method": "zip", "zip_same": 1.5}, "zip_same"), ({"zip_same": 0.2}, "zip_same")):
        with pytest.raises(ml.MergeLabError) as caught:
            AlignSpec("x", "y", **options)
        assert caught.value.param == param
    spec = AlignSpec("x", "y", method="zip", zip_same=0.25, tokens=100)
    assert AlignSpec.from_dict(spec.to_dict()) == spec
