"""One smoke test in a real headless Chromium: open the app, click through a tab, take a screenshot."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from .conftest import REPO, copy_model

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = REPO / "tests" / "artifacts"

playwright = pytest.importorskip("playwright.sync_api")
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed")]


@contextmanager
def app_page(width: int = 1280, height: int = 900):
    """The app launched in-process and opened in headless Chromium; yields the page."""
    from views import build_app, launch_kwargs

    demo = build_app()
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **launch_kwargs())
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url)
            yield page
            browser.close()
    finally:
        demo.close()


def picker_label(name: str) -> re.Pattern:
    """A model picker's option of the model `name`: its label starts with the name, then family, size, task."""
    return re.compile(rf"^{re.escape(name)} · ")


@contextmanager
def screenshot_on_failure(page, name: str):
    """A failed wait saves what the page showed (tests/artifacts/<name>-failed.png), then fails."""
    try:
        yield
    except (playwright.Error, AssertionError):
        page.screenshot(path=str(ARTIFACTS / f"{name}-failed.png"), full_page=True)
        raise


def test_evaluate_tab_in_chromium(app_home):
    with app_page() as page:
        page.wait_for_selector("#zoo-table")
        assert "pico-sst2" in page.inner_text("#zoo-table")
        page.screenshot(path=str(ARTIFACTS / "zoo.png"), full_page=True)

        page.get_by_role("tab", name="Evaluate").click()
        page.locator("#eval-model input").click()
        page.get_by_role("option", name="pico-sst2").click()
        # choosing a zoo model preselects its own task (a server round trip)
        sst2 = page.locator("#eval-tasks label", has_text="SST-2").locator("input")
        playwright.expect(sst2).to_be_checked(timeout=30_000)
        page.get_by_label("Limit").fill("16")
        page.locator("#eval-run").click()
        with screenshot_on_failure(page, "evaluate"):
            page.wait_for_function("document.querySelector('#eval-table').innerText.includes('accuracy')",
                                   timeout=60_000)
        page.wait_for_selector("#eval-run:not([disabled])")  # the run has finished
        page.wait_for_selector("#eval-table .pending", state="detached")
        assert "SST-2" in page.inner_text("#eval-table")  # tasks as people know them
        page.screenshot(path=str(ARTIFACTS / "evaluate.png"), full_page=True)


@pytest.fixture()
def pico_cola_entry(app_home, pico):
    """A second zoo model next to app_home's pico-sst2: a pico CoLA model."""
    entry = copy_model(pico("cola", seed=1), app_home / "zoo" / "pico-cola")
    (entry / "mergelab.json").write_text(json.dumps({"task": "cola", "kind": "full", "seed": 1, "steps": 0}))
    return entry


def test_merge_tab_in_chromium(app_home, pico_cola_entry):
    with app_page() as page:
        page.get_by_role("tab", name="Merge").click()
        page.wait_for_selector("#merge-models")
        for name in ("pico-sst2", "pico-cola"):
            page.locator("#merge-models input").click()
            page.get_by_role("option", name=picker_label(name)).click()
        page.locator("#merge-method input").click()
        page.get_by_role("option", name="TIES · data-free").click()
        # the method's docs and generated controls follow the dropdown (server round trips)
        playwright.expect(page.locator("#merge-method-doc")).to_contain_text("Yadav", timeout=30_000)
        playwright.expect(page.locator("#merge-params")).to_contain_text("density", timeout=30_000)
        page.locator("#merge-base input").click()
        page.get_by_role("option", name=picker_label("pico-sst2")).click()
        density = page.locator("#merge-params input[type=number]").first
        density.fill("0.5")
        density.press("Enter")
        page.locator("#merge-limit input").fill("8")
        page.locator("#merge-components-box").get_by_text("Components, heads").click()  # open the accordion
        page.locator("#merge-dtype").get_by_text("bf16").click()
        page.locator("#merge-run").click()
        with screenshot_on_failure(page, "merge"):
            page.wait_for_function("document.querySelector('#merge-table').innerText.includes('ensemble')",
                                   timeout=60_000)
            playwright.expect(page.locator("#merge-status")).to_contain_text("first 8 examples", timeout=30_000)
        page.wait_for_selector("#merge-table .pending", state="detached")
        text = page.inner_text("#merge-table")
        assert "ties-" in text and "pico-cola" in text and "pico-sst2" in text
        assert "density=0.5" in page.inner_text("#merge-status") and "saved in bf16" in page.inner_text("#merge-status")
        page.screenshot(path=str(ARTIFACTS / "merge.png"), full_page=True)


def test_curves_tab_in_chromium(app_home, pico):
    """Pick a suggested zoo pair, run a curve, watch the plot and the barrier table appear."""
    entry = copy_model(pico("sst2", seed=5), app_home / "zoo" / "pico-sst2-b")
    (entry / "mergelab.json").write_text(json.dumps({"task": "sst2", "kind": "full", "seed": 1, "steps": 0,
                                                     "partition": None}))
    with app_page(1400, 1000) as page:
        page.get_by_role("tab", name="Curves").click()
        page.locator("#curve-pair input").click()
        page.get_by_role("option", name="same task, different seeds: pico-sst2 ↔ pico-sst2-b").click()
        sst2 = page.locator("#curve-tasks label", has_text="SST-2").locator("input")
        playwright.expect(sst2).to_be_checked(timeout=30_000)  # the pair fills A, B and the tasks
        page.locator("#curve-limit input").fill("8")
        page.locator("#curve-run").click()
        with screenshot_on_failure(page, "curves"):
            playwright.expect(page.locator("#curve-status")).to_contain_text("Done in", timeout=120_000)
        page.wait_for_selector("#curve-plot .js-plotly-plot")
        summary = page.inner_text("#curve-summary")
        assert "pico-sst2 ↔ pico-sst2-b" in summary and "loss barrier" in summary
        assert page.locator("#curve-plot .scatterlayer .trace").count() >= 2  # metric and loss curves
        page.screenshot(path=str(ARTIFACTS / "curves.png"), full_page=True)


def test_sweep_tab_fills_a_heatmap_and_stops_in_chromium(app_home, pico):
    """A 7x7 TIES grid: the heatmap and the table fill in as trials finish; Stop ends the sweep itself."""
    import ray

    entry = copy_model(pico("sst2", seed=5), app_home / "zoo" / "pico-sst2-b")
    (entry / "mergelab.json").write_text(json.dumps({"task": "sst2", "kind": "full", "seed": 5, "steps": 0}))
    copy_model(pico(None), app_home / "zoo" / "pico-base")
    (app_home / "zoo" / "pico-base" / "mergelab.json").write_text(json.dumps({"kind": "base"}))
    try:
        with app_page(1400, 1000) as page:
            page.get_by_role("tab", name="Sweep").click()
            for name in ("pico-sst2", "pico-sst2-b"):
                page.locator("#sweep-models input").click()
                page.get_by_role("option", name=picker_label(name)).click()
            page.locator("#sweep-base input").click()
            page.locator("#sweep-base").get_by_role("option", name=picker_label("pico-base")).click()
            page.locator("#sweep-space textarea").fill("lambda=0.2:1.8:7\ndensity=0.1:0.9:7")
            page.locator("#sweep-dev input").fill("48")
            page.locator("#sweep-workers input[type=number]").fill("1")
            page.locator("#sweep-workers input[type=number]").press("Enter")
            page.locator("#sweep-run").click()
            with screenshot_on_failure(page, "sweep"):
                page.wait_for_selector("#sweep-plot .heatmaplayer", timeout=180_000)  # the first trials are in
                playwright.expect(page.locator("#sweep-best")).to_contain_text("objective", timeout=30_000)
            page.wait_for_function("/([3-9]|\\d\\d) of 49 trials/.test(document.querySelector('#sweep-status').innerText)",
                                   timeout=60_000)  # a few cells filled
            page.locator("#sweep-stop").click()
            playwright.expect(page.locator("#sweep-status")).to_contain_text("Stopped", timeout=30_000)
            rows = app_home / "sweeps"
            time.sleep(8)  # the trials that were running when Stop was pressed end; no new one starts
            finished = len(list(rows.glob("*/rows/*.json")))
            time.sleep(4)
            assert finished == len(list(rows.glob("*/rows/*.json"))) < 49
            assert "lambda" in page.inner_text("#sweep-table") and "density" in page.inner_text("#sweep-table")
            page.screenshot(path=str(ARTIFACTS / "sweep.png"), full_page=True)
    finally:  # a failed wait leaves the sweep running: end it before Ray goes (or Ray's threads end the process)
        for folder in (app_home / "sweeps").glob("*"):
            (folder / "stop").touch()
        deadline = time.monotonic() + 120
        while any(t.name == "mergelab-sweep" for t in threading.enumerate()) and time.monotonic() < deadline:
            time.sleep(0.2)
        ray.shutdown()


def test_ensemble_tab_reweights_live_in_chromium(app_home, pico):
    """Measure once, then move the temperature: the weights redraw from the stored similarities."""
    import merging_core as ml

    for task in ("cola", "emotion"):
        ml.train(ml.TrainConfig(task=task, base=str(pico(None)), steps=2, batch_size=4, peft="lora", eval_limit=8),
                 app_home / "zoo" / f"lora-{task}")
    weights_js = """() => {
        const plot = document.querySelector('#ens-plot .js-plotly-plot');
        const bars = plot ? plot.data.filter(t => t.type === 'bar' && t.showlegend === false) : [];
        return bars.length ? bars[0].y : null;
    }"""
    with app_page(1400, 1000) as page:
        page.get_by_role("tab", name="Ensemble").click()
        page.locator("#ens-target input").click()
        page.locator("#ens-target").get_by_role("option", name="SST-2", exact=True).click()
        playwright.expect(page.locator("#ens-sources")).to_contain_text("lora-emotion", timeout=30_000)
        page.locator("#ens-similarity input").click()  # its scores spread widely even on pico modules
        page.locator("#ens-similarity").get_by_role("option", name="weight_cosine", exact=True).click()
        number = page.locator("#ens-temperature input[type=number]")
        number.fill("-3")
        number.press("Enter")
        page.get_by_role("spinbutton", name="number input for Steps").fill("5")
        page.get_by_label("Dev limit").fill("8")
        page.locator("#ens-run").click()
        with screenshot_on_failure(page, "ensemble"):
            playwright.expect(page.locator("#ens-status")).to_contain_text("best start", timeout=120_000)
        assert "weighted" in page.inner_text("#ens-table")
        page.wait_for_function(f"({weights_js})() !== null")
        before = page.evaluate(weights_js)
        assert sum(before) == pytest.approx(1.0)
        assert max(before) > 0.9  # T = 0.001: nearly all weight on the most similar module
        # T = 100: the weights must move to the uniform average, without another "Measure" click
        number.fill("2")
        number.press("Enter")
        uniform = f"(() => {{ const w = ({weights_js})(); return w && w.every(x => Math.abs(x - 1 / w.length) < 0.02); }})()"
        page.wait_for_function(uniform, timeout=10_000)
        page.screenshot(path=str(ARTIFACTS / "ensemble.png"), full_page=True)


def test_family_pickers_in_chromium(family_zoo):
    """Model pickers name each model's family, size and task; the Evaluate tab offers a causal LM its text task
    (ticked) and the classification tasks, and scores the text by next-token loss. Screenshots: families-merge-picker.png, families-merge.png,
    families-evaluate.png."""
    with app_page(1280, 900) as page:
        page.get_by_role("tab", name="Merge").click()
        page.locator("#merge-models input").click()
        llama = page.get_by_role("option", name=re.compile(r"^tiny-llama · llama · [0-9.]+K · causal LM$"))
        playwright.expect(llama).to_be_visible(timeout=30_000)
        playwright.expect(page.get_by_role("option", name=re.compile(r"^minilm · bert · 22\.7M"))).to_be_visible()
        page.wait_for_timeout(500)  # the list fades in
        page.screenshot(path=str(ARTIFACTS / "families-merge-picker.png"))
        for name in ("tiny-gpt2-sst2", "pico-sst2"):
            page.get_by_role("option", name=picker_label(name)).click()
            page.locator("#merge-models input").click()
        page.keyboard.press("Escape")
        page.locator("#merge-method-doc").click()  # away from the list
        playwright.expect(page.locator("#merge-models")).to_contain_text("tiny-gpt2-sst2 · gpt2")
        page.wait_for_timeout(500)  # the list fades out
        page.screenshot(path=str(ARTIFACTS / "families-merge.png"))

        page.get_by_role("tab", name="Evaluate").click()
        page.locator("#eval-model input").click()
        page.get_by_role("option", name=picker_label("tiny-llama")).click()
        # its text task and its classification tasks (rank classification), not regression or token tags
        for task in ("STS-B", "CoNLL"):
            playwright.expect(page.locator("#eval-tasks label", has_text=task)).to_have_count(0, timeout=30_000)
        text_task = page.locator("#eval-tasks label", has_text="WikiText-2").locator("input")
        sst2 = page.locator("#eval-tasks label", has_text="SST-2").locator("input")
        playwright.expect(sst2).to_have_count(1)
        text_task.check()
        sst2.uncheck()
        playwright.expect(text_task).to_be_checked()
        page.locator("#eval-limit input").fill("8")
        page.locator("#eval-run").click()
        with screenshot_on_failure(page, "families-evaluate"):
            page.wait_for_function("document.querySelector('#eval-table').innerText.includes('next-token loss')",
                                   timeout=60_000)
        page.wait_for_selector("#eval-table .pending", state="detached")
        assert "perplexity" in page.inner_text("#eval-table")
        page.screenshot(path=str(ARTIFACTS / "families-evaluate.png"), full_page=True)
