"""The report and an executed notebook as a user sees them: opened in headless Chromium with the network off.

Counts the figures plotly.js actually drew (``.js-plotly-plot`` elements), records every request the page
makes, and checks a screenshot is not blank. Needs Debian's ``chromium`` (``apt-get install chromium``; CI's
``.ci/run`` installs it) and the ``playwright`` Python package (the ``test`` extra); skips with the reason
otherwise.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest

from jule3d.app.report import notebook_figures

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("JULE3D_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
# As the machine's own probe starts it: no background connections, no sandbox (CI runs as root).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium driven by Playwright, or a skip that says what is missing."""
    if CHROMIUM is None:
        pytest.skip("no Chromium: install Debian's chromium package (apt-get install chromium) or set "
                    "JULE3D_CHROMIUM to a Chromium binary to run the browser tests")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing: pip install -e '.[test]'")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _open(browser, path: Path, block_remote: bool = False) -> dict:
    """Open ``path`` offline; return the drawn figure count, remote requests, console errors, a screenshot."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, offline=True)
    remote: list[str] = []
    context.on("request", lambda request: None if request.url.startswith(LOCAL_SCHEMES) else remote.append(request.url))
    if block_remote:
        context.route(lambda url: not url.startswith(LOCAL_SCHEMES), lambda route: route.abort())
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(path.resolve().as_uri(), wait_until="load")
    try:  # plotly draws each figure asynchronously after the page has loaded
        page.wait_for_function("() => window.Plotly !== undefined", timeout=30_000)
        page.wait_for_timeout(1500)
    finally:
        drawn = page.locator(".js-plotly-plot").count()
        shot = page.locator(".js-plotly-plot").first.screenshot() if drawn else page.screenshot()
        context.close()
    return {"drawn": drawn, "remote": remote, "errors": errors, "screenshot": shot}


def _not_blank(png: bytes) -> float:
    """Standard deviation of the screenshot's grey levels (0 for a blank image)."""
    import numpy as np
    from PIL import Image

    return float(np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=float).std())


def test_report_draws_every_figure_offline(browser, tiny_run) -> None:
    executed = [n.path for n in tiny_run.notebooks]
    expected = notebook_figures(executed)
    seen = _open(browser, tiny_run.report)
    assert seen["remote"] == [], f"the report requested files from elsewhere: {seen['remote'][:5]}"
    assert seen["errors"] == [], f"JavaScript errors: {seen['errors'][:3]}"
    assert seen["drawn"] == expected >= 15, f"{seen['drawn']} of the notebooks' {expected} figures were drawn"
    assert _not_blank(seen["screenshot"]) > 5.0, "the first figure's screenshot is blank"


def test_executed_notebook_draws_its_figures_offline(browser, tiny_run, tmp_path: Path) -> None:
    """nbconvert's own HTML of an executed notebook (as `jupyter nbconvert --to html` makes it) renders too."""
    from nbconvert import HTMLExporter

    executed = tiny_run.notebooks[-1].path
    body, _ = HTMLExporter().from_filename(str(executed))
    page = tmp_path / "04.html"
    page.write_text(body, encoding="utf-8")
    seen = _open(browser, page, block_remote=True)  # nbconvert's template links require.js and MathJax
    assert seen["drawn"] == notebook_figures([executed]) >= 4
    assert _not_blank(seen["screenshot"]) > 5.0
