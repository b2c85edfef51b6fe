"""The Evaluation tab in a real browser, at 1280 px and on a 390 px phone: the table's short columns in view, the row
count and the CSV name following the filter, page loads that leave no temp folders behind, runs from disk on Reload,
and the Run button disabled with its progress beside it while a (slow, fake) evaluation runs.

Screenshots go to outputs/screenshots/ (ignored by git). Skipped without Chromium or Playwright, failed in CI, as in
tests/test_browser.py (tests/browser_support.py).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from app.ui import evaluation_tab
from app.ui.evaluation_tab import NOT_RUN, SMALL_RUN_NOTE, examples_frame
from app.ui.interface import build_app
from pubmedqa.config import ModelSettings, ServerSettings
from pubmedqa.engines.transformers_engine import TransformersEngine
from pubmedqa.evaluation.results import load_results
from tests.browser_support import CHROMIUM, CHROMIUM_ARGS, PHONE, TIMEOUT_MS, require_browser
from tests.conftest import REPO_ROOT, serving

pytestmark = pytest.mark.browser
SCREENSHOTS = REPO_ROOT / "outputs" / "screenshots"
SHIPPED = REPO_ROOT / "assets" / "eval"
FIRST_RUN = "test-500-shares"  # the latest shipped run: the one the dashboard opens on
DESKTOP = {"width": 1280, "height": 900}


def _copy_run(folder: Path, n: int) -> Path:
    """A run folder as an evaluation writes it: a shipped run's first ``n`` examples."""
    folder.mkdir(parents=True)
    results = json.loads((SHIPPED / "test-500" / "results.json").read_text())
    results["run"]["n"] = n
    (folder / "results.json").write_text(json.dumps(results))
    lines = (SHIPPED / "test-500" / "examples.jsonl").read_text().splitlines()[:n]
    (folder / "examples.jsonl").write_text("\n".join(lines) + "\n")
    return folder


class SlowFakeEvaluation:
    """Stands in for ``pubmedqa.evaluation.runner.evaluate``: reports progress over a few seconds, as a CPU run
    does over minutes, then writes a run folder (or fails, with ``fail``)."""

    def __init__(self, step_s: float = 0.6, steps: int = 5):
        self.step_s, self.steps, self.fail = step_s, steps, False

    def __call__(self, settings: Any, args: Any, progress: Any = None, engine: Any = None) -> Path:
        for step, model in enumerate(("base", "tuned")):
            for i in range(1, self.steps + 1):
                time.sleep(self.step_s)
                progress((step + i / self.steps) / 2, f"{model}: decisions")
        if self.fail:
            raise RuntimeError("the PubMedQA data folder went away")
        return _copy_run(Path(args.output_dir), args.limit)


@pytest.fixture(scope="module")
def dashboard(tiny_model_dir, tiny_adapter_dir, tmp_path_factory):
    """The whole app on the tiny model, with its own temp folder (so that what page loads leave there can be
    counted) and a slow fake evaluation."""
    engine = TransformersEngine(
        ModelSettings(base_model=str(tiny_model_dir), adapter=str(tiny_adapter_dir), quantization="none")
    )
    engine.load()
    temp_root, eval_dir = tmp_path_factory.mktemp("temp"), tmp_path_factory.mktemp("eval")
    fake = SlowFakeEvaluation()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", str(temp_root))
        patch.delenv("GRADIO_TEMP_DIR", raising=False)  # Gradio's file cache: <temp>/gradio
        patch.setattr(evaluation_tab, "evaluate", fake)
        server = ServerSettings(votes_path=str(eval_dir / "votes.jsonl"), eval_dir=str(eval_dir / "runs"))
        with serving(build_app(engine, server)) as url:
            yield {"url": url, "temp": temp_root, "eval_dir": eval_dir / "runs", "fake": fake}


@pytest.fixture(scope="module")
def browser():
    require_browser()
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def _open_dashboard(browser, url: str, viewport: dict[str, int]):
    phone = viewport["width"] < 500
    context = browser.new_context(viewport=viewport, is_mobile=phone, has_touch=phone, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    _wait_dashboard(page)
    return context, page


def _wait_dashboard(page) -> None:
    page.get_by_text("Model status: Ready").wait_for()
    page.get_by_role("tab", name="Evaluation").click()
    page.locator("#eval-count").get_by_text("Showing").wait_for()
    page.locator(".js-plotly-plot").first.wait_for()


def _choose(page, dropdown: str, option: str) -> None:
    page.locator(f"{dropdown} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def _box(page, selector: str) -> dict[str, float]:
    return page.locator(selector).first.bounding_box()


def _overlap(a: dict[str, float], b: dict[str, float]) -> bool:
    return (a["x"] < b["x"] + b["width"] - 1 and b["x"] < a["x"] + a["width"] - 1
            and a["y"] < b["y"] + b["height"] - 1 and b["y"] < a["y"] + a["height"] - 1)


def _temp_entries(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_at_1280_px_the_decisions_are_in_view_and_the_filter_names_the_count_and_the_csv(browser, dashboard):
    context, page = _open_dashboard(browser, dashboard["url"], DESKTOP)
    assert page.locator("#eval-count").inner_text().startswith("Showing 500 of 500 examples")
    page.locator("#eval-table").scroll_into_view_if_needed()
    table = _box(page, "#eval-table")
    for header in ("id", "gold", "base decision", "fine-tuned decision", "base correct", "fine-tuned correct"):
        cell = page.locator("#eval-table thead th").filter(has_text=header).first.bounding_box()
        assert cell["x"] >= table["x"] and cell["x"] + cell["width"] <= min(table["x"] + table["width"], 1280), header
    assert page.evaluate("() => document.documentElement.scrollWidth") <= DESKTOP["width"]

    expected = len(examples_frame(load_results(SHIPPED / FIRST_RUN), "both wrong"))
    _choose(page, "#eval-filter", "both wrong")
    page.locator("#eval-count").get_by_text(f"Showing {expected} of 500 examples (both wrong)").wait_for()
    page.wait_for_timeout(500)  # the download button's new file arrives with the count
    with page.expect_download() as download:
        page.locator("#eval-download").click()
    assert download.value.suggested_filename == f"pubmedqa-eval-{FIRST_RUN}-both-wrong.csv"
    with open(download.value.path(), encoding="utf-8") as handle:
        assert sum(1 for _ in handle) >= expected + 1  # header + rows (texts may hold line breaks)

    page.locator('#eval-table [data-testid="cell-0-6"]').click()  # the first row's question
    page.locator("#eval-example").get_by_text("Abstract's conclusion").wait_for()
    assert "✗" in page.locator("#eval-example").inner_text()  # both wrong: both marked

    visible = page.locator("body").inner_text()
    for path in (str(REPO_ROOT), str(dashboard["temp"]), str(dashboard["eval_dir"])):
        assert path not in visible
    page.screenshot(path=str(SCREENSHOTS / "dashboard-desktop.png"), full_page=True)
    context.close()


def test_on_a_390_px_phone_nothing_overlaps_and_only_the_table_scrolls_sideways(browser, dashboard):
    context, page = _open_dashboard(browser, dashboard["url"], PHONE)
    width = page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= PHONE["width"] + 1, f"the page scrolls sideways on a phone ({width} px)"
    plots = [page.locator(".js-plotly-plot").nth(i).bounding_box() for i in range(page.locator(".js-plotly-plot").count())]
    assert len(plots) == 6 and all(p["width"] <= PHONE["width"] for p in plots)
    assert not any(_overlap(a, b) for i, a in enumerate(plots) for b in plots[i + 1:]), "charts overlap"
    assert page.locator(".modebar-container .modebar").count() == 0  # no mode bar over titles and legends
    # The judge's how-to, written in the chart, stays inside it.
    judge = page.locator(".js-plotly-plot").filter(has=page.locator(".annotation-text")).first
    plot_box, text_box = judge.bounding_box(), judge.locator(".annotation-text").first.bounding_box()
    assert text_box["x"] >= plot_box["x"] and text_box["x"] + text_box["width"] <= plot_box["x"] + plot_box["width"]
    assert not _overlap(_box(page, "#eval-filter"), _box(page, "#eval-download"))
    scroller = page.locator("#eval-table .table-container").first
    assert scroller.bounding_box()["width"] <= PHONE["width"]
    page.screenshot(path=str(SCREENSHOTS / "dashboard-phone.png"), full_page=True)
    context.close()


def test_reloading_the_page_leaves_no_new_temp_folders(browser, dashboard):
    context, page = _open_dashboard(browser, dashboard["url"], DESKTOP)
    before = _temp_entries(dashboard["temp"])
    for _ in range(6):
        page.reload()
        _wait_dashboard(page)
    for _ in range(3):
        page.get_by_role("button", name="Reload").click()
        page.wait_for_timeout(700)
    page.locator("#eval-count").get_by_text("Showing 500 of 500").wait_for()
    assert _temp_entries(dashboard["temp"]) == before
    assert sum(1 for p in dashboard["temp"].rglob("*.csv") if "pubmedqa-eval-csv" in str(p)) <= 32
    context.close()


def test_a_run_written_elsewhere_is_listed_on_reload_and_on_the_next_page_load(browser, dashboard):
    context, page = _open_dashboard(browser, dashboard["url"], DESKTOP)
    _copy_run(dashboard["eval_dir"] / "20270101-000000", 30)  # another visitor's run, or one from before a restart
    page.get_by_role("button", name="Reload").click()
    page.wait_for_timeout(1000)
    _choose(page, "#eval-run", "20270101-000000 · run here")
    page.locator("#eval-count").get_by_text("Showing 30 of 30 examples").wait_for()
    assert SMALL_RUN_NOTE in page.locator("#eval-summary").inner_text()
    context.close()

    other, page = _open_dashboard(browser, dashboard["url"], DESKTOP)  # a new visitor
    page.locator("#eval-run input").click()
    assert page.get_by_role("option", name="20270101-000000 · run here", exact=True).is_visible()
    other.close()
    shutil.rmtree(dashboard["eval_dir"] / "20270101-000000")


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_the_run_button_is_disabled_while_it_runs_with_the_progress_beside_it(browser, dashboard, viewport):
    name = "desktop" if viewport is DESKTOP else "phone"
    context, page = _open_dashboard(browser, dashboard["url"], viewport)
    page.get_by_text("Run a new evaluation").click()
    button = page.locator("#eval-run-button")
    button.click()
    page.wait_for_function("() => document.querySelector('#eval-run-button').disabled")
    status = page.locator("#eval-run-status")
    status.get_by_text("/50 questions").wait_for()
    assert button.is_disabled()
    line = status.inner_text()
    assert line.count("/50 questions") == 1 and ("estimating" in line or "left" in line)
    near, beside = button.bounding_box(), status.bounding_box()
    # Beside the button on a wide page, right under it on a phone: where the user is looking.
    assert abs((beside["y"] + beside["height"] / 2) - (near["y"] + near["height"] / 2)) < 60 or \
        0 <= beside["y"] - (near["y"] + near["height"]) < 80
    page.screenshot(path=str(SCREENSHOTS / f"dashboard-running-{name}.png"), full_page=False)

    status.get_by_text("Done: 50 questions").wait_for()
    page.wait_for_function("() => !document.querySelector('#eval-run-button').disabled")
    assert SMALL_RUN_NOTE in status.inner_text()
    page.locator("#eval-count").get_by_text("Showing 50 of 50 examples").wait_for()  # the new run, selected
    assert page.locator("#eval-run input").input_value().endswith("· run here")
    assert SMALL_RUN_NOTE in page.locator("#eval-summary").inner_text()
    context.close()


def test_a_failed_run_says_why_in_plain_text_and_gives_the_button_back(browser, dashboard):
    dashboard["fake"].fail = True
    try:
        context, page = _open_dashboard(browser, dashboard["url"], DESKTOP)
        page.get_by_text("Run a new evaluation").click()
        page.locator("#eval-run-button").click()
        page.wait_for_function("() => document.querySelector('#eval-run-button').disabled")
        toast = page.locator(".toast-body").filter(has_text="Evaluation failed")
        toast.first.wait_for()
        assert "data folder went away" in toast.first.inner_text() and "Traceback" not in toast.first.inner_text()
        page.wait_for_function("() => !document.querySelector('#eval-run-button').disabled")
        page.locator("#eval-run-status").get_by_text(NOT_RUN).wait_for()
        page.screenshot(path=str(SCREENSHOTS / "dashboard-failed-run.png"), full_page=False)
        context.close()
    finally:
        dashboard["fake"].fail = False


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_two_runs_side_by_side_show_the_difference_and_the_flipped_questions(browser, dashboard, viewport):
    context, page = _open_dashboard(browser, dashboard["url"], viewport)
    page.get_by_text("Compare two runs").click()
    for dropdown, run in (("#eval-pair-first", "test-500 · shipped"), ("#eval-pair-second", "test-500-llama-cpp · shipped")):
        box = page.locator(f"{dropdown} input")
        box.click()
        box.fill(run)  # the dropdown filters its own list to this one run; Enter takes it
        box.press("Enter")
        page.wait_for_function(f"() => document.querySelector('{dropdown} input').value === {run!r}")
    summary = page.locator("#eval-pair-summary")
    summary.get_by_text("500 questions in both runs").wait_for()
    assert "McNemar (exact)" in summary.inner_text() and "from wrong to right" in summary.inner_text()
    page.wait_for_function("() => document.querySelector('#eval-pair-flips').innerText.includes('wrong → right')")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= viewport["width"]
    page.locator("#eval-pair-summary").scroll_into_view_if_needed()
    page.screenshot(path=str(SCREENSHOTS / f"dashboard-run-pair-{viewport['width']}.png"), full_page=False)
    context.close()
