"""The click group every ``gcomp`` command registers on, and what the commands share.

Shared here: the context settings, the path argument type, the verification input
options (``--inputs``, ``--input-shape``, ``--max-tensor-bytes``, ``--verify-timeout``),
the two rich consoles (tables and summaries to stdout, progress and notes to stderr), and
``-q/--quiet`` / ``-v/--verbose``, which every command takes (:func:`verbosity_options`,
:class:`Say`): quiet prints errors, warnings and, for a command that writes no file, its
answer; verbose adds progress lines on stderr, each with the seconds since the command
started (``optimize``: one per pass run, with its time and node counts).
Importing this module is cheap: rich and every runtime are imported when a command runs.
"""

from __future__ import annotations

__all__ = ["CONTEXT", "PathIn", "Say", "cli", "input_options", "stderr", "stdout", "verbosity_options"]

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import click

from gcomp import __version__
from gcomp.errors import OptionError

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


def verbosity_options(f):
    """``-q/--quiet`` and ``-v/--verbose`` (parameters ``quiet`` and ``verbose``); a
    command turns them into a :class:`Say`."""
    f = click.option("-v", "--verbose", is_flag=True,
                     help="Also print progress on stderr, each line with the seconds since the start.")(f)
    return click.option("-q", "--quiet", is_flag=True,
                        help="Print only errors, warnings and, when the command writes no file, its answer.")(f)


class Say:
    """How loud a command is: ``quiet`` (errors, warnings, the answer of a command that
    writes no file), normal (tables, notes, a transient spinner), ``verbose`` (normal,
    plus progress lines on stderr with the seconds since the command started)."""

    def __init__(self, quiet: bool = False, verbose: bool = False, *, json: bool = False) -> None:
        if quiet and verbose:
            raise OptionError("-q and -v cannot be combined")
        # --json prints the answer as JSON on stdout: no spinner, but -v's lines still on stderr
        self.quiet, self.verbose = quiet or (json and not verbose), verbose
        self.start = time.perf_counter()

    def step(self, text: str) -> None:
        """One progress line (verbose only)."""
        if self.verbose:
            stderr().print(f"[{time.perf_counter() - self.start:7.2f} s] {text}", markup=False, soft_wrap=True)

    @contextlib.contextmanager
    def progress(self, text: str) -> Iterator[Callable[[str], None]]:
        """A phase: yields a status callback. Verbose prints each status as a line;
        normal shows a transient spinner; quiet shows nothing."""
        if self.verbose:
            self.step(text)
            yield self.step
            return
        from gcomp.profiling import spinner

        with spinner(text, quiet=self.quiet) as status:
            yield status

    def done(self) -> None:
        """The last verbose line: the command's total time."""
        self.step("done")
