"""The Curves tab: the figure's axes while a curve streams, its chord and noise band, the handler's stages,
Limit 0, the Path choices, Stop, and the pair preselected on open."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import pytest

import merging_core as ml
from merging_core.curves import bend_warnings
from views import common, curves_tab, figures

from .conftest import copy_model

SST2 = [("sst2", "accuracy")]


def _point(index: int, t: float, accuracy: float, loss: float, n: int = 200, task: str = "sst2") -> dict:
    scores = {"task": task, "split": "dev", "n": n, "accuracy": accuracy, "loss": loss}
    return {"kind": "point", "index": index, "t": t, "scores": {task: scores}}


def _curve(values: list[tuple[float, float]], path: str = "line", total: int = 26) -> dict:
    """The first len(values) points of a `total`-point curve."""
    return {"path": path, "items": [_point(i, i / (total - 1), acc, loss) for i, (acc, loss) in enumerate(values)]}


def _ranges(figure) -> tuple[list[float], list[float], list[float]]:
    layout = figure.layout
    return list(layout.xaxis.range), list(layout.yaxis.range), list(layout.yaxis2.range)


def test_axes_stay_fixed_while_points_stream_and_never_shrink():
    # A three-example wobble on 200 examples: 0.835 at A, 0.85 at B
    accuracy = [0.835, 0.84, 0.845, 0.84] + [0.845] * 21 + [0.85]
    loss = [0.40, 0.41, 0.43, 0.42] + [0.42] * 21 + [0.39]
    empty = figures.curve_figure([], SST2)
    assert list(empty.layout.xaxis.range) == [-0.02, 1.02]  # fixed from the first frame
    previous = None
    for shown in range(1, 27):
        figure = figures.curve_figure([_curve(list(zip(accuracy, loss))[:shown])], SST2)
        x, metric, loss_axis = _ranges(figure)
        assert x == [-0.02, 1.02] and list(figure.layout.xaxis2.range) == x  # not 0..0.04
        # the metric axis spans at least 10 examples' worth and 0.05, never 0.835..0.85
        assert metric[1] - metric[0] >= max(10 / 200, figures.MIN_SPAN_METRIC)
        assert metric[0] <= min(accuracy[:shown]) and metric[1] >= max(accuracy[:shown])
        assert 0 - 0.01 < metric[0] and metric[1] < 1.01  # never far outside the metric's own bounds
        assert loss_axis[0] <= min(loss[:shown]) and loss_axis[1] >= max(loss[:shown])
        if previous is not None:  # grows when a point falls outside, never shrinks
            for now, before in zip((metric, loss_axis), previous):
                assert now[0] <= before[0] + 1e-12 and now[1] >= before[1] - 1e-12
        previous = (metric, loss_axis)
    assert metric[0] < 0.835 and metric[1] > 0.85  # both ends inside, with padding
    assert figure.layout.annotations[0].text == "sst2 accuracy · 200 dev examples"


def test_a_point_outside_the_range_extends_it():
    low = figures.curve_figure([_curve([(0.9, 0.3), (0.5, 1.2)])], SST2)
    _, metric, loss_axis = _ranges(low)
    assert metric[0] < 0.5 and loss_axis[1] > 1.2


def test_few_examples_span_the_whole_metric_range_and_no_more():
    few = {"path": "line", "items": [_point(0, 0.0, 0.5, 0.7, n=8)]}
    _, metric, _ = _ranges(figures.curve_figure([few], SST2))
    assert metric[0] <= 0.0 and metric[1] >= 1.0 and metric[1] - metric[0] < 1.2  # 10 / 8 is capped at [0, 1]


def test_the_chord_is_in_the_legend_once_and_accuracy_gets_a_noise_band():
    line = {"path": "line", "items": [
        {"kind": "point", "index": i, "t": t, "scores": {
            "sst2": {"split": "dev", "n": 200, "accuracy": acc, "loss": 0.4},
            "cola": {"split": "dev", "n": 100, "mcc": 0.3, "accuracy": 0.7, "loss": 0.6}}}
        for i, (t, acc) in enumerate(((0.0, 0.8), (0.5, 0.7), (1.0, 0.9)))]}
    bezier = {**line, "path": "bezier"}
    figure = figures.curve_figure([line, bezier], [("sst2", "accuracy"), ("cola", "mcc")])
    chords = [t for t in figure.data if t.name == figures.CHORD]
    assert len(chords) == 4  # the line's chord: 2 tasks x 2 panels (the Bezier curve has the same ends)
    assert sum(bool(t.showlegend) for t in chords) == 1
    assert next(t for t in chords if t.showlegend).legendgroup == "chord"
    (band,) = [t for t in figure.data if t.fill == "toself"]  # accuracy only: not MCC, not the loss
    se = math.sqrt(0.8 * 0.2 / 200)
    assert band.y[0] == pytest.approx(0.8 + se) and band.y[-1] == pytest.approx(0.8 - se)
    assert band.showlegend and "n = 200" in band.name
    assert figure.layout.annotations[0].text == "sst2 accuracy (200 dev) · cola mcc (100 dev)"
    # a curve still streaming has no chord yet
    partial = figures.curve_figure([_curve([(0.8, 0.4), (0.7, 0.5)])], SST2)
    assert not [t for t in partial.data if t.name == figures.CHORD]


def test_a_language_models_loss_is_named_by_its_scores():
    """The panel titles and hover texts say which loss a text task's curve shows: next-token loss for a causal
    LM, MLM loss for a masked LM (the token count in the scores says which); a classifier's stays "loss"."""
    def text_curve(counted: str) -> dict:
        return {"path": "line", "items": [{"kind": "point", "index": i, "t": t, "scores": {"wikitext2": {
            "split": "dev", "n": 8, "loss": 4.0 + t, "perplexity": math.exp(4.0 + t), counted: 100}}}
            for i, t in enumerate((0.0, 1.0))]}

    for counted, name in (("predicted_tokens", "next-token loss"), ("masked_tokens", "MLM loss")):
        figure = figures.curve_figure([text_curve(counted)], [("wikitext2", "loss")])
        assert figure.layout.annotations[0].text == f"{name} · 8 dev examples"  # one panel: the loss is the metric
        assert f"wikitext2 {name}: " in next(t for t in figure.data if t.name == "wikitext2 (line)").hovertemplate
    classifier = figures.curve_figure([_curve([(0.8, 0.4), (0.7, 0.5)])], SST2)
    assert [a.text for a in classifier.layout.annotations][-1] == "loss"


def test_limit_zero_empty_or_nan_means_all():
    from views.common import all_or

    assert [all_or(v, "limit") for v in (0, None, float("nan"), 0.0, float("inf"), "")] == [None] * 6
    assert all_or(8, "limit") == 8 and all_or(8.0, "limit") == 8
    with pytest.raises(ml.MergeLabError, match="0 for all"):
        all_or(-2, "limit")


def test_the_path_control_takes_bezier_as_line_and_bezier():
    import gradio as gr

    with gr.Blocks():
        path = curves_tab.PathRadio(["line", curves_tab.BOTH], value="line", label="Path")
    assert path.get_block_name() == "radio"  # drawn by the browser's radio component
    assert path.preprocess("bezier") == curves_tab.BOTH and path.preprocess("line") == "line"
    with pytest.raises(gr.Error, match="Path: .*not in the list of choices"):
        path.preprocess("zigzag")
    assert curves_tab.WALKS["bezier"] == curves_tab.WALKS[curves_tab.BOTH] == ("line", "bezier")


@pytest.fixture()
def two_seeds(app_home, pico):
    """app_home's pico-sst2 and a second SST-2 seed: a "same task, different seeds" pair."""
    entry = copy_model(pico("sst2", seed=5), app_home / "zoo" / "pico-sst2-b")
    (entry / "mergelab.json").write_text(json.dumps({"task": "sst2", "kind": "full", "seed": 1, "steps": 0}))
    return app_home


def _strings(outputs: list[tuple]) -> list[str]:
    return [o[2] for o in outputs if isinstance(o[2], str)]


def test_limit_zero_scores_the_whole_split(two_seeds):
    outputs = list(curves_tab.run_curve("pico-sst2", "pico-sst2-b", ["sst2"], 2, "line", 0, "", "", [], 10))
    figure, summary, status, _ = outputs[-1]
    full = ml.Evaluator("sst2", ml.models.load_tokenizer(ml.resolve("pico-sst2")), "dev").n
    assert status.startswith("Done in") and "full split" in status
    assert f"sst2 ({full} dev examples)" in summary
    assert figure.layout.annotations[0].text == f"sst2 accuracy · {full} dev examples"


def test_bezier_runs_after_the_line_with_stages_and_the_engines_warnings(two_seeds):
    outputs = list(curves_tab.run_curve("pico-sst2", "pico-sst2-b", ["sst2"], 3, "bezier", 8, "", "", [], 10))
    statuses = _strings(outputs)
    assert statuses[0] == "Loading the checkpoints…" and statuses[1] == "line: loading the checkpoints"
    figure, summary, status, files = outputs[-1]
    names = [t.name for t in figure.data if t.name and t.name.startswith("sst2")]
    assert names.index("sst2 (line)") < names.index("sst2 (bezier)")  # the line first, then the bend
    assert "| line | sst2 |" in summary and "| bezier | sst2 |" in summary and "the distance between A and B" in summary
    saved = json.loads(Path(next(f for f in files if f.endswith(".json"))).read_text())
    line, bezier = saved["summaries"]
    assert (line["path"], bezier["path"]) == ("line", "bezier")
    warnings = bend_warnings(line, bezier)
    for warning in warnings:  # the engine's verdict, in the summary and the final status
        assert warning in summary and warning in status
    if not warnings:
        assert "⚠" not in summary and "⚠" not in status


def test_the_status_follows_a_long_step_and_closing_stops_the_worker():
    finished = threading.Event()
    steps = []

    def work(progress):
        try:
            for step in range(200):
                steps.append(step)
                progress(step / 200, f"training the bend: step {step + 1}/200")
                time.sleep(0.02)
                if step == 60:
                    yield "item", "first"
        finally:
            finished.set()

    stream = common.in_background(work, lambda fraction, desc: None, every=0.1)
    seen = []
    for event, value in stream:
        seen.append((event, value))
        if event == "item":
            break
    # statuses arrived while the worker ran, before its first item
    assert [v for e, v in seen if e == "status"] and seen[-1] == ("item", "first")
    stream.close()  # the event was cancelled: the worker stops at its next progress report
    assert finished.wait(5) and len(steps) < 200


def test_a_stop_in_the_progress_callback_ends_the_curve(two_seeds):
    def report(fraction: float, desc: str) -> None:
        if desc.startswith("training the bend: step 3/"):
            raise ml.progress.Cancelled()

    spec = ml.CurveSpec(("pico-sst2", "pico-sst2-b"), ("sst2",), points=3, limit=8, path="bezier", bend_steps=50)
    seen = []
    with pytest.raises(ml.progress.Cancelled):
        for event in common.in_background(lambda relay: curves_tab._walk(spec, relay), report, every=0.01):
            seen.append(event)  # kept one by one: the stream ends in the exception
    assert not [e for e in seen if e[0] == "item"]  # stopped inside the bend's training, before any point


def test_opening_the_tab_preselects_a_pair_of_seeds(two_seeds, pico):
    entry = copy_model(pico("cola", seed=1), two_seeds / "zoo" / "pico-cola")
    (entry / "mergelab.json").write_text(json.dumps({"task": "cola", "kind": "full", "seed": 1, "steps": 0}))
    pair, a, b, c, _, base, tasks = curves_tab.refresh("", None)
    chosen = json.loads(pair.constructor_args["value"])
    assert chosen["kind"] == "same task, different seeds"
    assert (a.constructor_args["value"], b.constructor_args["value"]) == ("pico-sst2", "pico-sst2-b")
    # the tasks come with their choices (the pair's), never as a value the previous choices may lack
    assert tasks.constructor_args["value"] == ["sst2"]
    assert "sst2" in [name for _, name in tasks.constructor_args["choices"]]
    assert "pico-cola" in [name for _, name in c.constructor_args["choices"]]  # (label, name) pairs
    assert ("(none)", "") in base.constructor_args["choices"]
    # A or B already picked: the choices refresh, the picks stay
    pair, a, b, *_ = curves_tab.refresh("pico-cola", "")
    assert all("value" not in u.constructor_args for u in (pair, a, b))


def test_task_pickers_show_titles_and_send_ids(app_home):
    import gradio as gr

    with gr.Blocks() as demo:
        curves_tab.build(demo)
    tasks = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "curve-tasks")
    plane = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "plane-task")
    limit = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "curve-limit")
    for control in (tasks, plane):
        assert ("SST-2", "sst2") in control.choices and not any(v == "corpus" for _, v in control.choices)
    assert limit.minimum == 0 and limit.preprocess(0) == 0 and "0 = all" in limit.info
