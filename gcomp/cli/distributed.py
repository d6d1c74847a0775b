"""``gcomp run`` and ``gcomp shard``: sharded models over several ranks.

Both hand their options to :mod:`gcomp.distributed.launch` as a plain dict (the same
parameters an MPI rank receives) and exit with the status it returns. With ``-q``,
``run`` prints only its check verdict (``--check``) and ``shard`` nothing but errors;
``-v`` adds timed start and end lines.
"""

from __future__ import annotations

__all__ = ["run", "shard"]

import sys
from pathlib import Path

import click

from gcomp.cli.group import CONTEXT, PathIn, Say, cli, verbosity_options
from gcomp.cli.providers import provider_options


@cli.command(context_settings=CONTEXT)
@click.argument("model", type=PathIn)
@click.option("--ranks", type=click.IntRange(min=1), default=None, help="Number of ranks (must match the mesh).")
@click.option("--shard", default=None, metavar="MESH",
              help="tp=N, dp=N or dp=A,tp=B. [default: the model's annotations, else tp=RANKS]")
@click.option("--inputs", type=click.Path(path_type=Path), default=None, help="Inputs: .npz or a test_data_set folder.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=D1,D2,...", help="Shape of a generated input.")
@click.option("--outputs", type=click.Path(path_type=Path), default=None, help="Write rank 0's outputs to an .npz.")
@click.option("--check", is_flag=True, help="Also run the unsharded model and compare (exit 1 beyond --tolerance).")
@click.option("--tolerance", type=float, default=1e-4, show_default=True, help="Max abs error allowed by --check.")
@click.option("--simulate", is_flag=True, help="Run every rank in this process (no MPI).")
@click.option("--hostfile", type=click.Path(path_type=Path), default=None, help="MPI hostfile for several hosts.")
@click.option("--mpi-arg", "mpi_args", multiple=True, help="Extra option for mpiexec (repeatable).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime threads per rank.")
@provider_options(help="ONNX Runtime execution provider every rank runs on (the same options for each; --check's "
                       "unsharded run stays on the CPU): as onnxruntime.get_available_providers() spells it or "
                       "short (cpu, cuda, tensorrt, openvino, dml, coreml, rocm...; any case), one this build "
                       "offers. A provider other than the CPU gets CPUExecutionProvider after it as the fallback "
                       "for the nodes it does not take; a session that cannot use it at all is an error.")
@verbosity_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def run(model, ranks, shard, inputs, input_shapes, outputs, check, tolerance, simulate, hostfile, mpi_args, threads,
        as_json, quiet=False, verbose=False, provider=None, provider_option=()):
    """Run MODEL split over RANKS (MPI processes, or simulated in one process)."""
    from gcomp.cli.providers import chosen_provider
    from gcomp.distributed.launch import run_command

    say = Say(quiet, verbose, json=as_json)
    provider, options = chosen_provider(provider, provider_option)
    say.step(f"running {model}" + (" (simulated)" if simulate else ""))
    params = {"model": str(model), "ranks": ranks, "shard": shard, "inputs": str(inputs) if inputs else None,
              "input_shapes": list(input_shapes), "outputs": str(outputs) if outputs else None, "check": check,
              "tolerance": tolerance, "simulate": simulate, "hostfile": str(hostfile) if hostfile else None,
              "mpi_args": list(mpi_args), "threads": threads, "json": as_json, "quiet": quiet,
              "provider": provider, "provider_options": options}
    code = run_command(params, echo=click.echo)
    say.done()
    sys.exit(code)


@cli.command(context_settings=CONTEXT)
@click.argument("model", type=PathIn)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="The annotated model.")
@click.option("--shard", required=True, metavar="MESH", help="tp=N, dp=N or dp=A,tp=B.")
@click.option("--override", "overrides", multiple=True, metavar="TENSOR=AXIS:MESH[,...]|replicated",
              help="Replace the plan's layout of a weight or input (repeatable).")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=D1,D2,...",
              help="Specialize to these input shapes first (static shapes, per-rank graphs need them).")
@click.option("--ranks-dir", type=click.Path(path_type=Path), default=None,
              help="Also write one graph per rank (with collectives) into this folder.")
@verbosity_options
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def shard(model, output, shard, overrides, input_shapes, ranks_dir, as_json, quiet=False, verbose=False):
    """Annotate MODEL with IR v11 sharding specs for a mesh; print memory and collectives per rank."""
    from gcomp.distributed.launch import shard_command

    say = Say(quiet, verbose, json=as_json)
    say.step(f"planning {model} for {shard}")
    params = {"model": str(model), "output": str(output), "shard": shard, "overrides": list(overrides),
              "input_shapes": list(input_shapes), "ranks_dir": str(ranks_dir) if ranks_dir else None,
              "json": as_json}
    # shard writes files: quiet, it prints nothing but errors (and --json's document)
    code = shard_command(params, echo=click.echo if as_json or not quiet else lambda _text: None)
    say.done()
    sys.exit(code)
