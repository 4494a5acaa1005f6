"""The pages people look at, opened in a real browser: report.html and the nightly history page, in headless
Chromium (Debian's `chromium`, driven by Playwright). Each test takes a screenshot, checks every chart
rendered (each inline image decoded, with a width), that the page logged no console error and that the text
people look for is there. Skips, saying why, where Chromium or Playwright is missing."""

from __future__ import annotations

import shutil

import pytest

from pipeline.history_page import render_history
from pipeline.report import write_report
from tests.test_report import run_metrics  # noqa: F401  (the fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH: `make test` installs Debian's chromium when run as root; "
                    "otherwise `apt-get install chromium`")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (make setup)")
    with playwright.sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=CHROMIUM)
        yield launched
        launched.close()


def open_page(browser, path, screenshot) -> tuple[object, list[str]]:
    """The page at `path` after load, and every console error and uncaught exception it raised."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("requestfailed", lambda request: errors.append(f"request failed: {request.url}"))
    page.goto(path.as_uri(), wait_until="load")
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000  # a rendered page, not a blank one
    return page, errors


def rendered_images(page) -> list[list]:
    """[complete, natural width, natural height] of every image: a chart that failed to decode has width 0."""
    return page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")


def test_the_report_page_renders_its_tables_and_charts(browser, run_metrics, tmp_path):  # noqa: F811
    metrics = run_metrics()
    write_report(str(tmp_path), metrics)
    page, errors = open_page(browser, tmp_path / "report.html", tmp_path / "report.png")
    assert errors == []
    images = rendered_images(page)
    assert len(images) == 4 and all(done and width > 100 and height > 100 for done, width, height in images), images
    text = page.inner_text("body")
    for expected in ("Distillation report: unit", "student_distilled", "student_hard", "teacher", "2026-11-04"):
        assert expected in text, expected
    assert page.locator("table").count() >= 3


def cycle(date: str, decision: str, challenger: float, champion: float | None, ece: float, **extra) -> dict:
    return {"date": date, "decision": decision, "reason": f"{decision} on {date}", "version": f"{date}-abcd1234",
            "challenger": {"auc": challenger}, "champion": None if champion is None else {"auc": champion},
            "champion_after": f"{date}-abcd1234" if decision != "rejected" else "2026-11-04-abcd1234",
            "relabelled": [date], "reused": [], "relabelled_rows": 3000, "reused_rows": 6000,
            "challenger_ece": ece, "champion_ece": None if champion is None else ece + 0.002, **extra}


def test_the_history_page_charts_every_night(browser, tmp_path):
    cycles = [cycle("2026-11-04", "promoted", 0.701, None, 0.004),
              cycle("2026-11-05", "promoted", 0.705, 0.701, 0.003),
              cycle("2026-11-06", "rejected", 0.690, 0.705, 0.006),
              cycle("2026-11-07", "recalibrated", 0.688, 0.705, 0.002)]
    events = [{"action": "rollback", "version": "2026-11-05-abcd1234", "previous": "2026-11-07-abcd1234",
               "reason": "manual rollback", "at": "2026-11-08T09:00:00+00:00"}]
    (tmp_path / "index.html").write_text(render_history("nightly", "auc", cycles, events))
    page, errors = open_page(browser, tmp_path / "index.html", tmp_path / "history.png")
    assert errors == []
    images = rendered_images(page)
    assert len(images) == 3 and all(done and width > 100 and height > 100 for done, width, height in images), images
    assert [page.get_attribute(f"#chart-{name}", "alt") for name in ("quality", "rows", "calibration")] == [
        "quality", "rows", "calibration"]
    decisions = page.locator("#decisions tr")
    assert decisions.count() == 5  # a header and one row per night, newest first
    assert decisions.nth(1).inner_text().startswith("2026-11-07\trecalibrated")
    text = page.inner_text("body")
    for expected in ("Nightly history: nightly", "2026-11-04", "rejected on 2026-11-06", "manual rollback"):
        assert expected in text, expected
