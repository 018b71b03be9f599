"""Glue between Gradio events and the engine: errors, progress, model choices. No tensor math here."""

from __future__ import annotations

import contextvars
import functools
import inspect
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
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


STATUS_EVERY = 0.5  # seconds between status updates while a step runs
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


# A single-choice picker whose labels run long (models: name · family · size · task): its text ends in an
# ellipsis before the arrow instead of running under it (assets/style.css).
PICKER = "ml-picker"


def model_choices(request: gr.Request | None = None) -> list[tuple[str, str]]:
    """Zoo entries first (built ones), then the packaged MiniLM, then results (merges, aligned models,
    uploads): the session's own in public mode, every one under $MERGELAB_HOME locally. Each is a (label,
    name) pair: the label says the family, size and task ("sst2-s0 · bert · 22.7M · SST-2", `catalog`),
    the name is what the handlers get. Labels hold names only, never a server path."""
    if request is None and ml.settings.public_mode():  # building the app: no visitor yet
        own, root = [], None
    else:
        visitor = session(request)
        own, root = visitor.results(), visitor.results_root
    zoo = [(ml.catalog.label(row["name"], Path(row["path"])), row["name"]) for row in ml.zoo.entries()]
    results = [(ml.catalog.label(name, root / name), name) for name in own]
    return zoo + [(ml.catalog.label(ml.models.MINILM), ml.models.MINILM)] + results


def names(choices: list[tuple[str, str]]) -> list[str]:
    """The names (values) of labelled choices."""
    return [value for _, value in choices]


def task_choices(kinds: tuple[str, ...] | None = None, only: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """Tasks to pick, as (title, id) pairs ("SST-2", "sst2"): those whose data is here (all known ones when
    there is no data root: the hub may still serve them), without internal tasks such as pretraining text;
    with `only`, just those (the tasks picked models can be scored on, `scorable_tasks`)."""
    here = ml.data.available_tasks() or list(ml.TASKS)
    specs = [ml.get_task(name) for name in here]
    return [(s.title, s.name) for s in specs if s.listed and (kinds is None or s.kind in kinds)
            and (only is None or s.name in only)]


def scorable_tasks(models: Iterable[str | None], request: gr.Request | None = None) -> tuple[list[str] | None, set]:
    """The tasks at least one of the picked `models` can be scored on (their heads decide, `catalog`), and
    the head kinds they have. None for the tasks when no model is picked, or one is not a readable
    checkpoint (a hub id, a typo): then every task stays offered and scoring says what does not fit."""
    visitor = session(request)
    tasks: set[str] = set()
    kinds: set = set()
    picked = False
    for name in models:
        if not isinstance(name, str) or not name.strip():
            continue
        try:
            info = ml.catalog.describe(visitor.model(name))
        except ml.MergeLabError:
            return None, set()
        found = info.scorable_tasks()
        if found is None:
            return None, set()
        tasks.update(found)
        kinds.add(info.head_kind)
        picked = True
    return (sorted(tasks) if picked else None), kinds


def tasks_info(offered: list[str] | None, kinds: set, default: str, always: str = "") -> str:
    """A task picker's help: `default` while every task is offered, else which tasks the picked models'
    heads can be scored on (and how a causal LM is scored); `always` follows either."""
    if offered is None:
        text = default
    elif not offered:
        text = "none: no picked model has a task head (fine-tune it first, or pick a model with one)"
    else:
        lms = [f"{name}: text by {how}" for kind, name, how in (("causal", "a causal LM", "next-token loss"),
                                                               ("seq2seq", "a T5", "span corruption")) if kind in kinds]
        how = f" ({'; '.join(lms)}; classification tasks by rank classification of their prompts)" if lms else ""
        text = "the tasks the picked models' heads can be scored on" + how
    return "; ".join(part for part in (text, always) if part)


def task_update(models: Iterable[str | None], value: list[str] | None, default_info: str,
                request: gr.Request | None = None, preferred: list[str] | None = None,
                always: str = "") -> gr.CheckboxGroup:
    """A task picker showing only the tasks the picked models can be scored on, ticking `preferred` (a
    model's own tasks), else the ticked ones still offered, else the only one offered, else, for a causal
    LM or a T5, its text task (what a pretrained language model is scored on)."""
    offered, kinds = scorable_tasks(models, request)
    choices = task_choices(only=offered)
    ids = names(choices)
    text = [t for t in ids if kinds & {"causal", "seq2seq"} and ml.get_task(t).kind == "mlm"][:1]
    kept = ([t for t in preferred or [] if t in ids] or [t for t in value or [] if t in ids]
            or (ids if len(ids) == 1 else text))
    return gr.CheckboxGroup(choices=choices, value=kept, info=tasks_info(offered, kinds, default_info, always))


def multitask_choices() -> list[tuple[str, str]]:
    """Zoo models with heads for several tasks (multi-task models, multi-head merges), labelled."""
    return [(ml.catalog.label(row["name"], Path(row["path"])), row["name"]) for row in ml.zoo.entries()
            if len(row.get("tasks") or []) > 1]


def on_open(demo: gr.Blocks, tab: gr.Tab, handler: Callable, inputs: list | None, outputs: list) -> None:
    """Refresh a tab's pickers when the page loads and each time the tab is opened: models built, merged
    or aligned in another tab since then show up without a reload."""
    for trigger in (demo.load, tab.select):
        trigger(handler, inputs, outputs, api_visibility="private", show_progress="hidden", queue=False)


def in_background(work: Callable[[ml.progress.ProgressFn], Iterator[tuple[str, Any]]], report: ml.progress.ProgressFn,
                  every: float = STATUS_EVERY) -> Iterator[tuple[str, Any]]:
    """Run `work(progress)` in a worker thread; yield what it yields, and ("status", description) for its
    progress reports, at most one per `every` seconds (the latest), also while one long step runs.

    The worker's progress calls `report` (Gradio's progress bar, and Stop: it raises `Cancelled` there), and
    raises `Cancelled` itself once this generator is closed (the event was cancelled), so the engine never
    runs on unseen. The worker's exceptions are raised here."""
    events: queue.Queue = queue.Queue()
    closed = threading.Event()

    def relay(fraction: float, desc: str) -> None:
        if closed.is_set():
            raise ml.progress.Cancelled()
        report(fraction, desc)
        events.put(("status", desc))

    def body() -> None:
        try:
            for event in work(relay):
                if closed.is_set():
                    raise ml.progress.Cancelled()
                events.put(event)
        except BaseException as exc:  # noqa: BLE001 -- handed to the generator, which raises it in the handler
            events.put(("error", exc))
        else:
            events.put(("end", None))

    # the copied context carries Gradio's request context, which its progress bar needs
    threading.Thread(target=contextvars.copy_context().run, args=(body,), daemon=True, name="view-worker").start()
    latest, shown_at = None, float("-inf")
    try:
        while True:
            try:
                event, value = events.get(timeout=every)
            except queue.Empty:
                event, value = "wait", None
            if event == "error":
                raise value
            if event == "end":
                return
            if event == "status":
                latest = value
            elif event != "wait":
                yield event, value
            if latest is not None and time.monotonic() - shown_at >= every:
                yield "status", latest
                latest, shown_at = None, time.monotonic()
    finally:
        closed.set()
