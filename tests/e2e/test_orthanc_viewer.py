"""Our Secondary Captures as a radiologist sees them: Orthanc's Web Viewer plugin in headless Debian Chromium.

A real urgent tcga_lgg test series goes through Orthanc → `triaged serve` (shipped model) → Orthanc, the same
flow as ``test_orthanc.py``; then Playwright opens the SC series in Orthanc's Web Viewer (Debian package
``orthanc-webviewer``, Cornerstone-based) and the test reads the rendered frame back from a screenshot: the
banner's urgent headline colour and the Grad-CAM overlay's yellow and red must be on the viewer's canvas, where the
SC puts them. An HTTP 200 says only that a page came back; the pixels say the viewer drew our picture.
``TRIAGED_VIEWER_SCREENSHOT=PATH`` also writes the screenshot there (docs/orthanc-viewer.png).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from PIL import Image

from tests.conftest import shared_data
from tests.e2e.test_orthanc import SC_CLASS, Stack, _stack, _upload_series, _wait_outputs
from tests.support.orthanc import orthanc_binary
from tests.support.pipeline_support import SHIPPED_MODEL, shipped_model_available, wait_for
from triaged.outputs.render import URGENT_COLOUR
from triaged.training.data import read_manifest
from triaged.training.series_eval import volume_series, write_volume_series

CHROMIUM = Path("/usr/bin/chromium")
WEB_VIEWER = Path("/usr/share/orthanc/plugins/libOrthancWebViewer.so")
URGENT_SERIES = ("TCGA_DU_7018", "flair")  # a test-split patient, urgent with the shipped model (test_volumes_e2e)
SCREENSHOT_ENV = "TRIAGED_VIEWER_SCREENSHOT"

pytestmark = [pytest.mark.orthanc, pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(600)]

RGB = NDArray[np.int16]


@pytest.fixture
def viewer_stack(tmp_path: Path) -> Iterator[Stack]:
    """Orthanc with the Web Viewer plugin as triaged's PACS, triaged with the shipped model."""
    orthanc_binary()
    if not WEB_VIEWER.is_file():
        pytest.skip(f"needs Orthanc's Web Viewer plugin (Debian package orthanc-webviewer, {WEB_VIEWER})")
    if not CHROMIUM.is_file():
        pytest.skip("needs Debian's chromium package (/usr/bin/chromium)")
    if not shipped_model_available():
        pytest.skip(f"needs the shipped model in {SHIPPED_MODEL}")
    running = _stack(tmp_path, SHIPPED_MODEL)
    running.orthanc.plugins = [str(WEB_VIEWER)]
    running.orthanc.extra_config = {"WebViewer": {"CachePath": str(tmp_path / "orthanc" / "webviewer-cache")}}
    running.orthanc.start()
    try:
        running.triaged.start(timeout=240)
        try:
            yield running
        finally:
            running.triaged.stop()
    finally:
        running.orthanc.stop()


@pytest.fixture
def page() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        context = browser.new_context(viewport={"width": 1366, "height": 768})  # a reading-room screen
        yield context.new_page()
        context.close()
        browser.close()


def _urgent_series_files(tmp_path: Path) -> list[Path]:
    data = shared_data()
    samples = read_manifest(SHIPPED_MODEL / "manifest.csv")
    wanted = {(v.patient, v.contrast): v for v in volume_series(samples, "test")}
    return write_volume_series(data, wanted[URGENT_SERIES], tmp_path / "series")


def _near(pixels: RGB, colour: tuple[int, int, int], tolerance: int) -> NDArray[np.bool_]:
    """Pixels within ``tolerance`` of ``colour`` on every channel (the viewer's JPEG transfer shifts colours)."""
    return np.asarray(np.abs(pixels - np.array(colour, dtype=np.int16)).max(axis=2) <= tolerance)


def _hues(pixels: RGB) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """(yellow, red) masks of clearly coloured pixels: the two hot ends of the Grad-CAM map, blended onto grey.

    By hue (PIL's HSV, 0–255 for 0–360°) with enough saturation and brightness that grey tissue never counts.
    """
    rgb = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")
    hsv = np.asarray(rgb.convert("HSV"), dtype=np.int16)
    hue, saturation, value = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    vivid = (saturation > 90) & (value > 120)
    yellow = vivid & (hue >= 28) & (hue <= 50)  # ~40°–70°
    red = vivid & ((hue <= 18) | (hue >= 248))  # ~350°–25°
    return np.asarray(yellow), np.asarray(red)


def _layout(sc: RGB) -> tuple[int, int]:
    """(first row, end row) of the slice in an SC picture: below the banner's urgent bar, above the legend."""
    bar_rows = np.flatnonzero(_near(sc, URGENT_COLOUR, 0).all(axis=1))
    assert bar_rows.size, "the SC has no urgent bar under its banner"
    banner_end = int(bar_rows.max()) + 1
    legend_bg = np.asarray(_near(sc[:, :4], (16, 16, 16), 0).all(axis=1))  # the legend's left padding is banner grey
    legend_start = sc.shape[0]
    while legend_start > banner_end and legend_bg[legend_start - 1]:
        legend_start -= 1
    return banner_end, legend_start


def _sc_pixels(stack: Stack, instance_id: str) -> RGB:
    dataset = pydicom.dcmread(io.BytesIO(stack.orthanc.get_bytes(f"/instances/{instance_id}/file")))
    return np.asarray(dataset.pixel_array, dtype=np.int16)


def _crop(screenshot: bytes, box: dict[str, float]) -> RGB:
    with Image.open(io.BytesIO(screenshot)) as shot:
        area = shot.convert("RGB").crop(
            (int(box["x"]), int(box["y"]), int(box["x"] + box["width"]), int(box["y"] + box["height"]))
        )
        return np.asarray(area, dtype=np.int16)


def test_the_urgent_sc_series_renders_in_orthancs_web_viewer(viewer_stack: Stack, page: Any, tmp_path: Path) -> None:
    series_id, study_uid = _upload_series(viewer_stack.orthanc, _urgent_series_files(tmp_path))
    viewer_stack.orthanc.push("triaged", [series_id])
    scs = _wait_outputs(viewer_stack, study_uid, timeout=240)[SC_CLASS]
    assert scs and all(sc["SeriesDescription"].startswith("AI TRIAGE URGENT:") for sc in scs)
    [sc_series] = {viewer_stack.orthanc.get(f"/instances/{sc['ID']}")["ParentSeries"] for sc in scs}
    # A series Orthanc still counts as receiving gets the viewer's "still receiving" throbber: open it when stable.
    wait_for(lambda: bool(viewer_stack.orthanc.get(f"/series/{sc_series}")["IsStable"]), timeout=60, what="stable")

    messages: list[str] = []
    page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
    response = page.goto(viewer_stack.orthanc.url(f"/web-viewer/app/viewer.html?series={sc_series}"))
    assert response is not None and response.status == 200
    # Cornerstone draws into a canvas in #dicomImage once the first frame is decoded; wait for painted pixels.
    canvas = page.locator("#dicomImage canvas")
    canvas.wait_for(state="attached", timeout=60_000)
    page.wait_for_function(
        """() => {
            const c = document.querySelector('#dicomImage canvas');
            if (!c || c.width < 64 || c.height < 64) return false;
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let lit = 0;
            for (let i = 0; i < d.length; i += 4) if (d[i] + d[i + 1] + d[i + 2] > 60) lit++;
            return lit > c.width * c.height / 20;
        }""",
        timeout=60_000,
    )
    screenshot = page.screenshot()
    (tmp_path / "orthanc-viewer.png").write_bytes(screenshot)
    (tmp_path / "orthanc-viewer-console.txt").write_text("\n".join(messages) + "\n", encoding="utf-8")
    target = os.environ.get(SCREENSHOT_ENV)
    if target:
        Path(target).write_bytes(screenshot)
    box = canvas.bounding_box()
    assert box is not None, f"no canvas on the page; console: {messages}"
    shown = _crop(screenshot, box)

    # The banner's bar is a full-width row of the urgent colour: it gives where and how large the SC is drawn.
    urgent = _near(shown, URGENT_COLOUR, 40)
    bar_row = int(urgent.sum(axis=1).argmax())
    columns = np.flatnonzero(urgent[bar_row])
    assert columns.size > 100, f"no urgent banner bar in the viewer; console: {messages}"
    left, right = int(columns.min()), int(columns.max()) + 1
    assert columns.size >= 0.9 * (right - left), "the urgent bar is broken up: not our banner"

    # Every SC of the series has the same layout, so whichever the viewer shows first maps onto the first one.
    sc = _sc_pixels(viewer_stack, scs[0]["ID"])
    scale = (right - left) / sc.shape[1]
    slice_start, slice_end = _layout(sc)
    banner_top = bar_row - round(slice_start * scale)
    headline = urgent[max(banner_top, 0) : bar_row - 4, left:right]
    assert headline.sum() > 100, "the banner's headline is not in the urgent colour"

    margin = 4
    body = shown[bar_row + margin : bar_row + round((slice_end - slice_start) * scale) - margin, left:right]
    yellow, red = _hues(body)
    sc_yellow, sc_red = _hues(sc[slice_start:slice_end])
    assert sc_yellow.any() and sc_red.any(), "the SC itself has no hot Grad-CAM overlay"
    # Measured: ~5500 yellow and ~2500 red pixels in a 1366×768 screenshot; grey tissue gives none.
    assert yellow.sum() >= 200, f"no yellow overlay in the viewer's frame ({yellow.sum()} px)"
    assert red.sum() >= 200, f"no red overlay in the viewer's frame ({red.sum()} px)"
    assert not [m for m in messages if m.startswith("pageerror")], messages
