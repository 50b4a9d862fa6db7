"""The weight curve across the blocks, as a small inline SVG (no dependency; works on gradio 3 and 4).

The block labels hang below the plot, rotated so that 26 of them fit side by side. The bottom margin is computed
from the longest label, so every label lies inside the viewBox (the browser clips what lies outside it).
"""
from __future__ import annotations

import math
from html import escape

LABEL_FONT = 9  # px, in viewBox units
LABEL_ANGLE = 60  # degrees; labels read upwards to the right and end under their block's point
CHAR_EM = 0.8  # generous width of one label character (capitals and digits of common sans fonts are <= 0.78 em)
LABEL_GAP = 4  # between the plot's bottom and the labels' ends


def label_extent(text: str, font_size: float = LABEL_FONT) -> tuple[float, float]:
    """How far a label, anchored at its end and rotated by ``LABEL_ANGLE``, reaches (left of, below) its anchor."""
    length = len(text) * CHAR_EM * font_size
    rad = math.radians(LABEL_ANGLE)
    # the text runs down-left from its end; its glyphs rise perpendicular to that, up-left
    return length * math.cos(rad) + font_size * math.sin(rad), length * math.sin(rad)


def curve_svg(values: list[float], blocks: tuple[str, ...], beta: list[float] | None = None,
              width: int = 520, height: int = 150) -> str:
    n = len(values)
    if n < 2:
        return ""
    lo = min(0.0, *values, *(beta or []))
    hi = max(1.0, *values, *(beta or []))
    below = max(label_extent(b)[1] for b in blocks)
    pad_t, pad_r = 16, 10
    pad_b = math.ceil(LABEL_GAP + below + 2)
    pad_l = max(30, math.ceil(label_extent(blocks[0])[0] + 2))

    def xy(i: int, v: float) -> tuple[float, float]:
        x = pad_l + i * (width - pad_l - pad_r) / (n - 1)
        y = pad_t + (hi - v) * (height - pad_t - pad_b) / (hi - lo or 1)
        return x, y

    def line(vals, color):
        pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(i, v) for i, v in enumerate(vals)))
        dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}"/>'
                       for x, y in (xy(i, v) for i, v in enumerate(vals)))
        return f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{pts}"/>{dots}'

    grid = ""
    for v in (lo, (lo + hi) / 2, hi):
        _, y = xy(0, v)
        grid += (f'<line x1="{pad_l}" x2="{width - pad_r}" y1="{y:.1f}" y2="{y:.1f}" stroke="#8884"/>'
                 f'<text x="2" y="{y + 4:.1f}" font-size="10" fill="currentColor">{v:.3g}</text>')
    label_y = height - pad_b + LABEL_GAP
    labels = "".join(
        f'<text class="blockmerge-curve-label" x="{xy(i, lo)[0]:.1f}" y="{label_y}" font-size="{LABEL_FONT}" '
        f'fill="currentColor" text-anchor="end" transform="rotate(-{LABEL_ANGLE} {xy(i, lo)[0]:.1f} {label_y})">'
        f'{escape(b)}</text>'
        for i, b in enumerate(blocks))
    legend = '<text x="{}" y="12" font-size="10" fill="#e67e22">alpha</text>'.format(width - 70)
    if beta:
        legend += '<text x="{}" y="12" font-size="10" fill="#3498db">beta</text>'.format(width - 35)
    body = grid + (line(beta, "#3498db") if beta else "") + line(values, "#e67e22") + labels + legend
    return (f'<svg class="blockmerge-curve" viewBox="0 0 {width} {height}" width="100%" '
            f'xmlns="http://www.w3.org/2000/svg" role="img" aria-label="block weight curve">{body}</svg>')
