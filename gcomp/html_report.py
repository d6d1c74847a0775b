"""One self-contained HTML page for any gcomp report document (profile, optimize, compare).

Guarantees: the page needs nothing but itself. Charts are inline SVG drawn here; the
only script is a few lines inline (sorting and filtering the op table); no fonts,
images, stylesheets or scripts are fetched, so it opens offline, in a CI artifact or an
e-mail attachment, and the Content-Security-Policy meta tag forbids any request.
Every string from the model or environment is HTML-escaped.

Sections by document kind:

- ``profile``: summary cards, latency distribution, time by op type, top-N ops, the
  roofline scatter (ops by arithmetic intensity and achieved GFLOP/s under the machine's
  measured roofs), one run's timeline, the sortable op table, environment;
- ``optimize``: the pipeline (node-count waterfall over the passes, per-pass table with
  verification error), verification, and when profiled, before/after latency and op
  types with both profiles in full;
- ``compare``: latency side by side, time by op type per profile, per-node deltas.
"""

from __future__ import annotations

__all__ = ["render_html"]

import html
import json
import math
from collections.abc import Sequence
from typing import Any

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
_COMPUTE, _MEMORY, _UNKNOWN = "#e15759", "#4e79a7", "#9aa3ad"


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if value == 0:
        return "0"
    if float(value).is_integer() and abs(value) < 1e6:
        return f"{int(value)}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return (
        f"{value:.{digits}g}"
        if abs(value) < 1
        else f"{value:.{digits}g}"
        if abs(value) < 10
        else f"{value:.1f}"
    )


def _si(value: float | None, unit: str = "") -> str:
    if value is None:
        return "–"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}".strip()


def _bytes(n: float | None) -> str:
    if n is None:
        return "–"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _elide(text: str, limit: int) -> str:
    """Keep both ends of a long name (node names differ at the start and the end)."""
    if len(text) <= limit:
        return text
    head = (limit - 1) * 2 // 3
    return text[:head] + "…" + text[len(text) - (limit - 1 - head) :]


def _colors(op_types: Sequence[str]) -> dict[str, str]:
    return {op: _PALETTE[i % len(_PALETTE)] for i, op in enumerate(op_types)}


# --------------------------------------------------------------------------- page
_CSS = """
:root{--fg:#1d2430;--muted:#5f6b7a;--line:#e3e7ee;--bg:#f5f7fa;--card:#fff;--accent:#3b6fb6}
*{box-sizing:border-box}
body{margin:0;font:14px/1.5 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
color:var(--fg);background:var(--bg)}
header{background:linear-gradient(120deg,#1f3b63,#3b6fb6);color:#fff;padding:22px 32px 18px}
header h1{margin:0 0 4px;font-size:22px;font-weight:600;letter-spacing:.2px}
header .sub{opacity:.88;font-size:13px}
header code{background:rgba(255,255,255,.16);padding:1px 6px;border-radius:4px;color:#fff}
main{max-width:1240px;margin:0 auto;padding:20px 24px 48px}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:18px 20px;margin:18px 0;
box-shadow:0 1px 2px rgba(16,24,40,.04)}
h2{font-size:16px;margin:0 0 4px;font-weight:600}
h3{font-size:14px;margin:14px 0 6px;font-weight:600}
p.note{color:var(--muted);margin:2px 0 12px;font-size:12.5px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(240px,1fr));gap:12px;margin:4px 0 0}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:12px 14px}
.card .k{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.5px}
.card .v{font-size:22px;font-weight:600;margin-top:2px;white-space:nowrap}
.card .s{color:var(--muted);font-size:12px}
.grid2{display:grid;grid-template-columns:1fr 1fr;gap:18px}
@media (max-width:900px){.grid2{grid-template-columns:1fr}}
svg{display:block;max-width:100%;height:auto}
svg text{font-family:inherit;fill:#334}
.axis line,.axis path{stroke:#c5ccd6}
.gridline{stroke:#eef1f5}
table{border-collapse:collapse;width:100%;font-size:12.5px}
th,td{padding:5px 8px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{background:#f0f3f7;position:sticky;top:0;cursor:pointer;user-select:none;white-space:nowrap;font-weight:600}
th.num,td.num{text-align:right;font-variant-numeric:tabular-nums}
th[aria-sort=ascending]::after{content:" ▲";font-size:10px}
th[aria-sort=descending]::after{content:" ▼";font-size:10px}
tr:hover td{background:#f7f9fc}
td.node{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:11.5px;word-break:break-all;min-width:260px;max-width:360px}
td.shapes{font-size:11px;color:var(--muted);min-width:180px}
.tablewrap{max-height:560px;overflow:auto;border:1px solid var(--line);border-radius:8px}
.pill{display:inline-block;padding:0 7px;border-radius:9px;font-size:11px;font-weight:600;color:#fff}
.pill.compute{background:#e15759}.pill.memory{background:#4e79a7}.pill.ok{background:#59a14f}
.pill.bad{background:#e15759}.pill.warn{background:#e8a33d}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:12px;color:var(--muted);margin:6px 0 0}
.legend span::before{content:"";display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:5px;
background:var(--c);vertical-align:-1px}
input.filter{padding:5px 9px;border:1px solid var(--line);border-radius:6px;font:inherit;width:280px;margin:0 0 8px}
dl.env{display:grid;grid-template-columns:170px 1fr;gap:3px 12px;margin:0;font-size:12.5px}
dl.env dt{color:var(--muted)}dl.env dd{margin:0}
.delta-good{color:#2e7d32;font-weight:600}.delta-bad{color:#c62828;font-weight:600}
footer{color:var(--muted);font-size:12px;text-align:center;margin:20px 0}
"""

_JS = """
document.querySelectorAll('table.sortable').forEach(function(t){
  t.querySelectorAll('th').forEach(function(th,i){
    th.addEventListener('click',function(){
      var asc=th.getAttribute('aria-sort')!=='ascending';
      t.querySelectorAll('th').forEach(function(h){h.removeAttribute('aria-sort')});
      th.setAttribute('aria-sort',asc?'ascending':'descending');
      var body=t.tBodies[0],rows=Array.prototype.slice.call(body.rows);
      var num=th.classList.contains('num');
      rows.sort(function(a,b){
        var x=a.cells[i].getAttribute('data-v'),y=b.cells[i].getAttribute('data-v');
        if(num){x=parseFloat(x);y=parseFloat(y);x=isNaN(x)?-Infinity:x;y=isNaN(y)?-Infinity:y;return asc?x-y:y-x}
        return asc?String(x).localeCompare(String(y)):String(y).localeCompare(String(x));
      });
      rows.forEach(function(r){body.appendChild(r)});
    });
  });
});
document.querySelectorAll('input.filter').forEach(function(inp){
  inp.addEventListener('input',function(){
    var q=inp.value.toLowerCase(),t=document.getElementById(inp.getAttribute('data-table'));
    Array.prototype.forEach.call(t.tBodies[0].rows,function(r){
      r.style.display=r.textContent.toLowerCase().indexOf(q)>=0?'':'none'});
  });
});
"""


def render_html(doc: dict[str, Any]) -> str:
    """The page for ``doc`` (a profile, optimize or compare document)."""
    kind = doc.get("kind")
    if kind == "profile":
        title, subtitle, body = _profile_page(doc)
    elif kind == "optimize":
        title, subtitle, body = _optimize_page(doc)
    elif kind == "compare":
        title, subtitle, body = _compare_page(doc)
    else:
        raise ValueError(f"unknown report kind {kind!r}")
    csp = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f'<header><h1>{_e(title)}</h1><div class="sub">{subtitle}</div></header><main>{body}</main>'
        f"<footer>gcomp report · schema {_e(doc.get('schema_version'))}</footer>"
        f"<script>{_JS}</script></body></html>\n"
    )


def _cards(items: list[tuple[str, str, str]]) -> str:
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{v}</div><div class="s">{s}</div></div>'
            for k, v, s in items
        )
        + "</div>"
    )


def _section(title: str, note: str, content: str, sid: str = "") -> str:
    ident = f' id="{_e(sid)}"' if sid else ""
    note_html = f'<p class="note">{note}</p>' if note else ""
    return f"<section{ident}><h2>{_e(title)}</h2>{note_html}{content}</section>"


# --------------------------------------------------------------------------- charts
def _hbars(
    items: list[tuple[str, float, str, str]],
    *,
    unit: str,
    width: int = 560,
    label_w: int = 210,
    bar_h: int = 18,
) -> str:
    """Horizontal bars: (label, value, colour, tooltip)."""
    if not items:
        return '<p class="note">nothing to show</p>'
    top = max(v for _, v, _, _ in items) or 1.0
    gap, right = 6, 70
    height = len(items) * (bar_h + gap) + 4
    plot = width - label_w - right
    out = [f'<svg viewBox="0 0 {width} {height}" width="{width}" role="img">']
    for i, (label, value, color, tip) in enumerate(items):
        y = i * (bar_h + gap) + 2
        w = max(1.0, plot * value / top)
        short = _elide(label, max(12, int((label_w - 12) / 6.3)))
        out.append(
            f"<g><title>{_e(tip)}</title>"
            f'<text x="{label_w - 8}" y="{y + bar_h * 0.72:.1f}" text-anchor="end" font-size="11.5">{_e(short)}</text>'
            f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h}" rx="3" fill="{color}"/>'
            f'<text x="{label_w + w + 6:.1f}" y="{y + bar_h * 0.72:.1f}" font-size="11.5">{_e(_fmt(value))} {_e(unit)}</text></g>'
        )
    out.append("</svg>")
    return "".join(out)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
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


def _histogram(
    samples: Sequence[float], lat: dict[str, Any], width: int = 560, height: int = 230
) -> str:
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
    out = [f'<svg viewBox="0 0 {width} {height}" width="{width}" role="img">']
    for t in _nice_ticks(0, cmax, 4):
        y = mt + ph - ph * t / cmax
        out.append(
            f'<line class="gridline" x1="{ml}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text x="{ml - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{t:g}</text>'
        )
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
    for t in _nice_ticks(lo, hi, 6):
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
    legend = (
        '<div class="legend"><span style="--c:#59a14f">p50</span><span style="--c:#f28e2b">mean</span>'
        '<span style="--c:#e15759">p99</span></div>'
    )
    return "".join(out) + legend


def _roofline(
    ops: list[dict[str, Any]],
    roof: dict[str, Any] | None,
    colors: dict[str, str],
    width: int = 1140,
    height: int = 420,
) -> str:
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
    xs = [o["intensity"] for o in points]
    ys = [o["gflops_per_s"] for o in points]
    ridge = peak / bw
    x_lo = 10 ** math.floor(math.log10(min(min(xs), ridge) / 1.5))
    x_hi = 10 ** math.ceil(math.log10(max(max(xs), ridge) * 1.5))
    top = max(peak, theo or 0, max(ys))
    y_lo = 10 ** math.floor(math.log10(max(min(min(ys), x_lo * bw), 1e-6)))
    y_hi = 10 ** math.ceil(math.log10(top * 1.3))
    ml, mr, mt, mb = 62, 150, 14, 44
    pw, ph = width - ml - mr, height - mt - mb

    def px(x: float) -> float:
        return ml + pw * (math.log10(x) - math.log10(x_lo)) / (math.log10(x_hi) - math.log10(x_lo))

    def py(y: float) -> float:
        return (
            mt
            + ph
            - ph * (math.log10(y) - math.log10(y_lo)) / (math.log10(y_hi) - math.log10(y_lo))
        )

    out = [f'<svg viewBox="0 0 {width} {height}" width="{width}" role="img">']
    for e in range(int(math.log10(x_lo)), int(math.log10(x_hi)) + 1):
        x = px(10**e)
        out.append(
            f'<line class="gridline" x1="{x:.1f}" x2="{x:.1f}" y1="{mt}" y2="{mt + ph}"/>'
            f'<text x="{x:.1f}" y="{mt + ph + 16}" text-anchor="middle" font-size="11">{10.0**e:g}</text>'
        )
    for e in range(int(math.log10(y_lo)), int(math.log10(y_hi)) + 1):
        y = py(10**e)
        out.append(
            f'<line class="gridline" x1="{ml}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text x="{ml - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{10.0**e:g}</text>'
        )
    # Roofs: memory slope up to the ridge, then flat compute roofs.
    x0 = x_lo
    out.append(
        f'<polyline fill="none" stroke="#1f3b63" stroke-width="2.2" points="'
        f'{px(x0):.1f},{py(max(x0 * bw, y_lo)):.1f} {px(ridge):.1f},{py(peak):.1f} {px(x_hi):.1f},{py(peak):.1f}">'
        f"<title>measured roofline: {bw:.1f} GB/s, {peak:.1f} GFLOP/s</title></polyline>"
    )
    out.append(
        f'<text x="{px(x_hi) + 6:.1f}" y="{py(peak) + 4:.1f}" font-size="11.5" font-weight="600">'
        f"{peak:.0f} GFLOP/s measured</text>"
    )
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
    ly = py(max(x_lo * bw, y_lo)) - 8 - 24 * math.tan(math.radians(angle))
    out.append(
        f'<text x="{lx:.1f}" y="{ly:.1f}" font-size="11.5" transform="rotate({-angle:.1f} {lx:.1f} {ly:.1f})">'
        f"{bw:.1f} GB/s</text>"
    )
    out.append(
        f'<line x1="{px(ridge):.1f}" x2="{px(ridge):.1f}" y1="{py(peak):.1f}" y2="{mt + ph}" stroke="#9aa3ad" '
        f'stroke-dasharray="2 3"/><text x="{px(ridge) + 4:.1f}" y="{mt + ph - 6}" font-size="10.5" '
        f'fill="#5f6b7a">ridge {ridge:.1f} FLOP/B</text>'
    )
    tmax = max(o["time_ms"] for o in points) or 1.0
    for o in sorted(points, key=lambda o: -o["time_ms"]):
        r = 3 + 11 * math.sqrt(o["time_ms"] / tmax)
        tip = (
            f"{o['node']} ({o['op_type']}): {o['time_ms']:.3f} ms, {o['intensity']:.2f} FLOP/B, "
            f"{o['gflops_per_s']:.1f} GFLOP/s, {o.get('bound') or '?'}-bound"
        )
        out.append(
            f'<circle cx="{px(o["intensity"]):.1f}" cy="{py(o["gflops_per_s"]):.1f}" r="{r:.1f}" '
            f'fill="{colors.get(o["op_type"], _UNKNOWN)}" fill-opacity=".72" stroke="#fff" stroke-width="1">'
            f"<title>{_e(tip)}</title></circle>"
        )
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
    legend = (
        '<div class="legend">'
        + "".join(f'<span style="--c:{colors.get(op, _UNKNOWN)}">{_e(op)}</span>' for op in seen)
        + "</div>"
    )
    return "".join(out) + legend


def _timeline(timeline: list[dict[str, Any]], colors: dict[str, str], width: int = 1140) -> str:
    kernels = [t for t in timeline if t.get("op_type")]
    runs = [t for t in timeline if not t.get("op_type")]
    if not kernels:
        return '<p class="note">no timeline recorded</p>'
    end = max([t["start_ms"] + t["dur_ms"] for t in timeline])
    ml, mr, lane = 10, 10, 26
    pw = width - ml - mr
    height = lane * 2 + 34
    out = [f'<svg viewBox="0 0 {width} {height}" width="{width}" role="img">']
    for r in runs:
        out.append(
            f'<rect x="{ml}" y="4" width="{pw * r["dur_ms"] / end:.1f}" height="{lane - 6}" rx="3" '
            f'fill="#dfe6ef"><title>{_e(r["node"])}: {r["dur_ms"]:.3f} ms</title></rect>'
            f'<text x="{ml + 6}" y="{lane - 8}" font-size="11">{_e(r["node"])} · {r["dur_ms"]:.2f} ms</text>'
        )
    for k in kernels:
        x = ml + pw * k["start_ms"] / end
        w = max(pw * k["dur_ms"] / end, 0.8)
        out.append(
            f'<rect x="{x:.2f}" y="{lane + 2}" width="{w:.2f}" height="{lane - 4}" '
            f'fill="{colors.get(k["op_type"], _UNKNOWN)}"><title>{_e(k["node"])} ({_e(k["op_type"])}): '
            f"{k['dur_ms']:.3f} ms at {k['start_ms']:.3f} ms</title></rect>"
        )
    for t in (t for t in _nice_ticks(0, end, 8) if t <= end):
        x = ml + pw * t / end
        anchor = "start" if t == 0 else "end" if x > width - 40 else "middle"
        out.append(
            f'<text x="{x:.1f}" y="{lane * 2 + 20}" text-anchor="{anchor}" font-size="11">{t:g} ms</text>'
        )
    out.append("</svg>")
    return "".join(out)


def _waterfall(
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
    bw = pw / len(steps)
    out = [f'<svg viewBox="0 0 {width} {height}" width="{width}" role="img">']
    for t in _nice_ticks(0, top, 4):
        y = mt + ph - ph * t / top
        out.append(
            f'<line class="gridline" x1="{ml}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text x="{ml - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{t:g}</text>'
        )
    prev = None
    for i, (label, nodes, delta) in enumerate(steps):
        x = ml + i * bw + bw * 0.15
        w = bw * 0.7
        if prev is None:
            y0, y1, color = mt + ph - ph * nodes / top, mt + ph, "#4e79a7"
        else:
            a, b = mt + ph - ph * prev / top, mt + ph - ph * nodes / top
            y0, y1 = min(a, b), max(a, b)
            color = "#59a14f" if delta < 0 else "#e15759" if delta > 0 else "#9aa3ad"
            if y1 - y0 < 2:
                y1 = y0 + 2
            out.append(
                f'<rect x="{x:.1f}" y="{mt + ph - ph * nodes / top:.1f}" width="{w:.1f}" '
                f'height="{ph * nodes / top:.1f}" fill="#e9eef5"/>'
            )
        out.append(
            f'<rect x="{x:.1f}" y="{y0:.1f}" width="{w:.1f}" height="{y1 - y0:.1f}" rx="2" fill="{color}">'
            f"<title>{_e(label)}: {nodes} nodes ({delta:+d})</title></rect>"
        )
        if prev is not None:
            out.append(
                f'<text x="{x + w / 2:.1f}" y="{y0 - 4:.1f}" text-anchor="middle" font-size="10.5">{delta:+d}</text>'
            )
        else:
            out.append(
                f'<text x="{x + w / 2:.1f}" y="{y0 - 4:.1f}" text-anchor="middle" font-size="10.5">{nodes}</text>'
            )
        short = label if len(label) <= 24 else label[:23] + "…"
        lx, ly = x + w / 2, mt + ph + 10
        out.append(
            f'<text x="{lx:.1f}" y="{ly:.1f}" font-size="10.5" text-anchor="end" '
            f'transform="rotate(-40 {lx:.1f} {ly:.1f})">{_e(short)}</text>'
        )
        prev = nodes
    known = [(i, v) for i, v in enumerate(latencies) if v is not None]
    line_legend = ""
    if known:
        lmax = max(v for _, v in known) * 1.15 or 1.0
        pts = " ".join(
            f"{ml + i * bw + bw / 2:.1f},{mt + ph - ph * v / lmax:.1f}" for i, v in known
        )
        out.append(f'<polyline fill="none" stroke="#f28e2b" stroke-width="2.2" points="{pts}"/>')
        for i, v in known:
            cx, cy = ml + i * bw + bw / 2, mt + ph - ph * v / lmax
            out.append(
                f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="4" fill="#f28e2b" stroke="#fff">'
                f"<title>{_e(steps[i][0])}: {v:.3f} ms</title></circle>"
            )
        for t in _nice_ticks(0, lmax, 4):
            y = mt + ph - ph * t / lmax
            out.append(
                f'<text x="{ml + pw + 6}" y="{y + 4:.1f}" font-size="11" fill="#b8661a">{t:g} ms</text>'
            )
        line_legend = '<span style="--c:#f28e2b">median latency on ONNX Runtime (right axis)</span>'
    out.append("</svg>")
    legend = (
        '<div class="legend"><span style="--c:#4e79a7">nodes in the input</span>'
        '<span style="--c:#59a14f">removed by a pass</span><span style="--c:#e15759">added by a pass</span>'
        f"{line_legend}</div>"
    )
    return "".join(out) + legend


def _grouped_hbars(
    categories: list[str], series: list[tuple[str, list[float]]], *, unit: str, width: int = 1140
) -> str:
    """Per category one bar per series (compare pages)."""
    if not categories:
        return '<p class="note">nothing to show</p>'
    label_w, right, bar_h, gap = 190, 90, 12, 10
    n = len(series)
    top = max((max(v) for _, v in series if v), default=1.0) or 1.0
    height = len(categories) * (n * bar_h + gap) + 6
    plot = width - label_w - right
    out = [f'<svg viewBox="0 0 {width} {height}" width="{width}" role="img">']
    for i, cat in enumerate(categories):
        y0 = i * (n * bar_h + gap) + 3
        out.append(
            f'<text x="{label_w - 8}" y="{y0 + n * bar_h / 2 + 4:.1f}" text-anchor="end" font-size="11.5">'
            f"{_e(cat)}</text>"
        )
        for j, (name, values) in enumerate(series):
            v = values[i]
            w = max(plot * v / top, 0.8 if v else 0)
            y = y0 + j * bar_h
            out.append(
                f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h - 2}" rx="2" '
                f'fill="{_PALETTE[j % len(_PALETTE)]}"><title>{_e(name)} · {_e(cat)}: {v:.4g} {unit}</title></rect>'
                f'<text x="{label_w + w + 5:.1f}" y="{y + bar_h - 3}" font-size="10.5">{_fmt(v)}</text>'
            )
    out.append("</svg>")
    legend = (
        '<div class="legend">'
        + "".join(
            f'<span style="--c:{_PALETTE[j % len(_PALETTE)]}">{_e(name)}</span>'
            for j, (name, _) in enumerate(series)
        )
        + "</div>"
    )
    return "".join(out) + legend


# --------------------------------------------------------------------------- tables
def _table(
    table_id: str,
    header: list[tuple[str, bool]],
    rows: list[list[tuple[str, Any]]],
    *,
    filter_box: bool = False,
) -> str:
    """A sortable table; each cell is (html, sort value); header items are (title, numeric)."""
    head = "".join(f'<th class="{"num" if num else ""}">{_e(title)}</th>' for title, num in header)
    body = []
    for row in rows:
        cells = []
        for (content, value), (_, num) in zip(row, header):
            v = "" if value is None else value
            cls = (
                "num"
                if num
                else (
                    "node"
                    if content.startswith("<code")
                    else "shapes"
                    if content.startswith("<small>")
                    else ""
                )
            )
            cells.append(f'<td class="{cls}" data-v="{_e(v)}">{content}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    box = (
        (
            f'<input class="filter" type="search" placeholder="filter rows (node, op type, …)" '
            f'data-table="{table_id}">'
        )
        if filter_box
        else ""
    )
    return (
        f'{box}<div class="tablewrap"><table class="sortable" id="{table_id}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _generic_table(table_id: str, rows: list[dict[str, Any]]) -> str:
    """A table of dicts (columns: the union of their keys, in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]

    def cell(v: Any) -> tuple[str, Any]:
        if isinstance(v, float):
            return f"{v:.4g}", v
        return _e("–" if v is None else v), "" if v is None else v

    numeric = [
        all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows)
        and any(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool) for r in rows)
        for c in columns
    ]
    return _table(
        table_id,
        [(c.replace("_", " "), n) for c, n in zip(columns, numeric)],
        [[cell(r.get(c)) for c in columns] for r in rows],
    )


def _shape_text(tensors: list[dict[str, Any] | None] | None) -> str:
    if not tensors:
        return ""
    parts = []
    for t in tensors:
        if not t:
            parts.append("·")
        else:
            parts.append("×".join(str(d) for d in t.get("shape", [])) or "scalar")
    return ", ".join(parts)


def _op_table(ops: list[dict[str, Any]], table_id: str) -> str:
    header = [
        ("node", False),
        ("op type", False),
        ("ms", True),
        ("share", True),
        ("calls", True),
        ("MFLOP", True),
        ("MB moved", True),
        ("GFLOP/s", True),
        ("GB/s", True),
        ("FLOP/B", True),
        ("bound", False),
        ("of roof", True),
        ("input shapes", False),
    ]
    rows = []
    for o in ops:
        bound = o.get("bound")
        pill = f'<span class="pill {bound}">{bound}</span>' if bound else "–"
        node_title = (
            o["node"]
            if o.get("graph_node") in (None, o["node"])
            else f"{o['node']} (graph: {o['graph_node']})"
        )
        rows.append(
            [
                (f'<code title="{_e(node_title)}">{_e(o["node"])}</code>', o["node"]),
                (_e(o["op_type"]), o["op_type"]),
                (f"{o['time_ms']:.4f}", o["time_ms"]),
                (f"{o.get('share', 0) * 100:.1f}%", o.get("share", 0)),
                (str(o.get("calls", 1)), o.get("calls", 1)),
                (_fmt(o["flops"] / 1e6) if o.get("flops") is not None else "–", o.get("flops")),
                (_fmt(o["bytes"] / 1e6) if o.get("bytes") is not None else "–", o.get("bytes")),
                (_fmt(o.get("gflops_per_s")), o.get("gflops_per_s")),
                (_fmt(o.get("gb_per_s")), o.get("gb_per_s")),
                (_fmt(o.get("intensity")), o.get("intensity")),
                (pill, bound or ""),
                (
                    f"{o['roof_efficiency'] * 100:.0f}%"
                    if o.get("roof_efficiency") is not None
                    else "–",
                    o.get("roof_efficiency"),
                ),
                (
                    f"<small>{_e(_shape_text(o.get('inputs')))}</small>",
                    _shape_text(o.get("inputs")),
                ),
            ]
        )
    return _table(table_id, header, rows, filter_box=True)


def _op_types(ops: list[dict[str, Any]]) -> list[tuple[str, float, int]]:
    agg: dict[str, list[float]] = {}
    for o in ops:
        entry = agg.setdefault(o["op_type"], [0.0, 0])
        entry[0] += o["time_ms"]
        entry[1] += 1
    return sorted(((k, v[0], int(v[1])) for k, v in agg.items()), key=lambda t: -t[1])


# --------------------------------------------------------------------------- pages
def _model_label(doc: dict[str, Any]) -> str:
    model = doc.get("model", {})
    return str(model.get("path") or model.get("name") or "model")


def _profile_sections(doc: dict[str, Any], *, prefix: str = "p", top: int = 20) -> str:
    lat, model, be = doc["latency"], doc.get("model", {}), doc.get("backend", {})
    totals, roof = doc.get("totals") or {}, doc.get("roofline") or {}
    ops = doc.get("ops", [])
    types = _op_types(ops)
    colors = _colors([t for t, _, _ in types])
    gflop = totals.get("graph_flops") or totals.get("flops")
    achieved = totals.get("achieved_gflops_per_s")
    peak = roof.get("peak_gflops")
    coverage = totals.get("op_time_over_latency")
    in_run = totals.get("op_time_over_profiled_run")  # same runs as the op times: the fair ratio
    compute_ms = sum(o["time_ms"] for o in ops if o.get("bound") == "compute")
    memory_ms = sum(o["time_ms"] for o in ops if o.get("bound") == "memory")
    op_total = sum(o["time_ms"] for o in ops) or 1.0
    mem = doc.get("memory") or {}
    cards = _cards(
        [
            (
                "mean latency",
                f"{lat['mean_ms']:.2f} ms",
                f"p50 {lat['p50_ms']:.2f} · p99 {lat['p99_ms']:.2f} · min {lat['min_ms']:.2f}",
            ),
            (
                "throughput",
                f"{lat['throughput_per_s']:.1f}/s",
                f"{lat['iterations']} timed runs, {lat['warmup']} warm-up",
            ),
            (
                "work per run",
                f"{gflop / 1e9:.2f} GFLOP" if gflop else "–",
                f"{(totals.get('graph_macs') or totals.get('macs') or 0) / 1e9:.2f} G multiply-adds",
            ),
            (
                "achieved",
                f"{achieved:.1f} GFLOP/s" if achieved else "–",
                f"{achieved / peak * 100:.0f}% of {peak:.0f} measured peak"
                if achieved and peak
                else "",
            ),
            (
                "kernel time (Σ medians)",
                f"{op_total:.2f} ms",
                (
                    f"kernels fill {in_run * 100:.0f}% of each profiled run "
                    f"({totals.get('profiled_run_ms') or 0:.2f} ms median) · "
                    if in_run
                    else f"{coverage * 100:.0f}% of the median run · "
                    if coverage
                    else ""
                )
                + f"compute-bound {compute_ms / op_total * 100:.0f}%, memory-bound {memory_ms / op_total * 100:.0f}%",
            ),
            (
                "kernels",
                str(len(ops)),
                f"{model.get('nodes', '?')} graph nodes, {model.get('parameters', 0) / 1e6:.2f} M params",
            ),
            (
                "peak memory",
                _bytes(mem.get("peak_rss_bytes")),
                "process RSS"
                + (f" · GPU {_bytes(mem['gpu_peak_bytes'])}" if mem.get("gpu_peak_bytes") else ""),
            ),
            (
                "backend",
                _e(f"{be.get('name', '?')}/{be.get('target', '?')}"),
                _e(
                    ", ".join(str(p) for p in be.get("providers", []) or [])
                    or be.get("optimization")
                    or ""
                ),
            ),
        ]
    )
    parts = [_section("Summary", "", cards, f"{prefix}-summary")]
    selection = doc.get("backend_selection")
    if isinstance(selection, dict) and selection.get("candidates"):
        parts.append(
            _section(
                "Backend choice",
                f"--backend auto tried every backend/target on this machine and "
                f"chose <b>{_e(selection.get('chosen'))}</b>.",
                _generic_table(f"{prefix}-selection", selection["candidates"]),
                f"{prefix}-selection",
            )
        )
    hist = _histogram(lat.get("samples_ms") or [], lat)
    type_bars = _hbars(
        [
            (t, ms, colors[t], f"{t}: {ms:.3f} ms in {n} kernels ({ms / op_total * 100:.1f}%)")
            for t, ms, n in types[:14]
        ],
        unit="ms",
        width=560,
        label_w=150,
    )
    parts.append(
        '<div class="grid2">'
        + _section(
            "Latency distribution", "Whole-model runs after warm-up.", hist, f"{prefix}-latency"
        )
        + _section(
            "Time by op type", "Sum of kernel times per run.", type_bars, f"{prefix}-optypes"
        )
        + "</div>"
    )
    top_ops = ops[:top]
    bars = _hbars(
        [
            (
                f"{o['op_type']} · {o.get('graph_node') or o['node']}",
                o["time_ms"],
                _COMPUTE
                if o.get("bound") == "compute"
                else _MEMORY
                if o.get("bound") == "memory"
                else _UNKNOWN,
                f"{o['node']} ({o['op_type']}): {o['time_ms']:.3f} ms, {o.get('share', 0) * 100:.1f}%",
            )
            for o in top_ops
        ],
        unit="ms",
        width=1140,
        label_w=420,
    )
    legend = (
        f'<div class="legend"><span style="--c:{_COMPUTE}">compute-bound</span>'
        f'<span style="--c:{_MEMORY}">memory-bound</span><span style="--c:{_UNKNOWN}">FLOPs unknown</span></div>'
    )
    parts.append(
        _section(
            f"Top {len(top_ops)} kernels of {len(ops)}",
            "Time per run; colour: roofline bound.",
            bars + legend,
            f"{prefix}-top",
        )
    )
    roof_note = (
        f"Each dot is a kernel (area ∝ time). Roofs measured on this machine: "
        f"{_fmt(roof.get('bandwidth_gbs'))} GB/s copy bandwidth, {_fmt(peak)} GFLOP/s float32 matrix product"
        f" (theoretical {_fmt(roof.get('theoretical_gflops'))}: {roof.get('vector_bits', '?')}-bit vectors × "
        f"{roof.get('fma_units', '?')} FMA units × {roof.get('cores', '?')} cores × {_fmt(roof.get('clock_ghz'))} GHz). "
        "The memory roof is main-memory bandwidth: a small kernel whose tensors stay in cache can sit above it."
        if roof
        else ""
    )
    parts.append(
        _section("Roofline", roof_note, _roofline(ops, roof, colors), f"{prefix}-roofline")
    )
    if doc.get("timeline"):
        parts.append(
            _section(
                "One run",
                "Kernels of one profiled run on the timeline (gcomp profile --trace writes it "
                "for chrome://tracing or ui.perfetto.dev).",
                _timeline(doc["timeline"], colors),
                f"{prefix}-timeline",
            )
        )
    parts.append(
        _section(
            "All kernels",
            "Click a column to sort. FLOPs count a multiply-add as 2; bytes are inputs "
            "read once plus outputs written once; “of roof” is achieved GFLOP/s over what the roofline "
            "allows at the kernel's intensity.",
            _op_table(ops, f"{prefix}-ops"),
            f"{prefix}-ops-s",
        )
    )
    return "".join(parts)


def _environment(
    doc: dict[str, Any], backend: dict[str, Any] | None = None, model: dict[str, Any] | None = None
) -> str:
    env = doc.get("environment") or {}
    rows = [
        ("CPU", env.get("cpu")),
        ("cores", env.get("cores")),
        ("CPU features", ", ".join(env.get("cpu_features") or []) or "–"),
        (
            "GPU",
            ", ".join(
                f"{g['name']} ({_bytes(g.get('memory_bytes'))})" for g in env.get("gpu") or []
            )
            or "none",
        ),
        ("platform", env.get("platform")),
        ("Python", env.get("python")),
        ("libraries", ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items())),
        ("recorded", env.get("timestamp")),
    ]
    if backend:
        rows.append(("backend", json.dumps(backend)))
    if model:
        rows += [
            ("model", model.get("path") or model.get("name")),
            ("graph hash", model.get("graph_hash")),
            (
                "opsets",
                ", ".join(f"{k or 'ai.onnx'} {v}" for k, v in (model.get("opsets") or {}).items()),
            ),
            (
                "parameters",
                f"{model.get('parameters', 0):,} ({_bytes(model.get('initializer_bytes'))})",
            ),
        ]
    return (
        '<dl class="env">' + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in rows) + "</dl>"
    )


def _profile_page(doc: dict[str, Any]) -> tuple[str, str, str]:
    be = doc.get("backend", {})
    title = f"Profile · {_model_label(doc).split('/')[-1]}"
    sub = (
        f"<code>{_e(_model_label(doc))}</code> on <b>{_e(be.get('name'))}</b>/{_e(be.get('target'))} · "
        f"{_e((doc.get('environment') or {}).get('cpu'))} · {_e((doc.get('environment') or {}).get('timestamp'))}"
    )
    body = _profile_sections(doc) + _section(
        "Environment", "", _environment(doc, be, doc.get("model")), "env"
    )
    return title, sub, body


def _pass_table(passes: list[dict[str, Any]]) -> str:
    header = [
        ("pass", False),
        ("round", True),
        ("ms", True),
        ("modified", False),
        ("nodes", True),
        ("Δ nodes", True),
        ("initializer bytes", True),
        ("op changes", False),
        ("max abs error", True),
        ("latency after (ms)", True),
    ]
    rows = []
    for p in passes:
        delta = p["nodes_after"] - p["nodes_before"]
        err = p.get("max_abs_error")
        lat = p.get("latency_ms")
        rows.append(
            [
                (_e(p["name"]), p["name"]),
                (str(p["round"]), p["round"]),
                (f"{p['seconds'] * 1e3:.1f}", p["seconds"]),
                ('<span class="pill ok">yes</span>' if p["modified"] else "no", int(p["modified"])),
                (f"{p['nodes_before']} → {p['nodes_after']}", p["nodes_after"]),
                (
                    f'<span class="{"delta-good" if delta < 0 else "delta-bad" if delta > 0 else ""}">{delta:+d}</span>',
                    delta,
                ),
                (
                    _e(
                        f"{_bytes(p['initializer_bytes_before'])} → {_bytes(p['initializer_bytes_after'])}"
                    ),
                    p["initializer_bytes_after"],
                ),
                (
                    _e(
                        ", ".join(f"{k} {v:+d}" for k, v in p.get("op_delta", {}).items())
                        or p.get("note")
                        or "–"
                    ),
                    "",
                ),
                (f"{err:.3g}" if err is not None else "–", err),
                (f"{lat:.3f}" if lat is not None else "–", lat),
            ]
        )
    return _table("passes", header, rows)


def _ratio_text(ratio: float | None) -> str:
    """A speed-up as people say it: 2.10× (faster), or 82× slower below 0.5×."""
    if not ratio:
        return "–"
    return f"{ratio:.2f}×" if ratio >= 0.5 else f"{1 / ratio:.0f}× slower"


def _spread(*latencies: dict[str, Any]) -> float:
    """The larger relative spread (p90 - p50) / p50 of the runs: a speed-up smaller than
    this is not distinguishable from the noise of the measurement."""
    spreads = [
        (lat["p90_ms"] - lat["p50_ms"]) / lat["p50_ms"] for lat in latencies if lat.get("p50_ms")
    ]
    return max(spreads, default=0.0)


def _optimize_page(doc: dict[str, Any]) -> tuple[str, str, str]:
    before, after = doc["before"], doc["after"]
    src = (doc.get("input") or {}).get("path") or "(in memory)"
    dst = (doc.get("output") or {}).get("path") or "(not written)"
    title = f"Optimize · {str(src).split('/')[-1]} · pipeline {doc['pipeline']}"
    sub = f"<code>{_e(src)}</code> → <code>{_e(dst)}</code> in {doc['seconds']:.2f} s"
    v = doc.get("verification")
    if v is None:
        vtext, vsub = '<span class="pill warn">skipped</span>', "--no-verify"
    else:
        cls = {"passed": "ok", "failed": "bad"}.get(v["status"], "warn")
        vtext = f'<span class="pill {cls}">{_e(v["status"])}</span>'
        vsub = (
            f"max abs error {v['max_abs_error']:.2g}"
            if v["status"] == "passed"
            else _e(v.get("reason"))
        )
    profiles = doc.get("profiles") or {}
    pb, pa = profiles.get("before"), profiles.get("after")
    cards = [
        (
            "nodes",
            f"{before['nodes']} → {after['nodes']}",
            f"{after['nodes'] - before['nodes']:+d}",
        ),
        (
            "initializer bytes",
            f"{_bytes(after['initializer_bytes'])}",
            f"from {_bytes(before['initializer_bytes'])}",
        ),
        (
            "passes",
            str(len(doc["passes"])),
            f"{sum(1 for p in doc['passes'] if p['modified'])} changed the model",
        ),
        ("verification", vtext, vsub),
    ]
    if pb and pa:
        # Medians: a busy machine's outliers move the mean of a short run a lot.
        speed = (
            pb["latency"]["p50_ms"] / pa["latency"]["p50_ms"] if pa["latency"]["p50_ms"] else None
        )
        where = f"{_e(pa['backend'].get('name'))}/{_e(pa['backend'].get('target'))}"
        note = f"{speed:.2f}× on {where}" if speed else ""
        if speed and abs(speed - 1) < _spread(pb["latency"], pa["latency"]):
            note += " — within run-to-run spread"
        cards.insert(
            0,
            (
                "median latency",
                f"{pb['latency']['p50_ms']:.2f} → {pa['latency']['p50_ms']:.2f} ms",
                note,
            ),
        )
    parts = [_section("Summary", "", _cards(cards), "summary")]
    parts.append(
        _section(
            "Pipeline",
            "Graph nodes before the pipeline and after every pass that changed the model, and the "
            "model's median latency on ONNX Runtime after each (when measured: --report .html or "
            "--pass-latency).",
            _waterfall(doc["passes"], doc.get("input_latency_ms")),
            "waterfall",
        )
    )
    parts.append(
        _section(
            "Passes",
            "Every pass run, in order. “max abs error” is the largest output difference from "
            "the original right after the pass (when measured).",
            _pass_table(doc["passes"]),
            "passes-s",
        )
    )
    ops = sorted(set(before["op_types"]) | set(after["op_types"]))
    changed = [
        (op, before["op_types"].get(op, 0), after["op_types"].get(op, 0))
        for op in ops
        if before["op_types"].get(op, 0) != after["op_types"].get(op, 0)
    ]
    if changed:
        parts.append(
            _section(
                "Op types that changed",
                "",
                _grouped_hbars(
                    [c[0] for c in changed],
                    [
                        ("before", [float(c[1]) for c in changed]),
                        ("after", [float(c[2]) for c in changed]),
                    ],
                    unit="nodes",
                ),
                "optypes",
            )
        )
    if v is not None and v.get("outputs"):
        header = [
            ("output", False),
            ("dtype", False),
            ("shape", False),
            ("max abs error", True),
            ("max rel error", True),
            ("ok", False),
        ]
        rows = [
            [
                (_e(o["name"]), o["name"]),
                (_e(o["dtype"]), o["dtype"]),
                (_e(o["shape"]), str(o["shape"])),
                (f"{o['max_abs_error']:.3g}", o["max_abs_error"]),
                (f"{o['max_rel_error']:.3g}", o["max_rel_error"]),
                (
                    '<span class="pill ok">yes</span>'
                    if o["ok"]
                    else '<span class="pill bad">NO</span>',
                    int(o["ok"]),
                ),
            ]
            for o in v["outputs"]
        ]
        parts.append(
            _section(
                "Verification", _e(v.get("reason") or ""), _table("verify", header, rows), "verify"
            )
        )
    if pb and pa:
        parts.append(
            _section(
                "Before / after",
                "The same inputs on the same backend.",
                _comparison_charts([pb, pa], ["before", "after"]),
                "beforeafter",
            )
        )
        parts.append(
            f'<h2 style="margin:28px 4px 0">Profile after the pipeline</h2>{_profile_sections(pa, prefix="a")}'
        )
        parts.append(
            f'<h2 style="margin:28px 4px 0">Profile before the pipeline</h2>{_profile_sections(pb, prefix="b")}'
        )
    parts.append(_section("Environment", "", _environment(doc), "env"))
    return title, sub, "".join(parts)


def _comparison_charts(profiles: list[dict[str, Any]], labels: list[str]) -> str:
    lat_rows = []
    base = profiles[0]["latency"]["p50_ms"]
    for label, p in zip(labels, profiles):
        lat = p["latency"]
        ratio = base / lat["p50_ms"] if lat["p50_ms"] else None
        lat_rows.append(
            [
                (_e(label), label),
                (f"{lat['mean_ms']:.3f}", lat["mean_ms"]),
                (f"{lat['p50_ms']:.3f}", lat["p50_ms"]),
                (f"{lat['p99_ms']:.3f}", lat["p99_ms"]),
                (f"{lat['min_ms']:.3f}", lat["min_ms"]),
                (_ratio_text(ratio), ratio),
                (
                    _fmt((p.get("totals") or {}).get("achieved_gflops_per_s")),
                    (p.get("totals") or {}).get("achieved_gflops_per_s"),
                ),
                (str(len(p.get("ops", []))), len(p.get("ops", []))),
                (
                    _e(f"{p['backend'].get('name')}/{p['backend'].get('target')}"),
                    p["backend"].get("name"),
                ),
            ]
        )
    table = _table(
        "cmp-latency",
        [
            ("profile", False),
            ("mean ms", True),
            ("p50", True),
            ("p99", True),
            ("min", True),
            ("median speed-up vs first", True),
            ("GFLOP/s", True),
            ("kernels", True),
            ("backend", False),
        ],
        lat_rows,
    )
    lat_chart = _grouped_hbars(
        ["mean", "p50", "p99"],
        [
            (label, [p["latency"]["mean_ms"], p["latency"]["p50_ms"], p["latency"]["p99_ms"]])
            for label, p in zip(labels, profiles)
        ],
        unit="ms",
    )
    totals: dict[str, list[float]] = {}
    for i, p in enumerate(profiles):
        for t, ms, _ in _op_types(p.get("ops", [])):
            totals.setdefault(t, [0.0] * len(profiles))[i] = ms
    cats = sorted(totals, key=lambda t: -max(totals[t]))[:14]
    type_chart = _grouped_hbars(
        cats, [(label, [totals[c][i] for c in cats]) for i, label in enumerate(labels)], unit="ms"
    )
    return (
        table
        + "<h3>Latency (ms)</h3>"
        + lat_chart
        + "<h3>Time by op type (ms per run)</h3>"
        + type_chart
    )


def _compare_page(doc: dict[str, Any]) -> tuple[str, str, str]:
    profiles, labels = doc["profiles"], doc["labels"]
    title = "Comparison · " + " vs ".join(labels)
    sub = f"{len(profiles)} saved profiles; the first is the baseline"
    parts = [_section("Side by side", "", _comparison_charts(profiles, labels), "cmp")]
    # Per graph node, where the profiles share nodes (e.g. two backends on one model): the same
    # graph node with the same op type (a fused kernel ending at a node is not that node).
    keyed = [
        {(o.get("graph_node") or o["node"], o["op_type"]): o for o in p.get("ops", [])}
        for p in profiles
    ]
    shared = [k for k in keyed[0] if all(k in other for other in keyed[1:])]
    if len(profiles) > 1 and shared:
        header = (
            [("node", False), ("op type", False)]
            + [(f"{label} ms", True) for label in labels]
            + [("change vs first", True)]
        )
        rows = []
        for k in sorted(shared, key=lambda k: -keyed[0][k]["time_ms"]):
            times = [kk[k]["time_ms"] for kk in keyed]
            change = (times[-1] - times[0]) / times[0] if times[0] else None
            cls = (
                "delta-good"
                if change is not None and change < -0.05
                else "delta-bad"
                if change and change > 0.05
                else ""
            )
            rows.append(
                [(f"<code>{_e(k[0])}</code>", k[0]), (_e(k[1]), k[1])]
                + [(f"{t:.4f}", t) for t in times]
                + [
                    (
                        f'<span class="{cls}">{change * 100:+.0f}%</span>'
                        if change is not None
                        else "–",
                        change,
                    )
                ]
            )
        parts.append(
            _section(
                "Per node",
                f"{len(shared)} graph nodes run as the same op in every profile "
                "(kernels a runtime fused are compared by op type above).",
                _table("cmp-nodes", header, rows, filter_box=True),
                "cmp-nodes",
            )
        )
    for i, (label, p) in enumerate(zip(labels, profiles)):
        parts.append(
            f'<h2 style="margin:28px 4px 0">{_e(label)}</h2>{_profile_sections(p, prefix=f"c{i}", top=12)}'
        )
    parts.append(_section("Environment (first profile)", "", _environment(profiles[0]), "env"))
    return title, sub, "".join(parts)
