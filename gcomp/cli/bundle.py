"""``gcomp bundle``: TVM artifacts plus the runtime they need, in one archive.

See :mod:`gcomp.backends.tvm.bundle` for what the archive holds and where its parts come
from. The command prints the archive's size (``--json``: the whole summary).
"""

from __future__ import annotations

__all__ = ["bundle"]

import json
import re
from pathlib import Path

import click

from gcomp.cli.group import CONTEXT, Say, cli, stderr, verbosity_options
from gcomp.errors import OptionError


@cli.command(context_settings=CONTEXT)
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="The archive to write (.tar.gz).")
@click.option("--python", "python", default=None, metavar="X.Y",
              help="Python version of the machine that runs the bundle (tvm_ffi is a compiled extension). "
                   "[default: this Python]")
@click.option("--wheel", "wheels", multiple=True, type=click.Path(path_type=Path),
              help="An apache-tvm-ffi wheel for that Python (else pip downloads one when it differs from this "
                   "one), or an nvidia-cuda-runtime 13 wheel for CUDA artifacts (repeatable).")
@verbosity_options
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def bundle(artifacts, output, python, wheels, as_json, quiet=False, verbose=False):
    """Pack TVM ARTIFACTS (folders from gcomp compile) with TVM's runtime libraries, tvm_ffi
    and gcomp's loader into one archive that runs them where only Python and NumPy are.

    On the target machine (one JSON line per artifact; exit 1 if one fails):

    \b
        tar xzf bundle.tar.gz
        PYTHONPATH=gcomp-tvm-bundle python gcomp-tvm-bundle/gcomp_tvm_runtime.py \\
            gcomp-tvm-bundle/artifacts/* --check
    """
    from gcomp.backends.tvm.bundle import write_bundle

    if python is not None and not re.fullmatch(r"3\.\d{1,2}", python):
        raise OptionError(f"--python {python}: expected a version such as 3.12")
    say = Say(quiet, verbose, json=as_json)
    with say.progress("bundling") as status:
        doc = write_bundle(list(artifacts), output, python=python, wheels=list(wheels), progress=status)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    elif not quiet:
        stderr().print(f"wrote {doc['output']} ({doc['bytes'] / 2**20:.1f} MiB, {doc['unpacked_bytes'] / 2**20:.1f} MiB "
                       f"unpacked) for Python {doc['python']}", markup=False)
    say.done()
