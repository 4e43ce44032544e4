"""The slice-score strip: tumour probability per slice as an inline SVG bar chart, key slices marked.

Server-side SVG (no JavaScript, no chart library): one bar per slice, dimmed where the slice does not count as
brain (too little of it, or the neck of a whole-head volume), the model's urgency threshold as a dashed line, key
slices (the ones the series score and the Grad-CAM images come from) with a marker above.
Each bar has a ``<title>`` tooltip.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from markupsafe import Markup

from triaged.db.views import SliceView

WIDTH = 1000
HEIGHT = 150
TOP = 16  # room for the key-slice markers
BOTTOM = 18  # room for the slice numbers
LEFT = 34  # room for the axis labels


def _y(probability: float) -> float:
    return TOP + (1.0 - min(max(probability, 0.0), 1.0)) * (HEIGHT - TOP - BOTTOM)


def slice_strip(slices: Sequence[SliceView], threshold: float | None) -> Markup:
    """The strip as SVG markup (safe to embed: every text is escaped)."""
    count = max(len(slices), 1)
    step = (WIDTH - LEFT) / count
    bar = max(step * 0.8, 1.0)
    parts = [
        f'<svg class="strip" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" preserveAspectRatio="none" '
        f'aria-label="tumour probability per slice">',
        f'<rect class="strip-bg" x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT}" height="{HEIGHT - TOP - BOTTOM}"/>',
    ]
    for value in (0.0, 0.5, 1.0):
        y = _y(value)
        parts.append(f'<line class="gridline" x1="{LEFT}" x2="{WIDTH}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="axis" x="{LEFT - 4}" y="{y + 4:.1f}" text-anchor="end">{value:.1f}</text>')
    label_every = max(1, round(count / 12))
    for position, item in enumerate(slices):
        x = LEFT + position * step + (step - bar) / 2
        y = _y(item.tumour_probability)
        kind = "key" if item.is_key else ("in" if item.in_brain else "out")
        tip = escape(
            f"slice {item.slice_index + 1}: p(tumour) {item.tumour_probability:.3f}"
            + ("" if item.in_brain else " (not counted: too little brain, or below the brain)")
            + (" — key slice" if item.is_key else "")
        )
        parts.append(
            f'<rect class="bar bar-{kind}" x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" '
            f'height="{HEIGHT - BOTTOM - y:.1f}"><title>{tip}</title></rect>'
        )
        if item.is_key:
            cx = x + bar / 2
            parts.append(f'<path class="key-marker" d="M{cx - 5:.1f} 2 L{cx + 5:.1f} 2 L{cx:.1f} 12 Z"/>')
        if position % label_every == 0:
            parts.append(
                f'<text class="axis" x="{x + bar / 2:.1f}" y="{HEIGHT - 4}" text-anchor="middle">'
                f"{item.slice_index + 1}</text>"
            )
    if threshold is not None:
        y = _y(threshold)
        parts.append(f'<line class="threshold" x1="{LEFT}" x2="{WIDTH}" y1="{y:.1f}" y2="{y:.1f}"/>')
    parts.append("</svg>")
    return Markup("".join(parts))
