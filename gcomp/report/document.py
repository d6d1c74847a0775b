"""The report documents: what each kind holds, and the schema they follow.

Three kinds of document, all with ``schema_version`` and ``kind``; the schema is
``gcomp/schemas/report.schema.json`` (shipped in the package):

- ``optimize``: input/output files, pipeline, per-pass rows, before/after counts,
  verification, and optionally the model profiled before and after;
- ``profile``: :class:`gcomp.perf.Profile` (model, environment, backend, latency, ops
  with costs and roofline bounds, one run's timeline);
- ``compare``: saved profiles side by side (``gcomp report a.json b.json``).
"""

from __future__ import annotations

__all__ = ["compare_document", "optimize_document", "schema"]

import json
from pathlib import Path
from typing import Any

from gcomp.errors import OptionError
from gcomp.perf import SCHEMA_VERSION, environment

_SCHEMA = Path(__file__).resolve().parent.parent / "schemas" / "report.schema.json"


def schema() -> dict[str, Any]:
    """The JSON schema of every report gcomp writes."""
    return json.loads(_SCHEMA.read_text())


def optimize_document(result, *, output: str | None, input_path: str | None) -> dict[str, Any]:
    """The ``optimize`` document of a pipeline result and the files it read and wrote."""
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


def compare_document(docs: list[dict[str, Any]], labels: list[str] | None = None) -> dict[str, Any]:
    """Saved profiles side by side; the first is the baseline. Labels default to the
    backend and file name, made unique."""
    if not docs:
        raise OptionError("nothing to compare")
    for doc in docs:
        if doc.get("kind") != "profile":
            raise OptionError(f"expected profile documents (kind=profile), got kind={doc.get('kind')!r}")
    if labels is None:
        labels = _default_labels(docs)
    return {"schema_version": SCHEMA_VERSION, "kind": "compare", "labels": labels, "profiles": docs}


def _default_labels(docs: list[dict[str, Any]]) -> list[str]:
    """``<model file> · <backend>/<target>`` per profile, with ``(2)``, ``(3)``… on repeats."""
    labels: list[str] = []
    for doc in docs:
        be, model = doc.get("backend", {}), doc.get("model", {})
        base = f"{Path(model.get('path') or model.get('name') or 'model').name} · {be.get('name', '?')}/{be.get('target', '?')}"
        label, n = base, 1
        while label in labels:
            n += 1
            label = f"{base} ({n})"
        labels.append(label)
    return labels
