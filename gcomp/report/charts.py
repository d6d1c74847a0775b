"""SVG charts of the report pages, drawn as inline markup (no script, no fetched asset).

Every chart is a function from report data to an ``<svg>`` string (plus its legend);
labels and tooltips are HTML-escaped. Op families keep one colour per page (:func:`colors`)
so a reader can follow an op type from chart to chart.
"""

from __future__ import annotations

__all__ = [
    "COMPUTE", "MEMORY", "UNKNOWN", "colors", "grouped_hbars", "hbars", "histogram", "legend", "nice_ticks",
    "roofline", "timeline", "waterfall",
]

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gcomp.report.markup import esc, fmt_num
from gcomp.report.roof import above_roof, kernel_roof_text

# Colour per op family (stable across reports so a reader learns them).
_PALETTE = [
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
    "#86bcb6",
    "#d37295",
]
COMPUTE, MEMORY, UNKNOWN = "#e15759", "#4e79a7", "#9aa3ad"
_NOTHING = '<p class="note">nothing to show</p>'


def colors(op_types: Sequence[str]) -> dict[str, str]:
    """A palette colour per op type, in the given order."""
    return {op: _PALETTE[i % len(_PALETTE)] for i, op in enumerate(op_types)}


def _elide(text: str, limit: int) -> str:
    """Keep both ends of a long name (node names differ at the start and the end)."""
    if len(text) <= limit:
        return text
    head = (limit - 1) * 2 // 3
    return text[:head] + "…" + text[len(text) - (limit - 1 - head) :]


def _svg(width: float, height: float) -> str:
    return f'<svg viewBox="0 0 {width} {height}" width="{width}" role="img">'


def legend(entries: list[tuple[str, str]], extra: str = "") -> str:
    """The legend under a chart: (colour, escaped label) entries."""
    return (
        '<div class="legend">'
        + "".join(f'<span style="--c:{c}">{label}</span>' for c, label in entries)
        + f"{extra}</div>"
    )


# --------------------------------------------------------------------------- bars
def hbars(
    items: list[tuple[str, float, str, str]],
    *,
    unit: str,
    width: int = 560,
    label_w: int = 210,
    bar_h: int = 18,
) -> str:
    """Horizontal bars: (label, value, colour, tooltip)."""
    if not items:
        return _NOTHING
    top = max(v for _, v, _, _ in items) or 1.0
    gap, right = 6, 70
    height = len(items) * (bar_h + gap) + 4
    plot = width - label_w - right
    out = [_svg(width, height)]
    for i, (label, value, color, tip) in enumerate(items):
        y = i * (bar_h + gap) + 2
        w = max(1.0, plot * value / top)
        short = _elide(label, max(12, int((label_w - 12) / 6.3)))
        out.append(
            f"<g><title>{esc(tip)}</title>"
            f'<text x="{label_w - 8}" y="{y + bar_h * 0.72:.1f}" text-anchor="end" font-size="11.5">{esc(short)}</text>'
            f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h}" rx="3" fill="{color}"/>'
            f'<text x="{label_w + w + 6:.1f}" y="{y + bar_h * 0.72:.1f}" font-size="11.5">{esc(fmt_num(value))} {esc(unit)}</text></g>'
        )
    out.append("</svg>")
    return "".join(out)


def grouped_hbars(
    categories: list[str], series: list[tuple[str, list[float]]], *, unit: str, width: int = 1140
) -> str:
    """Per category one bar per series (compare pages)."""
    if not categories:
        return _NOTHING
    label_w, right, bar_h, gap = 190, 90, 12, 10
    n = len(series)
    top = max((max(v) for _, v in series if v), default=1.0) or 1.0
    height = len(categories) * (n * bar_h + gap) + 6
    plot = width - label_w - right
    out = [_svg(width, height)]
    for i, cat in enumerate(categories):
        y0 = i * (n * bar_h + gap) + 3
        out.append(
            f'<text x="{label_w - 8}" y="{y0 + n * bar_h / 2 + 4:.1f}" text-anchor="end" font-size="11.5">'
            f"{esc(cat)}</text>"
        )
        for j, (name, values) in enumerate(series):
            v = values[i]
            w = max(plot * v / top, 0.8 if v else 0)
            y = y0 + j * bar_h
            out.append(
                f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h - 2}" rx="2" '
                f'fill="{_PALETTE[j % len(_PALETTE)]}"><title>{esc(name)} · {esc(cat)}: {v:.4g} {unit}</title></rect>'
                f'<text x="{label_w + w + 5:.1f}" y="{y + bar_h - 3}" font-size="10.5">{fmt_num(v)}</text>'
            )
    out.append("</svg>")
    return "".join(out) + legend(
        [(_PALETTE[j % len(_PALETTE)], esc(name)) for j, (name, _) in enumerate(series)]
    )


# --------------------------------------------------------------------------- axes
def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) in [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw), default=raw)
    start = math.floor(lo / step) * step
    ticks = []
    t = start
    while t <= hi + step * 0.5:
        if t >= lo - 1e-12:
            ticks.append(round(t, 10))
        t += step
    return ticks


def _y_grid(ticks: list[float], top: float, ml: float, mt: float, pw: float, ph: float) -> list[str]:
    """Horizontal grid lines with their labels on the left, for a linear axis from 0 to ``top``."""
    out = []
    for t in ticks:
        y = mt + ph - ph * t / top
        out.append(
            f'<line class="gridline" x1="{ml}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text x="{ml - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{t:g}</text>'
        )
    return out


# --------------------------------------------------------------------------- latency
def histogram(
    samples: Sequence[float], lat: dict[str, Any], width: int = 560, height: int = 230
) -> str:
    """Whole-model run times in bins, with the p50, mean and p99 marked."""
    if len(samples) < 2:
        return '<p class="note">one timed run: no distribution to draw</p>'
    lo, hi = min(samples), max(samples)
    if hi - lo < 1e-9:
        hi = lo + 1e-3
    bins = max(8, min(40, int(math.sqrt(len(samples)) * 2)))
    counts = [0] * bins
    for s in samples:
        counts[min(bins - 1, int((s - lo) / (hi - lo) * bins))] += 1
    ml, mr, mt, mb = 44, 14, 12, 38
    pw, ph = width - ml - mr, height - mt - mb
    cmax = max(counts)
    out = [_svg(width, height)]
    out += _y_grid(nice_ticks(0, cmax, 4), cmax, ml, mt, pw, ph)
    bw = pw / bins
    for i, c in enumerate(counts):
        if not c:
            continue
        h = ph * c / cmax
        a, b = lo + (hi - lo) * i / bins, lo + (hi - lo) * (i + 1) / bins
        out.append(
            f'<rect x="{ml + i * bw + 1:.1f}" y="{mt + ph - h:.1f}" width="{max(bw - 2, 1):.1f}" '
            f'height="{h:.1f}" rx="2" fill="#4e79a7"><title>{a:.3f}–{b:.3f} ms: {c} runs</title></rect>'
        )
    for t in nice_ticks(lo, hi, 6):
        x = ml + pw * (t - lo) / (hi - lo)
        out.append(
            f'<text x="{x:.1f}" y="{mt + ph + 16}" text-anchor="middle" font-size="11">{t:g}</text>'
        )
    for key, color, dash in (
        ("p50_ms", "#59a14f", ""),
        ("p99_ms", "#e15759", "4 3"),
        ("mean_ms", "#f28e2b", "2 2"),
    ):
        v = lat.get(key)
        if v is None or not lo <= v <= hi:
            continue
        x = ml + pw * (v - lo) / (hi - lo)
        out.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{mt}" y2="{mt + ph}" stroke="{color}" '
            f'stroke-width="2" stroke-dasharray="{dash}"><title>{key[:-3]} {v:.3f} ms</title></line>'
        )
    out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{mt + ph}" y2="{mt + ph}" stroke="#c5ccd6"/>')
    out.append(
        f'<text x="{ml + pw / 2}" y="{height - 4}" text-anchor="middle" font-size="11.5">latency per run (ms)</text>'
    )
    out.append("</svg>")
    return "".join(out) + legend([("#59a14f", "p50"), ("#f28e2b", "mean"), ("#e15759", "p99")])


def timeline(runs_and_kernels: list[dict[str, Any]], palette: dict[str, str], width: int = 1140) -> str:
    """One profiled run: the run on the first lane, its kernels on the second."""
    kernels = [t for t in runs_and_kernels if t.get("op_type")]
    runs = [t for t in runs_and_kernels if not t.get("op_type")]
    if not kernels:
        return '<p class="note">no timeline recorded</p>'
    end = max([t["start_ms"] + t["dur_ms"] for t in runs_and_kernels])
    ml, mr, lane = 10, 10, 26
    pw = width - ml - mr
    height = lane * 2 + 34
    out = [_svg(width, height)]
    for r in runs:
        out.append(
            f'<rect x="{ml}" y="4" width="{pw * r["dur_ms"] / end:.1f}" height="{lane - 6}" rx="3" '
            f'fill="#dfe6ef"><title>{esc(r["node"])}: {r["dur_ms"]:.3f} ms</title></rect>'
            f'<text x="{ml + 6}" y="{lane - 8}" font-size="11">{esc(r["node"])} · {r["dur_ms"]:.2f} ms</text>'
        )
    for k in kernels:
        x = ml + pw * k["start_ms"] / end
        w = max(pw * k["dur_ms"] / end, 0.8)
        out.append(
            f'<rect x="{x:.2f}" y="{lane + 2}" width="{w:.2f}" height="{lane - 4}" '
            f'fill="{palette.get(k["op_type"], UNKNOWN)}"><title>{esc(k["node"])} ({esc(k["op_type"])}): '
            f"{k['dur_ms']:.3f} ms at {k['start_ms']:.3f} ms</title></rect>"
        )
    for t in (t for t in nice_ticks(0, end, 8) if t <= end):
        x = ml + pw * t / end
        anchor = "start" if t == 0 else "end" if x > width - 40 else "middle"
        out.append(
            f'<text x="{x:.1f}" y="{lane * 2 + 20}" text-anchor="{anchor}" font-size="11">{t:g} ms</text>'
        )
    out.append("</svg>")
    return "".join(out)


# --------------------------------------------------------------------------- roofline
@dataclass(frozen=True)
class _LogPlot:
    """A log-log plot area: data bounds and the plot rectangle in pixels."""

    x_lo: float
    x_hi: float
    y_lo: float
    y_hi: float
    ml: float
    mt: float
    pw: float
    ph: float

    def px(self, x: float) -> float:
        return self.ml + self.pw * (math.log10(x) - math.log10(self.x_lo)) / (
            math.log10(self.x_hi) - math.log10(self.x_lo)
        )

    def py(self, y: float) -> float:
        return (
            self.mt
            + self.ph
            - self.ph
            * (math.log10(y) - math.log10(self.y_lo))
            / (math.log10(self.y_hi) - math.log10(self.y_lo))
        )


def roofline(
    ops: list[dict[str, Any]],
    roof: dict[str, Any] | None,
    palette: dict[str, str],
    width: int = 1140,
    height: int = 420,
) -> str:
    """Kernels by arithmetic intensity and achieved GFLOP/s under the machine's measured roofs."""
    points = [
        o
        for o in ops
        if o.get("intensity")
        and o.get("gflops_per_s")
        and o["intensity"] > 0
        and o["gflops_per_s"] > 0
    ]
    if not points or not roof or not roof.get("peak_gflops") or not roof.get("bandwidth_gbs"):
        return (
            '<p class="note">no op with known FLOPs and time, or no machine peaks: no roofline</p>'
        )
    peak, bw = roof["peak_gflops"], roof["bandwidth_gbs"]
    theo = roof.get("theoretical_gflops")
    plot = _roofline_plot(points, peak, bw, theo, width, height)
    out = [_svg(width, height)]
    out += _log_grid(plot)
    out += _roofs(plot, peak, bw, theo)
    out += _roofline_dots(plot, points, palette)
    ml, mt, pw, ph = plot.ml, plot.mt, plot.pw, plot.ph
    out.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#c5ccd6"/>')
    out.append(
        f'<text x="{ml + pw / 2}" y="{height - 6}" text-anchor="middle" font-size="12">'
        "arithmetic intensity (FLOP per byte moved, log)</text>"
    )
    out.append(
        f'<text transform="rotate(-90)" x="{-(mt + ph / 2)}" y="16" text-anchor="middle" font-size="12">'
        "achieved GFLOP/s (log)</text></svg>"
    )
    seen = []
    for o in sorted(points, key=lambda o: -o["time_ms"]):
        if o["op_type"] not in seen:
            seen.append(o["op_type"])
    return "".join(out) + legend([(palette.get(op, UNKNOWN), esc(op)) for op in seen])


def _roofline_plot(
    points: list[dict[str, Any]], peak: float, bw: float, theo: float | None, width: int, height: int
) -> _LogPlot:
    """Decades that hold every kernel, the ridge point and the roofs, with some room."""
    xs = [o["intensity"] for o in points]
    ys = [o["gflops_per_s"] for o in points]
    ridge = peak / bw
    x_lo = 10 ** math.floor(math.log10(min(min(xs), ridge) / 1.5))
    x_hi = 10 ** math.ceil(math.log10(max(max(xs), ridge) * 1.5))
    top = max(peak, theo or 0, max(ys))
    y_lo = 10 ** math.floor(math.log10(max(min(min(ys), x_lo * bw), 1e-6)))
    y_hi = 10 ** math.ceil(math.log10(top * 1.3))
    ml, mr, mt, mb = 62, 150, 14, 44
    return _LogPlot(x_lo, x_hi, y_lo, y_hi, ml, mt, width - ml - mr, height - mt - mb)


def _log_grid(plot: _LogPlot) -> list[str]:
    """A grid line and label per decade on both axes."""
    ml, mt, pw, ph = plot.ml, plot.mt, plot.pw, plot.ph
    out = []
    for e in range(int(math.log10(plot.x_lo)), int(math.log10(plot.x_hi)) + 1):
        x = plot.px(10**e)
        out.append(
            f'<line class="gridline" x1="{x:.1f}" x2="{x:.1f}" y1="{mt}" y2="{mt + ph}"/>'
            f'<text x="{x:.1f}" y="{mt + ph + 16}" text-anchor="middle" font-size="11">{10.0**e:g}</text>'
        )
    for e in range(int(math.log10(plot.y_lo)), int(math.log10(plot.y_hi)) + 1):
        y = plot.py(10**e)
        out.append(
            f'<line class="gridline" x1="{ml}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text x="{ml - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{10.0**e:g}</text>'
        )
    return out


def _roofs(plot: _LogPlot, peak: float, bw: float, theo: float | None) -> list[str]:
    """Roofs: memory slope up to the ridge, then flat compute roofs (measured, theoretical)."""
    px, py, x_lo, x_hi = plot.px, plot.py, plot.x_lo, plot.x_hi
    ridge = peak / bw
    out = [
        f'<polyline fill="none" stroke="#1f3b63" stroke-width="2.2" points="'
        f'{px(x_lo):.1f},{py(max(x_lo * bw, plot.y_lo)):.1f} {px(ridge):.1f},{py(peak):.1f} {px(x_hi):.1f},{py(peak):.1f}">'
        f"<title>measured roofline: {bw:.1f} GB/s, {peak:.1f} GFLOP/s</title></polyline>",
        f'<text x="{px(x_hi) + 6:.1f}" y="{py(peak) + 4:.1f}" font-size="11.5" font-weight="600">'
        f"{peak:.0f} GFLOP/s measured</text>",
    ]
    if theo and theo > peak * 1.15:
        out.append(
            f'<line x1="{px(theo / bw):.1f}" x2="{px(x_hi):.1f}" y1="{py(theo):.1f}" y2="{py(theo):.1f}" '
            f'stroke="#1f3b63" stroke-dasharray="5 4" stroke-width="1.3"/>'
            f'<text x="{px(x_hi) + 6:.1f}" y="{py(theo) + 4:.1f}" font-size="11.5">{theo:.0f} theoretical</text>'
        )
    elif theo:
        out.append(
            f'<text x="{px(x_hi) + 6:.1f}" y="{py(peak) + 18:.1f}" font-size="11" fill="#5f6b7a">'
            f"({theo:.0f} theoretical)</text>"
        )
    angle = -math.degrees(math.atan2(py(x_lo * 10 * bw) - py(x_lo * bw), px(x_lo * 10) - px(x_lo)))
    lx = px(x_lo) + 24
    ly = py(max(x_lo * bw, plot.y_lo)) - 8 - 24 * math.tan(math.radians(angle))
    out.append(
        f'<text x="{lx:.1f}" y="{ly:.1f}" font-size="11.5" transform="rotate({-angle:.1f} {lx:.1f} {ly:.1f})">'
        f"{bw:.1f} GB/s</text>"
    )
    out.append(
        f'<line x1="{px(ridge):.1f}" x2="{px(ridge):.1f}" y1="{py(peak):.1f}" y2="{plot.mt + plot.ph}" stroke="#9aa3ad" '
        f'stroke-dasharray="2 3"/><text x="{px(ridge) + 4:.1f}" y="{plot.mt + plot.ph - 6}" font-size="10.5" '
        f'fill="#5f6b7a">ridge {ridge:.1f} FLOP/B</text>'
    )
    return out


def _roofline_dots(plot: _LogPlot, points: list[dict[str, Any]], palette: dict[str, str]) -> list[str]:
    """A dot per kernel, area proportional to its time; the slowest drawn first. A kernel
    measured above its roof is a hollow red ring whose tooltip says calibration error."""
    tmax = max(o["time_ms"] for o in points) or 1.0
    out = []
    for o in sorted(points, key=lambda o: -o["time_ms"]):
        r = 3 + 11 * math.sqrt(o["time_ms"] / tmax)
        tip = (
            f"{o['node']} ({o['op_type']}): {o['time_ms']:.3f} ms, {o['intensity']:.2f} FLOP/B, "
            f"{o['gflops_per_s']:.1f} GFLOP/s, {o.get('bound') or '?'}-bound"
        )
        if above_roof(o):
            tip += f"; {kernel_roof_text(o)}"
            paint = 'fill="none" stroke="#c0392b" stroke-width="2"'
        else:
            paint = f'fill="{palette.get(o["op_type"], UNKNOWN)}" fill-opacity=".72" stroke="#fff" stroke-width="1"'
        out.append(
            f'<circle cx="{plot.px(o["intensity"]):.1f}" cy="{plot.py(o["gflops_per_s"]):.1f}" r="{r:.1f}" '
            f"{paint}><title>{esc(tip)}</title></circle>"
        )
    return out


# --------------------------------------------------------------------------- pipeline
@dataclass(frozen=True)
class _Columns:
    """A column chart's plot area: one column per step, a linear axis from 0 to ``top``."""

    ml: float
    mt: float
    pw: float
    ph: float
    top: float
    bw: float

    def y(self, value: float) -> float:
        return self.mt + self.ph - self.ph * value / self.top


def waterfall(
    passes: list[dict[str, Any]],
    input_latency: float | None = None,
    width: int = 1140,
    height: int = 260,
) -> str:
    """Node count before the pipeline and after every pass that changed the model, and
    the latency after each (a line on the right axis) when it was measured."""
    changed = [p for p in passes if p["modified"]]
    if not passes:
        return '<p class="note">no passes ran</p>'
    if not changed:
        return '<p class="note">no pass changed the model</p>'
    steps = [("input", passes[0]["nodes_before"], 0)] + [
        (f"{p['name']} ({p['round']})", p["nodes_after"], p["nodes_after"] - p["nodes_before"])
        for p in changed
    ]
    latencies = [input_latency] + [p.get("latency_ms") for p in changed]
    ml, mr, mt, mb = 52, 62, 24, 92
    pw, ph = width - ml - mr, height - mt - mb
    top = max(n for _, n, _ in steps) or 1
    cols = _Columns(ml, mt, pw, ph, top, pw / len(steps))
    out = [_svg(width, height)]
    out += _y_grid(nice_ticks(0, top, 4), top, ml, mt, pw, ph)
    out += _waterfall_columns(cols, steps)
    line, line_legend = _latency_line(cols, steps, latencies)
    out += line
    out.append("</svg>")
    return "".join(out) + legend(
        [("#4e79a7", "nodes in the input"), ("#59a14f", "removed by a pass"), ("#e15759", "added by a pass")],
        line_legend,
    )


def _waterfall_columns(cols: _Columns, steps: list[tuple[str, int, int]]) -> list[str]:
    """The input's node count, then per changing pass a column from the count before to after."""
    out = []
    prev = None
    for i, (label, nodes, delta) in enumerate(steps):
        x = cols.ml + i * cols.bw + cols.bw * 0.15
        w = cols.bw * 0.7
        if prev is None:
            y0, y1, color = cols.y(nodes), cols.mt + cols.ph, "#4e79a7"
        else:
            a, b = cols.y(prev), cols.y(nodes)
            y0, y1 = min(a, b), max(a, b)
            color = "#59a14f" if delta < 0 else "#e15759" if delta > 0 else "#9aa3ad"
            if y1 - y0 < 2:
                y1 = y0 + 2
            out.append(
                f'<rect x="{x:.1f}" y="{cols.y(nodes):.1f}" width="{w:.1f}" '
                f'height="{cols.ph * nodes / cols.top:.1f}" fill="#e9eef5"/>'
            )
        out.append(
            f'<rect x="{x:.1f}" y="{y0:.1f}" width="{w:.1f}" height="{y1 - y0:.1f}" rx="2" fill="{color}">'
            f"<title>{esc(label)}: {nodes} nodes ({delta:+d})</title></rect>"
        )
        value = f"{delta:+d}" if prev is not None else f"{nodes}"
        out.append(
            f'<text x="{x + w / 2:.1f}" y="{y0 - 4:.1f}" text-anchor="middle" font-size="10.5">{value}</text>'
        )
        short = label if len(label) <= 24 else label[:23] + "…"
        lx, ly = x + w / 2, cols.mt + cols.ph + 10
        out.append(
            f'<text x="{lx:.1f}" y="{ly:.1f}" font-size="10.5" text-anchor="end" '
            f'transform="rotate(-40 {lx:.1f} {ly:.1f})">{esc(short)}</text>'
        )
        prev = nodes
    return out


def _latency_line(
    cols: _Columns, steps: list[tuple[str, int, int]], latencies: list[float | None]
) -> tuple[list[str], str]:
    """The median latency after each step where measured (right axis), and its legend entry."""
    known = [(i, v) for i, v in enumerate(latencies) if v is not None]
    if not known:
        return [], ""
    ml, mt, pw, ph, bw = cols.ml, cols.mt, cols.pw, cols.ph, cols.bw
    lmax = max(v for _, v in known) * 1.15 or 1.0
    pts = " ".join(f"{ml + i * bw + bw / 2:.1f},{mt + ph - ph * v / lmax:.1f}" for i, v in known)
    out = [f'<polyline fill="none" stroke="#f28e2b" stroke-width="2.2" points="{pts}"/>']
    for i, v in known:
        cx, cy = ml + i * bw + bw / 2, mt + ph - ph * v / lmax
        out.append(
            f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="4" fill="#f28e2b" stroke="#fff">'
            f"<title>{esc(steps[i][0])}: {v:.3f} ms</title></circle>"
        )
    for t in nice_ticks(0, lmax, 4):
        y = mt + ph - ph * t / lmax
        out.append(
            f'<text x="{ml + pw + 6}" y="{y + 4:.1f}" font-size="11" fill="#b8661a">{t:g} ms</text>'
        )
    return out, '<span style="--c:#f28e2b">median latency on ONNX Runtime (right axis)</span>'
