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
With ``underflow`` (the ``auto`` search, which measures), ops whose output never reaches
the target's smallest normal on the calibration inputs (``0 < max |value| < MIN_NORMAL``:
all of it subnormal or flushed to zero in fp16) are sensitive even when they compute or
read weights: the search converts them only where the outputs keep their signal.

The node decisions are a table, :data:`RULES`, tried in order (the first that decides
wins: block list, unknown op, no slot for the target type, unknown element type, allow
list, sensitive op, compute op); the value rules (float-to-int Casts, range, weights,
flushes) then add theirs, and :meth:`Problem._settle` resolves the conflicts.
"""

from __future__ import annotations

__all__ = ["CAST_COST", "RANGE_HEADROOM", "RULES", "WEIGHT_ELEMENTS", "Assignment", "Problem", "Setting", "Site"]

from collections import defaultdict
from collections.abc import Callable
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
MIN_NORMAL = {ir.DataType.FLOAT16: 2.0 ** -14, ir.DataType.BFLOAT16: 2.0 ** -126}


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


@dataclass(frozen=True)
class Setting:
    """What the decisions depend on beyond the node: the target, the opset, the calibration
    stats ({value name: (max |value|, elements)}) and the user's lists."""

    target: ir.DataType
    opset: int
    stats: dict[str, tuple[float, int]]
    block_ops: frozenset[str] = frozenset()
    allow_ops: frozenset[str] = frozenset()
    block_nodes: frozenset[str] = frozenset()
    allow_nodes: frozenset[str] = frozenset()
    underflow: bool = False  # ops whose outputs underflow the target are sensitive (auto)


@dataclass(frozen=True)
class Site:
    """A node being decided: the node, its convertible slots, the setting."""

    node: ir.Node
    slots: policy.Slots
    setting: Setting

    def slot_values(self) -> list[ir.Value | None]:
        """The node's inputs and outputs in convertible slots."""
        node, slots = self.node, self.slots
        return [*(node.inputs[i] for i in slots.inputs if i < len(node.inputs)),
                *(node.outputs[i] for i in slots.outputs if i < len(node.outputs))]


# What a rule decides: (FP32, why) forces fp32, (LOW, "") the low precision, (SENSITIVE, why)
# fp32 unless the auto search relaxes it; None: the next rule decides.
FP32, LOW, SENSITIVE = "fp32", "low", "sensitive"
Decision = tuple[str, str]


def _blocked(site: Site) -> Decision | None:
    if site.node.op_type in site.setting.block_ops or (site.node.name or "") in site.setting.block_nodes:
        return FP32, "block list"
    return None


def _unknown_op(site: Site) -> Decision | None:
    if site.slots.known:
        return None
    return FP32, f"op {site.node.domain or 'ai.onnx'}::{site.node.op_type} unknown to the converter"


def _no_target_slot(site: Site) -> Decision | None:
    if any(is_fp32(v) for v in site.slot_values()):
        return None
    node, target = site.node, site.setting.target
    newer = policy.first_opset_allowing(node, site.setting.opset, target)
    if newer:
        return FP32, (f"ONNX's {node.op_type} takes no {policy.type_name(target)} before opset {newer} "
                      f"(--target-opset {newer} converts it)")
    return FP32, "no input or output may take the target type"


def _unknown_type(site: Site) -> Decision | None:
    if any(v is not None and v.dtype is None for v in site.slot_values()):
        return FP32, "a tensor of unknown element type"
    return None


def _allowed(site: Site) -> Decision | None:
    if site.node.op_type in site.setting.allow_ops or (site.node.name or "") in site.setting.allow_nodes:
        return LOW, ""
    return None


def _sensitive(site: Site) -> Decision | None:
    if site.node.op_type in policy.SENSITIVE and site.node.domain in ("", "ai.onnx"):
        return SENSITIVE, f"precision-sensitive op {site.node.op_type}"
    return None


def _compute(site: Site) -> Decision | None:
    return (LOW, "") if site.node.op_type in policy.COMPUTE else None


# A node's precision constraint: the first rule that decides (a node no rule decides is
# free: the min cut places it). Then, whatever was decided, the value rules of
# Problem._decide/_outputs/_inputs add theirs (float-to-int Casts, range, weights, flushes).
RULES: tuple[Callable[[Site], Decision | None], ...] = (
    _blocked, _unknown_op, _no_target_slot, _unknown_type, _allowed, _sensitive, _compute,
)


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
    underflows: dict[int, str] = field(default_factory=dict)  # var -> reason (sensitive, even if forced low)
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
        underflow: bool = False,
    ) -> Problem:
        """The problem for ``model``: one variable per node, the constraints of :data:`RULES`
        and of the calibration ``stats``, a Cast hyperedge per value; ``underflow`` makes
        ops whose outputs underflow the target sensitive (see the module docstring)."""
        p = cls(target)
        p.HIGH = p.new_var()
        p.LOW = p.new_var()
        p.force_high[p.HIGH] = "anchor"
        p.force_low.add(p.LOW)
        setting = Setting(
            target, model.opset_imports.get("", model.opset_imports.get("ai.onnx", 17)), stats or {},
            block_ops, allow_ops, block_nodes, allow_nodes, underflow,
        )
        for graph in model.graphs():
            for node in graph:
                p._node(node, setting)
        p._interface(model.graph, p.HIGH if keep_io_types else p.LOW)
        for key, v in p.values.items():
            n = setting.stats.get(v.name, (0.0, 0))[1] or _static_elements(v)
            p.cost[key] = CAST_COST + n
        p._settle()
        return p

    def _node(self, node: ir.Node, setting: Setting) -> None:
        """A variable for ``node`` with its constraints, its values and the values it reads."""
        standard = node.domain in ("", "ai.onnx")
        if standard and node.op_type == "Constant":
            return  # constants are no variables (see the module docstring)
        if standard and node.op_type in CONTROL_FLOW:
            self._control_flow(node)
            return
        if not any(is_fp32(v) for v in (*node.inputs, *node.outputs)):
            return
        var = self.new_var(node)
        self.var_of_node[id(node)] = var
        site = Site(node, policy.node_slots(node, setting.opset, setting.target), setting)
        self.slots[var] = site.slots
        self._decide(var, site)
        self._outputs(var, site)
        self._inputs(var, site)

    def _decide(self, var: int, site: Site) -> None:
        """The first rule of :data:`RULES` that decides, then the float-to-int Cast rule."""
        for rule in RULES:
            decision = rule(site)
            if decision is not None:
                kind, reason = decision
                if kind == FP32:
                    self.force_high[var] = reason
                elif kind == LOW:
                    self.force_low.add(var)
                else:
                    self.sensitive[var] = reason
                break
        node = site.node
        if node.op_type == "Cast" and node.inputs and is_fp32(node.inputs[0]):
            to = ir.DataType(node.attributes["to"].as_int())
            stats = site.setting.stats
            big = not stats or stats.get(node.inputs[0].name, (0.0, 0))[0] > 2048
            if not to.is_floating_point() and big:
                self.force_high.setdefault(var, "float-to-integer Cast of values over 2048")

    def _outputs(self, var: int, site: Site) -> None:
        """The node's fp32 outputs, made by ``var`` in its slots; the range rule on them."""
        for i, v in enumerate(site.node.outputs):
            if not is_fp32(v):
                continue
            converts = i in site.slots.outputs
            self._value(v, var if converts else self.HIGH)
            if converts:
                self._range(var, v, site.setting)

    def _range(self, var: int, v: ir.Value, setting: Setting) -> None:
        """The range rules on ``v``, an output ``var`` makes in the target type."""
        peak = setting.stats.get(v.name, (0.0, 0))[0]
        if setting.underflow and 0 < peak < MIN_NORMAL[setting.target]:
            self.underflows.setdefault(var, f"underflows the target on calibration: '{v.name}' peaks at {peak:.3g}")
        if not peak > RANGE_HEADROOM * LIMITS[setting.target][0]:
            return
        if peak >= SENTINEL:
            # finfo.min-style masks: saturated to the target's max they usually
            # still work; only the auto search (which measures) may convert them.
            self.sensitive.setdefault(var, f"mask-like sentinel over the target range: '{v.name}' reaches {peak:.3g}")
        else:
            self.force_high.setdefault(var, f"over the target range on calibration: '{v.name}' reaches {peak:.3g}")

    def _inputs(self, var: int, site: Site) -> None:
        """The node's fp32 inputs: read by ``var`` in its slots; constants per use (weights
        force the low precision, constants that would flush to zero make it sensitive)."""
        node = site.node
        for i, v in enumerate(node.inputs):
            if not is_fp32(v):
                continue
            const = constant_tensor(v)
            if const is None:
                self._consume(v, var if i in site.slots.inputs else self.HIGH, node=node, index=i)
                continue
            if i not in site.slots.inputs:
                continue
            self.const_uses.append((node, i, v, var))
            size = int(np.prod(const.shape.numpy())) if const.shape is not None else 0
            if size >= WEIGHT_ELEMENTS:
                self.force_low.add(var)
            if _flushes(const, LIMITS[site.setting.target][1]):
                self.sensitive.setdefault(var, f"reads a constant that would flush to zero: '{v.name}'")

    def _interface(self, main: ir.Graph, io_var: int) -> None:
        """The main graph's inputs and outputs, made and read by ``io_var``."""
        for v in main.inputs:
            if is_fp32(v) and constant_tensor(v) is None:
                self._value(v, io_var)
        for i, v in enumerate(main.outputs):
            self._consume(v, io_var, graph=main, index=i)

    def _settle(self) -> None:
        """Compute ops and weights win over sensitivity, except an underflow's; a block list or
        an overflow wins over all."""
        for var, why in self.underflows.items():
            if var not in self.force_high:
                self.force_low.discard(var)
                self.sensitive.setdefault(var, why)
        self.force_low -= set(self.force_high)
        for var in list(self.sensitive):
            if var in self.force_low or var in self.force_high:
                del self.sensitive[var]

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
