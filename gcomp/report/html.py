"""One self-contained HTML page for any gcomp report document (profile, optimize, compare).

Guarantees: the page needs nothing but itself. Charts are inline SVG drawn here; the
only script is a few lines inline (sorting and filtering the op table); no fonts,
images, stylesheets or scripts are fetched, so it opens offline, in a CI artifact or an
e-mail attachment, and the Content-Security-Policy meta tag forbids any request.
Every string from the model or environment is HTML-escaped.

Sections by document kind:

- ``profile``: summary cards, latency distribution, time by op type, top-N ops, the
  roofline scatter (ops by arithmetic intensity and achieved GFLOP/s under the machine's
  measured roofs), one run's timeline, the sortable op table, environment
  (:mod:`gcomp.report.html_profile`);
- ``optimize``: the pipeline (node-count waterfall over the passes, per-pass table with
  verification error), verification, and when profiled, before/after latency and op
  types with both profiles in full (:mod:`gcomp.report.html_optimize`);
- ``compare``: latency side by side, time by op type per profile, per-node deltas
  (:mod:`gcomp.report.html_compare`).

The charts are :mod:`gcomp.report.charts`; cards, sections and tables
:mod:`gcomp.report.markup`. This module assembles the page: head, style, script.
"""

from __future__ import annotations

__all__ = ["render_html"]

from typing import Any

from gcomp.report.html_compare import compare_page
from gcomp.report.html_optimize import optimize_page
from gcomp.report.html_profile import profile_page
from gcomp.report.markup import esc

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

_PAGES = {"profile": profile_page, "optimize": optimize_page, "compare": compare_page}


def render_html(doc: dict[str, Any]) -> str:
    """The page for ``doc`` (a profile, optimize or compare document)."""
    kind = doc.get("kind")
    if not isinstance(kind, str) or kind not in _PAGES:
        raise ValueError(f"unknown report kind {kind!r}")
    title, subtitle, body = _PAGES[kind](doc)
    csp = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>"
        f'<header><h1>{esc(title)}</h1><div class="sub">{subtitle}</div></header><main>{body}</main>'
        f"<footer>gcomp report · schema {esc(doc.get('schema_version'))}</footer>"
        f"<script>{_JS}</script></body></html>\n"
    )
