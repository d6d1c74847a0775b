"""The optimize page: one function per section of a pipeline run's report.

Summary cards, the node-count waterfall over the passes, the per-pass table, op types
that changed, verification per output, and when the models were profiled, before/after
charts and both profiles in full.
"""

from __future__ import annotations

__all__ = ["optimize_page"]

from typing import Any

from gcomp.report.charts import grouped_hbars, waterfall
from gcomp.report.html_compare import comparison_charts
from gcomp.report.html_profile import environment, profile_sections
from gcomp.report.markup import cards, esc, fmt_bytes, generic_table, section, table
from gcomp.report.speed import RULE, detail, headline
from gcomp.report.units import SIGNAL_HEADER, bytes_change, file_size, signal_cells, signal_measured

_PASS_HEADER = [
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
_VERIFY_HEADER = [
    ("output", False),
    ("dtype", False),
    ("shape", False),
    ("max abs error", True),
    ("max rel error", True),
    ("ok", False),
]


def optimize_page(doc: dict[str, Any]) -> tuple[str, str, str]:
    """Title, subtitle and body of an optimize document's page."""
    src = (doc.get("input") or {}).get("path") or "(in memory)"
    dst = (doc.get("output") or {}).get("path") or "(not written)"
    title = f"Optimize · {str(src).split('/')[-1]} · pipeline {doc['pipeline']}"
    sub = f"<code>{esc(src)}</code> → <code>{esc(dst)}</code> in {doc['seconds']:.2f} s"
    parts = [
        section("Summary", "", cards(_summary_cards(doc)), "summary"),
        section(
            "Pipeline",
            "Graph nodes before the pipeline and after every pass that changed the model, and the "
            "model's median latency on ONNX Runtime after each (when measured: --report .html or "
            "--pass-latency).",
            waterfall(doc["passes"], doc.get("input_latency_ms")),
            "waterfall",
        ),
        section(
            "Passes",
            "Every pass run, in order. “max abs error” is the largest output difference from "
            "the original right after the pass (when measured).",
            _pass_table(doc["passes"]),
            "passes-s",
        ),
        _op_types_section(doc["before"], doc["after"]),
        _verification_section(doc.get("verification")),
        _quantization_section(doc.get("quantization")),
        _profiles_sections(doc.get("profiles") or {}),
        section("Environment", "", environment(doc), "env"),
    ]
    return title, sub, "".join(parts)


# --------------------------------------------------------------------------- summary
def _summary_cards(doc: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Nodes, initializer bytes, passes, verification, and median latency when profiled."""
    before, after = doc["before"], doc["after"]
    items = [
        (
            "nodes",
            f"{before['nodes']} → {after['nodes']}",
            f"{after['nodes'] - before['nodes']:+d}",
        ),
        (
            "initializer bytes",
            f"{fmt_bytes(after['initializer_bytes'])}",
            f"from {fmt_bytes(before['initializer_bytes'])} · {_change(before, after, 'initializer_bytes')}",
        ),
        *_file_size_card(doc),
        (
            "passes",
            str(len(doc["passes"])),
            f"{sum(1 for p in doc['passes'] if p['modified'])} changed the model",
        ),
        _verification_card(doc.get("verification")),
    ]
    profiles = doc.get("profiles") or {}
    if profiles.get("before") and profiles.get("after"):
        items.insert(0, _latency_card(profiles))
    return items


def _change(before: dict[str, Any], after: dict[str, Any], key: str) -> str:
    return esc(bytes_change(before[key], after[key]))


def _file_size_card(doc: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The model's size on disk before and after, external data included (none when unknown)."""
    size_in, size_out = file_size(doc.get("input")), file_size(doc.get("output"))
    if size_in is None or size_out is None:
        return []
    return [("file size", fmt_bytes(size_out), f"from {fmt_bytes(size_in)} · {esc(bytes_change(size_in, size_out))}")]


def _verification_card(v: dict[str, Any] | None) -> tuple[str, str, str]:
    if v is None:
        return "verification", '<span class="pill warn">skipped</span>', "--no-verify"
    cls = {"passed": "ok", "failed": "bad"}.get(v["status"], "warn")
    vtext = f'<span class="pill {cls}">{esc(v["status"])}</span>'
    vsub = (
        f"max abs error {v['max_abs_error']:.2g}"
        if v["status"] == "passed"
        else esc(v.get("reason"))
    )
    return "verification", vtext, vsub


def _latency_card(profiles: dict[str, Any]) -> tuple[str, str, str]:
    """The speed headline: the interleaved before/after timing worded by the rule of
    :mod:`gcomp.report.speed`; a document without one (written by an older gcomp) shows
    the two profiles' medians and claims no speed-up (they were timed apart)."""
    speed = profiles.get("speed")
    if speed:
        return "speed (interleaved)", esc(headline(speed)), esc(detail(speed))
    pb, pa = profiles["before"], profiles["after"]
    return (
        "median latency",
        f"{pb['latency']['p50_ms']:.2f} → {pa['latency']['p50_ms']:.2f} ms",
        "profiled one after the other: no speed-up claimed",
    )


# --------------------------------------------------------------------------- sections
def _pass_table(passes: list[dict[str, Any]]) -> str:
    """Every pass run: time, nodes and bytes before → after, op changes, error and latency."""
    return table("passes", _PASS_HEADER, [_pass_row(p) for p in passes])


def _pass_row(p: dict[str, Any]) -> list[tuple[str, Any]]:
    delta = p["nodes_after"] - p["nodes_before"]
    err = p.get("max_abs_error")
    lat = p.get("latency_ms")
    return [
        (esc(p["name"]), p["name"]),
        (str(p["round"]), p["round"]),
        (f"{p['seconds'] * 1e3:.1f}", p["seconds"]),
        ('<span class="pill ok">yes</span>' if p["modified"] else "no", int(p["modified"])),
        (f"{p['nodes_before']} → {p['nodes_after']}", p["nodes_after"]),
        (
            f'<span class="{"delta-good" if delta < 0 else "delta-bad" if delta > 0 else ""}">{delta:+d}</span>',
            delta,
        ),
        (
            esc(
                f"{fmt_bytes(p['initializer_bytes_before'])} → {fmt_bytes(p['initializer_bytes_after'])}"
            ),
            p["initializer_bytes_after"],
        ),
        (
            esc(
                ", ".join(f"{k} {v:+d}" for k, v in p.get("op_delta", {}).items())
                or p.get("note")
                or "–"
            ),
            "",
        ),
        (f"{err:.3g}" if err is not None else "–", err),
        (f"{lat:.3f}" if lat is not None else "–", lat),
    ]


def _op_types_section(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Node counts before and after of the op types whose count changed (empty if none)."""
    ops = sorted(set(before["op_types"]) | set(after["op_types"]))
    changed = [
        (op, before["op_types"].get(op, 0), after["op_types"].get(op, 0))
        for op in ops
        if before["op_types"].get(op, 0) != after["op_types"].get(op, 0)
    ]
    if not changed:
        return ""
    return section(
        "Op types that changed",
        "",
        grouped_hbars(
            [c[0] for c in changed],
            [
                ("before", [float(c[1]) for c in changed]),
                ("after", [float(c[2]) for c in changed]),
            ],
            unit="nodes",
        ),
        "optypes",
    )


def _verification_section(v: dict[str, Any] | None) -> str:
    """Errors per output against the original (empty when not verified or no outputs)."""
    if v is None or not v.get("outputs"):
        return ""
    signal = signal_measured(v["outputs"])  # reduced precision: cosine, rel-l2, lost elements
    header = _VERIFY_HEADER[:-1] + [(h, True) for h in SIGNAL_HEADER] * signal + _VERIFY_HEADER[-1:]
    rows = [
        [
            (esc(o["name"]), o["name"]),
            (esc(o["dtype"]), o["dtype"]),
            (esc(o["shape"]), str(o["shape"])),
            (f"{o['max_abs_error']:.3g}", o["max_abs_error"]),
            (f"{o['max_rel_error']:.3g}", o["max_rel_error"]),
            *([(esc(cell), _sort_key(cell)) for cell in signal_cells(o, "–")] if signal else []),
            (
                '<span class="pill ok">yes</span>'
                if o["ok"]
                else '<span class="pill bad">NO</span>',
                int(o["ok"]),
            ),
        ]
        for o in v["outputs"]
    ]
    return section(
        "Verification", esc(v.get("reason") or ""), table("verify", header, rows), "verify"
    )


def _sort_key(cell: str) -> float:
    """A signal cell's number to sort on (flushed / subnormal: the flushed count; missing: -1)."""
    try:
        return float(cell.split(" /")[0])
    except ValueError:
        return -1.0


def _quantization_section(q: dict[str, Any] | None) -> str:
    """Accuracy per output, then every candidate node's decision (empty without quantization)."""
    if not q:
        return ""
    speed = q.get("speed")
    note = f"Mode {q['mode']} for {q['target']}; budget {q['budget']} on {q['samples']} sample(s) from " \
           f"{q['sample_source']}."
    if speed:
        note += (f" Speed on ONNX Runtime: float {speed['float_ms_median']:.3f} ms, quantized "
                 f"{speed['quantized_ms_median']:.3f} ms ({speed['speedup_median']:.2f}x, "
                 f"p10–p90 {speed['speedup_p10']:.2f}–{speed['speedup_p90']:.2f}x).")
    if q.get("weight_bytes_before"):
        note += f" Weights {fmt_bytes(q['weight_bytes_before'])} → {fmt_bytes(q['weight_bytes_after'])}."
    rows = [{"node": r["node"], "decision": "quantized",
             "detail": f"{r.get('op_type')} → {r['as']}" if r.get("as") else r.get("op_type")} for r in q["quantized"]]
    rows += [{"node": r["node"], "decision": "kept float (accuracy)", "detail": r["reason"]}
             for r in q["returned_to_float"]]
    rows += [{"node": r["node"], "decision": "kept float", "detail": r["reason"]} for r in q["skipped"]]
    accuracy = generic_table("quant-acc", [dict(a) for a in q["accuracy"]])
    regions = generic_table("quant-regions", q["regions"]) if q.get("regions") else ""
    return section("Quantization", esc(note), accuracy + regions + generic_table("quant-nodes", rows), "quant")


def _speed_note(speed: dict[str, Any] | None) -> str:
    """The speed headline, its figures and the rule it follows (empty without one)."""
    if not speed:
        return "The profiles ran one after the other; their latencies are not a speed-up measurement."
    return f"Speed: {headline(speed)}; {detail(speed)}. Rule: {speed.get('rule') or RULE}."


def _profiles_sections(profiles: dict[str, Any]) -> str:
    """Before/after charts, then the profile after and before in full (empty unless both)."""
    pb, pa = profiles.get("before"), profiles.get("after")
    if not (pb and pa):
        return ""
    return (
        section(
            "Before / after",
            "The same inputs on the same backend. " + esc(_speed_note(profiles.get("speed"))),
            comparison_charts([pb, pa], ["before", "after"], speedup=False),
            "beforeafter",
        )
        + f'<h2 style="margin:28px 4px 0">Profile after the pipeline</h2>{profile_sections(pa, prefix="a")}'
        + f'<h2 style="margin:28px 4px 0">Profile before the pipeline</h2>{profile_sections(pb, prefix="b")}'
    )
