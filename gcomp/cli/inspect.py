"""``gcomp passes``, ``gcomp inspect`` and ``gcomp verify``: look at passes and models.

``passes`` and ``inspect`` never import a runtime (they stay fast); ``verify`` runs both
models on ONNX Runtime through :func:`gcomp.verify.verify` and exits 1 on a mismatch
(or, with ``--strict``, when verification was not possible). With ``-q`` they print
only their answer: the names (``passes``), one summary line (``inspect``), the verdict
(``verify``); ``-v`` adds where each pass is defined (``passes``) and timed steps.
"""

from __future__ import annotations

__all__ = ["inspect", "passes", "verify"]

import json
import sys
from pathlib import Path

import click

from gcomp.cli.group import CONTEXT, PathIn, Say, cli, input_options, stdout, verbosity_options
from gcomp.cli.providers import provider_options


@cli.command(context_settings=CONTEXT)
@verbosity_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def passes(as_json, quiet=False, verbose=False):
    """List the registered passes, their options, and the pipelines."""
    say = Say(quiet, verbose, json=as_json)
    from gcomp.pipeline import registry  # the pipeline module loads the built-in passes

    ps, pls = registry.passes(), registry.pipelines()
    say.step(f"{len(ps)} passes and {len(pls)} pipelines registered")
    if as_json:
        click.echo(json.dumps({
            "pipelines": {n: {"summary": p.summary, "stages": [{"passes": list(s.passes), "repeat": s.repeat} for s in p.stages]} for n, p in pls.items()},
            "passes": {n: {"summary": p.summary, "options": [{"name": o.name, "type": o.type.__name__, "default": o.default, "help": o.help} for o in p.options]} for n, p in ps.items()},
        }, indent=2, default=str))
        return
    if quiet:  # the names, one a line: pipelines, then passes
        click.echo("\n".join([*pls, *sorted(ps)]))
        return
    from rich.table import Table

    out = stdout()
    t = Table(title="pipelines", title_justify="left")
    t.add_column("name")
    t.add_column("passes")
    t.add_column("summary")
    for name, p in pls.items():
        stages = " → ".join(
            ("(" + ", ".join(s.passes) + f")×≤{s.repeat}") if s.repeat > 1 else ", ".join(s.passes) for s in p.stages
        )
        t.add_row(name, stages, p.summary)
    out.print(t)
    t = Table(title="passes", title_justify="left")
    t.add_column("name")
    t.add_column("summary")
    t.add_column("options (--set NAME=VALUE)")
    if verbose:
        t.add_column("defined in")
    for name in sorted(ps):
        p = ps[name]
        opts = "\n".join(f"{o.name}: {o.type.__name__} = {o.default!r} — {o.help}" for o in p.options) or "-"
        t.add_row(name, p.summary, opts, *([f"{p.cls.__module__}.{p.cls.__qualname__}"] if verbose else []))
    out.print(t)
    say.done()


@cli.command(context_settings=CONTEXT)
@click.argument("model", type=PathIn)
@verbosity_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(model, as_json, quiet=False, verbose=False):
    """Print MODEL's opsets, inputs/outputs, op histogram and parameter bytes."""
    from gcomp import io
    from gcomp.perf import model_stats

    say = Say(quiet, verbose, json=as_json)
    m = io.load(model)
    say.step(f"read {model}")
    stats = model_stats(m)
    info = _model_info(model, m, stats)
    say.step("counted ops and parameters")
    if as_json:
        click.echo(json.dumps(info, indent=2))
    elif quiet:
        from gcomp.report import human_bytes

        opsets = ", ".join(f"{d or 'ai.onnx'}={v}" for d, v in info["opsets"].items())
        click.echo(f"{model}: {stats.nodes} nodes, {stats.parameters:,} parameters "
                   f"({human_bytes(stats.initializer_bytes)}), opsets {opsets}")
    else:
        _print_model_info(model, m, stats, info)
    say.done()


def _model_info(model, m, stats) -> dict:
    """What ``inspect --json`` prints: the file, its opsets, inputs/outputs and statistics."""
    import onnx_ir as ir

    from gcomp import io
    from gcomp.passes.quant._common import already_quantized

    def describe(v):
        t = v.type
        dtype = t.dtype.name if isinstance(t, ir.TensorType) else str(t)
        shape = [d if isinstance(d, int) else (d.value or "?") for d in v.shape] if v.shape is not None else None
        return {"name": v.name, "dtype": dtype, "shape": shape}

    return {
        "path": str(model),
        "file_bytes": Path(model).stat().st_size,
        "ir_version": m.ir_version,
        "producer": f"{m.producer_name or ''} {m.producer_version or ''}".strip(),
        "opsets": dict(m.opset_imports),
        "inputs": [describe(v) for v in m.graph.inputs if v.const_value is None],
        "outputs": [describe(v) for v in m.graph.outputs],
        "external_data": sorted({str(t.location) for t in io.external_tensors(m)}),
        # "already quantized (MatMulNBits x12 found)", or None for a float model
        "quantization": already_quantized(m),
        "quantized_by": m.metadata_props.get("gcomp.quantize"),
        "notes": io.load_notes(m),  # what reading the model changed (an IR version, map outputs kept aside)
        **stats.to_dict(),
    }


def _print_model_info(model, m, stats, info: dict) -> None:
    from rich.table import Table

    from gcomp.report import human_bytes

    out = stdout()
    out.print(f"[bold]{model}[/]  ir_version {m.ir_version}  producer {info['producer'] or '-'}  "
              f"file {human_bytes(info['file_bytes'])}")
    out.print("opsets: " + ", ".join(f"{d or 'ai.onnx'}={v}" for d, v in info["opsets"].items()))
    for note in info["notes"]:
        out.print(f"note: {note}", markup=False, soft_wrap=True)
    io_table = Table(title="inputs / outputs", title_justify="left")
    for col in ("", "name", "dtype", "shape"):
        io_table.add_column(col)
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            io_table.add_row(kind[:-1], v["name"], v["dtype"], str(v["shape"]))
    out.print(io_table)
    hist = Table(title=f"{stats.nodes} nodes", title_justify="left")
    hist.add_column("op type")
    hist.add_column("count", justify="right")
    for op, n in info["op_types"].items():
        hist.add_row(op, str(n))
    out.print(hist)
    quantized = info["quantization"]
    mode = f" by gcomp --quantize {info['quantized_by']}" if info["quantized_by"] else ""
    out.print(f"quantization: {quantized.removeprefix('already ') + mode if quantized else 'none (float)'}",
              markup=False, soft_wrap=True)
    out.print(f"parameters: {stats.parameters:,} in {stats.initializers} initializers, "
              f"{human_bytes(stats.initializer_bytes)}" + (f"; external data: {', '.join(info['external_data'])}" if info["external_data"] else ""))


@cli.command(context_settings=CONTEXT)
@click.argument("original", type=PathIn)
@click.argument("candidate", type=PathIn)
@input_options
@click.option("--rtol", type=float, default=None, help="Relative tolerance for float32 outputs.")
@click.option("--atol", type=float, default=None, help="Absolute tolerance for float32 outputs.")
@click.option("--strict", is_flag=True, help="Exit 1 when verification is not possible.")
@provider_options(help="Run CANDIDATE on this ONNX Runtime execution provider (ORIGINAL stays on the reference: "
                       "the CPU, optimizations off): as onnxruntime.get_available_providers() spells it or short "
                       "(cpu, cuda, tensorrt, openvino, dml, coreml, rocm...; any case), one this build offers. "
                       "A provider other than the CPU gets CPUExecutionProvider after it as the fallback for the "
                       "nodes it does not take; a session that cannot use it at all is an error.")
@verbosity_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def verify(original, candidate, inputs, input_shapes, max_tensor_bytes, verify_timeout, rtol, atol, strict, as_json,
           quiet=False, verbose=False, provider=None, provider_option=()):
    """Compare CANDIDATE's outputs with ORIGINAL's on ONNX Runtime (optimizations off)."""
    from gcomp import io
    from gcomp.cli.providers import chosen_provider
    from gcomp.inputs import parse_input_shapes
    from gcomp.verify import TOLERANCES, Tolerance
    from gcomp.verify import verify as run_verify

    say = Say(quiet, verbose, json=as_json)
    provider, options = chosen_provider(provider, provider_option)
    io.load(original)
    io.load(candidate)
    say.step(f"read {original} and {candidate}")
    tolerances = None
    if rtol is not None or atol is not None:
        base = TOLERANCES["float32"]
        tolerances = {"float32": Tolerance(rtol if rtol is not None else base.rtol, atol if atol is not None else base.atol)}
    v = run_verify(original, candidate, inputs=inputs, input_shapes=parse_input_shapes(input_shapes),
                   tolerances=tolerances, max_tensor_bytes=max_tensor_bytes, timeout=verify_timeout,
                   provider=provider, provider_options=options)
    say.step(f"ran both models and compared {len(v.outputs)} output(s)")
    if as_json:
        click.echo(json.dumps(v.to_dict(), indent=2))
    elif quiet:
        click.echo(v.summary())
    else:
        _print_verification(v)
    say.done()
    if v.status == "failed":
        sys.exit(1)
    if v.status == "unverified" and strict:
        sys.exit(1)


def _print_verification(v) -> None:
    from dataclasses import asdict

    from rich.table import Table

    from gcomp.report.units import SIGNAL_HEADER, signal_cells, signal_measured

    out = stdout()
    if v.outputs:
        rows = [asdict(o) for o in v.outputs]
        signal = signal_measured(rows)  # a reduced-precision candidate: cosine, rel-l2, lost elements
        t = Table(title="outputs", title_justify="left")
        for col in ("output", "dtype", "shape", "max abs error", "max rel error", *(SIGNAL_HEADER if signal else ()),
                    "ok"):
            t.add_column(col)
        for o in rows:
            t.add_row(o["name"], o["dtype"], str(o["shape"]), f"{o['max_abs_error']:.3g}", f"{o['max_rel_error']:.3g}",
                      *(signal_cells(o) if signal else ()), "[green]yes[/]" if o["ok"] else "[red]NO[/]")
        out.print(t)
    for note in v.notes:
        out.print(f"note: {note}")
    out.print(v.summary())
