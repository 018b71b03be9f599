"""Permutation alignment (issue 5): features, Hungarian matching, merge types, the written copy of B."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import merging_core as ml
from merging_core.align import MERGE_TYPES, align, find_permutation, load_alignment, permute_checkpoint
from merging_core.align.match import match, match_attention
from merging_core.align.permute import head_rows

EXAMPLES = 24


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def mlm_pair(pico, tmp_path_factory):
    """A pico MLM model and a copy of it with every unit randomly permuted."""
    a = pico("wikitext2", 0)
    permuted = permute_checkpoint(str(a), tmp_path_factory.mktemp("align") / "permuted", seed=3)
    return a, permuted


def test_hungarian_match_finds_the_hidden_order():
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    corr = torch.eye(12)[:, order] * 0.9 + 0.05  # A's unit i is B's unit j where order[j] = i
    found = match(corr)
    assert torch.equal(corr[torch.arange(12), found], torch.full((12,), 0.95))
    assert torch.equal(order[found], torch.arange(12))


def test_head_perm_matches_heads_then_dimensions():
    heads, d = 3, 4
    true_heads = torch.tensor([2, 0, 1])
    inner = torch.stack([torch.randperm(d, generator=torch.Generator().manual_seed(s)) for s in range(heads)])
    rows = head_rows(true_heads, inner)
    corr = torch.zeros(heads * d, heads * d)
    corr[torch.arange(heads * d), rows] = 1.0  # A's unit i is B's unit rows[i]
    found = match_attention(corr, heads, "head-perm")
    assert torch.equal(found.vo, rows) and torch.equal(found.heads, true_heads)
    assert found.cost.shape == (3, 3) and found.cost[0, 2] == d  # head 0 of A with head 2 of B: all d matched
    monotonic = match_attention(corr, heads, "monotonic")  # keeps head j with head j: cannot reach the true order
    assert torch.equal(monotonic.heads, torch.arange(heads)) and not torch.equal(monotonic.vo, rows)


def test_aligning_a_permuted_copy_recovers_the_original_exactly(mlm_pair, tmp_path):
    a, permuted = mlm_pair
    result = align(str(a), str(permuted), merge_type="all", attention="head-perm", residual="first", qk=True,
                   examples=EXAMPLES, out=tmp_path / "aligned")
    original, recovered = _weights(a), _weights(result.out)
    assert original.keys() == recovered.keys()
    assert all(torch.equal(original[k], recovered[k]) for k in original)
    summary = result.summary()
    assert summary["function_preserving"] and summary["text"]["examples"] == EXAMPLES
    for site, values in summary["sites"].items():
        assert values["after"] == pytest.approx(1.0, abs=1e-4), site  # every matched pair is the same unit
        assert values["before"] < 0.5
    assert json.loads((result.out / "alignment" / "alignment.json").read_text())["merge_type"] == "all"
    assert set(load_file(result.out / "alignment" / "permutation.safetensors")) >= {"ff.0", "qk.1", "vo.1", "residual"}
    again = load_alignment(result.out)  # read back, as the app does to redraw a heatmap
    assert again.summary()["sites"] == summary["sites"] and torch.equal(again.order("ff.1"), result.order("ff.1"))
    assert sorted(p.name for p in result.out.glob("*.safetensors")) == ["model.safetensors"]  # only the weights


def test_aligned_copy_computes_what_b_computes(mlm_pair, tmp_path):
    a, permuted = mlm_pair
    other = permute_checkpoint(str(a), tmp_path / "other", seed=11)  # another B: same function, other order
    result = align(str(permuted), str(other), merge_type="ff+attn", examples=EXAMPLES, out=tmp_path / "aligned")
    theirs, ours = ml.evaluate(str(other), "wikitext2", limit=8), ml.evaluate(str(result.out), "wikitext2", limit=8)
    assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-5)


@pytest.mark.parametrize("merge_type", sorted(MERGE_TYPES))
def test_merge_types_permute_only_what_they_name(mlm_pair, merge_type, tmp_path):
    a, permuted = mlm_pair
    result = align(str(a), str(permuted), merge_type=merge_type, examples=EXAMPLES, out=tmp_path / "aligned")
    perm, kinds = result.matching.permutation, MERGE_TYPES[merge_type]
    assert bool(perm.ff) == ("ff" in kinds) and bool(perm.vo) == bool(perm.qk) == ("attn" in kinds)
    assert (perm.residual is not None) == ("res" in kinds)
    before, after = _weights(permuted), _weights(result.out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # the word embeddings move with the residual order only; the rest of the model changes with any order
    assert ("bert.embeddings.word_embeddings.weight" in changed) == ("res" in kinds)
    assert bool(changed) == bool(kinds)
    if "res" not in kinds:
        only = {"ff": "intermediate.dense", "attn": "attention.self"}
        for kind, marker in only.items():
            assert any(marker in k for k in changed) == (kind in kinds), (merge_type, kind)


def test_non_function_preserving_settings_are_flagged():
    corrs = {f"res.{s}": torch.eye(4) for s in ("embeddings", "attn.0", "ff.0")}
    corrs.update({"ff.0": torch.eye(8), "attn.0": torch.eye(4), "qk.0": torch.eye(4)})
    assert find_permutation(corrs, layers=1, num_heads=2, merge_type="all").function_preserving
    assert not find_permutation(corrs, layers=1, num_heads=2, merge_type="all", residual="sep").function_preserving
    assert not find_permutation(corrs, layers=1, num_heads=2, merge_type="attn_only",
                                attention="ignore-heads").function_preserving
    assert find_permutation(corrs, layers=1, num_heads=2, merge_type="ff_only",  # residual unused: still preserving
                            residual="sep").function_preserving


def test_align_errors_are_clear(mlm_pair, pico, tmp_path):
    a, permuted = mlm_pair
    with pytest.raises(ml.MergeLabError, match="merge type must be one of"):
        align(str(a), str(permuted), merge_type="everything")
    with pytest.raises(ml.MergeLabError, match="attention matching must be one of"):
        align(str(a), str(permuted), attention="sideways")
    from .conftest import make_pico

    wide = make_pico(tmp_path / "wide", "wikitext2", hidden_size=48, intermediate_size=96)
    with pytest.raises(ml.MergeLabError, match="architectures differ"):
        align(str(a), str(wide))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    with pytest.raises(ml.MergeLabError, match="already exists"):
        align(str(a), str(permuted), out=tmp_path / "taken")
