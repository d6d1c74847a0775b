"""The ``gcomp`` command line.

Every error a user can cause prints one line, ``gcomp: error: ...``, and exits
non-zero (2 for usage/option errors, 1 otherwise); ``--debug`` shows tracebacks.
Tables and summaries go to stdout, progress to stderr.
"""

from __future__ import annotations

__all__ = ["main", "cli"]

import json
import sys
from pathlib import Path

import click

from gcomp import __version__
from gcomp.errors import GcompError, OptionError, first_line

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
PathIn = click.Path(path_type=Path)  # existence is checked by gcomp.io with a clearer message


def _stdout():
    from rich.console import Console

    return Console(highlight=False)


def _stderr():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="gcomp")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def cli(debug: bool) -> None:
    """gcomp: a graph-optimizing compiler toolchain for ONNX models.

    Optimize with verified passes, inspect, verify and profile models.
    """


def _input_options(f):
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
        help="Shape of a generated input (repeatable); also fixes its symbolic dims everywhere.",
    )(f)
    f = click.option(
        "--inputs", "inputs", type=click.Path(path_type=Path), default=None,
        help="Inputs: an .npz file or an ONNX test_data_set folder of input_*.pb.",
    )(f)
    return f


def _load_plugins(plugins: tuple[Path, ...]) -> None:
    import importlib.util

    for i, path in enumerate(plugins):
        if not path.is_file():
            raise OptionError(f"--plugin {path}: no such file")
        spec = importlib.util.spec_from_file_location(f"gcomp_plugin_{i}_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise OptionError(f"--plugin {path}: failed to import: {e}") from None


def _parse_sets(pipeline, sets: tuple[str, ...]) -> dict:
    from gcomp.pipeline import registry  # the pipeline module loads the built-in passes

    declared = registry.pipeline_options(pipeline)
    options = {}
    for item in sets:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise OptionError(f"--set '{item}': expected OPTION=VALUE")
        if key not in declared:
            known = ", ".join(sorted(declared)) or "none"
            raise OptionError(f"--set {key}: no pass in this pipeline has that option (options: {known})")
        options[key] = declared[key].parse(value)
    return options


@cli.command(context_settings=CONTEXT)
@click.argument("model", type=PathIn)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Where to write the optimized model.")
@click.option("-O", "level", default="1", show_default=True, metavar="LEVEL",
              help="Pipeline level 0-3: 2 adds portable fusion, 3 the target's own fused ops (see `gcomp passes`).")
@click.option("--target", default=None, metavar="TARGET",
              help="What the output must run on: portable, ort-cpu, ort-cuda, tvm-llvm, tvm-cuda "
                   "[default: portable; ort-cpu with -O3]. Fusions fire only when it accepts their ops.")
@click.option("--target-opset", type=click.IntRange(min=1), default=None,
              help="Upgrade the model to this opset first, so newer fused ops (Gelu-20, Attention-23) may be emitted.")
@click.option("--explain-fusion", is_flag=True, help="List every fusion rule: fired, why not run, near misses.")
@click.option("--precision", type=click.Choice(["fp16", "bf16", "auto"]), default=None,
              help="Convert to mixed precision after the pipeline (auto: fp16 regions within --tolerance); "
                   "verified in emulated fp16/bf16. More options: --set block_ops=..., see `gcomp passes`.")
@click.option("--tolerance", type=click.FloatRange(min=0, min_open=True), default=None,
              help="--precision auto: largest error allowed, max|a-e| / max(1, max|e|) per output. [default: 0.01]")
@click.option("--keep-io-types/--no-keep-io-types", default=None,
              help="--precision: keep fp32 graph inputs and outputs. [default: keep]")
@click.option("--passes", "pass_spec", default=None, metavar="SPEC",
              help="Explicit pipeline instead of -O: comma-separated pipeline and pass names, e.g. O1,my-pass.")
@click.option("--set", "sets", multiple=True, metavar="OPTION=VALUE", help="Set a pass option (repeatable).")
@click.option("--plugin", "plugins", multiple=True, type=click.Path(path_type=Path),
              help="A Python file that registers extra passes (repeatable).")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Check outputs against the original on ONNX Runtime.")
@_input_options
@click.option("--bisect/--no-bisect", default=True, show_default=True, help="On a mismatch, name the first pass that broke it.")
@click.option("--strict", is_flag=True, help="Fail (exit 1, write nothing) when verification is not possible.")
@click.option("--external-data/--no-external-data", default=None,
              help="Write weights to OUTPUT.data. [default: when the input had external data or weights exceed 1 GiB]")
@click.option("--report", type=click.Path(path_type=Path), default=None,
              help="Write a report: .json, .md or .html (HTML adds per-pass errors and before/after profiles).")
@click.option("--profile/--no-profile", "profile_models", default=None,
              help="Profile the model before and after on ONNX Runtime for the report. [default: with --report .html]")
@click.option("--profile-iters", type=click.IntRange(min=1), default=20, show_default=True,
              help="Timed runs of each before/after profile.")
@click.option("--pass-errors", is_flag=True,
              help="Measure the output error after every changing pass (on with --report .html).")
@click.option("--pass-latency", is_flag=True,
              help="Time the model on ONNX Runtime after every changing pass (on with --report .html).")
@click.option("--backend", "select_backend", type=click.Choice(["auto"]), default=None,
              help="Then compile the output on every available backend, check and time each, and report "
                   "the fastest that matches (every candidate's figures go into the report).")
@click.option("-q", "--quiet", is_flag=True, help="No progress or tables; errors only.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout (implies --quiet).")
def optimize(model, output, level, target, target_opset, explain_fusion, pass_spec, sets, plugins, verify, inputs, input_shapes, max_tensor_bytes,
             verify_timeout, bisect, strict, external_data, report, quiet, as_json, profile_models=None,
             profile_iters=20, pass_errors=False, precision=None, tolerance=None, keep_io_types=None,
             select_backend=None, pass_latency=False):
    """Optimize MODEL with a verified pass pipeline and write OUTPUT."""
    from gcomp.inputs import parse_input_shapes
    from gcomp.jobs import OptimizeRequest, VerificationFailed, optimize_file

    quiet = quiet or as_json
    _load_plugins(plugins)
    pipeline = pass_spec or level
    options = _parse_sets(f"{pipeline},convert-precision" if precision else pipeline, sets)
    options.update(_fusion_options(target, target_opset, explain_fusion))
    if precision or tolerance is not None or keep_io_types is not None:
        from gcomp.passes.precision.mixed import cli_options

        options.update(cli_options(precision, tolerance, keep_io_types))
    request = OptimizeRequest(
        model=model, output=output, pipeline=pipeline, options=options, verify=verify, inputs=inputs,
        input_shapes=parse_input_shapes(input_shapes), max_tensor_bytes=max_tensor_bytes,
        verify_timeout=verify_timeout, bisect=bisect, strict=strict, external_data=external_data, report=report,
        profile=profile_models, profile_iters=profile_iters, pass_errors=pass_errors, pass_latency=pass_latency,
        select_backend=bool(select_backend),
    )
    err = _stderr()
    with _PassProgress(quiet, err) as display:
        try:
            outcome = optimize_file(request, progress=display.on_pass, phase=display.phase)
        except VerificationFailed as e:
            display.stop()
            _print_notes(e.result, quiet, err)
            if not quiet:
                _print_summary(e.result, None)
            raise
    _print_notes(outcome.result, quiet, err)
    for warning in outcome.warnings:
        err.print(f"[yellow]warning:[/] {warning}", soft_wrap=True)
    if as_json:
        click.echo(json.dumps(outcome.doc, indent=2, default=str))
    elif not quiet:
        _print_outcome(outcome, explain_fusion=explain_fusion, precision=precision)
        err.print(f"wrote {output}" + (f" and {report}" if report else ""))


def _print_notes(result, quiet: bool, err) -> None:
    if result.verification is not None and not quiet:
        for note in result.verification.notes:
            err.print(f"note: {note}", soft_wrap=True)


def _print_outcome(outcome, *, explain_fusion: bool, precision: str | None) -> None:
    result, doc = outcome.result, outcome.doc
    _print_summary(result, doc)
    if explain_fusion:
        _print_fusion_explain(result)
    if precision:
        from gcomp.passes.precision.mixed import summary_lines

        for line in summary_lines(result):
            _stdout().print(line, soft_wrap=True)
    for c in doc.get("backend_selection", {}).get("candidates", []):
        figure = f"p50 {c['p50_ms']:.3f} ms" if c["p50_ms"] is not None else c["error"]
        _stdout().print(f"backend {'*' if c['chosen'] else ' '} {c['backend']}/{c['target']}: {c['status']}, "
                        f"{figure}", soft_wrap=True)


def _fusion_options(target, target_opset, explain_fusion) -> dict:
    options = {}
    if target is not None:
        from gcomp.backends import capabilities

        options["target"] = capabilities(target).name  # an unknown name is a one-line error
    if target_opset is not None:
        options["target_opset"] = target_opset
    if explain_fusion:
        options["explain_fusion"] = True
    return options


def _print_fusion_explain(result) -> None:
    """One table row per fusion rule, summed over the pipeline's fusion pass runs."""
    from rich.table import Table

    rules: dict[str, dict] = {}
    for s in result.passes:
        for name, info in ((s.details or {}).get("rules") or {}).items():
            row = rules.setdefault(name, {"fired": 0, "why": "", "near": []})
            row["fired"] += info.get("fired", 0)
            row["why"] = info.get("not_run", row["why"])
            row["near"] = info.get("near_misses", row["near"])
    if not rules:
        _stdout().print("no fusion pass ran (use -O2 or -O3)")
        return
    table = Table(title="fusion rules", title_justify="left")
    for col in ("rule", "fired", "not run because", "near misses (check rejected)"):
        table.add_column(col, justify="right" if col == "fired" else "left", overflow="fold")
    for name, row in rules.items():
        near = "; ".join(row["near"][:3]) + (f" (+{len(row['near']) - 3} more)" if len(row["near"]) > 3 else "")
        table.add_row(name, str(row["fired"]), row["why"], near)
    _stdout().print(table)


class _PassProgress:
    """A transient rich spinner naming the current pass (nothing when quiet).

    It starts on the first callback, after the model has loaded, so load errors print as
    one clean line; a later phase (profiling, backend choice) stops it and shows its own.
    """

    def __init__(self, quiet: bool, err) -> None:
        self.quiet = quiet
        self.err = err
        self.display = None
        self.task = None

    def __enter__(self) -> _PassProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def on_pass(self, name, round_, stats) -> None:
        if self.quiet:
            return
        if self.display is None:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.display = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                    console=self.err, transient=True)
            self.display.start()
            self.task = self.display.add_task("", total=None)
        if stats is None:
            text = f"pass [bold]{name}[/] (round {round_})" if round_ else name
            self.display.update(self.task, description=text)

    def phase(self, text: str):
        from gcomp.profiling import spinner

        self.stop()
        return spinner(text, quiet=self.quiet)

    def stop(self) -> None:
        if self.display is not None:
            self.display.stop()
            self.display = None


def _print_summary(result, doc) -> None:
    from rich.table import Table

    from gcomp.report import human_bytes

    out = _stdout()
    before, after = result.before, result.after
    table = Table(title=f"gcomp optimize — pipeline {result.pipeline}", title_justify="left")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    table.add_row("nodes", str(before.nodes), str(after.nodes), f"{after.nodes - before.nodes:+d}")
    table.add_row("initializers", str(before.initializers), str(after.initializers),
                  f"{after.initializers - before.initializers:+d}")
    table.add_row("initializer bytes", human_bytes(before.initializer_bytes), human_bytes(after.initializer_bytes),
                  f"{after.initializer_bytes - before.initializer_bytes:+d}")
    if doc and doc.get("input") and doc.get("output"):
        table.add_row("file size", human_bytes(doc["input"]["file_bytes"]), human_bytes(doc["output"]["file_bytes"]), "")
    ops = sorted(set(before.op_types) | set(after.op_types))
    for op in ops:
        b, a = before.op_types.get(op, 0), after.op_types.get(op, 0)
        if a != b:
            table.add_row(f"  {op}", str(b), str(a), f"{a - b:+d}")
    v = result.verification
    if v is None:
        table.add_row("verification", "", "skipped", "")
    elif v.status == "passed":
        table.add_row("verification", "", "[green]passed[/]", f"max abs err {v.max_abs_error:.2g}")
    elif v.status == "unverified":
        table.add_row("verification", "", "[yellow]not possible[/]", "")
    else:
        table.add_row("verification", "", "[red]FAILED[/]", v.first_bad_pass or "")
    out.print(table)
    passes = Table(title="passes", title_justify="left")
    for col in ("pass", "round", "ms", "nodes", "op changes"):
        passes.add_column(col, justify="right" if col in ("round", "ms", "nodes") else "left")
    for p in result.passes:
        if p.modified:
            passes.add_row(p.name, str(p.round), f"{p.seconds * 1e3:.1f}", f"{p.nodes_before}→{p.nodes_after}",
                           ", ".join(f"{k} {v:+d}" for k, v in p.op_delta.items()) or "-")
    folds = [p for p in result.passes if p.name == "fold-constants" and p.details]
    if folds and folds[-1].details.get("unfolded"):
        reasons = ", ".join(f"{k}: {n}" for k, n in folds[-1].details["unfolded_by_reason"].items())
        out.print(f"left unfolded: {folds[-1].details['unfolded']} node(s) ({reasons}); the report lists them")
    total_ms = sum(p.seconds for p in result.passes) * 1e3
    passes.caption = f"{len(result.passes)} pass runs in {total_ms:.1f} ms; unchanged runs not shown"
    out.print(passes)
    if v is not None and v.status == "failed":
        out.print(f"[red]{v.summary()}[/]")


@cli.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def passes(as_json):
    """List the registered passes, their options, and the pipelines."""
    from gcomp.pipeline import registry  # the pipeline module loads the built-in passes

    ps, pls = registry.passes(), registry.pipelines()
    if as_json:
        click.echo(json.dumps({
            "pipelines": {n: {"summary": p.summary, "stages": [{"passes": list(s.passes), "repeat": s.repeat} for s in p.stages]} for n, p in pls.items()},
            "passes": {n: {"summary": p.summary, "options": [{"name": o.name, "type": o.type.__name__, "default": o.default, "help": o.help} for o in p.options]} for n, p in ps.items()},
        }, indent=2, default=str))
        return
    from rich.table import Table

    out = _stdout()
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
    for name in sorted(ps):
        p = ps[name]
        opts = "\n".join(f"{o.name}: {o.type.__name__} = {o.default!r} — {o.help}" for o in p.options) or "-"
        t.add_row(name, p.summary, opts)
    out.print(t)


@cli.command(context_settings=CONTEXT)
@click.argument("model", type=PathIn)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(model, as_json):
    """Print MODEL's opsets, inputs/outputs, op histogram and parameter bytes."""
    import onnx_ir as ir

    from gcomp import io
    from gcomp.report import human_bytes
    from gcomp.perf import model_stats

    m = io.load(model)
    stats = model_stats(m)

    def describe(v):
        t = v.type
        dtype = t.dtype.name if isinstance(t, ir.TensorType) else str(t)
        shape = [d if isinstance(d, int) else (d.value or "?") for d in v.shape] if v.shape is not None else None
        return {"name": v.name, "dtype": dtype, "shape": shape}

    info = {
        "path": str(model),
        "file_bytes": Path(model).stat().st_size,
        "ir_version": m.ir_version,
        "producer": f"{m.producer_name or ''} {m.producer_version or ''}".strip(),
        "opsets": dict(m.opset_imports),
        "inputs": [describe(v) for v in m.graph.inputs if v.const_value is None],
        "outputs": [describe(v) for v in m.graph.outputs],
        "external_data": sorted({str(t.location) for t in io.external_tensors(m)}),
        **stats.to_dict(),
    }
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    from rich.table import Table

    out = _stdout()
    out.print(f"[bold]{model}[/]  ir_version {m.ir_version}  producer {info['producer'] or '-'}  "
              f"file {human_bytes(info['file_bytes'])}")
    out.print("opsets: " + ", ".join(f"{d or 'ai.onnx'}={v}" for d, v in info["opsets"].items()))
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
    out.print(f"parameters: {stats.parameters:,} in {stats.initializers} initializers, "
              f"{human_bytes(stats.initializer_bytes)}" + (f"; external data: {', '.join(info['external_data'])}" if info["external_data"] else ""))


@cli.command(context_settings=CONTEXT)
@click.argument("original", type=PathIn)
@click.argument("candidate", type=PathIn)
@_input_options
@click.option("--rtol", type=float, default=None, help="Relative tolerance for float32 outputs.")
@click.option("--atol", type=float, default=None, help="Absolute tolerance for float32 outputs.")
@click.option("--strict", is_flag=True, help="Exit 1 when verification is not possible.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def verify(original, candidate, inputs, input_shapes, max_tensor_bytes, verify_timeout, rtol, atol, strict, as_json):
    """Compare CANDIDATE's outputs with ORIGINAL's on ONNX Runtime (optimizations off)."""
    from gcomp import io
    from gcomp.inputs import parse_input_shapes
    from gcomp.verify import TOLERANCES, Tolerance
    from gcomp.verify import verify as run_verify

    io.load(original)
    io.load(candidate)
    tolerances = None
    if rtol is not None or atol is not None:
        base = TOLERANCES["float32"]
        tolerances = {"float32": Tolerance(rtol if rtol is not None else base.rtol, atol if atol is not None else base.atol)}
    v = run_verify(original, candidate, inputs=inputs, input_shapes=parse_input_shapes(input_shapes),
                   tolerances=tolerances, max_tensor_bytes=max_tensor_bytes, timeout=verify_timeout)
    if as_json:
        click.echo(json.dumps(v.to_dict(), indent=2))
    else:
        from rich.table import Table

        out = _stdout()
        if v.outputs:
            t = Table(title="outputs", title_justify="left")
            for col in ("output", "dtype", "shape", "max abs error", "max rel error", "ok"):
                t.add_column(col)
            for o in v.outputs:
                t.add_row(o.name, o.dtype, str(o.shape), f"{o.max_abs_error:.3g}", f"{o.max_rel_error:.3g}",
                          "[green]yes[/]" if o.ok else "[red]NO[/]")
            out.print(t)
        for note in v.notes:
            out.print(f"note: {note}")
        out.print(v.summary())
    if v.status == "failed":
        sys.exit(1)
    if v.status == "unverified" and strict:
        sys.exit(1)


@cli.command(context_settings=CONTEXT)
@click.argument("model", type=PathIn)
@click.option("--backend", type=click.Choice(["ort", "tvm", "auto"]), default="ort", show_default=True,
              help="Runtime to profile on; auto: the fastest that matches the reference (all are recorded).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--iters", type=click.IntRange(min=1), default=50, show_default=True, help="Timed runs.")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Untimed runs first.")
@click.option("--optimization", type=click.Choice(["disable", "basic", "extended", "all"]), default="all",
              show_default=True, help="ONNX Runtime graph optimization level.")
@click.option("--threads", type=click.IntRange(min=0), default=0, help="Intra-op threads (0: runtime default).")
@_input_options
@click.option("--top", type=click.IntRange(min=1), default=15, show_default=True, help="Ops to list.")
@click.option("--report", type=click.Path(path_type=Path), default=None,
              help="Write the profile: .json, .md or .html (a self-contained page with charts).")
@click.option("--trace", type=click.Path(path_type=Path), default=None,
              help="Write one profiled run as a Chrome/Perfetto trace (.json).")
@click.option("-q", "--quiet", is_flag=True, help="No progress or tables; errors only.")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON on stdout (implies --quiet).")
def profile(model, backend, device, iters, warmup, optimization, threads, inputs, input_shapes, max_tensor_bytes,
            verify_timeout, top, report, as_json, trace=None, quiet=False):
    """Measure MODEL's latency and per-op times on a backend.

    Each op row gets its FLOPs, bytes moved, achieved GFLOP/s and GB/s, and whether it is
    compute- or memory-bound on this machine's roofline.
    """
    from gcomp import io
    from gcomp import report as reports
    from gcomp.inputs import generate_inputs, load_inputs, parse_input_shapes
    from gcomp.profiling import finish_profile, print_profile, spinner, write_outputs

    quiet = quiet or as_json
    if report is not None:
        reports.check_report_path(report)
    if trace is not None:
        reports.check_report_path(trace, option="--trace", formats=(".json",))
    m = io.load(model)
    given = load_inputs(inputs, m) if inputs else None
    feeds, notes = generate_inputs(m, shapes=parse_input_shapes(input_shapes), given=given, max_bytes=max_tensor_bytes)
    with spinner(f"compiling for {backend}/{device}", quiet=quiet) as status:
        from gcomp.autoselect import compile_for_profile

        exe, selection = compile_for_profile(backend, device, model, m, feeds, optimization=optimization,
                                             threads=threads or None, progress=status)
        if selection is not None:
            backend, device = selection.chosen.backend, selection.chosen.target
        status(f"profiling on {backend}/{device}: {warmup} warm-up + {iters} timed runs, then per-op times")
        prof = exe.profile(feeds, iters=iters, warmup=warmup)
        prof = finish_profile(prof, m, feeds, path=model, status=status)
    doc = prof.to_dict()
    if selection is not None:
        doc["backend_selection"] = selection.to_dict()
    written = write_outputs(doc, report=report, trace=trace)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    if quiet:
        return
    out = _stdout()
    for note in notes:
        out.print(f"note: {note}")
    print_profile(prof, title=f"{model} on {backend}/{device} ({optimization} optimizations)", top=top, console=out)
    for c in (selection.candidates if selection is not None else []):
        figure = f"p50 {c.p50_ms:.3f} ms" if c.p50_ms is not None else c.error
        out.print(f"backend {'*' if c.chosen else ' '} {c.backend}/{c.target}: {c.status}, {figure}", soft_wrap=True)
    if written:
        _stderr().print("wrote " + " and ".join(str(p) for p in written))


@cli.command("compile", context_settings=CONTEXT)
@click.argument("model", type=PathIn)
@click.option("--backend", type=click.Choice(["tvm", "ort", "auto"]), default="tvm", show_default=True,
              help="Backend to compile for; auto: the fastest that matches the reference.")
@click.option("--target", default="llvm", show_default=True,
              help="tvm: llvm (this CPU, its real features) or cuda; ort: cpu or cuda.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Artifact: a folder (tvm: model.so + gcomp-tvm.json) or an .onnx file (ort).")
@click.option("--tune-trials", type=click.IntRange(min=0), default=0, show_default=True,
              help="MetaSchedule trials split over the model's kernels (tvm); each kernel gets only the "
                   "trials the tuning database has not given it yet, so a repeat makes none.")
@click.option("--tune-minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop tuning after this many minutes (finished kernels are kept).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Tuning database root. [default: $GCOMP_CACHE_DIR or ~/.cache/gcomp]")
@click.option("--inputs", "inputs", type=click.Path(path_type=Path), default=None,
              help="Inputs: an .npz file or an ONNX test_data_set folder of input_*.pb.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=D1,D2,...",
              help="Shape to compile for (repeatable); symbolic dims are bound to it.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check the executable's outputs against ONNX Runtime before writing.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def compile_(model, backend, target, output, tune_trials, tune_minutes, cache_dir, inputs, input_shapes, verify,
             as_json):
    """Compile MODEL for a backend (tuning it with --tune-trials) and export the artifact."""
    from gcomp.autoselect import compile_model
    from gcomp.inputs import parse_input_shapes
    from gcomp.profiling import spinner

    if backend == "ort" and target == "llvm":
        target = "cpu"
    with spinner(f"compiling for {backend}/{target}", quiet=as_json) as status:
        doc = compile_model(model, backend=backend, target=target, output=output,
                            input_shapes=parse_input_shapes(input_shapes), inputs=inputs, tune_trials=tune_trials,
                            tune_seconds=tune_minutes * 60 if tune_minutes else None, cache_dir=cache_dir,
                            verify=verify, progress=status)
    if as_json:
        click.echo(json.dumps(doc, indent=2, default=str))
        return
    out = _stdout()
    for note in doc["notes"]:
        out.print(f"note: {note}")
    if doc["selection"]:
        for c in doc["selection"]["candidates"]:
            figure = f"p50 {c['p50_ms']:.3f} ms" if c["p50_ms"] is not None else c["error"]
            out.print(f"  {'*' if c['chosen'] else ' '} {c['backend']}/{c['target']}: {c['status']}, {figure}")
    t = doc["tuning"]
    if t:
        out.print(f"tuning: {t['tasks']} kernels, {t['reused']} from the database, {t['tuned']} tuned with "
                  f"{t['trials']} trials in {t['seconds']:.1f} s, {t['skipped']} left untuned"
                  + (" (interrupted)" if t["interrupted"] else "") + f"; database {t['database']}")
    v = doc["verification"]
    out.print(f"compiled for {doc['backend']}/{doc['target']} in {doc['compile_seconds']:.1f} s; verification "
              + (f"{v['status']} (max abs error {v['max_abs_error']:.2g})" if "max_abs_error" in v else v["status"]))
    if doc["output"]:
        _stderr().print(f"wrote {doc['output']}")


@cli.command(context_settings=CONTEXT)
@click.argument("profiles", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Where to write the comparison: .html, .md or .json.")
@click.option("--label", "labels", multiple=True, help="A name per profile, in order (repeatable).")
def report(profiles, output, labels):
    """Compare saved profiles (gcomp profile --report x.json) in one report.

    E.g. two backends, two versions of a model, before/after an optimization; the first
    profile is the baseline. An optimize report with profiles counts as its two profiles.
    """
    from gcomp import report as reports
    from gcomp.profiling import load_profiles

    reports.check_report_path(output, option="--output")
    docs = load_profiles(list(profiles))
    if labels and len(labels) != len(docs):
        raise OptionError(f"--label given {len(labels)} times for {len(docs)} profiles")
    reports.write_report(reports.compare_document(docs, list(labels) or None), output)
    _stderr().print(f"wrote {output}")


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
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def run(model, ranks, shard, inputs, input_shapes, outputs, check, tolerance, simulate, hostfile, mpi_args, threads,
        as_json):
    """Run MODEL split over RANKS (MPI processes, or simulated in one process)."""
    from gcomp.distributed.launch import run_command

    params = {"model": str(model), "ranks": ranks, "shard": shard, "inputs": str(inputs) if inputs else None,
              "input_shapes": list(input_shapes), "outputs": str(outputs) if outputs else None, "check": check,
              "tolerance": tolerance, "simulate": simulate, "hostfile": str(hostfile) if hostfile else None,
              "mpi_args": list(mpi_args), "threads": threads, "json": as_json}
    sys.exit(run_command(params, echo=click.echo))


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
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def shard(model, output, shard, overrides, input_shapes, ranks_dir, as_json):
    """Annotate MODEL with IR v11 sharding specs for a mesh; print memory and collectives per rank."""
    from gcomp.distributed.launch import shard_command

    params = {"model": str(model), "output": str(output), "shard": shard, "overrides": list(overrides),
              "input_shapes": list(input_shapes), "ranks_dir": str(ranks_dir) if ranks_dir else None,
              "json": as_json}
    sys.exit(shard_command(params, echo=click.echo))


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
