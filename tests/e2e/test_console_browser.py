"""The console in a real browser: Playwright driving Debian's Chromium (headless, never a downloaded build).

Against a daemon that triaged real series (see :mod:`tests.support.console_stack`): the console refuses
an anonymous visitor, a viewer logs in, the urgent series tops the worklist although a newer one arrived
after it, its page shows the slice-score strip and the Secondary Captures as rendered pixels.
``TRIAGED_CONSOLE_SCREENSHOT=PATH`` also writes the series page screenshot there (docs/console-series.png).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.support.console_stack import ADMIN, VIEWER, ConsoleStack

CHROMIUM = Path("/usr/bin/chromium")
VIEWPORT = {"width": 1366, "height": 768}  # a reading-room screen

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.is_file():
        pytest.skip("needs Debian's chromium package (/usr/bin/chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport=VIEWPORT, color_scheme="dark")
    page = context.new_page()
    yield page
    context.close()


def _log_in(page: Any, stack: ConsoleStack, name: str, password: str) -> None:
    page.goto(f"{stack.base_url}/")
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")


def test_serve_prints_the_console_url(console_stack: ConsoleStack) -> None:
    assert f"console: {console_stack.base_url}/ " in console_stack.daemon.log_path.read_text(encoding="utf-8")


def test_refused_without_login(console_stack: ConsoleStack, page: Any) -> None:
    response = page.goto(f"{console_stack.base_url}/series/{console_stack.urgent_uid}")
    assert page.url.startswith(f"{console_stack.base_url}/login?next=")
    assert response.status == 200 and page.locator("input[name=password]").is_visible()
    assert page.locator("figure.sc, table.worklist").count() == 0 and "URGENT" not in page.content()
    api = page.request.get(f"{console_stack.base_url}/api/v1/series")
    assert api.status == 401
    image = page.request.get(f"{console_stack.base_url}/api/v1/series/{console_stack.urgent_uid}")
    assert image.status == 401


def test_wrong_password_is_refused(console_stack: ConsoleStack, page: Any) -> None:
    _log_in(page, console_stack, VIEWER[0], "not-the-password")
    assert page.locator(".error").inner_text() == "Wrong name or password."
    assert page.url.startswith(f"{console_stack.base_url}/login")


def _image_pixels(screenshot: bytes, box: dict[str, float]) -> np.ndarray:
    with Image.open(io.BytesIO(screenshot)) as shot:
        crop = shot.convert("RGB").crop(
            (int(box["x"]), int(box["y"]), int(box["x"] + box["width"]), int(box["y"] + box["height"]))
        )
        return np.asarray(crop, dtype=np.int16)


def test_urgent_series_on_top_and_its_secondary_captures_render(console_stack: ConsoleStack, page: Any) -> None:
    _log_in(page, console_stack, *VIEWER)
    page.wait_for_selector("table.worklist")
    rows = page.locator("table.worklist tbody tr")
    assert rows.count() == 3
    first = rows.nth(0)
    assert "URGENT" in first.inner_text() and "glioma" in first.inner_text()
    assert first.locator("a.uid").get_attribute("href") == f"/series/{console_stack.urgent_uid}"
    # the normal series arrived after the urgent one, yet comes second; the DWI shows why it was not assessed
    assert rows.nth(1).locator("a.uid").get_attribute("href") in {
        f"/series/{console_stack.normal_uid}",
        f"/series/{console_stack.dwi_uid}",
    }
    assert "NOT ASSESSABLE" in page.locator("table.worklist").inner_text()

    first.locator("a.uid").click()
    page.wait_for_url(f"**/series/{console_stack.urgent_uid}")
    images = page.locator("figure.sc img")
    assert images.count() >= 1
    page.wait_for_function(
        "() => [...document.querySelectorAll('figure.sc img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    assert page.locator("svg.strip rect.bar").count() == 8
    assert page.locator("svg.strip path.key-marker").count() >= 1
    assert "sent" in page.locator("figure.sc figcaption").first.inner_text()

    screenshot = page.screenshot()
    target = os.environ.get("TRIAGED_CONSOLE_SCREENSHOT")
    if target:
        Path(target).write_bytes(screenshot)
    box = images.first.bounding_box()
    assert box is not None and box["width"] >= 200 and box["y"] + box["height"] <= VIEWPORT["height"]
    pixels = _image_pixels(screenshot, box)
    spread = pixels.max(axis=2) - pixels.min(axis=2)
    assert pixels.std() > 20, "the SC image area is flat: nothing was rendered"
    assert (spread > 60).mean() > 0.005, "no colour in the SC: the Grad-CAM overlay is missing"
    assert (pixels.mean(axis=2) > 200).mean() > 0.001, "no bright pixels: banner text/anatomy missing"


def test_admin_pages_render_and_resend_goes_through_the_api(
    console_stack: ConsoleStack, page: Any, tmp_path: Path
) -> None:
    _log_in(page, console_stack, *ADMIN)
    page.wait_for_selector("table.worklist")
    page.screenshot(path=str(tmp_path / "worklist.png"))
    page.goto(f"{console_stack.base_url}/series/{console_stack.dwi_uid}")
    assert "Not assessable:" in page.locator(".na-reason").inner_text()
    page.goto(f"{console_stack.base_url}/series/{console_stack.urgent_uid}")
    page.click("text=Resend outputs")
    page.wait_for_selector(".notice")
    assert page.locator(".notice").inner_text().startswith("resend: queued (job ")
    pages = (("/queue", "Dead letters"), ("/receivers", "alive"), ("/destinations", "pacs"), ("/model", "Model card"))
    for path, expected in pages:
        response = page.goto(f"{console_stack.base_url}{path}")
        assert response.status == 200 and expected in page.locator("main").inner_text(), path
        page.screenshot(path=str(tmp_path / f"{path.strip('/')}.png"), full_page=True)
