"""Glue between Gradio events and the engine: errors, progress, model choices. No tensor math here."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import gradio as gr

import merging_core as ml


def engine_errors(handler: Callable | None = None, *, labels: Mapping[str, str] | None = None) -> Callable:
    """Show a bad input as a one-line `gr.Error` (also reaches gradio_client as AppError), naming the
    offending input by its control's label (`labels`: engine name -> label, e.g. "base" -> "Base model")."""
    if handler is None:
        return functools.partial(engine_errors, labels=labels)

    def ui_error(exc: ml.MergeLabError) -> gr.Error:
        return gr.Error(exc.render(labels or {}), print_exception=False)

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


def progress_fn(progress: gr.Progress) -> ml.progress.ProgressFn:
    """The engine's (fraction, description) callback, drawn by Gradio's progress bar."""
    return lambda fraction, desc: progress(fraction, desc=desc)


def model_choices() -> list[str]:
    """Zoo entries first (built ones), then the packaged MiniLM."""
    return [row["name"] for row in ml.zoo.entries()] + [ml.models.MINILM]


def multitask_choices() -> list[str]:
    """Zoo models with heads for several tasks (multi-task models, multi-head merges)."""
    return [row["name"] for row in ml.zoo.entries() if len(row.get("tasks") or []) > 1]
