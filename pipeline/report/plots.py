"""Inline SVG charts: bars, histograms, lines. Every label is escaped here; numbers are formatted, never pasted."""

from __future__ import annotations

from markupsafe import Markup, escape

PALETTE = ["#3b6fb6", "#e0803a", "#4a9a5b", "#c2474a", "#8a64b4", "#8c6d5a", "#d16fb0", "#7f7f7f", "#b5b33a",
           "#3ab0c2"]
W, H = 440, 200
LEFT, BOTTOM, TOP, RIGHT = 56, 34, 22, 10


def _n(x: float) -> str:
    return f"{x:.1f}"


def short(v: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= size:
            return f"{v / size:.3g}{unit}"
    return f"{v:.3g}"


def _text(x: float, y: float, label, anchor: str = "middle", cls: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return f'<text x="{_n(x)}" y="{_n(y)}" text-anchor="{anchor}"{c}>{escape(label)}</text>'


def _frame(title, body: list[str], ymax: float, xlabel, height: int = H) -> Markup:
    """Axes, y ticks, title and axis label around a body drawn in the plot box."""
    parts = [f'<svg class="plot" viewBox="0 0 {W} {height}" role="img">',
             f"<title>{escape(title)}</title>"]
    y0 = height - BOTTOM
    for k in range(5):
        y = y0 - (y0 - TOP) * k / 4
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{W - RIGHT}" y1="{_n(y)}" y2="{_n(y)}"/>')
        parts.append(_text(LEFT - 4, y + 4, short(ymax * k / 4), "end", "tick"))
    parts += body
    parts.append(_text((LEFT + W - RIGHT) / 2, height - 4, xlabel, cls="axis"))
    parts.append("</svg>")
    return Markup("".join(parts))


def histogram(title, labels: list[str], series: list[tuple[str, list[float]]], xlabel, color: int = 0) -> Markup:
    """Vertical bars, one group per bin and one bar per (name, counts) series; `labels` name the bins (a few are
    printed under the axis). Several series get a legend; colours start at PALETTE[color]."""
    ymax = max((max(c, default=0) for _, c in series), default=0) or 1
    y0, span = H - BOTTOM, H - BOTTOM - TOP
    gw = (W - LEFT - RIGHT) / max(1, len(labels))
    bw = gw / max(1, len(series))
    every = max(1, len(labels) // 8)
    body = [_text(LEFT + k * gw + gw / 2, y0 + 13, label, cls="tick") for k, label in enumerate(labels)
            if k % every == 0]
    for s, (name, counts) in enumerate(series):
        fill = PALETTE[(color + s) % len(PALETTE)]
        for k, (label, c) in enumerate(zip(labels, counts)):
            x, h = LEFT + k * gw + s * bw, span * c / ymax
            body.append(f'<rect x="{_n(x + 0.5)}" y="{_n(y0 - h)}" width="{_n(max(bw - 1, 0.5))}" '
                        f'height="{_n(h)}" fill="{fill}"><title>{escape(name)} {escape(label)}: '
                        f"{escape(short(c))}</title></rect>")
    if len(series) > 1:
        body += _legend([name for name, _ in series], color)
    return _frame(title, body, ymax, xlabel)


def _legend(names: list[str], first: int = 0) -> list[str]:
    """A row of swatches above the plot box."""
    out, x = [], float(LEFT)
    for k, name in enumerate(names):
        label = name[:24]
        out.append(f'<rect x="{_n(x)}" y="3" width="9" height="9" fill="{PALETTE[(first + k) % len(PALETTE)]}"/>')
        out.append(_text(x + 12, 11, label, "start", "legend"))
        x += 24 + 5.5 * len(label)
    return out


def lines(title, series: list[tuple[str, list[float], list[float]]], xlabel) -> Markup:
    """One polyline per (name, xs, ys), on shared axes starting at 0, with a legend."""
    xmax = max((max(xs) for _, xs, _ in series if xs), default=0) or 1
    ymax = max((max(ys) for _, _, ys in series if ys), default=0) or 1
    y0, span, xspan = H - BOTTOM, H - BOTTOM - TOP, W - LEFT - RIGHT
    body = [_text(LEFT + xspan * k / 4, y0 + 13, short(xmax * k / 4), cls="tick") for k in range(5)]
    for k, (name, xs, ys) in enumerate(series):
        color = PALETTE[k % len(PALETTE)]
        pts = " ".join(f"{_n(LEFT + xspan * x / xmax)},{_n(y0 - span * y / ymax)}" for x, y in zip(xs, ys))
        body.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.6">'
                    f"<title>{escape(name)}</title></polyline>")
    body += _legend([name for name, _, _ in series])
    return _frame(title, body, ymax, xlabel)


def stacked_bars(title, rows: list[tuple[str, dict[str, int]]], keys: list[str]) -> Markup:
    """One horizontal bar per (name, {key: count}), split by `keys` in fixed colours, as shares of the row."""
    height = TOP + 22 * len(rows) + 40
    parts = [f'<svg class="plot" viewBox="0 0 {W} {height}" role="img">',
             f"<title>{escape(title)}</title>"]
    left, span = 110, W - 110 - RIGHT
    for r, (name, counts) in enumerate(rows):
        y, total, x = TOP + 22 * r, sum(counts.values()) or 1, float(left)
        parts.append(_text(left - 6, y + 13, name[:18], "end", "tick"))
        for k, key in enumerate(keys):
            w = span * counts.get(key, 0) / total
            if w > 0:
                parts.append(f'<rect x="{_n(x)}" y="{_n(y)}" width="{_n(w)}" height="16" '
                             f'fill="{PALETTE[k % len(PALETTE)]}"><title>{escape(name)} {escape(key)}: '
                             f"{counts.get(key, 0)}</title></rect>")
            x += w
    for k, key in enumerate(keys):
        x, y = left + 90 * k, height - 14
        parts.append(f'<rect x="{x}" y="{y - 9}" width="9" height="9" fill="{PALETTE[k % len(PALETTE)]}"/>')
        parts.append(_text(x + 13, y, key[:12], "start", "legend"))
    parts.append("</svg>")
    return Markup("".join(parts))
