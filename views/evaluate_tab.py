"""Evaluate tab: score one model on the tasks its head fits, as a table."""

from __future__ import annotations

import gradio as gr
import pandas as pd

import merging_core as ml

from . import controls as ui
from . import start
from .common import (PICKER, all_or, engine_errors, model_choices, models_info, names, on_open, on_stop, progress_fn,
                     stop_button, task_choices, task_update)
from .session import redact, session

COLUMNS = ["task", "split", "n", "metric", "score", "loss", "other metrics", "note"]
TASKS_INFO = "tasks found in the data root (MERGELAB_DATA)"


def result_table(results: list[dict]) -> pd.DataFrame:
    rows = []
    for r in results:
        if "error" in r:
            rows.append({"task": ml.tasks.title(r["task"]), "split": r["split"], "note": r["error"]})
            continue
        metric, score = ml.evaluation.headline(r)
        others = {k: v for k, v in r.items() if k not in ("task", "split", "n", "loss", metric)}
        # named from the scores: a language model's loss says which loss (next-token, MLM)
        label = ml.metrics.metric_label(metric, r)
        rows.append({"task": ml.tasks.title(r["task"]), "split": r["split"], "n": r["n"], "metric": label,
                     "score": round(score, 4),
                     "loss": round(r["loss"], 4),
                     "other metrics": ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in others.items()),
                     "note": ""})
    return pd.DataFrame(rows, columns=COLUMNS)


@engine_errors(labels={"model": "Model", "models": "Model", "tasks": "Tasks", "limit": "Limit", "split": "Split"})
def run_evaluation(model: str, tasks: list[str], split: str, limit: float | None, request: gr.Request = None,
                   progress: gr.Progress = gr.Progress()) -> pd.DataFrame:
    visitor = session(request)
    if split not in ("dev", "test", "train"):  # the radio lets an empty value through
        raise ml.MergeLabError(f"pick a split (dev, test or train), not {split!r:.40}", param="split")
    model = visitor.model(model, "model")
    limit = visitor.bound("examples", all_or(limit, "limit"), "limit")
    results = ml.evaluation.evaluate_many(model, tasks, split, limit, progress=progress_fn(progress, request))
    return result_table([{**r, "error": redact(r["error"])} if "error" in r else r for r in results])


def own_task(model: str | None) -> list[str] | None:
    """The task(s) a zoo model was trained on (every head of a multi-task model), to preselect them; a model
    pretrained on the data-root text is scored on WikiText-2 (`tasks.listed_as`)."""
    for row in ml.zoo.entries():
        if row["name"] == model and row["tasks"]:
            return [ml.tasks.listed_as(t) for t in row["tasks"]]
    return None


def pick_tasks(model: str | None, tasks: list[str] | None, request: gr.Request = None) -> gr.CheckboxGroup:
    """The tasks the picked model's head can be scored on (a causal LM: text tasks), its own ticked."""
    return task_update([model], tasks, TASKS_INFO, request, preferred=own_task(model))


def refresh(model: str | None, tasks: list[str] | None, request: gr.Request = None) -> tuple:
    """On page load and when the tab opens: the zoo may have grown, and there may be new results. The
    picked model stays (a first fine-tuned model is picked when none is, or it is the bare MiniLM)."""
    choices = model_choices(request)
    if model and model != ml.models.MINILM:
        return gr.Dropdown(choices=choices), pick_tasks(model, tasks, request)
    first = names(choices)[0]
    return gr.Dropdown(choices=choices, value=first), pick_tasks(first, [], request)


def build(demo: gr.Blocks) -> dict:
    with gr.Tab("Evaluate", id="evaluate") as tab:
        gr.Markdown("Score a checkpoint on task dev sets. Tasks offers those the model's head fits (same head "
                    "type and labels; a causal LM: text by next-token loss, a T5 by span corruption, "
                    "classification tasks by rank classification of their prompts); a row that cannot be "
                    "scored says why.")
        notice = start.notice(tab, "Evaluate")
        with gr.Row():
            choices = model_choices()
            first = names(choices)[0]
            model = ui.Dropdown(choices, value=first, label="Model", allow_custom_value=True, scale=2, min_width=320,
                                info=models_info(), elem_id="eval-model", elem_classes=PICKER)
            # every task at first, so an API caller may name any (scoring says what does not fit); a browser
            # gets the picked model's tasks as soon as the page loads (`refresh`)
            here = task_choices()
            # the first model's own tasks where they are offered (a pretrained model's `corpus` is not)
            own = [t for t in own_task(first) or [] if t in names(here)]
            tasks = ui.CheckboxGroup(here, value=own or [here[0][1]], label="Tasks", scale=3,
                                     elem_id="eval-tasks", info=TASKS_INFO)
        with gr.Row():
            split = ui.Radio(["dev", "test", "train"], value="dev", label="Split")
            limit = ui.Number(value=0, precision=0, minimum=0, label="Limit", elem_id="eval-limit",
                              info="first N examples; 0 = all")
            run = gr.Button("Evaluate", variant="primary", elem_id="eval-run")
            halt = stop_button("eval-stop")
        table = gr.Dataframe(headers=COLUMNS, label="Scores", interactive=False, elem_id="eval-table",
                             buttons=["copy"], wrap=True)
        model.change(pick_tasks, [model, tasks], tasks, api_name="own_task", api_visibility="private")
        scoring = run.click(run_evaluation, [model, tasks, split, limit], table, api_name="evaluate",
                            concurrency_id="gpu")
        on_stop(halt, [scoring], None)
        on_open(demo, tab, refresh, [model, tasks], [model, tasks])
        notice.then(refresh, [model, tasks], [model, tasks], api_visibility="private", show_progress="hidden")
    return {"model": model, "table": table}
