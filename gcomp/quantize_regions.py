"""Quantized nodes measured one at a time: the per-node half of the speed gate (a node
slower quantized goes back to float) and each node's own error (the sensitivity ranking).

For ``int8-dynamic``, each quantized MatMul/Gemm is a region of its own: its activation is
quantized at run time inside the node. Whether that pays depends on the node's size (a
small classifier head spends more quantizing its input than it saves in the product), so
it is measured, not guessed: every quantized node is rebuilt as a one-node model on the
activation it really receives (its shape and values, from one run of the float model on
the first sample), quantized by the same pass with the same options, and both one-node
models run on ONNX Runtime (all optimizations, the target's device) in alternating blocks
in one process, :data:`ROUNDS` times each. A node whose quantized median time is not below its
float one returns to float, and the report gives both times.

Weight-only modes are chosen for size and are not gated per node; their whole-model
gate (gcomp.quantize) stays.
"""

from __future__ import annotations

__all__ = ["ROUNDS", "NodeTiming", "local_errors", "slower_nodes"]

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from gcomp import registry, runtime
from gcomp.backends.ort import OrtBackend
from gcomp.errors import GcompError
from gcomp.passes.quant._attention import attention_candidates
from gcomp.passes.quant._common import Candidate, linear_candidates, read_const
from gcomp.verify.metrics import COUNTING, Budget, measure

ROUNDS, BLOCKS = 40, 5  # runs of each one-node model, in 5 alternating blocks (after warm-up)


@dataclass
class NodeTiming:
    node: str
    float_us: float
    quantized_us: float

    @property
    def faster(self) -> bool:
        return self.quantized_us < self.float_us

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "float_us": self.float_us, "quantized_us": self.quantized_us,
                "speedup": self.float_us / self.quantized_us if self.quantized_us else None}


def slower_nodes(model: ir.Model, nodes: Sequence[str], feeds: Mapping[str, np.ndarray], *, pass_name: str,
                 options: Mapping[str, Any], target: str) -> list[NodeTiming]:
    """Timings of every MatMul/Gemm of ``nodes`` (ONNX names in the float ``model``) that
    could be measured, float against quantized, on the activation it receives for ``feeds``.
    An Attention is not timed alone: rebuilt alone its additive mask becomes an input, which
    QAttention cannot take, so it would be timed in another form (the whole-model gate judges it)."""
    return [_time(name, floaty, quantized, inputs, target)
            for name, floaty, quantized, inputs in _one_node_pairs(model, nodes, feeds, pass_name, options, target,
                                                                   attention=False)]


def local_errors(model: ir.Model, nodes: Sequence[str], feeds: Mapping[str, np.ndarray], budget: Budget, *,
                 pass_name: str, options: Mapping[str, Any], target: str) -> dict[str, float]:
    """Each node's own contribution: the error (under ``budget``'s metric) of its output
    quantized against float, on the inputs it really receives for ``feeds``. One run of the
    float model and two tiny runs per node: a ranking that costs no full-model run per node.
    An Attention counts the error of its quantized projection with the attention core (its
    mask fed as it is)."""
    if budget.metric in COUNTING:  # argmax changes of a hidden activation mean nothing: rank by direction
        budget = Budget("cosine", 0.01)
    errors = {}
    for name, floaty, quantized, inputs in _one_node_pairs(model, nodes, feeds, pass_name, options, target):
        e = runtime.reference(floaty).run(inputs)
        a = runtime.reference(quantized).run(inputs)
        errors[name] = measure([e], [a], budget)[0].error
    return errors


def _one_node_pairs(model, nodes, feeds, pass_name, options, target, attention: bool = True):
    """(name, float one-node model, quantized one-node model, its feeds) per node."""
    wanted = set(nodes)
    found = [c for c in linear_candidates(model.graph, ("MatMul", "Gemm")) if c.name in wanted]
    if attention:
        found += [c for c in attention_candidates(model.graph) if c.name in wanted]
    live = {v.name: v for c in found for v in c.node.inputs if v is not None and read_const(v) is None}
    values = _activations(model, list(live.values()), feeds)
    for c in found:
        inputs = {}
        for i, v in enumerate(c.node.inputs):
            if v is not None and read_const(v) is None:
                inputs["x" if i == 0 else f"x{i}"] = values.get(v.name)
        if any(x is None for x in inputs.values()) or "x" not in inputs:
            continue  # an input that could not be captured
        floaty = _one_node_model(model, c, inputs)
        quantized = floaty.clone()
        # calibrated on the inputs it really receives, so smoothing (int8-dynamic) is what the
        # whole model gets
        context = dataclasses.replace(runtime.pass_context(), calibration=(inputs,))
        step = registry.get_pass(pass_name).create(context=context, **{**options, "target": target})
        if (getattr(step(quantized), "details", {}) or {}).get("quantized"):
            yield c.name, floaty, quantized, inputs


def _activations(model: ir.Model, values: Sequence[ir.Value], feeds) -> dict[str, np.ndarray]:
    """The values ``values`` take for ``feeds`` (one run with them exposed as outputs)."""
    wanted = {v.name for v in values}
    given = {v.name for v in model.graph.inputs}
    # an untyped activation is float32: the pass quantizes float32 activations only
    run = runtime.run_exposing(model, wanted - given, feeds, untyped=ir.DataType.FLOAT)
    found = {k: np.asarray(v) for k, v in run.items() if k in wanted}
    found.update({k: np.asarray(feeds[k]) for k in wanted & given if k in feeds})
    return found


def _one_node_model(model: ir.Model, c: Candidate, inputs: Mapping[str, np.ndarray]) -> ir.Model:
    """``c``'s node alone: its non-constant inputs as graph inputs (``x``, ``x<slot>``, typed
    and shaped like the arrays captured for them), its constants as initializers."""
    graph_inputs, initializers, node_inputs = [], [], []
    for i, value in enumerate(c.node.inputs):
        name = "x" if i == 0 else f"x{i}"
        if value is None:
            node_inputs.append(None)
        elif name in inputs:
            array = np.asarray(inputs[name])
            v = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                         shape=ir.Shape(list(array.shape)))
            graph_inputs.append(v)
            node_inputs.append(v)
        else:
            const = read_const(value)
            if const is None:
                raise GcompError(f"node '{c.name}': input {i} is neither captured nor a constant")
            v = ir.Value(name=f"c{i}", const_value=ir.tensor(np.ascontiguousarray(const.array), name=f"c{i}"))
            initializers.append(v)
            node_inputs.append(v)
    attributes = [ir.Attr(a.name, a.type, a.value) for a in c.node.attributes.values()]
    node = ir.Node(c.node.domain, c.op_type, node_inputs, attributes=attributes, name=c.name, num_outputs=1)
    node.outputs[0].name = "y"
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph(graph_inputs, node.outputs, nodes=[node], initializers=initializers,
                     opset_imports=dict(model.opset_imports), name="one-node")
    return ir.Model(graph, ir_version=model.ir_version or 10)


def _time(name: str, floaty: ir.Model, quantized: ir.Model, feeds, target: str) -> NodeTiming:
    device = "cuda" if target.endswith("cuda") else "cpu"
    exes = [OrtBackend().compile(m, device) for m in (floaty, quantized)]
    t = runtime.time_interleaved(*exes, feeds, blocks=BLOCKS, block=ROUNDS // BLOCKS).summary()
    return NodeTiming(name, t["a_ms_median"] * 1e3, t["b_ms_median"] * 1e3)
