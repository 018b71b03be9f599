"""Permute tab: align a model trained from another initialization to a reference model (permutation
alignment), look at the correlation heatmaps and the head matching, and compare the loss barrier of
plain (vanilla) interpolation with interpolation after alignment. Engine calls: `merging_core.align`,
`merging_core.curve`; the heatmaps come from the engine as plain lists."""

from __future__ import annotations

import math
from collections import defaultdict

import gradio as gr

import merging_core as ml
from merging_core.align import ATTENTION, MERGE_TYPES, RESIDUAL, AlignSpec, load_alignment

from . import controls as ui
from . import figures
from .common import engine_errors, model_choices, on_stop, progress_fn, stop_button, whole
from .session import redact, session

DEFAULT_LIMIT = 64
TEXTS = ("wikitext2", "corpus", "sst2")
# Engine inputs named in errors -> this tab's control labels.
LABELS = {"a": "A (reference basis)", "b": "B (permuted into A's basis)", "merge_type": "Merge type",
          "attention": "Attention matching", "residual": "Residual order from", "qk": "Separate Q/K order",
          "text": "Text for activations", "examples": "Examples", "tasks": "Curve tasks", "points": "Points per curve",
          "limit": "Limit", "site": "Site"}


def _limit(limit: float | None) -> int | None:
    return int(limit) if limit and not math.isnan(limit) else None


def align_spec(a: str | None, b: str | None, merge_type: str, attention: str, residual: str, qk: bool,
               text: str, examples: float | None) -> AlignSpec:
    """The alignment request of the tab's controls (the spec checks every choice)."""
    count = int(examples) if isinstance(examples, (int, float)) and math.isfinite(examples) else examples
    return AlignSpec((a or "").strip(), (b or "").strip(), merge_type=merge_type, attention=attention,
                     residual=residual, qk=bool(qk), text=text, examples=count)


def alignment_summary(summary: dict, barriers: dict[str, dict]) -> str:
    """Markdown: settings, mean matched correlation per site kind before -> after, barriers, timings."""
    kinds: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for site, values in summary["sites"].items():
        if values["permuted"]:
            kinds[site.split(".")[0]].append((values["before"], values["after"]))
    names = {"ff": "feed-forward neurons", "attn": "attention (V·O)", "qk": "attention (Q·K)", "res": "residual sites"}
    lines = [f"**{summary['b']} → {summary['a']}'s basis** · {summary['merge_type']} · attention "
             f"{summary['attention']}{' + separate Q/K' if summary['qk'] else ''} · residual {summary['residual']} · "
             + ("function-preserving" if summary["function_preserving"] else "**not function-preserving**"), ""]
    if kinds:
        lines += ["| units | sites | mean matched corr. before → after |", "|---|---|---|"]
        for kind, pairs in kinds.items():
            before = sum(p[0] for p in pairs) / len(pairs)
            after = sum(p[1] for p in pairs) / len(pairs)
            lines.append(f"| {names.get(kind, kind)} | {len(pairs)} | {before:.3f} → {after:.3f} |")
    if barriers:
        lines += ["", "| task | interpolation | loss barrier | metric barrier |", "|---|---|---|---|"]
        for (task, label), b in barriers.items():
            lines.append(f"| {task} | {label} | {b['loss_barrier']:.4f} | {b['metric']} {b['metric_barrier']:.4f} |")
    seconds = summary["seconds"]
    lines += ["", f"{summary['text']['tokens']} tokens of {summary['text']['task']} ({summary['text']['split']}); "
              f"activations {seconds['features']:.1f} s, matching {seconds['matching']:.1f} s, "
              f"writing {seconds['apply']:.1f} s. Saved `{summary['out']}`."]
    return "\n".join(lines)


def site_view(folder: str | None, site: str | None):
    """The heatmaps of one site of a stored alignment."""
    if not folder or not site:
        return gr.skip(), gr.skip()
    maps = load_alignment(folder).heatmaps(site)
    return figures.alignment_figure(maps), figures.head_cost_figure(maps)


def _first_site(alignment) -> str:
    permuted = [s for s in alignment.correlations if alignment.order(s) is not None]
    attention = [s for s in permuted if s.startswith("attn.")]
    return (attention or permuted or list(alignment.correlations))[0]


@engine_errors(labels=LABELS)
def run_align(a: str, b: str, merge_type: str, attention: str, residual: str, qk: bool, text: str,
              examples: float, tasks: list[str] | None, points: float, limit: float | None,
              request: gr.Request = None, progress: gr.Progress = gr.Progress()):
    """Align, show the heatmaps, then stream vanilla and aligned interpolation curves.
    Yields (status, summary, site choices, heatmaps, head cost, curves, the alignment's folder)."""
    visitor = session(request)
    points = whole(points, "points")
    if visitor.public and isinstance(examples, (int, float)) and math.isfinite(examples):
        examples = visitor.bound("align_examples", int(examples), "examples")
    spec = align_spec(visitor.model(a, "a"), visitor.model(b, "b"), merge_type, attention, residual, qk, text,
                      examples)
    points = visitor.bound("points", int(points), "points")
    limit = visitor.bound("examples", _limit(limit), "limit")
    report = progress_fn(progress, request)
    out = visitor.output("aligned", None, "aligned") if visitor.public else None
    result = ml.align(spec, out=out, progress=ml.progress.scaled(report, 0.0, 0.3, "align: "))
    folder, site = str(result.out), _first_site(result)
    maps = result.heatmaps(site)
    sites = gr.Dropdown(choices=list(result.correlations), value=site)
    heat, heads = figures.alignment_figure(maps), figures.head_cost_figure(maps)
    summary = result.summary()
    yield ("Aligned; walking the vanilla and the aligned line…", redact(alignment_summary(summary, {})), sites, heat,
           heads, figures.curve_figure([], []), folder)

    curves, barriers = [], {}
    options = {"points": points, "limit": limit}
    for n, (label, other) in enumerate((("vanilla", spec.b), ("aligned", folder))):
        part = ml.progress.scaled(report, 0.3 + 0.35 * n, 0.65 + 0.35 * n, f"{label}: ")
        run = ml.curve(spec.a, other, tasks or None, progress=part, **options)
        shown = [(r.spec.name, r.spec.main_metric) for r in run.rigs]
        current = {"path": "line", "label": label, "items": []}
        curves.append(current)
        for item in run:
            current["items"].append(item)
            progress_text = f"{label}: point {item['index'] + 1}/{options['points']}"
            yield (progress_text, redact(alignment_summary(summary, barriers)),
                   gr.skip(), gr.skip(), gr.skip(), figures.curve_figure(curves, shown), folder)
        for task, values in run.summary()["barriers"].items():
            barriers[(task, label)] = values
    scope = f"first {options['limit']} examples" if options["limit"] else "full split"
    # the last yield carries every output again: an API caller sees only the final values
    yield (f"Done ({scope} of each task's dev set).", redact(alignment_summary(summary, barriers)), sites, heat, heads,
           figures.curve_figure(curves, shown), folder)


def refresh(request: gr.Request = None) -> tuple:
    choices = model_choices(request)
    return gr.Dropdown(choices=choices), gr.Dropdown(choices=choices)


def build(demo: gr.Blocks) -> dict:
    with gr.Tab("Permute", id="permute"):
        gr.Markdown("Models trained from different random initializations compute similar functions with their "
                    "neurons and heads in another order. Align B to A (Hungarian matching of correlated units), "
                    "then compare plain interpolation with interpolation after alignment.")
        choices = model_choices()
        with gr.Row():
            a = ui.Dropdown(choices, value=None, allow_custom_value=True, label=LABELS["a"],
                            elem_id="align-a", info="e.g. scratch-s0 (recipe `scratch`)")
            b = ui.Dropdown(choices, value=None, allow_custom_value=True, label=LABELS["b"],
                            elem_id="align-b", info="e.g. scratch-s1")
        with gr.Row(equal_height=True):
            merge_type = ui.Dropdown(list(MERGE_TYPES), value=AlignSpec.merge_type, label=LABELS["merge_type"],
                                     elem_id="align-type", info="what is permuted; the rest is averaged as it is")
            attention = ui.Radio(list(ATTENTION), value=AlignSpec.attention, label=LABELS["attention"],
                                 elem_id="align-attention")
            residual = ui.Radio(list(RESIDUAL), value=AlignSpec.residual, label=LABELS["residual"],
                                elem_id="align-residual",
                                info="LayerNorm sites; sep: one per site (not function-preserving)")
            qk = gr.Checkbox(value=AlignSpec.qk, label=LABELS["qk"], elem_id="align-qk")
        with gr.Row(equal_height=True):
            text = ui.Dropdown(list(TEXTS), value=AlignSpec.text, label=LABELS["text"], allow_custom_value=True)
            examples = ui.Number(value=128, precision=0, minimum=1, label=LABELS["examples"],
                                 info="inputs read (train split)")
            here = ml.data.available_tasks() or list(ml.TASKS)
            tasks = ui.CheckboxGroup(here, value=[], label=LABELS["tasks"], elem_id="align-tasks",
                                     info="empty: the models' own tasks (MLM loss for pretrained models)")
        with gr.Row(equal_height=True):
            points = ui.Slider(2, 26, value=11, step=1, label=LABELS["points"])
            limit = ui.Number(value=DEFAULT_LIMIT, precision=0, minimum=1, label=LABELS["limit"],
                              info="first N dev examples per task; empty = all")
        with gr.Row():
            run = gr.Button("Align and compare", variant="primary", elem_id="align-run")
            halt = stop_button("align-stop")
        status = gr.Markdown(elem_id="align-status")
        summary = gr.Markdown(elem_id="align-summary")
        site = ui.Dropdown([], label=LABELS["site"], elem_id="align-site",
                           info="ff.<l>: feed-forward, attn.<l>: attention output, qk.<l>: Q/K, res.*: residual")
        with gr.Row(equal_height=False):
            heatmap = gr.Plot(label="Correlations", elem_id="align-heatmap", scale=3)
            head_cost = gr.Plot(label="Head matching", elem_id="align-heads", scale=2)
        curve_plot = gr.Plot(label="Vanilla vs aligned interpolation", elem_id="align-curves")
        folder = gr.State(None)

        aligning = run.click(run_align, [a, b, merge_type, attention, residual, qk, text, examples, tasks, points,
                                         limit], [status, summary, site, heatmap, head_cost, curve_plot, folder],
                             api_name="align", concurrency_id="gpu", show_progress_on=status)
        on_stop(halt, [aligning], status)
        site.change(site_view, [folder, site], [heatmap, head_cost], api_visibility="private")
        demo.load(refresh, None, [a, b], api_visibility="private")
    return {"heatmap": heatmap, "curves": curve_plot}
