"""Choosing each op's precision: constraints from the policy, the rest by a minimum cut.

A :class:`Problem` is built from a model once and solved many times (the ``auto``
search re-solves it with different sensitive regions allowed to convert):

- *variables*: one per node with fp32 tensors (all its convertible slots share it), one
  per carried value of an If/Loop/Scan (so a body's interface converts consistently with
  the node outside it), and two anchors: fp32 (``HIGH``) and low (``LOW``);
- *values*: every non-constant fp32 tensor, with its producer's variable and the
  variables of its consumers (graph outputs consume through an anchor or a control-flow
  variable). A value costs one Cast when its producer and some consumer disagree; the
  cost is ``CAST_COST + elements`` so the cut first minimises the number of Casts and
  then puts them on the smallest tensors (a Cast before an ``Expand``, after a ``Gather``);
- *constants* (initializers and Constant nodes) are not variables: each consumer gets
  the constant in its own precision (converted offline, duplicated only when both are
  needed), so they never cost a Cast.

Forced fp32 (with a reason each, reported): user block lists, sensitive ops (unless
``relaxed``), ops gcomp does not know, outputs over the target's range on the
calibration inputs (over ``RANGE_HEADROOM`` × the largest finite value), float→int Casts
of values over 2048 (fp16 integers are exact only below it). Sensitive, like the ops of
:data:`~.policy.SENSITIVE` (fp32 unless the ``auto`` search relaxes them): consumers of
small constants that would flush to zero (an ``eps`` of 1e-12 in fp16), and ops whose
out-of-range values are mask sentinels (``SENTINEL``: ``finfo(float32).min`` fills).
Forced low: compute ops (:data:`~.policy.COMPUTE`) and nodes
reading a float constant of ``WEIGHT_ELEMENTS`` or more, so weights always halve.
"""

from __future__ import annotations

__all__ = ["CAST_COST", "RANGE_HEADROOM", "WEIGHT_ELEMENTS", "Assignment", "Problem"]

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from gcomp.passes.precision import policy
from gcomp.passes.precision.mincut import Cut

CAST_COST = 1 << 40
RANGE_HEADROOM = 0.5
SENTINEL = 1e30  # no activation is this large: such values are masks (finfo.min), not overflow
WEIGHT_ELEMENTS = 1024
FLOAT = ir.DataType.FLOAT
CONTROL_FLOW = ("If", "Loop", "Scan")
LIMITS = {ir.DataType.FLOAT16: (65504.0, 2.0 ** -24), ir.DataType.BFLOAT16: (3.3895e38, 2.0 ** -133)}


def is_fp32(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == FLOAT


def constant_tensor(value: ir.Value) -> ir.TensorProtocol | None:
    """The tensor of an initializer or of a Constant node's ``value``; None otherwise."""
    if value.const_value is not None and not value.is_graph_input():
        return value.const_value
    node = value.producer()
    if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
        attr = node.attributes.get("value")
        if attr is not None and attr.type == ir.AttributeType.TENSOR:
            return attr.as_tensor()
    return None


@dataclass
class Assignment:
    low: set[int]  # variables on the low side
    cut_weight: int
    forced: dict[int, str]  # variable -> why it is fp32


@dataclass
class Problem:
    """The model's precision variables and Cast hyperedges (see the module docstring)."""

    target: ir.DataType
    var_of_node: dict[int, int] = field(default_factory=dict)  # id(node) -> var
    nodes: list[ir.Node | None] = field(default_factory=list)  # var -> node (None: anchor/carried)
    slots: dict[int, policy.Slots] = field(default_factory=dict)  # var -> slots
    producer: dict[int, int] = field(default_factory=dict)  # id(value) -> var
    consumers: dict[int, set[int]] = field(default_factory=lambda: defaultdict(set))
    values: dict[int, ir.Value] = field(default_factory=dict)
    cost: dict[int, int] = field(default_factory=dict)  # id(value) -> Cast cost
    force_high: dict[int, str] = field(default_factory=dict)
    force_low: set[int] = field(default_factory=set)
    sensitive: dict[int, str] = field(default_factory=dict)  # var -> reason (high unless relaxed)
    carried: dict[tuple[int, str, int], int] = field(default_factory=dict)  # (id(node), kind, i) -> var
    input_var: dict[tuple[int, int], int] = field(default_factory=dict)  # (id(node), input) -> reading var
    output_var: dict[tuple[int, int], int] = field(default_factory=dict)  # (id(graph), output) -> reading var
    const_uses: list[tuple[ir.Node, int, ir.Value, int]] = field(default_factory=list)  # (node, input, value, var)
    # (graph, output, value, var)
    const_outputs: list[tuple[ir.Graph, int, ir.Value, int]] = field(default_factory=list)
    HIGH: int = 0
    LOW: int = 1

    def new_var(self, node: ir.Node | None = None) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    @classmethod
    def build(
        cls,
        model: ir.Model,
        target: ir.DataType,
        *,
        keep_io_types: bool = True,
        block_ops: frozenset[str] = frozenset(),
        allow_ops: frozenset[str] = frozenset(),
        block_nodes: frozenset[str] = frozenset(),
        allow_nodes: frozenset[str] = frozenset(),
        stats: dict[str, tuple[float, int]] | None = None,
    ) -> Problem:
        p = cls(target)
        p.HIGH = p.new_var()
        p.LOW = p.new_var()
        p.force_high[p.HIGH] = "anchor"
        p.force_low.add(p.LOW)
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 17))
        stats = stats or {}
        fmax, tiny = LIMITS[target]
        io_var = p.HIGH if keep_io_types else p.LOW

        for graph in model.graphs():
            for node in graph:
                if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                    continue
                if node.op_type in CONTROL_FLOW and node.domain in ("", "ai.onnx"):
                    p._control_flow(node)
                    continue
                if not any(is_fp32(v) for v in (*node.inputs, *node.outputs)):
                    continue
                var = p.new_var(node)
                p.var_of_node[id(node)] = var
                slots = policy.node_slots(node, opset, target)
                p.slots[var] = slots
                name = node.name or ""
                op = node.op_type
                if op in block_ops or name in block_nodes:
                    p.force_high[var] = "block list"
                elif not slots.known:
                    p.force_high[var] = f"op {node.domain or 'ai.onnx'}::{op} unknown to the converter"
                elif not any(is_fp32(node.inputs[i]) for i in slots.inputs if i < len(node.inputs)) and not any(
                    is_fp32(node.outputs[i]) for i in slots.outputs if i < len(node.outputs)
                ):
                    newer = policy.first_opset_allowing(node, opset, target)
                    p.force_high[var] = (
                        f"ONNX's {op} takes no {policy.type_name(target)} before opset {newer} "
                        f"(--target-opset {newer} converts it)" if newer
                        else "no input or output may take the target type"
                    )
                elif any(
                    v is not None and v.dtype is None
                    for v in [*(node.inputs[i] for i in slots.inputs if i < len(node.inputs)),
                              *(node.outputs[i] for i in slots.outputs if i < len(node.outputs))]
                ):
                    p.force_high[var] = "a tensor of unknown element type"
                elif op in allow_ops or name in allow_nodes:
                    p.force_low.add(var)
                elif op in policy.SENSITIVE and node.domain in ("", "ai.onnx"):
                    p.sensitive[var] = f"precision-sensitive op {op}"
                elif op in policy.COMPUTE:
                    p.force_low.add(var)
                if op == "Cast" and node.inputs and is_fp32(node.inputs[0]):
                    to = ir.DataType(node.attributes["to"].as_int())
                    big = not stats or stats.get(node.inputs[0].name, (0.0, 0))[0] > 2048
                    if not to.is_floating_point() and big:
                        p.force_high.setdefault(var, "float-to-integer Cast of values over 2048")
                for i, v in enumerate(node.outputs):
                    if not is_fp32(v):
                        continue
                    p._value(v, var if i in slots.outputs else p.HIGH)
                    peak = stats.get(v.name, (0.0, 0))[0]
                    if i in slots.outputs and peak > RANGE_HEADROOM * fmax:
                        if peak >= SENTINEL:
                            # finfo.min-style masks: saturated to the target's max they usually
                            # still work; only the auto search (which measures) may convert them.
                            p.sensitive.setdefault(
                                var, f"mask-like sentinel over the target range: '{v.name}' reaches {peak:.3g}")
                        else:
                            p.force_high.setdefault(
                                var, f"over the target range on calibration: '{v.name}' reaches {peak:.3g}")
                for i, v in enumerate(node.inputs):
                    if not is_fp32(v):
                        continue
                    const = constant_tensor(v)
                    if const is not None:
                        if i in slots.inputs:
                            p.const_uses.append((node, i, v, var))
                            size = int(np.prod(const.shape.numpy())) if const.shape is not None else 0
                            if size >= WEIGHT_ELEMENTS:
                                p.force_low.add(var)
                            if _flushes(const, tiny):
                                p.sensitive.setdefault(var, f"reads a constant that would flush to zero: '{v.name}'")
                        continue
                    reader = var if i in slots.inputs else p.HIGH
                    p.consumers[id(v)].add(reader)
                    p.values[id(v)] = v
                    p.input_var[(id(node), i)] = reader

        main = model.graph
        for v in main.inputs:
            if is_fp32(v) and constant_tensor(v) is None:
                p._value(v, io_var)
        for i, v in enumerate(main.outputs):
            p._consume(v, io_var, graph=main, index=i)
        for key, v in p.values.items():
            n = stats.get(v.name, (0.0, 0))[1] or _static_elements(v)
            p.cost[key] = CAST_COST + n
        # Compute ops and weights win over sensitivity; a block list or an overflow wins over all.
        p.force_low -= set(p.force_high)
        for var in list(p.sensitive):
            if var in p.force_low or var in p.force_high:
                del p.sensitive[var]
        return p

    def _value(self, v: ir.Value, var: int) -> None:
        self.producer[id(v)] = var
        self.values[id(v)] = v

    def _consume(self, v: ir.Value | None, var: int, node: ir.Node | None = None, index: int = -1,
                 graph: ir.Graph | None = None) -> None:
        """``var`` reads ``v``: as a node input (``node``, ``index``) or as output ``index`` of ``graph``."""
        if not is_fp32(v):
            return
        if node is not None:
            self.input_var[(id(node), index)] = var
        else:
            self.output_var[(id(graph), index)] = var
        if constant_tensor(v) is None:
            self.consumers[id(v)].add(var)
            self.values[id(v)] = v
        elif node is not None:
            self.const_uses.append((node, index, v, var))
        else:
            self.const_outputs.append((graph, index, v, var))

    def _control_flow(self, node: ir.Node) -> None:
        """Variables for values that cross a body's interface (see the module docstring)."""
        op = node.op_type

        def link(kind, i, outer_in=None, in_index=-1, body=None, body_in=None, out_index=-1, outer_out=None):
            body_out = body.outputs[out_index] if body is not None and out_index >= 0 else None
            if not any(is_fp32(x) for x in (outer_in, body_in, body_out, outer_out)):
                return None
            var = self.new_var()
            self.carried[(id(node), kind, i)] = var
            self._consume(outer_in, var, node=node, index=in_index)
            self._consume(body_out, var, graph=body, index=out_index)
            for x in (body_in, outer_out):
                if is_fp32(x):
                    self._value(x, var)
            return var

        if op == "If":
            then_b, else_b = (node.attributes[k].as_graph() for k in ("then_branch", "else_branch"))
            for i, out in enumerate(node.outputs):
                var = link("out", i, body=then_b, out_index=i, outer_out=out)
                if var is not None:
                    self._consume(else_b.outputs[i], var, graph=else_b, index=i)
        elif op == "Loop":
            body = node.attributes["body"].as_graph()
            carried = len(node.inputs) - 2
            for j in range(carried):
                link("carried", j, node.inputs[2 + j], 2 + j, body, body.inputs[2 + j], 1 + j, node.outputs[j])
            for k in range(len(body.outputs) - 1 - carried):
                link("scan", k, body=body, out_index=1 + carried + k, outer_out=node.outputs[carried + k])
        elif op == "Scan":
            body = node.attributes["body"].as_graph()
            m = node.attributes["num_scan_inputs"].as_int()
            n_state = len(node.inputs) - m
            for j in range(n_state):
                link("carried", j, node.inputs[j], j, body, body.inputs[j], j, node.outputs[j])
            for k in range(m):
                link("scan_in", k, node.inputs[n_state + k], n_state + k, body, body.inputs[n_state + k])
            for k in range(len(body.outputs) - n_state):
                link("scan", k, body=body, out_index=n_state + k, outer_out=node.outputs[n_state + k])

    def solve(self, relaxed: set[int] = frozenset()) -> Assignment:
        """Minimum cut with sensitive variables fp32 except those in ``relaxed``."""
        cut = Cut(len(self.nodes))
        forced = dict(self.force_high)
        for var, why in self.sensitive.items():
            if var not in relaxed:
                forced[var] = why
        for var in forced:
            cut.force_high(var)
        for var in self.force_low:
            cut.force_low(var)
        for var in range(len(self.nodes)):
            if var not in forced and var not in self.force_low:
                cut.prefer_low(var, 1)  # ties go to the low precision
        for key in self.values:
            members = set(self.consumers.get(key, ()))
            if key in self.producer:
                members.add(self.producer[key])
            cut.hyperedge(members, self.cost.get(key, CAST_COST))
        low, weight = cut.solve()
        return Assignment(low, weight, forced)

    def regions(self, assignment: Assignment) -> list[set[int]]:
        """Connected groups of fp32 variables that contain a sensitive op (auto's units)."""
        high = set(range(len(self.nodes))) - assignment.low - {self.HIGH}
        adjacency: dict[int, set[int]] = defaultdict(set)
        for key in self.values:
            members = set(self.consumers.get(key, ()))
            if key in self.producer:
                members.add(self.producer[key])
            members &= high
            for a in members:
                adjacency[a] |= members - {a}
        seen: set[int] = set()
        out = []
        for start in sorted(self.sensitive):
            if start in seen or start not in high:
                continue
            comp, stack = set(), [start]
            while stack:
                a = stack.pop()
                if a in comp:
                    continue
                comp.add(a)
                stack.extend(adjacency[a] - comp)
            seen |= comp
            out.append({v for v in comp if v in self.sensitive})
        return out


def _static_elements(v: ir.Value) -> int:
    if v.shape is None:
        return 1
    n = 1
    for d in v.shape:
        if not isinstance(d, int):
            return 1
        n *= d
    return n


def _flushes(tensor: ir.TensorProtocol, tiny: float) -> bool:
    """All nonzero elements would round to zero in the target type (an eps of 1e-12)."""
    size = int(np.prod(tensor.shape.numpy())) if tensor.shape is not None else 0
    if size == 0 or size > 64:
        return False  # only small constants like eps matter; large tensors are reported
    a = np.abs(tensor.numpy().astype(np.float64))
    nz = a[a > 0]
    return nz.size > 0 and bool(np.all(nz < tiny / 2))
