"""PNG plots drawn with Pillow (matplotlib is not a dependency): curves, confusion matrix, Grad-CAM grids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Curve = tuple[str, np.ndarray, np.ndarray]
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def line_plot(
    path: Path, curves: Sequence[Curve], *, title: str, xlabel: str, ylabel: str, diagonal: bool = True, size: int = 480
) -> None:
    """Curves on a [0, 1] × [0, 1] frame with a legend (ROC curves, reliability diagrams)."""
    margin = 50
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    font = _font()
    x0, y0, x1, y1 = margin, 30, size - 15, size - margin
    draw.rectangle((x0, y0, x1, y1), outline="black")

    def to_px(x: float, y: float) -> tuple[float, float]:
        return x0 + x * (x1 - x0), y1 - y * (y1 - y0)

    for t in np.linspace(0, 1, 6):
        px, _ = to_px(float(t), 0)
        _, py = to_px(0, float(t))
        draw.line((px, y1, px, y1 + 4), fill="black")
        draw.text((px - 8, y1 + 6), f"{t:.1f}", fill="black", font=font)
        draw.line((x0 - 4, py, x0, py), fill="black")
        draw.text((x0 - 30, py - 6), f"{t:.1f}", fill="black", font=font)
    if diagonal:
        draw.line((*to_px(0, 0), *to_px(1, 1)), fill=(180, 180, 180))
    for k, (label, xs, ys) in enumerate(curves):
        colour = COLOURS[k % len(COLOURS)]
        points = [to_px(float(x), float(y)) for x, y in zip(xs, ys, strict=True)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for p in points if len(points) < 30 else []:
            draw.ellipse((p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2), fill=colour)
        draw.text((x0 + 150, y1 - 14 * (len(curves) - k) - 4), label, fill=colour, font=font)
    draw.text((x0, 8), title, fill="black", font=font)
    draw.text(((x0 + x1) / 2 - 30, size - 20), xlabel, fill="black", font=font)
    draw.text((4, 14), ylabel, fill="black", font=font)
    img.save(path)


def confusion_plot(path: Path, cm: np.ndarray, classes: Sequence[str], *, title: str, cell: int = 80) -> None:
    """Confusion matrix (rows true, columns predicted) shaded by row-normalised rate."""
    margin = 90
    n = len(classes)
    img = Image.new("RGB", (margin + n * cell + 10, margin + n * cell + 10), "white")
    draw = ImageDraw.Draw(img)
    font = _font()
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    for i in range(n):
        draw.text((4, margin + i * cell + cell // 2 - 6), classes[i][:12], fill="black", font=font)
        draw.text((margin + i * cell + 4, margin - 16), classes[i][:12], fill="black", font=font)
        for j in range(n):
            shade = int(255 - 200 * rates[i, j])
            box = (margin + j * cell, margin + i * cell, margin + (j + 1) * cell, margin + (i + 1) * cell)
            draw.rectangle(box, fill=(shade, shade, 255), outline="black")
            draw.text((box[0] + 8, box[1] + cell // 2 - 6), f"{cm[i, j]} ({rates[i, j]:.2f})", fill="black", font=font)
    draw.text((4, 4), title, fill="black", font=font)
    draw.text((4, 20), "rows: true, columns: predicted", fill="black", font=font)
    img.save(path)


def jet(values: np.ndarray) -> np.ndarray:
    """Map [0, 1] values to an RGB uint8 jet-like colour ramp."""
    v = np.clip(values, 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    result: np.ndarray = (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)
    return result


def overlay(image: np.ndarray, cam: np.ndarray, mask: np.ndarray | None = None, alpha: float = 0.4) -> Image.Image:
    """Grayscale image in [0, 1] with a colour CAM blended in and the mask outline in white."""
    gray = np.repeat((np.clip(image, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=-1).astype(np.float32)
    blended = (1 - alpha * cam[..., None]) * gray + alpha * cam[..., None] * jet(cam).astype(np.float32)
    out = blended.astype(np.uint8)
    if mask is not None:
        edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
        out[edge] = 255
    return Image.fromarray(out)


def image_grid(path: Path, tiles: Sequence[tuple[Image.Image, str]], *, cols: int = 6, title: str = "") -> None:
    """Tiles with captions in a grid (Grad-CAM examples)."""
    if not tiles:
        return
    w, h = tiles[0][0].size
    rows = (len(tiles) + cols - 1) // cols
    img = Image.new("RGB", (cols * (w + 4), 20 + rows * (h + 18)), "white")
    draw = ImageDraw.Draw(img)
    font = _font()
    draw.text((4, 4), title, fill="black", font=font)
    for k, (tile, caption) in enumerate(tiles):
        x, y = (k % cols) * (w + 4), 20 + (k // cols) * (h + 18)
        img.paste(tile, (x, y))
        draw.text((x + 2, y + h + 2), caption[:28], fill="black", font=font)
    img.save(path)
