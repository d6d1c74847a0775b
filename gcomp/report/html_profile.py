"""The profile part of the HTML pages: one function per section of a profiled model.

:func:`profile_sections` draws every section of one profile (summary cards, backend
choice, latency distribution, time by op type, top kernels, roofline, one run's timeline,
the sortable op table); profile, optimize and compare pages all use it, with a ``prefix``
that keeps element ids unique when one page holds several profiles.
"""

from __future__ import annotations

__all__ = ["environment", "model_label", "op_types", "profile_page", "profile_sections"]

import json
from typing import Any

from gcomp.perf.profile import provider_counts
from gcomp.report.charts import (
    COMPUTE, MEMORY, UNKNOWN, colors, hbars, histogram, legend, roofline, timeline,
)
from gcomp.report.markup import cards, esc, fmt_bytes, fmt_num, generic_table, section, table
from gcomp.report.roof import above_roof, kernel_roof_text, peak_share_text, roof_origin
from gcomp.report.units import model_memory_words


def profile_page(doc: dict[str, Any]) -> tuple[str, str, str]:
    """Title, subtitle and body of a profile document's page."""
    be = doc.get("backend", {})
    title = f"Profile · {model_label(doc).split('/')[-1]}"
    sub = (
        f"<code>{esc(model_label(doc))}</code> on <b>{esc(be.get('name'))}</b>/{esc(be.get('target'))} · "
        f"{esc((doc.get('environment') or {}).get('cpu'))} · {esc((doc.get('environment') or {}).get('timestamp'))}"
    )
    body = profile_sections(doc) + section(
        "Environment", "", environment(doc, be, doc.get("model")), "env"
    )
    return title, sub, body


def model_label(doc: dict[str, Any]) -> str:
    model = doc.get("model", {})
    return str(model.get("path") or model.get("name") or "model")


def op_types(ops: list[dict[str, Any]]) -> list[tuple[str, float, int]]:
    """(op type, total ms, kernel count), slowest type first."""
    agg: dict[str, list[float]] = {}
    for o in ops:
        entry = agg.setdefault(o["op_type"], [0.0, 0])
        entry[0] += o["time_ms"]
        entry[1] += 1
    return sorted(((k, v[0], int(v[1])) for k, v in agg.items()), key=lambda t: -t[1])


def profile_sections(doc: dict[str, Any], *, prefix: str = "p", top: int = 20) -> str:
    """Every section of one profile, element ids starting with ``prefix``."""
    ops = doc.get("ops", [])
    types = op_types(ops)
    palette = colors([t for t, _, _ in types])
    op_total = sum(o["time_ms"] for o in ops) or 1.0
    parts = [
        section("Summary", "", cards(_summary_cards(doc, op_total)), f"{prefix}-summary"),
        _backend_choice(doc, prefix),
        _latency_and_types(doc["latency"], types, palette, op_total, prefix),
        _top_kernels(ops, top, prefix),
        _roofline_section(ops, doc.get("roofline") or {}, palette, prefix),
        _timeline_section(doc, palette, prefix),
        section(
            "All kernels",
            "Click a column to sort. FLOPs count a multiply-add as 2; bytes are inputs "
            "read once plus outputs written once; “of roof” is achieved GFLOP/s over what the roofline "
            "allows at the kernel's intensity, never above 100 %: a kernel measured above its roof is "
            "marked as a calibration error with its measured GFLOP/s.",
            _op_table(ops, f"{prefix}-ops"),
            f"{prefix}-ops-s",
        ),
    ]
    return "".join(parts)


# --------------------------------------------------------------------------- summary
def _summary_cards(doc: dict[str, Any], op_total: float) -> list[tuple[str, str, str]]:
    lat = doc["latency"]
    return [
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
        *_work_cards(doc.get("totals") or {}, doc.get("roofline") or {}),
        *_decode_cards(doc.get("decode")),
        *_kernel_cards(doc, op_total),
        *_machine_cards(doc),
    ]


def _decode_cards(d: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    """``gcomp profile --decode``: prefill, decode rate, KV cache (the latency above is one decode step)."""
    if not d:
        return []
    kv = d.get("kv_cache")
    return [
        ("prefill", f"{d['prefill_ms']:.2f} ms", f"the prompt's run, {d['prompt_tokens']} tokens"),
        ("decode", f"{d['decode_tokens_per_s']:.1f} tokens/s",
         f"median of {d['decode_steps']} steps; latency and kernels here are the last step's"),
        ("KV cache", fmt_bytes(kv["bytes"]) if kv else "none",
         f"at {kv['positions']} positions, {fmt_bytes(kv['bytes_per_token'])} per token" if kv
         else "no past inputs: each step runs the whole sequence"),
    ]


def _work_cards(totals: dict[str, Any], roof: dict[str, Any]) -> list[tuple[str, str, str]]:
    """FLOPs per run, and the GFLOP/s achieved against the measured peak."""
    gflop = totals.get("graph_flops") or totals.get("flops")
    achieved = totals.get("achieved_gflops_per_s")
    return [
        (
            "work per run",
            f"{gflop / 1e9:.2f} GFLOP" if gflop else "–",
            f"{(totals.get('graph_macs') or totals.get('macs') or 0) / 1e9:.2f} G multiply-adds",
        ),
        ("achieved", f"{achieved:.1f} GFLOP/s" if achieved else "–", esc(peak_share_text(achieved, roof))),
    ]


def _kernel_cards(doc: dict[str, Any], op_total: float) -> list[tuple[str, str, str]]:
    """Summed kernel time (how much of a run it fills, compute/memory split) and kernel count."""
    ops, model = doc.get("ops", []), doc.get("model", {})
    totals = doc.get("totals") or {}
    coverage = totals.get("op_time_over_latency")
    in_run = totals.get("op_time_over_profiled_run")  # same runs as the op times: the fair ratio
    compute_ms = sum(o["time_ms"] for o in ops if o.get("bound") == "compute")
    memory_ms = sum(o["time_ms"] for o in ops if o.get("bound") == "memory")
    if in_run:
        fill = (
            f"kernels fill {in_run * 100:.0f}% of each profiled run "
            f"({totals.get('profiled_run_ms') or 0:.2f} ms median) · "
        )
    else:
        fill = f"{coverage * 100:.0f}% of the median run · " if coverage else ""
    return [
        (
            "kernel time (Σ medians)",
            f"{op_total:.2f} ms",
            fill
            + f"compute-bound {compute_ms / op_total * 100:.0f}%, memory-bound {memory_ms / op_total * 100:.0f}%",
        ),
        (
            "kernels",
            str(len(ops)),
            f"{model.get('nodes', '?')} graph nodes, {model.get('parameters', 0) / 1e6:.2f} M params",
        ),
    ]


def _machine_cards(doc: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Peak memory and the backend the profile ran on."""
    mem, be = doc.get("memory") or {}, doc.get("backend", {})
    return [
        (
            "process peak RSS",
            fmt_bytes(mem.get("peak_rss_bytes")),
            "the whole Python process (gcomp, runtimes, libraries), not the model"
            + (f" · GPU {fmt_bytes(mem['gpu_peak_bytes'])}" if mem.get("gpu_peak_bytes") else ""),
        ),
        *_model_memory_card(mem),
        (
            "backend",
            esc(f"{be.get('name', '?')}/{be.get('target', '?')}"),
            esc(
                ", ".join(str(p) for p in be.get("providers", []) or [])
                or be.get("optimization")
                or ""
            ),
        ),
    ]


def _model_memory_card(mem: dict[str, Any]) -> list[tuple[str, str, str]]:
    """What the model itself needs (estimate), when the profile has it."""
    if mem.get("model_bytes_estimate") is None:
        return []
    return [("model memory (estimate)", fmt_bytes(mem["model_bytes_estimate"]),
             f'<span title="{esc(mem.get("model_bytes_method"))}">{esc(model_memory_words(mem))}</span>')]


# --------------------------------------------------------------------------- charts
def _backend_choice(doc: dict[str, Any], prefix: str) -> str:
    """What ``--backend auto`` measured (empty without a selection)."""
    selection = doc.get("backend_selection")
    if not (isinstance(selection, dict) and selection.get("candidates")):
        return ""
    return section(
        "Backend choice",
        f"--backend auto tried every backend/target on this machine and "
        f"chose <b>{esc(selection.get('chosen'))}</b>.",
        generic_table(f"{prefix}-selection", selection["candidates"]),
        f"{prefix}-selection",
    )


def _latency_and_types(
    lat: dict[str, Any],
    types: list[tuple[str, float, int]],
    palette: dict[str, str],
    op_total: float,
    prefix: str,
) -> str:
    """Side by side: the latency histogram and the time per op type."""
    hist = histogram(lat.get("samples_ms") or [], lat)
    type_bars = hbars(
        [
            (t, ms, palette[t], f"{t}: {ms:.3f} ms in {n} kernels ({ms / op_total * 100:.1f}%)")
            for t, ms, n in types[:14]
        ],
        unit="ms",
        width=560,
        label_w=150,
    )
    return (
        '<div class="grid2">'
        + section(
            "Latency distribution", "Whole-model runs after warm-up.", hist, f"{prefix}-latency"
        )
        + section(
            "Time by op type", "Sum of kernel times per run.", type_bars, f"{prefix}-optypes"
        )
        + "</div>"
    )


def _bound_color(bound: str | None) -> str:
    return COMPUTE if bound == "compute" else MEMORY if bound == "memory" else UNKNOWN


def _top_kernels(ops: list[dict[str, Any]], top: int, prefix: str) -> str:
    """The ``top`` slowest kernels as bars, coloured by roofline bound."""
    top_ops = ops[:top]
    bars = hbars(
        [
            (
                f"{o['op_type']} · {o.get('graph_node') or o['node']}",
                o["time_ms"],
                _bound_color(o.get("bound")),
                f"{o['node']} ({o['op_type']}): {o['time_ms']:.3f} ms, {o.get('share', 0) * 100:.1f}%",
            )
            for o in top_ops
        ],
        unit="ms",
        width=1140,
        label_w=420,
    )
    bounds = legend(
        [(COMPUTE, "compute-bound"), (MEMORY, "memory-bound"), (UNKNOWN, "FLOPs unknown")]
    )
    return section(
        f"Top {len(top_ops)} kernels of {len(ops)}",
        "Time per run; colour: roofline bound.",
        bars + bounds,
        f"{prefix}-top",
    )


def _roofline_section(
    ops: list[dict[str, Any]], roof: dict[str, Any], palette: dict[str, str], prefix: str
) -> str:
    """The roofline scatter, with how the roofs were obtained and the kernels above them."""
    above = [o for o in ops if above_roof(o)]
    roof_note = (
        "Each dot is a kernel (area ∝ time). " + roof_origin(roof)
        + " The memory roof is main-memory bandwidth: a small kernel whose tensors stay in cache can sit above it."
        if roof
        else ""
    )
    if above:
        roof_note += (f" {len(above)} kernel(s) measured above the roof (hollow red rings): a calibration error "
                      "(or a kernel shorter than the timer resolves), not an efficiency above 100 %.")
    return section("Roofline", esc(roof_note), roofline(ops, roof, palette), f"{prefix}-roofline")


def _timeline_section(doc: dict[str, Any], palette: dict[str, str], prefix: str) -> str:
    """One profiled run on a timeline (empty when the backend recorded none)."""
    if not doc.get("timeline"):
        return ""
    return section(
        "One run",
        "Kernels of one profiled run on the timeline (gcomp profile --trace writes it "
        "for chrome://tracing or ui.perfetto.dev).",
        timeline(doc["timeline"], palette),
        f"{prefix}-timeline",
    )


# --------------------------------------------------------------------------- tables
_OP_HEADER = [
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


def _op_table(ops: list[dict[str, Any]], table_id: str) -> str:
    """Every kernel with its time, work, rates, bound and input shapes (sortable,
    filterable); with the execution provider that ran it when more than one did."""
    if len(provider_counts(ops)) <= 1:
        return table(table_id, _OP_HEADER, [_op_row(o) for o in ops], filter_box=True)
    header = [*_OP_HEADER[:2], ("provider", False), *_OP_HEADER[2:]]
    rows = []
    for o in ops:
        row = _op_row(o)
        row.insert(2, (esc(o.get("provider") or "–"), o.get("provider") or ""))
        rows.append(row)
    return table(table_id, header, rows, filter_box=True)


def _op_row(o: dict[str, Any]) -> list[tuple[str, Any]]:
    bound = o.get("bound")
    pill = f'<span class="pill {bound}">{bound}</span>' if bound else "–"
    node_title = (
        o["node"]
        if o.get("graph_node") in (None, o["node"])
        else f"{o['node']} (graph: {o['graph_node']})"
    )
    return [
        (f'<code title="{esc(node_title)}">{esc(o["node"])}</code>', o["node"]),
        (esc(o["op_type"]), o["op_type"]),
        (f"{o['time_ms']:.4f}", o["time_ms"]),
        (f"{o.get('share', 0) * 100:.1f}%", o.get("share", 0)),
        (str(o.get("calls", 1)), o.get("calls", 1)),
        (fmt_num(o["flops"] / 1e6) if o.get("flops") is not None else "–", o.get("flops")),
        (fmt_num(o["bytes"] / 1e6) if o.get("bytes") is not None else "–", o.get("bytes")),
        (fmt_num(o.get("gflops_per_s")), o.get("gflops_per_s")),
        (fmt_num(o.get("gb_per_s")), o.get("gb_per_s")),
        (fmt_num(o.get("intensity")), o.get("intensity")),
        (pill, bound or ""),
        (
            f'<span class="pill bad" title="measured above the roof">{esc(kernel_roof_text(o))}</span>'
            if above_roof(o)
            else esc(kernel_roof_text(o, missing="–")),
            -1.0 if above_roof(o) else o.get("roof_efficiency"),
        ),
        (
            f"<small>{esc(_shape_text(o.get('inputs')))}</small>",
            _shape_text(o.get("inputs")),
        ),
    ]


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


def environment(
    doc: dict[str, Any], backend: dict[str, Any] | None = None, model: dict[str, Any] | None = None
) -> str:
    """The machine, libraries and time of a document (and its backend and model when given)."""
    env = doc.get("environment") or {}
    rows = [
        ("CPU", env.get("cpu")),
        ("cores", env.get("cores")),
        ("CPU features", ", ".join(env.get("cpu_features") or []) or "–"),
        (
            "GPU",
            ", ".join(
                f"{g['name']} ({fmt_bytes(g.get('memory_bytes'))})" for g in env.get("gpu") or []
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
                f"{model.get('parameters', 0):,} ({fmt_bytes(model.get('initializer_bytes'))})",
            ),
        ]
    return (
        '<dl class="env">' + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in rows) + "</dl>"
    )
