"""Ensemble tab: weight parameter-efficient modules of other tasks by their similarity to a target
(Lv et al. 2023), see the similarities and weights (the temperature slider re-weights without
recomputing anything), the leave-one-out similarity and weight heatmaps, and the few-shot result of
starting from the weighted module vs a fresh one and the uniform average."""

from __future__ import annotations

import math

import gradio as gr
import pandas as pd

import merging_core as ml
from merging_core.ensemble import GRANULARITIES, MEASURES, get_measure, similarity_matrix, softmax_weights
from merging_core.training import PEFT_KINDS

from . import controls as ui
from . import figures
from .common import engine_errors, on_stop, progress_fn, stop_button, whole
from .session import session

DEFAULT_MEASURE = "loss"
# Engine inputs named in errors -> this tab's control labels.
LABELS = {"target": "Target task", "kind": "Module kind", "sources": "Source modules", "similarity": "Similarity",
          "granularity": "Weights per", "shots": "Shots", "seeds": "Seeds", "steps": "Steps", "limit": "Dev limit",
          "temperature": "log10 temperature", "models": "Source modules"}


def temperature(log10: float) -> float:
    return 10.0 ** float(log10)


def measure_choices() -> list[str]:
    """The similarity picker's choices: every registered measure, in registry order."""
    return list(MEASURES)


def measure_info(name: str | None) -> str:
    """Markdown for one measure, from the registry: title, sign, what it reads, default temperature, source."""
    if not name or name not in MEASURES:
        return ""
    m = get_measure(name)
    return (f"**{m.title}** (`{m.name}`): {m.direction}. {m.doc} Reads: {', '.join(m.needs)}. "
            f"Default temperature {m.default_temperature:g}. {m.paper}.")


def temperature_info() -> str:
    """The temperature slider's help: the registry's default temperatures, with the measures that use each."""
    by_t: dict[float, list[str]] = {}
    for m in MEASURES.values():
        by_t.setdefault(m.default_temperature, []).append(m.name)
    defaults = ", ".join(f"{math.log10(t):g} = {t:g} ({', '.join(names)})" for t, names in by_t.items())
    return f"{defaults}; moving it re-weights instantly"


def _modules(kind: str) -> list[dict]:
    return [row for row in ml.zoo.entries() if row["kind"] == kind and "/" not in row["name"]]


def module_choices(kind: str) -> list[str]:
    return [row["name"] for row in _modules(kind)]


def target_choices() -> list[str]:
    here = ml.data.available_tasks() or list(ml.TASKS)
    return [t for t in here if ml.get_task(t).kind in ("classification", "regression")]


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in str(text).replace(" ", ",").split(",") if s.strip()]
    except ValueError:
        raise ml.MergeLabError(f"seeds must be integers separated by commas, e.g. 0,1,2; got {str(text)[:80]!r}",
                               param="seeds") from None
    if not seeds:
        raise ml.MergeLabError("give at least one seed, e.g. 0", param="seeds")
    odd = [s for s in seeds if not 0 <= s < 2**32]
    if odd:
        raise ml.MergeLabError(f"seeds are whole numbers from 0 to {2**32 - 1}; got {str(odd[0])[:40]}", param="seeds")
    return seeds


def _choice(value: object, choices, param: str) -> None:
    """A radio's value (it lets an empty one through)."""
    if value not in choices:
        raise ml.MergeLabError(f"choose one of {', '.join(choices)}; got {value!r:.40}", param=param)


def weights_view(state: dict | None, log10_t: float):
    """Similarities and weights at this temperature, from stored similarity scores (no recomputation)."""
    if not state:
        return gr.skip()
    t = temperature(log10_t)
    weights = [softmax_weights(scores, t) for scores in state["scores"]]
    return figures.similarity_figure(state["scores"], weights, state["measure"], t)


def matrix_view(state: dict | None, log10_t: float):
    if not state:
        return gr.skip()
    t = temperature(log10_t)
    rows = {target: softmax_weights(scores, t) for target, scores in state["scores"].items()}
    return figures.matrix_figure(state, rows, t)


def few_shot_table(result) -> pd.DataFrame:
    return pd.DataFrame(result.table()).round(4)


@engine_errors(labels=LABELS)
def run_ensemble(target: str, kind: str, sources: list[str] | None, similarity: str, log10_t: float, granularity: str,
                 shots: float, seeds: str, steps: float, limit: float | None, request: gr.Request = None,
                 progress: gr.Progress = gr.Progress()):
    """Similarity, weights and few-shot transfer. Returns (similarity figure, few-shot table, status, state)."""
    if not target:
        raise ml.MergeLabError("pick a target task", param="target")
    _choice(kind, PEFT_KINDS, "kind")
    _choice(granularity, GRANULARITIES, "granularity")
    for param, value in (("temperature", log10_t), ("shots", shots), ("steps", steps)):
        whole(value, param)  # NaN and inf pass a slider's bounds
    visitor = session(request)
    limit_n = visitor.bound("examples", int(limit) if limit and not math.isnan(limit) else None, "limit")
    chosen = _seeds(seeds)
    visitor.bound("seeds", len(chosen), "seeds")
    result = ml.ensemble(target, visitor.models(sources, "sources") or None, similarity=similarity,
                         temperature=temperature(log10_t), shots=visitor.bound("shots", int(shots), "shots"),
                         seeds=chosen, granularity=granularity, steps=visitor.bound("steps", int(steps), "steps"),
                         limit=limit_n, kind=kind, progress=progress_fn(progress, request))
    state = {"measure": similarity, "scores": [s.scores[similarity] for s in result.scores]}
    rows = result.table()
    top = max(row["mean"] for row in rows)
    best = [row["init"] for row in rows if row["mean"] == top]  # ties are common when every start learns the prior
    status = (f"{result.target}: {len(result.sources)} source modules, {result.shots} shots, "
              f"{len(result.scores)} seed(s); best start: **{' = '.join(best)}** ({rows[0]['metric']} {top:.4f}). "
              f"The same weights (T = {result.temperature:.3g}) in any merge method: `{result.merge_command()}`")
    return weights_view(state, log10_t), few_shot_table(result), status, state


@engine_errors(labels=LABELS)
def run_matrix(kind: str, similarity: str, log10_t: float, shots: float, request: gr.Request = None,
               progress: gr.Progress = gr.Progress()):
    """Leave-one-out similarities over every zoo module of `kind`; returns (heatmaps, state)."""
    _choice(kind, PEFT_KINDS, "kind")
    for param, value in (("temperature", log10_t), ("shots", shots)):
        whole(value, param)  # NaN and inf pass a slider's bounds
    shots = session(request).bound("shots", int(shots), "shots")
    specs = module_choices(kind)
    if len(specs) < 3:
        raise ml.MergeLabError(f"the zoo has {len(specs)} {kind} modules; the matrix needs at least 3", param="kind",
                               hint="build the zoo's PEFT recipe (peft)")
    state = similarity_matrix(specs, similarity, shots=shots, progress=progress_fn(progress, request))
    return matrix_view(state, log10_t), state


def refresh_sources(kind: str, target: str | None):
    rows = _modules(kind)
    keep = [row["name"] for row in rows if row["task"] != target]
    return gr.Dropdown(choices=[row["name"] for row in rows], value=keep)


def build(demo: gr.Blocks) -> dict:
    with gr.Tab("Ensemble", id="ensemble"):
        gr.Markdown("Transfer to a target task by averaging parameter-efficient modules trained on other tasks, "
                    "weighted by softmax(similarity / temperature), and fine-tune that average on a few target "
                    "examples (Lv et al. 2023).")
        with gr.Row():
            targets = target_choices()
            target = ui.Dropdown(targets, value=targets[0] if targets else None, label=LABELS["target"],
                                 elem_id="ens-target")
            kind = ui.Radio(list(PEFT_KINDS), value="lora", label=LABELS["kind"], elem_id="ens-kind")
            sources = ui.Dropdown([], value=[], multiselect=True, allow_custom_value=True, scale=3,
                                  label=LABELS["sources"], elem_id="ens-sources",
                                  info="default: the zoo's modules of this kind trained on other tasks")
        with gr.Row(equal_height=True):
            similarity = ui.Dropdown(measure_choices(), value=DEFAULT_MEASURE, label=LABELS["similarity"],
                                     elem_id="ens-similarity", info="higher = more similar to the target")
            granularity = ui.Radio(list(GRANULARITIES), value="model", label=LABELS["granularity"],
                                   info="layer / block: weight cosine and Euclidean have per-layer scores")
            shots = ui.Slider(4, 128, value=32, step=4, label=LABELS["shots"], info="target training examples")
            seeds = gr.Textbox("0", label=LABELS["seeds"], info="e.g. 0,1,2")
            steps = ui.Slider(5, 200, value=50, step=5, label=LABELS["steps"], info="few-shot tuning, batch 8")
            limit = ui.Number(value=200, precision=0, minimum=1, label=LABELS["limit"])
        about = gr.Markdown(measure_info(DEFAULT_MEASURE), elem_id="ens-measure-info")
        log10_t = ui.Slider(-3, 2, value=math.log10(get_measure(DEFAULT_MEASURE).default_temperature), step=0.05,
                            label=LABELS["temperature"], elem_id="ens-temperature", info=temperature_info())
        with gr.Row():
            run = gr.Button("Measure and transfer", variant="primary", elem_id="ens-run")
            halt = stop_button("ens-stop")
        status = gr.Markdown(elem_id="ens-status")
        with gr.Row(equal_height=False):
            plot = gr.Plot(label="Similarity and weights", elem_id="ens-plot", scale=3)
            table = gr.Dataframe(label="Few-shot target score (dev) by starting module", interactive=False,
                                 elem_id="ens-table", scale=2)
        with gr.Accordion("Leave-one-out heatmaps (every task as the target)", open=False):
            with gr.Row():
                matrix_run = gr.Button("Compute the matrix", elem_id="ens-matrix-run")
                matrix_halt = stop_button("ens-matrix-stop")
            matrix_plot = gr.Plot(label="Similarity and weights, sources x targets", elem_id="ens-matrix")
        state, matrix_state = gr.State(None), gr.State(None)

        measuring = run.click(run_ensemble, [target, kind, sources, similarity, log10_t, granularity, shots, seeds,
                                             steps, limit], [plot, table, status, state], api_name="ensemble",
                              concurrency_id="gpu", show_progress_on=status)
        on_stop(halt, [measuring], status)
        matrix = matrix_run.click(run_matrix, [kind, similarity, log10_t, shots], [matrix_plot, matrix_state],
                                  api_name="ensemble_matrix", concurrency_id="gpu")
        on_stop(matrix_halt, [matrix], status)
        similarity.change(measure_info, similarity, about, api_visibility="private", show_progress="hidden")
        log10_t.change(weights_view, [state, log10_t], plot, api_visibility="private", show_progress="hidden")
        log10_t.change(matrix_view, [matrix_state, log10_t], matrix_plot, api_visibility="private",
                       show_progress="hidden")
        for trigger in (kind.change, target.change):
            trigger(refresh_sources, [kind, target], sources, api_visibility="private")
        demo.load(refresh_sources, [kind, target], sources, api_visibility="private")
    return {"plot": plot, "table": table}
