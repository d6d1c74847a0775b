"""HTML building blocks of the report pages: escaping, number formats, cards, sections, tables.

Every string that reaches a page from a model, an environment or a file name goes
through :func:`esc`. Tables are sortable (the page's inline script sorts by each cell's
``data-v``) and can carry a filter box.
"""

from __future__ import annotations

__all__ = ["cards", "esc", "fmt_bytes", "fmt_num", "generic_table", "section", "table"]

import html
import math
from typing import Any

from gcomp.report.units import human_bytes


def esc(value: Any) -> str:
    """``value`` as HTML text (None as empty), quotes escaped too."""
    return html.escape("" if value is None else str(value), quote=True)


def fmt_num(value: float | None, digits: int = 3) -> str:
    """A number for a table or a chart label: integers as such, ``digits`` significant
    digits below 10, one decimal up to 1000, thousands separated above; an en dash for
    None or a non-finite value."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if value == 0:
        return "0"
    if float(value).is_integer() and abs(value) < 1e6:
        return f"{int(value)}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}" if abs(value) < 10 else f"{value:.1f}"


def fmt_bytes(n: float | None) -> str:
    """A byte size on a page (up to TiB; an en dash when unknown)."""
    return human_bytes(n, missing="–", largest="TiB")


def cards(items: list[tuple[str, str, str]]) -> str:
    """Summary cards: (title, value HTML, subtitle HTML)."""
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="card"><div class="k">{esc(k)}</div><div class="v">{v}</div><div class="s">{s}</div></div>'
            for k, v, s in items
        )
        + "</div>"
    )


def section(title: str, note: str, content: str, sid: str = "") -> str:
    """A titled card of the page; ``note`` (HTML) is the grey line under the title."""
    ident = f' id="{esc(sid)}"' if sid else ""
    note_html = f'<p class="note">{note}</p>' if note else ""
    return f"<section{ident}><h2>{esc(title)}</h2>{note_html}{content}</section>"


def table(
    table_id: str,
    header: list[tuple[str, bool]],
    rows: list[list[tuple[str, Any]]],
    *,
    filter_box: bool = False,
) -> str:
    """A sortable table; each cell is (html, sort value); header items are (title, numeric)."""
    head = "".join(f'<th class="{"num" if num else ""}">{esc(title)}</th>' for title, num in header)
    body = []
    for row in rows:
        cells = []
        for (content, value), (_, num) in zip(row, header):
            v = "" if value is None else value
            cells.append(f'<td class="{_cell_class(content, num)}" data-v="{esc(v)}">{content}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    box = (
        (
            f'<input class="filter" type="search" placeholder="filter rows (node, op type, …)" '
            f'data-table="{table_id}">'
        )
        if filter_box
        else ""
    )
    return (
        f'{box}<div class="tablewrap"><table class="sortable" id="{table_id}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _cell_class(content: str, numeric: bool) -> str:
    """Numbers align right; node names (``<code>``) and shapes (``<small>``) get their own style."""
    if numeric:
        return "num"
    if content.startswith("<code"):
        return "node"
    return "shapes" if content.startswith("<small>") else ""


def generic_table(table_id: str, rows: list[dict[str, Any]]) -> str:
    """A table of dicts (columns: the union of their keys, in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]

    def cell(v: Any) -> tuple[str, Any]:
        if isinstance(v, float):
            return f"{v:.4g}", v
        return esc("–" if v is None else v), "" if v is None else v

    numeric = [
        all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows)
        and any(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool) for r in rows)
        for c in columns
    ]
    return table(
        table_id,
        [(c.replace("_", " "), n) for c, n in zip(columns, numeric)],
        [[cell(r.get(c)) for c in columns] for r in rows],
    )
