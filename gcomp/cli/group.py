"""The click group every ``gcomp`` command registers on, and what the commands share.

Shared here: the context settings, the path argument type, the verification input
options (``--inputs``, ``--input-shape``, ``--max-tensor-bytes``, ``--verify-timeout``)
and the two rich consoles (tables and summaries to stdout, progress and notes to stderr).
Importing this module is cheap: rich and every runtime are imported when a command runs.
"""

from __future__ import annotations

__all__ = ["CONTEXT", "PathIn", "cli", "input_options", "stderr", "stdout"]

from pathlib import Path

import click

from gcomp import __version__

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
PathIn = click.Path(path_type=Path)  # existence is checked by gcomp.io with a clearer message


def stdout():
    """A rich console on stdout (tables, summaries)."""
    from rich.console import Console

    return Console(highlight=False)


def stderr():
    """A rich console on stderr (progress, notes, ``wrote ...``)."""
    from rich.console import Console

    return Console(stderr=True, highlight=False)


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="gcomp")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def cli(debug: bool) -> None:
    """gcomp: a graph-optimizing compiler toolchain for ONNX models.

    Optimize with verified passes, inspect, verify and profile models.
    """


_SHAPE_HELP = "Shape of a generated input (repeatable); a dim name it fixes holds for every generated input."


def input_options(f=None, *, shape_help: str = _SHAPE_HELP):
    """The options that say what a model is run on when it is verified or profiled
    (``@input_options``, or ``@input_options(shape_help=...)`` for a command whose
    ``--input-shape`` does more)."""
    if f is None:
        return lambda g: input_options(g, shape_help=shape_help)
    f = click.option(
        "--verify-timeout", type=click.FloatRange(min=0, min_open=True), default=300, show_default=True,
        help="Seconds one verification run may take before it is stopped (then: not verified).",
    )(f)
    f = click.option(
        "--max-tensor-bytes", type=click.IntRange(min=1), default=4 << 30, show_default=True,
        help="Verification refuses to run a model whose inputs or constant-sized tensors exceed this.",
    )(f)
    f = click.option(
        "--input-shape", "input_shapes", multiple=True, metavar="NAME=D1,D2,...",
        help=shape_help,
    )(f)
    f = click.option(
        "--inputs", "inputs", type=click.Path(path_type=Path), default=None,
        help="Inputs: an .npz file or an ONNX test_data_set folder of input_*.pb.",
    )(f)
    return f
