"""MergeLab's Gradio app: one module per tab, each a `build(demo)` that wires its components to engine
calls. Views never do tensor math; every button is one call into `merging_core`, exposed as a named API
endpoint (`/evaluate`, `/merge`, `/zoo_build`, `/zoo_list`, ...).
"""

from __future__ import annotations

import weakref
from pathlib import Path

import gradio as gr

import merging_core as ml
from merging_core import caches

from . import (curves_tab, ensemble_tab, evaluate_tab, merge_tab, permute_tab, start, sweep_tab, uploads_tab,
               zoo_tab)
from .session import limits_note, startup_sweep

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def _header() -> str:
    device = ml.settings.device()
    where = f"GPU ({device})" if device.type == "cuda" else "CPU"
    note = limits_note()
    return (f"# MergeLab\nCan these checkpoints be merged, how, and at what cost? Merge them, walk the paths "
            f"between them, align them, ensemble them, and score every result. "
            f"<span class='ml-device'>engine {ml.__version__} on {where}</span>" + (f"\n\n{note}" if note else ""))


def build_app() -> gr.Blocks:
    startup_sweep()  # staging folders of killed writers; expired sessions
    start.provision_in_background()  # public mode with an empty zoo: the demo, downloaded or built
    with gr.Blocks(title="MergeLab", analytics_enabled=False) as demo:
        gr.Markdown(_header(), elem_id="ml-header")
        with gr.Tabs():
            zoo_tab.build(demo)
            uploads_tab.build(demo)
            evaluate_tab.build(demo)
            merge_tab.build(demo)
            curves_tab.build(demo)
            permute_tab.build(demo)
            ensemble_tab.build(demo)
            sweep_tab.build(demo)
    # One heavy job at a time per event, and a bounded queue: a flood of requests waits or is turned away.
    demo.queue(max_size=32, default_concurrency_limit=1)
    # Give memory back to the OS: the heap after each job, and the engine's caches too once no job has run
    # nor cache been used for MERGELAB_CACHE_IDLE_S (glibc keeps freed memory otherwise). Before the server
    # starts its threads: they share two malloc arenas (unless MALLOC_ARENA_MAX says otherwise).
    caches.limit_arenas()
    app = weakref.ref(demo)

    def busy() -> bool:
        running = app()
        if running is None:
            raise ReferenceError("app closed")
        return any(job is not None for job in getattr(getattr(running, "_queue", None), "active_jobs", None) or ())

    caches.start_janitor(busy)
    return demo


def launch_kwargs() -> dict:
    """Theme and CSS go to launch() in Gradio 6; public mode bounds uploads."""
    kwargs = {"theme": gr.themes.Soft(primary_hue="indigo", secondary_hue="sky"),
              "css": (ASSETS / "style.css").read_text(), "footer_links": ["api", "gradio", "settings"]}
    limits = ml.settings.limits()
    if limits is not None:
        kwargs["max_file_size"] = f"{limits.upload_mb}mb"
    return kwargs
