"""Curves tab: loss and scores along a path between two checkpoints (mode connectivity), streamed live,
with distances and barriers beside the plot, merges placed on the path, and the plane through three
checkpoints as a heatmap. Every run is one engine call (`merging_core.curve` / `merging_core.plane`)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import gradio as gr
import pandas as pd

import merging_core as ml
from merging_core.curves import CurveSpec, PlaneSpec
from merging_core.paths import PATHS

from . import controls as ui
from . import figures
from .common import engine_errors, model_choices, on_stop, progress_fn, stop_button, whole
from .session import redact, session

BOTH = "line + bezier"
DEFAULT_LIMIT = 200
NONE = ("(none)", "")
# Engine inputs named in errors -> this tab's control labels.
LABELS = {"models": "Checkpoints (A, B, C)", "tasks": "Tasks", "points": "Points", "limit": "Limit",
          "head_from": "Head from", "base": "Base model", "merges": "Merges to place on the line", "path": "Path",
          "bend_steps": "Bezier bend steps", "grid": "Grid points per axis", "space": "Space"}


def _limit(limit: float | None) -> int | None:
    return int(limit) if limit and not math.isnan(limit) else None


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
    heads = "; ".join(f"{task}: {how}" for task, how in summaries[0]["heads"].items())
    lines += ["", f"Heads: {heads}."]
    for s in summaries:
        if s.get("bend"):
            bend = s["bend"]
            lines.append(f"Bezier bend: {bend['steps']} steps on {bend['task']} train, loss "
                         f"{bend['train_loss_first']:.3f} → {bend['train_loss_last']:.3f}, moved "
                         f"{bend['distance_from_midpoint']:.3f} from the midpoint ({bend['seconds']} s).")
    lines += [f"Note: {n}" for n in summaries[0]["notes"]]
    return "\n".join(lines)


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
    """Stream the curve(s): yields (figure, summary markdown, status, files)."""
    visitor = session(request)
    ends = (visitor.model(a), visitor.model(b))
    if not all(ends):
        raise ml.MergeLabError("pick two checkpoints, A and B (or a suggested pair)", param="models")
    kinds = list(PATHS) if path == BOTH else [path]
    report = progress_fn(progress, request)
    # checked now and named by their own controls (the engine reads them only when a task needs one)
    optional = {name: visitor.model(value, name) or None for name, value in (("head_from", head_from), ("base", base))}
    spec = CurveSpec(ends, tuple(tasks or ()),
                     points=visitor.bound("points", whole(points, "points"), "points"),
                     limit=visitor.bound("examples", _limit(limit), "limit"), merges=tuple(merges or ()),
                     bend_steps=visitor.bound("bend_steps", whole(bend_steps, "bend_steps"), "bend_steps"), **optional)
    curves, summaries = [], []
    yield figures.curve_figure([], _tasks(tasks)), "", "Loading the checkpoints…", None
    for n, kind in enumerate(kinds):
        part = ml.progress.scaled(report, n / len(kinds), (n + 1) / len(kinds), f"{kind}: ")
        run = ml.curve(replace(spec, path=kind, merges=spec.merges if n == 0 else ()), progress=part)
        shown = [(r.spec.name, r.spec.main_metric) for r in run.rigs]
        current = {"path": kind, "items": []}
        curves.append(current)
        for item in run:
            current["items"].append(item)
            status = _status(item, kind, spec.points)
            yield figures.curve_figure(curves, shown), redact(curve_summary(summaries)), status, None
        summaries.append(run.summary())
    scope = f"first {spec.limit} examples" if spec.limit else "full split"
    done = f"Done in {sum(s['seconds'] for s in summaries):.1f} s ({scope} of each task's dev set)."
    yield (figures.curve_figure(curves, shown), redact(curve_summary(summaries)), done,
           export(curves, summaries, visitor))


def _status(item: dict, kind: str, points: int) -> str:
    if item["kind"] == "bend":
        return f"Bend trained ({item['steps']} steps); walking the Bezier curve…"
    if item["kind"] == "merge":
        return f"Placed {item['method']} at t = {item['t']:.3f}."
    return f"{kind}: point {item['index'] + 1}/{points} (t = {item['t']:.2f})"


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
                             limit=visitor.bound("examples", _limit(limit), "limit"), merges=tuple(merges or ()),
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


def merge_choices() -> list[tuple[str, str]]:
    """Every registered merge method, by title (the registry is the only list of methods)."""
    return [(m.title, name) for name, m in ml.METHODS.items()]


def pair_choices() -> list[tuple[str, str]]:
    return [(p["label"], json.dumps(p)) for p in ml.zoo.pairs()]


def pick_pair(choice: str | None):
    if not choice:
        return gr.skip(), gr.skip(), gr.skip()
    pair = json.loads(choice)
    return pair["a"], pair["b"], pair["tasks"]


def refresh(request: gr.Request = None) -> tuple:
    """On page load: the zoo may have grown since the app started, and the session may have results."""
    choices = model_choices(request)
    return (gr.Dropdown(choices=pair_choices()), gr.Dropdown(choices=choices), gr.Dropdown(choices=choices),
            gr.Dropdown(choices=choices), gr.Dropdown(choices=[NONE, *choices]))


def build(demo: gr.Blocks) -> dict:
    with gr.Tab("Curves", id="curves"):
        gr.Markdown("Walk the straight line (or a trained Bezier curve) between two checkpoints and watch each "
                    "task's loss and score: a path with no barrier joins the two in one basin (mode connectivity).")
        choices = model_choices()
        with gr.Row():
            pair = ui.Dropdown(pair_choices(), value=None, label="Suggested pair", scale=2, elem_id="curve-pair",
                               info="zoo pairs: same task / different seeds, same run / different steps, "
                                    "different data partitions, different tasks")
            a = ui.Dropdown(choices, value=None, allow_custom_value=True, label="A (t = 0)", scale=1,
                            elem_id="curve-a")
            b = ui.Dropdown(choices, value=None, allow_custom_value=True, label="B (t = 1)", scale=1,
                            elem_id="curve-b")
        with gr.Row(equal_height=True):
            here = ml.data.available_tasks() or list(ml.TASKS)
            tasks = ui.CheckboxGroup(here, value=[], label="Tasks", scale=3, elem_id="curve-tasks",
                                     info="empty: the checkpoints' own tasks")
            path = ui.Radio([*PATHS, BOTH], value="line", label="Path", scale=1, elem_id="curve-path")
        with gr.Row(equal_height=True):
            points = ui.Slider(2, 51, value=26, step=1, label="Points", elem_id="curve-points",
                               info="evenly spaced in t, both ends included")
            limit = ui.Number(value=DEFAULT_LIMIT, precision=0, minimum=1, label="Limit", elem_id="curve-limit",
                              info="first N dev examples per task; empty = all")
            bend_steps = ui.Slider(10, 1000, value=200, step=10, label="Bezier bend steps",
                                   info="training steps of the bend (Bezier only)")
        with gr.Accordion("Heads, base and merges", open=False):
            with gr.Row():
                head_from = ui.Dropdown([NONE, *choices], value="", allow_custom_value=True, label="Head from",
                                        info="score tasks neither checkpoint has a head for with this model's "
                                             "head (e.g. mlm-head for wikitext2)")
                base = ui.Dropdown([NONE, *choices], value="", allow_custom_value=True, label="Base model",
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

        with gr.Accordion("Plane through three checkpoints", open=False, elem_id="plane-box"):
            with gr.Row(equal_height=True):
                c = ui.Dropdown(choices, value=None, allow_custom_value=True, label="C", elem_id="plane-c",
                                info="the plane passes through A, B and C")
                plane_task = ui.Dropdown(here, value=None, label="Task", elem_id="plane-task")
                grid = ui.Slider(3, 15, value=7, step=1, label="Grid points per axis", elem_id="plane-grid")
                show = ui.Radio(["metric", "loss"], value="metric", label="Heatmap of", elem_id="plane-show")
            with gr.Row():
                plane_run = gr.Button("Run plane", elem_id="plane-run")
                plane_halt = stop_button("plane-stop")
            plane_state = gr.State(None)
            plane_status = gr.Markdown(elem_id="plane-status")
            plane_plot = gr.Plot(label="Plane", elem_id="plane-plot")

        pair.change(pick_pair, pair, [a, b, tasks], api_visibility="private")
        walking = run.click(run_curve, [a, b, tasks, points, path, limit, head_from, base, merges, bend_steps],
                            [plot, summary, status, files], api_name="curve", concurrency_id="gpu",
                            show_progress_on=status)
        on_stop(halt, [walking], status)
        gridding = plane_run.click(run_plane, [a, b, c, plane_task, grid, limit, merges, base, show],
                                   [plane_plot, plane_status, plane_state], api_name="plane", concurrency_id="gpu",
                                   show_progress_on=plane_status)
        on_stop(plane_halt, [gridding], plane_status)
        show.change(plane_view, [plane_state, show], plane_plot, api_visibility="private")
        demo.load(refresh, None, [pair, a, b, c, head_from], api_visibility="private")
    return {"plot": plot, "summary": summary}
