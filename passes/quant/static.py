"""The ``quantize-static`` pass: int8 weights and int8 activations with calibrated ranges, as
QDQ (QuantizeLinear/DequantizeLinear pairs around float ops).

Math (``round`` is round-half-to-even, as ONNX QuantizeLinear rounds):

- Activation ``X`` (a tensor between quantized ops), from its calibrated range ``(lo, hi)``
  (:mod:`._calibration`: minmax, percentile or entropy over the calibration samples)::

      asymmetric (default), uint8:  lo' = min(lo, 0), hi' = max(hi, 0)
                                    s = (hi' - lo') / 255        (s = 1 when hi' == lo')
                                    z = clip(round(-lo' / s), 0, 255)
      symmetric, int8:              s = max(|lo|, |hi|) / 127    (s = 1 when that is 0), z = 0

      Q(X) = clip(round(X / s) + z, qmin, qmax)      DQ(q) = (q - z) * s

  so 0 is exact and ``|X - DQ(Q(X))| <= s / 2`` inside the range (values outside it clip).
- Weight ``W`` (always int8 symmetric), one scale per output channel (``per_channel``: Conv
  ``[M, C/g, k...]`` axis 0; MatMul ``[K, N]`` axis 1; Gemm axis 1, or 0 with ``transB``) or
  one per tensor::

      s_w[m] = max |W[m, ...]| / 127   (s_w = 1 where that is 0)
      Wq = clip(round(W / s_w), -127, 127)   int8, zero point 0

- Bias ``b`` of Conv/Gemm: int32, scale ``s_x * s_w[m]`` (float32 product; the input's
  activation scale times the weight's), zero point 0::

      bq[m] = clip(round(b[m] / (s_x * s_w[m])), -2^31, 2^31 - 1)

  which is what ONNX Runtime's QLinearConv/QGemm take as their bias (the int32
  accumulator's own scale), so its fused kernels and the QDQ model agree.

Representation: a weight becomes an int8 initializer read through ``DequantizeLinear``
(``axis`` per channel); a bias an int32 initializer read the same way; a quantized
activation ``X`` gets one ``X -> QuantizeLinear -> DequantizeLinear`` pair right after its
producer, and every consumer of ``X`` reads the DequantizeLinear output (a tensor consumed
by several quantized nodes shares one pair). The float ops stay as they are, keeping their
ONNX names. ONNX Runtime (``ORT_ENABLE_ALL``, CPU) fuses ``DQ -> op -> Q`` groups into
integer kernels (its QDQ selectors, ``qdq_selector_action_transformer.cc``): Conv ->
QLinearConv, MatMul -> QLinearMatMul (MatMulIntegerToFloat without an output Q), Gemm ->
QGemm, Add/Mul -> QLinearAdd/QLinearMul, AveragePool/GlobalAveragePool ->
QLinearAveragePool/QLinearGlobalAveragePool, Concat -> QLinearConcat, and drops the pairs
around MaxPool, Reshape, Flatten, Transpose, Squeeze and Unsqueeze when the pair after the
op has the same scale and zero point as the one before (so those ops run on int8).

Placement:

- The quantized nodes are the Conv/MatMul/Gemm candidates (``op_types``; constant float32
  weights) minus ``exclude_nodes``; their float activation inputs get pairs.
- Their outputs get pairs, except a MatMul/Gemm output that no int8 op reads (it stays
  float: ORT's MatMulIntegerToFloat/QGemm return float). Where a quantized op's only
  consumer is a Relu, or a Clip with constant min 0 and max, the pair goes after that
  activation, with the activation output's range: ``lo' = 0`` gives ``z = 0``, the uint8
  minimum, so the Q clips exactly as the activation does and ORT drops it into the fused op
  (``IsClipMadeRedundantByQ``). With ``symmetric_activations`` (``z = 0`` is not int8's
  minimum) the pair stays on the op's own output; ONNX Runtime's x86 kernels take uint8
  activations, so it converts int8 pairs and fuses less of that form (3 of the 4 Convs of
  tests/test_quantize_static.py's CNN, no Add).
- The other ops of ``op_types`` (not named in ``exclude_nodes``) join the int8 region when
  every data input already has a pair and their output is read by a quantized node or
  another joined op (found walking backwards): Add/Mul (both inputs), Concat (all inputs),
  AveragePool/GlobalAveragePool (their output gets its own calibrated pair, after a Relu
  as above), MaxPool/Reshape/Flatten/Transpose/Squeeze/Unsqueeze (their output pair
  reuses the input's scale and zero point: ORT drops both pairs only then). On ResNet-18
  ORT then runs every op but the first QuantizeLinear and two layout Transposes as an
  integer kernel (docs/measurements.md).
- Graph inputs and outputs stay float: a pair on a graph output ends in a DequantizeLinear
  that takes over the output's name.

Calibration: the pass needs ``context.calibration`` (the core's ``--calibration`` samples,
a list of feed dicts) and ``context.runtime``; ``GcompError`` without samples. Every tensor
needing its own range is exposed as an extra output of a copy of the float model, which is
run once per sample (twice for percentile/entropy: min/max, then the histogram).

Guarantees: on the main graph, every Conv (constant float32 weight of rank >= 3, bias
absent or a constant 1-D ``[M]``), MatMul (constant 2-D float32 ``[K, N]`` weight) and
Gemm (constant B, ``transA=0``, ``alpha=1``, ``beta=1`` with a bias, bias absent or a
constant 1-D ``[N]``) on a float32 activation is quantized as above and keeps its ONNX
name (an unnamed one is called ``<op_type>_<index>``); the float weights and biases nothing
reads any more are removed; two nodes sharing a weight share its int8 copy. Refused nodes
stay float with their reason in ``details["skipped"]``; an already-quantized model is left
unchanged (``details["note"]``). ``details`` also lists ``int8_ops`` (the ops joined),
``activations`` (pairs inserted) and ``calibration``; ``weight_bytes_before``/``_after``
count the biases with the weights. OptionError: a model below opset 13 (per-axis
DequantizeLinear) or 10 (per tensor); unknown ``op_types``, ``calibration_method`` or a
``percentile`` outside (50, 100]. TVM targets are accepted: TVM 0.27's ONNX frontend
imports QuantizeLinear/DequantizeLinear with ``axis`` (opsets 10 to 23), and runs the
test CNN's QDQ model as ONNX Runtime does (tests/test_quantize_static.py).

Scopes: the main graph only (subgraphs and model functions stay float).
"""

from __future__ import annotations

__all__ = ["COMPUTE_OPS", "INT8_OPS", "OP_TYPES", "QuantizeStatic", "activation_params", "candidates",
           "weight_int8"]

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import onnx_ir as ir

from gcomp.errors import GcompError, OptionError
from gcomp.passes.quant import _calibration
from gcomp.passes.quant._common import (TARGET_HELP, Candidate, Const, QuantPass, Workspace, gemm_refusal,
                                        linear_candidates, node_label, read_const, require_opset)
from gcomp.passes.quant.dynamic import quantize_int8
from gcomp.registry import PassContext, register_pass

COMPUTE_OPS = ("Conv", "MatMul", "Gemm")
# Ops that join the int8 region between quantized nodes, and how ORT's CPU QDQ selectors
# treat them: "own" = a QLinear op requantizing to its own output scale; "same" = the pairs
# around it are dropped when both have one scale and zero point.
INT8_OPS = {
    "Add": "own", "Mul": "own", "Concat": "own", "AveragePool": "own", "GlobalAveragePool": "own",
    "MaxPool": "same", "Reshape": "same", "Flatten": "same", "Transpose": "same", "Squeeze": "same",
    "Unsqueeze": "same",
}
OP_TYPES = COMPUTE_OPS + tuple(INT8_OPS)
_MULTI_INPUT = ("Add", "Mul", "Concat")
_STANDARD = ("", "ai.onnx")
_INT32 = np.iinfo(np.int32)


def activation_params(lo: float, hi: float, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """(scale float32, zero point uint8 or int8), both 0-D, of a tensor ranging ``[lo, hi]``."""
    if symmetric:
        amax = max(abs(lo), abs(hi))
        return np.array(amax / 127 if amax > 0 else 1.0, np.float32), np.array(0, np.int8)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = np.float32((hi - lo) / 255 if hi > lo else 1.0)
    zero = np.clip(np.round(-lo / scale), 0, 255)
    return np.array(scale, np.float32), np.array(zero, np.uint8)


def weight_int8(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(Wq int8 of ``w``'s shape, scale float32 ``[w.shape[axis]]``, or 0-D when ``axis`` is None)."""
    if axis is None:
        q, scale = quantize_int8(w.reshape(-1, 1), False)
        return q.reshape(w.shape), scale
    moved = np.moveaxis(w, axis, -1)
    q, scale = quantize_int8(moved.reshape(-1, moved.shape[-1]), True)
    return np.moveaxis(q.reshape(moved.shape), -1, axis), scale


def candidates(model: ir.Model, op_types: Sequence[str] = COMPUTE_OPS) -> list[tuple[str, str]]:
    """``(node name, op_type)`` of every Conv/MatMul/Gemm ``quantize-static`` would quantize
    (main graph, before ``exclude_nodes``), without changing the model."""
    return [(c.name, c.op_type) for c in _find(model.graph, op_types) if c.reason is None and _refusal(c) is None]


def _find(graph: ir.Graph, op_types: Sequence[str]) -> list[Candidate]:
    found = linear_candidates(graph, op_types)
    if "Conv" in op_types:
        found += [_conv(node, index) for index, node in enumerate(graph)
                  if node.op_type == "Conv" and node.domain in _STANDARD]
    order = {id(node): i for i, node in enumerate(graph)}
    return sorted(found, key=lambda c: order[id(c.node)])


def _conv(node: ir.Node, index: int) -> Candidate:
    x, w, b = (list(node.inputs) + [None, None, None])[:3]
    c = Candidate(node, node_label(node, index), "Conv", activation=x, weight=read_const(w), bias=b)
    if c.weight is None:
        c.reason = "the weight is not a constant"
    elif read_const(x) is not None:
        c.reason = "the input is a constant (constant folding's work)"
    elif c.weight.array.dtype != np.float32 or c.weight.array.ndim < 3:
        c.reason = f"the weight is {c.weight.array.ndim}-D {c.weight.array.dtype}, not a float32 Conv kernel"
    elif x is not None and x.dtype not in (None, ir.DataType.FLOAT):
        c.reason = f"the input is {x.dtype.name}, not float32"
    return c


def _refusal(c: Candidate) -> str | None:
    """Why ``c`` cannot be quantized statically (beyond what finding it checked)."""
    if c.op_type == "Gemm" and (reason := gemm_refusal(c)):
        return reason
    if c.bias is None:
        return None
    bias = read_const(c.bias)
    channels = c.weight.array.shape[0] if c.op_type == "Conv" else c.kn[1]
    if bias is None:
        return "the bias is not a constant (an int32 bias needs its values)"
    if bias.array.dtype != np.float32 or bias.array.shape != (channels,):
        return f"the bias is {bias.array.dtype} {list(bias.array.shape)}, not float32 [{channels}]"
    return None


def _weight_axis(c: Candidate) -> int:
    """The output-channel axis of ``c``'s weight as stored."""
    return 0 if c.op_type == "Conv" or c.trans_b else 1


@dataclass
class _Plan:
    """Which tensors get a Q/DQ pair and whose scale each uses."""

    values: list[ir.Value] = field(default_factory=list)  # in insertion order
    root: dict[int, ir.Value] = field(default_factory=dict)  # id(value) -> the value whose range it uses
    joined: list[tuple[ir.Node, str]] = field(default_factory=list)  # (node, label)

    def own(self) -> list[ir.Value]:
        """The tensors calibrated for their own range."""
        return [v for v in self.values if self.root[id(v)] is v]


def _after_activation(node: ir.Node, symmetric: bool) -> ir.Value:
    """``node``'s output, or the output of the Relu/Clip(0, max) that is its only consumer."""
    out = node.outputs[0]
    uses = list(out.uses())
    if symmetric or out.is_graph_output() or len(uses) != 1 or uses[0].idx != 0:
        return out
    user = uses[0].node
    if user.graph is not node.graph or user.domain not in _STANDARD:
        return out
    if user.op_type == "Relu" or (user.op_type == "Clip" and _clips_from_zero(user)):
        return user.outputs[0]
    return out


def _clips_from_zero(node: ir.Node) -> bool:
    """A Clip whose min is the constant 0 and whose max is a constant (opset 6 or 11+ form)."""
    if len(node.inputs) > 1:
        bounds = [read_const(v) if v is not None else None for v in node.inputs[1:3]]
        if len(bounds) < 2 or any(b is None or b.array.size != 1 for b in bounds):
            return False
        low, high = (float(b.array.reshape(())) for b in bounds)
    else:
        low_attr, high_attr = node.attributes.get("min"), node.attributes.get("max")
        if low_attr is None or high_attr is None:
            return False
        low, high = float(low_attr.value), float(high_attr.value)
    return low == 0.0 and high > 0.0


def _data_inputs(node: ir.Node) -> list[ir.Value | None]:
    return list(node.inputs) if node.op_type in _MULTI_INPUT else list(node.inputs[:1])


def _plan(graph: ir.Graph, todo: Sequence[Candidate], op_types: Sequence[str], exclude: frozenset[str],
          symmetric: bool) -> _Plan:
    """Forward: the quantized nodes' inputs and outputs, then each op of ``op_types`` whose
    data inputs all have pairs; backward: keep what a quantized node or kept op reads."""
    nodes = {id(c.node) for c in todo}
    int8: dict[int, ir.Value] = {id(c.activation): c.activation for c in todo}
    root: dict[int, ir.Value] = {}
    outputs, joined = {}, []
    for index, node in enumerate(graph):
        if id(node) in nodes:
            out = _after_activation(node, symmetric)
            int8[id(out)] = outputs[id(node)] = out
            continue
        kind = INT8_OPS.get(node.op_type) if node.op_type in op_types and node.domain in _STANDARD else None
        label = node_label(node, index)
        data = _data_inputs(node)
        if kind is None or label in exclude or any(v is None or id(v) not in int8 for v in data):
            continue
        if kind == "same":
            out = node.outputs[0]
            root[id(out)] = root.get(id(data[0]), data[0])
        else:
            out = _after_activation(node, symmetric)
        int8[id(out)] = out
        joined.append((node, label, out))
    needed = {id(c.activation) for c in todo} | {id(outputs[id(c.node)]) for c in todo if c.op_type == "Conv"}
    plan = _Plan()
    for node, label, out in reversed(joined):
        if id(out) in needed:
            plan.joined.insert(0, (node, label))
            needed.update(id(v) for v in _data_inputs(node))
    plan.values = [v for key, v in int8.items() if key in needed]
    plan.root = {id(v): root.get(id(v), v) for v in plan.values}
    return plan


def _option_problem(op_types: Sequence[str], method: str, percentile: float) -> str | None:
    unknown = sorted(set(op_types) - set(OP_TYPES))
    problems = [
        (unknown, f"op_types {', '.join(unknown)} not supported (supported: {', '.join(OP_TYPES)})"),
        (method not in _calibration.METHODS,
         f"calibration_method must be one of {', '.join(_calibration.METHODS)}, got {method!r}"),
        (not 50.0 < percentile <= 100.0, f"percentile must be in (50, 100], got {percentile:g}"),
    ]
    return next((text for failed, text in problems if failed), None)


@register_pass("quantize-static")
class QuantizeStatic(QuantPass):
    """int8 static quantization as QDQ: int8 weights, activations with calibrated ranges (needs --calibration)."""

    def __init__(
        self,
        *,
        target: Annotated[str, TARGET_HELP] = "portable",
        per_channel: Annotated[bool, "one weight scale per output channel (else one per tensor)"] = True,
        symmetric_activations: Annotated[bool, "int8 activations with zero point 0, for targets that want "
                                               "it (else uint8 with a zero point: ONNX Runtime's x86 kernels "
                                               "take uint8 and fold a Relu into the op only then)"] = False,
        calibration_method: Annotated[str, "activation ranges: minmax, percentile or entropy (KL)"] = "minmax",
        percentile: Annotated[float, "percentile method: the share of values kept, in %"] = 99.999,
        op_types: Annotated[tuple, "op types quantized (Conv, MatMul, Gemm) or kept int8 between them "
                                   f"({', '.join(INT8_OPS)})"] = OP_TYPES,
        exclude_nodes: Annotated[tuple, "ONNX node names kept float"] = (),
        context: PassContext | None = None,
    ) -> None:
        super().__init__(target=target, exclude_nodes=exclude_nodes, context=context)
        problem = _option_problem(op_types, calibration_method, percentile)
        if problem:
            raise OptionError(f"quantize-static: {problem}")
        self.per_channel, self.symmetric = per_channel, symmetric_activations
        self.method, self.percentile, self.op_types = calibration_method, percentile, tuple(op_types)
        self._plan: _Plan | None = None
        self._params: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._dequantized: dict[Any, ir.Value] = {}

    # -- the QuantPass hooks
    def find(self, model: ir.Model) -> list[Candidate]:
        caps = self.capabilities()
        if caps is not None and not all(caps.accepts("", op, 13) for op in ("QuantizeLinear", "DequantizeLinear")):
            raise OptionError(f"target {self.target} does not run QuantizeLinear/DequantizeLinear")
        self._plan, self._params, self._dequantized = None, {}, {}
        return _find(model.graph, self.op_types)

    def refusal(self, c: Candidate) -> str | None:
        return _refusal(c)

    def check(self, model: ir.Model, todo: list[Candidate]) -> None:
        """Place the pairs and calibrate their ranges, before any node changes."""
        if self.per_channel:
            require_opset(model, 13, "quantize-static per channel (per-axis DequantizeLinear)")
        else:
            require_opset(model, 10, "quantize-static (QuantizeLinear/DequantizeLinear)")
        samples = self.context.calibration if self.context is not None else None
        if not samples:
            raise GcompError("quantize-static needs calibration samples (--calibration)")
        runtime = self.context.need_runtime("quantize-static calibration")
        plan = _plan(model.graph, todo, self.op_types, self.exclude_nodes, self.symmetric)
        _name_unnamed(Workspace(model), plan.own())
        ranges = _calibration.collect(model, runtime, samples, plan.own(), method=self.method,
                                      percentile=self.percentile, symmetric=self.symmetric)
        self._params = {id(v): activation_params(*ranges[v.name], self.symmetric) for v in plan.own()}
        self._plan = plan

    def quantize(self, ws: Workspace, c: Candidate) -> Any:
        axis = _weight_axis(c) if self.per_channel else None
        key = ("weight", id(c.weight.root), axis)
        base = c.weight.root.name or c.name

        def arrays():
            q, scale = weight_int8(c.weight.array, axis)
            return [(f"{base}_int8", q), (f"{base}_scale", scale),
                    (f"{base}_zero_point", np.zeros(scale.shape, np.int8))]

        made = ws.initializers(key, arrays)
        c.node.replace_input_with(1, self._dequantize(ws, key, made, axis, c))
        if c.bias is not None:
            self._bias(ws, c, made[1].const_value.numpy(), axis)
        c.node.name = c.name
        return key

    def call(self, model: ir.Model):
        result = super().call(model)
        if self._plan is not None and result.modified:
            ws = Workspace(model)
            for value in self._plan.values:
                _insert_pair(ws, value, *self._activation(ws, value))
            result.details.update(
                int8_ops=[{"node": label, "op_type": node.op_type} for node, label in self._plan.joined],
                activations=len(self._plan.values),
                calibration={"method": self.method, "samples": len(self.context.calibration),
                             "tensors": len(self._plan.own())})
        self._plan, self._params, self._dequantized = None, {}, {}
        return result

    # -- helpers
    def _activation(self, ws: Workspace, value: ir.Value) -> list[ir.Value]:
        """The scale and zero point initializers of ``value``'s pair (shared by its root)."""
        root = self._plan.root[id(value)]
        scale, zero = self._params[id(root)]
        return ws.initializers(("activation", id(root)), lambda: [(f"{root.name}_scale", scale),
                                                                  (f"{root.name}_zero_point", zero)])

    def _dequantize(self, ws: Workspace, key: Any, made: Sequence[ir.Value], axis: int | None,
                    c: Candidate) -> ir.Value:
        """One DequantizeLinear of the initializers ``made`` per ``key``, before ``c``'s node."""
        if key not in self._dequantized:
            dq = ws.node("DequantizeLinear", made, ws.fresh(f"{made[0].name}/DequantizeLinear"),
                         attributes={} if axis is None else {"axis": axis})
            dq.outputs[0].dtype = ir.DataType.FLOAT
            dq.outputs[0].shape = ir.Shape(made[0].shape)
            ws.graph.insert_before(c.node, dq)
            self._dequantized[key] = dq.outputs[0]
        return self._dequantized[key]

    def _bias(self, ws: Workspace, c: Candidate, weight_scale: np.ndarray, axis: int | None) -> None:
        """The bias input becomes DequantizeLinear(int32, s_x * s_w, 0)."""
        bias: Const = read_const(c.bias)
        ws.touch(bias)
        input_scale = self._params[id(self._plan.root[id(c.activation)])][0]
        scale = (input_scale * weight_scale).astype(np.float32)
        key = ("bias", id(bias.root), scale.tobytes())
        base = bias.root.name or f"{c.name}_bias"

        def arrays():
            q = np.clip(np.round(bias.array.astype(np.float64) / scale), _INT32.min, _INT32.max).astype(np.int32)
            return [(f"{base}_int32", q), (f"{base}_scale", scale),
                    (f"{base}_zero_point", np.zeros(scale.shape, np.int32))]

        made = ws.initializers(key, arrays)
        c.node.replace_input_with(2, self._dequantize(ws, key, made, None if axis is None else 0, c))


def _name_unnamed(ws: Workspace, values: Sequence[ir.Value]) -> None:
    """Calibration finds tensors by name: give the nameless ones fresh names."""
    for v in values:
        if not v.name:
            v.name = ws.fresh("quantized_tensor")


def _insert_pair(ws: Workspace, value: ir.Value, scale: ir.Value, zero: ir.Value) -> None:
    """``value -> QuantizeLinear -> DequantizeLinear``; every consumer reads the DQ output,
    which also takes over the name of a graph output."""
    uses = list(value.uses())
    base = value.name
    q = ws.node("QuantizeLinear", [value, scale, zero], ws.fresh(f"{base}/QuantizeLinear"))
    dq = ws.node("DequantizeLinear", [q.outputs[0], scale, zero], ws.fresh(f"{base}/DequantizeLinear"))
    q.outputs[0].type, q.outputs[0].shape = ir.TensorType(zero.dtype), value.shape
    dq.outputs[0].type, dq.outputs[0].shape = value.type or ir.TensorType(ir.DataType.FLOAT), value.shape
    producer = value.producer()
    if producer is not None and producer.graph is ws.graph:
        ws.graph.insert_after(producer, [q, dq])
    else:  # a graph input
        ws.graph.insert_before(next(iter(ws.graph)), [q, dq])
    for use in uses:
        use.node.replace_input_with(use.idx, dq.outputs[0])
    if value.is_graph_output() and not value.is_graph_input():
        value.name = ws.fresh(f"{base}_float")
        dq.outputs[0].name = base
        outputs = ws.graph.outputs
        for i, out in enumerate(outputs):
            if out is value:
                outputs[i] = dq.outputs[0]
