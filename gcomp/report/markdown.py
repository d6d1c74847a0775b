"""Markdown rendering of every report document (terminals, pull requests, CI logs).

Plain GitHub-flavoured Markdown: headings and pipe tables, no HTML. One renderer per
document kind; each section of a page is one function returning its lines.
"""

from __future__ import annotations

__all__ = ["render_markdown"]

from typing import Any

from gcomp.perf.profile import provider_counts
from gcomp.report.roof import above_roof, kernel_roof_text, peak_share_text, roof_origin
from gcomp.report.speed import RULE, detail, headline
from gcomp.report.units import (
    SIGNAL_HEADER,
    bytes_change,
    file_size,
    human_bytes,
    model_memory_words,
    signal_cells,
    signal_measured,
)


def render_markdown(doc: dict[str, Any]) -> str:
    """The Markdown page for ``doc`` (a profile, optimize or compare document)."""
    if doc.get("kind") == "profile":
        return _profile_md(doc)
    if doc.get("kind") == "compare":
        return _compare_md(doc)
    return _optimize_md(doc)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- optimize
def _optimize_md(doc: dict[str, Any]) -> str:
    out = [f"# gcomp optimize — pipeline `{doc['pipeline']}`\n"]
    src = (doc.get("input") or {}).get("path") or "(in memory)"
    dst = (doc.get("output") or {}).get("path") or "(not written)"
    out.append(f"`{src}` → `{dst}` in {doc['seconds']:.2f} s\n")
    out += _before_after_md(doc)
    out += _passes_md(doc["passes"])
    out += _verification_md(doc.get("verification"))
    out += _quantization_md(doc.get("quantization"))
    profiles = doc.get("profiles")
    if profiles:
        out.append("## Profiles before / after\n")
        out += _speed_md(profiles.get("speed"))
        out.append(_latency_table(["before", "after"], [profiles["before"], profiles["after"]], speedup=False))
        out += _profile_facts_md(profiles["before"], profiles["after"])
    return "\n".join(out)


def _profile_facts_md(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Memory before and after (process and model), kernels above the roof, and the roofs' origin."""
    rows = [[label, human_bytes((d.get("memory") or {}).get("peak_rss_bytes")),
             human_bytes((d.get("memory") or {}).get("model_bytes_estimate")),
             model_memory_words(d.get("memory") or {}) or "-",
             sum(1 for o in d.get("ops", []) if above_roof(o))]
            for label, d in (("before", before), ("after", after))]
    out = ["\n" + _table(["", "process peak RSS", "model memory (estimate)", "made of",
                           "kernels above the roof (calibration errors)"], rows)]
    roof = after.get("roofline") or {}
    if roof:
        out.append(f"\nRoofline: {roof_origin(roof)}\n")
    method = (after.get("memory") or {}).get("model_bytes_method")
    if method:
        out.append(f"Model memory: {method}. Process peak RSS is the whole Python process, not the model.\n")
    return out


def _speed_md(speed: dict[str, Any] | None) -> list[str]:
    """The speed headline with its figures and rule; without an interleaved timing, a line
    saying the profiles' latencies are no speed-up measurement."""
    if not speed:
        return ["The profiles ran one after the other; their latencies are not a speed-up measurement.\n"]
    return [f"**Speed: {headline(speed)}** ({detail(speed)}).\n",
            f"Rule: {speed.get('rule') or RULE}.\n"]


def _quantization_md(q: dict[str, Any] | None) -> list[str]:
    """The quantization's accuracy, size, speed and per-node decisions (empty without one)."""
    if not q:
        return []
    out = [f"## Quantization ({q['mode']}, {q['target']})\n",
           f"Accuracy budget {q['budget']} on {q['samples']} sample(s) from {q['sample_source']}.\n"]
    out.append(_table(["output", "error", "cosine", "within"],
                      [[a["name"], f"{a['error']:.4g}", _num(a.get("cosine"), ".5f"), "yes" if a["within"] else "NO"]
                       for a in q["accuracy"]]))
    if q.get("weight_bytes_before"):
        ratio = q["weight_bytes_after"] / q["weight_bytes_before"]
        out.append(f"\nWeights quantized: {human_bytes(q['weight_bytes_before'])} → "
                   f"{human_bytes(q['weight_bytes_after'])} ({ratio:.3f}x).\n")
    speed = q.get("speed")
    if speed:
        out.append(f"Speed (ONNX Runtime, {speed['rounds']} interleaved runs): float {speed['float_ms_median']:.3f} ms, "
                   f"quantized {speed['quantized_ms_median']:.3f} ms, {speed['speedup_median']:.2f}x "
                   f"(p10–p90 {speed['speedup_p10']:.2f}–{speed['speedup_p90']:.2f}x).\n")
    if q.get("regions"):
        out.append("Each quantized node timed alone, float against quantized (median µs):\n")
        out.append(_table(["node", "float µs", "quantized µs", "decision"],
                          [[r["node"], f"{r['float_us']:.1f}", f"{r['quantized_us']:.1f}", r["decision"]]
                           for r in q["regions"]]))
        out.append("")
    decisions = [[r["node"], "quantized", _quantized_as(r)] for r in q["quantized"]]
    decisions += [[r["node"], "kept float (accuracy)", r["reason"]] for r in q["returned_to_float"]]
    decisions += [[r["node"], "kept float", r["reason"]] for r in q["skipped"]]
    out.append(_table(["node", "decision", "why / op"], decisions))
    return out


def _quantized_as(entry: dict[str, Any]) -> str:
    """``op_type``, and the form it took where a node has more than one (Attention)."""
    op = entry.get("op_type", "")
    return f"{op} → {entry['as']}" if entry.get("as") else op


def _before_after_md(doc: dict[str, Any]) -> list[str]:
    """Counts and sizes before and after, and the op types whose count changed."""
    before, after = doc["before"], doc["after"]
    rows = [
        ["nodes", before["nodes"], after["nodes"], after["nodes"] - before["nodes"]],
        ["initializers", before["initializers"], after["initializers"], after["initializers"] - before["initializers"]],
        ["initializer bytes", human_bytes(before["initializer_bytes"]), human_bytes(after["initializer_bytes"]),
         bytes_change(before["initializer_bytes"], after["initializer_bytes"])],
    ]
    if doc.get("input") and doc.get("output"):
        size_in, size_out = file_size(doc["input"]), file_size(doc["output"])
        rows.append(["file size", human_bytes(size_in), human_bytes(size_out), bytes_change(size_in, size_out)])
    out = ["## Before / after\n", _table(["", "before", "after", "change"], rows)]
    ops = sorted(set(before["op_types"]) | set(after["op_types"]))
    changed = [[op, before["op_types"].get(op, 0), after["op_types"].get(op, 0)] for op in ops
               if before["op_types"].get(op, 0) != after["op_types"].get(op, 0)]
    if changed:
        out.append("\n### Op types that changed\n")
        out.append(_table(["op type", "before", "after"], changed))
    return out


def _passes_md(passes: list[dict[str, Any]]) -> list[str]:
    """One row per pass run (error and latency columns when measured), and what folding left."""
    errors = any(p.get("max_abs_error") is not None for p in passes)
    latency = any(p.get("latency_ms") is not None for p in passes)
    out = ["\n## Passes\n", _table(
        ["pass", "round", "time (ms)", "modified", "nodes", "initializer bytes", "op changes"]
        + (["max abs error"] if errors else []) + (["latency after (ms)"] if latency else []),
        [[p["name"], p["round"], f"{p['seconds'] * 1e3:.1f}", "yes" if p["modified"] else "no",
          f"{p['nodes_before']} → {p['nodes_after']}",
          f"{human_bytes(p['initializer_bytes_before'])} → {human_bytes(p['initializer_bytes_after'])}",
          ", ".join(f"{k} {v:+d}" for k, v in p["op_delta"].items()) or p.get("note") or "-"]
         + ([f"{p['max_abs_error']:.3g}" if p.get("max_abs_error") is not None else "-"] if errors else [])
         + ([f"{p['latency_ms']:.3f}" if p.get("latency_ms") is not None else "-"] if latency else [])
         for p in passes],
    )]
    unfolded = _unfolded(passes)
    if unfolded:
        out.append("\n### Left unfolded\n")
        out.append(_table(["node", "op type", "reason"], [[u["node"], u["op_type"], u["reason"]] for u in unfolded]))
    return out


def _unfolded(passes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Nodes constant folding left alone in its last run, with the reason."""
    runs = [p for p in passes if p["name"] == "fold-constants" and p.get("details")]
    return runs[-1]["details"].get("unfolded_nodes", []) if runs else []


def _verification_md(v: dict[str, Any] | None) -> list[str]:
    out = ["\n## Verification\n"]
    if v is None:
        out.append("Skipped (`--no-verify`).\n")
        return out
    out.append(f"**{v['status']}**" + (f": {v['reason']}" if v["reason"] else "") + "\n")
    if v.get("first_bad_pass"):
        out.append(f"\nFirst pass that broke it: `{v['first_bad_pass']}`\n")
    if v["outputs"]:
        signal = signal_measured(v["outputs"])  # reduced precision: cosine, rel-l2, lost elements
        out.append("\n" + _table(
            ["output", "dtype", "shape", "max abs error", "max rel error", *(SIGNAL_HEADER if signal else ()), "ok"],
            [[o["name"], o["dtype"], o["shape"], f"{o['max_abs_error']:.3g}", f"{o['max_rel_error']:.3g}",
              *(signal_cells(o) if signal else ()), "yes" if o["ok"] else "NO"] for o in v["outputs"]],
        ))
    for note in v.get("notes", []):
        out.append(f"\n- note: {note}")
    out.append("\n")
    return out


# --------------------------------------------------------------------------- compare
def _latency_table(labels: list[str], docs: list[dict[str, Any]], *, speedup: bool = True) -> str:
    """Latency and work per profile; ``speedup`` adds the p50 ratio to the first (left out
    where an interleaved timing gives the speed, so two figures never disagree)."""
    base = docs[0]["latency"]["p50_ms"]
    rows = []
    for label, d in zip(labels, docs):
        lat, totals = d["latency"], d.get("totals") or {}
        gf = totals.get("achieved_gflops_per_s")
        ratio = [_ratio(base / lat["p50_ms"]) if lat["p50_ms"] else "-"] if speedup else []
        rows.append([label, f"{d['backend'].get('name')}/{d['backend'].get('target')}", f"{lat['mean_ms']:.3f}",
                     f"{lat['p50_ms']:.3f}", f"{lat['p99_ms']:.3f}", *ratio, f"{gf:.1f}" if gf else "-",
                     len(d.get("ops", []))])
    header = ["", "backend", "mean ms", "p50", "p99", *(["median speed-up vs first"] if speedup else []),
              "GFLOP/s", "kernels"]
    return _table(header, rows)


def _ratio(ratio: float) -> str:
    return f"{ratio:.2f}x" if ratio >= 0.5 else f"{1 / ratio:.0f}x slower"


def _compare_md(doc: dict[str, Any]) -> str:
    labels, docs = doc["labels"], doc["profiles"]
    out = ["# gcomp report — comparison\n", _latency_table(labels, docs)]
    types: dict[str, list[float]] = {}
    for i, d in enumerate(docs):
        for o in d.get("ops", []):
            types.setdefault(o["op_type"], [0.0] * len(docs))[i] += o["time_ms"]
    out.append("\n## Time by op type (ms per run)\n")
    out.append(_table(["op type", *labels], [[t, *(f"{v:.3f}" for v in vals)]
                                             for t, vals in sorted(types.items(), key=lambda kv: -max(kv[1]))]))
    return "\n".join(out)


# --------------------------------------------------------------------------- profile
def _profile_md(doc: dict[str, Any], top: int = 20) -> str:
    lat, be, model = doc["latency"], doc["backend"], doc["model"]
    out = [f"# gcomp profile — `{model.get('path') or model.get('name')}`\n"]
    out.append(f"Backend **{be['name']}** on **{be['target']}** ({', '.join(be.get('providers', []))}), "
               f"{doc['environment'].get('cpu')}, {doc['environment'].get('cores')} cores\n")
    out.append("## Latency\n")
    out.append(_table(
        ["mean ms", "p50", "p90", "p99", "min", "stdev", "iterations", "per second"],
        [[f"{lat['mean_ms']:.3f}", f"{lat['p50_ms']:.3f}", f"{lat['p90_ms']:.3f}", f"{lat['p99_ms']:.3f}",
          f"{lat['min_ms']:.3f}", f"{lat['stdev_ms']:.3f}", lat["iterations"], f"{lat['throughput_per_s']:.1f}"]],
    ))
    out += _decode_md(doc.get("decode"))
    totals, roof = doc.get("totals") or {}, doc.get("roofline") or {}
    if totals.get("graph_flops"):
        gf = totals.get("achieved_gflops_per_s")
        share = peak_share_text(gf, roof)
        out.append(f"\n**{totals['graph_flops'] / 1e9:.3f} GFLOP** per run ({(totals.get('graph_macs') or 0) / 1e9:.3f} G "
                   "multiply-adds)" + (f", achieved **{gf:.1f} GFLOP/s**" if gf else "")
                   + (f" ({share})" if share else "") + ".\n")
    out += _memory_md(doc.get("memory") or {})
    if roof:
        out.append(f"\nRoofline: {roof_origin(roof)} “of roof” is a kernel's GFLOP/s over its roof, never above "
                   "100 %: a kernel measured above it is a calibration error, shown with its measured GFLOP/s.\n")
    if doc["ops"]:
        out += _ops_md(doc["ops"], top)
    return "\n".join(out)


def _decode_md(d: dict[str, Any] | None) -> list[str]:
    """``gcomp profile --decode``: the latency above and the kernels below are the last decode step's."""
    if not d:
        return []
    kv = d.get("kv_cache")
    cache = (f"{human_bytes(kv['bytes'])} at {kv['positions']} positions ({human_bytes(kv['bytes_per_token'])} "
             "per token)" if kv else "none (no past inputs: each step runs the whole sequence)")
    return ["\n## Decoding\n", _table(
        ["prompt tokens", "prefill ms", "new tokens", "decode tokens/s", "step p50 ms", "KV cache"],
        [[d["prompt_tokens"], f"{d['prefill_ms']:.3f}", d["new_tokens"], f"{d['decode_tokens_per_s']:.1f}",
          f"{d['decode_step_p50_ms']:.3f}", cache]]),
        "\nThe latency above and the kernels below are those of the last decode step (one token).\n"]


def _memory_md(memory: dict[str, Any]) -> list[str]:
    """The process's peak RSS and, apart from it, what the model needs (estimate)."""
    out = []
    if memory.get("peak_rss_bytes") is not None:
        out.append(f"\nProcess peak RSS: {human_bytes(memory['peak_rss_bytes'])} (the whole Python process: gcomp, "
                   "the runtime and its libraries, not the model).\n")
    if memory.get("model_bytes_estimate") is not None:
        out.append(f"\nModel memory (estimate): {human_bytes(memory['model_bytes_estimate'])} = "
                   f"{model_memory_words(memory)}. Method: {memory.get('model_bytes_method')}.\n")
    return out


def _num(v: float | None, fmt: str) -> str:
    return format(v, fmt) if v is not None else "-"


def _ops_md(ops: list[dict[str, Any]], top: int) -> list[str]:
    """The ``top`` slowest kernels, then time, kernel count and work per op type."""
    out = [f"\n## Top {min(top, len(ops))} ops of {len(ops)}\n"]
    several = len(provider_counts(ops)) > 1  # the provider of each node, when more than one ran
    out.append(_table(
        ["node", "op type", *(["provider"] if several else []), "time ms", "share", "GFLOP/s", "GB/s", "bound",
         "of roof"],
        [[o["node"], o["op_type"], *([o.get("provider") or "-"] if several else []), f"{o['time_ms']:.4f}",
          f"{o['share'] * 100:.1f}%", _num(o.get("gflops_per_s"), ".1f"), _num(o.get("gb_per_s"), ".2f"),
          o.get("bound") or "-", kernel_roof_text(o)]
         for o in ops[:top]],
    ))
    types: dict[str, list[float]] = {}
    for o in ops:
        entry = types.setdefault(o["op_type"], [0.0, 0, 0])
        entry[0] += o["time_ms"]
        entry[1] += 1
        entry[2] += o.get("flops") or 0
    total = sum(v[0] for v in types.values()) or 1.0
    out.append("\n## By op type\n")
    out.append(_table(["op type", "kernels", "time ms", "share", "GFLOP"],
                      [[t, int(v[1]), f"{v[0]:.3f}", f"{v[0] / total * 100:.1f}%", f"{v[2] / 1e9:.3f}"]
                       for t, v in sorted(types.items(), key=lambda kv: -kv[1][0])]))
    return out
