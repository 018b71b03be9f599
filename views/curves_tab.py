"""Curves tab: loss and scores along a path between two checkpoints (mode connectivity), streamed live,
with distances and barriers beside the plot, merges placed on the path, and the plane through three
checkpoints as a heatmap. Every run is one engine call (`merging_core.curve` / `merging_core.plane`).

"Knowledge along the path" runs one more line curve with per-example recording on (`CurveSpec(examples=
True)`; Qin et al. 2022, arXiv:2210.14102, how task knowledge changes along the path): which examples
each point answers correctly, drawn as a heatmap of the examples that flip, with the most-forgotten
examples' texts. On the training examples of
a checkpoint's data map (Swayamdipta et al. 2020, arXiv:2009.10795) it also draws the map and relates
forgetting to confidence and variability.

A Bezier curve is always walked after the straight line, so there is a line to compare it with; the
engine's `bend_warnings` says when the trained bend ends with the higher barrier. The engine runs in a
worker thread so that the status line follows every stage (loading, each bend training step, each
point, with the time left) while a long step runs; Stop ends it at its next progress report."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

import merging_core as ml
from merging_core import cartography
from merging_core.curves import CurveSpec, PlaneSpec, bend_warnings

from . import controls as ui
from . import figures
from . import start
from .common import (PICKER, all_or, engine_errors, in_background, model_choices, on_open, on_stop, progress_fn,
                     scorable_tasks, stop_button, task_choices, task_update, whole)
from .session import redact, session

BOTH = "line + bezier"
# Path choice -> the paths walked, in order: a Bezier curve always comes with the line, drawn first
# ("bezier" alone is what API callers sent before; it gets the line too).
WALKS = {"line": ("line",), BOTH: ("line", "bezier"), "bezier": ("line", "bezier")}
PREFERRED_PAIR = "same task, different seeds"  # the pair preselected for a newcomer
DEFAULT_LIMIT = 200
NONE = ("(none)", "")
# Engine inputs named in errors -> this tab's control labels.
LABELS = {"models": "Checkpoints (A, B, C)", "tasks": "Tasks", "points": "Points", "limit": "Limit",
          "head_from": "Head from", "base": "Base model", "merges": "Merges to place on the line", "path": "Path",
          "bend_steps": "Bezier bend steps", "grid": "Grid points per axis", "space": "Space",
          "split": "Examples", "datamap": "Examples"}
# The per-example view's example sets: a split, or the training examples of A's or B's data map.
EXAMPLE_SETS = ("dev", "train", "data map of A", "data map of B")
OWN_TASKS = "empty: the checkpoints' own tasks"


def _tasks(tasks: list[str] | None) -> list[tuple[str, str]]:
    """(task, headline metric) of the chosen tasks."""
    return [(ml.get_task(t).name, ml.get_task(t).main_metric) for t in tasks or []]


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def curve_summary(summaries: list[dict]) -> str:
    """Markdown: distances once, then one barrier row per (path, task), heads and notes."""
    if not summaries:
        return ""
    d = summaries[0]["distances"]
    lines = [f"**{summaries[0]['a']} ↔ {summaries[0]['b']}** · {summaries[0]['space']} space",
             "", "| distance | value |", "|---|---|",
             f"| L2 ‖θ_A − θ_B‖ | {_fmt(d['l2'])} |", f"| RMS per parameter | {d['rms']:.3e} |",
             f"| cosine(θ_A, θ_B) | {_fmt(d['cosine'], 6)} |"]
    if d["task_cosine"] is not None:
        lines.append(f"| cosine of task vectors (base {summaries[0]['base']}) | {_fmt(d['task_cosine'])} |")
    lines += ["", "| path | task | loss barrier (at t) | metric barrier (at t) |", "|---|---|---|---|"]
    for s in summaries:
        for task, b in s["barriers"].items():
            lines.append(f"| {s['path']} | {task} | {_fmt(b['loss_barrier'])} ({b['loss_barrier_at']:.2f}) | "
                         f"{b['metric']} {_fmt(b['metric_barrier'])} ({b['metric_barrier_at']:.2f}) |")
    counts = {f"{task} ({b['n']} {s['split']} examples)" for s in summaries for task, b in s["barriers"].items()
              if b.get("n")}
    if counts:
        lines += ["", f"Scored on: {', '.join(sorted(counts))}."]
    warnings = _warnings(summaries)
    if warnings:
        lines += ["", *[f"**{w}.**" for w in warnings]]
    heads = "; ".join(f"{task}: {how}" for task, how in summaries[0]["heads"].items())
    lines += ["", f"Heads: {heads}."]
    for s in summaries:
        if s.get("bend"):
            lines += ["", _bend_line(s["bend"])]
    lines += [f"Note: {n}" for n in summaries[0]["notes"]]
    return "\n".join(lines)


def _bend_line(bend: dict) -> str:
    """How the bend trained and how far it moved, beside the distance between the checkpoints."""
    text = (f"Bezier bend: {bend['steps']} steps on {bend['task']} train (learning rate {bend['lr']:g}), loss "
            f"{bend['train_loss_first']:.3f} → {bend['train_loss_last']:.3f}; it moved "
            f"{bend['distance_from_midpoint']:.3g} from the midpoint")
    if bend.get("relative_distance") is not None:
        text += (f", {bend['relative_distance']:.2g}× the distance between A and B "
                 f"({bend['distance_between_ends']:.3g}); the curve's middle lies half that far off the line")
    return text + f" ({bend['seconds']} s)."


def _warnings(summaries: list[dict]) -> list[str]:
    """The engine's warnings on a Bezier curve walked after the line."""
    line = next((s for s in summaries if s["path"] == "line"), None)
    bezier = next((s for s in summaries if s["path"] == "bezier"), None)
    return bend_warnings(line, bezier) if line and bezier else []


def export(curves: list[dict], summaries: list[dict], visitor) -> list[str]:
    """The points as CSV (one row per path, point and task) and everything as JSON, in the session's
    download folder (no server paths in public mode)."""
    rows = []
    for c in curves:
        for item in c["items"]:
            if item["kind"] not in ("point", "merge"):
                continue
            for task, scores in item["scores"].items():
                rows.append({"path": c["path"], "kind": item["kind"], "method": item.get("method", ""), "t": item["t"],
                             "task": task, **{k: v for k, v in scores.items() if k not in ("task", "split")}})
    folder = visitor.downloads()
    stem = redact(f"curve-{Path(summaries[0]['a']).name}-{Path(summaries[0]['b']).name}")
    csv, js = folder / f"{stem}.csv", folder / f"{stem}.json"
    pd.DataFrame(rows).to_csv(csv, index=False)
    js.write_text(redact(json.dumps({"curves": curves, "summaries": summaries}, indent=1)))
    return [str(csv), str(js)]


@engine_errors(labels=LABELS)
def run_curve(a: str, b: str, tasks: list[str] | None, points: float, path: str, limit: float | None,
              head_from: str | None, base: str | None, merges: list[str] | None, bend_steps: float,
              request: gr.Request = None, progress: gr.Progress = gr.Progress()):
    """Stream the curve(s): yields (figure, summary markdown, status, files). The status follows every stage."""
    visitor = session(request)
    ends = (visitor.model(a), visitor.model(b))
    if not all(ends):
        raise ml.MergeLabError("pick two checkpoints, A and B (or a suggested pair)", param="models")
    if path not in WALKS:
        raise ml.MergeLabError(f"path must be one of {[k for k in WALKS if k != 'bezier']}, got {path!r}",
                               param="path")
    kinds = WALKS[path]
    report = progress_fn(progress, request)
    # checked now and named by their own controls (the engine reads them only when a task needs one)
    optional = {name: visitor.model(value, name) or None for name, value in (("head_from", head_from), ("base", base))}
    spec = CurveSpec(ends, tuple(tasks or ()),
                     points=visitor.bound("points", whole(points, "points"), "points"),
                     limit=visitor.bound("examples", all_or(limit, "limit"), "limit"), merges=tuple(merges or ()),
                     bend_steps=visitor.bound("bend_steps", whole(bend_steps, "bend_steps"), "bend_steps"), **optional)
    curves, summaries = [], []
    shown = _tasks(tasks)
    yield figures.curve_figure([], shown), "", "Loading the checkpoints…", None
    for n, kind in enumerate(kinds):
        part = ml.progress.scaled(report, n / len(kinds), (n + 1) / len(kinds), f"{kind}: ")
        run_spec = replace(spec, path=kind, merges=spec.merges if n == 0 else ())
        current = {"path": kind, "items": []}
        for event, value in in_background(lambda relay, run_spec=run_spec: _walk(run_spec, relay), part):
            if event == "status":
                yield gr.skip(), gr.skip(), f"{kind}: {value}", gr.skip()
            elif event == "tasks":
                shown = value
                curves.append(current)
            elif event == "item":
                current["items"].append(value)
                yield figures.curve_figure(curves, shown), redact(curve_summary(summaries)), gr.skip(), None
            else:
                summaries.append(value)
    scope = f"first {spec.limit} examples" if spec.limit else "full split"
    done = " ".join([f"Done in {sum(s['seconds'] for s in summaries):.1f} s ({scope} of each task's dev set).",
                     *[f"{w}." for w in _warnings(summaries)]])
    yield (figures.curve_figure(curves, shown), redact(curve_summary(summaries)), done,
           export(curves, summaries, visitor))


def _walk(spec: CurveSpec, progress: ml.progress.ProgressFn) -> Iterator[tuple[str, Any]]:
    """One curve, as events: ("tasks", [(task, metric)]) once it is set up, ("item", item) per point,
    bend or merge, ("summary", summary) at the end."""
    run = ml.curve(spec, progress=progress)
    yield "tasks", [(r.spec.name, r.spec.main_metric) for r in run.rigs]
    for item in run:
        yield "item", item
    yield "summary", run.summary()


def plane_view(plane: dict | None, show: str):
    """The plane's heatmap from its stored points: the task's headline metric or its loss."""
    if not plane or not plane.get("items"):
        return gr.skip()
    spec = ml.get_task(plane["task"])
    key = "loss" if show == "loss" else spec.main_metric
    return figures.plane_figure(plane["items"], spec.name, key, plane["labels"])


@engine_errors(labels=LABELS)
def run_plane(a: str, b: str, c: str, task: str, grid: float, limit: float | None, merges: list[str] | None,
              base: str | None, show: str, request: gr.Request = None, progress: gr.Progress = gr.Progress()):
    """Stream the plane's heatmap: yields (figure, status, the points kept for redrawing)."""
    visitor = session(request)
    corners = tuple(visitor.model(m) for m in (a, b, c))
    if not all(corners):
        raise ml.MergeLabError("pick three checkpoints, A, B and C, for a plane", param="models")
    if not task:
        raise ml.MergeLabError("pick the task whose scores the plane shows", param="tasks")
    run = ml.plane(PlaneSpec(corners, (task,), grid=visitor.bound("grid", whole(grid, "grid"), "grid"),
                             limit=visitor.bound("examples", all_or(limit, "limit"), "limit"), merges=tuple(merges or ()),
                             base=visitor.model(base, "base") or None),
                   progress=progress_fn(progress, request))
    spec = ml.get_task(task)
    plane = {"task": spec.name, "items": [],
             "labels": {spec_: f"{letter}: {name.strip()}" for spec_, letter, name in zip(run.specs, "ABC", (a, b, c))}}
    for item in run:
        plane["items"].append(item)
        if item["kind"] != "cell" or item["col"] == len(run.xs) - 1:  # redraw per row, not per cell
            yield plane_view(plane, show), f"{len(plane['items'])} points scored…", plane
    best = run.summary()["best"][spec.name]
    yield (plane_view(plane, show), f"Done in {run.seconds:.1f} s. Best {best['metric']} on the grid: "
           f"{best['value']:.4f} at (x {best['x']:.2f}, y {best['y']:.2f}).", plane)


def knowledge_summary(entry: dict, others: list[str] | None = None) -> str:
    """Markdown: what flips along the path, what is forgotten at the barrier, and, on a data map's
    examples, how the forgotten examples sit on the map."""
    share = entry["forgotten_at_barrier_share"]
    ever = entry["forgotten_ever_share"]
    top = entry["top_decile_share"]
    lines = [f"**{entry['task']}**, {entry['examples']} {entry['split']} examples, {entry['points']} points.", "",
             "| | examples |", "|---|---|",
             f"| flip somewhere along the path | {len(entry['flips'])} |",
             f"| right at both ends | {entry['known_both']} |",
             (f"| … wrong at the barrier (t = {entry['barrier_t']:.2f}) | {entry['forgotten_at_barrier']} "
              f"({'–' if share is None else f'{share:.1%}'}) |"),
             f"| … wrong at some point | {entry['forgotten_ever']} ({'–' if ever is None else f'{ever:.1%}'}) |"]
    if top is not None:
        lines += ["", (f"The most-forgotten tenth of the examples right at both ends bears {top:.0%} of all "
                       f"{entry['forget_events']} (example, point) forgettings.")]
    relation = entry.get("datamap")
    if relation and relation.get("shared"):
        lines += ["", f"**Against the data map of {relation['model']}** ({relation['shared']} examples on both):", "",
                  "| examples | n | confidence | variability | correctness | ambiguous | hard |",
                  "|---|---|---|---|---|---|---|"]
        for key, name in (("forgotten", "forgotten along the path"), ("forgotten_at_barrier", "… at the barrier"),
                          ("kept", "kept all along"), ("lost_to_b", "right at A, wrong at B"), ("all", "all")):
            g = relation[key]
            regions = relation["regions"][key]
            lines.append(f"| {name} | {g['n']} | {_fmt(g['confidence'], 3)} | {_fmt(g['variability'], 3)} | "
                         f"{_fmt(g['correctness'], 3)} | {_fmt(regions.get('ambiguous'), 2)} | "
                         f"{_fmt(regions.get('hard'), 2)} |")
        lines += ["", (f"Spearman of the point of first loss with confidence: "
                       f"{_fmt(relation['spearman_first_loss_confidence'], 3)}, with variability: "
                       f"{_fmt(relation['spearman_first_loss_variability'], 3)}; of the number of points forgotten "
                       f"with confidence: {_fmt(relation['spearman_points_forgotten_confidence'], 3)}, with "
                       f"variability: {_fmt(relation['spearman_points_forgotten_variability'], 3)}; of the point "
                       f"where an example right at A but wrong at B is lost with confidence: "
                       f"{_fmt(relation.get('spearman_first_loss_confidence_lost_to_b'), 3)}, with variability: "
                       f"{_fmt(relation.get('spearman_first_loss_variability_lost_to_b'), 3)}.")]
    elif relation:
        lines += ["", f"Data map of {relation['model']}: {relation.get('note', 'no shared examples')}."]
    if others:
        lines += ["", f"Also recorded (in the JSON download): {', '.join(others)}."]
    return "\n".join(lines)


def forgotten_table(entry: dict, datamap: cartography.DataMap | None = None) -> pd.DataFrame:
    """The most-forgotten examples: text fields, gold label, points forgotten, first loss (and, on a data
    map's examples, their confidence and variability)."""
    values = {r["index"]: r for r in datamap.table()} if datamap is not None else {}
    rows = []
    for m in entry["most_forgotten"]:
        row = {k: v for k, v in m.items() if k not in ("index", "first_lost", "example")}
        row = {"example": m["example"], **row,
               "first lost at t": None if m["first_lost"] is None else round(entry["ts"][m["first_lost"]], 3)}
        if m["example"] in values:
            row["confidence"] = round(values[m["example"]]["confidence"], 3)
            row["variability"] = round(values[m["example"]]["variability"], 3)
        rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else ["example", "points_forgotten", "first lost at t"])


def _datamap_model(choice: str, a: str, b: str) -> str | None:
    return a if choice == "data map of A" else b if choice == "data map of B" else None


@engine_errors(labels=LABELS)
def run_knowledge(a: str, b: str, tasks: list[str] | None, points: float, limit: float | None,
                  head_from: str | None, base: str | None, examples: str, request: gr.Request = None,
                  progress: gr.Progress = gr.Progress()):
    """Stream the per-example curve: yields (knowledge figure, summary markdown, most-forgotten table, data map
    figure, status, files)."""
    visitor = session(request)
    ends = (visitor.model(a), visitor.model(b))
    if not all(ends):
        raise ml.MergeLabError("pick two checkpoints, A and B (or a suggested pair)", param="models")
    if examples not in EXAMPLE_SETS:
        raise ml.MergeLabError(f"examples must be one of {list(EXAMPLE_SETS)}, got {examples!r}", param="split")
    datamap_model = _datamap_model(examples, *ends)
    optional = {name: visitor.model(value, name) or None for name, value in (("head_from", head_from), ("base", base))}
    spec = CurveSpec(ends, tuple(tasks or ()), points=visitor.bound("points", whole(points, "points"), "points"),
                     limit=visitor.bound("examples", all_or(limit, "limit"), "limit"), examples=True,
                     split="dev" if examples == "dev" else "train", datamap=datamap_model, **optional)
    summary = None
    yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), "Loading the checkpoints…", None
    for event, value in in_background(lambda relay: _walk(spec, relay), progress_fn(progress, request)):
        if event == "status":
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), value, gr.skip()
        elif event == "summary":
            summary = value
    found = summary.get("knowledge", {}) if summary else {}
    if not found:
        raise ml.MergeLabError("none of the tasks is a classification task: per-example knowledge needs a gold label "
                               "per example", param="tasks")
    task, entry = next(iter(found.items()))
    # the data map drawn: the one the curve was scored on, else A's or B's when they have one
    owner = datamap_model or next((m for m in ends if cartography.read(m) is not None), None)
    shown = cartography.read(owner) if owner else None
    datamap_plot = gr.skip()
    if shown is not None and shown.task == task:
        marked = {}
        if entry.get("datamap"):
            right = {i for i, row in zip(entry["indices"], entry["matrix"]) if row[0] and row[-1]}
            lost = {entry["indices"][f["index"]] for f in entry["flips"]}
            marked = {i: "forgotten along the path" for i in right & lost}
            marked.update({i: "right at A, wrong at B" for i, row in zip(entry["indices"], entry["matrix"])
                           if row[0] and not row[-1]})
        datamap_plot = figures.datamap_figure(shown.table(), redact(f"Data map of {Path(owner).name} ({task}, "
                                                                    f"{len(shown.indices)} training examples, "
                                                                    f"{len(shown.steps)} records)"), marked)
    folder = visitor.downloads()
    out = folder / redact(f"knowledge-{Path(ends[0]).name}-{Path(ends[1]).name}.json")
    out.write_text(redact(json.dumps(found)))
    done = (f"Done in {summary['seconds']:.1f} s: {len(entry['flips'])} of {entry['examples']} {task} "
            f"{entry['split']} examples flip along the path.")
    yield (figures.knowledge_figure(entry), redact(knowledge_summary(entry, [t for t in found if t != task])),
           forgotten_table(entry, shown if entry.get("datamap") else None), datamap_plot, done, [str(out)])


def merge_choices() -> list[tuple[str, str]]:
    """Every registered merge method, by title (the registry is the only list of methods)."""
    return [(m.title, name) for name, m in ml.METHODS.items()]


def pair_choices() -> list[tuple[str, str]]:
    return [(p["label"], json.dumps(p)) for p in ml.zoo.pairs()]


def preferred_pair() -> dict | None:
    """The pair to preselect: the first of two seeds of one task, else the first pair (None: no pairs)."""
    found = ml.zoo.pairs()
    return next((p for p in found if p["kind"] == PREFERRED_PAIR), found[0] if found else None)


def pick_pair(choice: str | None):
    if not choice:
        return gr.skip(), gr.skip(), gr.skip()
    pair = json.loads(choice)
    return pair["a"], pair["b"], pair["tasks"]


def refresh(a: str | None = None, b: str | None = None, request: gr.Request = None) -> tuple:
    """On page load and when the tab opens: the zoo may have grown, and the session may have results.
    With A and B empty, the preferred suggested pair is picked, so "Run curve" works straight away.
    Returns updates of (pair, A, B, C, head from, base, tasks)."""
    choices = model_choices(request)
    pairs = pair_choices()
    pick = preferred_pair() if not (a or "").strip() and not (b or "").strip() else None
    if pick is None:
        return (gr.Dropdown(choices=pairs), gr.Dropdown(choices=choices), gr.Dropdown(choices=choices),
                gr.Dropdown(choices=choices), gr.Dropdown(choices=[NONE, *choices]),
                gr.Dropdown(choices=[NONE, *choices]), gr.skip())
    return (gr.Dropdown(choices=pairs, value=json.dumps(pick)), gr.Dropdown(choices=choices, value=pick["a"]),
            gr.Dropdown(choices=choices, value=pick["b"]), gr.Dropdown(choices=choices),
            gr.Dropdown(choices=[NONE, *choices]), gr.Dropdown(choices=[NONE, *choices]),
            # the pair's tasks with the choices they belong to, in one update: a value sent alone can meet the
            # choices of the previous pick, and the next event that reads it fails "not in the list of choices"
            task_update([pick["a"], pick["b"]], list(pick["tasks"]), "", request, preferred=list(pick["tasks"]),
                        always=OWN_TASKS))


def pick_tasks(a: str | None, b: str | None, head_from: str | None, tasks: list[str] | None,
               request: gr.Request = None) -> gr.CheckboxGroup:
    """The tasks A, B or the head donor can be scored on (a path scores a task with any one's fitting head)."""
    return task_update([a, b, head_from], tasks, "", request, always=OWN_TASKS)


def pick_plane_task(a: str | None, b: str | None, c: str | None, task: str | None,
                    request: gr.Request = None) -> gr.Dropdown:
    """The plane's task picker: the tasks A, B or C can be scored on; the pick stays while it is one."""
    offered, _ = scorable_tasks([a, b, c], request)
    choices = task_choices(only=offered)
    return gr.Dropdown(choices=choices, value=task if task in [v for _, v in choices] else None)


class PathRadio(ui.Radio):
    """The Path control: "line" or "line + bezier"; "bezier" (what API callers sent before) means both."""

    def preprocess(self, payload: Any) -> Any:
        return super().preprocess(BOTH if payload == "bezier" else payload)

    # the browser draws a component by its class name: this one is a plain radio there
    def get_block_name(self) -> str:
        return "radio"

    def get_block_class(self) -> str:
        return "radio"


def build(demo: gr.Blocks) -> dict:
    with gr.Tab("Curves", id="curves") as tab:
        gr.Markdown("Walk the straight line (or a trained Bezier curve) between two checkpoints and watch each "
                    "task's loss and score: a path with no barrier joins the two in one basin (mode connectivity).")
        notice = start.notice(tab, "Curves")
        choices = model_choices()
        with gr.Row():
            pair = ui.Dropdown(pair_choices(), value=None, label="Suggested pair", scale=2, min_width=300,
                               elem_id="curve-pair", elem_classes=PICKER,
                               info="zoo pairs: same task / different seeds, same run / different steps, "
                                    "different data partitions, different tasks")
            a = ui.Dropdown(choices, value=None, allow_custom_value=True, label="A (t = 0)", scale=2, min_width=280,
                            elem_classes=PICKER, elem_id="curve-a")
            b = ui.Dropdown(choices, value=None, allow_custom_value=True, label="B (t = 1)", scale=2, min_width=280,
                            elem_classes=PICKER, elem_id="curve-b")
        with gr.Row(equal_height=True):
            tasks = ui.CheckboxGroup(task_choices(), value=[], label="Tasks", scale=3, elem_id="curve-tasks",
                                     info=OWN_TASKS)
            path = PathRadio(["line", BOTH], value="line", label="Path", scale=1, elem_id="curve-path",
                             info="a Bezier curve trains a bend first, and is drawn beside the line")
        with gr.Row(equal_height=True):
            points = ui.Slider(2, 51, value=26, step=1, label="Points", elem_id="curve-points",
                               info="evenly spaced in t, both ends included")
            limit = ui.Number(value=DEFAULT_LIMIT, precision=0, minimum=0, label="Limit", elem_id="curve-limit",
                              info="first N dev examples per task; 0 = all")
            bend_steps = ui.Slider(10, 1000, value=200, step=10, label="Bezier bend steps",
                                   info="training steps of the bend (Bezier only)")
        with gr.Accordion("Heads, base and merges", open=False):
            with gr.Row():
                head_from = ui.Dropdown([NONE, *choices], value="", allow_custom_value=True, label="Head from",
                                        elem_classes=PICKER,
                                        info="score tasks neither checkpoint has a head for with this model's "
                                             "head (e.g. mlm-head for wikitext2)")
                base = ui.Dropdown([NONE, *choices], value="", allow_custom_value=True, label="Base model",
                                   elem_classes=PICKER,
                                   info="for the task-vector cosine and task-vector merges; default: the "
                                        "checkpoints' recorded base")
            merges = ui.CheckboxGroup(merge_choices(), value=[], label="Merges to place on the line",
                                      elem_id="curve-merges",
                                      info="each merge of A and B is scored and drawn at its projection on the line")
        with gr.Row():
            run = gr.Button("Run curve", variant="primary", elem_id="curve-run")
            halt = stop_button("curve-stop")
        status = gr.Markdown(elem_id="curve-status")
        with gr.Row(equal_height=False):
            plot = gr.Plot(label="Along the path", elem_id="curve-plot", scale=3, min_width=560)
            with gr.Column(scale=2, min_width=380):
                summary = gr.Markdown(elem_id="curve-summary")
        files = gr.File(file_count="multiple", label="Download (CSV, JSON)", interactive=False, elem_id="curve-files")

        with gr.Accordion("Knowledge along the path (per example)", open=False, elem_id="knowledge-box"):
            gr.Markdown("Which examples each point of the line answers correctly (classification tasks): the "
                        "examples that flip, those forgotten at the barrier although both ends know them, and the "
                        "most-forgotten ones. On the training examples of a checkpoint's data map (fine-tuned with "
                        "cartography on), the map is drawn with the forgotten examples marked.")
            with gr.Row(equal_height=True):
                example_set = ui.Radio(list(EXAMPLE_SETS), value="dev", label="Examples", elem_id="knowledge-examples",
                                       info="a split (first Limit examples), or the training examples of A's or "
                                            "B's data map")
                knowledge_run = gr.Button("Run per-example curve", elem_id="knowledge-run", scale=0)
                knowledge_halt = stop_button("knowledge-stop")
            knowledge_status = gr.Markdown(elem_id="knowledge-status")
            with gr.Row(equal_height=False):
                knowledge_plot = gr.Plot(label="Examples along the path", elem_id="knowledge-plot", scale=3,
                                         min_width=560)
                with gr.Column(scale=2, min_width=380):
                    knowledge_md = gr.Markdown(elem_id="knowledge-summary")
            forgotten = gr.Dataframe(label="Most-forgotten examples (right at both ends)", interactive=False,
                                     wrap=True, elem_id="knowledge-table")
            datamap_plot = gr.Plot(label="Data map", elem_id="datamap-plot")
            knowledge_files = gr.File(file_count="multiple", label="Download (JSON)", interactive=False,
                                      elem_id="knowledge-files")

        with gr.Accordion("Plane through three checkpoints", open=False, elem_id="plane-box"):
            with gr.Row(equal_height=True):
                c = ui.Dropdown(choices, value=None, allow_custom_value=True, label="C", elem_id="plane-c",
                                elem_classes=PICKER,
                                info="the plane passes through A, B and C")
                plane_task = ui.Dropdown(task_choices(), value=None, label="Task", elem_id="plane-task")
                grid = ui.Slider(3, 15, value=7, step=1, label="Grid points per axis", elem_id="plane-grid")
                show = ui.Radio(["metric", "loss"], value="metric", label="Heatmap of", elem_id="plane-show")
            with gr.Row():
                plane_run = gr.Button("Run plane", elem_id="plane-run")
                plane_halt = stop_button("plane-stop")
            plane_state = gr.State(None)
            plane_status = gr.Markdown(elem_id="plane-status")
            plane_plot = gr.Plot(label="Plane", elem_id="plane-plot")

        pair.change(pick_pair, pair, [a, b, tasks], api_visibility="private")
        # the task pickers follow the picked models (in this browser session; an API caller may name any task)
        for picker in (a, b, head_from):
            picker.change(pick_tasks, [a, b, head_from, tasks], tasks, api_visibility="private",
                          show_progress="hidden")
        for picker in (a, b, c):
            picker.change(pick_plane_task, [a, b, c, plane_task], plane_task, api_visibility="private",
                          show_progress="hidden")
        walking = run.click(run_curve, [a, b, tasks, points, path, limit, head_from, base, merges, bend_steps],
                            [plot, summary, status, files], api_name="curve", concurrency_id="gpu",
                            show_progress_on=status)
        on_stop(halt, [walking], status)
        knowing = knowledge_run.click(run_knowledge, [a, b, tasks, points, limit, head_from, base, example_set],
                                      [knowledge_plot, knowledge_md, forgotten, datamap_plot, knowledge_status,
                                       knowledge_files], api_name="knowledge", concurrency_id="gpu",
                                      show_progress_on=knowledge_status)
        on_stop(knowledge_halt, [knowing], knowledge_status)
        gridding = plane_run.click(run_plane, [a, b, c, plane_task, grid, limit, merges, base, show],
                                   [plane_plot, plane_status, plane_state], api_name="plane", concurrency_id="gpu",
                                   show_progress_on=plane_status)
        on_stop(plane_halt, [gridding], plane_status)
        show.change(plane_view, [plane_state, show], plane_plot, api_visibility="private")
        on_open(demo, tab, refresh, [a, b], [pair, a, b, c, head_from, base, tasks])
        notice.then(refresh, [a, b], [pair, a, b, c, head_from, base, tasks], api_visibility="private",
                    show_progress="hidden")
    return {"plot": plot, "summary": summary}
