"""Hand-drawn SVG charts for the HTML report: heatmaps, grouped bars and a Pareto scatter.

No JavaScript and no external resources: every chart is a self-contained ``<svg>`` string. Every piece of text
that goes into a chart passes through :func:`esc`, so model and user strings always show as text.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence

Matrix = Sequence[Sequence[float | None]]
MAX_CELLS = 2**17  # cells per heatmap; real models need far fewer (DeepSeek-V3: 58 x 256 = 14,848)

# Viridis-like ramp (dark purple -> teal -> yellow), readable in print and for most colour-blind readers.
_RAMP = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
MISSING_COLOR = "#e6e6e6"
MARK_COLOR = "#e8112d"
SERIES_COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]
FONT = 'font-family="system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif"'


def esc(value: object) -> str:
    """HTML/SVG-escape any value (quotes included)."""
    return html.escape(str(value), quote=True)


def fmt_num(x: float | int | None, digits: int = 4) -> str:
    """Short human format: ints with thousands separators, floats with ``digits`` significant digits."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if not math.isfinite(x):
        return str(x)
    if x != 0 and (abs(x) >= 1e6 or abs(x) < 1e-3):
        return f"{x:.{max(digits - 1, 1)}e}"
    return f"{x:.{digits}g}"


def ramp_color(t: float) -> str:
    """Colour for ``t`` in [0, 1] on the sequential ramp."""
    t = min(max(t, 0.0), 1.0) * (len(_RAMP) - 1)
    i = min(int(t), len(_RAMP) - 2)
    f = t - i
    c = [round(a + (b - a) * f) for a, b in zip(_RAMP[i], _RAMP[i + 1], strict=True)]
    return f"#{c[0]:02x}{c[1]:02x}{c[2]:02x}"


def _finite(values: Matrix) -> list[float]:
    return [float(v) for row in values for v in row if v is not None and math.isfinite(v)]


def heatmap(
    values: Matrix,
    *,
    row_names: Sequence[object],
    col_names: Sequence[object] | None = None,
    row_title: str = "layer",
    col_title: str = "expert",
    value_name: str = "value",
    fmt: Callable[[float], str] = fmt_num,
    log: bool = False,
    palette: Mapping[object, str] | None = None,
    marks: set[tuple[int, int]] | frozenset[tuple[int, int]] = frozenset(),
    mark_label: str = "",
    dots: set[tuple[int, int]] | frozenset[tuple[int, int]] = frozenset(),
    dot_label: str = "",
    vmin: float | None = None,
    vmax: float | None = None,
    chart_id: str = "",
) -> str:
    """A rows x columns heatmap (rows = layers, columns = experts).

    ``palette`` maps category values to colours (categorical map, e.g. bit widths); otherwise a sequential ramp
    from the finite min to max, or ``vmin``/``vmax`` (``log`` for log10 spacing). ``marks`` cells get a red
    outline, ``dots`` a small white dot. Each cell carries ``data-row``/``data-col``/``data-value`` and a native
    ``<title>`` tooltip.
    """
    n_rows = len(values)
    n_cols = max((len(r) for r in values), default=0)
    if n_rows * n_cols > MAX_CELLS:
        return f'<p class="note">{n_rows} x {n_cols} cells: more than a chart can show ({MAX_CELLS:,} cells).</p>'
    col_names = list(col_names) if col_names is not None else list(range(n_cols))
    cw = max(5.0, min(34.0, (384.0 if n_cols <= 16 else 900.0) / max(n_cols, 1)))
    ch = max(7.0, min(26.0, 520.0 / max(n_rows, 1)))
    left, top, right = 56.0, 34.0, 110.0
    width = left + cw * n_cols + right
    leg_h = max(ch * n_rows, 96.0)
    height = top + max(ch * n_rows, leg_h + 14) + (34.0 if (marks and mark_label) or (dots and dot_label) else 12.0)
    finite = _finite(values) if palette is None else []
    if log:
        finite = [v for v in finite if v > 0]
    lo = vmin if vmin is not None else (min(finite) if finite else 0.0)
    hi = vmax if vmax is not None else (max(finite) if finite else 1.0)

    def scale(v: float) -> float:
        if log:
            a, b, x = math.log10(lo), math.log10(hi), math.log10(v) if v > 0 else math.log10(lo)
        else:
            a, b, x = lo, hi, v
        return 0.5 if b <= a else (x - a) / (b - a)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart heatmap" data-chart="{esc(chart_id)}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" height="{height:.0f}" {FONT} font-size="11">'
    ]
    out.append(
        f'<text x="{left + cw * n_cols / 2:.1f}" y="12" text-anchor="middle" fill="#444">{esc(col_title)}</text>'
    )
    widest = max((len(str(c)) for c in col_names[:n_cols]), default=1)
    label_every = max(1, math.ceil((6.5 * widest + 4.0) / cw))
    for j, name in enumerate(col_names[:n_cols]):
        if j % label_every == 0:
            out.append(
                f'<text x="{left + cw * (j + 0.5):.1f}" y="{top - 6:.1f}" text-anchor="middle" '
                f'font-size="10" fill="#555">{esc(name)}</text>'
            )
    out.append(
        f'<text x="12" y="{top + ch * n_rows / 2:.1f}" text-anchor="middle" fill="#444" '
        f'transform="rotate(-90 12 {top + ch * n_rows / 2:.1f})">{esc(row_title)}</text>'
    )
    row_every = max(1, math.ceil(11.0 / ch))
    for i, name in enumerate(row_names[:n_rows]):
        y = top + ch * (i + 0.5)
        if i % row_every == 0:
            out.append(
                f'<text x="{left - 6:.1f}" y="{y + 3.5:.1f}" text-anchor="end" font-size="10" '
                f'fill="#555">{esc(name)}</text>'
            )
    out.append(f'<g stroke="#fff" stroke-width="{0.5 if min(cw, ch) >= 9 else 0.25}">')
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            x, y = left + cw * j, top + ch * i
            if v is None:
                color, shown = MISSING_COLOR, "n/a"
            elif palette is not None:
                color, shown = palette.get(v, MISSING_COLOR), fmt(v)
            elif not math.isfinite(v):
                color, shown = MISSING_COLOR, str(v)
            else:
                color, shown = ramp_color(scale(v)), fmt(v)
            tip = f"{row_title} {row_names[i]} · {col_title} {col_names[j]}: {value_name} {shown}"
            if (i, j) in marks and mark_label:
                tip += f" ({mark_label})"
            if (i, j) in dots and dot_label:
                tip += f" ({dot_label})"
            data = "" if v is None else f' data-value="{esc(repr(v) if isinstance(v, (int, float)) else v)}"'
            out.append(
                f'<rect class="cell" x="{x:.2f}" y="{y:.2f}" width="{cw:.2f}" height="{ch:.2f}" fill="{color}" '
                f'data-row="{i}" data-col="{j}"{data}><title>{esc(tip)}</title></rect>'
            )
    out.append("</g>")
    for i, j in sorted(dots):
        if i < n_rows and j < n_cols:
            out.append(
                f'<circle class="dot" cx="{left + cw * (j + 0.5):.2f}" cy="{top + ch * (i + 0.5):.2f}" '
                f'r="{min(cw, ch) / 5:.2f}" fill="#fff" stroke="#333" stroke-width="0.6"/>'
            )
    for i, j in sorted(marks):
        if i < n_rows and j < n_cols:
            out.append(
                f'<rect class="mark" x="{left + cw * j + 1:.2f}" y="{top + ch * i + 1:.2f}" width="{cw - 2:.2f}" '
                f'height="{ch - 2:.2f}" fill="none" stroke="{MARK_COLOR}" stroke-width="2"/>'
            )
    out.append(_legend(left + cw * n_cols + 16, top, palette, lo, hi, log, fmt, value_name, leg_h))
    ly = top + ch * n_rows + 20
    lx = left
    if marks and mark_label:
        out.append(
            f'<rect x="{lx:.1f}" y="{ly - 9:.1f}" width="11" height="11" fill="none" stroke="{MARK_COLOR}" '
            f'stroke-width="2"/><text x="{lx + 16:.1f}" y="{ly:.1f}" fill="#333">{esc(mark_label)}</text>'
        )
        lx += 30 + 7 * len(mark_label)
    if dots and dot_label:
        out.append(
            f'<circle cx="{lx + 5:.1f}" cy="{ly - 4:.1f}" r="3.5" fill="#fff" stroke="#333"/>'
            f'<text x="{lx + 16:.1f}" y="{ly:.1f}" fill="#333">{esc(dot_label)}</text>'
        )
    out.append("</svg>")
    return "".join(out)


def _legend(x: float, y: float, palette, lo: float, hi: float, log: bool, fmt, value_name: str, size: float) -> str:
    out = [f'<text x="{x:.1f}" y="{y - 8:.1f}" fill="#333">{esc(value_name)}</text>']
    if palette is not None:
        for k, (value, color) in enumerate(palette.items()):
            yy = y + 16 * k
            out.append(
                f'<rect x="{x:.1f}" y="{yy:.1f}" width="12" height="12" fill="{color}" stroke="#999" '
                f'stroke-width="0.5"/><text x="{x + 18:.1f}" y="{yy + 10:.1f}" fill="#333">{esc(fmt(value))}</text>'
            )
        return "".join(out)
    steps = 24
    h = size / steps
    for k in range(steps):
        t = 1 - k / (steps - 1)
        out.append(f'<rect x="{x:.1f}" y="{y + h * k:.1f}" width="14" height="{h + 0.5:.1f}" fill="{ramp_color(t)}"/>')
    out.append(f'<text x="{x + 20:.1f}" y="{y + 9:.1f}" fill="#333">{esc(fmt(hi))}</text>')
    out.append(f'<text x="{x + 20:.1f}" y="{y + h * steps:.1f}" fill="#333">{esc(fmt(lo))}</text>')
    if log:
        out.append(f'<text x="{x + 20:.1f}" y="{y + h * steps / 2 + 4:.1f}" fill="#777">log scale</text>')
    return "".join(out)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    ticks = [math.floor(lo / step) * step]
    while ticks[-1] < hi - step * 1e-9 and len(ticks) < 4 * n + 4:  # bounded even when step is below float spacing
        ticks.append(ticks[-1] + step)
    ticks = [round(t, 12) for t in ticks]
    return ticks


def grouped_bars(
    categories: Sequence[object],
    series: Mapping[str, Sequence[float | None]],
    *,
    value_name: str,
    fmt: Callable[[float], str] = fmt_num,
    chart_id: str = "",
) -> str:
    """Vertical grouped bars: one group per category, one bar per series (``None`` bars are left out)."""
    names = list(series)
    finite = [v for vs in series.values() for v in vs if v is not None and math.isfinite(v)]
    hi = max(finite) if finite else 1.0
    ticks = nice_ticks(0.0, hi)
    top_v = ticks[-1] if ticks else hi
    bw = max(8.0, min(36.0, 640.0 / max(len(categories) * max(len(names), 1), 1)))
    gap = bw
    left, top, plot_h = 64.0, 20.0, 220.0
    plot_w = len(categories) * (bw * len(names) + gap) + gap
    width, height = left + plot_w + 20, top + plot_h + 60 + 16 * ((len(names) + 3) // 4)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart bars" data-chart="{esc(chart_id)}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" height="{height:.0f}" {FONT} font-size="11">'
    ]

    def yv(v: float) -> float:
        return top + plot_h - (v / top_v * plot_h if top_v > 0 else 0.0)

    for t in ticks:
        out.append(
            f'<line x1="{left:.1f}" x2="{left + plot_w:.1f}" y1="{yv(t):.1f}" y2="{yv(t):.1f}" stroke="#e3e3e3"/>'
            f'<text x="{left - 6:.1f}" y="{yv(t) + 4:.1f}" text-anchor="end" fill="#555">{esc(fmt(t))}</text>'
        )
    out.append(
        f'<text x="14" y="{top + plot_h / 2:.1f}" text-anchor="middle" fill="#444" '
        f'transform="rotate(-90 14 {top + plot_h / 2:.1f})">{esc(value_name)}</text>'
    )
    for c, cat in enumerate(categories):
        gx = left + gap + c * (bw * len(names) + gap)
        for s, name in enumerate(names):
            v = series[name][c] if c < len(series[name]) else None
            if v is None or not math.isfinite(v):
                continue
            x = gx + s * bw
            out.append(
                f'<rect class="bar" x="{x:.1f}" y="{yv(v):.1f}" width="{bw - 1:.1f}" '
                f'height="{top + plot_h - yv(v):.1f}" '
                f'fill="{SERIES_COLORS[s % len(SERIES_COLORS)]}" data-series="{esc(name)}" data-category="{esc(cat)}" '
                f'data-value="{esc(repr(v))}"><title>{esc(f"{name} · {cat}: {fmt(v)}")}</title></rect>'
            )
        out.append(
            f'<text x="{gx + bw * len(names) / 2:.1f}" y="{top + plot_h + 16:.1f}" text-anchor="middle" '
            f'fill="#333">{esc(cat)}</text>'
        )
    out.append(f'<line x1="{left:.1f}" x2="{left + plot_w:.1f}" y1="{yv(0):.1f}" y2="{yv(0):.1f}" stroke="#888"/>')
    out.append(_series_legend(names, left, top + plot_h + 34))
    out.append("</svg>")
    return "".join(out)


def _series_legend(names: Sequence[str], x0: float, y0: float) -> str:
    out = []
    for s, name in enumerate(names):
        x, y = x0 + (s % 4) * 190, y0 + 16 * (s // 4)
        label = name if len(name) <= 26 else name[:25] + "…"
        out.append(
            f'<rect x="{x:.1f}" y="{y - 9:.1f}" width="11" height="11" fill="{SERIES_COLORS[s % len(SERIES_COLORS)]}"/>'
            f'<text x="{x + 16:.1f}" y="{y:.1f}" fill="#333">{esc(label)}</text>'
        )
    return "".join(out)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points when both coordinates are minimised, sorted by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best_y = [], math.inf
    for i in order:
        if points[i][1] < best_y:
            front.append(i)
            best_y = points[i][1]
    return front


def pareto_scatter(
    points: Sequence[tuple[float, float, str]],
    *,
    x_name: str,
    y_name: str,
    fmt_x: Callable[[float], str] = fmt_num,
    fmt_y: Callable[[float], str] = fmt_num,
    reference: int | None = None,
    chart_id: str = "",
) -> str:
    """Scatter of (x, y, label) with the Pareto front (lower x and lower y are better) drawn as a step line.
    The point at index ``reference`` (e.g. the uncompressed model) is drawn grey."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xt = nice_ticks(min(xs + [0.0]), max(xs) * 1.06 if xs else 1.0)
    yt = nice_ticks(min(ys + [0.0]), max(ys) * 1.06 if ys else 1.0)
    x0, x1 = (xt[0], xt[-1]) if len(xt) > 1 and xt[-1] > xt[0] else (min(xs + [0.0]), max(xs + [1.0]))
    y0, y1 = (yt[0], yt[-1]) if len(yt) > 1 and yt[-1] > yt[0] else (min(ys + [0.0]), max(ys + [1.0]))
    left, top, pw, ph = 80.0, 20.0, 620.0, 320.0
    width, height = left + pw + 200, top + ph + 50

    def px(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * pw

    def py(v: float) -> float:
        return top + ph - (v - y0) / (y1 - y0) * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart pareto" data-chart="{esc(chart_id)}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" height="{height:.0f}" {FONT} font-size="11">'
    ]
    for t in xt:
        out.append(
            f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{top:.1f}" y2="{top + ph:.1f}" stroke="#eee"/>'
            f'<text x="{px(t):.1f}" y="{top + ph + 16:.1f}" text-anchor="middle" fill="#555">{esc(fmt_x(t))}</text>'
        )
    for t in yt:
        out.append(
            f'<line x1="{left:.1f}" x2="{left + pw:.1f}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#eee"/>'
            f'<text x="{left - 6:.1f}" y="{py(t) + 4:.1f}" text-anchor="end" fill="#555">{esc(fmt_y(t))}</text>'
        )
    out.append(
        f'<rect x="{left:.1f}" y="{top:.1f}" width="{pw:.1f}" height="{ph:.1f}" fill="none" stroke="#888"/>'
        f'<text x="{left + pw / 2:.1f}" y="{top + ph + 38:.1f}" text-anchor="middle" fill="#333">{esc(x_name)}</text>'
        f'<text x="16" y="{top + ph / 2:.1f}" text-anchor="middle" fill="#333" '
        f'transform="rotate(-90 16 {top + ph / 2:.1f})">{esc(y_name)}</text>'
    )
    front = pareto_front([(p[0], p[1]) for p in points])
    if len(front) > 1:
        pts = [(px(points[i][0]), py(points[i][1])) for i in front]
        d = f"M{pts[0][0]:.1f},{pts[0][1]:.1f}" + "".join(f" H{x:.1f} V{y:.1f}" for x, y in pts[1:])
        out.append(f'<path class="front" d="{d}" fill="none" stroke="#c44e52" stroke-dasharray="4 3"/>')
    on_front = set(front)
    for i, (x, y, label) in enumerate(points):
        color = "#999999" if i == reference else SERIES_COLORS[i % len(SERIES_COLORS)]
        tip = f"{label}: {x_name} {fmt_x(x)}, {y_name} {fmt_y(y)}" + (" (Pareto front)" if i in on_front else "")
        out.append(
            f'<circle class="point" cx="{px(x):.1f}" cy="{py(y):.1f}" r="{6 if i in on_front else 4.5}" '
            f'fill="{color}" stroke="#222" stroke-width="{1.5 if i in on_front else 0.5}" data-label="{esc(label)}" '
            f'data-x="{esc(repr(x))}" data-y="{esc(repr(y))}"><title>{esc(tip)}</title></circle>'
        )
        short = label if len(label) <= 24 else label[:23] + "…"
        out.append(f'<text x="{px(x) + 8:.1f}" y="{py(y) - 6:.1f}" fill="#222">{esc(short)}</text>')
    out.append("</svg>")
    return "".join(out)
