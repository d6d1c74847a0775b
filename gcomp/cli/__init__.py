"""The ``gcomp`` command line.

Every error a user can cause prints one line, ``gcomp: error: ...``, and exits
non-zero (2 for usage/option errors, 1 otherwise); ``--debug`` shows tracebacks.
Tables and summaries go to stdout, progress to stderr.

The click group lives in :mod:`gcomp.cli.group`; each command module registers its
commands on it when imported below: :mod:`~gcomp.cli.optimize`, :mod:`~gcomp.cli.inspect`
(passes, inspect, verify), :mod:`~gcomp.cli.profile` (profile, compile, report) and
:mod:`~gcomp.cli.distributed` (run, shard), :mod:`~gcomp.cli.bundle` (bundle) and
:mod:`~gcomp.cli.generate` (generate).
Commands import their heavy modules when they
run, so ``gcomp --help``, ``gcomp passes`` and ``gcomp inspect`` load no runtime.
"""

from __future__ import annotations

__all__ = ["cli", "main"]

import sys  # noqa: I001 - the command modules below import in registration order

import click

from gcomp.cli.group import cli
from gcomp.errors import GcompError, first_line

# Importing a command module registers its commands on ``cli``, in this order.
from gcomp.cli import optimize  # noqa: F401  (optimize)
from gcomp.cli import inspect  # noqa: F401  (passes, inspect, verify)
from gcomp.cli import profile  # noqa: F401  (profile, compile, report)
from gcomp.cli import distributed  # noqa: F401  (run, shard)
from gcomp.cli import bundle  # noqa: F401  (bundle)
from gcomp.cli import generate  # noqa: F401  (generate)


class _Stopped(BaseException):
    """Ctrl-C or SIGTERM, raised where the program is so every ``finally`` (temp files)
    runs before exit. A BaseException that is not KeyboardInterrupt: click would turn
    that into Abort and print a blank line."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum, frame):
    raise _Stopped(signum)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors, exit codes, no tracebacks unless --debug.

    Ctrl-C and SIGTERM interrupt cleanly: partial outputs and temp files are removed
    (gcomp writes into a temporary folder and renames at the end), exit 130 / 143.
    """
    import signal

    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    if not debug:
        import logging

        # Libraries log warnings about the models they read; gcomp reports problems itself.
        for name in ("onnx_ir", "onnxscript"):
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        cli.main(args=args, prog_name="gcomp", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except _Stopped as e:
        what = "interrupted" if e.signum == signal.SIGINT else "terminated"
        click.echo(f"gcomp: {what}; nothing written", err=True)
        sys.exit(128 + e.signum)
    except click.exceptions.Abort:
        click.echo("gcomp: interrupted; nothing written", err=True)
        sys.exit(130)
    except click.ClickException as e:
        if debug:
            raise
        click.echo(f"gcomp: error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except GcompError as e:
        if debug:
            raise
        click.echo(f"gcomp: error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("gcomp: interrupted; nothing written", err=True)
        sys.exit(130)
    except Exception as e:  # a bug in gcomp: still one line unless --debug
        if debug:
            raise
        text = str(e).strip() and first_line(e)
        click.echo(f"gcomp: internal error: {type(e).__name__}: {text} (run with --debug for the traceback)", err=True)
        sys.exit(3)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
