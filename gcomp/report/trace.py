"""Chrome / Perfetto trace of one profiled run: ops as slices on a timeline.

The output is the Trace Event Format's JSON object form (``{"traceEvents": [...]}``),
which ``chrome://tracing``, https://ui.perfetto.dev and ``about:tracing`` open. One
process (the model on its backend) with one thread: a ``model_run`` complete event
(``"ph": "X"``) spans the run and every kernel is a complete event inside it, named by
op type, with the node name, FLOPs, bytes and roofline bound in ``args``. Timestamps
and durations are microseconds. Metadata events name the process and thread.

Unlike a runtime's raw trace (ONNX Runtime's lists every run, session set-up and
thread-pool statistics), this holds exactly one run, with gcomp's per-op figures.
"""

from __future__ import annotations

__all__ = ["trace_events", "write_trace"]

import json
import os
from pathlib import Path
from typing import Any

from gcomp.errors import GcompError, OptionError
from gcomp.report.writer import write_text

_ARGS = ("graph_node", "flops", "bytes", "gflops_per_s", "gb_per_s", "bound", "share")


def trace_events(doc: dict[str, Any]) -> dict[str, Any]:
    """The trace-event JSON object for a profile document (``Profile.to_dict()``)."""
    timeline = doc.get("timeline") or []
    if not timeline:
        raise GcompError("this profile has no timeline of a run (the backend did not record one)")
    rows = {o["node"]: o for o in doc.get("ops", [])}
    backend = doc.get("backend", {})
    model = doc.get("model", {})
    pid, tid = 1, 1
    label = f"{model.get('path') or model.get('name') or 'model'} on {backend.get('name', '?')}/{backend.get('target', '?')}"
    events: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": label}},
        {"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": "kernels"}},
    ]
    for item in sorted(timeline, key=lambda t: (t["start_ms"], -t["dur_ms"])):
        ts = round(item["start_ms"] * 1e3, 3)
        dur = round(max(item["dur_ms"], 0.0) * 1e3, 3)
        if item.get("op_type") is None:
            name, cat, args = item["node"], "run", {}
        else:
            row = rows.get(item["node"], {})
            name, cat = item["op_type"], "op"
            args = {"node": item["node"]}
            args.update((key, row[key]) for key in _ARGS if row.get(key) is not None)
        events.append(
            {"name": name, "cat": cat, "ph": "X", "ts": ts, "dur": dur, "pid": pid, "tid": tid, "args": args}
        )
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {"generator": "gcomp", "schema_version": doc.get("schema_version")},
    }


def write_trace(
    doc: dict[str, Any], path: str | os.PathLike, *, events: dict[str, Any] | None = None
) -> Path:
    """Write the trace for ``doc`` (or the already built ``events``) to ``path`` (.json) atomically."""
    p = Path(path)
    if p.suffix.lower() != ".json":
        raise OptionError(f"--trace {p}: a trace is written as .json")
    return write_text(json.dumps(events if events is not None else trace_events(doc)) + "\n", p)
