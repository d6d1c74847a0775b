"""The ``quantize-dynamic`` pass: int8 weights stored offline, activations quantized at run time.

Math. A weight ``W`` ``[K, N]`` (K the reduction axis) is quantized symmetrically to int8,
one scale per output column ``n`` (``per_channel``) or one for the whole tensor::

    s_n = max_k |W[k, n]| / 127          (per tensor: s = max |W| / 127; s = 1 where that is 0)
    Wq[k, n] = clip(round(W[k, n] / s_n), -127, 127)      int8, zero point 0
    W ~ Wq * s_n                          |W - Wq * s_n| <= s_n / 2

(``round`` is round-half-to-even.) At run time the activation ``X`` is quantized per tensor
to uint8 exactly as ONNX ``DynamicQuantizeLinear`` defines it (and as ONNX Runtime's
``DynamicQuantizeMatMul`` does inside)::

    lo = min(min X, 0), hi = max(max X, 0), a = (hi - lo) / 255
    z = clip(round(-lo / a), 0, 255)      Xq = clip(round(X / a) + z, 0, 255)

and the product is accumulated in int32 and scaled back::

    Y[m, n] = a * s_n * sum_k (Xq[m, k] - z) * Wq[k, n]  (+ bias[n])

so each output carries two roundings: the weight's (at most ``s_n / 2`` per element) and
the activation's (at most ``a / 2`` per element).

Representation, by target:

- ONNX Runtime (``ort-*``): ``com.microsoft.DynamicQuantizeMatMul(X, Wq, s, zero point,
  bias?)``, ``s`` and the int8 zero point 1-D ``[N]`` per column or scalars (the contrib
  op's schema: a scalar or one value per column of B; ONNX Runtime 1.31's CPU kernel scales
  per column, measured by tests/test_quantize_passes.py).
- ``portable`` and TVM: standard ops only: ``DynamicQuantizeLinear(X) -> (Xq, a, z)``,
  ``MatMulInteger(Xq, Wq, z, 0) -> int32``, ``Cast(to=FLOAT)``, ``Mul`` by ``a * s``
  (``Mul(a, s)``, ``[N]``), ``Add`` of the bias when there is one (needs opset 11).

Guarantees: on the main graph, every MatMul whose second input is a constant 2-D float32
weight (an initializer or Constant, also through Identity nodes; the first input of any
rank >= 2) and every Gemm with a constant B (``transB`` handled, bias C 1-D ``[N]`` or
absent) is replaced by the representation above; the node that replaces it keeps its ONNX
name (an unnamed node is called ``<op_type>_<index>``); helper nodes get fresh unique names.
The float weights nothing reads any more are removed (also Identity/Constant nodes that
only carried them). Two nodes sharing a weight share its int8 copy.

Refuses (the node stays float, with its reason in ``details["skipped"]``): MatMuls of two
activations ("both inputs are activations"), weights that are not 2-D float32,
activations that are not float32, Gemm with ``transA=1``, ``alpha != 1``, ``beta != 1``
with a bias, or a bias that is not 1-D ``[N]``; nodes named in ``exclude_nodes``. A model
that is already quantized is left unchanged (``details["note"]``). OptionError: a
``portable``/TVM model below opset 11 with something to quantize.

Scopes: the main graph only (subgraphs and model functions stay float).
"""

from __future__ import annotations

__all__ = ["QuantizeDynamic", "candidates", "quantize_int8"]

from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
import onnx_ir as ir

from gcomp.errors import OptionError
from gcomp.passes.quant._common import (ORT_DOMAIN, TARGET_HELP, Candidate, QuantPass, Workspace,
                                        gemm_refusal, linear_candidates, require_opset)
from gcomp.registry import PassContext, register_pass

OP_TYPES = ("MatMul", "Gemm")


def quantize_int8(w: np.ndarray, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """(Wq int8 [K, N], scale float32: [N] per column or a scalar) of a float [K, N] weight."""
    amax = np.abs(w).max(axis=0) if per_channel else np.abs(w).max()
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    return q, scale


def candidates(model: ir.Model, op_types: Sequence[str] = OP_TYPES) -> list[tuple[str, str]]:
    """``(node name, op_type)`` of every node ``quantize-dynamic`` would quantize (main graph,
    before ``exclude_nodes``), without changing the model."""
    found = linear_candidates(model.graph, op_types)
    return [(c.name, c.op_type) for c in found if c.reason is None and _refusal(c) is None]


def _refusal(c: Candidate) -> str | None:
    return gemm_refusal(c) if c.op_type == "Gemm" else None


@register_pass("quantize-dynamic")
class QuantizeDynamic(QuantPass):
    """int8 dynamic quantization of MatMul/Gemm: int8 weights offline, activations at run time."""

    def __init__(
        self,
        *,
        target: Annotated[str, TARGET_HELP] = "portable",
        per_channel: Annotated[bool, "one weight scale per output column (else one per tensor)"] = True,
        op_types: Annotated[tuple, "op types to quantize (MatMul, Gemm)"] = OP_TYPES,
        exclude_nodes: Annotated[tuple, "ONNX node names kept float"] = (),
        context: PassContext | None = None,
    ) -> None:
        super().__init__(target=target, exclude_nodes=exclude_nodes, context=context)
        unknown = sorted(set(op_types) - set(OP_TYPES))
        if unknown:
            raise OptionError(f"quantize-dynamic: op_types {', '.join(unknown)} not supported "
                              f"(supported: {', '.join(OP_TYPES)})")
        self.per_channel = per_channel
        self.op_types = tuple(op_types)
        self.ort = False

    def find(self, model: ir.Model) -> list[Candidate]:
        caps = self.capabilities()
        self.ort = caps is not None and caps.backend == "ort"
        if self.ort and not caps.accepts(ORT_DOMAIN, "DynamicQuantizeMatMul", 1):
            raise OptionError(f"target {self.target} does not run {ORT_DOMAIN}.DynamicQuantizeMatMul")
        return linear_candidates(model.graph, self.op_types)

    def refusal(self, c: Candidate) -> str | None:
        return _refusal(c)

    def check(self, model: ir.Model, todo: list[Candidate]) -> None:
        if not self.ort:
            require_opset(model, 11, "quantize-dynamic (portable: DynamicQuantizeLinear)")

    def quantize(self, ws: Workspace, c: Candidate) -> Any:
        key = (id(c.weight.root), c.trans_b, self.per_channel)
        base = c.weight.root.name or c.name

        def arrays():
            q, scale = quantize_int8(c.weight_kn(), self.per_channel)
            return [(f"{base}_int8", q), (f"{base}_scale", scale),
                    (f"{base}_zero_point", np.zeros(scale.shape, np.int8))]

        wq, ws_, wz = ws.initializers(key, arrays)
        if self.ort:
            ws.use_domain(ORT_DOMAIN)
            nodes = [ws.node("DynamicQuantizeMatMul", [c.activation, wq, ws_, wz, c.bias], c.name,
                             domain=ORT_DOMAIN)]
        else:
            nodes = _standard_ops(ws, c, wq, ws_, wz)
        ws.replace(c.node, nodes)
        return key


def _standard_ops(ws: Workspace, c: Candidate, wq: ir.Value, scale: ir.Value, zero: ir.Value) -> list[ir.Node]:
    """DynamicQuantizeLinear, MatMulInteger, Cast, Mul (and Add): the last keeps ``c.name``."""
    def helper(what: str) -> str:
        return ws.fresh(f"{c.name}/{what}")

    quant = ws.node("DynamicQuantizeLinear", [c.activation], helper("DynamicQuantizeLinear"), outputs=3)
    xq, a, z = quant.outputs
    acc = ws.node("MatMulInteger", [xq, wq, z, zero], helper("MatMulInteger"))
    cast = ws.node("Cast", [acc.outputs[0]], helper("Cast"), attributes={"to": ir.DataType.FLOAT})
    both = ws.node("Mul", [a, scale], helper("scale"))
    nodes = [quant, acc, cast, both]
    if c.bias is None:
        nodes.append(ws.node("Mul", [cast.outputs[0], both.outputs[0]], c.name))
    else:
        nodes.append(ws.node("Mul", [cast.outputs[0], both.outputs[0]], helper("Mul")))
        nodes.append(ws.node("Add", [nodes[-1].outputs[0], c.bias], c.name))
    return nodes
