"""The ``quantize-weights`` pass: weight-only block-wise quantization (4 or 8 bits).

Math. A weight ``W`` ``[K, N]`` (K the reduction axis; an embedding table ``[V, D]`` is
blocked along D, each row on its own) is cut into blocks of ``block_size`` consecutive
elements along K, one block per column and ``ceil(K / block_size)`` blocks per column (the
last one padded with zeros). Per block ``B`` (``b`` = ``bits``, ``round`` =
round-half-to-even):

- symmetric (``H = 2^(b-1)``: 8 for 4 bits, 128 for 8; ``e`` = the block's element of
  largest magnitude, with its sign)::

      s = e / -H                              (s = 1 for an all-zero block; s < 0 when e > 0)
      q = clip(round(W / s), -H, H - 1)       W ~ q * s

  so ``e`` itself is exact (``q = -H``) and all ``2^b`` codes are used: ONNX Runtime's own
  block quantizer (MLAS ``range2scale``) does the same; on Gaussian blocks of 32 its
  rounding error is 11 % below that of ``s = max|W| / (H - 1)`` with codes ``±(H - 1)``.

- asymmetric (``T = 2^b - 1``)::

      lo = min(min_B W, 0), hi = max(max_B W, 0), s = (hi - lo) / T   (1 when hi == lo)
      z = clip(round(-lo / s), 0, T)     q = clip(round(W / s) + z, 0, T)     W ~ (q - z) * s

Either way ``|W - W~| <= s / 2`` per element (round to nearest, ``method="rtn"``). With
``method="gptq"`` (the default) MatMul/Gemm weights are instead rounded row by row along K
with each row's error compensated in the rows after it (:mod:`._gptq`), using the second
moment of the node's activation on the calibration samples (``context.calibration``, else
one sample from ``context.inputs``): the codes and scales follow the same rules and layout,
the elementwise bound does not hold, and the node's output error is about 3x lower at 4 bits.
GPTQ is fitted on half the calibration rows and kept only when it beats round to nearest on
the other half (then fitted again on all rows); otherwise, and without a runtime or samples,
the weight is rounded to nearest (``details["quantized"][i]["method"]``, ``held_out_error``;
``details["method"]`` has the counts). Activations stay float (except that ONNX
Runtime may quantize them inside ``MatMulNBits`` per ``accuracy_level``).

Representation, by target:

- ONNX Runtime (``ort-*``): MatMul and Gemm -> ``com.microsoft.MatMulNBits(A, B, scales,
  zero_points?, bias?)``, attributes ``K``, ``N``, ``bits``, ``block_size``,
  ``accuracy_level``: ``B`` uint8 ``[N, k_blocks, block_size * bits / 8]`` (codes stored
  unsigned, ``q + 2^(b-1)`` when symmetric, where ONNX Runtime's default zero point is
  ``2^(b-1)``, so no zero_points input; 4-bit codes two per byte, low nibble first),
  ``scales`` ``[N, k_blocks]``, packed ``zero_points`` ``[N, ceil(k_blocks * bits / 8)]``
  when asymmetric, a Gemm's 1-D bias as the ``bias`` input (input 5, in ONNX Runtime's
  schema since 1.19). Embedding Gather -> ``com.microsoft.GatherBlockQuantized`` (uint8
  data ``[V, D * bits / 8]`` packed along D, ``gather_axis=0``, ``quantize_axis=1``,
  ``scales`` ``[V, ceil(D / block_size)]``, packed zero points when asymmetric).
- ``portable``: an int4/int8 (uint4/uint8 when asymmetric) initializer, a block-wise
  ``DequantizeLinear`` (opset >= 21: ``axis`` the blocked axis, ``block_size``) and the
  original MatMul/Gemm/Gather reading its output (the node itself is unchanged).
- TVM: refused (OptionError): TVM 0.27's ONNX frontend cannot import block-wise
  DequantizeLinear.

Guarantees: on the main graph, MatMul with a constant 2-D float32 weight second input,
Gemm with a constant B (``transB`` handled) and, with ``embeddings``, Gather (axis 0) of a
constant 2-D float32 table are quantized as above; a replacing node keeps the ONNX name of
the node it replaces (an unnamed node is called ``<op_type>_<index>``); the float weights
nothing reads any more are removed (also the Identity/Constant nodes that carried them);
two nodes sharing a weight share its quantized copy.

Refuses (the node stays float, reason in ``details["skipped"]``): MatMuls of two
activations, weights that are not 2-D float32, activations that are not float32; for
ONNX Runtime also Gemm with ``transA=1``, ``alpha != 1``, ``beta != 1`` with a bias or a
bias that is not 1-D ``[N]``, and an odd embedding width with 4 bits; nodes named in
``exclude_nodes``. An already-quantized model is left unchanged (``details["note"]``).
OptionError: bad ``bits``/``block_size``/``accuracy_level``; TVM targets; ``portable``
on a model below opset 21 with something to quantize.

Scopes: the main graph only (subgraphs and model functions stay float).
"""

from __future__ import annotations

__all__ = ["QuantizeWeights", "candidates"]

from collections.abc import Callable
from typing import Annotated, Any

import numpy as np
import onnx_ir as ir

from gcomp.errors import OptionError
from gcomp.passes.quant._blockwise import Blocks, pack, quantize_blocks
from gcomp.passes.quant._calibration import samples_for
from gcomp.passes.quant._gptq import Moments, gptq_blocks, grams, output_error
from gcomp.passes.quant._common import (ORT_DOMAIN, TARGET_HELP, Candidate, QuantPass, Workspace,
                                        gemm_refusal, linear_candidates, node_label, read_const,
                                        require_opset)
from gcomp.registry import PassContext, register_pass

BITS = (4, 8)
METHODS = ("gptq", "rtn")
_METHOD_HELP = (
    "how MatMul/Gemm weights are rounded: gptq (each row's rounding error compensated in the rows "
    "after it, weighted by the activation's second moment on the calibration samples: about 3x "
    "less output error than rtn at 4 bits; falls back to rtn without samples) or rtn (round to "
    "nearest); embedding tables are always rtn")
BLOCK_SIZES = (16, 32, 64, 128, 256)
_ACCURACY_HELP = (
    "MatMulNBits accuracy_level, the least accurate compute ONNX Runtime may use for the float "
    "input A: 0 unset (as 1), 1 fp32, 2 fp16, 3 bf16, 4 int8 (A quantized to int8 per block: the "
    "fastest CPU kernel, adds activation rounding); the CPU uses the level asked when it has a "
    "kernel for it, else the next more accurate one (x86 has int8 and fp32 kernels, so 2 and 3 "
    "run as fp32); not used by portable")
TVM_REFUSAL = ("TVM 0.27's ONNX frontend cannot import block-wise DequantizeLinear; weight-only "
               "quantization is for ort-* or portable targets")


def candidates(model: ir.Model, *, embeddings: bool = True) -> list[tuple[str, str]]:
    """``(node name, op_type)`` of every node ``quantize-weights`` considers quantizing (main
    graph, before ``exclude_nodes`` and the target's own refusals), without changing the model."""
    return [(c.name, c.op_type) for c in _find(model, embeddings) if c.reason is None]


def _find(model: ir.Model, embeddings: bool) -> list[Candidate]:
    found = linear_candidates(model.graph, ("MatMul", "Gemm"))
    if embeddings:
        found += _gathers(model.graph)
    order = {id(node): i for i, node in enumerate(model.graph)}
    return sorted(found, key=lambda c: order[id(c.node)])


def _gathers(graph: ir.Graph) -> list[Candidate]:
    """Gathers over a constant float table (lookups in shape data are not candidates)."""
    found = []
    for index, node in enumerate(graph):
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        table = read_const(node.inputs[0])
        if table is None or not np.issubdtype(table.array.dtype, np.floating):
            continue
        c = Candidate(node, node_label(node, index), "Gather", activation=node.inputs[1], weight=table)
        axis = node.attributes.get("axis")
        axis = 0 if axis is None else axis.value
        if table.array.ndim != 2:
            c.reason = f"the table is {table.array.ndim}-D, not 2-D [V, D]"
        elif table.array.dtype != np.float32:
            c.reason = f"the table is {table.array.dtype}, not float32"
        elif axis not in (0, -2):
            c.reason = f"axis={axis}: not a row lookup"
        found.append(c)
    return found


@register_pass("quantize-weights")
class QuantizeWeights(QuantPass):
    """Weight-only block-wise int4/int8 quantization of MatMul/Gemm weights and embedding tables."""

    def __init__(
        self,
        *,
        target: Annotated[str, TARGET_HELP] = "portable",
        bits: Annotated[int, "bits per weight: 4 or 8"] = 4,
        block_size: Annotated[int, "weights per scale along K: 16, 32, 64, 128 or 256"] = 32,
        symmetric: Annotated[bool, "symmetric (zero point 0) instead of min/max with a zero point"] = True,
        accuracy_level: Annotated[int, _ACCURACY_HELP] = 4,
        embeddings: Annotated[bool, "also quantize Gather over a constant 2-D table"] = True,
        method: Annotated[str, _METHOD_HELP] = "gptq",
        exclude_nodes: Annotated[tuple, "ONNX node names kept float"] = (),
        context: PassContext | None = None,
    ) -> None:
        super().__init__(target=target, exclude_nodes=exclude_nodes, context=context)
        for name, value, allowed in (("bits", bits, BITS), ("block_size", block_size, BLOCK_SIZES),
                                     ("accuracy_level", accuracy_level, range(5))):
            if value not in allowed:
                raise OptionError(f"quantize-weights: {name} must be one of "
                                  f"{', '.join(map(str, allowed))}, got {value}")
        if method not in METHODS:
            raise OptionError(f"quantize-weights: method must be one of {', '.join(METHODS)}, got {method!r}")
        self.method = method
        self._grams: dict[int, Moments] = {}
        self._keys: dict[int, tuple] = {}  # weight -> its GPTQ memo key (weights that get GPTQ)
        self._methods: dict[str, int] = {}  # node -> its weight's key
        self._checked: dict[int, list[float]] = {}  # weight key -> held-out error [gptq, rtn]
        self._method_note: str | None = None
        self.bits, self.block_size, self.symmetric = bits, block_size, symmetric
        self.accuracy_level, self.embeddings = accuracy_level, embeddings
        self.caps = None
        self._dequantized: dict[Any, ir.Value] = {}

    @property
    def ort(self) -> bool:
        return self.caps is not None and self.caps.backend == "ort"

    def find(self, model: ir.Model) -> list[Candidate]:
        self.caps = self.capabilities()
        if self.caps is not None and self.caps.backend == "tvm":
            raise OptionError(TVM_REFUSAL)
        self._dequantized = {}
        return _find(model, self.embeddings)

    def refusal(self, c: Candidate) -> str | None:
        if not self.ort:
            return None
        op = "GatherBlockQuantized" if c.op_type == "Gather" else "MatMulNBits"
        if not self.caps.accepts(ORT_DOMAIN, op, 1):
            return f"target {self.target} does not run {ORT_DOMAIN}.{op}"
        if c.op_type == "Gather":
            width = c.weight.array.shape[1]
            return f"odd embedding width {width} cannot be packed two per byte" if self.bits == 4 and width % 2 \
                else None
        return gemm_refusal(c) if c.op_type == "Gemm" else None

    def check(self, model: ir.Model, todo: list[Candidate]) -> None:
        if not self.ort:
            require_opset(model, 21, "quantize-weights (portable: block-wise DequantizeLinear)")
        self._grams, self._method_note, self._methods, self._checked = {}, None, {}, {}
        self._keys = {}
        if self.method == "gptq" and any(c.op_type != "Gather" for c in todo):
            self._plan_gptq(model, todo)

    def _plan_gptq(self, model: ir.Model, todo: list[Candidate]) -> None:
        """Which weights get GPTQ (under what memo key), and the activation moments of those
        the memo does not hold yet (summed over the nodes sharing a weight). A weight read in
        two layouts (a MatMul and a transB Gemm) or also as an embedding table is rounded to
        nearest: one set of codes serves all its readers."""
        samples, why = samples_for(model, self.context)
        if not samples:
            self._method_note = f"rtn: {why}"
            return
        tables = {id(c.weight.root) for c in todo if c.op_type == "Gather"}
        readers: dict[int, list[Candidate]] = {}
        for c in todo:
            if c.op_type != "Gather":
                readers.setdefault(id(c.weight.root), []).append(c)
        for key, cs in readers.items():
            if key not in tables and len({c.trans_b for c in cs}) == 1:
                self._keys[key] = ("gptq", cs[0].weight.root.name, cs[0].trans_b, cs[0].kn,
                                   tuple(sorted(c.activation.name or "" for c in cs)), self.bits, self.block_size,
                                   self.symmetric)
        memo = self.context.memo if self.context is not None else None
        todo_keys = [k for k in self._keys if memo is None or self._keys[k] not in memo]
        if not todo_keys:
            return
        activations = list({id(c.activation): c.activation for k in todo_keys for c in readers[k]}.values())
        moments = grams(model, self.context.runtime, samples, activations)
        for key in todo_keys:
            found = [moments.get(c.activation.name) for c in readers[key]]
            k = readers[key][0].kn[0]
            if all(m is not None and m.fit.shape == (k, k) for m in found):
                self._grams[key] = Moments(sum(m.fit for m in found), sum(m.held_out for m in found))

    def call(self, model: ir.Model):
        result = super().call(model)
        if result.details.get("quantized"):
            linear = [q for q in result.details["quantized"] if q["op_type"] != "Gather"]
            for q in linear:
                errors = self._checked.get(self._methods.get(q["node"]))
                q["method"] = "gptq" if errors and errors[0] < errors[1] else "rtn"
                if errors:
                    q["held_out_error"] = {"gptq": errors[0], "rtn": errors[1]}
            result.details["method"] = {"asked": self.method, "gptq": sum(q.get("method") == "gptq" for q in linear),
                                        "rtn": sum(q.get("method") == "rtn" for q in linear),
                                        "note": self._method_note}
        return result

    def quantize(self, ws: Workspace, c: Candidate) -> Any:
        self._record_method(c)
        if not self.ort:
            return self._dequantize_linear(ws, c)
        ws.use_domain(ORT_DOMAIN)
        return self._gather_block_quantized(ws, c) if c.op_type == "Gather" else self._matmul_nbits(ws, c)

    def _record_method(self, c: Candidate) -> None:
        if c.op_type != "Gather":
            self._methods[c.name] = id(c.weight.root)

    def _blocks(self, w: np.ndarray) -> Blocks:
        return quantize_blocks(w, self.bits, self.block_size, self.symmetric)

    def _linear_blocks(self, c: Candidate) -> Blocks:
        """A MatMul/Gemm weight as ``[K, N]`` blocks: GPTQ (fitted on all calibration rows) when,
        fitted on half of them, it beats round-to-nearest on the other half (with few rows for a
        wide K, GPTQ overfits the rows it saw and loses), else round-to-nearest."""
        w = c.weight_kn()
        rounded = self._blocks(w)
        key = self._keys.get(id(c.weight.root))
        memo = self.context.memo if self.context is not None else None
        moments = self._grams.get(id(c.weight.root))
        if key is None or (moments is None and (memo is None or key not in memo)):
            return rounded
        blocks, errors = self._memo(key, lambda: self._gptq(w, moments, rounded))
        self._checked[id(c.weight.root)] = errors
        return blocks or rounded

    def _gptq(self, w: np.ndarray, moments: Moments, rounded: Blocks) -> tuple[Blocks | None, list[float]]:
        """(GPTQ blocks or None when it does not validate, held-out errors [gptq, rtn])."""
        fitted = gptq_blocks(w, moments.fit, self.bits, self.block_size, self.symmetric)
        errors = [output_error(w, b.dequantize(), moments.held_out) for b in (fitted, rounded)]
        if errors[0] >= errors[1]:
            return None, errors
        # validated: fit again on every row (half the rows cost GPT-2 small int4 0.006 of cosine)
        return gptq_blocks(w, (moments.fit + moments.held_out) / 2, self.bits, self.block_size,
                           self.symmetric), errors

    def _memo(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()``, kept in the context's memo (the accuracy budget quantizes the same float
        weights again with other nodes left float)."""
        memo = self.context.memo if self.context is not None else None
        if memo is None:
            return make()
        if key not in memo:
            memo[key] = make()
        return memo[key]

    def _scales_and_zeros(self, blocks: Blocks) -> list[tuple[str, np.ndarray]]:
        """ONNX Runtime's ``scales`` [N, k_blocks] and, when asymmetric, packed ``zero_points``."""
        found = [("scales", np.ascontiguousarray(blocks.scale.T))]
        if blocks.zero is not None:
            found.append(("zero_points", pack(blocks.zero.T, self.bits)))
        return found

    def _named(self, c: Candidate, arrays: Callable[[], list[tuple[str, np.ndarray]]]):
        """``arrays`` with names made from the float weight's."""
        base = c.weight.root.name or c.name
        return lambda: [(f"{base}_int{self.bits}_{what}", array) for what, array in arrays()]

    def _matmul_nbits(self, ws: Workspace, c: Candidate) -> Any:
        k, n = c.kn
        key = ("MatMulNBits", id(c.weight.root), c.trans_b)

        def arrays():
            blocks = self._linear_blocks(c)
            return [("B", pack(blocks.unsigned().T.reshape(n, -1, self.block_size), self.bits)),
                    *self._scales_and_zeros(blocks)]

        made = ws.initializers(key, self._named(c, arrays))
        zero = made[2] if len(made) > 2 else None
        attributes = {"K": k, "N": n, "bits": self.bits, "block_size": self.block_size,
                      "accuracy_level": self.accuracy_level}
        node = ws.node("MatMulNBits", [c.activation, made[0], made[1], zero, None, c.bias], c.name,
                       domain=ORT_DOMAIN, attributes=attributes)
        ws.replace(c.node, [node])
        return key

    def _gather_block_quantized(self, ws: Workspace, c: Candidate) -> Any:
        width = c.weight.array.shape[1]
        key = ("GatherBlockQuantized", id(c.weight.root))

        def arrays():
            blocks = self._blocks(c.weight.array.T)  # blocks along D
            return [("data", pack(blocks.unsigned()[:width].T, self.bits)), *self._scales_and_zeros(blocks)]

        made = ws.initializers(key, self._named(c, arrays))
        attributes = {"bits": self.bits, "block_size": self.block_size, "gather_axis": 0, "quantize_axis": 1}
        node = ws.node("GatherBlockQuantized", [made[0], c.activation, *made[1:]], c.name, domain=ORT_DOMAIN,
                       attributes=attributes)
        ws.replace(c.node, [node])
        return key

    def _dequantize_linear(self, ws: Workspace, c: Candidate) -> Any:
        """The weight input of ``c`` becomes DequantizeLinear(codes, scale, zero?) of the same
        layout: blocks along axis 0 of a [K, N] MatMul/Gemm weight, axis 1 of a Gemm's [N, K]
        (transB) weight or an embedding table [V, D]."""
        axis = 1 if c.trans_b or c.op_type == "Gather" else 0
        key = ("DequantizeLinear", id(c.weight.root), axis)
        if key not in self._dequantized:
            def arrays():
                blocks = self._blocks(c.weight.array.T) if c.op_type == "Gather" else self._linear_blocks(c)
                codes, zero = blocks.typed()
                found = [("q", codes), ("scale", blocks.scale)] + ([("zero_point", zero)] if zero is not None else [])
                return [(what, np.ascontiguousarray(a.T) if axis else a) for what, a in found]

            made = ws.initializers(key, self._named(c, arrays))
            dq = ws.node("DequantizeLinear", made, ws.fresh(f"{c.name}/DequantizeLinear"),
                         attributes={"axis": axis, "block_size": self.block_size})
            dq.outputs[0].dtype = ir.DataType.FLOAT
            dq.outputs[0].shape = ir.Shape(c.weight.array.shape)
            ws.graph.insert_before(c.node, dq)
            self._dequantized[key] = dq.outputs[0]
        c.node.replace_input_with(0 if c.op_type == "Gather" else 1, self._dequantized[key])
        c.node.name = c.name
        return key
