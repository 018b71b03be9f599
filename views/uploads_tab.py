"""Upload tab: bring your own checkpoint (safetensors weights, config, tokenizer), checked before it is kept."""

from __future__ import annotations

import gradio as gr

import merging_core as ml
from merging_core.uploads import ACCEPTED, import_upload, notes

from .common import engine_errors
from .session import session

LOCAL_MAX_BYTES = 64 * 2**30  # local mode: the user's own machine, so only a bound against mistakes


@engine_errors(labels={"files": "Checkpoint files", "out": "Name"})
def upload_model(files: list[str] | None, name: str, request: gr.Request = None) -> str:
    visitor = session(request)
    out = visitor.output("uploads", name, "upload")
    limits = visitor.limits or ml.settings.limits()
    max_bytes = limits.upload_mb * 2**20 if limits else LOCAL_MAX_BYTES
    path = import_upload(list(files or []), out, max_bytes=max_bytes)
    shown = visitor.shown(path)
    lines = [f"Uploaded **{shown}**: pick it by this name in any model picker (reload the page to see it listed)."]
    lines += [f"- Note: {n}" for n in notes(path)]
    return "\n".join(lines)


def build(demo: gr.Blocks) -> dict:
    with gr.Tab("Upload", id="upload"):
        public = ml.settings.public_mode()
        where = ("Uploaded models appear in every model picker as `uploads/<name>`, for this session only."
                 if public else
                 "Uploaded models are kept under `$MERGELAB_HOME/uploads/<name>`; pick them by that path.")
        limits = ml.settings.limits()
        size = f" (at most {limits.upload_mb} MB in all)" if limits else ""
        gr.Markdown(f"{where} Accepted{size}: `model.safetensors` and `config.json` (required), plus tokenizer files "
                    "(`tokenizer.json`, `tokenizer_config.json`, `vocab.txt`, `special_tokens_map.json`; without them "
                    "a model with MiniLM's vocabulary gets MiniLM's tokenizer). No pickle weights, no code.")
        with gr.Row():
            files = gr.File(file_count="multiple", file_types=[".safetensors", ".json", ".txt"],
                            label="Checkpoint files", elem_id="upload-files", scale=3)
            with gr.Column(scale=1):
                name = gr.Textbox("", label="Name", placeholder="e.g. mine", elem_id="upload-name",
                                  info="letters, digits, '.', '_' and '-'; empty: upload-<time>")
                button = gr.Button("Upload", variant="primary", elem_id="upload-run")
        status = gr.Markdown(elem_id="upload-status")
        button.click(upload_model, [files, name], status, api_name="upload", concurrency_id="gpu")
    return {"files": files, "name": name, "status": status, "accepted": ACCEPTED}
