"""Zoo tab: the checkpoints available to explore, their provenance and dev scores; build the zoo."""

from __future__ import annotations

import hmac

import gradio as gr
import pandas as pd

import merging_core as ml

from . import controls as ui
from .common import engine_errors, on_stop, progress_fn, stop_button

COLUMNS = ["name", "task", "kind", "seed", "steps", "partition", "metric", "score"]


def zoo_table() -> pd.DataFrame:
    rows = ml.zoo.entries()
    frame = pd.DataFrame(rows, columns=COLUMNS + ["dev", "path"])[COLUMNS]
    return frame.round({"score": 4})


def recipes() -> list[str]:
    return sorted(p.stem for p in ml.zoo.RECIPES.glob("*.yaml"))


def check_admin(token: str | None) -> None:
    """Public mode: building (training) is for the admin only, and off when no admin token is configured."""
    if not ml.settings.public_mode():
        return
    expected = ml.settings.admin_token()
    if expected is None:
        raise ml.MergeLabError("building the zoo is off in this public app", param="token")
    if not hmac.compare_digest((token or "").encode(), expected.encode()):
        raise ml.MergeLabError("building the zoo needs the admin token", param="token")


@engine_errors(labels={"token": "Admin token", "recipe": "Recipe"})
def build_zoo(recipe: str, token: str = "", request: gr.Request = None,
              progress: gr.Progress = gr.Progress()) -> tuple[pd.DataFrame, str]:
    check_admin(token)
    if recipe not in recipes():
        raise ml.MergeLabError(f"unknown recipe {str(recipe)[:80]!r}; choose one of: {', '.join(recipes())}",
                               param="recipe")
    rows = ml.zoo.build(recipe, progress=progress_fn(progress, request))
    built = [r for r in rows if r["status"] == "built"]
    note = (f"Built {len(built)} model(s) in {sum(r['seconds'] for r in built):.0f} s; "
            f"kept {len(rows) - len(built)} that were already there.")
    return zoo_table(), note


def build(demo: gr.Blocks) -> dict:
    with gr.Tab("Zoo", id="zoo"):
        gr.Markdown("Checkpoints to explore: fine-tuned from the same pretrained model on different tasks, "
                    "seeds, data partitions and training steps. Scores are on each task's dev split.")
        table = gr.Dataframe(value=zoo_table, label="Models", interactive=False, elem_id="zoo-table",
                             buttons=["copy", "fullscreen"])
        with gr.Row():
            names = recipes()
            recipe = ui.Dropdown(names, value="default" if "default" in names else (names or [None])[0], label="Recipe",
                                 scale=2)
            token = gr.Textbox("", type="password", label="Admin token", scale=1, elem_id="zoo-token",
                               visible=ml.settings.public_mode(), info="building trains models: admin only here")
            build_button = gr.Button("Build zoo", variant="primary", elem_id="zoo-build", scale=1)
            halt = stop_button("zoo-stop")
            refresh = gr.Button("Refresh", elem_id="zoo-refresh", scale=1)
        status = gr.Markdown(elem_id="zoo-status")
        building = build_button.click(build_zoo, [recipe, token], [table, status], api_name="zoo_build",
                                      concurrency_id="gpu")
        on_stop(halt, [building], status)
        refresh.click(zoo_table, None, table, api_name="zoo_list")
    return {"table": table}
