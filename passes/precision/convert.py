"""Applying a precision assignment: types, constants, Casts, clean-up.

:func:`apply` turns a solved :class:`~.assign.Problem` into the converted model, in place:

- every fp32 value produced by a low variable takes the target type (node outputs,
  If/Loop/Scan outputs and body inputs alike); existing ``Cast``/``ConstantOfShape``/
  ``EyeLike``/``Random*`` nodes that now produce the target type are *updated* (their
  ``to``/``dtype``/``value``), never followed by a second Cast;
- a Cast is inserted once per (value, direction) — shared by all consumers on the other
  side — right after the value's producer, in the producer's graph;
- constants are converted offline for low consumers (in place when no consumer needs
  fp32, otherwise a low copy beside the original). Values beyond the target's largest
  finite value are *saturated* to it (never made infinite; ±inf and NaN stay), and each
  clamped tensor is reported with the element count and the largest magnitude; nonzero
  values that become fp16 subnormals (below 6.1e-5, kept: IEEE gradual underflow, which
  GPUs implement) or flush to zero are counted per tensor;
- Cast clean-up: no-op Casts removed, ``Cast(Cast(x))`` whose inner Cast is exact
  merged into one, equal Casts of one value merged; no fp32→low→fp32 round trip is left;
- every graph is topologically sorted; new names are unique across the whole model.

Model functions are not converted (their call nodes are ops unknown to the converter
and keep fp32).
"""

from __future__ import annotations

__all__ = ["ApplyReport", "apply", "count_casts", "to_low"]

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
from gcomp.passes.precision.assign import (
    FLOAT,
    LIMITS,
    MIN_NORMAL,
    Assignment,
    Problem,
    constant_tensor,
    is_fp32,
)
from gcomp.passes.rewire import bypass

SHORT = {ir.DataType.FLOAT16: "fp16", ir.DataType.BFLOAT16: "bf16", ir.DataType.FLOAT: "fp32"}
DTYPE_ATTR_OPS = ("EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike")


@dataclass
class ApplyReport:
    converted_nodes: int = 0
    kept_fp32: dict[str, int] = field(default_factory=dict)  # reason -> node count
    kept_nodes: list[dict[str, str]] = field(default_factory=list)  # first few, with reasons
    casts_inserted: int = 0
    casts_removed: int = 0
    casts_updated: int = 0
    constants_converted: int = 0
    constants_duplicated: int = 0
    clamped: list[dict[str, Any]] = field(default_factory=list)
    subnormal: list[dict[str, Any]] = field(default_factory=list)
    flushed: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _np_low(target: ir.DataType):
    if target == ir.DataType.FLOAT16:
        return np.float16
    import ml_dtypes

    return ml_dtypes.bfloat16


def to_low(array: np.ndarray, target: ir.DataType) -> tuple[np.ndarray, dict[str, Any]]:
    """``array`` in the target type, saturated; what was clamped, became subnormal or zero."""
    a = np.asarray(array, dtype=np.float32)
    fmax = np.float32(LIMITS[target][0])
    finite = np.isfinite(a)
    over = finite & (np.abs(a) > fmax)
    info: dict[str, Any] = {}
    if over.any():
        info["clamped"] = int(over.sum())
        info["max_abs"] = float(np.abs(a[over]).max())
        info["to"] = float(fmax)
        a = np.where(over, np.sign(a) * fmax, a)
    low = a.astype(_np_low(target))
    back = np.abs(low.astype(np.float32))
    nonzero = a != 0
    flushed = nonzero & finite & (back == 0)
    sub = nonzero & (back > 0) & (back < MIN_NORMAL[target])
    if flushed.any():
        info["flushed"] = int(flushed.sum())
    if sub.any():
        info["subnormal"] = int(sub.sum())
    return low, info


class _Namer:
    def __init__(self, model: ir.Model) -> None:
        self.used: set[str] = set()
        for graph in model.graphs():
            for v in (*graph.inputs, *graph.outputs, *graph.initializers.values()):
                if v.name:
                    self.used.add(v.name)
            for node in graph:
                if node.name:
                    self.used.add(node.name)
                for v in node.outputs:
                    if v.name:
                        self.used.add(v.name)

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name


def apply(model: ir.Model, problem: Problem, assignment: Assignment,
          cache: dict[int, tuple[ir.Tensor, dict, Any]] | None = None) -> ApplyReport:
    """Convert ``model`` in place according to ``assignment`` (see the module docstring)."""
    report = ApplyReport()
    namer = _Namer(model)
    cache = {} if cache is None else cache
    low_vars = assignment.low
    # Decide everything from the unmodified types first.
    src_low = {key: _is_low(problem.producer.get(key, problem.HIGH), low_vars) for key in problem.values}
    uses = {
        key: [(node, i, _is_low(problem.input_var.get((id(node), i), problem.HIGH), low_vars)) for node, i in v.uses()]
        for key, v in problem.values.items()
    }
    outputs = [
        (graph, i, v, _is_low(problem.output_var.get((id(graph), i), problem.HIGH), low_vars))
        for graph in model.graphs() for i, v in enumerate(graph.outputs) if id(v) in problem.values
    ]
    _convert_nodes(problem, assignment, report, cache)
    for key, v in problem.values.items():  # types of produced values
        if src_low[key] and v.dtype == FLOAT:
            v.type = ir.TensorType(problem.target)  # a new object: clones share types
    cast_of = _Casts(problem.target, namer, report)
    for key, v in problem.values.items():  # Casts between disagreeing producers and consumers
        for node, i, want in uses[key]:
            if want != src_low[key]:
                node.replace_input_with(i, cast_of(v, want))
    for graph, i, v, want in outputs:
        if want != src_low[id(v)]:
            _cast_output(model, graph, i, v, cast_of(v, want), namer)
    # Constants read by low consumers.
    _convert_constants(problem, low_vars, problem.target, namer, report, cache)
    report.casts_removed = _clean_casts(model)
    for graph in model.graphs():
        graph.sort()
    return report


def _is_low(var: int | None, low_vars: set[int]) -> bool:
    return var is not None and var in low_vars


def _convert_nodes(problem: Problem, assignment: Assignment, report: ApplyReport, cache) -> None:
    """Node variables: report them, and update the dtype-carrying attributes of the low ones."""
    reasons: Counter[str] = Counter()
    for var, node in enumerate(problem.nodes):
        if node is None:
            continue
        if _is_low(var, assignment.low):
            report.converted_nodes += 1
            _update_attributes(node, problem, problem.target, report, cache)
            continue
        why = assignment.forced.get(var, "fewer Casts in fp32 (between fp32 ops)")
        key = why.split(" '")[0].rstrip(":") if "'" in why else why
        reasons[key] += 1
        if len(report.kept_nodes) < 50 and var in assignment.forced:
            report.kept_nodes.append({"node": node.name or node.op_type, "op_type": node.op_type, "reason": why})
    report.kept_fp32 = dict(reasons.most_common())


class _Casts:
    """One Cast per (value, direction), right after the value's producer, made on demand."""

    def __init__(self, target: ir.DataType, namer: _Namer, report: ApplyReport) -> None:
        self.target = target
        self.namer = namer
        self.report = report
        self.made: dict[tuple[int, bool], ir.Value] = {}

    def __call__(self, v: ir.Value, to_low: bool) -> ir.Value:
        key = (id(v), to_low)
        if key in self.made:
            return self.made[key]
        to = self.target if to_low else FLOAT
        out = ir.Value(name=self.namer(f"{v.name or 'value'}_to_{SHORT[to]}"), type=ir.TensorType(to), shape=v.shape)
        node = ir.Node("", "Cast", [v], {"to": ir.AttrInt64("to", int(to))}, outputs=[out],
                       name=self.namer(f"{v.name or 'value'}/Cast_{SHORT[to]}"))
        producer = v.producer()
        if producer is not None:
            producer.graph.insert_after(producer, node)
        else:
            graph = v.graph
            if len(graph):
                graph.insert_before(graph.node(0), node)
            else:
                graph.append(node)
        self.report.casts_inserted += 1
        self.made[key] = out
        return out


def _cast_output(model: ir.Model, graph: ir.Graph, i: int, v: ir.Value, cast: ir.Value, namer: _Namer) -> None:
    """Output ``i`` of ``graph`` becomes ``cast`` (``v`` Cast to the type its reader wants)."""
    if graph is model.graph:
        # The interface keeps its name: the Cast's output takes it.
        name = v.name
        v.name = namer(f"{name}_{SHORT[v.dtype]}")
        cast.name = name
    graph.outputs[i] = cast


def _convert_tensor(tensor, name: str, target, report: ApplyReport, cache) -> ir.Tensor:
    hit = cache.get(id(tensor))
    if hit is not None and hit[2] is tensor:
        low, info, _ = hit
    else:
        data, info = to_low(tensor.numpy(), target)
        low = ir.Tensor(data, name=name)
        cache[id(tensor)] = (low, info, tensor)  # the key's object stays alive while cached
    for kind in ("clamped", "subnormal", "flushed"):
        if kind in info:
            entry = {"tensor": name, "elements": info[kind]}
            if kind == "clamped":
                entry.update(max_abs=info["max_abs"], to=info["to"])
            getattr(report, kind).append(entry)
    return low


def _update_attributes(node: ir.Node, problem: Problem, target, report: ApplyReport, cache) -> None:
    slots = problem.slots.get(problem.var_of_node.get(id(node), -1))
    out0 = node.outputs[0] if node.outputs else None
    if not (slots and 0 in slots.outputs and is_fp32(out0)):
        return
    if node.op_type == "Cast":
        node.attributes["to"] = ir.AttrInt64("to", int(target))
        report.casts_updated += 1
    elif node.op_type == "ConstantOfShape" and "value" in node.attributes:
        t = node.attributes["value"].as_tensor()
        node.attributes["value"] = ir.AttrTensor("value", _convert_tensor(t, t.name or "value", target, report, cache))
    elif node.op_type in DTYPE_ATTR_OPS and "dtype" in node.attributes:
        node.attributes["dtype"] = ir.AttrInt64("dtype", int(target))


def _convert_constants(problem: Problem, low_vars, target, namer, report: ApplyReport, cache) -> None:
    low_uses: dict[int, list[tuple[ir.Node, int]]] = defaultdict(list)
    values: dict[int, ir.Value] = {}
    for node, i, v, var in problem.const_uses:
        if var in low_vars:
            low_uses[id(v)].append((node, i))
            values[id(v)] = v
    low_outputs = [(g, i, v) for g, i, v, var in problem.const_outputs if var in low_vars]
    for g, i, v in low_outputs:
        values.setdefault(id(v), v)
    for key, v in values.items():
        wanted = low_uses.get(key, [])
        as_output = [(g, i) for g, i, w in low_outputs if w is v]
        all_uses = list(v.uses())
        everything_low = len(wanted) == len(all_uses) and not as_output and not v.is_graph_output()
        tensor = constant_tensor(v)
        producer = v.producer()
        if everything_low:
            low = _convert_tensor(tensor, v.name or "const", target, report, cache)
            if producer is not None:  # a Constant node
                producer.attributes["value"] = ir.AttrTensor("value", low)
            else:
                v.const_value = low
            v.type = ir.TensorType(target)  # a new object: clones share types
            report.constants_converted += 1
            continue
        name = namer(f"{v.name or 'const'}_{SHORT[target]}")
        low = _convert_tensor(tensor, name, target, report, cache)
        new = ir.Value(name=name, type=ir.TensorType(target), shape=v.shape, const_value=None)
        if producer is not None:
            node = ir.Node("", "Constant", [], {"value": ir.AttrTensor("value", low)}, outputs=[new],
                           name=namer(f"{producer.name or 'Constant'}_{SHORT[target]}"))
            producer.graph.insert_after(producer, node)
        else:
            new.const_value = low
            v.graph.register_initializer(new)
        for node, i in wanted:
            node.replace_input_with(i, new)
        for g, i in as_output:
            # A body returning a constant: the low copy becomes that output (through an
            # Identity when the copy is an outer initializer, so the body still produces it).
            out = ir.Value(name=namer(f"{name}_out"), type=ir.TensorType(target), shape=v.shape)
            g.append(ir.Node("", "Identity", [new], outputs=[out], name=namer(f"{name}/Identity")))
            g.outputs[i] = out
        report.constants_duplicated += 1


def _clean_casts(model: ir.Model) -> int:
    """No-op Casts removed, exact inner Casts of Cast pairs merged, equal Casts of a value
    merged; returns how many Cast nodes went away."""
    removed = 0
    for graph in model.graphs():
        changed = True
        while changed:
            changed = False
            seen: dict[tuple[int, int], ir.Value] = {}
            for node in list(graph):
                if node.op_type != "Cast" or node.domain not in ("", "ai.onnx") or node.graph is not graph:
                    continue
                x = node.inputs[0]
                to = ir.DataType(node.attributes["to"].as_int())
                out = node.outputs[0]
                if x is not None and x.dtype == to:  # no-op
                    if bypass(graph, out, x):
                        graph.remove(node, safe=True)
                        removed += 1
                        changed = True
                    continue
                inner = x.producer() if x is not None else None
                if (
                    inner is not None and inner.op_type == "Cast" and inner.domain in ("", "ai.onnx")
                    and inner.graph is graph and inner.inputs[0] is not None
                    and _exact(inner.inputs[0].dtype, x.dtype) and len(x.uses()) == 1
                    and not x.is_graph_output()
                ):
                    node.replace_input_with(0, inner.inputs[0])
                    graph.remove(inner, safe=True)
                    removed += 1
                    changed = True
                    continue
                key = (id(x), int(to))
                if key in seen and not out.is_graph_output():
                    ir.convenience.replace_all_uses_with(out, seen[key])
                    graph.remove(node, safe=True)
                    removed += 1
                    changed = True
                    continue
                seen[key] = out
    return removed


_WIDTH = {
    ir.DataType.FLOAT16: (5, 10), ir.DataType.BFLOAT16: (8, 7), ir.DataType.FLOAT: (8, 23),
    ir.DataType.DOUBLE: (11, 52),
}


def _exact(src: ir.DataType | None, mid: ir.DataType | None) -> bool:
    """Casting ``src`` to ``mid`` loses nothing (so a Cast after it may read ``src``)."""
    if src is None or mid is None:
        return False
    if src == mid:
        return True
    a, b = _WIDTH.get(src), _WIDTH.get(mid)
    return a is not None and b is not None and b[0] >= a[0] and b[1] >= a[1]


def count_casts(model: ir.Model) -> int:
    """Cast nodes in every graph (main and bodies)."""
    return sum(
        1 for node in ir.traversal.RecursiveGraphIterator(model.graph)
        if node.op_type == "Cast" and node.domain in ("", "ai.onnx")
    )
