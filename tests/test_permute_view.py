"""The Permute tab's handlers as plain functions: defaults from the demo zoo's pairs, the Limit box, the
same-initialization warning, and a first status before any work."""

from __future__ import annotations

import json

import pytest

import merging_core as ml

pytest.importorskip("gradio")

from views import permute_tab

from .conftest import save_family_model


def _entry(home, name: str, src, **meta) -> str:
    from .conftest import save_family_model, copy_model

    out = copy_model(src, home / "zoo" / name)
    (out / "mergelab.json").write_text(json.dumps({"task": "wikitext2", "kind": "full", "steps": 1, **meta}))
    return name


@pytest.fixture()
def scratch_zoo(isolated_home, pico):
    """Two entries pretrained from different random initializations and two fine-tunes of one base, as the
    demo recipe records them (demo-scratch-s0/s1; demo-sst2-s0/s1 from minilm)."""
    _entry(isolated_home, "demo-scratch-s0", pico("wikitext2", 0), base="scratch:tiny", seed=0)
    _entry(isolated_home, "demo-scratch-s1", pico("wikitext2", 1), base="scratch:tiny", seed=1)
    _entry(isolated_home, "demo-sst2-s0", pico("wikitext2", 2), base="minilm", seed=0)
    _entry(isolated_home, "demo-sst2-s1", pico("wikitext2", 3), base="minilm", seed=1)
    return isolated_home


def test_opening_the_tab_picks_the_first_different_initialization_pair(scratch_zoo):
    # an update sends only the properties it was given (`constructor_args`)
    a, b = (update.constructor_args for update in permute_tab.refresh(None, ""))
    assert (a["value"], b["value"]) == ("demo-scratch-s0", "demo-scratch-s1")
    assert "demo-sst2-s0" in [name for _, name in a["choices"]]  # (label, name) pairs
    kept = [update.constructor_args for update in permute_tab.refresh("demo-sst2-s0", "")]
    assert all("value" not in update and "demo-sst2-s0" in [name for _, name in update["choices"]]
               for update in kept)  # a choice is kept


def test_same_initialization_is_warned_before_running(scratch_zoo):
    assert permute_tab.init_warning("demo-scratch-s0", "demo-scratch-s1") == ""
    warning = permute_tab.init_warning("demo-sst2-s0", "demo-sst2-s1")
    assert warning.startswith("⚠ A and B were both trained from minilm")
    assert "alignment changes little" in warning
    assert permute_tab.init_warning("demo-sst2-s0", "demo-sst2-s0").startswith("⚠ A and B are the same model")
    assert permute_tab.init_warning("demo-sst2-s0", None) == ""
    assert permute_tab.init_warning("demo-sst2-s0", "no-such-model") == ""  # unknown: the run says why


def test_the_summary_shows_the_engine_notes():
    summary = {"a": "x", "b": "y", "merge_type": "ff+attn", "attention": "head-perm", "qk": False,
               "residual": "first", "function_preserving": True, "sites": {}, "out": "o",
               "text": {"tokens": 10, "task": "wikitext2", "split": "train"},
               "seconds": {"features": 1.0, "matching": 0.1, "apply": 0.1},
               "notes": [("the permutation keeps 97% of units in place: A and B likely share an initialization; "
                          "alignment changes little")]}
    text = permute_tab.alignment_summary(summary, {})
    assert "> ⚠ The permutation keeps 97% of units in place" in text


def test_text_choices_are_readable_and_curve_tasks_have_titles():
    assert ("WikiText-2", "wikitext2") in permute_tab.TEXTS and ("all data-root text", "corpus") in permute_tab.TEXTS
    from views.common import task_choices

    assert ("SST-2", "sst2") in task_choices() and all(value != "corpus" for _, value in task_choices())


def test_the_first_status_comes_before_any_work(scratch_zoo, monkeypatch):
    calls = []
    monkeypatch.setattr(ml, "align", lambda *args, **kwargs: calls.append("align") or pytest.fail("not yet"))
    run = permute_tab.run_align("demo-scratch-s0", "demo-scratch-s1", "ff+attn", "head-perm", "first", False,
                                "wikitext2", 16, [], 3, 0, request=None, progress=lambda *a, **k: None)
    status, *_ = next(run)
    assert status.startswith("Aligning demo-scratch-s1 to demo-scratch-s0") and not calls
    run.close()


def test_a_family_without_alignment_is_explained_in_the_status(family_zoo):
    """A DistilBERT model picked as A or B: the engine's one line at once under the pickers, and as the error
    of a run, before anything is loaded; curve tasks offer what either model can be scored on. A decoder
    (the Llama layout) is aligned like a BERT: no warning."""
    import gradio as gr

    save_family_model(family_zoo / "zoo" / "tiny-distilbert", "distilbert", "sequence", {"task": "sst2"},
                      labels=("negative", "positive"))
    gate = "model 'tiny-distilbert': model type 'distilbert' is not supported yet for permutation alignment"
    for a, b in (("tiny-distilbert", ""), ("pico-sst2", "tiny-distilbert")):
        warning = permute_tab.init_warning(a, b)
        assert warning.startswith(f"⚠ M{gate[1:]}") and "\n" not in warning
    assert permute_tab.init_warning("pico-sst2", "") == "" and permute_tab.init_warning("tiny-llama", "") == ""
    run = permute_tab.run_align("pico-sst2", "tiny-distilbert", "ff+attn", "head-perm", "first", False, "wikitext2",
                                8, [], 3, 4)
    with pytest.raises(gr.Error) as caught:
        next(run)  # no "loading the models" status first
    assert caught.value.message.startswith(f"B (permuted into A's basis): {gate}")
    tasks = permute_tab.pick_tasks("pico-sst2", "tiny-llama", []).constructor_args
    offered = {task for _, task in tasks["choices"]}  # SST-2's head, or the causal LM's text and prompts
    assert {"sst2", "wikitext2", "emotion"} <= offered and "conll2003" not in offered
