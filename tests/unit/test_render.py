"""The picture of a triage Secondary Capture: windowing, overlay placement, orientation, legibility."""

from __future__ import annotations

import numpy as np
import pytest

from triaged.outputs.render import (
    MIN_IMAGE_SIZE,
    Banner,
    OverlayStyle,
    blend_overlay,
    colormap,
    render_secondary_capture,
    window,
)


def _phantom(size: int = 128) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    head = ((xx - size / 2) ** 2 / (0.4 * size) ** 2 + (yy - size / 2) ** 2 / (0.45 * size) ** 2) < 1
    return np.asarray(head * 800.0 + 50.0, dtype=np.float64)


def test_window_uses_percentiles_and_ignores_outliers() -> None:
    pixels = np.linspace(0, 1000, 10_000).reshape(100, 100)
    pixels[0, 0] = 1e9
    gray = window(pixels, (1, 99))
    assert gray.dtype == np.uint8
    assert int(gray[50, 50]) == pytest.approx(128, abs=3)
    assert gray.min() == 0 and gray.max() == 255


def test_window_of_constant_slice_is_black() -> None:
    assert not window(np.full((8, 8), 7.0), (1, 99)).any()


def test_overlay_only_where_map_is_high() -> None:
    gray = np.full((64, 64), 100, dtype=np.uint8)
    cam = np.zeros((64, 64))
    cam[10:20, 10:20] = 1.0
    cam[40:50, 40:50] = 0.2  # below the threshold: anatomy untouched
    rgb = blend_overlay(gray, cam, OverlayStyle(threshold=0.4))
    assert (rgb[40:50, 40:50] == 100).all()
    assert (rgb[0:5, 0:5] == 100).all()
    hot = rgb[15, 15].astype(int)
    assert hot[0] > hot[2] + 60  # red dominates at the maximum
    assert hot.sum() != 300


def test_overlay_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="shape"):
        blend_overlay(np.zeros((4, 4), np.uint8), np.zeros((5, 4)), OverlayStyle())


def test_colormap_runs_blue_to_red() -> None:
    low, high = colormap(np.array([0.0, 1.0]))
    assert low[2] > low[0] and high[0] > high[2]


def test_render_upscales_keeps_orientation_and_has_banner() -> None:
    pixels = _phantom(128)
    pixels[5:15, 100:120] = 2000.0  # a bright marker in the top-right corner
    cam = np.zeros_like(pixels)
    cam[60:70, 20:30] = 1.0  # hot spot on the left
    banner = Banner("AI TRIAGE URGENT: glioma", ("line one", "line two"), urgent=True)
    rgb = render_secondary_capture(pixels, cam, banner)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert rgb.shape[1] == MIN_IMAGE_SIZE
    # Locate the slice area: the rows whose middle column is the phantom (not banner/legend).
    scale = MIN_IMAGE_SIZE / 128
    banner_rows = np.where((rgb[:, :, 0] > 200) & (rgb[:, :, 1] < 100))[0]
    assert banner_rows.size and banner_rows.min() < 60  # red headline text at the top
    top = rgb.shape[0] - 1
    # The marker stays top-right: find the brightest white block in the right half.
    gray = rgb.astype(int).sum(axis=2)
    white = np.argwhere((gray > 740) & (np.ptp(rgb.astype(int), axis=2) < 10))
    assert white.size
    marker = white[white[:, 1] > 100 * scale]
    assert marker.size and marker[:, 1].min() >= int(100 * scale) - 2
    # The hot spot is on the left half of the image and red-ish.
    reddish = np.argwhere((rgb[:, :, 0].astype(int) - rgb[:, :, 2].astype(int)) > 80)
    body = reddish[(reddish[:, 0] > 150) & (reddish[:, 0] < top - 60)]
    assert body.size and body[:, 1].mean() < MIN_IMAGE_SIZE / 2


def test_render_without_cam_has_no_colour_in_the_slice() -> None:
    rgb = render_secondary_capture(_phantom(256), None, Banner("AI TRIAGE: NOT ASSESSED", ("reason",)))
    middle = rgb[rgb.shape[0] // 2]
    assert (np.ptp(middle.astype(int), axis=1) == 0).all()


def test_render_rejects_3d_input() -> None:
    with pytest.raises(ValueError, match="2-D"):
        render_secondary_capture(np.zeros((2, 4, 4)), None, Banner("x", ()))


def test_long_banner_lines_wrap_inside_the_image() -> None:
    banner = Banner("AI TRIAGE: " + "very long finding " * 8, ("word " * 60,))
    narrow = render_secondary_capture(_phantom(), None, banner)
    short = render_secondary_capture(_phantom(), None, Banner("AI TRIAGE: x", ("word",)))
    assert narrow.shape[1] == short.shape[1] == MIN_IMAGE_SIZE
    assert narrow.shape[0] > short.shape[0] + 40  # wrapped onto more lines, not cut off


def test_overlay_stays_off_the_background_air() -> None:
    gray = np.zeros((64, 64), dtype=np.uint8)
    gray[:, 32:] = 180  # tissue on the right half only
    cam = np.ones((64, 64))
    rgb = blend_overlay(gray, cam, OverlayStyle()).astype(int)
    assert (rgb[:, :20] == 0).all()  # air far from tissue: untouched
    assert (np.ptp(rgb[:, 45:], axis=2) > 40).all()  # tissue: coloured


def test_gaussian_smooth_preserves_mass_and_spreads() -> None:
    from triaged.outputs.render import gaussian_smooth

    impulse = np.zeros((31, 31))
    impulse[15, 15] = 1.0
    blurred = gaussian_smooth(impulse, 2.0)
    assert blurred.sum() == pytest.approx(1.0, rel=1e-6)
    assert blurred[15, 15] < 0.1 and blurred[15, 18] > 0
