"""Interpolation curves, planes and their geometry, on pico checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch

import merging_core as ml
from merging_core import paths
from merging_core.curves import curve, plane

from .conftest import make_pico
from .helpers import DEVICES, assert_close

LIMIT = 24


def _scores(item: dict, task: str) -> dict:
    return item["scores"][task]


# ----------------------------------------------------------------------------------------------------
# geometry


def test_path_coefficients_sum_to_one_and_hit_the_vertices():
    for t in paths.positions(11):
        assert sum(paths.line(t)) == pytest.approx(1.0) and sum(paths.bezier(t)) == pytest.approx(1.0)
    assert paths.line(0.0) == (1.0, 0.0) and paths.line(1.0) == (0.0, 1.0)
    assert paths.bezier(0.0) == (1.0, 0.0, 0.0) and paths.bezier(1.0) == (0.0, 1.0, 0.0)
    assert paths.positions(26)[0] == 0.0 and paths.positions(26)[-1] == 1.0 and len(paths.positions(26)) == 26
    target = torch.empty(3)
    a, b, c = torch.randn(3), torch.randn(3), torch.randn(3)
    paths.combine_into(target, [a, b, c], (0.0, 1.0, 0.0))
    assert_close(target, b, atol=0, rtol=0)
    paths.combine_into(target, [a, b, c], (0.25, 0.25, 0.5))
    torch.testing.assert_close(target, 0.25 * a + 0.25 * b + 0.5 * c)


def test_barrier_is_the_height_above_the_chord():
    ts = [0.0, 0.25, 0.5, 0.75, 1.0]
    losses = [1.0, 1.6, 2.5, 1.8, 2.0]  # chord at 0.5 is 1.5, so the barrier there is 1.0
    assert paths.barrier(ts, losses, higher_is_better=False) == (pytest.approx(1.0), 0.5)
    assert paths.barrier_vs_mean_ends(losses, higher_is_better=False) == pytest.approx(1.0)
    accuracy = [0.9, 0.85, 0.6, 0.8, 0.7]  # chord at 0.5 is 0.8 -> 0.2 below it
    assert paths.barrier(ts, accuracy, higher_is_better=True) == (pytest.approx(0.2), 0.5)
    convex = [1.0, 0.5, 0.4, 0.6, 2.0]  # below the chord everywhere: no barrier
    height, _ = paths.barrier(ts, convex, higher_is_better=False)
    assert height == 0.0 and math.copysign(1.0, height) == 1.0


def test_geometry_distances_and_plane_frame():
    torch.manual_seed(0)
    a = {"w": torch.randn(4, 3), "b": torch.randn(5)}
    b = {k: v + torch.randn_like(v) for k, v in a.items()}
    c = {k: v + 2 * torch.randn_like(v) for k, v in a.items()}
    flat = {name: torch.cat([p["w"].flatten(), p["b"]]).double() for name, p in (("a", a), ("b", b), ("c", c))}
    geo = paths.geometry([a, b, c], ["w", "b"])
    assert geo.count == 17
    assert geo.distance(0, 1) == pytest.approx(float((flat["a"] - flat["b"]).norm()))
    assert geo.cosine(0, 1) == pytest.approx(float(flat["a"] @ flat["b"] / flat["a"].norm() / flat["b"].norm()))
    task_a, task_b = flat["a"] - flat["c"], flat["b"] - flat["c"]
    assert geo.cosine(0, 1, origin=2) == pytest.approx(float(task_a @ task_b / task_a.norm() / task_b.norm()))
    assert paths.geometry([a, a], ["w", "b"]).distance(0, 1) == 0.0  # exact, not ~1e-7

    frame = paths.PlaneFrame.through(geo)
    for k, (x, y) in enumerate(frame.vertices()):
        coefficients = frame.coefficients(x, y)
        assert coefficients == pytest.approx(tuple(float(k == j) for j in range(3)), abs=1e-9)
        assert sum(coefficients) == pytest.approx(1.0)
    # the centroid projects onto the centroid of the vertices, at distance 0 from the plane
    centroid = {k: (a[k] + b[k] + c[k]) / 3 for k in a}
    geo4 = paths.geometry([a, b, c, centroid], ["w", "b"])
    x, y, off = frame.project(geo4.dot(3, 1), geo4.dot(3, 2), geo4.dot(3, 3))
    assert (x, y) == pytest.approx(((frame.length + frame.shift) / 3, frame.height / 3), abs=1e-6)
    assert off == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ml.MergeLabError, match="span no plane"):
        paths.PlaneFrame.through(paths.geometry([a, b, {k: 2 * b[k] - a[k] for k in a}], ["w", "b"]))


# ----------------------------------------------------------------------------------------------------
# curves on pico checkpoints


@pytest.mark.parametrize("device", DEVICES)
def test_endpoints_reproduce_each_models_own_scores_exactly(pico, device, monkeypatch):
    monkeypatch.setenv("MERGELAB_DEVICE", device)  # the curve and the evaluations it is checked against
    a, b = str(pico("sst2", 0)), str(pico("sst2", 1))
    run = curve(a, b, "sst2", points=4, limit=LIMIT)
    items = list(run)
    assert _scores(items[0], "sst2") == ml.evaluate(a, "sst2", limit=LIMIT)
    assert _scores(items[-1], "sst2") == ml.evaluate(b, "sst2", limit=LIMIT)
    assert run.summary()["heads"]["sst2"].startswith("interpolated")


@pytest.mark.parametrize("device", DEVICES)
def test_different_tasks_keep_their_own_heads(pico, device, monkeypatch):
    monkeypatch.setenv("MERGELAB_DEVICE", device)
    a, b = str(pico("sst2", 0)), str(pico("cola", 2))
    run = curve(a, b, ["sst2", "cola"], points=3, limit=LIMIT)
    items = list(run)
    assert _scores(items[0], "sst2") == ml.evaluate(a, "sst2", limit=LIMIT)  # A's own head at A
    assert _scores(items[-1], "cola") == ml.evaluate(b, "cola", limit=LIMIT)  # B's own head at B
    heads = run.summary()["heads"]
    assert heads["sst2"] == f"fixed: {a}'s head" and heads["cola"] == f"fixed: {b}'s head"
    # the heads do not move, so they are not counted in the distance
    assert "classifier.weight" not in run.names and run.distances["params"] == run.geometry.count


@pytest.mark.parametrize("device", DEVICES)
def test_a_curve_from_a_model_to_itself_is_flat(pico, device, monkeypatch):
    monkeypatch.setenv("MERGELAB_DEVICE", device)
    a = str(pico("sst2", 0))
    run = curve(a, a, "sst2", points=5, limit=LIMIT)
    first, *rest = [_scores(p, "sst2") for p in run]
    assert all(r == first for r in rest)
    summary = run.summary()
    assert summary["barriers"]["sst2"]["loss_barrier"] == 0.0 and summary["barriers"]["sst2"]["metric_barrier"] == 0.0
    assert summary["distances"]["l2"] == 0.0 and summary["distances"]["cosine"] == pytest.approx(1.0)


def test_points_stream_in_order_one_evaluation_at_a_time(pico):
    run = curve(str(pico("sst2", 0)), str(pico("sst2", 1)), "sst2", points=6, limit=LIMIT)
    calls = []
    evaluator = run.rigs[0].evaluator
    run.rigs[0].evaluator = lambda model: calls.append(1) or evaluator(model)
    stream = iter(run)
    first = next(stream)
    assert first["kind"] == "point" and first["index"] == 0 and first["t"] == 0.0
    assert len(calls) == 1  # the first point arrives before the second is computed
    rest = list(stream)
    assert [p["index"] for p in rest] == [1, 2, 3, 4, 5] and len(calls) == 6
    assert [p["t"] for p in [first, *rest]] == paths.positions(6)
    assert list(run) == [first, *rest]  # a second iteration replays, computing nothing
    assert len(calls) == 6


def test_merges_land_where_they_should(pico):
    a, b = str(pico("sst2", 0)), str(pico("sst2", 1))
    run = curve(a, b, "sst2", points=3, limit=LIMIT, merges=["average", "slerp:t=0.25"])
    items = list(run)
    midpoint = items[1]
    average, slerp = [i for i in items if i["kind"] == "merge"]
    assert average["method"] == "average" and average["t"] == pytest.approx(0.5, abs=1e-6)
    assert average["off_line"] == pytest.approx(0.0, abs=1e-3)
    assert _scores(average, "sst2")["loss"] == pytest.approx(_scores(midpoint, "sst2")["loss"], abs=1e-6)
    # SLERP bends away from the chord: near t = 0.25 but off the line
    assert 0.1 < slerp["t"] < 0.4 and slerp["off_line"] > 1e-3
    assert run.summary()["merges"] == [average, slerp]


@pytest.mark.parametrize("device", DEVICES)
def test_bezier_curve_trains_its_bend_and_keeps_the_ends(pico, device, monkeypatch):
    monkeypatch.setenv("MERGELAB_DEVICE", device)
    a, b = str(pico("sst2", 0)), str(pico("sst2", 1))
    run = curve(a, b, "sst2", points=3, limit=LIMIT, path="bezier", bend_steps=6, bend_lr=1e-2, batch_size=8)
    items = list(run)
    bend = items[0]
    assert bend["kind"] == "bend" and bend["steps"] == 6 and bend["distance_from_midpoint"] > 0
    points = [i for i in items if i["kind"] == "point"]
    assert _scores(points[0], "sst2") == ml.evaluate(a, "sst2", limit=LIMIT)
    assert _scores(points[-1], "sst2") == ml.evaluate(b, "sst2", limit=LIMIT)
    assert run.summary()["bend"] == bend
    for item in points:
        assert all(math.isfinite(v) for v in _scores(item, "sst2").values() if isinstance(v, float))


def test_head_from_scores_a_task_neither_model_has(pico):
    a, b = str(pico("sst2", 0)), str(pico("sst2", 1))
    with pytest.raises(ml.MergeLabError, match="head_from"):
        curve(a, b, "wikitext2", points=2, limit=4)
    run = curve(a, b, "wikitext2", points=2, limit=4, head_from=str(pico("wikitext2", 3)))
    items = list(run)
    assert items[0]["scores"]["wikitext2"]["loss"] > 0 and run.summary()["heads"]["wikitext2"].startswith("fixed")


def test_bad_inputs_are_clear_errors(pico, tmp_path):
    a = str(pico("sst2", 0))
    wide = make_pico(tmp_path / "wide", "sst2", hidden_size=48, intermediate_size=96)
    with pytest.raises(ml.MergeLabError, match="architectures differ"):
        curve(a, str(wide), "sst2", points=3)
    with pytest.raises(ml.MergeLabError, match="unknown task 'nope'"):
        curve(a, a, "nope")
    with pytest.raises(ml.MergeLabError, match="at least 2 points"):
        curve(a, a, "sst2", points=1)
    with pytest.raises(ml.MergeLabError, match="path must be one of"):
        curve(a, a, "sst2", path="zigzag")
    with pytest.raises(ml.MergeLabError, match="does not exist"):
        curve(a, "./nowhere", "sst2")


def test_lora_modules_move_in_module_space(pico, tmp_path):
    base = str(pico(None))
    modules = []
    for seed in (0, 1):
        config = ml.TrainConfig(task="sst2", base=base, steps=3, batch_size=4, peft="lora", eval_limit=8, seed=seed)
        modules.append(str(ml.train(config, tmp_path / f"lora-{seed}").out))
    run = curve(*modules, "sst2", points=3, limit=LIMIT)
    assert run.space == "module"
    assert all("lora_" in n or n.startswith("classifier.") for n in run.names)  # the tuned parameters only
    items = list(run)
    for item, module in ((items[0], modules[0]), (items[-1], modules[1])):
        own = ml.evaluate(module, "sst2", limit=LIMIT)  # the folded module: same function up to rounding
        assert _scores(item, "sst2")["loss"] == pytest.approx(own["loss"], abs=1e-5)
    folded = curve(*modules, "sst2", points=3, limit=LIMIT, space="weights")
    assert folded.space == "weights" and "encoder.layer.0.attention.self.query.weight" in folded.names
    with pytest.raises(ml.MergeLabError, match="space .module. needs adapter modules"):
        curve(modules[0], str(pico("sst2", 0)), "sst2", space="module")


@pytest.mark.parametrize("device", DEVICES)
def test_plane_through_three_checkpoints(pico, device, monkeypatch):
    monkeypatch.setenv("MERGELAB_DEVICE", device)  # the vertices reproduce each model's own scores
    a, b, c = (str(pico("sst2", s)) for s in (0, 1, 4))
    run = plane(a, b, c, "sst2", grid=3, limit=LIMIT, merges=["average"])
    items = list(run)
    vertices = [i for i in items if i["kind"] == "vertex"]
    cells = [i for i in items if i["kind"] == "cell"]
    (average,) = [i for i in items if i["kind"] == "merge"]
    for v, spec in zip(vertices, (a, b, c)):
        assert v["model"] == spec and _scores(v, "sst2") == ml.evaluate(spec, "sst2", limit=LIMIT)
    assert len(cells) == 9 and [(c_["row"], c_["col"]) for c_ in cells][:3] == [(0, 0), (0, 1), (0, 2)]
    frame = run.frame
    assert (average["x"], average["y"]) == pytest.approx(((frame.length + frame.shift) / 3, frame.height / 3), rel=1e-4)
    assert average["off_plane"] < 1e-3 * frame.length
    assert run.summary()["best"]["sst2"]["metric"] == "accuracy"


def test_cli_streams_json_lines(pico, capsys):
    from merging_core.cli import main

    a, b = str(pico("sst2", 0)), str(pico("sst2", 1))
    assert main(["curve", "--a", a, "--b", b, "--task", "sst2", "--points", "3", "--limit", "8", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [line["kind"] for line in lines] == ["point", "point", "point", "summary"]
    assert [line["t"] for line in lines[:3]] == [0.0, 0.5, 1.0]
    assert set(lines[-1]["barriers"]["sst2"]) >= {"loss_barrier", "metric_barrier", "loss_barrier_at"}
    assert main(["curve", "--a", a, "--b", b, "--points", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


# ----------------------------------------------------------------------------------------------------
# progress, Stop and the Bezier bend against the line


def test_every_stage_reports_progress_with_the_time_left(pico):
    a, b = str(pico("sst2", 0)), str(pico("sst2", 1))
    seen = []
    run = curve(a, b, "sst2", points=4, limit=8, merges=["average"], progress=lambda f, d: seen.append((f, d)))
    assert [d for _, d in seen[:2]] == ["loading the checkpoints",
                                        "loading the model for sst2 and tokenizing its dev split"]
    list(run)
    descs = [d for _, d in seen]
    points = [d for d in descs if d.startswith("point ")]
    assert [p.split(" (")[0] for p in points] == ["point 1/4", "point 2/4", "point 3/4", "point 4/4"]
    assert "left" not in points[0] and all(p.endswith(" left") for p in points[1:])  # a rate only after a point
    assert "placing merge 1/1: average" in descs
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_the_bend_reports_every_step_and_a_cancelling_callback_stops_it(pico):
    a, b = str(pico("sst2", 0)), str(pico("sst2", 1))
    options = {"points": 3, "limit": 8, "path": "bezier", "bend_steps": 12, "batch_size": 4}
    seen = []
    run = curve(a, b, "sst2", progress=lambda f, d: seen.append(d), **options)
    bend = next(iter(run))
    steps = [d for d in seen if d.startswith("training the bend: step ")]
    assert [d.split(",")[0] for d in steps] == [f"training the bend: step {k}/12" for k in range(1, 13)]
    assert all("s left" in d for d in steps[1:])
    assert bend["relative_distance"] == pytest.approx(bend["distance_from_midpoint"] / run.distances["l2"])

    calls = []

    def stop_at_step_4(fraction: float, desc: str) -> None:
        calls.append(desc)
        if desc.startswith("training the bend: step 4/"):
            raise ml.progress.Cancelled()

    run = curve(a, b, "sst2", progress=stop_at_step_4, **options)
    trainable = {name: p.requires_grad for name, p in run.rigs[0].model.named_parameters()}
    with pytest.raises(ml.progress.Cancelled):
        list(run)
    assert calls[-1].startswith("training the bend: step 4/12")  # stopped there: nothing after it ran
    assert run.points == [] and run.bend is None
    # the model's trainable flags are put back, as if no training had started
    assert {name: p.requires_grad for name, p in run.rigs[0].model.named_parameters()} == trainable


def _summary(path: str, loss: float, metric: float, **bend) -> dict:
    barriers = {"sst2": {"metric": "accuracy", "n": 200, "loss_barrier": loss, "metric_barrier": metric}}
    return {"path": path, "barriers": barriers, "bend": bend or None}


def test_bend_warnings_only_when_the_bend_is_worse_than_the_line():
    from merging_core.curves import bend_warnings

    line = _summary("line", 0.0, 0.01)
    bend = {"steps": 200, "distance_from_midpoint": 26.6, "distance_between_ends": 2.9, "relative_distance": 26.6 / 2.9}
    worse = bend_warnings(line, _summary("bezier", 0.08, 0.0, **bend))
    assert worse[0] == ("⚠ The Bezier bend (200 steps) has a higher loss barrier (0.0800 vs 0.0000) than the "
                        "straight line on sst2: the bend did not find a better path; try fewer steps or a lower "
                        "learning rate")
    assert "26.6 from the midpoint" in worse[1] and "9.2×" in worse[1] and "(2.9)" in worse[1]
    both = bend_warnings(line, _summary("bezier", 0.08, 0.05, **bend))
    assert "higher loss barrier (0.0800 vs 0.0000) and a higher accuracy barrier (0.0500 vs 0.0100)" in both[0]
    near = {**bend, "distance_from_midpoint": 1.0, "relative_distance": 1.0 / 2.9}
    assert len(bend_warnings(line, _summary("bezier", 0.08, 0.0, **near))) == 1  # no distance warning: it stayed near
    assert bend_warnings(line, _summary("bezier", 0.0, 0.01, **bend)) == []  # equal: no worse
    assert bend_warnings(_summary("line", 0.3, 0.2), _summary("bezier", 0.1, 0.0, **bend)) == []  # better
