"""Inline SVG charts for the run report: forest plots, histograms, line panels, horizontal bars.

Takes plain numbers and labels, returns one `<svg>` string per chart: an id and class "chart", a visible title,
labelled axes with tick values, and `<title>`/`<desc>` for screen readers. No scripts, no external assets, so a
report embeds them as they are. Knows nothing about runs, files or what the numbers mean.
"""

from __future__ import annotations

import html
import math

import numpy as np

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
BETTER, WORSE, NOISE = "#2ca02c", "#d62728", "#7f7f7f"
FONT = 'font-family="sans-serif"'


def ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) covering [lo, hi]."""
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.floor(lo / step + 1e-9) * step
    return [round(first + i * step, 12) for i in range(int(math.ceil((hi - first) / step - 1e-9)) + 1)]


def fmt(value: float) -> str:
    """A tick or annotation label: short, no trailing zeros, no "-0"."""
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:.0f}"
    if abs(value) < 0.001:
        return f"{value:.2g}"
    return f"{value:.4f}".rstrip("0").rstrip(".")


def _text(x: float, y: float, s: str, size: int = 11, anchor: str = "start", **attrs: str) -> str:
    extra = "".join(f' {k.rstrip("_").replace("_", "-")}="{v}"' for k, v in attrs.items())  # class_ -> class
    return f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}"{extra}>{html.escape(s)}</text>'


def _svg(chart_id: str, title: str, desc: str, width: int, height: int, body: list[str]) -> str:
    return (
        f'<svg id="{chart_id}" class="chart" role="img" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" aria-labelledby="{chart_id}-title {chart_id}-desc" {FONT}>'
        f'<title id="{chart_id}-title">{html.escape(title)}</title>'
        f'<desc id="{chart_id}-desc">{html.escape(desc)}</desc>'
        + _text(8, 18, title, size=14, font_weight="bold")
        + "".join(body)
        + "</svg>"
    )


class _Scale:
    """Linear map from data [lo, hi] to pixels [p0, p1] (p1 < p0 for a y axis)."""

    def __init__(self, lo: float, hi: float, p0: float, p1: float):
        self.lo, self.hi, self.p0, self.p1 = lo, hi if hi > lo else lo + 1, p0, p1

    def __call__(self, v: float) -> float:
        return self.p0 + (v - self.lo) / (self.hi - self.lo) * (self.p1 - self.p0)


def _x_axis(x: _Scale, y: float, values: list[float], label: str, grid_top: float | None = None) -> list[str]:
    parts = [f'<line x1="{x.p0:.1f}" y1="{y:.1f}" x2="{x.p1:.1f}" y2="{y:.1f}" stroke="#444"/>']
    for v in values:
        px = x(v)
        if grid_top is not None:
            parts.append(f'<line x1="{px:.1f}" y1="{grid_top:.1f}" x2="{px:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(f'<line x1="{px:.1f}" y1="{y:.1f}" x2="{px:.1f}" y2="{y + 4:.1f}" stroke="#444"/>')
        parts.append(_text(px, y + 15, fmt(v), size=10, anchor="middle"))
    parts.append(_text((x.p0 + x.p1) / 2, y + 30, label, anchor="middle", class_="axis-label"))
    return parts


def _y_axis(y: _Scale, x: float, values: list[float], label: str, grid_right: float | None = None) -> list[str]:
    parts = [f'<line x1="{x:.1f}" y1="{y.p0:.1f}" x2="{x:.1f}" y2="{y.p1:.1f}" stroke="#444"/>']
    for v in values:
        py = y(v)
        if grid_right is not None:
            parts.append(f'<line x1="{x:.1f}" y1="{py:.1f}" x2="{grid_right:.1f}" y2="{py:.1f}" stroke="#eee"/>')
        parts.append(f'<line x1="{x - 4:.1f}" y1="{py:.1f}" x2="{x:.1f}" y2="{py:.1f}" stroke="#444"/>')
        parts.append(_text(x - 6, py + 3.5, fmt(v), size=10, anchor="end"))
    mid = (y.p0 + y.p1) / 2
    parts.append(
        _text(x - 40, mid, label, anchor="middle", class_="axis-label", transform=f"rotate(-90 {x - 40:.1f} {mid:.1f})")
    )
    return parts


Interval = tuple[float, float, float]  # (mean, low, high)


def forest(
    chart_id: str,
    title: str,
    desc: str,
    labels: list[str],
    panels: list[tuple[str, list[Interval | None]]],
    zero_line: bool = False,
) -> str:
    """One row per label, one panel per (axis label, [interval per row]); a None interval leaves the row blank in
    that panel (a label with no interval in any panel is drawn as a bold group header). With `zero_line`, a dashed
    line at 0 and intervals coloured by sign: green above 0, red below, grey when they contain 0."""
    left, panel_w, gap, row_h, top = 200, 300, 36, 20, 34
    header = [all(p[1][i] is None for p in panels) for i in range(len(labels))]
    bottom = top + row_h * len(labels) + 8
    width, height = left + len(panels) * (panel_w + gap), bottom + 40
    body = [
        _text(left - 8, top + row_h * i + 14, s, anchor="end", font_weight="bold" if header[i] else "normal")
        for i, s in enumerate(labels)
    ]
    for j, (axis_label, intervals) in enumerate(panels):
        values = [v for iv in intervals if iv is not None for v in iv] + ([0.0] if zero_line else [])
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        pad = (hi - lo) * 0.05 or 0.05
        tick_values = ticks(lo - pad, hi + pad)
        x0 = left + j * (panel_w + gap) + 10
        x = _Scale(tick_values[0], tick_values[-1], x0, x0 + panel_w - 20)
        body += _x_axis(x, bottom, tick_values, axis_label, grid_top=top)
        if zero_line:
            body.append(
                f'<line class="zero-line" x1="{x(0):.1f}" y1="{top:.1f}" x2="{x(0):.1f}" y2="{bottom:.1f}" '
                'stroke="#444" stroke-dasharray="4 3"/>'
            )
        for i, iv in enumerate(intervals):
            if iv is None:
                continue
            mean, low, high = iv
            colour = (BETTER if low > 0 else WORSE if high < 0 else NOISE) if zero_line else PALETTE[0]
            cy = top + row_h * i + 10
            body.append(
                f'<g class="interval"><title>{html.escape(labels[i])}: {fmt(mean)} [{fmt(low)}, {fmt(high)}]</title>'
                f'<line x1="{x(low):.1f}" y1="{cy:.1f}" x2="{x(high):.1f}" y2="{cy:.1f}" stroke="{colour}" '
                f'stroke-width="2"/><circle cx="{x(mean):.1f}" cy="{cy:.1f}" r="4" fill="{colour}"/></g>'
            )
    return _svg(chart_id, title, desc, width, height, body)


def histogram(chart_id: str, title: str, desc: str, series: dict[str, list[float]], xlabel: str, bins: int = 20) -> str:
    """Overlaid count histograms over the shared range of all series, a dashed line at each series' mean; the
    legend gives each series' n and mean."""
    everything = [v for values in series.values() for v in values]
    lo, hi = (min(everything), max(everything)) if everything else (0.0, 1.0)
    x_ticks = ticks(lo, hi, 6)
    edges = np.linspace(x_ticks[0], x_ticks[-1], bins + 1)  # bins over the axis' round range, so ticks fall inside
    counts = {name: np.histogram(values, bins=edges)[0] for name, values in series.items()}
    top_count = max((int(c.max()) for c in counts.values() if c.size), default=1) or 1
    left, right, top = 60, 540, 34 + 16 * len(series)
    width, bottom = right + 20, top + 180
    x = _Scale(float(edges[0]), float(edges[-1]), left, right)
    y_ticks = [t for t in ticks(0, top_count) if t == int(t)] or [0, top_count]
    y = _Scale(0, y_ticks[-1], bottom, top)
    body = _y_axis(y, left, y_ticks, "count", grid_right=right) + _x_axis(x, bottom, x_ticks, xlabel)
    for i, (name, c) in enumerate(counts.items()):
        colour = PALETTE[i % len(PALETTE)]
        path = [f"M{x(edges[0]):.1f},{y(0):.1f}"]
        for b, n in enumerate(c):
            path.append(f"L{x(edges[b]):.1f},{y(n):.1f}L{x(edges[b + 1]):.1f},{y(n):.1f}")
        path.append(f"L{x(edges[-1]):.1f},{y(0):.1f}Z")
        values = series[name]
        body.append(
            f'<path class="series" d="{"".join(path)}" fill="{colour}" fill-opacity="0.2" stroke="{colour}" '
            'stroke-width="1.5"/>'
        )
        legend = f"{name} (n={len(values)})"
        if values:
            mean = float(np.mean(values))
            body.append(
                f'<line x1="{x(mean):.1f}" y1="{top:.1f}" x2="{x(mean):.1f}" y2="{bottom:.1f}" stroke="{colour}" '
                'stroke-dasharray="5 3"/>'
            )
            legend += f", mean {fmt(mean)}"
        ly = 30 + 16 * i
        body.append(f'<rect x="{left}" y="{ly - 9}" width="10" height="10" fill="{colour}"/>')
        body.append(_text(left + 15, ly, legend, class_="legend"))
    return _svg(chart_id, title, desc, width, bottom + 40, body)


Series = dict[str, list[tuple[float, float]]]  # name -> [(x, y)]


def lines(chart_id: str, title: str, desc: str, panels: list[tuple[str, Series]], xlabel: str) -> str:
    """Small line panels side by side, one per (y axis label, series); a series of few points is also marked."""
    panel_w, panel_h, gap, left = 300, 170, 70, 60
    top = 34 + 16 * max((len(s) for _, s in panels), default=0)
    width = left + len(panels) * (panel_w + gap) - gap + 20
    body: list[str] = []
    for j, (ylabel, series) in enumerate(panels):
        x0 = left + j * (panel_w + gap)
        points = [p for s in series.values() for p in s]
        xs, ys = [p[0] for p in points] or [0.0], [p[1] for p in points] or [0.0]
        x_ticks, y_ticks = ticks(min(xs), max(xs)), ticks(min(ys), max(ys))
        x = _Scale(x_ticks[0], x_ticks[-1], x0, x0 + panel_w)
        y = _Scale(y_ticks[0], y_ticks[-1], top + panel_h, top)
        body += _y_axis(y, x0, y_ticks, ylabel, grid_right=x0 + panel_w) + _x_axis(x, top + panel_h, x_ticks, xlabel)
        for i, (name, pts) in enumerate(series.items()):
            colour = PALETTE[i % len(PALETTE)]
            coords = " ".join(f"{x(a):.1f},{y(b):.1f}" for a, b in pts)
            body.append(f'<polyline class="series" fill="none" stroke="{colour}" stroke-width="2" points="{coords}"/>')
            if len(pts) <= 30:
                body += [f'<circle cx="{x(a):.1f}" cy="{y(b):.1f}" r="2.5" fill="{colour}"/>' for a, b in pts]
            ly = 30 + 16 * i
            body.append(f'<rect x="{x0}" y="{ly - 9}" width="10" height="10" fill="{colour}"/>')
            last = f", last {fmt(pts[-1][1])}" if pts else ""
            body.append(_text(x0 + 15, ly, f"{name} ({len(pts)} points{last})", class_="legend"))
    return _svg(chart_id, title, desc, width, top + panel_h + 40, body)


def bars(chart_id: str, title: str, desc: str, rows: list[tuple[str, float]], xlabel: str, unit: str = "") -> str:
    """Horizontal bars, one per (label, value >= 0), the value written at each bar's end."""
    left, bar_w, row_h, top = 230, 460, 16, 30
    bottom = top + row_h * len(rows) + 4
    x_ticks = ticks(0, max((v for _, v in rows), default=1.0))
    x = _Scale(0, x_ticks[-1], left, left + bar_w)
    body = _x_axis(x, bottom, x_ticks, xlabel, grid_top=top)
    for i, (label, value) in enumerate(rows):
        yy = top + row_h * i
        body.append(_text(left - 6, yy + 11.5, label, size=10, anchor="end"))
        body.append(
            f'<rect class="bar" x="{left}" y="{yy + 2}" width="{max(x(value) - left, 0.5):.1f}" height="{row_h - 4}" '
            f'fill="{PALETTE[0]}"><title>{html.escape(label)}: {fmt(value)}{unit}</title></rect>'
        )
        body.append(_text(x(value) + 4, yy + 11.5, f"{fmt(value)}{unit}", size=10))
    return _svg(chart_id, title, desc, left + bar_w + 80, bottom + 40, body)
