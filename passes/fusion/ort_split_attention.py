"""One projection split into Q, K, V (GPT-2's ``c_attn``) + the attention block up to the head
transpose -> ONNX Runtime's ``com.microsoft.Attention`` (its packed weight is the projection's own).

Math: ``qkv = x @ W + b`` (as ``Reshape(Gemm(Reshape(x, [-1, Hin]), W, b), [B, S, 3H])`` or
``MatMul`` + ``Add``), ``[q | k | v] = Split(qkv, [H, H, H], axis=2)``, which is Attention's
packed projection with W's columns in Q, K, V order; the block after the split is the
MultiHeadAttention math of ort_mha.py with the additive mask (GPT-2's causal + padding
mask, computed by the graph) as ``attention_bias``. The block ends at the head transpose
[B, S, heads, D] (GPT-2 reads it twice), so the fused [B, S, H] output is reshaped back to
heads. Measured faster than ORT's unfused block on the CPU at every head count tried, so no
head limit on ``ort-cpu``.

``ort-attention-split-shape`` first reads the batch / sequence sizes that the TorchScript
export takes from one Q/K/V piece from the projection's input instead
(:class:`ShapeOfProjection`), which would otherwise keep a piece alive after fusion.

Refused besides MultiHeadAttention's cases: a Gemm with alpha/beta != 1 or transA, W/b not
constant, a flatten other than [-1, Hin], a reshape back that cannot be proven to restore
x's [B, S], a split that is not three equal parts of the last axis.
"""

from __future__ import annotations

__all__ = ["ORT_ATTENTION_SPLIT", "ORT_ATTENTION_SPLIT_SHAPE"]

import onnx_ir as ir
from onnxscript.rewriter import pattern

from gcomp.passes.fusion._attention import clamp_for_guard, full_query_axis, heads, int64s, scale_of, variant_rules, with_query_axis
from gcomp.passes.fusion._dims import holds_dim, int_attr, same_dim
from gcomp.passes.fusion._engine import FusionRun, RunRule, fusion
from gcomp.passes.fusion.ort_mha import MultiHeadAttention


class SplitAttention(MultiHeadAttention):
    """x@W+b split into Q, K, V + the block up to the head transpose -> com.microsoft.Attention
    + Reshape to [B, S, H, D] (the module docstring has the math)."""

    cpu_min_heads = 1

    def __init__(self, name: str, run: FusionRun, *, divide: bool, masked: bool, gemm: bool, guarded: bool = False):
        super().__init__(name, run, divide=divide, masked=masked, merged=False, guarded=guarded)
        self.gemm = gemm

    def pattern(self, op, x, w, b, flat, unflat, qs, ks, vs, c, mask, out_shape, nan_zero):
        if self.gemm:
            proj = op.Gemm(op.Reshape(x, flat, _outputs=["x2"]), w, b, _outputs=["proj"])
            qkv = op.Reshape(proj, unflat, _outputs=["qkv"])
        else:
            qkv = op.Add(op.MatMul(x, w), b, _outputs=["qkv"])
        q3, k3, v3 = op.Split(qkv, _allow_other_inputs=True, _outputs=["q3", "k3", "v3"])
        return super().pattern(op, q3, k3, v3, qs, ks, vs, c, mask, out_shape, nan_zero)

    def check(self, context, x, w, b, qkv, q3, k3, v3, flat=None, unflat=None, **kw):
        result = super().check(context, q3=q3, k3=k3, v3=v3, **kw)
        if not result:
            return result
        if x.shape is None or x.shape.rank() != 3 or not isinstance(x.shape[2], int):
            return result.fail("input is not rank 3 with a static hidden size", x)
        weight, bias = self.run.const(w), self.run.const(b)
        hidden = q3.shape[2]
        if self.gemm:
            gemm = qkv.producer().inputs[0].producer()
            if (gemm.attributes.get("alpha", ir.AttrFloat32("alpha", 1.0)).as_float() != 1.0
                    or gemm.attributes.get("beta", ir.AttrFloat32("beta", 1.0)).as_float() != 1.0
                    or int_attr(gemm, "transA", 0) != 0):
                return result.fail("Gemm scales or transposes its input", gemm)
            if weight is not None and int_attr(gemm, "transB", 0) == 1:
                weight = weight.T
            target = self.run.const(flat)
            if target is None or target.tolist() != [-1, x.shape[2]]:
                return result.fail("the projection's input is not flattened to [-1, hidden]", flat)
            if not _restores_leading_dims(self.run, qkv, unflat, x, 3 * hidden):
                return result.fail("the projection's reshape back cannot be proven to be [B, S, 3H]", unflat)
        if weight is None or weight.ndim != 2 or weight.shape != (x.shape[2], 3 * hidden):
            return result.fail("the projection weight is not a constant [hidden_in, 3H]", w)
        if bias is None or bias.size != 3 * hidden or bias.ndim not in (1, 2) or bias.shape[-1] != 3 * hidden:
            return result.fail("the projection bias is not a constant of 3H", b)
        if x.dtype is None or weight.dtype != x.dtype.numpy() or bias.dtype != weight.dtype:
            return result.fail("the projection's dtypes differ from the input's", w)
        split = q3.producer()
        if int_attr(split, "axis", 0) % 3 != 2:
            return result.fail("the split is not over the last axis", split)
        sizes = self.run.const(split.inputs[1]) if len(split.inputs) > 1 and split.inputs[1] is not None else None
        if sizes is None and int_attr(split, "num_outputs", 0) != 3:
            return result.fail("split sizes unknown", split)
        if sizes is not None and sizes.reshape(-1).tolist() != [hidden] * 3:
            return result.fail("the split is not three equal parts", split)
        return result

    def rewrite(self, op, x, w, b, q3, qr, c, mask=None, **_):
        mask = clamp_for_guard(op, mask, self.guarded)
        run = self.run
        h, d = heads(run, qr, q3.shape[2])
        weight = run.const(w)
        if self.gemm and int_attr(q3.producer().inputs[0].producer().inputs[0].producer(), "transB", 0) == 1:
            w = run.fresh_initializer(op, weight.T, "qkv_weight")
        if run.const(b).ndim != 1:
            b = run.fresh_initializer(op, run.const(b).reshape(-1), "qkv_bias")
        inputs = [x, w, b]
        if mask is not None:
            if not full_query_axis(mask, x.shape[1]):
                mask = with_query_axis(op, mask, x, 1)
            inputs += [None, None, mask]
        out = op.Attention(*inputs, num_heads=h, scale=scale_of(run, c, self.divide), _domain="com.microsoft")
        return op.Reshape(out, int64s(op, [0, 0, h, d]))


def _projection_input(run: FusionRun, split_out):
    """x, when ``split_out`` is a piece (split on axis 2) of ``Reshape(Gemm(Reshape(x, [-1, Hin]),
    W, b), T)`` with T proven to restore x's [B, S] (the flattening GEMM of GPT-2's c_attn), or
    of ``Add(MatMul(x, W), b)`` with x 3-D, W 2-D and b 1-D."""
    split = split_out.producer()
    if split is None or split.op_type != "Split" or int_attr(split, "axis", 0) not in (2, -1):
        return None
    qkv = split.inputs[0]
    unflat = qkv.producer()
    if unflat is not None and unflat.op_type == "Add":  # x @ W + b on 3-D: [B, S] kept
        mm, bias = unflat.inputs[0].producer(), run.const(unflat.inputs[1])
        if mm is None or mm.op_type != "MatMul" or bias is None or bias.ndim != 1:
            return None
        x, w = mm.inputs
        ok = x.shape is not None and x.shape.rank() == 3 and w.shape is not None and w.shape.rank() == 2
        return x if ok else None
    if unflat is None or unflat.op_type != "Reshape" or qkv.shape is None or qkv.shape.rank() != 3:
        return None
    gemm = unflat.inputs[0].producer()
    if gemm is None or gemm.op_type != "Gemm" or int_attr(gemm, "transA", 0) != 0:
        return None
    flat = gemm.inputs[0].producer()
    if flat is None or flat.op_type != "Reshape":
        return None
    x = flat.inputs[0]
    if x.shape is None or x.shape.rank() != 3 or not isinstance(qkv.shape[2], int):
        return None
    return x if _restores_leading_dims(run, qkv, unflat.inputs[1], x, qkv.shape[2]) else None


class ShapeOfProjection(RunRule):
    """Batch / sequence sizes read from a Q/K/V piece of GPT-2's projection are read from the
    projection's input instead (the TorchScript export reshapes V with the sizes of K, which
    would keep K's projection alive after fusion).

    Math: the piece is ``Split(Reshape(Gemm(Reshape(x, [-1, Hin])), [B, S, 3H]), axis=2)``,
    with [B, S] proven to be x's dims 0 and 1 (see :func:`_restores_leading_dims`), or
    ``Split(x @ W + b, axis=2)`` (a 3-D by 2-D MatMul and a 1-D bias keep x's [B, S]); a split
    on axis 2 keeps dims 0 and 1: ``Gather(Shape(piece), j) = Gather(Shape(x), j)``, j in {0, 1}.
    """

    def __init__(self, name: str, run: FusionRun):
        super().__init__(name, run, remove_nodes=False)

    def pattern(self, op, piece, j):
        return op.Gather(op.Shape(piece, _outputs=["shape"]), j, _outputs=["out"])

    def check(self, context, piece, j, shape, out, **_):
        result = pattern.MatchResult()
        index = self.run.const(j)
        if (index is None or index.size != 1 or int(index.reshape(())) not in (0, 1)
                or int_attr(out.producer(), "axis", 0) != 0 or shape.producer().attributes.get("start") is not None
                or shape.producer().attributes.get("end") is not None):
            return result.fail("not the batch or sequence size", out)
        if _projection_input(self.run, piece) is None:
            return result.fail("not a piece of a [B, S, 3H] projection split on its last axis", piece)
        return result

    def rewrite(self, op, piece, j, **_):
        return op.Gather(op.Shape(_projection_input(self.run, piece)), j, axis=0)


def _restores_leading_dims(run: FusionRun, value, target, x, last: int) -> bool:
    """``value`` (a Reshape output) is [x's dim 0, x's dim 1, last]: by inferred shape, or by a
    target ``Concat`` of two sizes proven to be x's dims 0 and 1 and the constant ``last``."""
    shape = value.shape
    if (shape is not None and shape.rank() == 3 and shape[2] == last and x.shape is not None
            and same_dim(shape[0], x.shape[0]) and same_dim(shape[1], x.shape[1])):
        return True
    if target is None:
        return False
    node = target.producer()
    if node is None or node.op_type != "Concat" or len(node.inputs) != 3:
        return False
    tail = run.const(node.inputs[2])
    return (tail is not None and tail.reshape(-1).tolist() == [last]
            and holds_dim(run, node.inputs[0], x, 0) and holds_dim(run, node.inputs[1], x, 1))


_EMITS = [("com.microsoft", "Attention", 1)]
ORT_ATTENTION_SPLIT_SHAPE = fusion(
    "ort-attention-split-shape", lambda run: [ShapeOfProjection.rule("ort-attention-split-shape", run)], _EMITS,
    "batch/sequence sizes of a Q/K/V piece of a projection read from its input (so the split attention can fire)",
    needs=("Split",))
ORT_ATTENTION_SPLIT = fusion(
    "ort-attention-split",
    lambda run: (variant_rules(SplitAttention, "ort-attention-split", run, gemm=True, guards=True)
                 + variant_rules(SplitAttention, "ort-attention-split-mm", run, gemm=False, guards=True)),
    _EMITS, "x@W+b split into Q, K, V (GPT-2) + the attention block -> com.microsoft Attention (+ Reshape to heads)",
    needs=("Softmax",))
