"""The comparison part of the HTML pages: profiles side by side.

:func:`comparison_charts` (latency table and charts, time per op type) serves both the
compare page and the optimize page's before/after section; :func:`compare_page` adds
per-node deltas where the profiles share graph nodes, then every profile in full.
"""

from __future__ import annotations

__all__ = ["compare_page", "comparison_charts", "ratio_text"]

from typing import Any

from gcomp.report.charts import grouped_hbars
from gcomp.report.html_profile import environment, op_types, profile_sections
from gcomp.report.markup import esc, fmt_num, section, table

_LATENCY_HEADER = [
    ("profile", False),
    ("mean ms", True),
    ("p50", True),
    ("p99", True),
    ("min", True),
    ("median speed-up vs first", True),
    ("GFLOP/s", True),
    ("kernels", True),
    ("backend", False),
]


def ratio_text(ratio: float | None) -> str:
    """A speed-up as people say it: 2.10× (faster), or 82× slower below 0.5×."""
    if not ratio:
        return "–"
    return f"{ratio:.2f}×" if ratio >= 0.5 else f"{1 / ratio:.0f}× slower"


def compare_page(doc: dict[str, Any]) -> tuple[str, str, str]:
    """Title, subtitle and body of a compare document's page."""
    profiles, labels = doc["profiles"], doc["labels"]
    title = "Comparison · " + " vs ".join(labels)
    sub = f"{len(profiles)} saved profiles; the first is the baseline"
    parts = [section("Side by side", "", comparison_charts(profiles, labels), "cmp")]
    parts.append(_per_node(profiles, labels))
    for i, (label, p) in enumerate(zip(labels, profiles)):
        parts.append(
            f'<h2 style="margin:28px 4px 0">{esc(label)}</h2>{profile_sections(p, prefix=f"c{i}", top=12)}'
        )
    parts.append(section("Environment (first profile)", "", environment(profiles[0]), "env"))
    return title, sub, "".join(parts)


def comparison_charts(profiles: list[dict[str, Any]], labels: list[str], *, speedup: bool = True) -> str:
    """Latency figures per profile (table and bars) and time per op type per profile;
    ``speedup=False`` leaves out the p50 ratio column (an optimize page takes its speed
    from the interleaved timing, and two figures must not disagree)."""
    lat_chart = grouped_hbars(
        ["mean", "p50", "p99"],
        [
            (label, [p["latency"]["mean_ms"], p["latency"]["p50_ms"], p["latency"]["p99_ms"]])
            for label, p in zip(labels, profiles)
        ],
        unit="ms",
    )
    totals: dict[str, list[float]] = {}
    for i, p in enumerate(profiles):
        for t, ms, _ in op_types(p.get("ops", [])):
            totals.setdefault(t, [0.0] * len(profiles))[i] = ms
    cats = sorted(totals, key=lambda t: -max(totals[t]))[:14]
    type_chart = grouped_hbars(
        cats, [(label, [totals[c][i] for c in cats]) for i, label in enumerate(labels)], unit="ms"
    )
    return (
        _latency_table(profiles, labels, speedup=speedup)
        + "<h3>Latency (ms)</h3>"
        + lat_chart
        + "<h3>Time by op type (ms per run)</h3>"
        + type_chart
    )


def _latency_table(profiles: list[dict[str, Any]], labels: list[str], *, speedup: bool = True) -> str:
    """Mean, p50, p99, min, speed-up over the first (when ``speedup``), GFLOP/s and kernels
    per profile."""
    lat_rows = []
    base = profiles[0]["latency"]["p50_ms"]
    for label, p in zip(labels, profiles):
        lat = p["latency"]
        ratio = base / lat["p50_ms"] if lat["p50_ms"] else None
        lat_rows.append(
            [
                (esc(label), label),
                (f"{lat['mean_ms']:.3f}", lat["mean_ms"]),
                (f"{lat['p50_ms']:.3f}", lat["p50_ms"]),
                (f"{lat['p99_ms']:.3f}", lat["p99_ms"]),
                (f"{lat['min_ms']:.3f}", lat["min_ms"]),
                (ratio_text(ratio), ratio),
                (
                    fmt_num((p.get("totals") or {}).get("achieved_gflops_per_s")),
                    (p.get("totals") or {}).get("achieved_gflops_per_s"),
                ),
                (str(len(p.get("ops", []))), len(p.get("ops", []))),
                (
                    esc(f"{p['backend'].get('name')}/{p['backend'].get('target')}"),
                    p["backend"].get("name"),
                ),
            ]
        )
    if not speedup:
        column = _LATENCY_HEADER.index(("median speed-up vs first", True))
        header = [h for i, h in enumerate(_LATENCY_HEADER) if i != column]
        return table("cmp-latency", header, [row[:column] + row[column + 1:] for row in lat_rows])
    return table("cmp-latency", _LATENCY_HEADER, lat_rows)


def _per_node(profiles: list[dict[str, Any]], labels: list[str]) -> str:
    """Time per graph node where the profiles share nodes (e.g. two backends on one model):
    the same graph node with the same op type (a fused kernel ending at a node is not that
    node). Empty for one profile or none shared."""
    keyed = [
        {(o.get("graph_node") or o["node"], o["op_type"]): o for o in p.get("ops", [])}
        for p in profiles
    ]
    shared = [k for k in keyed[0] if all(k in other for other in keyed[1:])]
    if len(profiles) < 2 or not shared:
        return ""
    header = (
        [("node", False), ("op type", False)]
        + [(f"{label} ms", True) for label in labels]
        + [("change vs first", True)]
    )
    rows = []
    for k in sorted(shared, key=lambda k: -keyed[0][k]["time_ms"]):
        times = [kk[k]["time_ms"] for kk in keyed]
        rows.append(
            [(f"<code>{esc(k[0])}</code>", k[0]), (esc(k[1]), k[1])]
            + [(f"{t:.4f}", t) for t in times]
            + [_change_cell(times)]
        )
    return section(
        "Per node",
        f"{len(shared)} graph nodes run as the same op in every profile "
        "(kernels a runtime fused are compared by op type above).",
        table("cmp-nodes", header, rows, filter_box=True),
        "cmp-nodes",
    )


def _change_cell(times: list[float]) -> tuple[str, float | None]:
    """The last profile's time relative to the first, green below -5%, red above +5%."""
    change = (times[-1] - times[0]) / times[0] if times[0] else None
    cls = (
        "delta-good"
        if change is not None and change < -0.05
        else "delta-bad"
        if change and change > 0.05
        else ""
    )
    if change is None:
        return "–", change
    return f'<span class="{cls}">{change * 100:+.0f}%</span>', change
