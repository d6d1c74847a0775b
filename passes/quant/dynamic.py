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
  per column, measured by tests/test_quantize_passes.py). A MatMul's bias ``Add`` (its only
  reader, adding a float32 ``[N]`` initializer, not a graph output) becomes the op's ``bias``
  input and goes: ONNX Runtime fuses no Add after this op (on MiniLM at 1x128, ORT's profile:
  26 Adds, 0.67 ms of 7.4 ms, before; 8 Adds, 0.26 ms of 7.0 ms, after; docs/measurements.md).
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

Smoothing (``smooth``, SmoothQuant's migration strength alpha, default 0.65; 0 turns it
off): before quantizing, activation outlier channels move into the weights, ``X' = X / s``,
``W' = diag(s) W`` with ``X' W' = X W`` exactly in float (:mod:`._smooth` has the math, the
choice of ``s`` from calibration maxima, and why 0.65). Nodes sharing an activation or a
weight share one ``s``; a group is smoothed only when its output error, simulated in numpy on
the calibration rows, drops below 0.8 times the plain one. ``X / s`` is folded into X's
producer when that is exact and free (a LayerNormalization's scale and bias, a per-channel
Mul/Div/Add constant), else one ``Mul(X, 1/s)`` is inserted. Each ``details["quantized"]``
entry says ``smoothed`` and how or why not (``smoothing``, ``simulated_error``);
``details["smoothing"]`` has the totals, or why nothing was smoothed (no runtime or samples
in the context). It runs the float model once per calibration sample (``context.calibration``,
else one from ``context.inputs``).

Scopes: the main graph only (subgraphs and model functions stay float).
"""

from __future__ import annotations

__all__ = ["QuantizeDynamic", "candidates", "quantize_int8"]

from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
import onnx_ir as ir

from gcomp.errors import OptionError
from gcomp.passes.quant._attention import (ATTENTION, attention_candidates, drop_dead, plan_masks,
                                           quantized_attention)
from gcomp.passes.quant._common import (ORT_DOMAIN, TARGET_HELP, Candidate, QuantPass, Workspace,
                                        gemm_refusal, linear_candidates, read_const, require_opset)
from gcomp.passes.quant._smooth import Smoother, smoothed_candidate
from gcomp.passes.result import DetailedResult
from gcomp.passes.rewire import bypass
from gcomp.registry import PassContext, register_pass

OP_TYPES = ("MatMul", "Gemm", ATTENTION)  # Attention: com.microsoft's, on ort-* targets
SMOOTH = 0.65  # SmoothQuant's alpha, measured on MiniLM (passes/quant/_smooth.py, docs/measurements.md)


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
    if ATTENTION in op_types:
        found += attention_candidates(model.graph)
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
        smooth: Annotated[float, "SmoothQuant migration strength alpha in [0, 1]: activation outlier "
                                 "channels moved into the weights (calibrated); 0: off"] = SMOOTH,
        op_types: Annotated[tuple, "op types to quantize (MatMul, Gemm, Attention: com.microsoft's "
                                   "-> QAttention)"] = OP_TYPES,
        exclude_nodes: Annotated[tuple, "ONNX node names kept float"] = (),
        context: PassContext | None = None,
    ) -> None:
        super().__init__(target=target, exclude_nodes=exclude_nodes, context=context)
        unknown = sorted(set(op_types) - set(OP_TYPES))
        if unknown:
            raise OptionError(f"quantize-dynamic: op_types {', '.join(unknown)} not supported "
                              f"(supported: {', '.join(OP_TYPES)})")
        if not 0.0 <= smooth <= 1.0:
            raise OptionError(f"quantize-dynamic: smooth must lie in [0, 1], got {smooth}")
        self.per_channel = per_channel
        self.smooth = float(smooth)
        self.smoother = self._smoother()
        self.op_types = tuple(op_types)
        self.ort = False
        self.masks: dict = {}  # Attention node name -> its MaskPlan (planned in check)
        self.mask_casts: dict[str, ir.Value] = {}  # mask input name -> its int32 Cast

    def call(self, model: ir.Model) -> DetailedResult:
        self.smoother = self._smoother()  # planned afresh for each model (in check)
        self.masks, self.mask_casts = {}, {}
        biases = [n.inputs[5] for n in model.graph if n.op_type == ATTENTION and len(n.inputs) > 5 and n.inputs[5]]
        result = super().call(model)
        drop_dead(model.graph, biases)  # an additive mask QAttention replaced by its mask input
        for entry in result.details["quantized"]:
            entry.update(self.smoother.describe(entry["node"]))
            if entry["op_type"] == ATTENTION:
                plan = self.masks.get(entry["node"])
                entry["as"] = plan.describe() if plan is not None else "QAttention"
        result.details["smoothing"] = self.smoother.summary()
        return result

    def _smoother(self) -> Smoother:
        return Smoother(self.smooth, lambda w: np.multiply(*quantize_int8(w, self.per_channel)))

    def find(self, model: ir.Model) -> list[Candidate]:
        caps = self.capabilities()
        self.ort = caps is not None and caps.backend == "ort"
        if self.ort and not caps.accepts(ORT_DOMAIN, "DynamicQuantizeMatMul", 1):
            raise OptionError(f"target {self.target} does not run {ORT_DOMAIN}.DynamicQuantizeMatMul")
        found = linear_candidates(model.graph, self.op_types)
        if self.ort and ATTENTION in self.op_types:
            found += attention_candidates(model.graph)
        return found

    def refusal(self, c: Candidate) -> str | None:
        if c.op_type == ATTENTION and not self.capabilities().accepts(ORT_DOMAIN, "QAttention", 1):
            return f"target {self.target} does not run {ORT_DOMAIN}.QAttention"
        return _refusal(c)

    def check(self, model: ir.Model, todo: list[Candidate]) -> None:
        if not self.ort:
            require_opset(model, 11, "quantize-dynamic (portable: DynamicQuantizeLinear)")
        self.smoother.plan(model, todo, self.context)  # the last look at the float model
        self.masks = plan_masks(model, todo, self.context)

    def quantize(self, ws: Workspace, c: Candidate) -> Any:
        c = smoothed_candidate(self.smoother, ws, c)  # reading X / s when smoothed
        key = (id(c.weight.root), c.trans_b, self.per_channel)  # shared weights share s: one copy
        base = c.weight.root.name or c.name

        def arrays():
            q, scale = quantize_int8(self.smoother.weight_kn(c), self.per_channel)
            return [(f"{base}_int8", q), (f"{base}_scale", scale),
                    (f"{base}_zero_point", np.zeros(scale.shape, np.int8))]

        wq, ws_, wz = ws.initializers(key, arrays)
        if c.op_type == ATTENTION:
            ws.use_domain(ORT_DOMAIN)
            quantized_attention(ws, c, [wq, ws_, wz], self.masks.get(c.name), self.mask_casts)
            return key
        if not self.ort:
            ws.replace(c.node, _standard_ops(ws, c, wq, ws_, wz))
            return key
        ws.use_domain(ORT_DOMAIN)
        add, bias = _bias_add(c) or (None, c.bias)
        op = ws.node("DynamicQuantizeMatMul", [c.activation, wq, ws_, wz, bias], c.name, domain=ORT_DOMAIN)
        ws.replace(c.node, [op])
        if add is not None:  # the op adds the bias itself: the Add goes
            out = op.outputs[0]
            out.type, out.shape = add.outputs[0].type, add.outputs[0].shape
            bypass(ws.graph, add.outputs[0], out)
            ws.graph.remove(add, safe=True)
        return key


def _bias_add(c: Candidate) -> tuple[ir.Node, ir.Value] | None:
    """(the Add, its bias) when a MatMul's only reader adds a float32 ``[N]`` initializer to it
    (and is no graph output): ``DynamicQuantizeMatMul`` takes that as its bias input."""
    out = c.node.outputs[0]
    uses = list(out.uses())
    if c.op_type != "MatMul" or c.bias is not None or len(uses) != 1 or out.is_graph_output():
        return None
    add, at = uses[0].node, uses[0].idx
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2 or \
            add.outputs[0].is_graph_output():
        return None
    bias = add.inputs[1 - at]
    const = read_const(bias)
    if const is None or bias.producer() is not None or const.array.dtype != np.float32 or \
            const.array.shape != (c.kn[1],):
        return None  # an initializer only: a Constant node may come after the MatMul
    return add, bias


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
