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

Calibration: the model runs once in fp32, on the pipeline's runtime (``context``), on the
feeds the core gives (``context.inputs``: seeded generated
inputs, or ``calibration_inputs``, as verification makes them); any op whose output exceeds half the target's range there keeps
fp32 (``finfo.min``-style mask fills excepted in ``auto``, which measures them instead),
and the tensor sizes weigh the Casts. Without a runnable model (or without a context or
feeds), conversion still happens, without the range rule (reported).

``precision="auto"``: fp16 with a search for the largest fp16 region within the bounds:
starting from the safe conversion, the sensitive regions are converted all at once, and
when the emulated fp16 result (``context.runtime.run(..., emulate=True)``:
:mod:`gcomp.verify.emulate`) misses a bound on some float output (:mod:`.accuracy`: no
new NaN/Inf, not all zeros where fp32 is not, cosine >= 0.999, rel-l2 <= 1e-2 and
max |a - e| / max(1, max |e|) <= ``tolerance``; ``metric`` names the one ``tolerance``
bounds instead), the set is bisected, keeping the regions that pass (a half known to fail
because its sibling passed is split without another run). Ops whose outputs underflow
fp16 on the calibration inputs are sensitive regions here, compute ops included, so an
output that fp16 would flush to zeros keeps its region in fp32. Each step is reported.
Cost: at most about ``1 + 2 k log2(n/k)`` emulated runs for ``n`` regions of which ``k``
must stay fp32 (64 regions, 2 bad: 20 runs; one at a time would be 65).

Every conversion records the bounds its outputs are held to in the main graph's ``meta``
(:data:`.accuracy.BOUNDS_META`, in memory, never written): verification
(:mod:`gcomp.verify.precision`) holds the converted model to the same. fp16/bf16 default
to :data:`.accuracy.BOUNDS`; ``metric`` with ``tolerance`` changes one of them.

Refuses (``GcompError``): an unknown precision or metric; ``auto`` when the model cannot
run or even the safe conversion misses a bound (naming the output and the measure). Model functions are not converted.
"""

from __future__ import annotations

__all__ = ["PRECISIONS", "ConvertPrecision", "calibrate", "check_bounds", "cli_options", "summary_lines"]

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import onnx_ir as ir

from gcomp.errors import BackendError, GcompError, OptionError
from gcomp.passes.precision import accuracy, convert
from gcomp.passes.precision.assign import Problem
from gcomp.passes.precision.policy import CONTRIB_SLOTS, ORT_DOMAIN, same_type_inputs
from gcomp.passes.result import DetailedResult
from gcomp.passes.shapes import InferShapes
from gcomp.registry import PassContext, Runtime, register_pass

PRECISIONS = {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16, "auto": ir.DataType.FLOAT16}
DEFAULT_TOLERANCE = 1e-2
_INFERRED = "gcomp.inferred_from"  # what infer-shapes records (see gcomp.passes.shapes)
Feeds = Mapping[str, np.ndarray]


@register_pass("convert-precision")
class ConvertPrecision(ir.passes.InPlacePass):
    """Mixed precision: fp16/bf16 compute, fp32 kept by region for sensitive ops, fewest Casts."""

    def __init__(
        self,
        *,
        precision: Annotated[str, "fp16, bf16, or auto (fp16 regions chosen by a search within tolerance)"] = "fp16",
        keep_io_types: Annotated[bool, "keep fp32 graph inputs and outputs"] = True,
        tolerance: Annotated[float, "the bound on metric per float output (cosine: 1 - cos); without metric, "
                             "auto's max|a-e| / max(1, max|e|)"] = DEFAULT_TOLERANCE,
        metric: Annotated[str, "the measure tolerance bounds: cosine, rel-l2 or max-abs (others keep their "
                          "defaults: fp16/auto cosine >= 0.999, rel-l2 <= 0.01; bf16 0.99, 0.05)"] = "",
        block_ops: Annotated[tuple, "op types kept in fp32"] = (),
        allow_ops: Annotated[tuple, "op types converted even if precision-sensitive"] = (),
        block_nodes: Annotated[tuple, "node names kept in fp32"] = (),
        allow_nodes: Annotated[tuple, "node names converted even if precision-sensitive"] = (),
        calibrate: Annotated[bool, "run the model once to find overflowing ops and tensor sizes"] = True,
        calibration_inputs: Annotated[str, "an .npz or test_data_set folder for calibration"] = "",
        context: PassContext | None = None,
    ) -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise OptionError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
        self.bounds = check_bounds(precision, metric, tolerance)
        self.precision = precision
        self.keep_io_types = keep_io_types
        self.lists = {
            "block_ops": frozenset(block_ops), "allow_ops": frozenset(allow_ops),
            "block_nodes": frozenset(block_nodes), "allow_nodes": frozenset(allow_nodes),
        }
        self.calibrate = calibrate
        self.calibration_inputs = calibration_inputs
        self.context = context or PassContext()

    def call(self, model: ir.Model) -> DetailedResult:
        t0 = time.perf_counter()
        target = PRECISIONS[self.precision]
        details: dict[str, Any] = {"precision": self.precision if self.precision != "auto" else "auto (fp16)"}
        _infer_types(model)
        feeds, stats, reference = self._calibrate(model, details)
        before_bytes = _float_bytes(model)
        build = dict(keep_io_types=self.keep_io_types, stats=stats, underflow=self.precision == "auto", **self.lists)
        problem = Problem.build(model, target, **build)
        relaxed: set[int] = set()
        cache: dict = {}  # converted constants, shared by the search's trials and the result
        details["bounds"] = self.bounds.describe()
        if self.precision == "auto":
            search = _Search(model, problem, build, self._runtime(), feeds, reference, self.bounds, cache)
            relaxed, details["search"] = search.run()
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
            model.graph.meta[accuracy.BOUNDS_META] = self.bounds
        return DetailedResult(model, modified=modified, details=details)

    def _runtime(self) -> Runtime:
        return self.context.need_runtime("convert-precision (calibration, auto)")

    def _calibrate(self, model: ir.Model, details: dict[str, Any]):
        """(feeds, stats, fp32 outputs) of the calibration run; (None, {}, None) without one.
        Only ``auto`` needs it: the other precisions report why there was none."""
        if not (self.calibrate or self.precision == "auto"):
            return None, {}, None
        try:
            runtime = self._runtime()
            feeds = self._feeds(model)
            stats, reference = calibrate(model, runtime, feeds)
        except GcompError as e:
            if self.precision == "auto":
                raise GcompError(f"--precision auto needs a runnable model: {e}") from None
            details["calibration"] = f"not possible: {e}; no range rule applied"
            return None, {}, None
        if stats:
            details["calibration"] = f"{len(stats)} tensors measured"
        return feeds, stats, reference

    def _feeds(self, model: ir.Model) -> dict[str, np.ndarray]:
        if self.context.inputs is None:
            raise GcompError("no calibration inputs: give the pass context=gcomp.runtime.pass_context()")
        return self.context.inputs(model, self.calibration_inputs or None)


def _infer_types(model: ir.Model) -> None:
    """Element types for every value the conversion may touch: ONNX shape inference, and
    for the com.microsoft ops it does not know (fusion at -O3), their type rule (outputs
    of the data type parameter take input 0's type, statistics are fp32), alternately
    until nothing new is learned."""
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 17))
    for _ in range(3):
        InferShapes()(model)
        learned = False
        for graph in model.graphs():
            for node in graph:  # topological order: one sweep carries types through chains
                if not node.inputs:
                    continue
                for i, v in enumerate(node.outputs):
                    if v.type is not None or not v.name:
                        continue
                    dtype = _output_type(node, i, opset)
                    if dtype is not None:
                        v.meta.setdefault(_INFERRED, (None, v.shape))
                        v.type = ir.TensorType(dtype)
                        learned = True
        if not learned:
            return


def _output_type(node: ir.Node, i: int, opset: int) -> ir.DataType | None:
    """Output ``i``'s element type by the op's type rule, when its inputs tell."""
    if node.domain == ORT_DOMAIN and node.op_type in CONTRIB_SLOTS:
        if i not in CONTRIB_SLOTS[node.op_type][1]:
            return ir.DataType.FLOAT  # statistics
        first = node.inputs[0]
        return first.dtype if first is not None else None
    dtypes = {node.inputs[j].dtype for j in same_type_inputs(node, opset, i)
              if j < len(node.inputs) and node.inputs[j] is not None}
    return dtypes.pop() if len(dtypes) == 1 else None


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
    model: ir.Model, runtime: Runtime, feeds: Feeds
) -> tuple[dict[str, tuple[float, int]], dict[str, Any]]:
    """Run ``model`` in fp32 once on ``feeds`` with every float intermediate exposed.

    Returns ({value name: (max |finite value|, elements)}, graph outputs). Values of
    unknown type are not measured. Raises ``GcompError`` when the model cannot run.
    """
    copy = model.clone()
    originals = {v.name for v in copy.graph.outputs}
    for node in copy.graph:
        for v in node.outputs:
            if v.name and v.name not in originals and v.dtype in (None, ir.DataType.FLOAT):
                if v.type is None:
                    continue  # ORT needs a type on a graph output; unknown types stay unmeasured
                copy.graph.outputs.append(v)
    try:
        outs = runtime.run(copy, feeds)
    except BackendError as e:
        raise GcompError(str(e).splitlines()[0]) from None
    stats = {}
    for name, y in outs.items():
        a = np.asarray(y)
        if a.dtype == np.float32:
            finite = a[np.isfinite(a)]
            stats[name] = (float(np.abs(finite).max()) if finite.size else 0.0, int(a.size))
    reference = {v.name: outs[v.name] for v in model.graph.outputs if v.name in outs}
    return stats, reference


@dataclass
class _Search:
    """Group testing over the sensitive regions (see the module docstring): each trial
    converts a copy with some regions relaxed to fp16 and evaluates it in emulated fp16 on
    the pipeline's runtime against the fp32 ``reference``."""

    model: ir.Model
    problem: Problem
    build: dict[str, Any]
    runtime: Runtime
    feeds: Feeds
    reference: dict[str, Any]
    bounds: accuracy.Bounds
    cache: dict  # converted constants, shared by the trials and the result
    regions: list[set[int]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    accepted: set[int] = field(default_factory=set)

    def run(self) -> tuple[set[int], list[dict[str, Any]]]:
        """(the sensitive variables converted, the steps taken)."""
        self.regions = self.problem.regions(self.problem.solve())
        if not self.trial(set(), "safe conversion (all sensitive regions fp32)"):
            raise GcompError(
                f"--precision auto: even the safe fp16 conversion misses {self.steps[-1]['miss']} "
                f"({self.bounds.describe()}); raise --tolerance (--metric names the measure) or use fp32"
            )
        self.visit(self.regions, 0)
        fp16 = self._within(self.accepted)
        self.steps.append({"regions": len(self.regions), "regions_fp16": fp16, "regions_fp32": len(self.regions) - fp16})
        return self.accepted, self.steps

    def trial(self, relaxed: set[int], label: str) -> bool:
        """Whether converting with ``relaxed`` keeps every float output within the bounds."""
        t0 = time.perf_counter()
        clone = self.model.clone()
        p = Problem.build(clone, self.problem.target, **self.build)
        convert.apply(clone, p, p.solve(relaxed), self.cache)
        rows = accuracy.compare(self.reference, self.runtime.run(clone, self.feeds, emulate=True), "fp16")
        misses = [f"output '{r.name}': {why}" for r in rows for why in [r.miss(self.bounds, "fp16")] if why]
        cosines = [r.cosine for r in rows if r.cosine is not None]
        rel_l2s = [r.rel_l2 for r in rows if r.rel_l2 is not None]
        self.steps.append({
            "step": len(self.steps) + 1, "trial": label, "regions_fp16": self._within(relaxed),
            "error": max((r.scaled_error for r in rows), default=0.0),
            "cosine": min(cosines, default=None), "rel_l2": max(rel_l2s, default=None),
            "new_nan_inf": any(r.new_nonfinite for r in rows), "miss": misses[0] if misses else None,
            "accepted": not misses, "seconds": round(time.perf_counter() - t0, 2),
        })
        return not misses

    def visit(self, group: list[set[int]], depth: int, known_bad: bool = False) -> bool:
        """Convert what passes in ``group``; True when all of it was converted. A group
        known to fail (its sibling passed whole after their union failed: the
        monotonicity the search assumes) is split without being tried again."""
        if not group:
            return True
        union = set().union(*group)
        if not known_bad and self.trial(self.accepted | union, f"{len(group)} region(s) more in fp16 (depth {depth})"):
            self.accepted.update(union)
            return True
        if len(group) == 1:
            return False
        mid = len(group) // 2
        left_all = self.visit(group[:mid], depth + 1)
        self.visit(group[mid:], depth + 1, known_bad=left_all)
        return False

    def _within(self, relaxed: set[int]) -> int:
        """How many regions lie wholly in ``relaxed``."""
        return sum(1 for r in self.regions if r <= relaxed)


def check_bounds(precision: str, metric: str, tolerance: float) -> accuracy.Bounds:
    """The bounds a conversion to ``precision`` is held to: the precision's floors
    (:data:`.accuracy.BOUNDS`), ``auto``'s max-abs at ``tolerance`` (or at the default when
    ``metric`` names another measure), and ``metric`` (when given) at ``tolerance``."""
    bounds = accuracy.BOUNDS["bf16" if precision == "bf16" else "fp16"]
    if precision == "auto":
        bounds = bounds.with_metric("max-abs", tolerance if metric in ("", "max-abs") else DEFAULT_TOLERANCE)
    if metric:
        bounds = bounds.with_metric(metric, tolerance)
    elif not (tolerance > 0 and math.isfinite(tolerance)):
        raise OptionError(f"tolerance must be positive and finite, got {tolerance}")
    return bounds


def cli_options(precision: str | None, tolerance: float | None, keep_io_types: bool | None,
                metric: str | None = None) -> dict[str, Any]:
    """``gcomp optimize``'s --precision/--metric/--tolerance/--keep-io-types as optimize() options."""
    if not precision:
        given = "--tolerance" if tolerance is not None else "--keep-io-types/--no-keep-io-types"
        raise OptionError(f"{given} needs --precision")
    if metric is not None and tolerance is None:
        raise OptionError(f"--metric with --precision names the measure --tolerance bounds: give --tolerance "
                          f"(the {metric} bound of --precision {precision} is otherwise its default)")
    if metric is not None and metric not in accuracy.METRICS:
        raise OptionError(f"--metric {metric} serves --quantize; --precision takes cosine, rel-l2 or max-abs (auto)")
    if tolerance is not None and metric in (None, "max-abs") and precision != "auto":
        raise OptionError(f"--precision {precision} is checked element-wise at fixed tolerances: --tolerance bounds "
                          "--metric cosine or rel-l2 there (max-abs bounds auto's search)")
    options: dict[str, Any] = {"precision": precision}
    if tolerance is not None:
        options["tolerance"] = tolerance
    if metric is not None:
        options["metric"] = metric
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
            verdict = "accepted" if step["accepted"] else f"rejected: {step['miss']}"
            lines.append(f"  search step {step['step']}: {step['trial']}: error {step['error']:.3g} "
                         f"{verdict} ({step['seconds']} s)")
        else:
            lines.append(f"  search: {step['regions_fp16']} of {step['regions']} sensitive region(s) in fp16")
    return lines
