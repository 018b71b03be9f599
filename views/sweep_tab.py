"""Sweep tab: sweep or search a merge method's settings on Ray Tune, watch the trials fill a heatmap (or a
line, or parallel coordinates) and a table as they finish, stop, and keep the best point as a merge.

The space starts from the method's sliders, each becoming a range of points (`ranges_from_spec`), in the
engine's grammar (`merging_core.sweep.space`), one setting per line; the visitor edits it. Every button is
one engine call: `/sweep` streams `merging_core.sweep.sweep`, `/sweep_materialize` is
`merging_core.sweep.materialize`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import gradio as gr
import pandas as pd

import merging_core as ml
from merging_core.sweep import ALGORITHMS, SweepSpec, materialize, sweep
from merging_core.sweep.runner import sweeps_dir

from . import controls as ui
from . import figures, start
from .common import PICKER, engine_errors, in_background, model_choices, on_open, on_stop, progress_fn, stop_button
from .merge_tab import method_choices, method_doc
from .session import redact, session

DEFAULT_METHOD = "ties"
POINTS = 3  # points per slider's range in the suggested space
NONE = ("(none)", "")
LABELS = {"models": "Checkpoints", "base": "Base model", "method": "Method", "space": "Space",
          "per_layer": "λ per layer", "algorithm": "Search", "trials": "Trials", "dev_size": "Dev examples",
          "holdout_size": "Held-out examples", "workers": "Workers", "tasks": "Checkpoints (their tasks)",
          "name": "Space", "sweep": "Sweep", "out": "Output name", "address": "Ray cluster"}
SWEEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
META = ("trial", "objective", "error", "point", "finished", "merge_seconds", "eval_seconds", "run", "pid", "node")


def ranges_from_spec(method: str | None) -> str:
    """The method's sliders as ranges: each bounded number from its low to its high in `POINTS` points (λ up
    to 2: its spec allows 3, which is rarely useful), each choice with all its choices; one per line."""
    found = ml.METHODS.get(method or "")
    if found is None:
        return ""
    lines = []
    for p in found.params:
        if p.kind in ("float", "int") and p.low is not None and p.high is not None and p.name != "seed":
            high = min(p.high, 2.0) if p.name == "lambda" else p.high
            low = 0.1 if p.name in ("lambda", "density") and p.low == 0 else p.low
            lines.append(f"{p.name}={low:g}:{high:g}:{POINTS}")
    return "\n".join(lines[:2])  # two dimensions: the heatmap; add or edit lines for more


def _items(text: str | None) -> tuple[str, ...]:
    return tuple(line.strip() for line in (text or "").replace(";", "\n").splitlines() if line.strip())


def _table(rows: list[dict]) -> pd.DataFrame:
    columns = [c for c in dict.fromkeys(k for r in rows for k in r) if c not in ("point", "finished", "run", "pid",
                                                                                 "node")]
    return pd.DataFrame([{c: r.get(c) for c in columns} for r in rows], columns=columns or None).round(4)


def _best(summary: dict | None, rows: list[dict]) -> str:
    scored = [r for r in rows if isinstance(r.get("objective"), float) and r["objective"] == r["objective"]]
    if not scored:
        return ""
    best = (summary or {}).get("best") or max(scored, key=lambda r: r["objective"])
    text = (f"**Best:** {', '.join(f'{k} = {v:.4g}' if isinstance(v, float) else f'{k} = {v}' for k, v in best['point'].items())}"
            f" · objective {best['objective']:.4f}")
    held = (summary or {}).get("holdout")
    if held:
        text += f" · held out ({held['examples']} examples per task): {held['objective']:.4f}"
    return text


def run_sweep(method: str, models: list[str] | None, base: str | None, space: str, per_layer: bool, algorithm: str,
              trials: float, dev_size: float, holdout_size: float, workers: float, request: gr.Request = None,
              progress: gr.Progress = gr.Progress()) -> Iterator[tuple]:
    """Stream a sweep: yields (plot, pareto plot, table, status, best, sweep name) as trials finish."""
    visitor = session(request)
    specs = visitor.models(models)
    spec = SweepSpec(method, tuple(specs), base=visitor.model(base, "base") or None, space=_items(space),
                     per_layer=bool(per_layer), algorithm=algorithm,
                     trials=None if algorithm == "grid" else int(trials), dev_size=int(dev_size),
                     holdout_size=int(holdout_size or 0), workers=int(workers))
    folder = visitor.output("sweeps", spec.key(), "sweep")  # in the session's folder, within its quota (public)
    dims = [d.name for d in spec.dimensions()]
    report = progress_fn(progress, request)
    rows: list[dict] = []
    tasks: list[str] = []
    total = spec.trial_count()
    # a grid's axes are known from the start: its heatmap fills in cell by cell
    axes = {d.name: list(d.values) for d in spec.dimensions()} if algorithm == "grid" else {}
    yield (figures.sweep_figure([], dims, [], axes), gr.update(visible=False), _table([]),
           "Starting Ray and the trials…", "", folder.name)

    def work(relay) -> Iterator[tuple[str, Any]]:
        run = sweep(spec, folder=folder, progress=relay)
        for row in run:
            yield "row", row
        yield "summary", run.summary()

    summary = None
    try:
        for event, value in in_background(work, report):
            if event == "status":
                yield gr.skip(), gr.skip(), gr.skip(), value, gr.skip(), gr.skip()
                continue
            if event == "summary":
                summary = value
                break
            rows.append(value)
            if per_layer:
                dims = [k for k in value["point"]]
            tasks = [k for k in value if k not in META and k not in value["point"] and ":" not in k]
            pareto = (gr.update(value=figures.pareto_figure(rows, tasks), visible=True) if len(tasks) >= 2
                      else gr.update(visible=False))
            yield (figures.sweep_figure(rows, dims, tasks, axes), pareto, _table(rows),
                   f"{len(rows)} of {total} trials finished…", _best(None, rows), gr.skip())
    except ml.progress.Cancelled:  # Stop: the sweep ends after the trials that were running
        yield (gr.skip(), gr.skip(), gr.skip(), f"Stopped after {len(rows)} of {total} trials; Run sweep again with "
               "the same settings resumes it.", gr.skip(), gr.skip())
        return
    done = (f"Done: {summary['finished']} of {summary['trials']} trials in {summary['seconds']:.1f} s"
            + (f" ({summary['errors']} failed)" if summary["errors"] else "") + ".")
    if summary["stats_seconds"]:
        done += f" Statistics computed once: {summary['stats_seconds']:.1f} s."
    yield (figures.sweep_figure(rows, dims, tasks, axes), gr.skip(), _table(rows), done, redact(_best(summary, rows)),
           folder.name)


def materialize_best(name: str | None, out: str | None, request: gr.Request = None) -> str:
    """The best point of the sweep `name` (this session's, in public mode) written as a merge."""
    visitor = session(request)
    target = visitor.output("merges", out, "sweep-best")
    if not name or not isinstance(name, str):
        raise ml.MergeLabError("run a sweep first", param="sweep")
    root = visitor.folder / "sweeps" if visitor.public else sweeps_dir()
    folder = root / name
    if not SWEEP_NAME.fullmatch(name) or not folder.is_dir():  # a name, never a path
        raise ml.MergeLabError(f"no sweep named {' '.join(name.split())[:60]!r} here", param="sweep")
    result = materialize(folder, target)
    return redact(f"Saved {visitor.shown(result.out)} ({result.spec.method}); pick it in any tab, and its "
                  "merge_config.json re-runs it.")


def refresh(request: gr.Request = None) -> tuple:
    choices = model_choices(request)
    return gr.update(choices=choices), gr.update(choices=[NONE, *choices])


def build(demo: gr.Blocks) -> dict:
    with gr.Tab("Sweep", id="sweep") as tab:
        gr.Markdown("Sweep a method's settings (or search them: random, TPE, CMA-ES; λ per layer) on Ray Tune: every "
                    "trial merges in memory and is scored on the first dev examples of each model's task; the "
                    "plot and the table fill in as trials finish. Keep the best point as a merge.")
        notice = start.notice(tab, "Sweep")
        choices = model_choices()
        with gr.Row():
            method = ui.Dropdown(method_choices(), value=DEFAULT_METHOD, label="Method", scale=1, min_width=220,
                                 elem_id="sweep-method")
            models = ui.Dropdown(choices, value=[], multiselect=True, allow_custom_value=True, label="Checkpoints",
                                 scale=3, min_width=320, elem_id="sweep-models", elem_classes=PICKER)
            base = ui.Dropdown([NONE, *choices], value="", allow_custom_value=True, label="Base model", scale=2,
                               min_width=240, elem_id="sweep-base", elem_classes=PICKER,
                               info="for task-vector methods (default: the checkpoints' recorded base)")
        doc = gr.Markdown(method_doc(DEFAULT_METHOD), elem_id="sweep-doc")
        with gr.Row(equal_height=True):
            space = gr.Textbox(ranges_from_spec(DEFAULT_METHOD), lines=3, label="Space", scale=2, elem_id="sweep-space",
                               info="one setting per line: name=low:high:points, name=low:high (a range), "
                                    "name=a,b,c, components=attention+feed_forward,all")
            with gr.Column(scale=1, min_width=260):
                algorithm = ui.Radio(list(ALGORITHMS), value="grid", label="Search", elem_id="sweep-algorithm",
                                     info="grid: every point; random, tpe, cmaes: Trials points")
                per_layer = gr.Checkbox(False, label="λ per layer", elem_id="sweep-per-layer",
                                        info="one λ per transformer block over the λ range (not with grid)")
        with gr.Row(equal_height=True):
            trials = ui.Slider(1, 100, value=20, step=1, label="Trials", elem_id="sweep-trials")
            dev_size = ui.Number(value=100, precision=0, minimum=1, label="Dev examples", elem_id="sweep-dev",
                                 info="the objective is measured on the first N dev examples of each task")
            holdout_size = ui.Number(value=0, precision=0, minimum=0, label="Held-out examples",
                                     elem_id="sweep-holdout", info="the best point is also scored on the N after")
            workers = ui.Slider(1, max(os.cpu_count() or 1, 1), value=min(2, os.cpu_count() or 1), step=1,
                                label="Workers", elem_id="sweep-workers", info="trials at once")
        with gr.Row():
            run = gr.Button("Run sweep", variant="primary", elem_id="sweep-run")
            halt = stop_button("sweep-stop")
        status = gr.Markdown(elem_id="sweep-status")
        best = gr.Markdown(elem_id="sweep-best")
        with gr.Row(equal_height=False):
            plot = gr.Plot(label="Trials", elem_id="sweep-plot", scale=3, min_width=520)
            pareto = gr.Plot(label="Pareto", elem_id="sweep-pareto", scale=2, min_width=380, visible=False)
        table = gr.Dataframe(label="Trials (as they finish)", interactive=False, elem_id="sweep-table")
        name = gr.Textbox(visible=False, elem_id="sweep-name")
        with gr.Row(equal_height=True):
            out = gr.Textbox(label="Output name", placeholder="sweep-best-<time>", scale=2, elem_id="sweep-out")
            keep = gr.Button("Materialize best", elem_id="sweep-materialize", scale=1)
        kept = gr.Markdown(elem_id="sweep-kept")

        method.change(lambda m: (method_doc(m), ranges_from_spec(m)), method, [doc, space], api_visibility="private",
                      show_progress="hidden")
        running = run.click(engine_errors(run_sweep, labels=LABELS),
                            [method, models, base, space, per_layer, algorithm, trials, dev_size, holdout_size,
                             workers], [plot, pareto, table, status, best, name], api_name="sweep",
                            concurrency_id="gpu", show_progress_on=status)
        on_stop(halt, [running], status)
        keep.click(engine_errors(materialize_best, labels=LABELS), [name, out], kept, api_name="sweep_materialize")
        on_open(demo, tab, refresh, None, [models, base])
        notice.then(refresh, None, [models, base], api_visibility="private", show_progress="hidden")
    return {"plot": plot, "table": table}
