"""The ``convert-precision`` pass: fp32 → fp16/bf16 mixed precision, and its ``auto`` search.

Guarantees (on the main graph and every If/Loop/Scan body):

- compute ops run in the target type and their weights are stored in it; precision-
  sensitive ops and their statistics keep fp32 *by region* (the fp32 region around a
  decomposed LayerNorm is one region with one Cast in and one out), see
  :mod:`.policy` and :mod:`.assign`;
- the fewest Casts the fixed choices allow (an exact minimum cut), shared by all
  consumers, on the smallest tensors; existing Casts are updated, never stacked; no
  round trips (:mod:`.convert`);
- constants saturated to the target range, each clamped tensor reported; subnormals and
  flushes to zero counted; tiny constants that would vanish (an ``eps`` of 1e-12 in fp16)
  keep their consumer in fp32;
- with ``keep_io_types`` (default) the inputs and outputs keep fp32, so the result is a
  drop-in replacement; the output is topologically sorted with unique names.

Calibration: the model runs once in fp32 on seeded generated inputs (or
``calibration_inputs``); any op whose output exceeds half the target's range there keeps
fp32 (``finfo.min``-style mask fills excepted in ``auto``, which measures them instead),
and the tensor sizes weigh the Casts. Without a runnable model, conversion still
happens, without the range rule (reported).

``precision="auto"``: fp16 with a search for the largest fp16 region within
``tolerance``: starting from the safe conversion, the sensitive regions are converted
all at once, and when the emulated fp16 result (:mod:`.emulate`) is off by more than
``tolerance`` (max |a - e| / max(1, max |e|), per output, no new NaN/Inf), the set is
bisected, keeping the regions that pass (a half known to fail because its sibling passed
is split without another run). Each step is reported. Cost: at most about
``1 + 2 k log2(n/k)`` emulated runs for ``n`` regions of which ``k`` must stay fp32
(64 regions, 2 bad: 20 runs; one at a time would be 65).

Refuses (``GcompError``): an unknown precision; ``auto`` when the model cannot run or
even the safe conversion misses the tolerance. Model functions are not converted.
"""

from __future__ import annotations

__all__ = [
    "PRECISIONS", "ConvertPrecision", "PrecisionResult", "calibrate", "cli_options", "precision_step",
    "summary_lines",
]

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import onnx_ir as ir
from gcomp.passes.precision import convert, emulate
from gcomp.passes.precision.assign import Problem

from gcomp.errors import GcompError, OptionError
from gcomp.registry import register_pass

PRECISIONS = {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16, "auto": ir.DataType.FLOAT16}
_INFERRED = "gcomp.inferred_from"  # what infer-shapes records (see gcomp.passes.shapes)


@dataclass
class PrecisionResult(ir.passes.PassResult):
    """The pass result with what was converted, kept, clamped, and the search steps."""

    details: dict[str, Any] = field(default_factory=dict)


@register_pass("convert-precision")
class ConvertPrecision(ir.passes.InPlacePass):
    """Mixed precision: fp16/bf16 compute, fp32 kept by region for sensitive ops, fewest Casts."""

    def __init__(
        self,
        *,
        precision: Annotated[str, "fp16, bf16, or auto (fp16 regions chosen by a search within tolerance)"] = "fp16",
        keep_io_types: Annotated[bool, "keep fp32 graph inputs and outputs"] = True,
        tolerance: Annotated[float, "auto: largest error allowed, max|a-e| / max(1, max|e|) per output"] = 1e-2,
        block_ops: Annotated[tuple, "op types kept in fp32"] = (),
        allow_ops: Annotated[tuple, "op types converted even if precision-sensitive"] = (),
        block_nodes: Annotated[tuple, "node names kept in fp32"] = (),
        allow_nodes: Annotated[tuple, "node names converted even if precision-sensitive"] = (),
        calibrate: Annotated[bool, "run the model once to find overflowing ops and tensor sizes"] = True,
        calibration_inputs: Annotated[str, "an .npz or test_data_set folder for calibration"] = "",
    ) -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise OptionError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
        if not tolerance > 0:
            raise OptionError(f"tolerance must be positive, got {tolerance}")
        self.precision = precision
        self.keep_io_types = keep_io_types
        self.tolerance = float(tolerance)
        self.lists = {
            "block_ops": frozenset(block_ops), "allow_ops": frozenset(allow_ops),
            "block_nodes": frozenset(block_nodes), "allow_nodes": frozenset(allow_nodes),
        }
        self.calibrate = calibrate
        self.calibration_inputs = calibration_inputs
        # Set by gcomp.optimize so calibration sees the verification inputs.
        self.feeds: dict[str, np.ndarray] | None = None
        self.input_shapes: dict[str, tuple[int, ...]] | None = None
        self.seed = 0

    def call(self, model: ir.Model) -> PrecisionResult:
        t0 = time.perf_counter()
        target = PRECISIONS[self.precision]
        details: dict[str, Any] = {"precision": self.precision if self.precision != "auto" else "auto (fp16)"}
        _infer_types(model)
        stats: dict[str, tuple[float, int]] = {}
        feeds = reference = None
        if self.calibrate or self.precision == "auto":
            try:
                feeds, stats, reference = calibrate(
                    model, feeds=self.feeds, inputs=self.calibration_inputs or None,
                    input_shapes=self.input_shapes, seed=self.seed,
                )
            except GcompError as e:
                if self.precision == "auto":
                    raise GcompError(f"--precision auto needs a runnable model: {e}") from None
                details["calibration"] = f"not possible: {e}; no range rule applied"
        if stats:
            details["calibration"] = f"{len(stats)} tensors measured"
        before_bytes = _float_bytes(model)
        build = dict(keep_io_types=self.keep_io_types, stats=stats, **self.lists)
        problem = Problem.build(model, target, **build)
        relaxed: set[int] = set()
        cache: dict = {}  # converted constants, shared by the search's trials and the result
        if self.precision == "auto":
            relaxed, steps = _search(model, problem, build, feeds, reference, self.tolerance, cache)
            details["search"] = steps
        assignment = problem.solve(relaxed)
        report = convert.apply(model, problem, assignment, cache)
        _forget_inferred_shapes(model)
        details.update(report.to_dict())
        details["casts"] = convert.count_casts(model)
        details["float_bytes_before"] = before_bytes
        details["float_bytes_after"] = _float_bytes(model)
        details["seconds"] = round(time.perf_counter() - t0, 3)
        modified = report.converted_nodes > 0 or report.casts_inserted > 0 or report.constants_converted > 0
        if modified:
            model.metadata_props["gcomp.precision"] = PRECISIONS[self.precision].name.lower()
        return PrecisionResult(model, modified=modified, details=details)


def _infer_types(model: ir.Model) -> None:
    """Element types for every value the conversion may touch: ONNX shape inference, and
    for the com.microsoft ops it does not know (fusion at -O3), their type rule (outputs
    of the data type parameter take input 0's type, statistics are fp32), alternately
    until nothing new is learned."""
    from gcomp.passes.precision.policy import CONTRIB_SLOTS, ORT_DOMAIN, same_type_inputs
    from gcomp.passes.shapes import InferShapes

    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 17))
    for _ in range(3):
        InferShapes()(model)
        learned = False
        for graph in model.graphs():
            for node in graph:  # topological order: one sweep carries types through chains
                untyped = [i for i, v in enumerate(node.outputs) if v.type is None and v.name]
                if not untyped or not node.inputs:
                    continue
                for i in untyped:
                    v = node.outputs[i]
                    if node.domain == ORT_DOMAIN and node.op_type in CONTRIB_SLOTS:
                        first = node.inputs[0]
                        dtype = (first.dtype if first is not None else None) if i in CONTRIB_SLOTS[
                            node.op_type][1] else ir.DataType.FLOAT
                    else:
                        dtypes = {node.inputs[j].dtype for j in same_type_inputs(node, opset, i)
                                  if j < len(node.inputs) and node.inputs[j] is not None}
                        dtype = dtypes.pop() if len(dtypes) == 1 else None
                    if dtype is not None:
                        v.meta.setdefault(_INFERRED, (None, v.shape))
                        v.type = ir.TensorType(dtype)
                        learned = True
        if not learned:
            return


def _float_bytes(model: ir.Model) -> int:
    total = 0
    for graph in model.graphs():
        for v in graph.initializers.values():
            if v.const_value is not None and v.dtype is not None and v.dtype.is_floating_point():
                total += v.const_value.nbytes
    return total


def _forget_inferred_shapes(model: ir.Model) -> None:
    """Drop the shapes ONNX inferred (as ``forget-inferred-shapes`` does) but keep the
    element types: the conversion decided them."""
    for graph in model.graphs():
        for v in (*graph.inputs, *(o for n in graph for o in n.outputs)):
            if _INFERRED in v.meta:
                _, shape = v.meta.pop(_INFERRED)
                v.shape = shape


def calibrate(
    model: ir.Model,
    *,
    feeds: dict[str, np.ndarray] | None = None,
    inputs: str | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, tuple[float, int]], dict[str, Any]]:
    """Run ``model`` in fp32 once with every float intermediate exposed.

    Returns (feeds, {value name: (max |finite value|, elements)}, graph outputs). Values
    of unknown type are not measured. Raises ``GcompError`` when the model cannot run.
    """
    from gcomp.backends.ort import OrtBackend

    from gcomp import inputs as _inputs
    from gcomp.errors import BackendError

    given = dict(feeds or {})
    if inputs:
        given.update(_inputs.load_inputs(Path(inputs), model))
    feeds, _ = _inputs.generate_inputs(model, shapes=dict(input_shapes or {}), given=given, seed=seed)
    copy = model.clone()
    originals = {v.name for v in copy.graph.outputs}
    by_name = {}
    for node in copy.graph:
        for v in node.outputs:
            if v.name and v.name not in originals and v.dtype in (None, ir.DataType.FLOAT):
                if v.type is None:
                    continue  # ORT needs a type on a graph output; unknown types stay unmeasured
                copy.graph.outputs.append(v)
                by_name[v.name] = v
    try:
        outs = OrtBackend().compile(copy, "cpu", optimization="disable").run(feeds)
    except BackendError as e:
        raise GcompError(str(e).splitlines()[0]) from None
    stats = {}
    for name, y in outs.items():
        a = np.asarray(y)
        if a.dtype == np.float32:
            finite = a[np.isfinite(a)]
            stats[name] = (float(np.abs(finite).max()) if finite.size else 0.0, int(a.size))
    reference = {v.name: outs[v.name] for v in model.graph.outputs if v.name in outs}
    return feeds, stats, reference


def _search(model, problem: Problem, build: dict, feeds, reference, tolerance: float, cache: dict):
    """Group testing over the sensitive regions (see the module docstring)."""
    safe = problem.solve()
    regions = problem.regions(safe)
    steps: list[dict[str, Any]] = []
    fp32_cache: dict = {}

    def trial(relaxed: set[int], label: str) -> bool:
        t0 = time.perf_counter()
        clone = model.clone()
        p = Problem.build(clone, problem.target, **build)
        convert.apply(clone, p, p.solve(relaxed), cache)
        rows = emulate.compare(reference, emulate.emulate(clone, feeds, cache=fp32_cache))
        worst = max((r.scaled_error for r in rows), default=0.0)
        bad = any(r.new_nonfinite for r in rows)
        ok = not bad and worst <= tolerance
        steps.append({
            "step": len(steps) + 1, "trial": label, "regions_fp16": len(relaxed_regions(relaxed)),
            "error": worst, "new_nan_inf": bad, "accepted": ok, "seconds": round(time.perf_counter() - t0, 2),
        })
        return ok

    def relaxed_regions(relaxed):
        return [r for r in regions if r <= relaxed]

    if not trial(set(), "safe conversion (all sensitive regions fp32)"):
        err = steps[-1]["error"]
        raise GcompError(
            f"--precision auto: even the safe fp16 conversion misses --tolerance {tolerance:g} "
            f"(error {err:.3g}{', new NaN/Inf' if steps[-1]['new_nan_inf'] else ''}); raise the tolerance or use fp32"
        )
    accepted: set[int] = set()

    def visit(group: list[set[int]], depth: int, known_bad: bool = False) -> bool:
        """Convert what passes in ``group``; True when all of it was converted. A group
        known to fail (its sibling passed whole after their union failed: the
        monotonicity the search assumes) is split without being tried again."""
        if not group:
            return True
        union = set().union(*group)
        if not known_bad and trial(accepted | union, f"{len(group)} region(s) more in fp16 (depth {depth})"):
            accepted.update(union)
            return True
        if len(group) == 1:
            return False
        mid = len(group) // 2
        left_all = visit(group[:mid], depth + 1)
        visit(group[mid:], depth + 1, known_bad=left_all)
        return False

    visit(regions, 0)
    steps.append({"regions": len(regions), "regions_fp16": len(relaxed_regions(accepted)),
                  "regions_fp32": len(regions) - len(relaxed_regions(accepted))})
    return accepted, steps


def precision_step(
    precision: str,
    options: dict[str, Any],
    *,
    inputs: Any = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    seed: int = 0,
) -> tuple[str, ConvertPrecision]:
    """The ``convert-precision`` step ``gcomp.optimize(precision=...)`` appends.

    Takes this pass's options out of ``options`` (the rest go to the pipeline) and
    gives calibration the verification inputs, so both see the same values.
    """
    from gcomp import registry

    declared = {o.name for o in registry.get_pass("convert-precision").options} - {"precision"}
    mine = {k: options.pop(k) for k in list(options) if k in declared}
    step = registry.get_pass("convert-precision").create(precision=precision, **mine)
    if isinstance(inputs, (str, Path)):
        step.calibration_inputs = step.calibration_inputs or str(inputs)
    elif inputs is not None:
        step.feeds = {k: np.asarray(v) for k, v in dict(inputs).items()}
    step.input_shapes = dict(input_shapes or {})
    step.seed = seed
    return "convert-precision", step


def cli_options(precision: str | None, tolerance: float | None, keep_io_types: bool | None) -> dict[str, Any]:
    """``gcomp optimize``'s --precision/--tolerance/--keep-io-types as optimize() options."""
    if not precision:
        given = "--tolerance" if tolerance is not None else "--keep-io-types/--no-keep-io-types"
        raise OptionError(f"{given} needs --precision")
    if tolerance is not None and precision != "auto":
        raise OptionError("--tolerance applies to --precision auto only")
    options: dict[str, Any] = {"precision": precision}
    if tolerance is not None:
        options["tolerance"] = tolerance
    if keep_io_types is not None:
        options["keep_io_types"] = keep_io_types
    return options


def summary_lines(result) -> list[str]:
    """What ``gcomp optimize --precision`` prints after its tables."""
    runs = [p for p in result.passes if p.name == "convert-precision" and p.details]
    if not runs:
        return []
    d = runs[-1].details
    kept = ", ".join(f"{why}: {n}" for why, n in d.get("kept_fp32", {}).items()) or "none"
    lines = [
        f"precision {d['precision']}: {d['converted_nodes']} node(s) converted; kept fp32: {kept}",
        (f"  Casts: {d['casts']} in the model ({d['casts_inserted']} inserted, {d['casts_updated']} existing "
         f"updated, {d['casts_removed']} removed); float weights {d['float_bytes_before']:,} -> "
         f"{d['float_bytes_after']:,} bytes"),
    ]
    for entry in d.get("clamped", [])[:10]:
        lines.append(f"  clamped: {entry['tensor']}: {entry['elements']} element(s) up to "
                     f"{entry['max_abs']:.3g} -> {entry['to']:g}")
    for kind in ("subnormal", "flushed"):
        if d.get(kind):
            total = sum(e["elements"] for e in d[kind])
            lines.append(f"  {kind}: {total} element(s) in {len(d[kind])} constant(s)")
    for step in d.get("search", []):
        if "trial" in step:
            lines.append(f"  search step {step['step']}: {step['trial']}: error {step['error']:.3g} "
                         f"{'accepted' if step['accepted'] else 'rejected'} ({step['seconds']} s)")
        else:
            lines.append(f"  search: {step['regions_fp16']} of {step['regions']} sensitive region(s) in fp16")
    return lines
