"""SVG charts on the standard library: line panels for training curves, grouped bars for Table 2,
stacked win/tie/loss bars for the judge (Figures 3-5). Plain text files that any browser, GitHub
and most Markdown viewers show; no plotting library is a dependency."""

from __future__ import annotations

import math
from xml.sax.saxutils import escape

COLOURS = ["#3b6ea5", "#d1605e", "#4e9a6a", "#e0a030", "#8a63b8", "#5aa9b0"]
FONT = 'font-family="sans-serif" font-size="12"'


def nice_ticks(lo: float, hi: float, count: int = 4) -> list[float]:
    """Round tick values covering [lo, hi] (1, 2 or 5 times a power of ten apart)."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if step * m >= raw)
    first = math.floor(lo / step) * step
    return [round(first + i * step, 10) for i in range(int(math.ceil((hi - first) / step)) + 1)]


def _label(v: float) -> str:
    return f"{v:.4g}"


NARROW = 0.05  # a series that moves less than 5% of its size is drawn on an axis from zero


def _narrow(lo: float, hi: float) -> bool:
    """Whether [lo, hi] is a small change of a value far from zero, which an axis fitted to the
    data would stretch over the whole panel."""
    size = max(abs(lo), abs(hi))
    return size > 0 and lo * hi > 0 and (hi - lo) < NARROW * size


def relative_change(first: float, last: float) -> str:
    """'+1.2%', '−0.06%': the change from first to last, relative to first (minus sign U+2212)."""
    if first == 0:
        return "from 0"
    pct = 100 * (last - first) / abs(first)
    text = f"{abs(pct):.2g}" if abs(pct) < 10 else f"{abs(pct):.0f}"
    return f"{'−' if pct < 0 else '+'}{text}%"


def svg_panels(
    title: str,
    panels: list[tuple[str, dict[str, list[tuple[float, float]]]]],
    xlabel: str,
    width: int = 640,
    panel_height: int = 170,
) -> str:
    """Line charts stacked vertically on a shared x axis: panels are (y label, {series name:
    [(x, y), ...]}); a series of one point is drawn as a dot. Non-finite points are skipped."""
    left, right, top, gap = 84, 150, 36, 34
    xs = [x for _, series in panels for pts in series.values() for x, y in pts if math.isfinite(y)]
    xticks = nice_ticks(min(xs, default=0), max(xs, default=1))
    x0, x1 = xticks[0], xticks[-1]
    plot_w = width - left - right
    height = top + len(panels) * (panel_height + gap) + 10
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" {FONT}>',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="10" y="22" font-size="15" font-weight="bold">{escape(title)}</text>',
    ]
    for p, (ylabel, series) in enumerate(panels):
        y_top = top + p * (panel_height + gap)
        ys = [y for pts in series.values() for _, y in pts if math.isfinite(y)]
        lo, hi = min(ys, default=0), max(ys, default=1)
        narrow = _narrow(lo, hi)
        if narrow:  # an axis from zero: a drift of 0.05% must not fill the panel like a fall
            lo, hi = min(lo, 0.0), max(hi, 0.0)
        yticks = nice_ticks(lo, hi)
        y0, y1 = yticks[0], yticks[-1]

        def px(x):
            return left + (x - x0) / (x1 - x0) * plot_w

        def py(y):
            return y_top + panel_height - (y - y0) / (y1 - y0) * panel_height

        out.append(f'<rect x="{left}" y="{y_top}" width="{plot_w}" height="{panel_height}" fill="none" stroke="#999"/>')
        for t in yticks:
            out.append(
                f'<line x1="{left}" x2="{left + plot_w}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#eee"/>'
                f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{_label(t)}</text>'
            )
        if p == len(panels) - 1:
            for t in xticks:
                out.append(
                    f'<text x="{px(t):.1f}" y="{y_top + panel_height + 15}" text-anchor="middle">{_label(t)}</text>'
                )
            out.append(
                f'<text x="{left + plot_w / 2}" y="{y_top + panel_height + 30}" '
                f'text-anchor="middle">{escape(xlabel)}</text>'
            )
        out.append(
            f'<text x="14" y="{y_top + panel_height / 2}" text-anchor="middle" '
            f'transform="rotate(-90 14 {y_top + panel_height / 2})">{escape(ylabel)}</text>'
        )
        for k, (name, pts) in enumerate(series.items()):
            colour = COLOURS[k % len(COLOURS)]
            pts = [(x, y) for x, y in pts if math.isfinite(y)]
            if narrow and len(pts) > 1:  # the change itself, in words, where the axis cannot show it
                first, last = pts[0][1], pts[-1][1]
                out.append(
                    f'<text x="{left + 8}" y="{y_top + 16 + 16 * k}" fill="{colour}">{escape(name)}: '
                    f"{_label(first)} → {_label(last)} ({relative_change(first, last)})</text>"
                )
            coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            if len(pts) > 1:
                out.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.8"/>')
            for x, y in pts if len(pts) <= 40 else []:
                out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{colour}"/>')
            ly = y_top + 14 + 16 * k
            out.append(
                f'<line x1="{left + plot_w + 10}" x2="{left + plot_w + 28}" y1="{ly - 4}" y2="{ly - 4}" '
                f'stroke="{colour}" stroke-width="2.5"/><text x="{left + plot_w + 33}" y="{ly}">'
                f"{escape(name)}</text>"
            )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def svg_grouped_bars(
    title: str, categories: list[str], series: dict[str, list[float]], width: int = 960, height: int = 260
) -> str:
    """Vertical bars, one group per category and one bar per series (Table 2: a group per metric,
    a bar per model), values written above the bars."""
    left, right, top, bottom = 50, 120, 36, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [v for vs in series.values() for v in vs]
    yticks = nice_ticks(0, max(values, default=1))
    y1 = yticks[-1]
    group_w = plot_w / max(1, len(categories))
    bar_w = group_w * 0.8 / max(1, len(series))
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" {FONT}>',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="10" y="22" font-size="15" font-weight="bold">{escape(title)}</text>',
    ]
    for t in yticks:
        y = top + plot_h - t / y1 * plot_h
        out.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_label(t)}</text>'
        )
    for c, name in enumerate(categories):
        gx = left + c * group_w + group_w * 0.1
        for k, (label, vs) in enumerate(series.items()):
            h = vs[c] / y1 * plot_h
            x, y = gx + k * bar_w, top + plot_h - h
            out.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w - 1:.1f}" height="{h:.1f}" '
                f'fill="{COLOURS[k % len(COLOURS)]}"><title>{escape(label)} {escape(name)}: {vs[c]:.2f}'
                f"</title></rect>"
            )
            out.append(
                f'<text x="{x + bar_w / 2:.1f}" y="{y - 3:.1f}" text-anchor="middle" font-size="9">{vs[c]:.1f}</text>'
            )
        out.append(
            f'<text x="{left + (c + 0.5) * group_w:.1f}" y="{top + plot_h + 16}" text-anchor="middle">'
            f"{escape(name)}</text>"
        )
    out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="#999"/>')
    for k, label in enumerate(series):
        ly = top + 14 + 16 * k
        out.append(
            f'<rect x="{left + plot_w + 12}" y="{ly - 10}" width="12" height="12" '
            f'fill="{COLOURS[k % len(COLOURS)]}"/><text x="{left + plot_w + 30}" y="{ly}">{escape(label)}</text>'
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def judged(bars: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """The comparisons that have a verdict to draw: a judge whose verdicts could not be parsed
    leaves nothing for a bar, and its comparison is said in words instead."""
    return [(label, c) for label, c in bars if c["win"] + c["tie"] + c["loss"]]


def svg_win_tie_loss(title: str, bars: list[tuple[str, dict]]) -> str:
    """Horizontal stacked bars of win / tie / loss shares, one per comparison (Figures 3-5), for
    comparisons with at least one verdict (see judged); the legend names only the outcomes that
    occur."""
    if not judged(bars):
        raise ValueError("no comparison has a parsed verdict: nothing to draw (say so in words)")
    bars = judged(bars)
    colours = {
        k: v for k, v in {"win": "#4e9a6a", "tie": "#c9c9c9", "loss": "#d1605e"}.items() if any(c[k] for _, c in bars)
    }
    left, width, row, top = 230, 460, 34, 50
    height = top + row * len(bars) + 40
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 110}" height="{height}" '
        f'font-family="sans-serif" font-size="13">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="10" y="24" font-size="15" font-weight="bold">{escape(title)}</text>',
    ]
    for i, (label, c) in enumerate(bars):
        y = top + i * row
        n = c["win"] + c["tie"] + c["loss"]
        parts.append(f'<text x="{left - 8}" y="{y + 17}" text-anchor="end">{escape(label)}</text>')
        x = left
        for k in colours:
            w = width * c[k] / n
            if w > 0:
                parts.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="24" fill="{colours[k]}"/>')
                if w > 24:
                    parts.append(
                        f'<text x="{x + w / 2:.1f}" y="{y + 17}" text-anchor="middle" fill="white">{c[k]}</text>'
                    )
            x += w
        if c.get("unparsed"):
            parts.append(f'<text x="{left + width + 6}" y="{y + 17}" font-size="11">+{c["unparsed"]} unparsed</text>')
    for k, (name, colour) in enumerate(colours.items()):
        parts.append(
            f'<rect x="{left + k * 90}" y="{height - 26}" width="14" height="14" fill="{colour}"/>'
            f'<text x="{left + k * 90 + 20}" y="{height - 14}">{name}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
