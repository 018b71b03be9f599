"""Knowledge along a path (Qin et al. 2022, arXiv:2210.14102): the per-example matrix of a curve and its summary,
checked against hand-computed answers and against each end model's own forward passes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import merging_core as ml
from merging_core import data, knowledge
from merging_core.curves import CurveSpec, curve

from .conftest import make_pico

LIMIT = 40


@pytest.fixture(scope="module")
def spread(tmp_path_factory):
    """Two pico SST-2 models with wide random weights: unlike the default pico models, which answer one class
    for everything, they disagree on many examples, so the path has something to flip."""
    root = tmp_path_factory.mktemp("knowledge-pico")
    return [str(make_pico(root / f"s{seed}", "sst2", seed, initializer_range=0.5)) for seed in (0, 1)]


def _own_correctness(model: str, n: int) -> np.ndarray:
    """Each example's correctness from the model's own forward pass: the first n dev texts in one padded
    batch, in file order (no Evaluator, no cached tokenization, no length sorting)."""
    loaded = ml.load(model, ml.get_task("sst2"))
    raw = data.load_split(ml.get_task("sst2"), "dev")
    inputs = loaded.tokenizer([t[0] for t in raw.texts[:n]], truncation=True, max_length=128, padding=True,
                              return_tensors="pt")
    with torch.inference_mode():
        predicted = loaded.model.eval()(**inputs).logits.argmax(-1)
    return (predicted == torch.tensor(raw.labels[:n])).numpy()


def test_summary_of_a_hand_built_matrix():
    m = np.array([[1, 1, 1, 1, 1],   # always right
                  [1, 0, 0, 1, 1],   # lost at 1, regained at 3
                  [1, 1, 0, 0, 1],   # lost at 2, regained at 4
                  [0, 0, 1, 1, 1],   # wrong at A: gained at 2, never lost
                  [1, 1, 0, 1, 0],   # right at A only: lost at 2, back at 3, lost again at 4
                  [0, 0, 0, 0, 0]],  # always wrong
                 dtype=bool)
    s = knowledge.summarize(m, [0, 0.25, 0.5, 0.75, 1], barrier=2, top=2)
    assert s["examples"] == 6 and s["points"] == 5 and s["barrier_t"] == 0.5
    assert [c["correct"] for c in s["counts"]] == [4, 3, 2, 4, 4]
    assert [c["lost"] for c in s["counts"]] == [0, 1, 3, 1, 1]  # right at A (rows 0, 1, 2, 4), wrong here
    assert [c["gained"] for c in s["counts"]] == [0, 0, 1, 1, 1]  # wrong at A (rows 3, 5), right here
    assert [c["forgotten"] for c in s["counts"]] == [0, 1, 2, 1, 0]  # right at both ends (rows 0, 1, 2)
    assert s["known_both"] == 3 and s["forgotten_at_barrier"] == 2
    assert s["forgotten_at_barrier_share"] == pytest.approx(2 / 3)
    assert s["forgotten_ever"] == 2 and s["forget_events"] == 4
    # the top tenth of 3 examples is 1 example (row 1: forgotten at 2 points of the 4 events)
    assert s["top_decile_share"] == pytest.approx(0.5)
    flips = {f["index"]: (f["first_lost"], f["first_regained"], f["points_forgotten"]) for f in s["flips"]}
    assert flips == {1: (1, 3, 2), 2: (2, 4, 2), 3: (None, 2, 0), 4: (2, 3, 0)}
    assert s["order"] == [1, 2, 3, 4, 0, 5]  # flipped by first loss (row 3 by its gain), then the steady rows
    assert [(r["index"], r["points_forgotten"]) for r in s["most_forgotten"]] == [(1, 2), (2, 2)]
    # the barrier column of a loss curve: the highest loss above the chord between the end losses
    assert knowledge.barrier_column([0, 0.5, 1], [1.0, 1.4, 2.0]) == 0  # below the chord: an end
    assert knowledge.barrier_column([0, 0.5, 1], [1.0, 2.0, 2.0]) == 1
    assert knowledge.barrier_column([0, 0.25, 0.5, 0.75, 1], [1.0, 1.2, 1.1, 2.9, 3.0]) == 3
    with pytest.raises(ml.MergeLabError, match="barrier column"):
        knowledge.summarize(m, [0, 0.25, 0.5, 0.75, 1], barrier=5)


def test_ends_match_each_models_own_errors(spread):
    a, b = spread
    run = curve(CurveSpec((a, b), ("sst2",), points=5, limit=LIMIT, examples=True))
    points = list(run)
    k = run.summary()["knowledge"]["sst2"]
    matrix = np.array(k["matrix"], dtype=bool)
    right_a, right_b = _own_correctness(a, LIMIT), _own_correctness(b, LIMIT)
    assert (matrix[:, 0] == right_a).all() and (matrix[:, -1] == right_b).all()
    assert k["counts"][0]["lost"] == 0 and k["counts"][0]["correct"] == right_a.sum()
    assert k["counts"][-1]["lost"] == int((right_a & ~right_b).sum())  # A's knowledge B lacks
    assert k["counts"][-1]["gained"] == int((~right_a & right_b).sum())
    assert k["known_both"] == int((right_a & right_b).sum())
    assert k["counts"][0]["forgotten"] == 0 and k["counts"][-1]["forgotten"] == 0
    # every point's column agrees with its accuracy, and the row set is the first LIMIT dev examples
    for point, count in zip(points, k["counts"]):
        assert count["correct"] == round(point["scores"]["sst2"]["accuracy"] * LIMIT)
    assert k["indices"] == list(range(LIMIT)) and k["split"] == "dev"
    assert len(k["flips"]) > 0  # these two models disagree: the path flips something
    raw = data.load_split(ml.get_task("sst2"), "dev")
    for row in k["most_forgotten"]:  # texts and gold labels are the examples' own
        assert row["sentence"] == raw.texts[row["example"]][0][:300]
        assert row["gold"] == ml.get_task("sst2").labels[raw.labels[row["example"]]]

    # the Curves tab's view of it: one heatmap row per flipped example, in first-loss order
    from views import curves_tab, figures

    heatmap = next(t for t in figures.knowledge_figure(k).data if t.type == "heatmap")
    assert list(heatmap.y) == [f"#{i}" for i in k["order"][: len(k["flips"])]]
    assert [list(row) for row in heatmap.z] == [k["matrix"][i] for i in k["order"][: len(k["flips"])]]
    assert f"| right at both ends | {k['known_both']} |" in curves_tab.knowledge_summary(k)
    table = curves_tab.forgotten_table(k)
    assert list(table["example"]) == [m["example"] for m in k["most_forgotten"]]


def test_a_path_from_a_model_to_itself_flips_nothing(spread):
    a = spread[0]
    run = curve(CurveSpec((a, a), ("sst2",), points=4, limit=LIMIT, examples=True))
    list(run)
    k = run.summary()["knowledge"]["sst2"]
    assert k["flips"] == [] and k["forgotten_ever"] == 0 and k["forgotten_at_barrier"] == 0
    assert all(c["lost"] == 0 and c["gained"] == 0 for c in k["counts"])


def test_normal_curves_record_nothing_and_the_cli_writes_the_matrix(spread, capsys):
    from merging_core.cli import main

    a, b = spread
    run = curve(a, b, "sst2", points=3, limit=8)
    list(run)
    assert "knowledge" not in run.summary() and run.correct == {}
    assert main(["curve", "--a", a, "--b", b, "--task", "sst2", "--points", "3", "--limit", "8", "--examples",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    k = summary["knowledge"]["sst2"]
    assert len(k["matrix"]) == 8 and all(len(row) == 3 for row in k["matrix"])
    assert {"flips", "counts", "forgotten_at_barrier_share", "most_forgotten"} <= set(k)
    assert main(["curve", "--a", a, "--b", b, "--datamap", a]) == 2  # a data map needs the train split
    assert "--split" in capsys.readouterr().err
