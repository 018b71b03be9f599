"""Zoo tab: the checkpoints available to explore, their provenance and dev scores; build the zoo."""

from __future__ import annotations

import gradio as gr
import pandas as pd

import merging_core as ml

from . import controls as ui
from .common import engine_errors, on_stop, progress_fn, stop_button
from .session import redact
from .start import build_demo, build_status, check_admin, demo_minutes, demo_offered, readiness_text, run_build

# family and params: what the model pickers show of each entry (`catalog`), as `zoo list` prints them
COLUMNS = ["name", "family", "params", "head", "task", "kind", "seed", "steps", "partition", "metric", "score",
           "recipe"]


def zoo_table() -> pd.DataFrame:
    rows = ml.zoo.listing()
    frame = pd.DataFrame(rows, columns=COLUMNS + ["dev", "path"])[COLUMNS]
    # an entry that records no task (a pretrained causal LM) has none to title
    frame["task"] = [", ".join(ml.tasks.title(t) for t in task.split(",") if t) if isinstance(task, str) else ""
                     for task in frame["task"]]
    return frame.round({"score": 4})


def recipes() -> list[str]:
    return sorted(p.stem for p in ml.zoo.RECIPES.glob("*.yaml"))


@engine_errors(labels={"token": "Admin token", "recipe": "Recipe"})
def build_zoo(recipe: str, token: str = "", request: gr.Request = None,
              progress: gr.Progress = gr.Progress()) -> tuple[pd.DataFrame, str]:
    check_admin(token)
    if recipe not in recipes():
        raise ml.MergeLabError(f"unknown recipe {str(recipe)[:80]!r}; choose one of: {', '.join(recipes())}",
                               param="recipe")
    note = run_build(recipe, progress_fn(progress, request))
    return zoo_table(), note


def recipe_info(name: str | None) -> str:
    """What a recipe builds and how long it takes, before the click."""
    if name not in recipes():
        return ""
    recipe = ml.zoo.load_recipe(name)
    missing = recipe.missing()
    took = f"; builds in about {recipe.minutes:g} min on a 2-core CPU" if recipe.minutes else ""
    todo = (f"{len(missing)} of its {len(recipe.entries)} models still to build" if missing
            else f"all {len(recipe.entries)} models built")
    return f"{recipe.about}{took} · {todo}."


def recipe_refusal(name: str | None, status: str | None = None):
    """On picking a recipe: the engine's one line, in the status, when an entry's base model belongs to a
    family that cannot be fine-tuned yet (building would stop there); such a line is cleared once another
    recipe is picked, any other status is left as it is."""
    refused = ml.zoo.untrainable(ml.zoo.load_recipe(name)) if name in recipes() else ""
    if refused:
        return redact(f"⚠ {refused}")
    return "" if (status or "").startswith("⚠ ") else gr.skip()


def opened() -> tuple:
    """The table, the getting-started notes and the demo's button, whenever the tab is shown and after a
    build."""
    note = readiness_text()
    return zoo_table(), gr.Markdown(note, visible=bool(note)), gr.Row(visible=demo_offered())


def tick() -> tuple:
    """While the public app builds its own zoo: its progress for every visitor, and the table as entries
    land; the timer stops once nothing is running."""
    text = build_status()
    note = readiness_text()
    running = text.startswith("Building")
    return zoo_table(), gr.Markdown(note, visible=bool(note)), text, gr.Timer(active=running)


def build(demo: gr.Blocks) -> dict:
    public = ml.settings.public_mode()
    with gr.Tab("Zoo", id="zoo") as tab:
        gr.Markdown("Checkpoints to explore: fine-tuned from the same pretrained model on different tasks, "
                    "seeds, data partitions and training steps. Scores are on each task's dev split.")
        first = readiness_text()
        start = gr.Markdown(first, visible=bool(first), elem_id="zoo-start")
        with gr.Row(visible=demo_offered()) as demo_row:
            demo_button = gr.Button(f"Build the demo zoo ({demo_minutes()})", variant="primary", scale=0,
                                    min_width=300, elem_id="zoo-demo")
            demo_halt = stop_button("zoo-demo-stop")
        demo_status = gr.Markdown(elem_id="zoo-demo-status")
        table = gr.Dataframe(value=zoo_table, label="Models", interactive=False, elem_id="zoo-table",
                             buttons=["copy", "fullscreen"], wrap=True)
        with gr.Accordion("Build a recipe", open=False, elem_id="zoo-recipes"):
            with gr.Row():
                names = recipes()
                recipe = ui.Dropdown(names, value="default" if "default" in names else (names or [None])[0],
                                     label="Recipe", scale=2, elem_id="zoo-recipe")
                token = gr.Textbox("", type="password", label="Admin token", scale=1, elem_id="zoo-token",
                                   visible=public, info="building trains models: admin only here")
                build_button = gr.Button("Build zoo", variant="primary", elem_id="zoo-build", scale=1)
                halt = stop_button("zoo-stop")
                refresh = gr.Button("Refresh", elem_id="zoo-refresh", scale=1)
            about = gr.Markdown(recipe_info(recipe.value), elem_id="zoo-recipe-info")
        status = gr.Markdown(elem_id="zoo-status")
        timer = gr.Timer(2.0, active=public)  # public mode: the app's own build, seen by every visitor

        building = build_button.click(build_zoo, [recipe, token], [table, status], api_name="zoo_build",
                                      concurrency_id="gpu")
        building.then(opened, None, [table, start, demo_row], api_visibility="private", queue=False)
        on_stop(halt, [building], status)
        demo_building = demo_button.click(build_demo, [token], demo_status, api_name="zoo_demo",
                                          concurrency_id="gpu")
        demo_building.then(opened, None, [table, start, demo_row], api_visibility="private", queue=False)
        on_stop(demo_halt, [demo_building], demo_status)
        recipe.change(recipe_info, recipe, about, api_visibility="private", show_progress="hidden")
        recipe.change(recipe_refusal, [recipe, status], status, api_visibility="private", show_progress="hidden")
        refresh.click(zoo_table, None, table, api_name="zoo_list")
        timer.tick(tick, None, [table, start, status, timer], api_visibility="private", show_progress="hidden",
                   queue=False)
        tab.select(opened, None, [table, start, demo_row], api_visibility="private", show_progress="hidden",
                   queue=False)
    return {"table": table, "start": start}
