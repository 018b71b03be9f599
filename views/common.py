"""Glue between Gradio events and the engine: errors, progress, model choices. No tensor math here."""

from __future__ import annotations

import functools
import inspect
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import gradio as gr

import merging_core as ml

from .session import redact, session


def engine_errors(handler: Callable | None = None, *, labels: Mapping[str, str] | None = None) -> Callable:
    """Show a bad input as a one-line `gr.Error` (also reaches gradio_client as AppError), naming the
    offending input by its control's label (`labels`: engine name -> label, e.g. "base" -> "Base model")."""
    if handler is None:
        return functools.partial(engine_errors, labels=labels)

    def ui_error(exc: ml.MergeLabError) -> gr.Error:
        return gr.Error(redact(exc.render(labels or {})), print_exception=False)

    if inspect.isgeneratorfunction(handler):  # a streaming handler fails while it is iterated

        @functools.wraps(handler)
        def streaming(*args: Any, **kwargs: Any):
            try:
                yield from handler(*args, **kwargs)
            except ml.MergeLabError as exc:
                raise ui_error(exc) from exc

        return streaming

    @functools.wraps(handler)
    def wrapper(*args: Any, **kwargs: Any):
        try:
            return handler(*args, **kwargs)
        except ml.MergeLabError as exc:
            raise ui_error(exc) from exc

    return wrapper


_stops: dict[str, float] = {}  # session -> when it last pressed Stop (monotonic clock)
_stops_lock = threading.Lock()
_STOP_MEMORY = 3600.0  # forget a Stop after an hour


def whole(value: object, param: str) -> int:
    """A slider's count as a whole number (an API caller may send NaN or inf, which pass a slider's bounds)."""
    if isinstance(value, (int, float)) and math.isfinite(value):
        return int(value)
    raise ml.MergeLabError(f"{value!r:.40} is not a number", param=param)


def all_or(value: object, param: str) -> int | None:
    """A Limit box's count: None (all) for 0, empty, NaN or infinity, else a whole number of at least 1.
    (Gradio shows an empty Number as 0, so 0 must mean "all", not an error.)"""
    if value is None or value == "" or value == 0 or (isinstance(value, float) and not math.isfinite(value)):
        return None
    count = whole(value, param)
    if count < 0:
        raise ml.MergeLabError(f"{count} is not a count; give a number of examples, or 0 for all", param=param)
    return count or None


def progress_fn(progress: gr.Progress, request: gr.Request | None = None) -> ml.progress.ProgressFn:
    """The engine's (fraction, description) callback, drawn by Gradio's progress bar. It also ends the job
    (raising `Cancelled` inside the engine's loop) once the same session presses Stop."""
    key = getattr(request, "session_hash", None)
    started = time.monotonic()

    def report(fraction: float, desc: str) -> None:
        if key is not None and _stops.get(key, float("-inf")) >= started:
            raise ml.progress.Cancelled()
        progress(fraction, desc=desc)

    return report


def stop(request: gr.Request = None) -> str:
    """Stop every job this session started before now (each ends at its next progress report)."""
    key = getattr(request, "session_hash", None)
    if key is None:
        return ""
    now = time.monotonic()
    with _stops_lock:
        for old in [k for k, at in _stops.items() if now - at > _STOP_MEMORY]:
            del _stops[old]
        _stops[key] = now
    return "Stopped."


def stop_button(elem_id: str) -> gr.Button:
    """A Stop button, placed beside a long action's button (wired by `on_stop`)."""
    return gr.Button("Stop", variant="stop", min_width=80, scale=0, elem_id=elem_id)


def on_stop(button: gr.Button, runs: list[Any], status: gr.components.Component | None, *, api: bool = False) -> None:
    """Stop cancels the events in the browser and ends the engine's work; with `api`, it is also the
    `/stop` endpoint, which stops every job of the caller's session."""
    button.click(stop, None, status, cancels=runs, queue=False, api_name="stop" if api else f"stop_{button.elem_id}",
                 api_visibility="public" if api else "private")


def models_info() -> str:
    """What a model field takes, in the app's mode."""
    if ml.settings.public_mode():
        return "zoo models, 'minilm', or your own results and uploads (merges/<name>, uploads/<name>)"
    return "zoo names, local folders, 'minilm' or hub ids"


def model_choices(request: gr.Request | None = None) -> list[str]:
    """Zoo entries first (built ones), then the packaged MiniLM, then results (merges, aligned models,
    uploads): the session's own in public mode, every one under $MERGELAB_HOME locally."""
    if request is None and ml.settings.public_mode():  # building the app: no visitor yet
        own = []
    else:
        own = session(request).results()
    return [row["name"] for row in ml.zoo.entries()] + [ml.models.MINILM] + own


def task_choices(kinds: tuple[str, ...] | None = None) -> list[tuple[str, str]]:
    """Tasks to pick, as (title, id) pairs ("SST-2", "sst2"): those whose data is here (all known ones when
    there is no data root: the hub may still serve them), without internal tasks such as pretraining text."""
    here = ml.data.available_tasks() or list(ml.TASKS)
    specs = [ml.get_task(name) for name in here]
    return [(s.title, s.name) for s in specs if s.listed and (kinds is None or s.kind in kinds)]


def multitask_choices() -> list[str]:
    """Zoo models with heads for several tasks (multi-task models, multi-head merges)."""
    return [row["name"] for row in ml.zoo.entries() if len(row.get("tasks") or []) > 1]


def on_open(demo: gr.Blocks, tab: gr.Tab, handler: Callable, inputs: list | None, outputs: list) -> None:
    """Refresh a tab's pickers when the page loads and each time the tab is opened: models built, merged
    or aligned in another tab since then show up without a reload."""
    for trigger in (demo.load, tab.select):
        trigger(handler, inputs, outputs, api_visibility="private", show_progress="hidden", queue=False)
