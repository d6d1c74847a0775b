"""``gcomp optimize``: run a verified pass pipeline over a model, and print what it did.

The command parses options into a :class:`gcomp.jobs.OptimizeRequest` and hands it to
:func:`gcomp.jobs.optimize_file`; this module only shows progress (a transient spinner
naming the current pass, on stderr; with ``-v`` a line per pass run) and prints the
summary tables on stdout. ``--config`` reads a recipe (:mod:`gcomp.cli.recipe`),
``--save-config`` writes one, and ``--dry-run`` prints the plan (:mod:`gcomp.cli.plan`)
instead of running it.
"""

from __future__ import annotations

__all__ = ["optimize"]

import json
from pathlib import Path

import click

from gcomp.backends.target_ops import TARGETS
from gcomp.cli.group import CONTEXT, PathIn, Say, cli, input_options, stderr, stdout, verbosity_options
from gcomp.cli.providers import provider_options
from gcomp.cli.recipe import config_option, recipe_of, save_recipe
from gcomp.errors import ModelLoadError, OptionError

# portable first, then the backend targets in their table's order
_TARGET_NAMES = ", ".join(sorted(TARGETS, key=lambda name: name != "portable"))


@cli.command(context_settings=CONTEXT)
@click.argument("model", type=PathIn)
@click.option("-o", "--output", type=click.Path(), required=True,
              help="Where to write the optimized model: a file, or a folder (one that exists, or a path ending in "
                   "'/', created) to write it into under MODEL's file name. MODEL a folder of models: a folder.")
@click.option("-O", "level", default=None, metavar="LEVEL",
              help="Pipeline level 0-3: 2 adds portable fusion, 3 the target's own fused ops (see `gcomp passes`). "
                   "[default: 1; 2 with --quantize, so fused ops are quantized as units]")
@click.option("--target", default=None, metavar="TARGET",
              help=f"What the output must run on: {_TARGET_NAMES} "
                   "[default: portable; ort-cpu with -O3 or --quantize]. Fusions fire only when it accepts their ops.")
@click.option("--target-opset", type=click.IntRange(min=1), default=None,
              help="Upgrade the model to this opset first, so newer fused ops (Gelu-20, Attention-23) may be emitted.")
@click.option("--explain-fusion", is_flag=True, help="List every fusion rule: fired, why not run, near misses.")
@click.option("--precision", type=click.Choice(["fp16", "bf16", "auto"]), default=None,
              help="Convert to mixed precision after the pipeline (auto: fp16 regions chosen by measuring); "
                   "verified in emulated fp16/bf16, every float output element-wise and by cosine and rel-l2 "
                   "(fp16/auto: >= 0.999, <= 0.01; bf16: >= 0.99, <= 0.05). More options: --set block_ops=..., "
                   "see `gcomp passes`.")
@click.option("--quantize", type=click.Choice(["int8", "int8-dynamic", "int8-weights", "int4"]), default=None,
              help="Quantize after the pipeline: int8 (static QDQ, calibrated: needs --calibration), "
                   "int8-dynamic (int8 weights, activations quantized at run time), "
                   "int8-weights / int4 (weight-only, block-wise). Kept only within the accuracy budget "
                   "(--metric, --tolerance) and where measured faster (weight-only: at most 10 % slower); "
                   "otherwise exit 1, nothing written.")
@click.option("--calibration", type=click.Path(path_type=Path), default=None,
              help="--quantize: samples to measure accuracy on: a folder of .npz files (one sample each) or "
                   "test_data_set_* folders, or one .npz with a leading sample axis; at least 8 samples.")
@click.option("--metric", type=click.Choice(["cosine", "rel-l2", "top1", "max-abs", "tokens"]), default=None,
              help="The measure --tolerance bounds per float output, against the float model: cosine (1 - cos), "
                   "rel-l2 (||a-e||/||e||), top1 (share of argmax changes), max-abs, tokens (decoders: top1 of the "
                   "token scores, with the margin where a token changed; KV-cache outputs reported, not bounded; "
                   "--tolerance 0: every token equal). --quantize: the accuracy "
                   "budget's one measure [default: cosine]. --precision: cosine or rel-l2 (the others keep their "
                   "defaults), or for auto max-abs [default for auto: max-abs].")
@click.option("--speed-gate/--no-speed-gate", default=True, show_default=True,
              help="--quantize: time float and quantized models and refuse a quantized model that is not faster "
                   "(weight-only: more than 10 % slower).")
@click.option("--tolerance", type=click.FloatRange(min=0), default=None,
              help="The largest --metric error allowed per float output (cosine: 1 - cos). --quantize: [default: "
                   "0.01]. --precision auto without --metric: max|a-e| / max(1, max|e|) [default: 0.01]. --precision "
                   "fp16/bf16: only with --metric cosine or rel-l2 (the element-wise check has fixed tolerances).")
@click.option("--keep-io-types/--no-keep-io-types", default=None,
              help="--precision: keep fp32 graph inputs and outputs. [default: keep]")
@click.option("--passes", "pass_spec", default=None, metavar="SPEC",
              help="Explicit pipeline instead of -O: comma-separated pipeline and pass names, e.g. O1,my-pass.")
@click.option("--set", "sets", multiple=True, metavar="OPTION=VALUE", help="Set a pass option (repeatable).")
@click.option("--plugin", "plugins", multiple=True, type=click.Path(path_type=Path),
              help="A Python file that registers extra passes (repeatable).")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Check outputs against the original on ONNX Runtime.")
@input_options(shape_help="Shape of a generated input for verification (repeatable); a dim name it fixes holds for "
                          "every generated input. The written model keeps its symbolic dims unless --static.")
@click.option("--static", is_flag=True,
              help="Fix every dim at the input shapes (--input-shape, the shapes of --inputs, and the dims they name "
                   "on other inputs): shape arithmetic folds away, every value gets int dims, verified at those "
                   "shapes. An input left with unknown dims is an error.")
@click.option("--bisect/--no-bisect", default=True, show_default=True, help="On a mismatch, name the first pass that broke it.")
@click.option("--strict", is_flag=True, help="Fail (exit 1, write nothing) when verification is not possible.")
@click.option("--external-data/--no-external-data", default=None,
              help="Write weights to OUTPUT.data. [default: when the input had external data or weights exceed 1 GiB]")
@click.option("--report", type=click.Path(path_type=Path), default=None,
              help="Write a report: .json, .md or .html (HTML adds per-pass errors and before/after profiles); "
                   "a format alone (html, md, json) writes OUTPUT's name .report.FORMAT beside the output.")
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
@provider_options(help="--backend auto: ONNX Runtime's candidate runs on this execution provider, as "
                       "onnxruntime.get_available_providers() spells it or short (cpu, cuda, tensorrt, openvino, "
                       "dml, coreml, rocm...; any case), one this build offers. A provider other than the CPU gets "
                       "CPUExecutionProvider after it as the fallback for the nodes it does not take. A GPU "
                       "provider on a machine without a GPU is an error; a session that cannot use the provider "
                       "is that candidate's failure, never a silent run on the CPU.")
@config_option
@click.option("--save-config", type=click.Path(path_type=Path), default=None, metavar="PATH",
              help="Write the options given (here and by --config) as a recipe (.toml or .json) for --config.")
@click.option("--dry-run", is_flag=True,
              help="Print the plan (passes in order with their options, settings, where it would write); "
                   "write no model or report.")
@verbosity_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout (implies --quiet).")
@click.pass_context
def optimize(ctx, model, output, level, target, target_opset, explain_fusion, pass_spec, sets, plugins, verify, inputs, input_shapes, max_tensor_bytes,
             verify_timeout, bisect, strict, external_data, report, quiet, as_json, profile_models=None,
             profile_iters=20, pass_errors=False, precision=None, tolerance=None, keep_io_types=None,
             select_backend=None, pass_latency=False, quantize=None, calibration=None, metric=None,
             speed_gate=True, static=False, verbose=False, config=None, save_config=None, dry_run=False,
             provider=None, provider_option=()):
    """Optimize MODEL with a verified pass pipeline and write OUTPUT.

    MODEL may be a folder of models (an optimum or Olive export): each .onnx model under
    it is optimized into the OUTPUT folder, the other files are copied, and one table
    sums up; a model that fails is named and not written, the others are (exit 1).
    """
    from gcomp.inputs import parse_input_shapes
    from gcomp.jobs import OptimizeRequest, VerificationFailed, optimize_file, output_file, report_file

    say = Say(quiet, verbose, json=as_json)
    quiet = quiet or as_json
    recipe = recipe_of(ctx)
    if recipe is not None:
        plugins, input_shapes = recipe.plugin_paths(plugins), recipe.shape_entries(input_shapes)
        say.step(f"read the recipe {recipe.path}")
    _load_plugins(plugins)
    pipeline = pass_spec or level or ("2" if quantize else "1")
    spec = _options_spec(pipeline, precision, quantize)
    given_sets = _parse_sets(spec, recipe.set_entries(ctx, spec, sets) if recipe is not None else sets)
    options = dict(given_sets)
    options.update(_fusion_options(target, target_opset, explain_fusion))
    options.update(_precision_options(precision, tolerance, keep_io_types, quantize, metric))
    _check_quantize_options(quantize, calibration, metric, speed_gate, precision, target)
    provider, provider_opts = _provider(provider, provider_option, select_backend)
    folder = model.is_dir()
    target, into_folder = (Path(output), True) if folder else output_file(model, output)
    request = OptimizeRequest(
        model=model, output=target, pipeline=pipeline, options=options, verify=verify, inputs=inputs,
        input_shapes=parse_input_shapes(input_shapes), max_tensor_bytes=max_tensor_bytes,
        verify_timeout=verify_timeout, bisect=bisect, strict=strict, external_data=external_data,
        report=report if folder else report_file(report, target),
        profile=profile_models, profile_iters=profile_iters, pass_errors=pass_errors, pass_latency=pass_latency,
        select_backend=bool(select_backend), quantize=quantize, calibration=calibration, metric=metric,
        speed_gate=speed_gate, static=static, create_folder=into_folder, provider=provider,
        provider_options=provider_opts,
    )
    if save_config is not None:
        _save_recipe(ctx, save_config, request, given_sets, plugins, quiet=quiet, folder=folder)
    if dry_run:
        _dry_run(request, folder)
        return
    if folder:
        from gcomp.cli.optimize_folder import optimize_folder

        optimize_folder(request, quiet=quiet, as_json=as_json, say=say)
        return
    err = stderr()
    with _PassProgress(quiet, err, say) as display:
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
        err.print(f"wrote {request.output}" + (f" and {request.report}" if request.report else ""), soft_wrap=True,
                  markup=False)
    say.done()


def _save_recipe(ctx, path: Path, request, sets: dict, plugins: tuple[Path, ...], *, quiet: bool,
                 folder: bool) -> None:
    """--save-config: the options given, once they make a plan (the checks of --dry-run)."""
    from gcomp.cli.plan import plan_lines

    plan_lines(request, folder=folder)
    save_recipe(path, ctx, model=request.model, output=request.output, sets=sets,
                input_shapes=request.input_shapes, plugins=plugins)
    if not quiet:
        stderr().print(f"wrote the recipe {path}", markup=False, soft_wrap=True)


def _dry_run(request, folder: bool) -> None:
    """Print the plan after the checks a run makes before any work (the model exists, the
    output and report can be written); nothing is read or written."""
    from gcomp import io
    from gcomp import report as reports
    from gcomp.cli.plan import plan_lines

    if not request.model.exists():
        raise ModelLoadError(f"{request.model}: no such file")
    if not folder and request.output.parent.is_dir():
        io.check_writable(request.output, source=request.model)
        if request.report is not None:
            reports.check_report_path(request.report)
    for line in plan_lines(request, folder=folder):
        click.echo(line)


def _load_plugins(plugins: tuple[Path, ...]) -> None:
    import importlib.util

    for i, path in enumerate(plugins):
        if not path.is_file():
            raise OptionError(f"--plugin {path}: no such file")
        spec = importlib.util.spec_from_file_location(f"gcomp_plugin_{i}_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - any failure in the user's file is one line
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


def _options_spec(pipeline: str, precision: str | None, quantize: str | None) -> str:
    """The pipeline spec whose passes' options ``--set`` may name."""
    spec = f"{pipeline},convert-precision" if precision else pipeline
    if quantize:
        from gcomp.quantize import MODES

        spec += f",{MODES[quantize][0]}"
    return spec


def _precision_options(precision, tolerance, keep_io_types, quantize, metric=None) -> dict:
    """--precision's options; --tolerance also bounds --quantize's budget and --metric names
    its measure there (gcomp.pipeline)."""
    options = {}
    if precision or keep_io_types is not None or (tolerance is not None and not quantize):
        from gcomp.passes.precision.mixed import cli_options

        serves_precision = tolerance if precision == "auto" or not quantize else None
        options.update(cli_options(precision, serves_precision, keep_io_types, None if quantize else metric))
    if tolerance is not None and quantize:
        options["tolerance"] = tolerance
    return options


def _check_quantize_options(quantize, calibration, metric, speed_gate=True, precision=None, target=None) -> None:
    """Option combinations refused before any work is done."""
    if not quantize:
        serves_precision = precision is not None  # --metric: the measure --tolerance bounds
        given = [o for o, v in (("--calibration", calibration), ("--metric", metric))
                 if v is not None and not (o == "--metric" and serves_precision)]
        if not speed_gate:
            given.append("--no-speed-gate")
        if given:
            raise OptionError(f"{given[0]} needs --quantize" + (" or --precision" if given[0] == "--metric" else ""))
        return
    if quantize == "int8" and calibration is None:
        raise OptionError("--quantize int8 calibrates activation ranges and needs real data: give --calibration PATH")
    if target is not None and target.startswith("tvm"):
        raise OptionError(f"--quantize: TVM targets ({target}) are not supported yet: use --target ort-cpu or portable")
    if precision in ("fp16", "bf16", "auto"):
        raise OptionError("--quantize and --precision cannot be combined: quantization works on float32 weights")


def _provider(provider, options: tuple[str, ...], select_backend) -> tuple[str | None, dict[str, str]]:
    """``--provider`` and its options, which only the backend choice uses."""
    from gcomp.cli.providers import chosen_provider

    if (provider is not None or options) and not select_backend:
        flag = "--provider" if provider is not None else "--provider-option"
        raise OptionError(f"{flag} applies to --backend auto (ONNX Runtime's candidate in the backend choice)")
    return chosen_provider(provider, options)


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


class _PassProgress:
    """A transient rich spinner naming the current pass (nothing when quiet).

    It starts on the first callback, after the model has loaded, so load errors print as
    one clean line; a later phase (profiling, backend choice) stops it and shows its own.
    """

    def __init__(self, quiet: bool, err, say: Say | None = None) -> None:
        self.quiet = quiet
        self.err = err
        self.say = say or Say(quiet)
        self.display = None
        self.task = None

    def __enter__(self) -> _PassProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def on_pass(self, name, round_, stats) -> None:
        if self.say.verbose:  # a line per pass run instead of the spinner
            self._line(name, round_, stats)
            return
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

    def _line(self, name, round_, stats) -> None:
        if stats is not None:
            change = f"{stats.nodes_before} → {stats.nodes_after} nodes" if stats.modified else "unchanged"
            self.say.step(f"pass {name} (round {round_}): {stats.seconds * 1e3:.1f} ms, {change}")
        elif not round_:  # a step of its own (verification), not the start of a pass
            self.say.step(name)

    def phase(self, text: str):
        self.stop()
        return self.say.progress(text)

    def stop(self) -> None:
        if self.display is not None:
            self.display.stop()
            self.display = None


def _print_notes(result, quiet: bool, err) -> None:
    """What loading the model changed (gcomp.io.load_notes), then verification's notes."""
    from gcomp import io

    if quiet:
        return
    for note in io.load_notes(result.model) + (result.verification.notes if result.verification else []):
        err.print(f"note: {note}", soft_wrap=True, markup=False)


def _print_outcome(outcome, *, explain_fusion: bool, precision: str | None) -> None:
    result, doc = outcome.result, outcome.doc
    _print_summary(result, doc)
    if explain_fusion:
        _print_fusion_explain(result)
    if precision:
        from gcomp.passes.precision.mixed import summary_lines

        for line in summary_lines(result):
            stdout().print(line, soft_wrap=True)
    if result.quantization is not None:
        from gcomp.quantize import summary

        for line in summary(result.quantization):
            stdout().print(line, soft_wrap=True, markup=False)
    for c in doc.get("backend_selection", {}).get("candidates", []):
        figure = f"p50 {c['p50_ms']:.3f} ms" if c["p50_ms"] is not None else c["error"]
        stdout().print(f"backend {'*' if c['chosen'] else ' '} {c['backend']}/{c['target']}: {c['status']}, "
                       f"{figure}", soft_wrap=True, markup=False)


def _print_summary(result, doc) -> None:
    """The before/after table, the unfolded-nodes line, the changing passes, a failure."""
    out = stdout()
    out.print(_changes_table(result, doc))
    folds = [p for p in result.passes if p.name == "fold-constants" and p.details]
    if folds and folds[-1].details.get("unfolded"):
        reasons = ", ".join(f"{k}: {n}" for k, n in folds[-1].details["unfolded_by_reason"].items())
        line = f"left unfolded: {folds[-1].details['unfolded']} node(s) ({reasons}); the report lists them"
        grow = folds[-1].details.get("unfolded_size_bytes", 0)
        if grow:
            from gcomp.report.units import human_bytes

            line += (f"; folding those held back by size would add at least {human_bytes(grow)} to the file "
                     "(--set max_fold_bytes=BYTES allows it)")
        out.print(line, soft_wrap=True)
    out.print(_passes_table(result))
    v = result.verification
    if v is not None and v.status == "failed":
        out.print(f"[red]{v.summary()}[/]")


def _changes_table(result, doc):
    """Counts before and after, the op types that changed, and the verification status."""
    from rich.table import Table

    from gcomp.report import bytes_change, file_size, human_bytes

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
                  bytes_change(before.initializer_bytes, after.initializer_bytes))
    if doc and doc.get("input") and doc.get("output"):
        size_in, size_out = file_size(doc["input"]), file_size(doc["output"])
        table.add_row("file size", human_bytes(size_in), human_bytes(size_out), bytes_change(size_in, size_out))
    speed = ((doc or {}).get("profiles") or {}).get("speed")
    if speed:  # the interleaved timing, worded by gcomp.report.speed's rule
        from gcomp.report.speed import headline

        table.add_row("latency (median ms)", f"{speed['before_ms_median']:.3f}", f"{speed['after_ms_median']:.3f}",
                      headline(speed))
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
    return table


def _passes_table(result):
    """One row per pass run that changed the model."""
    from rich.table import Table

    passes = Table(title="passes", title_justify="left")
    for col in ("pass", "round", "ms", "nodes", "op changes"):
        passes.add_column(col, justify="right" if col in ("round", "ms", "nodes") else "left")
    for p in result.passes:
        if p.modified:
            passes.add_row(p.name, str(p.round), f"{p.seconds * 1e3:.1f}", f"{p.nodes_before}→{p.nodes_after}",
                           ", ".join(f"{k} {v:+d}" for k, v in p.op_delta.items()) or "-")
    total_ms = sum(p.seconds for p in result.passes) * 1e3
    passes.caption = f"{len(result.passes)} pass runs in {total_ms:.1f} ms; unchanged runs not shown"
    return passes


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
        stdout().print("no fusion pass ran (use -O2 or -O3)")
        return
    table = Table(title="fusion rules", title_justify="left")
    for col in ("rule", "fired", "not run because", "near misses (check rejected)"):
        table.add_column(col, justify="right" if col == "fired" else "left", overflow="fold")
    for name, row in rules.items():
        near = "; ".join(row["near"][:3]) + (f" (+{len(row['near']) - 3} more)" if len(row["near"]) > 3 else "")
        table.add_row(name, str(row["fired"]), row["why"], near)
    stdout().print(table)
