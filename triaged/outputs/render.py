"""Render the picture of a triage Secondary Capture: grayscale slice, Grad-CAM overlay, burned-in banner.

Pure numpy/PIL so it can be unit-tested and looked at as a PNG. The slice keeps the source's row/column
orientation (no flips or transposes); small slices are upscaled so the banner text stays legible at the
zoom a viewer opens an image with. The overlay is drawn only where the map is high, with an opacity that
rises with the map value, so anatomy under weak activations stays visible.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont

MIN_IMAGE_SIZE = 512
DISCLAIMER = "AI TRIAGE – NOT FOR DIAGNOSTIC USE"
_FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/dejavu"))

# Control points of a perceptually ordered "jet-like" map (blue → cyan → green → yellow → red).
_CMAP_POSITIONS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_CMAP_COLOURS = np.array(
    [[48, 18, 196], [30, 170, 235], [60, 220, 90], [250, 220, 40], [235, 30, 20]],
    dtype=np.float64,
)
BANNER_BG = (16, 16, 16)
URGENT_COLOUR = (255, 70, 60)
ROUTINE_COLOUR = (120, 200, 255)
NEUTRAL_COLOUR = (235, 235, 235)
WARNING_COLOUR = (255, 205, 60)


@dataclass(frozen=True)
class Banner:
    """The text burned into a Secondary Capture, one entry per line below the headline."""

    headline: str
    lines: tuple[str, ...]
    urgent: bool = False


@dataclass(frozen=True)
class OverlayStyle:
    threshold: float = 0.45
    max_alpha: float = 0.6
    percentiles: tuple[float, float] = (0.5, 99.5)
    smoothing: float = 0.02  # Gaussian sigma as a fraction of the slice size
    background_level: int = 12  # 8-bit windowed value below which a pixel counts as air


def window(pixels: NDArray[np.floating] | NDArray[np.integer], percentiles: tuple[float, float]) -> NDArray[np.uint8]:
    """Map a slice to 8-bit grayscale with a window from intensity percentiles (robust to outliers)."""
    data = np.asarray(pixels, dtype=np.float64)
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return np.zeros(data.shape, dtype=np.uint8)
    low, high = np.percentile(finite, percentiles)
    if high <= low:
        high = low + 1.0
    scaled = np.clip((np.nan_to_num(data, nan=low) - low) / (high - low), 0.0, 1.0)
    result: NDArray[np.uint8] = np.round(scaled * 255.0).astype(np.uint8)
    return result


def colormap(values: NDArray[np.floating]) -> NDArray[np.uint8]:
    """Map values in [0, 1] to RGB (last axis of the result)."""
    clipped = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    channels = [np.interp(clipped, _CMAP_POSITIONS, _CMAP_COLOURS[:, c]) for c in range(3)]
    return np.round(np.stack(channels, axis=-1)).astype(np.uint8)


def gaussian_smooth(values: NDArray[np.floating], sigma: float) -> NDArray[np.float64]:
    """Separable Gaussian blur (edge-padded), so a coarse Grad-CAM grid does not show as blocks."""
    data = np.asarray(values, dtype=np.float64)
    if sigma <= 0:
        return data
    radius = max(1, round(3 * sigma))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    for axis in (0, 1):
        padded = np.pad(data, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], mode="edge")
        length = data.shape[axis]
        data = sum(weight * np.take(padded, np.arange(i, i + length), axis=axis) for i, weight in enumerate(kernel))
    return np.asarray(data, dtype=np.float64)


def blend_overlay(gray: NDArray[np.uint8], cam: NDArray[np.floating] | None, style: OverlayStyle) -> NDArray[np.uint8]:
    """Alpha-blend a colour map of ``cam`` onto ``gray`` where ``cam`` exceeds the style's threshold.

    The map is smoothed, the opacity rises linearly from the threshold to ``max_alpha`` at the maximum,
    and it fades out over the image background (air), so colour sits on tissue and weak activations
    leave the anatomy readable.
    """
    rgb = np.repeat(gray[..., None], 3, axis=-1).astype(np.float64)
    if cam is None:
        return rgb.astype(np.uint8)
    if cam.shape != gray.shape:
        raise ValueError(f"Grad-CAM map shape {cam.shape} differs from slice shape {gray.shape}")
    sigma = max(gray.shape) * style.smoothing
    heat = np.clip(gaussian_smooth(np.clip(np.nan_to_num(np.asarray(cam, dtype=np.float64)), 0.0, 1.0), sigma), 0, 1)
    span = max(1.0 - style.threshold, 1e-6)
    alpha = np.clip((heat - style.threshold) / span, 0.0, 1.0) * style.max_alpha
    tissue = gaussian_smooth((gray > style.background_level).astype(np.float64), max(sigma, 1.0))
    alpha = (alpha * np.clip(tissue * 1.5, 0.0, 1.0))[..., None]
    colours = colormap(heat).astype(np.float64)
    return np.round(rgb * (1.0 - alpha) + colours * alpha).astype(np.uint8)


@lru_cache(maxsize=16)
def _font(size: int, *, bold: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    for folder in _FONT_DIRS:
        if (folder / name).is_file():
            return ImageFont.truetype(str(folder / name), size)
    return ImageFont.load_default(size=size)


def _upscale(rgb: NDArray[np.uint8], min_size: int) -> Image.Image:
    image = Image.fromarray(rgb, mode="RGB")
    height, width = rgb.shape[:2]
    scale = max(1.0, min_size / max(height, width))
    if scale > 1.0:
        image = image.resize((round(width * scale), round(height * scale)), Image.Resampling.BICUBIC)
    return image


def _text_height(font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> int:
    box = font.getbbox("Ag|")
    return int(box[3] - box[1])


def _wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: float) -> list[str]:
    """Greedy word wrap so no banner line runs off the image."""
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if current and font.getlength(candidate) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    lines.append(current)
    return lines


def _banner(width: int, banner: Banner) -> Image.Image:
    size = max(14, width // 34)
    head_font, body_font, warn_font = _font(round(size * 1.25), bold=True), _font(size), _font(size, bold=True)
    pad, gap = size // 2 + 2, size // 3 + 2
    usable = width - 2 * pad
    rows: list[tuple[str, ImageFont.FreeTypeFont | ImageFont.ImageFont, tuple[int, int, int], int]] = []
    headline_colour = URGENT_COLOUR if banner.urgent else ROUTINE_COLOUR
    rows += [(text, head_font, headline_colour, gap * 2) for text in _wrap(banner.headline, head_font, usable)]
    for line in banner.lines:
        rows += [(text, body_font, NEUTRAL_COLOUR, gap) for text in _wrap(line, body_font, usable)]
    rows += [(text, warn_font, WARNING_COLOUR, gap) for text in _wrap(DISCLAIMER, warn_font, usable)]
    height = pad * 2 + sum(_text_height(font) + after for _, font, _, after in rows)
    image = Image.new("RGB", (width, height), BANNER_BG)
    draw = ImageDraw.Draw(image)
    y = pad
    for text, font, colour, after in rows:
        draw.text((pad, y), text, font=font, fill=colour)
        y += _text_height(font) + after
    draw.rectangle((0, height - 3, width, height), fill=headline_colour)
    return image


def _legend(width: int, style: OverlayStyle, has_cam: bool) -> Image.Image:
    size = max(12, width // 42)
    font = _font(size)
    pad = size // 2 + 2
    bar_height = max(10, size)
    height = pad * 2 + max(bar_height, _text_height(font)) + 4
    image = Image.new("RGB", (width, height), BANNER_BG)
    draw = ImageDraw.Draw(image)
    if not has_cam:
        draw.text((pad, pad), "No Grad-CAM overlay on this image", font=font, fill=NEUTRAL_COLOUR)
        return image
    label = "Grad-CAM (model attention):"
    draw.text((pad, pad), label, font=font, fill=NEUTRAL_COLOUR)
    bar_left = pad * 2 + int(draw.textlength(label, font=font))
    draw.text((bar_left, pad), "low", font=font, fill=NEUTRAL_COLOUR)
    bar_left += int(draw.textlength("low", font=font)) + pad
    bar_right = width - pad * 2 - int(draw.textlength("high", font=font))
    ramp = np.linspace(style.threshold, 1.0, max(bar_right - bar_left, 2))
    bar = np.repeat(colormap(ramp)[None, ...], bar_height, axis=0)
    image.paste(Image.fromarray(bar, mode="RGB"), (bar_left, pad))
    draw.text((bar_right + pad, pad), "high", font=font, fill=NEUTRAL_COLOUR)
    return image


def render_secondary_capture(
    pixels: NDArray[np.floating] | NDArray[np.integer],
    cam: NDArray[np.floating] | None,
    banner: Banner,
    style: OverlayStyle | None = None,
    *,
    min_size: int = MIN_IMAGE_SIZE,
) -> NDArray[np.uint8]:
    """Return an RGB uint8 picture (rows, columns, 3): banner above, the slice with overlay, legend below.

    ``pixels`` is one 2-D slice (modality LUT applied); ``cam`` is a map in [0, 1] of the same shape, or
    ``None`` for an image without overlay (e.g. a not-assessable notice).
    """
    if np.asarray(pixels).ndim != 2:
        raise ValueError(f"expected a 2-D slice, got shape {np.asarray(pixels).shape}")
    style = style or OverlayStyle()
    slice_image = _upscale(blend_overlay(window(pixels, style.percentiles), cam, style), min_size)
    width = max(slice_image.width, min_size)
    top, bottom = _banner(width, banner), _legend(width, style, cam is not None)
    canvas = Image.new("RGB", (width, top.height + slice_image.height + bottom.height), (0, 0, 0))
    canvas.paste(top, (0, 0))
    canvas.paste(slice_image, ((width - slice_image.width) // 2, top.height))
    canvas.paste(bottom, (0, top.height + slice_image.height))
    return np.asarray(canvas, dtype=np.uint8).copy()
