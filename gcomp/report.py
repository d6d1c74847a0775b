"""Reports: the same document rendered as JSON (for tools) or Markdown (for people).

Two kinds of document, both with ``schema_version`` and ``kind``; the schema is
``gcomp/schemas/report.schema.json`` (shipped in the package):

- ``optimize``: input/output files, pipeline, per-pass rows, before/after counts,
  verification;
- ``profile``: :class:`gcomp.profile.Profile` (model, environment, backend, latency, ops).
"""

from __future__ import annotations

__all__ = ["FORMATS", "check_report_path", "write_report", "render_markdown", "optimize_document", "schema"]

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from gcomp.errors import OptionError
from gcomp.profile import SCHEMA_VERSION, environment

FORMATS = (".json", ".md")


def schema() -> dict[str, Any]:
    """The JSON schema of every report gcomp writes."""
    return json.loads((Path(__file__).parent / "schemas" / "report.schema.json").read_text())


def check_report_path(path: str | os.PathLike) -> Path:
    """Fail fast on a report path gcomp cannot write (before doing long work)."""
    p = Path(path)
    if p.suffix.lower() not in FORMATS:
        raise OptionError(f"--report {p}: unsupported format '{p.suffix}' (use {', '.join(FORMATS)})")
    if p.is_dir():
        raise OptionError(f"--report {p}: is a directory")
    folder = p.resolve().parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise OptionError(f"--report {p}: folder '{folder}' does not exist or is not writable")
    return p


def optimize_document(result, *, output: str | None, input_path: str | None) -> dict[str, Any]:
    doc = {"schema_version": SCHEMA_VERSION, "kind": "optimize", "environment": environment()}
    doc["input"] = _file_entry(input_path)
    doc["output"] = _file_entry(output)
    doc.update(result.to_dict())
    return doc


def _file_entry(path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    p = Path(path)
    size = p.stat().st_size if p.is_file() else None
    data = p.with_name(p.name + ".data")
    return {
        "path": str(p),
        "file_bytes": size,
        "data_bytes": data.stat().st_size if data.is_file() else None,
    }


def write_report(doc: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``doc`` by the path's extension, atomically."""
    p = check_report_path(path)
    text = json.dumps(doc, indent=2, default=_json_default) + "\n" if p.suffix.lower() == ".json" else render_markdown(doc)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.resolve().parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def render_markdown(doc: dict[str, Any]) -> str:
    if doc.get("kind") == "profile":
        return _profile_md(doc)
    return _optimize_md(doc)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _optimize_md(doc: dict[str, Any]) -> str:
    before, after = doc["before"], doc["after"]
    out = [f"# gcomp optimize — pipeline `{doc['pipeline']}`\n"]
    src = (doc.get("input") or {}).get("path") or "(in memory)"
    dst = (doc.get("output") or {}).get("path") or "(not written)"
    out.append(f"`{src}` → `{dst}` in {doc['seconds']:.2f} s\n")
    rows = [
        ["nodes", before["nodes"], after["nodes"], after["nodes"] - before["nodes"]],
        ["initializers", before["initializers"], after["initializers"], after["initializers"] - before["initializers"]],
        ["initializer bytes", human_bytes(before["initializer_bytes"]), human_bytes(after["initializer_bytes"]),
         after["initializer_bytes"] - before["initializer_bytes"]],
    ]
    if doc.get("input") and doc.get("output"):
        rows.append(["file bytes", human_bytes(doc["input"]["file_bytes"]), human_bytes(doc["output"]["file_bytes"]), ""])
    out.append("## Before / after\n")
    out.append(_table(["", "before", "after", "change"], rows))
    ops = sorted(set(before["op_types"]) | set(after["op_types"]))
    changed = [[op, before["op_types"].get(op, 0), after["op_types"].get(op, 0)] for op in ops
               if before["op_types"].get(op, 0) != after["op_types"].get(op, 0)]
    if changed:
        out.append("\n### Op types that changed\n")
        out.append(_table(["op type", "before", "after"], changed))
    out.append("\n## Passes\n")
    out.append(_table(
        ["pass", "round", "time (ms)", "modified", "nodes", "initializer bytes", "op changes"],
        [[p["name"], p["round"], f"{p['seconds'] * 1e3:.1f}", "yes" if p["modified"] else "no",
          f"{p['nodes_before']} → {p['nodes_after']}",
          f"{human_bytes(p['initializer_bytes_before'])} → {human_bytes(p['initializer_bytes_after'])}",
          ", ".join(f"{k} {v:+d}" for k, v in p["op_delta"].items()) or p.get("note") or "-"] for p in doc["passes"]],
    ))
    unfolded = _unfolded(doc["passes"])
    if unfolded:
        out.append("\n### Left unfolded\n")
        out.append(_table(["node", "op type", "reason"], [[u["node"], u["op_type"], u["reason"]] for u in unfolded]))
    v = doc.get("verification")
    out.append("\n## Verification\n")
    if v is None:
        out.append("Skipped (`--no-verify`).\n")
    else:
        out.append(f"**{v['status']}**" + (f": {v['reason']}" if v["reason"] else "") + "\n")
        if v.get("first_bad_pass"):
            out.append(f"\nFirst pass that broke it: `{v['first_bad_pass']}`\n")
        if v["outputs"]:
            out.append("\n" + _table(
                ["output", "dtype", "shape", "max abs error", "max rel error", "ok"],
                [[o["name"], o["dtype"], o["shape"], f"{o['max_abs_error']:.3g}", f"{o['max_rel_error']:.3g}",
                  "yes" if o["ok"] else "NO"] for o in v["outputs"]],
            ))
        for note in v.get("notes", []):
            out.append(f"\n- note: {note}")
        out.append("\n")
    return "\n".join(out)


def _unfolded(passes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Nodes constant folding left alone in its last run, with the reason."""
    runs = [p for p in passes if p["name"] == "fold-constants" and p.get("details")]
    return runs[-1]["details"].get("unfolded_nodes", []) if runs else []


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
    ops = doc["ops"]
    if ops:
        out.append(f"\n## Top {min(top, len(ops))} ops of {len(ops)}\n")
        out.append(_table(
            ["node", "op type", "time ms", "share"],
            [[o["node"], o["op_type"], f"{o['time_ms']:.4f}", f"{o['share'] * 100:.1f}%"] for o in ops[:top]],
        ))
    return "\n".join(out)
