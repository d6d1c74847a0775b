"""Evaluating a reduced-precision model in emulated fp16/bf16, and comparing it with fp32.

ONNX Runtime on the CPU computes many fp16 ops by upcasting to fp32 and has no bf16
kernels for most ops, so running the converted model there neither reproduces the
target's rounding everywhere nor its overflow. The emulator instead runs a *validation
copy* in fp32 where every value the model holds in fp16 (bf16) is rounded to it right
after the op that produces it — a ``Cast`` down and back up, which ORT performs exactly
(round to nearest even, overflow to ±inf; checked against numpy/ml_dtypes bit for bit):

- fp16/bf16 graph inputs, initializers, Constant/ConstantOfShape values become fp32
  holding exactly the same numbers; ``Cast``/``CastLike``/``EyeLike``/``Random*`` to
  the low type become fp32 followed by the rounding;
- every node output of a low type is rounded (If/Loop/Scan outputs are rounded inside
  their bodies); subgraphs are rewritten the same way; types the model does not declare
  come from ONNX shape inference (a value whose type stays unknown is not rounded);
- each op computes internally in fp32 and rounds its output: this is what GPUs do for
  fp16/bf16 matmuls (fp32 accumulation) and for norms, Softmax and reductions (fp32
  internals), and it is the semantics of ``stash_type=1`` norms. An op that a real
  device computes with low-precision internals can therefore be *more* accurate here.

Cost: one fp32 run plus two Casts per low value: it evaluates a BERT-base-sized model in
well under a second per input batch on 2 cores, where numpy's true fp16 matmul runs at
~0.5 GFLOP/s. :func:`compare` (:mod:`gcomp.passes.precision.accuracy`, the ``auto``
search's measure) reports, per output, the largest absolute and relative error against
the fp32 reference, cosine, rel-l2, the elements flushed to zero and the NaN/Inf counts;
:data:`TOLERANCES` are the per-precision element-wise defaults ``gcomp verify`` and
``gcomp optimize --precision`` apply (beside the signal bounds of
:mod:`gcomp.verify.precision`). The pipeline's
runtime (:mod:`gcomp.runtime`, ``emulate=True``) runs models through :func:`emulate`.
"""

from __future__ import annotations

__all__ = [
    "LOW_TYPES",
    "TOLERANCES",
    "OutputError",
    "compare",
    "emulate",
    "reduced_precision",
    "validation_copy",
]

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from gcomp import runtime
from gcomp.backends.ort import run_sharing_weights
from gcomp.passes.precision.accuracy import OutputError, compare
from gcomp.verify.compare import Tolerance

FLOAT = ir.DataType.FLOAT
LOW_TYPES = {ir.DataType.FLOAT16: "fp16", ir.DataType.BFLOAT16: "bf16"}

# Element-wise |actual - expected| <= atol + rtol * |expected| against the fp32 original.
# fp16 keeps 11 significant bits (unit roundoff 4.9e-4), bf16 8 (3.9e-3); errors grow
# with depth (a few ulps per layer), so the bounds leave ~20 ulps of the output scale.
# Measured maxima on the zoo are in bench/PRECISION.md.
TOLERANCES: dict[str, Tolerance] = {
    "fp16": Tolerance(rtol=1e-2, atol=1e-2),
    "bf16": Tolerance(rtol=8e-2, atol=8e-2),
}


def reduced_precision(model: ir.Model) -> str | None:
    """``"bf16"`` or ``"fp16"`` when the model holds values of that type, else None."""
    found: set[ir.DataType] = set()
    for graph in model.graphs():
        for v in (*graph.inputs, *graph.outputs, *graph.initializers.values()):
            if v.dtype in LOW_TYPES:
                found.add(v.dtype)
        for node in graph:
            for v in node.outputs:
                if v.dtype in LOW_TYPES:
                    found.add(v.dtype)
    if ir.DataType.BFLOAT16 in found:
        return "bf16"
    return "fp16" if found else None


def _fp32_tensor(tensor: ir.TensorProtocol, name: str | None, cache: dict | None = None) -> ir.Tensor:
    if cache is not None and id(tensor) in cache:
        return cache[id(tensor)][1]
    out = ir.Tensor(tensor.numpy().astype(np.float32), name=name)
    if cache is not None:
        cache[id(tensor)] = (tensor, out)  # keeps the key's object alive while cached
    return out


def validation_copy(model: ir.Model, cache: dict | None = None) -> ir.Model:
    """An fp32 copy of ``model`` that rounds every low-precision value where it is made.

    ``cache`` (a dict the caller keeps) reuses fp32 copies of the same low tensors across
    calls that share low tensors (variants of one converted model)."""
    copy = model.clone()
    if any(v.type is None for g in copy.graphs() for n in g for v in n.outputs):
        # Values without a declared type (no value_info) would go unrounded: infer them.
        from gcomp.passes.shapes import InferShapes

        InferShapes()(copy)
    fresh = _Fresh()
    for graph in copy.graphs():
        _fp32_interface(graph, cache)
        for node in list(graph):
            _fp32_attributes(node)
            if node.op_type in ("If", "Loop", "Scan") and node.domain in ("", "ai.onnx"):
                for v in node.outputs:
                    if v.dtype in LOW_TYPES:
                        v.type = ir.TensorType(FLOAT)  # rounded inside the body
                continue
            for v in node.outputs:
                low = v.dtype
                if low not in LOW_TYPES or (not v.name and not v.uses() and not v.is_graph_output()):
                    continue  # (an optional output left out, e.g. LSTM's Y: nothing to round)
                v.type = ir.TensorType(FLOAT)  # a new object: clones share types
                if node.op_type != "Constant":  # a Constant's value is already exact in fp32
                    _round_after(graph, node, v, low, fresh)
    return copy


class _Fresh:
    """Names no model has: ``base__emuN``."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, base: str) -> str:
        self.count += 1
        return f"{base}__emu{self.count}"


def _fp32_interface(graph: ir.Graph, cache: dict | None) -> None:
    """The graph's low inputs and initializers become fp32 holding the same numbers."""
    for v in graph.inputs:
        if v.dtype in LOW_TYPES:
            v.type = ir.TensorType(FLOAT)  # a new object: clones share types
    for v in graph.initializers.values():
        if v.dtype in LOW_TYPES and v.const_value is not None:
            v.const_value = _fp32_tensor(v.const_value, v.name, cache)
            v.type = ir.TensorType(FLOAT)  # a new object: clones share types


def _round_after(graph: ir.Graph, node: ir.Node, v: ir.Value, low: ir.DataType, fresh: _Fresh) -> None:
    """Cast ``v`` (now fp32) down to ``low`` and back up right after ``node``; every reader
    of ``v`` (a graph output too, which keeps its name) reads the rounded value."""
    name = v.name or fresh("value")
    consumers = list(v.uses())  # before the Cast below becomes one
    outputs_at = [i for i, o in enumerate(graph.outputs) if o is v]
    down = ir.Value(name=fresh(name), type=ir.TensorType(low), shape=v.shape)
    up = ir.Value(name=fresh(name), type=ir.TensorType(FLOAT), shape=v.shape)
    c1 = ir.Node("", "Cast", [v], {"to": ir.AttrInt64("to", int(low))}, outputs=[down], name=fresh("round"))
    c2 = ir.Node("", "Cast", [down], {"to": ir.AttrInt64("to", int(FLOAT))}, outputs=[up], name=fresh("round"))
    graph.insert_after(node, [c1, c2])
    for user, i in consumers:
        user.replace_input_with(i, up)
    for i in outputs_at:
        graph.outputs[i] = up
    if outputs_at:
        v.name, up.name = fresh(name), name


def _fp32_attributes(node: ir.Node) -> None:
    if node.domain not in ("", "ai.onnx"):
        return
    for key in ("to", "dtype"):
        attr = node.attributes.get(key)
        if attr is not None and attr.type == ir.AttributeType.INT and ir.DataType(attr.as_int()) in LOW_TYPES:
            node.attributes[key] = ir.AttrInt64(key, int(FLOAT))
    for key in ("value",):
        attr = node.attributes.get(key)
        if attr is not None and attr.type == ir.AttributeType.TENSOR and attr.as_tensor().dtype in LOW_TYPES:
            node.attributes[key] = ir.AttrTensor(key, _fp32_tensor(attr.as_tensor(), attr.as_tensor().name))


# From this many bytes of main-graph weights on, the validation copy's weights are handed
# to ORT as OrtValues instead of being serialized into the model (see gcomp.backends.ort.run_sharing_weights).
SHARE_WEIGHTS_FROM = 64 << 20


def emulate(model: ir.Model, feeds: Mapping[str, np.ndarray], *, timeout: float | None = None,
            cache: dict | None = None, share_weights_from: int = SHARE_WEIGHTS_FROM) -> dict[str, Any]:
    """Outputs of ``model`` computed in emulated reduced precision, in the declared dtypes.

    Low-precision inputs are fed rounded to their type (as the real model would receive
    them); outputs declared fp16/bf16 come back in that dtype. A model with at least
    ``share_weights_from`` bytes of weights gets them into ORT without serialization
    (no ``timeout`` there: large models are not the hostile ones).
    """
    declared = {v.name: v.dtype for v in model.graph.inputs}
    out_types = {v.name: v.dtype for v in model.graph.outputs}
    runnable = {}
    for name, x in feeds.items():
        dtype = declared.get(name)
        if dtype in LOW_TYPES:
            x = np.asarray(x).astype(_np_type(dtype)).astype(np.float32)
        runnable[name] = x
    copy = validation_copy(model, cache)
    weights = sum(v.const_value.nbytes for v in copy.graph.initializers.values() if v.const_value is not None)
    if weights >= share_weights_from:
        outs = run_sharing_weights(copy, runnable)
    else:
        outs = runtime.reference(copy).run(runnable, **({"timeout": timeout} if timeout else {}))
    result = {}
    for name, y in outs.items():
        dtype = out_types.get(name)
        result[name] = np.asarray(y).astype(_np_type(dtype)) if dtype in LOW_TYPES else y
    return result


def _np_type(dtype: ir.DataType):
    if dtype == ir.DataType.FLOAT16:
        return np.float16
    import ml_dtypes

    return ml_dtypes.bfloat16
