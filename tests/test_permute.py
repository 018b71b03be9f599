"""Function-preserving permutations (the base of permutation alignment and of the Bezier demo pair)."""

from __future__ import annotations

import copy

import pytest
import torch

import merging_core as ml
from merging_core.align import KINDS, permute_checkpoint, permute_state, random_permutation
from merging_core.arch import canonical

from .helpers import randomised, token_batch

COMBINATIONS = [("ff",), ("heads",), ("residual",), ("ff", "heads"), ("ff", "residual"), ("heads", "residual"), KINDS]


@pytest.mark.parametrize("task", ["sst2", "conll2003", "wikitext2"])
@pytest.mark.parametrize("kinds", COMBINATIONS, ids=["+".join(c) for c in COMBINATIONS])
def test_permuted_model_computes_the_same_function(pico, task, kinds):
    model = randomised(ml.load(str(pico(task)), ml.get_task(task)).model)
    state = {canonical(k): v for k, v in model.state_dict().items()}
    perm = random_permutation(model.config, seed=1, kinds=kinds)
    permuted = permute_state(state, perm, token_head=task == "conll2003")
    other = copy.deepcopy(model)
    other.load_state_dict({k: permuted[canonical(k)] for k in other.state_dict()})
    moved = [n for n in state if not torch.equal(state[n], permuted[n])]
    assert moved, "the permutation changed nothing"
    with torch.no_grad():
        before, after = model(**token_batch()).logits, other(**token_batch()).logits
    assert (before - after).abs().max().item() <= 1e-4
    if "residual" in kinds:  # every tensor that touches the hidden size moves, LayerNorms and embeddings included
        assert "embeddings.LayerNorm.weight" in moved and "embeddings.word_embeddings.weight" in moved
        assert "encoder.layer.1.output.dense.bias" in moved


def test_permuting_a_single_site_wrongly_changes_the_function(pico):
    """The check above can fail: permuting only the rows of one feed-forward layer breaks the model."""
    model = randomised(ml.load(str(pico("sst2")), ml.get_task("sst2")).model)
    state = {canonical(k): v for k, v in model.state_dict().items()}
    broken = dict(state)
    name = "encoder.layer.0.intermediate.dense.weight"
    broken[name] = state[name][torch.randperm(state[name].shape[0], generator=torch.Generator().manual_seed(0))]
    other = copy.deepcopy(model)
    other.load_state_dict({k: broken[canonical(k)] for k in other.state_dict()})
    with torch.no_grad():
        assert (model(**token_batch()).logits - other(**token_batch()).logits).abs().max().item() > 1e-3


def test_permuted_checkpoint_scores_like_its_source(pico, tmp_path):
    source = str(pico("sst2"))
    out = permute_checkpoint(source, tmp_path / "permuted", seed=3)
    ours, theirs = ml.evaluate(str(out), "sst2", limit=32), ml.evaluate(source, "sst2", limit=32)
    assert ours["accuracy"] == theirs["accuracy"] and ours["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
    assert ml.models.resolve(str(out)).metadata()["permutation"] == {"kinds": list(KINDS), "seed": 3}
    with pytest.raises(ml.MergeLabError, match="already exists"):
        permute_checkpoint(source, out)
    with pytest.raises(ml.MergeLabError, match="non-empty subset"):
        permute_checkpoint(source, tmp_path / "x", kinds=("rows",))
