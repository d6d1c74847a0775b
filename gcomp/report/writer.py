"""Writing reports: the format is the file's extension, and every file is written atomically.

A report path is checked before any long work (:func:`check_report_path`); the file then
appears whole or not at all (a temporary file in the same folder, renamed over the target),
with ordinary permissions (not ``mkstemp``'s 0600).
"""

from __future__ import annotations

__all__ = ["FORMATS", "check_report_path", "write_report", "write_text"]

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from gcomp.errors import OptionError
from gcomp.report.html import render_html
from gcomp.report.markdown import render_markdown

FORMATS = (".json", ".md", ".html")


def check_report_path(path: str | os.PathLike, *, option: str = "--report",
                      formats: tuple[str, ...] = FORMATS) -> Path:
    """Fail fast on a report path gcomp cannot write (before doing long work)."""
    p = Path(path)
    if p.suffix.lower() not in formats:
        raise OptionError(f"{option} {p}: unsupported format '{p.suffix}' (use {', '.join(formats)})")
    if p.is_dir():
        raise OptionError(f"{option} {p}: is a directory")
    folder = p.resolve().parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise OptionError(f"{option} {p}: folder '{folder}' does not exist or is not writable")
    return p


def write_report(doc: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``doc`` by the path's extension (.json, .md, .html), atomically."""
    p = check_report_path(path)
    suffix = p.suffix.lower()
    if suffix == ".json":
        text = json.dumps(doc, indent=2, default=_json_default) + "\n"
    elif suffix == ".html":
        text = render_html(doc)
    else:
        text = render_markdown(doc)
    return write_text(text, p)


def write_text(text: str, p: Path) -> Path:
    """Write ``text`` to ``p`` atomically (temporary file in the same folder, then rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.resolve().parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is for secrets; a report is not one
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
