"""Ensemble tab: weight parameter-efficient modules (LoRA, (IA)³, prefix) of other tasks by their similarity
to a target task (a sentence task or CoNLL-2003 NER) (Lv et al. 2023, "Parameter-Efficient Weight Ensembling Facilitates Task-Level Knowledge Transfer", ACL
2023), see the similarities and weights (the temperature slider re-weights without recomputing anything:
the plot, the status and the merge command follow it; the few-shot table says at which temperature it
was measured), the leave-one-out similarity and weight heatmaps, and the few-shot result of starting
from the weighted module vs a fresh one and the uniform average."""

from __future__ import annotations

import math

import gradio as gr
import pandas as pd

import merging_core as ml
from merging_core.ensemble import (
    GRANULARITIES,
    MEASURES,
    TARGET_KINDS,
    default_sources,
    default_target,
    get_measure,
    matrix_modules,
    merge_command,
    similarity_matrix,
    softmax_weights,
    zoo_modules,
)
from merging_core.training import PEFT_KINDS

from . import controls as ui
from . import figures
from . import start
from .common import all_or, engine_errors, on_open, on_stop, progress_fn, stop_button, task_choices, whole
from .session import redact, session

DEFAULT_MEASURE = "loss"
# Engine inputs named in errors -> this tab's control labels.
LABELS = {"target": "Target task", "kind": "Module kind", "sources": "Source modules", "similarity": "Similarity",
          "granularity": "Weights per", "shots": "Shots", "seeds": "Seeds", "steps": "Steps", "limit": "Dev limit",
          "temperature": "log10 temperature", "models": "Source modules"}
TABLE_COLUMNS = ["init", "seeds", "metric", "mean", "sd"]  # `EnsembleResult.table()` rows
TABLE_LABEL = "Few-shot target score (dev) by starting module"


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


def module_choices(kind: str) -> list[str]:
    return [row["name"] for row in zoo_modules(kind)]


def target_choices() -> list[tuple[str, str]]:
    """Target tasks as (title, id) pairs ("SST-2", "sst2")."""
    return task_choices(TARGET_KINDS)


def target_default(kind: str = "lora") -> str | None:
    """A target for which the zoo has `kind` modules of other tasks, one it has a module of too when it can
    (with the demo zoo: SST-2, weighting the Emotion and MRPC modules); the first target when there is none."""
    targets = [value for _, value in target_choices()]
    return default_target(targets, kind) or (targets[0] if targets else None)


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


def few_shot_table(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=TABLE_COLUMNS).round(4)


def ensemble_status(state: dict | None, log10_t: float) -> str:
    """The status of a stored run at the slider's temperature: the few-shot result (measured at the run's
    temperature; "re-run to measure at T = …" when the slider has moved) and the merge command of the
    weights at the slider's temperature."""
    if not state:
        return ""
    t, measured = temperature(log10_t), state["temperature"]
    rows = state["table"]
    top = max(row["mean"] for row in rows)
    best = [row["init"] for row in rows if row["mean"] == top]  # ties are common when every start learns the prior
    command = merge_command(state["sources"], softmax_weights(state["scores"][0], t))
    n = len(state["sources"])
    text = (f"{ml.get_task(state['target']).title}: {n} source module{'s' if n != 1 else ''}, {state['shots']} shots, "
            f"{state['seeds']} seed(s); few-shot scores measured at T = {measured:.3g}: best start: "
            f"**{' = '.join(best)}** ({rows[0]['metric']} {top:.4f}).")
    if not math.isclose(t, measured, rel_tol=1e-6):
        text += f" The weights now shown are at T = {t:.3g}: re-run to measure at T = {t:.3g}."
    return redact(text + f" The same weights (T = {t:.3g}) in any merge method: `{command}`")


def table_label(state: dict | None):
    """The few-shot table's label, naming the temperature its scores were measured at."""
    if not state:
        return gr.skip()
    return gr.Dataframe(label=f"{TABLE_LABEL}, measured at T = {state['temperature']:.3g}")


def status_view(state: dict | None, log10_t: float):
    """The status at a new slider position (left as it is before any run: it may hold an error or "Stopped.")."""
    return ensemble_status(state, log10_t) if state else gr.skip()


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
    limit_n = visitor.bound("examples", all_or(limit, "limit"), "limit")
    chosen = _seeds(seeds)
    visitor.bound("seeds", len(chosen), "seeds")
    result = ml.ensemble(target, visitor.models(sources, "sources") or None, similarity=similarity,
                         temperature=temperature(log10_t), shots=visitor.bound("shots", int(shots), "shots"),
                         seeds=chosen, granularity=granularity, steps=visitor.bound("steps", int(steps), "steps"),
                         limit=limit_n, kind=kind, progress=progress_fn(progress, request))
    # what the status, the merge command and the weights need at any temperature (plain values: deep-copyable)
    state = {"measure": similarity, "scores": [s.scores[similarity] for s in result.scores],
             "sources": result.sources, "target": result.target, "temperature": result.temperature,
             "table": result.table(), "shots": result.shots, "seeds": len(result.scores)}
    # the table's label (which temperature it was measured at) follows in `table_label`: an API caller gets
    # the table's plain value
    return weights_view(state, log10_t), few_shot_table(state["table"]), ensemble_status(state, log10_t), state


@engine_errors(labels=LABELS)
def run_matrix(kind: str, similarity: str, log10_t: float, shots: float, request: gr.Request = None,
               progress: gr.Progress = gr.Progress()):
    """Leave-one-out similarities over every zoo module of `kind`; returns (heatmaps, state)."""
    _choice(kind, PEFT_KINDS, "kind")
    for param, value in (("temperature", log10_t), ("shots", shots)):
        whole(value, param)  # NaN and inf pass a slider's bounds
    shots = session(request).bound("shots", int(shots), "shots")
    specs = matrix_modules(kind)
    state = similarity_matrix(specs, similarity, shots=shots, progress=progress_fn(progress, request))
    return matrix_view(state, log10_t), state


def _default_sources(kind: str, target: str | None) -> list[str]:
    try:
        return default_sources(target, kind) if target else []
    except ml.MergeLabError:
        return []


def refresh_sources(kind: str, target: str | None):
    """The modules of `kind`; selected: those of tasks other than the target."""
    return gr.Dropdown(choices=module_choices(kind), value=_default_sources(kind, target), multiselect=True)


def refresh(kind: str, target: str | None, sources: list[str] | None):
    """On opening the tab: the pickers' choices; an empty target becomes one the zoo has modules of other
    tasks for, empty sources become those modules (a choice already made is kept)."""
    kind = kind if kind in PEFT_KINDS else "lora"
    target_value = target or target_default(kind)
    source_value = sources or _default_sources(kind, target_value)
    return (gr.Dropdown(choices=target_choices(), value=target_value),
            gr.Dropdown(choices=module_choices(kind), value=source_value, multiselect=True))


def build(demo: gr.Blocks) -> dict:
    with gr.Tab("Ensemble", id="ensemble") as tab:
        gr.Markdown("Transfer to a target task by averaging parameter-efficient modules (LoRA, (IA)³ or prefix) "
                    "trained on other tasks, weighted by softmax(similarity / temperature), and fine-tune that "
                    "average on a few target examples (Lv et al. 2023). Targets include CoNLL-2003 NER (span F1): "
                    "sentence-task modules bring their module tensors, and the target gets its own head.")
        notice = start.notice(tab, "Ensemble")
        with gr.Row():
            target = ui.Dropdown(target_choices(), value=target_default(), label=LABELS["target"],
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
            limit = ui.Number(value=200, precision=0, minimum=0, label=LABELS["limit"], info="0 = all")
        about = gr.Markdown(measure_info(DEFAULT_MEASURE), elem_id="ens-measure-info")
        log10_t = ui.Slider(-3, 2, value=math.log10(get_measure(DEFAULT_MEASURE).default_temperature), step=0.05,
                            label=LABELS["temperature"], elem_id="ens-temperature", info=temperature_info())
        with gr.Row():
            run = gr.Button("Measure and transfer", variant="primary", elem_id="ens-run")
            halt = stop_button("ens-stop")
        status = gr.Markdown(elem_id="ens-status")
        with gr.Row(equal_height=False):
            plot = gr.Plot(label="Similarity and weights", elem_id="ens-plot", scale=3)
            table = gr.Dataframe(few_shot_table([]), headers=TABLE_COLUMNS, label=TABLE_LABEL, interactive=False,
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
        measuring.success(table_label, state, table, api_visibility="private", show_progress="hidden", queue=False)
        on_stop(halt, [measuring], status)
        matrix = matrix_run.click(run_matrix, [kind, similarity, log10_t, shots], [matrix_plot, matrix_state],
                                  api_name="ensemble_matrix", concurrency_id="gpu")
        on_stop(matrix_halt, [matrix], status)
        similarity.change(measure_info, similarity, about, api_visibility="private", show_progress="hidden")
        log10_t.change(weights_view, [state, log10_t], plot, api_visibility="private", show_progress="hidden")
        log10_t.change(status_view, [state, log10_t], status, api_visibility="private", show_progress="hidden")
        log10_t.change(matrix_view, [matrix_state, log10_t], matrix_plot, api_visibility="private",
                       show_progress="hidden")
        for trigger in (kind.change, target.change):
            trigger(refresh_sources, [kind, target], sources, api_visibility="private")
        on_open(demo, tab, refresh, [kind, target, sources], [target, sources])
        notice.then(refresh, [kind, target, sources], [target, sources], api_visibility="private",
                    show_progress="hidden")
    return {"plot": plot, "table": table}
