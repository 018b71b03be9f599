"""A newcomer's first ten minutes, in a real browser: an empty MergeLab home, the demo zoo built from the
Zoo tab by clicks only, then each tab's main action with its default settings, and a long run stopped.

Saves a screenshot of every tab to tests/artifacts/first-run-<tab>.png and the measured times to
tests/artifacts/first-run.json (demo zoo build, time to the first curve point, time to Permute's first
progress, time for the next action to start after Stop).
"""

from __future__ import annotations

import json
import re
import time

import pytest

from .test_browser import ARTIFACTS, CHROMIUM, app_page, picker_label, playwright, screenshot_on_failure

pytestmark = [pytest.mark.integration]
assert CHROMIUM  # the browser tests' skip conditions apply here too (module-level importorskip)

DEMO_ENTRIES = ("demo-sst2-s0", "demo-sst2-s1", "demo-emotion", "demo-mrpc", "demo-scratch-s0", "demo-scratch-s1",
                "demo-lora-sst2", "demo-lora-emotion", "demo-lora-mrpc")


def _shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"first-run-{name}.png"), full_page=True)


def _settled(page, output: str, timeout: float = 300_000) -> None:
    """Wait until an output shows no pending state (no progress bar or spinner over it)."""
    page.wait_for_selector(f"{output} .pending", state="detached", timeout=timeout)


def _seconds_until(page, js: str, timeout: float) -> float:
    """Seconds from now until the JS predicate holds (polled each animation frame)."""
    started = time.perf_counter()
    page.wait_for_function(js, timeout=timeout)
    return time.perf_counter() - started


def _text(selector: str) -> str:
    return f"(document.querySelector('{selector}')?.innerText || '')"


def test_first_ten_minutes(isolated_home):
    timings: dict[str, float] = {}
    with app_page(1400, 1000) as page:
        # -- Zoo: the app says what is missing, and builds the demo zoo in one click ----------------------
        start = page.locator("#zoo-start")
        playwright.expect(start).to_contain_text("Getting started", timeout=30_000)
        playwright.expect(start).to_contain_text("Permute")
        _shot(page, "empty")
        started = time.perf_counter()
        page.locator("#zoo-demo").click()
        with screenshot_on_failure(page, "first-run-zoo"):
            # progress with an entry counter and a time estimate shows while it builds
            page.wait_for_function(f"/\\[\\d+\\/\\d+\\]/.test(document.querySelector('#zoo-demo-status')?.innerText || '')"
                                   f" || {_text('#zoo-demo-status')}.includes('Built')", timeout=60_000)
            playwright.expect(page.locator("#zoo-demo-status")).to_contain_text("Built 9 model(s)", timeout=900_000)
        timings["demo_zoo_build_s"] = round(time.perf_counter() - started, 1)
        playwright.expect(page.locator("#zoo-table")).to_contain_text("demo-lora-mrpc", timeout=30_000)
        table = page.inner_text("#zoo-table")
        assert all(name in table for name in DEMO_ENTRIES)
        playwright.expect(start).to_be_hidden(timeout=30_000)  # every tab is ready now
        _shot(page, "zoo")

        # -- Evaluate: defaults (the first zoo model, its own task, Limit 0 = all) --------------------------
        page.get_by_role("tab", name="Evaluate").click()
        playwright.expect(page.locator("#eval-model input")).to_have_value(re.compile("demo-"), timeout=30_000)
        page.locator("#eval-run").click()
        with screenshot_on_failure(page, "first-run-evaluate"):
            page.wait_for_function(f"/\\b0\\.\\d{{3}}/.test({_text('#eval-table')})", timeout=120_000)
            _settled(page, "#eval-table")
        rows = page.inner_text("#eval-table")
        assert re.search(r"0\.\d{3}", rows), rows  # a score
        assert "less than minimum" not in page.content()
        _shot(page, "evaluate")

        # -- Merge: two seeds with TIES; the base shown is the one used; move lambda ------------------------
        page.get_by_role("tab", name="Merge").click()
        for name in ("demo-sst2-s0", "demo-sst2-s1"):
            page.locator("#merge-models input").click()
            page.get_by_role("option", name=picker_label(name)).click()
        page.keyboard.press("Escape")  # close the list, which covers the controls below it
        page.locator("#merge-method-doc").click()
        # a picker shows its model's label: name, family, size, task
        playwright.expect(page.locator("#merge-base input")).to_have_value(picker_label("minilm"), timeout=30_000)
        page.locator("#merge-method input").click()
        page.get_by_role("option", name="TIES · data-free").click()
        playwright.expect(page.locator("#merge-params")).to_contain_text("lambda", timeout=30_000)
        page.wait_for_timeout(1000)  # the method's controls are rendered by the server: let them settle
        lam = page.get_by_role("spinbutton", name="number input for lambda")
        lam.fill("0.6")
        lam.press("Enter")
        page.locator("#merge-method-doc").click()
        playwright.expect(lam).to_have_value("0.6")
        page.locator("#merge-run").click()
        with screenshot_on_failure(page, "first-run-merge"):
            playwright.expect(page.locator("#merge-status")).to_contain_text("Scores: dev split", timeout=300_000)
            _settled(page, "#merge-status")
        status = page.inner_text("#merge-status")
        assert "lambda=0.6" in status and "base minilm" in status, status
        assert "ensemble" in page.inner_text("#merge-table")
        _shot(page, "merge")

        # -- Curves: a suggested pair is preselected; the first point shows within seconds ----------------
        page.get_by_role("tab", name="Curves").click()
        playwright.expect(page.locator("#curve-a input")).to_have_value(re.compile("demo-"), timeout=30_000)
        page.locator("#curve-b input").click()  # the merge just saved is offered in every model picker
        offered = page.locator("#curve-b").get_by_role("option").filter(has_text="merges/ties-")
        playwright.expect(offered).to_have_count(1, timeout=10_000)
        page.keyboard.press("Escape")
        page.mouse.click(5, 5)  # away from the list
        playwright.expect(page.locator("#curve-b input")).to_have_value(picker_label("demo-sst2-s1"))
        page.locator("#curve-run").click()
        timings["curve_first_point_s"] = round(_seconds_until(
            page, f"/point [1-9]/.test({_text('#curve-status')})", 120_000), 2)
        with screenshot_on_failure(page, "first-run-curves"):
            playwright.expect(page.locator("#curve-status")).to_contain_text("Done in", timeout=300_000)
            _settled(page, "#curve-status")
        assert "loss barrier" in page.inner_text("#curve-summary")
        _shot(page, "curves")

        # -- Permute: a different-initialization pair is preselected; heatmaps appear ----------------------
        page.get_by_role("tab", name="Permute").click()
        playwright.expect(page.locator("#align-a input")).to_have_value(re.compile("demo-scratch"), timeout=30_000)
        page.locator("#align-run").click()
        timings["permute_first_progress_s"] = round(_seconds_until(
            page, f"{_text('#align-status')}.trim().length > 0", 60_000), 2)
        with screenshot_on_failure(page, "first-run-permute"):
            page.wait_for_selector("#align-heatmap .js-plotly-plot", timeout=300_000)
            playwright.expect(page.locator("#align-status")).to_contain_text("Done (", timeout=300_000)
            _settled(page, "#align-status")
        assert "mean matched corr" in page.inner_text("#align-summary")
        _shot(page, "permute")

        # -- Ensemble: measure, then move the temperature: status and weights follow ----------------------
        page.get_by_role("tab", name="Ensemble").click()
        playwright.expect(page.locator("#ens-sources")).to_contain_text("demo-lora", timeout=30_000)
        page.locator("#ens-run").click()
        with screenshot_on_failure(page, "first-run-ensemble"):
            playwright.expect(page.locator("#ens-status")).to_contain_text("best start", timeout=300_000)
            _settled(page, "#ens-status")
        weights_js = """() => {
            const plot = document.querySelector('#ens-plot .js-plotly-plot');
            const bars = plot ? plot.data.filter(t => t.type === 'bar' && t.showlegend === false) : [];
            return bars.length ? JSON.stringify(Array.from(bars[0].y)) : null;
        }"""
        page.wait_for_function(f"({weights_js})() !== null", timeout=30_000)
        before_weights, before_status = page.evaluate(weights_js), page.inner_text("#ens-status")
        number = page.locator("#ens-temperature input[type=number]")
        number.fill("2")
        number.press("Enter")
        playwright.expect(page.locator("#ens-status")).to_contain_text("T = 100", timeout=15_000)
        assert page.inner_text("#ens-status") != before_status
        after_weights = before_weights
        for _ in range(30):  # the plot redraws from the stored similarities, without measuring again
            after_weights = page.evaluate(weights_js)
            if after_weights != before_weights:
                break
            page.wait_for_timeout(500)
        weights = json.loads(after_weights)
        assert after_weights != before_weights and max(weights) - min(weights) < 0.05, (before_weights, weights)
        _shot(page, "ensemble")

        # -- Stop: a long run ends, and the next action starts at once -------------------------------------
        page.get_by_role("tab", name="Curves").click()
        page.locator("#curve-path").get_by_text("line + bezier").click()
        bend = page.get_by_role("spinbutton", name="number input for Bezier bend steps")
        bend.fill("1000")
        bend.press("Enter")
        page.locator("#curve-run").click()
        page.wait_for_function(f"/bend/i.test({_text('#curve-status')})", timeout=120_000)
        page.locator("#curve-stop").click()
        playwright.expect(page.locator("#curve-status")).to_contain_text("Stopped", timeout=10_000)
        page.get_by_role("tab", name="Evaluate").click()
        page.locator("#eval-run").click()
        # started: Gradio's status on the output says "processing" (not "queue: ..."), or it is done
        timings["next_action_after_stop_s"] = round(_seconds_until(
            page, "(() => { const t = document.querySelector('#eval-table')?.innerText || '';"
                  " return /processing|\\d+\\.\\ds/.test(t) && !/queue/.test(t); })()", 30_000), 2)
        _settled(page, "#eval-table")
        _shot(page, "after-stop")

    (ARTIFACTS / "first-run.json").write_text(json.dumps(timings, indent=1))
    print("first-run timings:", timings)
    assert timings["next_action_after_stop_s"] < 2.0, timings
