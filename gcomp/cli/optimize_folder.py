"""``gcomp optimize FOLDER -o OUTDIR``: every model of a folder, optimized one by one.

The work is :func:`gcomp.jobs.optimize_folder`; this module shows progress (a line per
model and the pass spinner, on stderr), prints one summary table on stdout (model, nodes
before and after, size on disk before and after, verification, time) and, on stderr, one
line per model that failed, then a last line saying how many failed. The exit status is
then the highest of the failures' (1 for a failed verification or an unreadable model).
"""

from __future__ import annotations

__all__ = ["FolderFailed", "optimize_folder"]

import json

import click

from gcomp.cli.group import stderr, stdout
from gcomp.errors import GcompError


class FolderFailed(GcompError):
    """Some models of a folder failed (each was named); the others were written."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def optimize_folder(request, *, quiet: bool, as_json: bool, say=None) -> None:
    """Run the folder job for ``request`` (a :class:`gcomp.jobs.OptimizeRequest` whose
    model and output are folders) and print what happened (``say``: -v's progress lines)."""
    from gcomp import jobs
    from gcomp.cli.optimize import _PassProgress, _print_notes

    err = stderr()
    with _PassProgress(quiet, err, say) as display:
        def on_model(name: str, index: int, count: int) -> None:
            display.stop()
            if display.say.verbose:
                display.say.step(f"[{index + 1}/{count}] {name}")
            elif not quiet:
                err.print(f"[{index + 1}/{count}] {name}", markup=False, soft_wrap=True)

        outcome = jobs.optimize_folder(request, progress=display.on_pass, phase=display.phase, on_model=on_model)
    for run in outcome.runs:
        if run.result is not None:
            _print_notes(run.result, quiet, err)
        for warning in run.outcome.warnings if run.outcome else ():
            err.print(f"[yellow]warning:[/] {run.name}: {warning}", soft_wrap=True)
    if as_json:
        click.echo(json.dumps(_document(request, outcome), indent=2, default=str))
    elif not quiet:
        stdout().print(_table(request, outcome))
        for line in outcome.skipped:
            err.print(f"note: {line}", soft_wrap=True, markup=False)
        written = len(outcome.runs) - len(outcome.failed)
        err.print(f"wrote {written} model(s) and copied {len(outcome.copied)} other file(s) to {request.output}",
                  markup=False, soft_wrap=True)
    for run in outcome.failed:
        click.echo(f"gcomp: error: {run.name}: {run.error}", err=True)
    if outcome.failed:
        names = ", ".join(run.name for run in outcome.failed)
        raise FolderFailed(f"{len(outcome.failed)} of {len(outcome.runs)} model(s) failed ({names}), not written; "
                           f"the others are in {request.output}", outcome.exit_code)


def _status(run) -> str:
    """What verification said, or that the model failed (a failed verification in capitals)."""
    v = run.result.verification if run.result is not None else None
    if not run.ok:
        return "[red]FAILED[/]" if v is not None and v.status == "failed" else "[red]failed[/]"
    if v is None:
        return "skipped"
    return {"passed": "[green]passed[/]", "unverified": "[yellow]not possible[/]"}.get(v.status, v.status)


def _table(request, outcome):
    """One row per model: nodes, size on disk (external data included), verified, time."""
    from rich.table import Table

    from gcomp.report import human_bytes

    pipeline = outcome.runs[0].result.pipeline if outcome.runs and outcome.runs[0].result else request.pipeline
    table = Table(title=f"gcomp optimize — {request.model} ({len(outcome.runs)} models), pipeline {pipeline}",
                  title_justify="left")
    table.add_column("model", overflow="fold")
    for column in ("nodes", "size", "verified", "time"):
        table.add_column(column, justify="left" if column == "verified" else "right", no_wrap=True)
    for run in outcome.runs:
        r = run.result
        nodes = f"{r.before.nodes} → {r.after.nodes}" if r is not None else "-"
        after = human_bytes(run.bytes_after) if run.bytes_after is not None else "not written"
        table.add_row(run.name, nodes, f"{human_bytes(run.bytes_before)} → {after}", _status(run),
                      f"{run.seconds:.1f} s")
    table.caption = f"{len(outcome.copied)} other file(s) copied"
    return table


def _document(request, outcome) -> dict:
    """The folder run as JSON: each model's status and its optimize document."""
    return {
        "kind": "optimize-folder",
        "input": str(request.model),
        "output": str(request.output),
        "models": [
            {"model": run.name, "output": str(run.output), "status": "written" if run.ok else "failed",
             "error": run.error, "seconds": run.seconds, "bytes_before": run.bytes_before,
             "bytes_after": run.bytes_after, "report": run.outcome.doc if run.outcome else None}
            for run in outcome.runs
        ],
        "copied": outcome.copied,
        "skipped": outcome.skipped,
    }
