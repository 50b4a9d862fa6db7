"""The weight curve across the blocks, as a small inline SVG (no dependency; works on gradio 3 and 4)."""
from __future__ import annotations

from html import escape


def curve_svg(values: list[float], blocks: tuple[str, ...], beta: list[float] | None = None,
              width: int = 520, height: int = 150) -> str:
    n = len(values)
    if n < 2:
        return ""
    lo = min(0.0, *values, *(beta or []))
    hi = max(1.0, *values, *(beta or []))
    pad_l, pad_r, pad_t, pad_b = 30, 10, 10, 34

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
                 f'<text x="2" y="{y + 4:.1f}" font-size="10" fill="currentColor">{v:g}</text>')
    labels = "".join(
        f'<text x="{xy(i, lo)[0]:.1f}" y="{height - 4}" font-size="8" fill="currentColor" text-anchor="end" '
        f'transform="rotate(-60 {xy(i, lo)[0]:.1f} {height - 4})">{escape(b)}</text>'
        for i, b in enumerate(blocks))
    legend = '<text x="{}" y="12" font-size="10" fill="#e67e22">alpha</text>'.format(width - 70)
    if beta:
        legend += '<text x="{}" y="12" font-size="10" fill="#3498db">beta</text>'.format(width - 35)
    body = grid + (line(beta, "#3498db") if beta else "") + line(values, "#e67e22") + labels + legend
    return (f'<svg class="blockmerge-curve" viewBox="0 0 {width} {height}" width="100%" '
            f'xmlns="http://www.w3.org/2000/svg" role="img" aria-label="block weight curve">{body}</svg>')
