"""Getting started: what each tab needs from the zoo, and the one-click demo zoo.

The demo recipe builds, in a few minutes on a laptop's CPU, a small zoo that makes every tab usable.
Locally the Zoo tab (and each tab whose needs are missing) offers the build; in public mode a visitor
cannot train, so the app provisions the zoo itself at start (`settings.provision()`): it downloads the
published zoo (`MERGELAB_ZOO_REPO`) when one is configured, else builds the demo recipe in a background
thread, and every visitor sees its progress.
"""

from __future__ import annotations

import hmac
import threading
import time

import gradio as gr

import merging_core as ml

from .common import engine_errors, progress_fn

DEMO = "demo"
_lock = threading.Lock()  # one build at a time in this process (two would train the same entries)
_state = {"running": False, "text": "", "error": ""}  # the running build, as every visitor sees it


def _demo() -> ml.zoo.Recipe | None:
    """The demo recipe (None where the recipes folder has none: a custom install)."""
    try:
        return ml.zoo.load_recipe(DEMO)
    except ml.MergeLabError:
        return None


def demo_offered() -> bool:
    """Whether to offer the demo build: locally, while some of its models are missing."""
    recipe = _demo()
    return not ml.settings.public_mode() and recipe is not None and bool(recipe.missing())


def demo_minutes() -> str:
    minutes = getattr(_demo(), "minutes", None)
    return f"about {minutes:g} min" if minutes else "a few minutes"


def readiness_text() -> str:
    """Markdown: which tabs the zoo is ready for, and what the others need."""
    rows = ml.zoo.readiness()
    if all(r["ready"] for r in rows):
        return ""
    lines = ["### Getting started", "", "Every tab works on the checkpoints of the zoo. What it has now:", ""]
    for r in rows:
        state = "ready" if r["ready"] else f"needs {r['needs']} (recipe {' or '.join(r['recipes'])})"
        lines.append(f"- **{r['tab']}**: {state}")
    recipe = _demo()
    missing = recipe.missing() if recipe is not None else []
    if missing:
        if ml.settings.public_mode():
            lines += ["", "The app is preparing the demo zoo; its progress shows below."]
        else:
            lines += ["", f"The demo zoo ({len(missing)} small models, {demo_minutes()} on a 2-core CPU) makes every "
                          "tab usable; the full recipes are under *Build a recipe*."]
    return "\n".join(lines)


def tab_notice(tab: str) -> str:
    """One line for the top of a tab whose needs the zoo lacks (empty when it is ready)."""
    row = next((r for r in ml.zoo.readiness() if r["tab"] == tab), None)
    if row is None or row["ready"]:
        return ""
    how = ("the app is preparing the demo zoo (Zoo tab)" if ml.settings.public_mode()
           else f"build the demo zoo ({demo_minutes()}) with the button here or in the Zoo tab")
    return f"This tab needs {row['needs']} in the zoo (recipe {' or '.join(row['recipes'])}): {how}."


def check_admin(token: str | None) -> None:
    """Public mode: building (training) is for the admin only, and off when no admin token is configured."""
    if not ml.settings.public_mode():
        return
    expected = ml.settings.admin_token()
    if expected is None:
        raise ml.MergeLabError("building the zoo is off in this public app", param="token")
    if not hmac.compare_digest((token or "").encode(), expected.encode()):
        raise ml.MergeLabError("building the zoo needs the admin token", param="token")


def run_build(recipe: str, progress: ml.progress.ProgressFn | None) -> str:
    """Build `recipe` (or download the published zoo, for the demo when one is configured); one at a time.
    Returns a one-line note of what was done."""
    if not _lock.acquire(blocking=False):
        raise ml.MergeLabError(f"the zoo is being built already ({_state['text'] or 'starting'}); wait for it to "
                               "finish", param="recipe")
    started = time.perf_counter()

    def shared(fraction: float, desc: str) -> None:
        _state["text"] = f"{desc} ({fraction:.0%})"
        if progress is not None:
            progress(fraction, desc)

    try:
        _state.update(running=True, text="starting", error="")
        if recipe == DEMO and ml.settings.zoo_repo():
            rows = ml.zoo.download(progress=shared)
        else:
            rows = ml.zoo.build(recipe, progress=shared)
    except ml.MergeLabError as exc:
        _state["error"] = exc.message
        raise
    finally:
        _state.update(running=False, text="")
        _lock.release()
    made = [r for r in rows if r["status"] != "kept"]
    verb = "Downloaded" if any(r["status"] == "downloaded" for r in rows) else "Built"
    return (f"{verb} {len(made)} model(s) in {time.perf_counter() - started:.0f} s; "
            f"kept {len(rows) - len(made)} that were already there.")


@engine_errors(labels={"token": "Admin token", "recipe": "Recipe"})
def build_demo(token: str = "", request: gr.Request = None, progress: gr.Progress = gr.Progress()) -> str:
    check_admin(token)
    return run_build(DEMO, progress_fn(progress, request))


def provision_in_background() -> threading.Thread | None:
    """Public mode at start: when the zoo lacks what a tab needs, fill it with the demo (downloaded or built)
    without a visitor asking. Returns the thread (None when nothing is to do)."""
    if ml.settings.provision() != DEMO or all(r["ready"] for r in ml.zoo.readiness()) or (
            _demo() is None and not ml.settings.zoo_repo()):
        return None

    def work() -> None:
        try:
            run_build(DEMO, None)
        except ml.MergeLabError as exc:  # shown to visitors in the Zoo tab
            _state["error"] = exc.message

    thread = threading.Thread(target=work, name="mergelab-provision", daemon=True)
    thread.start()
    return thread


def build_status() -> str:
    """The running build, for every visitor (polled by a timer): '' when nothing is running."""
    if _state["running"]:
        return f"Building the zoo: {_state['text']}"
    if _state["error"]:
        return f"The last zoo build stopped: {_state['error']}"
    return ""


def notice(tab: gr.Tab, name: str):
    """At the top of tab `name`: what it needs from the zoo when that is missing, with a one-click build of
    the demo zoo (locally); hidden once the zoo has it, and refreshed each time the tab is opened.
    Returns the event that ends a build, for the tab to chain the refresh of its pickers with `.then`."""
    first = tab_notice(name)
    with gr.Row(visible=bool(first), elem_classes="ml-notice") as row:
        text = gr.Markdown(first, elem_classes="ml-notice-text")
        button = gr.Button(f"Build the demo zoo ({demo_minutes()})", variant="primary", scale=0, min_width=300,
                           visible=not ml.settings.public_mode())

    def shown() -> tuple:
        line = tab_notice(name)
        return gr.Row(visible=bool(line)), line

    tab.select(shown, None, [row, text], api_visibility="private", show_progress="hidden", queue=False)
    building = button.click(build_demo, None, text, api_visibility="private", concurrency_id="gpu",
                            show_progress_on=text)
    return building.then(shown, None, [row, text], api_visibility="private", show_progress="hidden", queue=False)
