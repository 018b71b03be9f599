"""Merge tab: merge checkpoints with any registered method, save the result, and score it next to the
individual models and their ensemble.

The method's parameter controls are generated from its typed spec (`merging_core.available_methods()`)
by `@gr.render`, and copied into one hidden JSON component (`params`) in the browser whenever one of
them changes; the `/merge` endpoint takes that dict, so API callers pass `{"lambda": 0.3}` and the
engine checks it (`Method.parse`). No tensor math here: counting and medians over the engine's report
(plain floats) are the most this module computes.
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import gradio as gr
import pandas as pd

import merging_core as ml
from merging_core.arch import GROUPS
from merging_core.params import parse_assignments
from merging_core.progress import scaled
from merging_core.spec import FALLBACKS, HEAD_POLICIES, MERGE_SPACES, MergeSpec
from merging_core.tensorio import OUTPUT_DTYPES

from . import controls as ui
from . import start
from .common import (PICKER, all_or, engine_errors, model_choices, models_info, multitask_choices, on_open, on_stop,
                     progress_fn, stop_button)
from .session import Session, redact, session

DEFAULT_METHOD = "average"
DEFAULT_LIMIT = 200
NONE = ("(none)", "")
ROW_KEYS = ("model", "kind", "subset", "subsets", "mean")
# Slider for a bounded number whose range has at most this many integer steps (else a number box).
MAX_INT_SLIDER = 1000
PER_ROW = 3  # parameter controls per row (they wrap on narrow screens)
TOP_RESIDUALS = 12  # solved parameters listed under a MaTS merge (worst first)
# Engine inputs named in errors -> this tab's control labels (a method's parameters keep their names).
LABELS = {"models": "Checkpoints", "base": "Base model", "method": "Method", "params": "Parameters",
          "components": "Components", "fallback": "Fallback", "heads": "Heads", "out": "Output folder",
          "space": "Adapter modules",
          "stats_tasks": "Checkpoints (each needs a recorded task)", "limit": "Limit", "multitask": "Multi-task model",
          "dtype": "Output dtype", "shard_size": "Shard size"}
INPUTS_DTYPE = ("the inputs'", "")  # the output dtype choice that keeps the checkpoints' own


# ----------------------------------------------------------------------------------------------------
# method registry -> controls


def methods() -> dict[str, dict]:
    return {m["name"]: m for m in ml.available_methods()}


def method_choices() -> list[tuple[str, str]]:
    return [(f"{m['title']} · {m['family']}", name) for name, m in methods().items()]


def method_doc(name: str | None) -> str:
    m = methods().get(name or "")
    if m is None:
        return ""
    base = {True: "needs a base model", False: "no base model needed"}.get(
        m["needs_base"], "needs a base model when its init uses one")
    spec = ml.METHODS[name]
    count = (f"exactly {spec.min_models} models" if spec.max_models and spec.max_models == spec.min_models
             else f"{max(spec.min_models, 2)}+ models")
    return (f"**{m['title']}** · {m['family']} · {base} · {count}\n\n{m['doc']}\n\n"
            f"<span class='ml-paper'>{m['paper']}</span>")


def defaults(name: str | None) -> dict:
    """A method's parameter defaults as the params dict the controls start from (empty values left out)."""
    m = methods().get(name or "")
    return {p["name"]: p["default"] for p in (m["params"] if m else []) if p["default"] is not None}


def _step(p: dict) -> float:
    """A slider step fine enough for the default (0.9995 -> 0.0001)."""
    text = repr(float(p["default"] or 0.0))
    decimals = len(text.split(".")[1].rstrip("0")) if "." in text and "e" not in text else 2
    return 10.0 ** -max(2, min(decimals, 6))


def param_control(p: dict) -> gr.components.Component:
    """One control for one typed parameter: slider for a bounded number, checkbox, dropdown, textbox."""
    # interactive: set explicitly (Gradio infers it from server-side inputs; these feed a browser-side event)
    common = {"label": p["name"], "info": p["doc"], "interactive": True, "min_width": 240}
    kind = p["kind"]
    low, high, default = p["low"], p["high"], p["default"]
    bounded = low is not None and high is not None
    if kind == "bool":
        return gr.Checkbox(value=bool(default), **common)
    if kind == "choice":
        return ui.Dropdown(list(p["choices"]), value=default, **common)
    if kind == "floats":
        return gr.Textbox(value="" if default is None else ", ".join(str(v) for v in default),
                          placeholder="e.g. 0.7, 0.3", **common)
    if kind == "int":
        if bounded and high - low <= MAX_INT_SLIDER:
            return ui.Slider(low, high, value=default, step=1, **common)
        return ui.Number(value=default, precision=0, minimum=low, maximum=high, **common)
    tiny = default and bounded and abs(default) < 1e-3 * (high - low)  # e.g. a tolerance of 1e-6 in [0, 1]
    if bounded and not tiny:
        return ui.Slider(low, high, value=default, step=_step(p), **common)
    return ui.Number(value=default, minimum=low, maximum=high, **common)


def balanced_rows(items: list, per_row: int) -> list[list]:
    """Rows of at most `per_row`, as even as possible (13 -> 3, 3, 3, 2, 2; no lone full-width control)."""
    rows = -(-len(items) // per_row)
    size, extra = divmod(len(items), rows) if rows else (0, 0)
    out, start = [], 0
    for r in range(rows):
        end = start + size + (r < extra)
        out.append(items[start:end])
        start = end
    return out


def _collect_js(names: list[str]) -> str:
    """Browser-side: the controls' values -> the params dict (no server round trip, so a click on Run
    right after moving a slider sends the new value). Empty values are left to the method's default."""
    return ("(...values) => { const names = " + json.dumps(names) + "; const out = {};"
            " names.forEach((n, i) => { const v = values[i];"
            " if (v !== null && v !== undefined && v !== '') out[n] = v; }); return out; }")


def _reset_js() -> str:
    table = json.dumps({name: defaults(name) for name in methods()})
    return f"(name) => ({table})[name] || {{}}"


# ----------------------------------------------------------------------------------------------------
# the run


def _pair(subset: list[str] | str | None) -> str:
    """A pairwise row's models ("a + b") or its summary label ("mean of 3")."""
    if subset is None:
        return ""
    return subset if isinstance(subset, str) else " + ".join(redact(str(m)) for m in subset)


def score_table(rows: list[dict]) -> pd.DataFrame:
    tasks = sorted({k for r in rows for k in r if k not in ROW_KEYS})
    paired = any("subset" in r for r in rows)
    rows = [{**r, "model": redact(str(r["model"])), "subset": _pair(r.get("subset"))} for r in rows]
    frame = pd.DataFrame(rows, columns=["model", "kind", *(["subset"] if paired else []), *tasks, "mean"])
    frame = frame.rename(columns={"subset": "pair"})
    return frame.round(4).rename(columns={task: ml.tasks.title(task) for task in tasks})


def merged_row(label: str, results: dict[str, dict]) -> dict:
    row = {"model": label, "kind": "merge"}
    for task, result in results.items():
        row[task] = ml.evaluation.headline(result)[1]
    values = [row[t] for t in results]
    row["mean"] = sum(values) / len(values) if values else None
    return row


def residual_summary(report: dict[str, dict]) -> str:
    """MaTS: how far each solved parameter got, ‖Ax − b‖ / ‖b‖ before → after: one line over all of them,
    then a folded table of the worst ones (the whole list is in merge_config.json)."""
    rows = ml.methods.mats.convergence(report)
    if not rows:
        return ""
    after = statistics.median(r["residual_after"] for r in rows)
    reached = sum(r["converged"] for r in rows)
    count = f"{len(rows)} parameter{'s' if len(rows) != 1 else ''}"
    if all(r["residual_before"] is None for r in rows):  # solver=closed_form
        return (f"Closed form on {count}: median relative residual {after:.2e} "
                f"(worst {rows[0]['residual_after']:.2e}).")
    before = statistics.median(r["residual_before"] for r in rows)
    steps = statistics.median(r["steps"] for r in rows)
    line = (f"Conjugate gradient on {count}, {reached} reached the tolerance: median relative "
            f"residual {before:.2e} → {after:.2e} (worst {rows[0]['residual_after']:.2e}), median {steps:.0f} steps.")
    shown = rows[:TOP_RESIDUALS]
    table = "\n".join(["| parameter | before | after | steps | converged |", "|---|---|---|---|---|"] +
                      [f"| `{r['parameter']}` | {r['residual_before']:.2e} | {r['residual_after']:.2e} | {r['steps']} | "
                       f"{'yes' if r['converged'] else 'no'} |" for r in shown])
    title = f"Convergence per parameter (worst {len(shown)} of {len(rows)})"
    return f"{line}\n\n<details><summary>{title}</summary>\n\n{table}\n\n</details>"


def _changed(method: str, params: dict) -> dict:
    """The parameters whose values differ from the method's defaults."""
    default = {p.name: p.default for p in ml.METHODS[method].params}
    return {k: v for k, v in params.items() if v != default.get(k)}


def _settings(config: dict) -> str:
    """One line: method, the parameters that differ from its defaults, base, components, space, heads, and
    the output's dtype and shard size when asked for."""
    shown = ", ".join(f"{k}={v}" for k, v in _changed(config["method"], config["params"]).items()) or "defaults"
    parts = [f"{config['method']} ({shown})"]
    if config.get("base"):
        parts.append(f"base {config['base']}")
    if set(config["components"]) != set(GROUPS):
        parts.append(f"method on {', '.join(config['components'])}, {config['fallback']} elsewhere")
    if config.get("space") == "module":
        parts.append("(IA)3 vectors merged, then folded")
    parts.append(f"heads: {config['heads']}")
    if config.get("dtype"):
        parts.append(f"saved in {config['dtype']}")
    if config.get("shard_size"):
        parts.append(f"files of at most {config['shard_size']:,} bytes")
    return " · ".join(parts)


def summary(result: ml.MergeResult, extra: list[str], visitor: Session) -> str:
    """Markdown: where the merge was saved, how long it took, its settings, CG residuals, notes."""
    head = [f"**Saved** `{visitor.shown(result.out)}` in {result.seconds:.1f} s · {redact(_settings(result.config))}"]
    residuals = residual_summary(result.report)
    if residuals:
        head.append(residuals)
    notes = result.notes[:6] + ([f"… and {len(result.notes) - 6} more (see merge_config.json)"]
                                if len(result.notes) > 6 else [])
    bullets = "\n".join(f"- {redact(n)}" for n in notes + extra)
    return "\n\n".join(head + ([bullets] if bullets else []))


def downloads(folder: Path, visitor: Session) -> list[str]:
    """merge_config.json (and mergekit.yaml), and in public mode the merged model as a zip, copied to the
    session's download folder (emptied each time, so downloads never pile up) for Gradio to serve."""
    files = [folder / n for n in ("merge_config.json", "mergekit.yaml") if (folder / n).is_file()]
    where = visitor.downloads()
    copies = [str(shutil.copy(f, where / f.name)) for f in files]
    if visitor.public:
        copies.append(shutil.make_archive(str(where / folder.name), "zip", folder))
    return copies


def _params(method: str, params: dict | str | None) -> dict:
    """The params dict from the UI (JSON), or from an API caller: a dict, JSON text or 'key=value, ...'."""
    if params is None or params == "":
        return {}
    if isinstance(params, str):
        try:
            params = json.loads(params)
        except (json.JSONDecodeError, RecursionError):  # RecursionError: JSON nested too deep
            return parse_assignments([params], where="method parameters")
    if not isinstance(params, dict):
        raise ml.MergeLabError(f"method parameters must be a dict such as {{\"lambda\": 0.3}}, got {params!r}",
                               param="params")
    return params


@engine_errors(labels=LABELS)
def run_merge(models: list[str] | None, base: str | None, method: str, params: dict | str | None,
              components: list[str] | None, fallback: str, heads: str, limit: float | None, compare: bool,
              multitask: str | None, out: str | None, space: str = "weights", pairwise: bool = False,
              dtype: str | None = None, shard_size: str | None = None,
              request: gr.Request = None, progress: gr.Progress = gr.Progress()):
    """Merge, save, then stream the score table: the merge first, then (compare on) each individual
    model, the ensemble and the multi-task model, then (pairwise on) every pair merged with the same
    method and the mean over the pairs. `dtype` (fp32, bf16, fp16; empty: the inputs') and `shard_size`
    (e.g. 500MB; empty: 5GB) shape the saved files. Yields (table, status, downloadable files)."""
    visitor = session(request)
    models = visitor.models(models, "models")
    if not models:
        raise ml.MergeLabError("pick the checkpoints to merge (at least one; two or more to compare)",
                               param="models")
    if not components:
        raise ml.MergeLabError("pick at least one component for the method to merge", param="components")
    base = visitor.model(base, "base") or None
    multitask = visitor.model(multitask, "multitask") or None  # checked now: it is read after the merge
    limit = visitor.bound("examples", all_or(limit, "limit"), "limit")
    report = progress_fn(progress, request)
    spec = MergeSpec(method, tuple(models), base=base, params=_params(method, params), components=tuple(components),
                     fallback=fallback, heads=heads, space=space, dtype=dtype or None,
                     shard_size=(shard_size or "").strip() or None)
    folder = visitor.output("merges", out, method)
    yield score_table([]), "", None
    result = ml.merge(spec, out=folder, progress=scaled(report, 0.0, 0.4 if compare else 0.7, "merge: "))
    files = downloads(result.out, visitor)
    extra = [] if result.tasks else ["The merged model has no task head, so there is nothing to score."]
    yield score_table([]), summary(result, extra + ["Scoring…"], visitor), files

    rows: list[dict] = []
    if result.tasks:
        share = 0.15 if compare else 0.3
        start = 0.4 if compare else 0.7
        results = {}
        for i, task in enumerate(result.tasks):
            part = scaled(report, start + share * i / len(result.tasks), start + share * (i + 1) / len(result.tasks),
                          f"score merge on {task}: ")
            try:
                results[task] = ml.evaluate(result.out, task, limit=limit, progress=part)
            except ml.MergeLabError as exc:  # the merge is saved; say why a task has no score
                extra.append(f"Not scored on {task}: {exc}")
        rows.append(merged_row(result.out.name, results))
        yield score_table(rows), summary(result, extra + (["Scoring the individual models and the ensemble…"]
                                                          if compare else []), visitor), files
    if pairwise and len(models) < 3:
        extra.append("Pairs skipped: with fewer than three checkpoints the merge above is the only pair.")
    elif pairwise:
        try:
            # each pair's rows are labelled with the settings that differ from the method's defaults
            for row in ml.compare_subsets(models, [(method, _changed(method, spec.params))], size=2, base=base,
                                          multitask=multitask, limit=limit, space=space,
                                          progress=scaled(report, 0.55, 0.8 if compare else 1.0, "pairs: ")):
                rows.append(row)
                yield score_table(rows), summary(result, extra + ["Merging and scoring every pair…"], visitor), files
        except ml.MergeLabError as exc:  # the merge is saved; say why the pairs stopped
            extra.append(f"Pairs stopped: {exc}")
    if compare and len(models) < 2:
        extra.append("Comparison skipped: it needs at least two models.")
    elif compare:
        try:
            for row in ml.compare(models, [], base=base, multitask=multitask, limit=limit,
                                  progress=scaled(report, 0.8 if pairwise else 0.55, 1.0, "compare: ")):
                rows.append(row)
                yield score_table(rows), summary(result, extra + ["Scoring…"], visitor), files
        except ml.MergeLabError as exc:  # the merge is saved; say why the comparison stopped
            extra.append(f"Comparison stopped: {exc}")
    scored = f"Scores: dev split, first {limit} examples per task." if limit else "Scores: full dev split."
    yield score_table(rows), summary(result, extra + ([scored] if rows else []), visitor), files


def refresh(request: gr.Request = None) -> tuple:
    """On page load and when the tab opens: the zoo may have grown, and there may be new results."""
    choices = model_choices(request)
    return (gr.Dropdown(choices=choices), gr.Dropdown(choices=[NONE, *choices]),
            gr.Dropdown(choices=[NONE, *multitask_choices()]))


def recorded_base(models: list[str] | None, request: gr.Request = None) -> str:
    """The base the picked checkpoints record (what a method that needs a base uses when none is given),
    or "" when they record none or different ones, or a pick is not a readable model."""
    visitor = session(request)
    try:
        picked = [ml.checkpoint.open_checkpoint(spec) for spec in visitor.models(models, "models")]
    except ml.MergeLabError:
        return ""
    return (ml.checkpoint.recorded_base(picked) or "") if picked else ""


def show_base(models: list[str] | None, base: str | None, filled: str | None, request: gr.Request = None):
    """Show, in the Base control, the base the merge will use: the checkpoints' recorded one, unless the
    user picked another (a base filled in here before is replaced when the checkpoints change)."""
    if (base or "") not in ("", filled or ""):
        return gr.skip(), gr.skip()
    found = recorded_base(models, request)
    return gr.Dropdown(value=found), found


# ----------------------------------------------------------------------------------------------------
# layout


def build(demo: gr.Blocks) -> dict:
    with gr.Tab("Merge", id="merge") as tab:
        gr.Markdown("Merge fine-tuned checkpoints of one architecture into one model, save it, and score it "
                    "next to the models it came from and their output ensemble.")
        notice = start.notice(tab, "Merge")
        choices = model_choices()
        with gr.Row():
            models = ui.Dropdown(choices, value=[], multiselect=True, allow_custom_value=True, scale=3,
                                 label="Checkpoints", elem_id="merge-models",
                                 info=f"{models_info()}; the first one is model A")
            base = ui.Dropdown([NONE, *choices], value="", allow_custom_value=True, scale=2, label="Base model",
                               elem_classes=PICKER,
                               elem_id="merge-base",
                               info="the pretrained model they were fine-tuned from, filled in from what they "
                                    "record; task-vector methods (task arithmetic, TIES, DARE) use it")
        with gr.Row(equal_height=False, elem_id="merge-method-row"):
            method = ui.Dropdown(method_choices(), value=DEFAULT_METHOD, label="Method", elem_id="merge-method",
                                 scale=2, min_width=320)
            with gr.Column(scale=3, min_width=320):
                doc = gr.Markdown(method_doc(DEFAULT_METHOD), elem_id="merge-method-doc")
        with gr.Column(elem_id="merge-params"):
            params = gr.JSON(defaults(DEFAULT_METHOD), visible="hidden", label="Parameters",
                             elem_id="merge-params-json")

            @gr.render(inputs=method)
            def controls(name: str | None):
                spec = methods().get(name or "")
                if spec is None or not spec["params"]:
                    gr.Markdown("This method has no parameters.", elem_classes="ml-muted")
                    return
                made = []
                for chunk in balanced_rows(spec["params"], PER_ROW):
                    with gr.Row(equal_height=True):
                        made += [param_control(p) for p in chunk]
                names = [p["name"] for p in spec["params"]]
                for control in made:
                    control.change(None, made, params, js=_collect_js(names), api_visibility="private")

        with gr.Accordion("Components, heads, adapter modules and output files", open=False,
                          elem_id="merge-components-box"):
            with gr.Row():
                components = ui.CheckboxGroup(list(GROUPS), value=list(GROUPS), label="Components", scale=3,
                                              elem_id="merge-components",
                                              info="parameter groups the method merges; the rest follow the fallback")
                fallback = ui.Radio(list(FALLBACKS), value="average", label="Fallback", scale=1,
                                    info="for groups left out: average, or keep model A")
                heads = ui.Radio(list(HEAD_POLICIES), value="auto", label="Heads", scale=1,
                                 info="auto: merge heads of one label set, else one head per task")
                space = ui.Radio(list(MERGE_SPACES), value="weights", label="Adapter modules", scale=1,
                                 elem_id="merge-space",
                                 info="(IA)3 modules: merge the weights they fold into, or their scaling vectors "
                                      "(module)")
            with gr.Row():
                dtype = ui.Radio([INPUTS_DTYPE, *[(d, d) for d in OUTPUT_DTYPES]], value="", label="Output dtype",
                                 scale=2, elem_id="merge-dtype",
                                 info="the floats the merged model is saved in (the math runs in fp32)")
                shard_size = gr.Textbox("", label="Shard size", scale=1, elem_id="merge-shard-size",
                                        placeholder="5GB",
                                        info="most tensor bytes per file, e.g. 500MB; a larger model is split "
                                             "into shards with an index")
        with gr.Row(equal_height=True):
            limit = ui.Number(value=DEFAULT_LIMIT, precision=0, minimum=0, label="Limit", scale=1, min_width=120,
                              info="first N dev examples per task; 0 = all", elem_id="merge-limit")
            compare = gr.Checkbox(value=True, label="Compare", scale=1, min_width=140, elem_id="merge-compare",
                                  info="score the individual models and their ensemble too")
            pairwise = gr.Checkbox(value=False, label="Every pair", scale=1, min_width=140, elem_id="merge-pairwise",
                                   info="also merge each pair of the checkpoints, then average over the pairs")
            multitask = ui.Dropdown([NONE, *multitask_choices()], value="", allow_custom_value=True, scale=2,
                                    elem_classes=PICKER,
                                    label="Multi-task model", elem_id="merge-multitask",
                                    info="optional: one more row to beat (with Compare)")
            out = gr.Textbox("", label="Output folder", scale=2, elem_id="merge-out",
                             placeholder="<method>-<timestamp>",
                             info=("a name for your result (letters, digits, . _ -); kept with your session"
                                   if ml.settings.public_mode() else
                                   f"a name under {ml.settings.home() / 'merges'}, or a full path; "
                                   "an existing folder is never overwritten"))
        with gr.Row():
            run = gr.Button("Merge", variant="primary", elem_id="merge-run")
            halt = stop_button("merge-stop")
        status = gr.Markdown(elem_id="merge-status")
        table = gr.Dataframe(headers=["model", "kind", "mean"], label="Scores (headline dev metric per task)",
                             interactive=False, elem_id="merge-table", buttons=["copy"], max_height=900)
        files = gr.File(file_count="multiple", label="Merge config (re-creates the merge; mergekit YAML when "
                                                     "mergekit can express it)", interactive=False,
                        elem_id="merge-files", visible=False)

        method.change(method_doc, method, doc, api_name="method_doc", api_visibility="private")
        method.change(None, method, params, js=_reset_js(), api_visibility="private")
        merging = run.click(run_merge, [models, base, method, params, components, fallback, heads, limit, compare,
                                        multitask, out, space, pairwise, dtype, shard_size], [table, status, files],
                            api_name="merge",
                            concurrency_id="gpu", show_progress_on=status)
        on_stop(halt, [merging], status, api=True)
        merging.then(lambda saved: gr.File(visible=bool(saved)), files, files, api_visibility="private",
                         queue=False, show_progress="hidden")
        filled = gr.State("")  # the base last filled in from the checkpoints' records
        models.change(show_base, [models, base, filled], [base, filled], api_visibility="private",
                      show_progress="hidden")
        on_open(demo, tab, refresh, None, [models, base, multitask])
        notice.then(refresh, None, [models, base, multitask], api_visibility="private", show_progress="hidden")
    return {"models": models, "method": method, "table": table, "status": status}
