"""A streaming-audio front end whose work sits in ``If`` branches and a ``Loop`` body.

Built node by node the way the TorchScript exporter writes scripted control flow: every
constant is a ``Constant`` node next to its one use (nothing folded inside subgraphs),
sizes come from ``Shape``/``Gather``/``Div``/``Mul``/``Unsqueeze``/``Concat`` chains,
and slices come in exporter pairs (a full ``x[:, ...]`` slice of axis 0, then the real
one). Inputs: ``x`` float32 ``[batch, samples]``, ``sr`` int64 scalar, ``context`` float32
``[batch, 16]``; outputs ``y`` float32 ``[batch, 8]`` and ``new_context`` ``[batch, 16]``.

- ``sr == 16000`` (``then`` branch): the context and the samples are joined, cut to a
  whole number of 16-sample frames, framed by a ``Reshape`` whose target is computed,
  projected by a ``Constant`` weight, averaged over frames, scaled by ``1/sqrt`` of a
  size read from the weight's shape (static: folds away), ``tanh``.
- otherwise (``else`` branch): a ``Loop`` over 8-sample frames carries a state
  ``h = tanh(frame @ W + h @ U)``; the body computes its slice bounds from the iteration
  number, slices twice (the first a no-op), and reshapes ``h`` to its own shape through a
  ``Shape``/``Slice``/``Concat`` target.

Both branches end by slicing the last 16 samples as the next context. Weights are
seeded. Returns an :class:`onnx_ir.Model` (IR version 10, opset 17).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from ._graph import IR_VERSION, OPSET, PRODUCER_NAME, PRODUCER_VERSION

__all__ = ["build"]

INT64_MAX = np.iinfo(np.int64).max
CONTEXT = 16


class _Body:
    """Nodes of one graph, named ``/<scope>/<Op>_<n>``, with a Constant node per use."""

    def __init__(self, scope: str) -> None:
        self.scope = scope
        self.nodes: list = []
        self._count = 0

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        self._count += 1
        name = f"/{self.scope}/{op_type}_{self._count}"
        out = f"{name}_output_0"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out

    def const(self, value, dtype=np.int64) -> str:
        array = np.asarray(value, dtype=dtype)
        return self.op("Constant", [], value=numpy_helper.from_array(array))

    def dim(self, x: str, axis: int) -> str:
        """``x.shape[axis]`` as a scalar, the exporter's way."""
        return self.op("Gather", [self.op("Shape", [x]), self.const(axis)], axis=0)

    def slice(self, x: str, start, end, axis: int) -> str:
        """``x[..., start:end]`` on ``axis``, after the exporter's full slice of axis 0."""
        full = self.op("Slice", [x, self.const([0]), self.const([INT64_MAX]), self.const([0]), self.const([1])])
        return self.op("Slice", [full, start, end, self.const([axis]), self.const([1])])


def _then_branch(rng: np.random.Generator) -> object:
    b = _Body("at16k")
    joined = b.op("Concat", ["context", "x"], axis=1)
    whole = b.op("Mul", [b.op("Div", [b.dim(joined, 1), b.const(16)]), b.const(16)])
    head = b.slice(joined, b.const([0]), b.op("Unsqueeze", [whole, b.const([0])]), axis=1)
    batch = b.op("Unsqueeze", [b.dim(head, 0), b.const([0])])
    frames = b.op("Reshape", [head, b.op("Concat", [batch, b.const([-1]), b.const([16])], axis=0)])
    weight = b.const(rng.standard_normal((16, 8)) * 0.25, np.float32)
    pooled = b.op("ReduceMean", [b.op("MatMul", [frames, weight])], axes=[1], keepdims=0)
    fan_in = b.op("Cast", [b.dim(weight, 0)], to=TensorProto.FLOAT)
    y = b.op("Tanh", [b.op("Div", [pooled, b.op("Sqrt", [fan_in])])])
    tail = b.slice(joined, b.const([-CONTEXT]), b.const([INT64_MAX]), axis=1)
    b.nodes.append(helper.make_node("Identity", [y], ["y16"], name="/at16k/y"))
    b.nodes.append(helper.make_node("Identity", [tail], ["ctx16"], name="/at16k/context"))
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y16", "ctx16")]
    return helper.make_graph(b.nodes, "at16k", [], outputs)


def _loop_body(rng: np.random.Generator) -> object:
    b = _Body("at8k/loop")
    start = b.op("Unsqueeze", [b.op("Mul", ["i", b.const(8)]), b.const([0])])
    frame = b.slice("x", start, b.op("Add", [start, b.const([8])]), axis=1)
    w = b.const(rng.standard_normal((8, 8)) * 0.3, np.float32)
    u = b.const(rng.standard_normal((8, 8)) * 0.3, np.float32)
    h = b.op("Tanh", [b.op("Add", [b.op("MatMul", [frame, w]), b.op("MatMul", ["h_in", u])])])
    rows = b.op("Slice", [b.op("Shape", [h]), b.const([0]), b.const([1]), b.const([0])])
    h = b.op("Reshape", [h, b.op("Concat", [rows, b.const([8])], axis=0)])
    b.nodes.append(helper.make_node("Identity", ["cond_in"], ["cond_out"], name="/at8k/loop/cond"))
    b.nodes.append(helper.make_node("Identity", [h], ["h_out"], name="/at8k/loop/h"))
    inputs = [
        helper.make_tensor_value_info("i", TensorProto.INT64, []),
        helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
        helper.make_tensor_value_info("h_in", TensorProto.FLOAT, None),
    ]
    outputs = [
        helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
        helper.make_tensor_value_info("h_out", TensorProto.FLOAT, None),
    ]
    return helper.make_graph(b.nodes, "at8k_step", inputs, outputs)


def _else_branch(rng: np.random.Generator) -> object:
    b = _Body("at8k")
    steps = b.op("Div", [b.dim("x", 1), b.const(8)])
    batch = b.op("Unsqueeze", [b.dim("x", 0), b.const([0])])
    h0 = b.op("ConstantOfShape", [b.op("Concat", [batch, b.const([8])], axis=0)],
              value=numpy_helper.from_array(np.zeros(1, np.float32)))
    keep_going = b.const(True, np.bool_)
    b.nodes.append(helper.make_node("Loop", [steps, keep_going, h0], ["h_last"], name="/at8k/Loop",
                                    body=_loop_body(rng)))
    tail = b.slice("x", b.const([-CONTEXT]), b.const([INT64_MAX]), axis=1)
    b.nodes.append(helper.make_node("Identity", ["h_last"], ["y8"], name="/at8k/y"))
    b.nodes.append(helper.make_node("Identity", [tail], ["ctx8"], name="/at8k/context"))
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y8", "ctx8")]
    return helper.make_graph(b.nodes, "at8k", [], outputs)


def build(*, seed: int = 0) -> ir.Model:
    """Build the model with weights drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    then, other = _then_branch(rng), _else_branch(rng)
    nodes = [
        helper.make_node("Constant", [], ["/Constant_output_0"], name="/Constant",
                         value=numpy_helper.from_array(np.array(16000, np.int64))),
        helper.make_node("Equal", ["sr", "/Constant_output_0"], ["/Equal_output_0"], name="/Equal"),
        helper.make_node("If", ["/Equal_output_0"], ["y", "new_context"], name="/If",
                         then_branch=then, else_branch=other),
    ]
    graph = helper.make_graph(
        nodes,
        "control_flow",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "samples"]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
            helper.make_tensor_value_info("context", TensorProto.FLOAT, ["batch", CONTEXT]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8]),
            helper.make_tensor_value_info("new_context", TensorProto.FLOAT, ["batch", CONTEXT]),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name=PRODUCER_NAME, producer_version=PRODUCER_VERSION,
                              doc_string=f"If/Loop audio front end, seed={seed}")
    proto.ir_version = IR_VERSION
    return ir.from_proto(proto)
