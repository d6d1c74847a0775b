"""``gcomp optimize --dry-run``: the resolved plan, printed; nothing is read but the
recipe and plugins, nothing is written.

The plan is what :func:`gcomp.jobs.optimize_file` would be asked to do: pipeline, every
pass in order with the options it receives (as :func:`gcomp.pipeline.optimize` hands them
out: each option to every pass declaring it; the precision and quantization passes take
theirs, after the pipeline), target, precision and quantization settings, inputs and
input shapes, verification, and where the model and report would be written. The same
options give the same text, so a saved recipe (``--save-config``) loaded again with
``--config`` prints the same plan as the command line it came from.
"""

from __future__ import annotations

__all__ = ["plan_lines"]

import os
from typing import Any

from gcomp.errors import OptionError


def plan_lines(request, *, folder: bool) -> list[str]:
    """The plan of ``request`` (a :class:`gcomp.jobs.OptimizeRequest`), line by line."""
    from gcomp.pipeline import registry

    options = dict(request.options)
    precision = options.pop("precision", None)
    steps, target, quant_options = _steps(request, options, precision)
    lines = ["gcomp optimize: dry run, nothing written", *_where(request, folder)]
    label = ",".join(registry.canonical_name(p.strip()) for p in request.pipeline.split(","))
    lines.append(f"pipeline      {label}; target {target or 'portable'}; target opset "
                 f"{options.get('target_opset', 'as the model declares')}")
    lines.append("passes, in order (with the options each receives; the others at their defaults):")
    for i, (head, passes) in enumerate(steps, 1):
        lines.append(f"  {i:2d}. {head}")
        lines += [f"        {text}" for text in passes]
    lines.append("precision     " + (_precision(precision, request.options) if precision else "float32 kept"))
    lines.append("quantization  " + (_quantization(request, quant_options) if request.quantize else "none"))
    lines += _checks(request)
    return lines


def _where(request, folder: bool) -> list[str]:
    if folder:
        models = sorted(p.relative_to(request.model) for p in request.model.rglob("*.onnx")
                        if not any(part.startswith(".") for part in p.relative_to(request.model).parts))
        names = ", ".join(map(str, models[:8])) + (f" (+{len(models) - 8} more)" if len(models) > 8 else "")
        return [f"model         {request.model} (a folder: {len(models)} model(s): {names or 'none'})",
                f"output        {request.output} (each model at its relative path; other files copied)",
                f"report        {_report_text(request.report, folder=True)}"]
    made = " (folder created)" if request.create_folder and not request.output.parent.is_dir() else ""
    return [f"model         {request.model}", f"output        {request.output}{made}",
            f"report        {_report_text(request.report, folder=False)}"]


def _report_text(report, *, folder: bool) -> str:
    if report is None:
        return "none"
    return f"{report} beside each output" if folder else os.fspath(report)


def _steps(request, options: dict[str, Any], precision: str | None) -> tuple[list, str | None, dict]:
    """The steps in order, the fusion target, and the quantization pass's options."""
    from gcomp.passes.pipelines import TARGET_FUSE
    from gcomp.pipeline import DEFAULT_FUSION_TARGET, registry

    stages = registry.resolve(request.pipeline)
    if "target" not in options and any("fuse-target" in s.passes for s in stages):
        options["target"] = DEFAULT_FUSION_TARGET  # O3 without --target fuses for ONNX Runtime on the CPU
    quant_options: dict[str, Any] = {}
    quant = None
    if request.quantize:  # the options routed as optimize routes them (gcomp.quantize_plan)
        from gcomp import quantize_plan
        from gcomp.quantize import MODES

        quant = quantize_plan.plan(request.quantize, None, request.metric, True, options, precision,
                                   request.pipeline)
        quant_options = dict(MODES[request.quantize][1], **quant.options, target=quant.target)
    precision_options = {}
    if precision:
        declared = {o.name for o in registry.get_pass("convert-precision").options}
        precision_options = {"precision": precision, **{k: options.pop(k) for k in list(options) if k in declared}}
    steps = [_stage(stage, options, registry) for stage in stages]
    _refuse_unused(request.pipeline, options, registry)
    if precision:
        steps.append((_named("convert-precision", precision_options), []))
    if quant is not None:
        if quantize_plan.needs_target_fusion(quant, request.pipeline):
            steps.append(_stage(TARGET_FUSE, {"target": quant.target}, registry))
        steps.append((_named(MODES[request.quantize][0], quant_options) + ", kept within the accuracy budget", []))
    if request.static:
        steps.insert(0, ("static-shapes (every dim fixed at the input shapes)", []))
        steps.append(("static-shapes (again: every value made since gets its dims)", []))
    return steps, options.get("target") or quant_options.get("target"), quant_options


def _stage(stage, options: dict[str, Any], registry) -> tuple[str, list[str]]:
    """A stage as its head line and one line per pass (a stage of one pass: one line)."""
    names = [_named(name, {o.name: options[o.name] for o in registry.get_pass(name).options if o.name in options})
             for name in stage.passes]
    if stage.repeat > 1:
        return f"repeated until nothing changes, at most {stage.repeat} rounds:", names
    return (names[0], []) if len(names) == 1 else ("in order:", names)


def _named(name: str, options: dict[str, Any]) -> str:
    return name + (f" ({', '.join(f'{k}={_shown(v)}' for k, v in options.items())})" if options else "")


def _shown(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def _refuse_unused(pipeline: str, options: dict[str, Any], registry) -> None:
    """An option no pass of the pipeline takes: the error the run would give."""
    declared = registry.pipeline_options(pipeline)
    unused = sorted(k for k in options if k not in declared)
    if unused:
        raise OptionError(f"unknown option(s) {', '.join(unused)} for this pipeline"
                          + (f" (options: {', '.join(sorted(declared))})" if declared
                             else " (its passes take no options)"))


def _precision(precision: str, options: dict[str, Any]) -> str:
    keep = options.get("keep_io_types", True)
    return f"{precision}; fp32 inputs and outputs {'kept' if keep else 'converted too'}"


def _quantization(request, options: dict[str, Any]) -> str:
    tolerance = request.options.get("tolerance", 0.01)
    calibration = request.calibration or (f"--inputs {request.inputs}" if request.inputs else "generated samples")
    gate = "on" if request.speed_gate else "off"
    return (f"{request.quantize} for {options.get('target')}; budget {request.metric or 'cosine'} within "
            f"{tolerance} per output, measured on {calibration}; speed gate {gate}")


def _checks(request) -> list[str]:
    from gcomp.report import human_bytes

    shapes = ", ".join(f"{k}={','.join(map(str, v))}" for k, v in (request.input_shapes or {}).items())
    lines = [f"inputs        {request.inputs or 'generated (seeded)'}",
             f"input shapes  {shapes or 'as the model declares; free dims at gcomp defaults'}",
             f"static        {'yes: every dim fixed at the input shapes' if request.static else 'no'}"]
    if request.verify:
        limit = human_bytes(request.max_tensor_bytes) if request.max_tensor_bytes else "default"
        lines.append(f"verification  on ONNX Runtime, optimizations off; bisect {_on(request.bisect)}; strict "
                     f"{_on(request.strict)}; timeout {request.verify_timeout or 300:g} s; tensors up to {limit}")
    else:
        lines.append("verification  off")
    external = {None: "when the input had it or weights exceed 1 GiB", True: "yes", False: "no"}
    lines.append(f"external data {external[request.external_data]}")
    from gcomp.jobs import report_format

    html = request.html or (request.report is not None and report_format(request.report) == "html")
    profile = request.profile if request.profile is not None else html
    lines.append(f"measurements  profiles {_on(profile)} ({request.profile_iters} runs each); per-pass errors "
                 f"{_on(request.pass_errors or html)}; per-pass latency {_on(request.pass_latency or html)}; "
                 f"backend choice {_on(request.select_backend)}"
                 + (f" (ONNX Runtime on {_provider_text(request)})" if request.provider else ""))
    return lines


def _provider_text(request) -> str:
    options = ", ".join(f"{k}={v}" for k, v in request.provider_options.items())
    return request.provider + (f" with {options}" if options else "")


def _on(flag: bool) -> str:
    return "on" if flag else "off"
