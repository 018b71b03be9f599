"""Permutation alignment: features, Hungarian matching, merge types, the written copy of B, the request."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import merging_core as ml
from merging_core.align import MERGE_TYPES, AlignSpec, align, find_permutation, load_alignment, permute_checkpoint
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
    # the request is recorded (summary and model metadata) and re-creates the run
    spec = AlignSpec(str(a), str(permuted), merge_type="all", attention="head-perm", residual="first", qk=True,
                     examples=EXAMPLES)
    assert result.spec == again.spec == spec and summary["spec"] == spec.to_dict()
    assert ml.models.resolve(str(result.out)).metadata()["alignment"] == spec.to_dict()
    recorded = json.loads((result.out / "alignment" / "alignment.json").read_text())["spec"]
    rerun = align(AlignSpec.from_dict(recorded), out=tmp_path / "again")
    assert rerun.summary()["sites"] == summary["sites"]
    assert all(torch.equal(x, rerun.matching.permutation.tensors()[k])
               for k, x in result.matching.permutation.tensors().items())


def test_aligned_copy_computes_what_b_computes(mlm_pair, tmp_path):
    a, permuted = mlm_pair
    other = permute_checkpoint(str(a), tmp_path / "other", seed=11)  # another B: same function, other order
    result = align(AlignSpec(str(permuted), str(other), merge_type="ff+attn", examples=EXAMPLES),
                   out=tmp_path / "aligned")
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


def test_align_spec_round_trips_and_checks_its_choices(tmp_path):
    spec = AlignSpec("scratch-s0", "scratch-s1", merge_type="all", qk=True, text="sst2", split="dev", examples=8)
    assert AlignSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert AlignSpec.from_dict({"a": "x", "b": "y"}) == AlignSpec("x", "y")  # defaults filled in
    assert AlignSpec(tmp_path, "y").a == str(tmp_path)  # a path is kept as text
    bad = {"a": "", "b": " ", "merge_type": "everything", "attention": "sideways", "residual": "middle", "qk": "yes",
           "text": "vibes", "split": "holdout", "examples": 0, "batch_size": 2.5}
    for field, value in bad.items():
        with pytest.raises(ml.MergeLabError) as caught:
            AlignSpec(**{"a": "x", "b": "y", field: value})
        assert caught.value.param == field, field
    with pytest.raises(ml.MergeLabError, match="no field 'colour'") as caught:
        AlignSpec.from_dict({"a": "x", "b": "y", "colour": "red"})
    assert caught.value.param == "colour"
    with pytest.raises(TypeError, match="the spec holds the options"):
        align(spec, merge_type="vanilla")


def test_permute_tab_builds_one_spec():
    pytest.importorskip("gradio")
    from views.permute_tab import align_spec

    spec = align_spec(" scratch-s0 ", "scratch-s1", "ff+attn", "monotonic", "last", True, "wikitext2", 64.0)
    assert spec == AlignSpec("scratch-s0", "scratch-s1", merge_type="ff+attn", attention="monotonic",
                             residual="last", qk=True, text="wikitext2", examples=64)
    with pytest.raises(ml.MergeLabError, match="pick two checkpoints"):
        align_spec("scratch-s0", None, "ff+attn", "head-perm", "first", False, "wikitext2", 64)


# -- progress, Stop, and the same-initialization notes ----------------------------------------------------

def test_every_stage_reports_progress_with_its_name_and_counts(pico, tmp_path):
    a, b = pico("wikitext2", 0), pico("wikitext2", 1)  # different initializations
    calls: list[tuple[float, str]] = []
    result = align(str(a), str(b), merge_type="all", examples=EXAMPLES, batch_size=8, out=tmp_path / "aligned",
                   progress=lambda fraction, desc: calls.append((fraction, desc)))
    descs = [d for _, d in calls]
    activations = [d for d in descs if d.startswith("activations: batch ")]
    # every transformer layer of A and B and every site's sums report: many times per batch, with the counts
    assert len(activations) >= 3 * 2 * 2 and {"activations: batch 1/3", "activations: batch 3/3"} <= {
        d.split(",")[0] for d in activations}
    matching = [d for d in descs if d.startswith("matching: ")]
    assert matching[:3] == ["matching: ff.0 (1/5)", "matching: attn.0 (2/5)", "matching: ff.1 (3/5)"]
    assert "matching: residual (5/5)" in matching
    assert descs[0].startswith("loading: ") and any(d.startswith("writing") for d in descs)
    fractions = [f for f, _ in calls]
    assert fractions == sorted(fractions) and 0.0 <= fractions[0] and fractions[-1] == 1.0
    assert result.summary()["notes"] == []  # different initializations: nothing to warn about


@pytest.mark.parametrize("stage", ["activations", "matching"])
def test_a_callback_that_raises_cancelled_stops_align(pico, tmp_path, stage):
    a, b = pico("wikitext2", 0), pico("wikitext2", 1)
    seen: list[str] = []

    def stop(fraction: float, desc: str) -> None:
        seen.append(desc)
        if desc.startswith(f"{stage}: ") and len([d for d in seen if d.startswith(stage)]) == 2:
            raise ml.progress.Cancelled()

    with pytest.raises(ml.progress.Cancelled):
        align(str(a), str(b), examples=EXAMPLES, batch_size=8, out=tmp_path / "aligned", progress=stop)
    assert not any(d.startswith("writing") for d in seen) and not (tmp_path / "aligned").exists()
    if stage == "activations":  # stopped inside the first batch, not after the whole pass
        assert not any(d.startswith("activations: batch 2/") for d in seen)


def test_eta_comes_from_the_rate_so_far():
    from merging_core.progress import remaining, time_left, with_eta

    assert time_left(10.0, 0, 20) == "" and time_left(10.0, 20, 20) == ""  # no rate yet; done
    assert time_left(10.0, 5, 20) == "~30 s left"
    assert [remaining(s) for s in (0.2, 41, 200, 5400)] == ["~1 s left", "~41 s left", "~3 min left", "~1.5 h left"]
    now = [100.0]
    shown = []
    report = with_eta(lambda f, d: shown.append(d), clock=lambda: now[0])
    report(0.0, "activations: batch 1/4")
    now[0] += 0.5
    report(0.25, "activations: batch 2/4")  # too early to tell
    now[0] += 3.5
    report(0.5, "activations: batch 3/4")
    assert shown == ["activations: batch 1/4", "activations: batch 2/4", "activations: batch 3/4, ~4 s left"]
    assert with_eta(None) is None


def test_aligning_a_model_with_itself_notes_the_shared_initialization(pico, tmp_path):
    a = str(pico("wikitext2", 0))
    result = align(a, a, merge_type="ff+attn", examples=EXAMPLES, out=tmp_path / "self")
    notes = result.summary()["notes"]
    assert any(n.startswith("A and B are the same model") for n in notes)
    assert any(n.startswith("the permutation keeps 100% of units in place: A and B likely share an initialization")
               for n in notes)
    assert load_alignment(result.out).summary()["notes"] == notes  # recorded with the alignment


def _fine_tune(src, folder, **meta):
    """A copy of `src` whose metadata records what it was trained from (as training records it)."""
    from .conftest import copy_model

    out = copy_model(src, folder)
    (out / "mergelab.json").write_text(json.dumps({"task": "wikitext2", "kind": "full", **meta}))
    return str(out)


def test_same_initialization_is_found_from_the_recorded_bases(pico, tmp_path):
    from merging_core.align import initialization_note

    base = pico("wikitext2", 0)
    s0 = _fine_tune(base, tmp_path / "ft-s0", base=str(base), base_location=str(base), seed=0)
    s1 = _fine_tune(pico("wikitext2", 1), tmp_path / "ft-s1", base=str(base), base_location=str(base), seed=1)
    assert "both trained from" in initialization_note(s0, s1)  # two fine-tunes of one model
    assert initialization_note(str(base), s1).startswith("B was trained from A")
    # pretrained from scratch with different seeds: different initializations, though both record scratch:tiny
    x0 = _fine_tune(base, tmp_path / "x0", base="scratch:tiny", seed=0)
    x1 = _fine_tune(pico("wikitext2", 1), tmp_path / "x1", base="scratch:tiny", seed=1)
    assert initialization_note(x0, x1) is None
    assert "same random initialization" in initialization_note(x0, _fine_tune(base, tmp_path / "x0b",
                                                                              base="scratch:tiny", seed=0))
    assert initialization_note(str(base), str(pico("wikitext2", 1))) is None  # nothing recorded: unrelated
    # the engine puts the same note in the summary of a run on such a pair
    result = align(s0, s1, merge_type="ff_only", examples=8, out=tmp_path / "aligned")
    assert any("both trained from" in n for n in result.summary()["notes"])
