"""Running a pipeline of passes over a model, with per-pass figures and verification.

:func:`optimize` is the Python entry point and what ``gcomp optimize`` calls::

    result = gcomp.optimize("model.onnx", pipeline="O1")
    result.verification.passed  # outputs equal the original's on ONNX Runtime
    result.save("model.opt.onnx")
    result.model                # the optimized onnx_ir.Model; result.to_onnx(): a ModelProto

The model may be a path, serialized bytes, an ``onnx.ModelProto`` or an ``onnx_ir.Model``;
a caller's proto or model is never modified (the pipeline works on a copy). Every mistake
of the caller (a wrong argument type, an unreadable model, an unknown option) raises a
:class:`~gcomp.errors.GcompError` whose message is the one line the CLI prints.
"""

from __future__ import annotations

__all__ = ["Checks", "PassStats", "Result", "optimize"]

import dataclasses
import gc
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

import gcomp.passes  # noqa: F401  (registers the built-in passes and pipelines)
from gcomp import compat, io, quantize_plan, registry, runtime
from gcomp.errors import GcompError, ModelLoadError, OptionError, PassFailedError, first_line
from gcomp.perf import ModelStats, model_stats
from gcomp.verify import CannotVerify, Reference, Tolerance, Verification, precision_options


@dataclass
class PassStats:
    """What one run of one pass did."""

    name: str
    round: int
    seconds: float
    modified: bool
    nodes_before: int
    nodes_after: int
    initializer_bytes_before: int
    initializer_bytes_after: int
    op_delta: dict[str, int] = field(default_factory=dict)
    note: str | None = None
    details: dict[str, Any] | None = None  # what a pass reports beyond counts (e.g. unfolded nodes)
    max_abs_error: float | None = None  # vs the original right after this pass (pass_errors=True)
    latency_ms: float | None = None  # median run on ONNX Runtime right after this pass (pass_latency=True)


@dataclass
class Result:
    """The outcome of :func:`optimize`: the model, what each pass did, and verification."""

    model: ir.Model
    pipeline: str
    passes: list[PassStats]
    before: ModelStats
    after: ModelStats
    verification: Verification | None
    seconds: float
    source: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    load_seconds: float = 0.0  # time in gcomp.io.load when optimize() read the file itself
    input_latency_ms: float | None = None  # the input model on ONNX Runtime (pass_latency=True)
    quantization: Any = None  # a gcomp.quantize.QuantReport when quantize= was given

    def save(self, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
        """Write the model atomically; refuses to overwrite the input."""
        return io.save(self.model, path, external_data=external_data, source=self.source)

    def to_onnx(self) -> Any:
        """The optimized model as an ``onnx.ModelProto``, every weight in memory (external
        data is read in; for models near protobuf's 2 GB limit, :meth:`save` instead)."""
        import onnx

        return onnx.ModelProto.FromString(io.serialize(self.model))

    def to_dict(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "options": self.options,
            "source": self.source,
            "seconds": self.seconds,
            "load_seconds": self.load_seconds,
            "input_latency_ms": self.input_latency_ms,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "passes": [asdict(p) for p in self.passes],
            "verification": self.verification.to_dict() if self.verification else None,
            "quantization": self.quantization.to_dict() if self.quantization else None,
        }


# Called before each pass (stats=None) and after it (with its stats); also before the
# verification runs, with round 0.
ProgressCallback = Callable[[str, int, "PassStats | None"], None]


@dataclass(frozen=True)
class Checks:
    """How :func:`optimize` checks its work (its keyword arguments of the same names)."""

    verify: bool = True
    inputs: str | os.PathLike | Mapping[str, np.ndarray] | None = None
    input_shapes: Mapping[str, tuple[int, ...]] | None = None
    seed: int = 0
    tolerances: Mapping[str, Tolerance] | None = None
    bisect: bool = True
    max_tensor_bytes: int | None = None
    verify_timeout: float | None = None
    pass_errors: bool = False
    pass_latency: bool = False


@dataclass
class _Loaded:
    model: ir.Model  # gcomp's own: read from a file, bytes or a proto, or a copy of the caller's
    source: str | None
    from_file: bool
    seconds: float
    checked: bool  # exactly as the ONNX checker accepted it at load
    original: Callable[[], ir.Model]  # a fresh copy of the untouched input (to bisect on)


@dataclass
class _Baseline:
    """The original model's outputs (``reference``), or why there are none."""

    reference: Reference | None = None
    verification: Verification | None = None


def optimize(
    model: ir.Model | str | os.PathLike | bytes | Any,
    pipeline: str | Sequence[str | ir.passes.PassBase] = "O1",
    *,
    verify: bool = True,
    inputs: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    tolerances: Mapping[str, Tolerance] | None = None,
    bisect: bool = True,
    progress: ProgressCallback | None = None,
    max_tensor_bytes: int | None = None,
    verify_timeout: float | None = None,
    pass_errors: bool = False,
    pass_latency: bool = False,
    precision: str | None = None,
    quantize: str | None = None,
    calibration: str | os.PathLike | None = None,
    metric: str | None = None,
    speed_gate: bool = True,
    static: bool = False,
    **options: Any,
) -> Result:
    """Run ``pipeline`` over ``model`` and verify the result against the original.

    Args:
        model: a path (``str`` or ``os.PathLike``), serialized ``bytes``, an
            ``onnx.ModelProto`` (all three read and checked) or an ``onnx_ir.Model``. A
            proto or ``ir.Model`` is not modified: the pipeline runs on a copy (weights
            shared, not copied) and ``Result.model`` is the optimized one.
        pipeline: a pipeline name (``"O0"``, ``"O1"``, ``"1"``), a comma-separated list
            of pipeline and pass names, or a list of names and onnx-ir pass instances.
        verify: run original and result on ONNX Runtime (optimizations off) and compare.
        inputs: an ``.npz`` path, a ``test_data_set`` folder or a dict of arrays;
            missing inputs are generated (see :mod:`gcomp.inputs`).
        input_shapes: shapes for generated inputs, ``{"x": (1, 3, 224, 224)}``; the model
            keeps its symbolic dims unless ``static``.
        static: fix every dim at the input shapes (``input_shapes``, the shapes of
            ``inputs``, and the dims they name on other inputs; pass ``static-shapes``):
            shape arithmetic folds away and every value of the result has int dims. An
            input whose dims stay unknown is an :class:`~gcomp.errors.OptionError`.
        bisect: on a mismatch, replay the passes to name the first one that broke it.
        progress: callback ``(pass_name, round, stats_or_None)``.
        max_tensor_bytes: verification does not run a model whose inputs or
            constant-sized tensors would exceed this (default 4 GiB); it says so instead.
        verify_timeout: seconds a reference run may take before it is stopped (300).
        precision: ``"fp16"``, ``"bf16"`` or ``"auto"``: convert to mixed precision after
            the pipeline (pass ``convert-precision``; its options go in ``**options``);
            verification then emulates the reduced precision (gcomp.verify.emulate).
        pass_latency: after every pass that changes the model (and before the first
            pass, as ``Result.input_latency_ms``), time it on ONNX Runtime with its
            optimizations on (median of a few runs on the reference inputs; needs
            ``verify``) into ``PassStats.latency_ms``.
        pass_errors: after every pass that changes the model, run it on the reference
            and record the largest output error in ``PassStats.max_abs_error`` (one
            reference run per changing pass; needs ``verify``).
        quantize: ``"int8"`` (static, needs ``calibration``), ``"int8-dynamic"``,
            ``"int8-weights"`` or ``"int4"``: quantize after the
            pipeline (and precision), within an accuracy budget (``metric``, default
            ``"cosine"``, and the ``tolerance`` option, default 0.01: cosine >= 0.99,
            measured on ``calibration`` samples, else ``inputs``, else generated ones),
            keeping the model only where it is faster (``speed_gate``); see
            :mod:`gcomp.quantize`. Declining raises ``gcomp.quantize.QuantizationDeclined``.
            Options of the quantization pass (``per_channel``, ``block_size``,
            ``exclude_nodes``, ...) go in ``**options``.
        **options: pass options by name; each goes to every pass declaring it.

    Returns:
        A :class:`Result`. A verification failure is reported in
        ``result.verification``, not raised: the caller decides.
    """
    t_start = time.perf_counter()
    _check_arguments(pipeline, inputs, input_shapes, seed, tolerances)
    checks = Checks(verify, inputs, input_shapes, seed, tolerances, bisect, max_tensor_bytes, verify_timeout,
                    pass_errors, pass_latency)
    options = _with_default_target(pipeline, dict(options))
    quant = quantize_plan.plan(quantize, calibration, metric, speed_gate, options, precision, pipeline) if quantize else None
    loaded = _load(model)
    checks = quantize_plan.on_calibration_data(checks, quant, loaded.model)
    static_step = None
    if static:
        checks, static_step = _static_plan(loaded.model, checks)
    context = runtime.pass_context(timeout=verify_timeout, inputs=inputs, input_shapes=checks.input_shapes, seed=seed)
    steps, recorded = _plan(pipeline, precision_options(options, precision, metric, quantize), precision, checks, context)
    steps += quantize_plan.fusion_steps(quant, pipeline, context, options)  # what --quantize needs fused first
    if static_step is not None:
        steps.insert(0, static_step)
        recorded = dict(recorded, static=True, input_shapes={k: list(v) for k, v in checks.input_shapes.items()})
    baseline = _baseline(loaded, checks, progress)
    reference = baseline.reference
    input_latency = runtime.time_model(loaded.model, reference.feeds) if pass_latency and reference else None
    before = model_stats(loaded.model)
    unread = compat.unread_legacy_initializers(loaded.model)
    executed: list[tuple[str, ir.passes.PassBase]] = []
    stats = _run(loaded, steps, progress, executed, _after_pass(reference, pass_errors, pass_latency))
    float_model = loaded.model
    report = quantize_plan.run(loaded, quant, checks, progress, reference, (inputs is not None, bool(input_shapes))) \
        if quant else None
    if static_step is not None:  # after quantization too: every value it made gets its dims
        stats += _run(loaded, [static_step], progress, executed, _after_pass(reference, pass_errors, pass_latency))
    compat.settle_legacy_initializers(loaded.model, unread)
    after = model_stats(loaded.model)
    verification = baseline.verification
    if reference is not None:
        verification = (quantize_plan.check(reference, float_model, loaded.model, quant.budget) if quant
                        else _check(loaded, baseline, executed, checks, progress))
    if quant is not None:
        recorded = dict(recorded, quantize=quant.mode, metric=quant.budget.metric, tolerance=quant.budget.tolerance)
    return Result(
        model=loaded.model, pipeline=_pipeline_label(pipeline), passes=stats, before=before, after=after,
        verification=verification, seconds=time.perf_counter() - t_start, source=loaded.source,
        options=recorded, load_seconds=loaded.seconds, input_latency_ms=input_latency, quantization=report,
    )


MODEL_KINDS = "a path (str or os.PathLike), bytes, an onnx.ModelProto or an onnx_ir.Model"


def _load(model: Any) -> _Loaded:
    """The model to transform: read (and checked) from a file, bytes or a proto, or a
    copy of the caller's ``ir.Model`` (graph objects copied, weights shared)."""
    t_load = time.perf_counter()
    if isinstance(model, ir.Model):
        source_path = io.source_path(model)
        return _Loaded(_copy(model), str(source_path) if source_path else None, False, 0.0, False,
                       lambda: _copy(model))
    if isinstance(model, (str, os.PathLike)):
        ir_model = io.load(model)
        source = str(Path(model))
        return _Loaded(ir_model, source, True, time.perf_counter() - t_load, True,
                       lambda: io.load(source, check=False))
    if isinstance(model, (bytes, bytearray, memoryview)):
        data = bytes(model)
        return _Loaded(io.from_bytes(data), None, False, time.perf_counter() - t_load, True,
                       lambda: io.from_bytes(data, check=False))
    if type(model).__name__ == "ModelProto" and hasattr(model, "SerializeToString"):
        proto = model
        return _Loaded(io.from_proto(proto), None, False, time.perf_counter() - t_load, True,
                       lambda: io.from_proto(proto, check=False))
    raise ModelLoadError(f"gcomp.optimize: the model must be {MODEL_KINDS}, not {type(model).__name__}")


def _copy(model: ir.Model) -> ir.Model:
    copy = model.clone()
    copy.meta.update(model.meta)  # where it was loaded from: never overwritten on save
    return copy


def _check_arguments(pipeline, inputs, input_shapes, seed, tolerances) -> None:
    """Arguments of the wrong kind, refused in one line before any work."""
    def refuse(what: str, value: Any) -> None:
        raise OptionError(f"gcomp.optimize: {what}, not {type(value).__name__}")

    if not isinstance(pipeline, (str, Sequence)):
        refuse("pipeline must be a name such as 'O1' or a list of names and onnx-ir passes", pipeline)
    if inputs is not None and not isinstance(inputs, (str, os.PathLike, Mapping)):
        refuse("inputs must be a path (.npz or test_data_set folder) or a dict of arrays", inputs)
    if input_shapes is not None:
        if not isinstance(input_shapes, Mapping):
            refuse("input_shapes must be a dict of input name to shape", input_shapes)
        for name, shape in input_shapes.items():
            if (not isinstance(shape, Sequence) or isinstance(shape, str)
                    or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in shape)):
                raise OptionError(f"gcomp.optimize: input_shapes['{name}'] must be a sequence of non-negative "
                                  f"ints, not {shape!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        refuse("seed must be an int", seed)
    if tolerances is not None and not isinstance(tolerances, Mapping):
        refuse("tolerances must be a dict of output name to gcomp.verify.Tolerance", tolerances)


def _static_plan(model: ir.Model, checks: Checks) -> tuple[Checks, tuple]:
    """Every runtime input's static shape (given, from ``inputs``' arrays, or named by
    them), and the ``static-shapes`` step fixing them. Verification runs at these shapes."""
    from gcomp.passes.static import format_shapes, static_input_shapes

    known = dict(_given_shapes(checks.inputs, model))
    known.update({k: tuple(int(d) for d in v) for k, v in (checks.input_shapes or {}).items()})
    shapes = static_input_shapes(model, known)
    step = registry.get_pass("static-shapes").create(shapes=format_shapes(shapes))
    return dataclasses.replace(checks, input_shapes=shapes), ([("static-shapes", step)], 1)


def _given_shapes(inputs, model: ir.Model) -> dict[str, tuple[int, ...]]:
    if inputs is None:
        return {}
    if not isinstance(inputs, Mapping):
        from gcomp.inputs import load_inputs

        inputs = load_inputs(inputs, model)
    return {k: tuple(np.shape(v)) for k, v in inputs.items() if isinstance(v, np.ndarray) or np.isscalar(v)}


def _plan(pipeline, options: dict[str, Any], precision: str | None, checks: Checks,
          context: registry.PassContext) -> tuple[list, dict[str, Any]]:
    """The pass objects to run, and the options to record in the result."""
    if precision is None:
        return _instantiate(pipeline, options, context), dict(options)
    # convert-precision takes its options out of ``options``; the rest go to the pipeline.
    info = registry.get_pass("convert-precision")
    declared = {o.name for o in info.options} - {"precision"}
    mine = {k: v for k, v in options.items() if k in declared}
    rest = {k: v for k, v in options.items() if k not in declared}
    steps = _instantiate(pipeline, rest, context)
    step = info.create(context=context, precision=precision, **mine)
    steps.append(([("convert-precision", step)], 1))  # after every pass of the pipeline (fusion first)
    return steps, dict(options, precision=precision)


def _baseline(loaded: _Loaded, checks: Checks, progress: ProgressCallback | None) -> _Baseline:
    """Run the original model once on the reference runtime (when verifying)."""
    if not checks.verify:
        return _Baseline()
    if progress:
        progress("verify: running the original model", 0, None)
    limits = {}
    if checks.max_tensor_bytes is not None:
        limits["max_tensor_bytes"] = checks.max_tensor_bytes
    if checks.verify_timeout is not None:
        limits["timeout"] = checks.verify_timeout
    try:
        reference = Reference.build(
            Path(loaded.source) if loaded.from_file else loaded.model, inputs=checks.inputs,
            input_shapes=checks.input_shapes, seed=checks.seed, tolerances=checks.tolerances,
            model=loaded.model, **limits,
        )
    except CannotVerify as e:
        return _Baseline(verification=Verification("unverified", str(e)))
    return _Baseline(reference, None)


def _run(loaded: _Loaded, steps, progress, executed, check) -> list[PassStats]:
    """Run every step. A model gcomp loaded itself was checked by io.load; until a pass
    modifies it, check-only passes (``validates = True``) would repeat that work."""
    # The loaded model is a million long-lived objects on a large graph: freezing them
    # keeps Python's cyclic GC from re-walking them at every collection (a third of O1's
    # time at 100k nodes); what the passes free is still collected after unfreeze.
    gc.freeze()
    try:
        return _run_steps(loaded.model, steps, progress, executed, checked=loaded.checked, check=check)
    finally:
        gc.unfreeze()


def _check(loaded: _Loaded, baseline: _Baseline, executed, checks: Checks, progress) -> Verification:
    """Compare the result with the original; on a mismatch, name the first bad pass."""
    if progress:
        progress("verify: running the optimized model", 0, None)
    verification = baseline.reference.check(loaded.model)
    if verification.passed or not checks.bisect:
        return verification
    verification.first_bad_pass = _bisect(loaded.original(), executed, baseline.reference)
    return verification


def _pipeline_label(pipeline) -> str:
    if isinstance(pipeline, str):
        return ",".join(registry.canonical_name(p) for p in pipeline.split(","))
    return ",".join(_label(p) for p in pipeline)


def _label(item: str | ir.passes.PassBase) -> str:
    return item if isinstance(item, str) else type(item).__name__


DEFAULT_FUSION_TARGET = "ort-cpu"


def _with_default_target(pipeline, options: dict[str, Any]) -> dict[str, Any]:
    """Target-specific fusion (O3) without a target fuses for the default backend, ORT on CPU."""
    if "target" in options:
        return options
    for step in registry.resolve(pipeline):
        if not isinstance(step, ir.passes.PassBase) and "fuse-target" in step.passes:
            options["target"] = DEFAULT_FUSION_TARGET
            break
    return options


def _instantiate(
    pipeline, options: Mapping[str, Any], context: registry.PassContext | None = None
) -> list[tuple[list[tuple[str, ir.passes.PassBase]], int]]:
    """Resolve the pipeline and build pass objects; every option must be used by some pass.
    Passes that declare a ``context`` parameter receive ``context``."""
    steps = []
    used: set[str] = set()
    for step in registry.resolve(pipeline):
        if isinstance(step, ir.passes.PassBase):
            steps.append(([(type(step).__name__, step)], 1))
            continue
        group = []
        for name in step.passes:
            info = registry.get_pass(name)
            mine = {o.name: options[o.name] for o in info.options if o.name in options}
            used.update(mine)
            group.append((name, info.create(context=context, **mine)))
        steps.append((group, step.repeat))
    unused = sorted(set(options) - used)
    if unused:
        declared = sorted(registry.pipeline_options(pipeline))
        raise OptionError(
            f"unknown option(s) {', '.join(unused)} for this pipeline"
            + (f" (options: {', '.join(declared)})" if declared else " (its passes take no options)")
        )
    return steps


def _run_steps(model, steps, progress, executed, checked: bool = False, check=None) -> list[PassStats]:
    stats: list[PassStats] = []
    current = model_stats(model)
    for group, repeat in steps:
        for round_ in range(1, repeat + 1):
            changed = False
            for name, pass_ in group:
                if checked and getattr(pass_, "validates", False):
                    stats.append(PassStats(
                        name, round_, 0.0, False, current.nodes, current.nodes, current.initializer_bytes,
                        current.initializer_bytes, note="skipped: the model is unchanged since the check at load",
                    ))
                    continue
                if progress:
                    progress(name, round_, None)
                t0 = time.perf_counter()
                try:
                    result = pass_(model)
                except GcompError:
                    raise
                except Exception as e:
                    done = ", ".join(n for n, _ in executed) or "none"
                    text = first_line(e)
                    raise PassFailedError(f"pass '{name}' failed (after: {done}): {text}") from e
                if result.model is not model:
                    raise PassFailedError(f"pass '{name}' returned a new model; gcomp pipelines run in place")
                seconds = time.perf_counter() - t0
                executed.append((name, pass_))
                new = model_stats(model) if result.modified else current
                delta = {
                    op: new.op_types.get(op, 0) - current.op_types.get(op, 0)
                    for op in set(new.op_types) | set(current.op_types)
                    if new.op_types.get(op, 0) != current.op_types.get(op, 0)
                }
                s = PassStats(
                    name, round_, seconds, bool(result.modified), current.nodes, new.nodes,
                    current.initializer_bytes, new.initializer_bytes, dict(sorted(delta.items())),
                    details=getattr(result, "details", None) or None,
                )
                if check is not None and result.modified:
                    s.max_abs_error, s.latency_ms = check(model)
                stats.append(s)
                current = new
                # Annotation-only passes (``analysis = True``) don't call for another round.
                changed |= bool(result.modified) and not getattr(pass_, "analysis", False)
                checked = checked and not result.modified
                if progress:
                    progress(name, round_, s)
            if not changed:
                break
    return stats


def _after_pass(reference: Reference | None, errors: bool, latency: bool):
    """A callback measuring a model after a pass: (largest output error against the
    reference, median latency on ONNX Runtime in ms); None for what is not asked or
    cannot run. None instead of a callback when nothing is asked."""
    if reference is None or not (errors or latency):
        return None

    def check(model: ir.Model) -> tuple[float | None, float | None]:
        error = None
        if errors:
            v = reference.check(model)
            error = v.max_abs_error if v.outputs else None
        return error, (runtime.time_model(model, reference.feeds) if latency else None)

    return check


def _bisect(original: ir.Model, executed: list[tuple[str, ir.passes.PassBase]], reference: Reference) -> str | None:
    """Replay the executed passes on a fresh copy; the first whose result fails is named."""
    for index, (name, pass_) in enumerate(executed):
        try:
            result = pass_(original)
        except Exception:
            return f"{name} (step {index + 1})"
        if result.modified and not reference.check(original).passed:
            return f"{name} (step {index + 1})"
    return None
