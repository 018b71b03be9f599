"""Permute tab: align a model trained from another initialization to a reference model (permutation
alignment), look at the correlation heatmaps and the head matching, and compare the loss barrier of
plain (vanilla) interpolation with interpolation after alignment (Verma & Elbayad 2024, "Merging Text
Transformer Models from Different Initializations", arXiv:2403.00986). Engine calls: `merging_core.align`
(its progress names each stage, its notes say when A and B share an initialization),
`merging_core.curve`; the heatmaps come from the engine as plain lists. Method `zip` writes the ZipIt merge
of A and B (merge/unmerge matrices, Stoica et al. 2023, arXiv:2305.03053) instead of B permuted; the tab
then scores that merged model beside the vanilla line's midpoint. `Tokens` caps the activations' data
amount (Verma & Elbayad, Sec. 6)."""

from __future__ import annotations

import math
from collections import defaultdict

import gradio as gr

import merging_core as ml
from merging_core.align import ATTENTION, MERGE_TYPES, METHODS, RESIDUAL, AlignSpec, initialization_note, load_alignment

from . import controls as ui
from . import figures, start
from .common import (
    PICKER,
    all_or,
    engine_errors,
    model_choices,
    on_open,
    on_stop,
    progress_fn,
    stop_button,
    task_choices,
    task_update,
    whole,
)
from .session import redact, session

DEFAULT_LIMIT = 64
# The activations' text: (shown, task id); any task id may be typed too.
TEXTS = (("WikiText-2", "wikitext2"), ("all data-root text", "corpus"), ("SST-2", "sst2"))
PAIR_KIND = "different initializations"  # the zoo pairs the tab starts from
OWN_TASKS = "empty: the models' own tasks (the language-model loss for pretrained models)"
# Engine inputs named in errors -> this tab's control labels.
LABELS = {"a": "A (reference basis)", "b": "B (permuted into A's basis)", "merge_type": "Merge type",
          "attention": "Attention matching", "residual": "Residual order from", "qk": "Separate Q/K order",
          "text": "Text for activations", "examples": "Examples", "tasks": "Curve tasks", "points": "Points per curve",
          "limit": "Limit", "site": "Site", "method": "Method", "tokens": "Tokens", "zip_same": "Same-model pairs"}


def default_pair() -> dict | None:
    """The zoo's first pair of models trained from different initializations (e.g. demo-scratch-s0 and
    demo-scratch-s1), or None."""
    return next((pair for pair in ml.zoo.pairs() if pair["kind"] == PAIR_KIND), None)


def _sentence(note: str) -> str:
    return note[:1].upper() + note[1:] + ("" if note.endswith(".") else ".")


def refusal(a: str | None, b: str | None, request: gr.Request = None) -> tuple[str, str] | None:
    """(control, the engine's one line) when A's or B's family cannot be aligned yet (`arch.require`, e.g. a
    Llama model), naming the model as it was picked; None when both can, or are missing or unknown."""
    visitor = session(request)
    for name, param in ((a, "a"), (b, "b")):
        picked = (name or "").strip() if isinstance(name, str) else ""
        if not picked:
            continue
        try:
            refused = ml.catalog.unsupported(visitor.model(picked, param), "alignment", picked)
        except ml.MergeLabError:  # an unknown model: the run says why
            continue
        if refused:
            return param, refused
    return None


def init_warning(a: str | None, b: str | None, request: gr.Request = None) -> str:
    """Before running: the engine's one line when A's or B's family cannot be aligned yet; else a warning
    when A and B share an initialization (the engine's check of what they record), so aligning them
    changes little; "" otherwise or while either is missing or unknown."""
    refused = refusal(a, b, request)
    if refused:
        return redact(f"⚠ {_sentence(refused[1])}")
    if not (a or "").strip() or not (b or "").strip():
        return ""
    try:
        visitor = session(request)
        note = initialization_note(visitor.model(a, "a"), visitor.model(b, "b"))
    except ml.MergeLabError:
        return ""
    return redact(f"⚠ {_sentence(note)} Pick a pair trained from different initializations, e.g. the zoo's "
                  f"“{PAIR_KIND}” pairs.") if note else ""


def _count(value):
    return int(value) if isinstance(value, (int, float)) and math.isfinite(value) else value


def align_spec(a: str | None, b: str | None, merge_type: str, attention: str, residual: str, qk: bool,
               text: str, examples: float | None, method: str = AlignSpec.method, tokens: float | None = 0,
               zip_same: float | None = 0.0) -> AlignSpec:
    """The alignment request of the tab's controls (the spec checks every choice)."""
    return AlignSpec((a or "").strip(), (b or "").strip(), merge_type=merge_type, attention=attention,
                     residual=residual, qk=bool(qk), text=text, examples=_count(examples), method=method,
                     tokens=_count(tokens if tokens is not None else 0),
                     zip_same=float(zip_same or 0.0) if method == "zip" else 0.0)


def alignment_summary(summary: dict, barriers: dict[str, dict], zipped: dict[str, dict] | None = None) -> str:
    """Markdown: settings, mean matched correlation per site kind before -> after, barriers, timings;
    `zipped`: task -> the zip merge's scores and the vanilla line's (midpoint, mean of the ends)."""
    kinds: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for site, values in summary["sites"].items():
        if values["permuted"]:
            kinds[site.split(".")[0]].append((values["before"], values["after"]))
    names = {"ff": "feed-forward neurons", "attn": "attention (V·O)", "qk": "attention (Q·K)",
             "qkv": "attention (fused Q·K·V)", "res": "residual sites"}
    zip_pairs = summary.get("zip_pairs")
    head = (f"**{summary['a']} ⊕ {summary['b']} zipped** (a-b pairs {zip_pairs['a-b']}, same-model pairs "
            f"{zip_pairs['a-a']} + {zip_pairs['b-b']})" if zip_pairs else f"**{summary['b']} → {summary['a']}'s basis**")
    lines = [f"{head} · {summary['merge_type']} · attention "
             f"{summary['attention']}{' + separate Q/K' if summary['qk'] else ''} · residual {summary['residual']} · "
             + ("function-preserving" if summary["function_preserving"] else "**not function-preserving**"), ""]
    for note in summary.get("notes") or []:  # e.g. A and B share an initialization
        lines += [f"> ⚠ {_sentence(note)}", ""]
    if kinds:
        lines += ["| units | sites | mean matched corr. before → after |", "|---|---|---|"]
        for kind, pairs in kinds.items():
            before = sum(p[0] for p in pairs) / len(pairs)
            after = sum(p[1] for p in pairs) / len(pairs)
            lines.append(f"| {names.get(kind, kind)} | {len(pairs)} | {before:.3f} → {after:.3f} |")
    if barriers:
        lines += ["", "| task | interpolation | loss barrier | metric barrier |", "|---|---|---|---|"]
        for (task, label), b in barriers.items():
            lines.append(f"| {ml.tasks.title(task)} | {label} | {b['loss_barrier']:.4f} | {b['metric']} {b['metric_barrier']:.4f} |")
    if zipped:
        lines += ["", "| task | zip merge loss | vanilla midpoint loss | loss of A / B |", "|---|---|---|---|"]
        for task, z in zipped.items():
            lines.append(f"| {ml.tasks.title(task)} | {z['zip']:.4f} | {z['midpoint']:.4f} | "
                         f"{z['ends'][0]:.4f} / {z['ends'][-1]:.4f} |")
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
              method: str = AlignSpec.method, tokens: float | None = 0, zip_same: float | None = 0.0,
              request: gr.Request = None, progress: gr.Progress = gr.Progress()):
    """Align, show the heatmaps, then stream vanilla and aligned interpolation curves.
    Yields (status, summary, site choices, heatmaps, head cost, curves, the alignment's folder)."""
    visitor = session(request)
    refused = refusal(a, b, request)
    if refused:  # before the first status (which would say the models are loading); the line under the
        # pickers says it already, the error's toast says it again (an error badge would cover a status line)
        raise ml.MergeLabError(refused[1], param=refused[0])
    points = whole(points, "points")
    if visitor.public and isinstance(examples, (int, float)) and math.isfinite(examples):
        examples = visitor.bound("align_examples", int(examples), "examples")
    spec = align_spec(visitor.model(a, "a"), visitor.model(b, "b"), merge_type, attention, residual, qk, text,
                      examples, method, tokens, zip_same)
    points = visitor.bound("points", int(points), "points")
    limit = visitor.bound("examples", all_or(limit, "limit"), "limit")
    # at once, before any work: the engine's own reports (loading, activations, ...) follow within moments
    verb = "Zipping" if spec.method == "zip" else "Aligning"
    yield (redact(f"{verb} {str(b).strip()} to {str(a).strip()}: loading the models…"), gr.skip(), gr.skip(), gr.skip(),
           gr.skip(), gr.skip(), gr.skip())
    report = progress_fn(progress, request)
    report(0.0, "starting")
    out = visitor.output("aligned", None, "aligned") if visitor.public else None
    result = ml.align(spec, out=out, progress=ml.progress.scaled(report, 0.0, 0.3))
    folder, site = str(result.out), _first_site(result)
    maps = result.heatmaps(site)
    sites = gr.Dropdown(choices=list(result.correlations), value=site)
    heat, heads = figures.alignment_figure(maps), figures.head_cost_figure(maps)
    summary = result.summary()
    zipping = spec.method == "zip"
    walking = "the vanilla line, then scoring the zip merge" if zipping else "the vanilla and the aligned line"
    yield (f"Aligned; walking {walking}…", redact(alignment_summary(summary, {})), sites, heat,
           heads, figures.curve_figure([], []), folder)

    curves, barriers, zipped = [], {}, {}
    options = {"points": points, "limit": limit}
    lines = (("vanilla", spec.b),) if zipping else (("vanilla", spec.b), ("aligned", folder))
    for n, (label, other) in enumerate(lines):
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
    if zipping:  # the zip merge is one model (ZipIt's midpoint), scored beside the vanilla line's midpoint
        middle = current["items"][len(current["items"]) // 2]["scores"]
        for task, values in barriers.items():
            scores = ml.evaluate(folder, task[0], limit=options["limit"] or None)
            zipped[task[0]] = {"zip": scores["loss"], "midpoint": middle[task[0]]["loss"], "ends": values["ends"]["loss"]}
        summary_text = redact(alignment_summary(summary, barriers, zipped))
    else:
        summary_text = redact(alignment_summary(summary, barriers))
    scope = f"first {options['limit']} examples" if options["limit"] else "full split"
    # the last yield carries every output again: an API caller sees only the final values
    yield (f"Done ({scope} of each task's dev set).", summary_text, sites, heat, heads,
           figures.curve_figure(curves, shown), folder)


def pick_tasks(a: str | None, b: str | None, tasks: list[str] | None, request: gr.Request = None) -> gr.CheckboxGroup:
    """The curve tasks A or B can be scored on (each line scores a task with a fitting head of either)."""
    return task_update([a, b], tasks, "", request, always=OWN_TASKS)


def refresh(a: str | None, b: str | None, request: gr.Request = None) -> tuple:
    """The model pickers' choices; when A and B are both empty, the zoo's first pair trained from different
    initializations (`default_pair`)."""
    choices = model_choices(request)
    pair = default_pair() if not (a or "").strip() and not (b or "").strip() else None
    if pair is None:
        return gr.Dropdown(choices=choices), gr.Dropdown(choices=choices)
    return gr.Dropdown(choices=choices, value=pair["a"]), gr.Dropdown(choices=choices, value=pair["b"])


def build(demo: gr.Blocks) -> dict:
    with gr.Tab("Permute", id="permute") as tab:
        gr.Markdown("Models trained from different random initializations compute similar functions with their "
                    "neurons and heads in another order. Align B to A (Hungarian matching of correlated units), "
                    "then compare plain interpolation with interpolation after alignment.")
        notice = start.notice(tab, "Permute")
        choices = model_choices()
        with gr.Row():
            a = ui.Dropdown(choices, value=None, allow_custom_value=True, label=LABELS["a"], elem_id="align-a",
                            elem_classes=PICKER,
                            info="e.g. demo-scratch-s0 (recipe `demo`) or scratch-s0 (recipe `scratch`)")
            b = ui.Dropdown(choices, value=None, allow_custom_value=True, label=LABELS["b"], elem_id="align-b",
                            elem_classes=PICKER,
                            info="trained from another initialization, e.g. demo-scratch-s1")
        warning = gr.Markdown(elem_id="align-warning")
        with gr.Row(equal_height=True):
            merge_type = ui.Dropdown(list(MERGE_TYPES), value=AlignSpec.merge_type, label=LABELS["merge_type"],
                                     elem_id="align-type", info="what is permuted; the rest is averaged as it is")
            attention = ui.Radio(list(ATTENTION), value=AlignSpec.attention, label=LABELS["attention"],
                                 elem_id="align-attention")
            residual = ui.Radio(list(RESIDUAL), value=AlignSpec.residual, label=LABELS["residual"],
                                elem_id="align-residual",
                                info="norm outputs (LayerNorm, RMSNorm); sep: one per site (not function-preserving)")
            qk = gr.Checkbox(value=AlignSpec.qk, label=LABELS["qk"], elem_id="align-qk")
        with gr.Row(equal_height=True):
            method = ui.Radio(list(METHODS), value=AlignSpec.method, label=LABELS["method"], elem_id="align-method",
                              info="permute: B in A's basis, then interpolate; zip: one merged model (ZipIt)")
            zip_same = ui.Slider(0.0, 1.0, value=AlignSpec.zip_same, step=0.05, label=LABELS["zip_same"],
                                 elem_id="align-zip-same",
                                 info="zip: share of each model's ff/residual features zipped with its own")
            tokens = ui.Number(value=AlignSpec.tokens, precision=0, minimum=0, label=LABELS["tokens"],
                               elem_id="align-tokens", info="data amount: first N tokens of the examples; 0 = all")
        with gr.Row(equal_height=True):
            text = ui.Dropdown(list(TEXTS), value=AlignSpec.text, label=LABELS["text"], allow_custom_value=True,
                               elem_id="align-text")
            examples = ui.Number(value=128, precision=0, minimum=1, label=LABELS["examples"],
                                 info="inputs read (train split)")
            tasks = ui.CheckboxGroup(task_choices(), value=[], label=LABELS["tasks"], elem_id="align-tasks",
                                     info=OWN_TASKS)
        with gr.Row(equal_height=True):
            points = ui.Slider(2, 26, value=11, step=1, label=LABELS["points"])
            limit = ui.Number(value=DEFAULT_LIMIT, precision=0, minimum=0, label=LABELS["limit"],
                              elem_id="align-limit", info="first N dev examples per task; 0 = all")
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
                                         limit, method, tokens, zip_same],
                             [status, summary, site, heatmap, head_cost, curve_plot, folder],
                             api_name="align", concurrency_id="gpu", show_progress_on=status)
        on_stop(halt, [aligning], status)
        site.change(site_view, [folder, site], [heatmap, head_cost], api_visibility="private")
        for picker in (a, b):
            picker.change(init_warning, [a, b], warning, api_visibility="private", show_progress="hidden",
                          queue=False)
            picker.change(pick_tasks, [a, b, tasks], tasks, api_visibility="private", show_progress="hidden")
        on_open(demo, tab, refresh, [a, b], [a, b])
        notice.then(refresh, [a, b], [a, b], api_visibility="private", show_progress="hidden")
    return {"heatmap": heatmap, "curves": curve_plot}
