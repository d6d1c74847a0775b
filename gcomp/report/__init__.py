"""Reports: the same document rendered as JSON (for tools), Markdown (terminals, PRs) or
one self-contained HTML page, chosen by the file's extension; and a Chrome/Perfetto
trace of one profiled run.

Three kinds of document (:mod:`gcomp.report.document`): ``optimize``, ``profile`` and
``compare``, all following ``gcomp/schemas/report.schema.json``. Modules:

- :mod:`~gcomp.report.document`: building the documents, the schema;
- :mod:`~gcomp.report.writer`: checking report paths, writing files atomically;
- :mod:`~gcomp.report.markdown`: the Markdown rendering;
- :mod:`~gcomp.report.html`: the HTML page, with its sections in
  :mod:`~gcomp.report.html_profile`, :mod:`~gcomp.report.html_optimize` and
  :mod:`~gcomp.report.html_compare`, charts in :mod:`~gcomp.report.charts` and building
  blocks in :mod:`~gcomp.report.markup`;
- :mod:`~gcomp.report.trace`: the trace-event JSON of one run;
- :mod:`~gcomp.report.units`: :func:`human_bytes`, the one byte-size formatter, and
  :func:`bytes_change`, the one size-change formatter.
"""

from __future__ import annotations

__all__ = [
    "FORMATS", "bytes_change", "check_report_path", "compare_document", "file_size", "human_bytes", "optimize_document",
    "render_html", "render_markdown", "schema", "write_report", "write_text",
]

from gcomp.report.document import compare_document, optimize_document, schema
from gcomp.report.html import render_html
from gcomp.report.markdown import render_markdown
from gcomp.report.units import bytes_change, file_size, human_bytes
from gcomp.report.writer import FORMATS, check_report_path, write_report, write_text
