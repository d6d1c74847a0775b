"""Scaled dot-product attention with head reshapes -> one attention op.

Math, per batch b and head h (Q, K, V: [B, S, H*D] projections split into H heads of D):

    scores = (Q_h @ K_h^T) * c   (c: the graph's scale; also written  / (1/c))
    P      = softmax(scores + M, axis=-1)        (M: an additive mask, optional)
    O_h    = P @ V_h ;   out = concat_h(O_h)  -> [B, S, H*D]

Exporters write the split as ``Transpose(Reshape(Q, [B, S, H, D]), [0, 2, 1, 3])``, K^T as
``Transpose(Reshape(K, ...), [0, 2, 3, 1])`` and the merge as
``Reshape(Transpose(O, [0, 2, 1, 3]), [B, S, H*D])``.

- ``attention`` (portable, opset 23): the core (from the two MatMuls to softmax) ->
  ``Attention(Q4, K4, V4, M, scale=c)`` on the 4-D heads, K4 re-derived from the same
  Reshape with perm [0, 2, 1, 3]. Never emitted for a model below opset 23 (upgrade with
  ``--target-opset 23``), nor for targets that cannot import it (TVM 0.27).
- ``ort-mha`` (ORT): the whole block including the split and merge ->
  ``com.microsoft.MultiHeadAttention(Q, K, V, attention_bias=M, num_heads=H, scale=c)``
  on the 3-D projections; its output is ``out`` directly. For ``ort-cpu`` only from 8
  heads up (measured: below that ORT's own unfused kernels are faster).
- ``ort-attention`` / ``ort-attention-split`` (ORT): the block with its Q/K/V projections ->
  ``com.microsoft.Attention`` with packed weights (BERT/ViT's three biased projections of
  one input; GPT-2's one projection split in three), the mask as ``attention_bias``;
  measured faster than ORT's unfused block on the CPU at every head count tried.

Refused: head reshapes whose H and D disagree between Q, K and V or with the hidden size,
a softmax over another axis, a scale that is not a positive scalar constant, a mask that
is not a float tensor of rank <= 4 (and, for MHA, one whose query axis may broadcast),
a merge reshape that does not keep [B, S], any intermediate used elsewhere.
"""

from __future__ import annotations

__all__ = ["ORDER"]

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from gcomp.passes.fusion import _engine
from gcomp.passes.fusion._dims import holds_dim, int_attr, same_dim
from gcomp.passes.fusion._engine import const_array, fresh_initializer, fusion

ORDER = 80


# Measured on ORT 1.31's CPU provider (2 threads, best of 40): MultiHeadAttention vs the
# unfused block, [B,S,heads,D] = [2,128,4,64]: 4.9 vs 4.2 ms; [2,197,3,64]: 6.5 vs 6.0 ms;
# [1,384,12,64]: 21.7 vs 27.0 ms. Few heads: ORT's own FusedMatMul/Softmax path wins.
_CPU_MIN_HEADS = 8


def _perm(value) -> list[int] | None:
    node = value.producer()
    attr = node.attributes.get("perm") if node is not None else None
    return None if attr is None else list(attr.as_ints())


def _heads(reshape_out, hidden) -> tuple[int, int] | None:
    """(H, D) of a [B, S, H, D] head split, from the Reshape's output shape or its target."""
    shape = reshape_out.shape
    if shape is not None and shape.rank() == 4 and isinstance(shape[2], int) and isinstance(shape[3], int):
        return shape[2], shape[3]
    source = reshape_out.producer().inputs[0]
    if (shape is not None and shape.rank() == 4 and isinstance(shape[3], int) and isinstance(hidden, int)
            and source.shape is not None and source.shape.rank() == 3
            and same_dim(shape[0], source.shape[0]) and same_dim(shape[1], source.shape[1])
            and shape[3] > 0 and hidden % shape[3] == 0):
        return hidden // shape[3], shape[3]  # [B, S, ?, D] from [B, S, hidden]: ? = hidden / D
    node = reshape_out.producer()
    target = const_array(node.inputs[1])
    allowzero = node.attributes.get("allowzero")
    if target is None or target.shape != (4,) or not isinstance(hidden, int):
        return None
    if allowzero is not None and allowzero.as_int() == 1:
        return None
    if source.shape is None or source.shape.rank() != 3:
        return None
    for i in (0, 1):  # batch and sequence copied (0) or the source's own static dims
        if not (target[i] == 0 or (isinstance(source.shape[i], int) and target[i] == source.shape[i])):
            return None
    h, d = int(target[2]), int(target[3])
    if h == -1 and d > 0 and hidden % d == 0:
        h = hidden // d
    if d == -1 and h > 0 and hidden % h == 0:
        d = hidden // h
    return (h, d) if h > 0 and d > 0 else None


def _scale(scale_value, divide: bool) -> float | None:
    c = const_array(scale_value)
    if c is None or c.size != 1:
        return None
    c = float(np.asarray(c, dtype=np.float64).reshape(()))
    if not np.isfinite(c) or c <= 0:
        return None
    return 1.0 / c if divide else c


def _core(op, q4, kt, v4, c, mask, *, divide: bool, masked: bool):
    scores = op.MatMul(q4, kt)
    scaled = op.Div(scores, c) if divide else op.Mul(scores, c)
    if masked:
        scaled = op.Add(scaled, mask)
    probs = op.Softmax(scaled, _outputs=["probs"])
    return op.MatMul(probs, v4)


def _check_core(result, probs, c, divide, mask):
    axis = probs.producer().attributes.get("axis")
    axis = -1 if axis is None else axis.as_int()
    if axis not in (-1, 3):
        return result.fail("softmax is not over the last axis", probs)
    scale = _scale(c, divide)
    if scale is None:
        return result.fail("scale is not a positive scalar constant", c)
    if mask is not None:
        if mask.dtype is None or not mask.dtype.is_floating_point():
            return result.fail("mask is not a float (additive) tensor", mask)
        if mask.shape is None or mask.shape.rank() is None or mask.shape.rank() > 4:
            return result.fail("mask rank unknown or above 4", mask)
    return None


class MultiHeadAttention(pattern.RewriteRuleClassBase):
    """The whole block, split to merge, -> com.microsoft.MultiHeadAttention (ORT)."""

    cpu_min_heads = _CPU_MIN_HEADS

    def __init__(self, name: str, *, divide: bool, masked: bool, merged: bool = True):
        super().__init__(name)
        self.divide, self.masked, self.merged = divide, masked, merged

    def pattern(self, op, q3, k3, v3, qs, ks, vs, c, mask, out_shape):
        q4 = op.Transpose(op.Reshape(q3, qs, _outputs=["qr"]), perm=[0, 2, 1, 3])
        kt = op.Transpose(op.Reshape(k3, ks, _outputs=["kr"]), perm=[0, 2, 3, 1])
        v4 = op.Transpose(op.Reshape(v3, vs, _outputs=["vr"]), perm=[0, 2, 1, 3])
        o = _core(op, q4, kt, v4, c, mask, divide=self.divide, masked=self.masked)
        if not self.merged:  # [B, S, H, D]: the merge reshape is shared or missing
            return op.Transpose(o, perm=[0, 2, 1, 3], _outputs=["out"])
        return op.Reshape(op.Transpose(o, perm=[0, 2, 1, 3]), out_shape, _outputs=["out"])

    def check(self, context, q3, k3, v3, qr, kr, vr, c, probs, out, mask=None, **_):
        result = pattern.MatchResult()
        failed = _check_core(result, probs, c, self.divide, mask)
        if failed is not None:
            return failed
        for v in (q3, k3, v3):
            if v.shape is None or v.shape.rank() != 3 or not isinstance(v.shape[2], int):
                return result.fail("projection is not rank 3 with a static hidden size", v)
            if v.dtype is None or v.dtype.numpy() not in (np.float32, np.float16):
                return result.fail("projection dtype is not float32/float16", v)
        heads = [_heads(r, v.shape[2]) for r, v in ((qr, q3), (kr, k3), (vr, v3))]
        if None in heads or len(set(heads)) != 1:
            return result.fail("Q, K, V head splits disagree or are unknown", qr)
        h, d = heads[0]
        if _engine.TARGET == "ort-cpu" and h < self.cpu_min_heads:
            return result.fail(f"ort-cpu: MultiHeadAttention measured slower than ORT's own kernels below "
                               f"{self.cpu_min_heads} heads (this block has {h})", qr)
        if any(v.shape[2] != h * d for v in (q3, k3, v3)):
            return result.fail("hidden size is not heads * head size", q3)
        if not (same_dim(k3.shape[0], q3.shape[0]) and same_dim(v3.shape[0], q3.shape[0])
                and same_dim(k3.shape[1], v3.shape[1])):
            return result.fail("Q, K, V batch / key lengths differ", k3)
        if self.merged and not _keeps_batch_and_sequence(out, q3, h * d):
            return result.fail("the merge reshape does not keep [batch, sequence]", out)
        return result

    def rewrite(self, op, q3, k3, v3, qr, c, mask=None, **_):
        h, _d = _heads(qr, q3.shape[2])
        if mask is not None and not _full_query_axis(mask, q3.shape[1]):
            mask = _with_query_axis(op, mask, q3, 1)
        inputs = [q3, k3, v3] + ([None, None, mask] if mask is not None else [])
        out = op.MultiHeadAttention(*inputs, num_heads=h, scale=_scale(c, self.divide), _domain="com.microsoft")
        if self.merged:
            return out
        return op.Reshape(out, _ints(op, [0, 0, h, v3.shape[2] // h]))


def _keeps_batch_and_sequence(out, q3, hidden) -> bool:
    """Reshape([B, S, H, D] -> out) is the head merge [B, S, H*D]."""
    node = out.producer()
    allowzero = node.attributes.get("allowzero")
    target = const_array(node.inputs[1])
    if target is not None and target.shape == (3,) and (allowzero is None or allowzero.as_int() == 0):
        if target[0] == 0 and target[1] == 0 and target[2] in (-1, hidden):
            return True  # 0 copies the input's dim: [B, S, -1] by construction
    return (out.shape is not None and out.shape.rank() == 3
            and same_dim(out.shape[0], q3.shape[0]) and same_dim(out.shape[1], q3.shape[1]))


def _full_query_axis(mask, seq) -> bool:
    return mask.shape is not None and mask.shape.rank() == 4 and same_dim(mask.shape[2], seq)


def _with_query_axis(op, mask, q, axis: int):
    """The mask broadcast to [B|1, H|1, S, T]: ORT's attention kernels broadcast over batch
    and heads only. The mask broadcast against [B, H, S, T] in the original Add, so each of
    its dims is 1 or full, and broadcasting with [1, 1, S, 1] only fills the query axis."""
    seq = op.Slice(op.Shape(q), _ints(op, [axis]), _ints(op, [axis + 1]))
    return op.Expand(mask, op.Concat(_ints(op, [1, 1]), seq, _ints(op, [1]), axis=0))


def _ints(op, values):
    return op.Constant(value=ir.tensor(np.array(values, dtype=np.int64)))


class Attention23(pattern.RewriteRuleClassBase):
    """The core on 4-D heads -> Attention (opset 23)."""

    def __init__(self, name: str, *, divide: bool, masked: bool):
        super().__init__(name)
        self.divide, self.masked = divide, masked

    def pattern(self, op, q4, kr, v4, c, mask):
        kt = op.Transpose(kr, perm=[0, 2, 3, 1], _outputs=["kt"])
        return _core(op, q4, kt, v4, c, mask, divide=self.divide, masked=self.masked)

    def check(self, context, q4, kr, v4, c, probs, mask=None, **_):
        result = pattern.MatchResult()
        failed = _check_core(result, probs, c, self.divide, mask)
        if failed is not None:
            return failed
        for v in (q4, kr, v4):
            if v.shape is None or v.shape.rank() != 4:
                return result.fail("Q, K, V are not rank 4", v)
            if v.dtype is None or not v.dtype.is_floating_point():
                return result.fail("Q, K, V are not float tensors", v)
        # Attention takes K [B, H, T, D] and V [B, H, T, Dv] with Q's batch and heads: no
        # MatMul broadcasting over them (kr is [B, T, H, D], what the transpose reads).
        q, k, v = q4.shape, kr.shape, v4.shape
        if not (same_dim(k[0], q[0]) and same_dim(k[2], q[1]) and same_dim(v[0], q[0])
                and same_dim(v[1], q[1]) and same_dim(v[2], k[1])):
            return result.fail("Q, K, V batch/heads/length cannot be proven to match (broadcasting)", kr)
        return result

    def rewrite(self, op, q4, kr, v4, c, mask=None, **_):
        k4 = op.Transpose(kr, perm=[0, 2, 1, 3])
        if mask is not None and not _full_query_axis(mask, q4.shape[2]):
            mask = _with_query_axis(op, mask, q4, 2)
        inputs = [q4, k4, v4] + ([mask] if mask is not None else [])
        return op.Attention(*inputs, scale=_scale(c, self.divide))


class PackedAttention(MultiHeadAttention):
    """Q, K, V projected from one input by constant weights and biases -> one
    ``com.microsoft.Attention`` with the three weights packed side by side.

    Math: [Q | K | V] = x @ [Wq | Wk | Wv] + [bq | bk | bv], so one GEMM replaces three
    (and three bias Adds), and the attention block after it is the MultiHeadAttention math
    above; the additive mask goes in as ``attention_bias``.

    Measured on ORT's CPU provider (2 threads, torch BERT 4 layers/4 heads, batch 2): seq 16
    2.41 ms vs 3.43 original, 2.66 unfused O3; seq 128 9.06 vs 9.38 and 9.90; ViT 9.05 vs
    9.60 — faster at every size, so no head limit on ``ort-cpu`` (unlike MultiHeadAttention).
    """

    cpu_min_heads = 1

    def pattern(self, op, x, wq, wk, wv, bq, bk, bv, qs, ks, vs, c, mask, out_shape):
        q3 = op.Add(op.MatMul(x, wq), bq, _outputs=["q3"])
        k3 = op.Add(op.MatMul(x, wk), bk, _outputs=["k3"])
        v3 = op.Add(op.MatMul(x, wv), bv, _outputs=["v3"])
        return super().pattern(op, q3, k3, v3, qs, ks, vs, c, mask, out_shape)

    def check(self, context, x, wq, wk, wv, bq, bk, bv, q3, **kw):
        result = super().check(context, q3=q3, x=x, **kw)
        if not result:
            return result
        ws = [const_array(w) for w in (wq, wk, wv)]
        bs = [const_array(b) for b in (bq, bk, bv)]
        if any(w is None or w.ndim != 2 for w in ws) or any(b is None or b.ndim != 1 for b in bs):
            return result.fail("Q/K/V weights or biases are not constant 2-D / 1-D", wq)
        if len({w.shape for w in ws}) != 1 or any(b.shape != (w.shape[1],) for w, b in zip(ws, bs)):
            return result.fail("Q/K/V weight or bias shapes differ", wk)
        if len({w.dtype for w in ws + bs}) != 1 or x.dtype is None or x.dtype.numpy() != ws[0].dtype:
            return result.fail("Q/K/V weight dtypes differ from the input's", wq)
        if x.shape is None or x.shape.rank() != 3:
            return result.fail("input is not rank 3", x)
        return result

    def rewrite(self, op, x, wq, wk, wv, bq, bk, bv, q3, qr, c, mask=None, **_):
        h, _d = _heads(qr, q3.shape[2])
        w = fresh_initializer(op, np.concatenate([const_array(v) for v in (wq, wk, wv)], axis=1), "qkv_weight")
        b = fresh_initializer(op, np.concatenate([const_array(v) for v in (bq, bk, bv)]), "qkv_bias")
        inputs = [x, w, b]
        if mask is not None:
            if not _full_query_axis(mask, q3.shape[1]):
                mask = _with_query_axis(op, mask, x, 1)  # x: same [B, S] as q3, which goes away
            inputs += [None, None, mask]
        return op.Attention(*inputs, num_heads=h, scale=_scale(c, self.divide), _domain="com.microsoft")


class SplitAttention(MultiHeadAttention):
    """One projection split into Q, K, V (GPT-2's ``c_attn``) + the attention block up to the
    head transpose -> ``com.microsoft.Attention`` (its packed weight is the projection's own).

    Math: ``qkv = x @ W + b`` (as ``Reshape(Gemm(Reshape(x, [-1, Hin]), W, b), [B, S, 3H])``
    or ``MatMul`` + ``Add``), ``[q | k | v] = Split(qkv, [H, H, H], axis=2)``, which is
    Attention's packed projection with W's columns in Q, K, V order; the block after the
    split is the MultiHeadAttention math above with the additive mask (GPT-2's causal +
    padding mask, computed by the graph) as ``attention_bias``. The block ends at the head
    transpose [B, S, heads, D] (GPT-2 reads it twice), so the fused [B, S, H] output is
    reshaped back to heads. Refused besides MultiHeadAttention's cases: a Gemm with
    alpha/beta != 1 or transA, W/b not constant, a flatten other than [-1, Hin], a reshape
    back that cannot be proven to restore x's [B, S], a split that is not three equal parts
    of the last axis.
    """

    cpu_min_heads = 1

    def __init__(self, name: str, *, divide: bool, masked: bool, gemm: bool):
        super().__init__(name, divide=divide, masked=masked, merged=False)
        self.gemm = gemm

    def pattern(self, op, x, w, b, flat, unflat, qs, ks, vs, c, mask, out_shape):
        if self.gemm:
            proj = op.Gemm(op.Reshape(x, flat, _outputs=["x2"]), w, b, _outputs=["proj"])
            qkv = op.Reshape(proj, unflat, _outputs=["qkv"])
        else:
            qkv = op.Add(op.MatMul(x, w), b, _outputs=["qkv"])
        q3, k3, v3 = op.Split(qkv, _allow_other_inputs=True, _outputs=["q3", "k3", "v3"])
        return super().pattern(op, q3, k3, v3, qs, ks, vs, c, mask, out_shape)

    def check(self, context, x, w, b, qkv, q3, k3, v3, flat=None, unflat=None, **kw):
        result = super().check(context, q3=q3, k3=k3, v3=v3, **kw)
        if not result:
            return result
        if x.shape is None or x.shape.rank() != 3 or not isinstance(x.shape[2], int):
            return result.fail("input is not rank 3 with a static hidden size", x)
        weight, bias = const_array(w), const_array(b)
        hidden = q3.shape[2]
        if self.gemm:
            gemm = qkv.producer().inputs[0].producer()
            if (gemm.attributes.get("alpha", ir.AttrFloat32("alpha", 1.0)).as_float() != 1.0
                    or gemm.attributes.get("beta", ir.AttrFloat32("beta", 1.0)).as_float() != 1.0
                    or int_attr(gemm, "transA", 0) != 0):
                return result.fail("Gemm scales or transposes its input", gemm)
            if weight is not None and int_attr(gemm, "transB", 0) == 1:
                weight = weight.T
            target = const_array(flat)
            if target is None or target.tolist() != [-1, x.shape[2]]:
                return result.fail("the projection's input is not flattened to [-1, hidden]", flat)
            if not _restores_leading_dims(qkv, unflat, x, 3 * hidden):
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
        sizes = const_array(split.inputs[1]) if len(split.inputs) > 1 and split.inputs[1] is not None else None
        if sizes is None and int_attr(split, "num_outputs", 0) != 3:
            return result.fail("split sizes unknown", split)
        if sizes is not None and sizes.reshape(-1).tolist() != [hidden] * 3:
            return result.fail("the split is not three equal parts", split)
        return result

    def rewrite(self, op, x, w, b, q3, qr, c, mask=None, **_):
        h, d = _heads(qr, q3.shape[2])
        weight = const_array(w)
        if self.gemm and int_attr(q3.producer().inputs[0].producer().inputs[0].producer(), "transB", 0) == 1:
            w = fresh_initializer(op, weight.T, "qkv_weight")
        if const_array(b).ndim != 1:
            b = fresh_initializer(op, const_array(b).reshape(-1), "qkv_bias")
        inputs = [x, w, b]
        if mask is not None:
            if not _full_query_axis(mask, x.shape[1]):
                mask = _with_query_axis(op, mask, x, 1)
            inputs += [None, None, mask]
        out = op.Attention(*inputs, num_heads=h, scale=_scale(c, self.divide), _domain="com.microsoft")
        return op.Reshape(out, _ints(op, [0, 0, h, d]))


def _projection_input(split_out):
    """x, when ``split_out`` is a piece (split on axis 2) of ``Reshape(Gemm(Reshape(x, [-1, Hin]),
    W, b), T)`` with T proven to restore x's [B, S] (the flattening GEMM of GPT-2's c_attn), or
    of ``Add(MatMul(x, W), b)`` with x 3-D, W 2-D and b 1-D."""
    split = split_out.producer()
    if split is None or split.op_type != "Split" or int_attr(split, "axis", 0) not in (2, -1):
        return None
    qkv = split.inputs[0]
    unflat = qkv.producer()
    if unflat is not None and unflat.op_type == "Add":  # x @ W + b on 3-D: [B, S] kept
        mm, bias = unflat.inputs[0].producer(), const_array(unflat.inputs[1])
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
    return x if _restores_leading_dims(qkv, unflat.inputs[1], x, qkv.shape[2]) else None


class ShapeOfProjection(pattern.RewriteRuleClassBase):
    """Batch / sequence sizes read from a Q/K/V piece of GPT-2's projection are read from the
    projection's input instead (the TorchScript export reshapes V with the sizes of K, which
    would keep K's projection alive after fusion).

    Math: the piece is ``Split(Reshape(Gemm(Reshape(x, [-1, Hin])), [B, S, 3H]), axis=2)``,
    with [B, S] proven to be x's dims 0 and 1 (see :func:`_restores_leading_dims`), or
    ``Split(x @ W + b, axis=2)`` (a 3-D by 2-D MatMul and a 1-D bias keep x's [B, S]); a split
    on axis 2 keeps dims 0 and 1: ``Gather(Shape(piece), j) = Gather(Shape(x), j)``, j in {0, 1}.
    """

    def __init__(self, name: str):
        super().__init__(name, remove_nodes=False)

    def pattern(self, op, piece, j):
        return op.Gather(op.Shape(piece, _outputs=["shape"]), j, _outputs=["out"])

    def check(self, context, piece, j, shape, out, **_):
        result = pattern.MatchResult()
        index = const_array(j)
        if (index is None or index.size != 1 or int(index.reshape(())) not in (0, 1)
                or int_attr(out.producer(), "axis", 0) != 0 or shape.producer().attributes.get("start") is not None
                or shape.producer().attributes.get("end") is not None):
            return result.fail("not the batch or sequence size", out)
        if _projection_input(piece) is None:
            return result.fail("not a piece of a [B, S, 3H] projection split on its last axis", piece)
        return result

    def rewrite(self, op, piece, j, **_):
        return op.Gather(op.Shape(_projection_input(piece)), j, axis=0)


def _restores_leading_dims(value, target, x, last: int) -> bool:
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
    tail = const_array(node.inputs[2])
    return (tail is not None and tail.reshape(-1).tolist() == [last]
            and holds_dim(node.inputs[0], x, 0) and holds_dim(node.inputs[1], x, 1))


def _rules(cls, prefix: str, **kwargs) -> list:
    rules = []
    for masked in (True, False):
        for divide in (False, True):
            rules.extend(cls.rule(f"{prefix}-{'div' if divide else 'mul'}{'-mask' if masked else ''}",
                                  divide=divide, masked=masked, **kwargs).commute())
    return rules


fusion("ort-attention", "ort", _rules(PackedAttention, "ort-attention"),
       [("com.microsoft", "Attention", 1)],
       "x@Wq+bq, x@Wk+bk, x@Wv+bv + the attention block -> com.microsoft Attention with packed QKV weights",
       needs=("Softmax",))
fusion("ort-attention-split-shape", "ort", [ShapeOfProjection.rule("ort-attention-split-shape")],
       [("com.microsoft", "Attention", 1)],
       "batch/sequence sizes of a Q/K/V piece of a projection read from its input (so the split attention can fire)",
       needs=("Split",))
fusion("ort-attention-split", "ort",
       _rules(SplitAttention, "ort-attention-split", gemm=True) + _rules(SplitAttention, "ort-attention-split-mm", gemm=False),
       [("com.microsoft", "Attention", 1)],
       "x@W+b split into Q, K, V (GPT-2) + the attention block -> com.microsoft Attention (+ Reshape to heads)",
       needs=("Softmax",))
fusion("ort-mha", "ort", _rules(MultiHeadAttention, "ort-mha"),
       [("com.microsoft", "MultiHeadAttention", 1)],
       "head split + QK^T*scale (+mask) + softmax + PV + head merge -> com.microsoft MultiHeadAttention", needs=("Softmax",))
# Where the head merge is not a Reshape of its own (GPT-2 reads the [B, S, H, D] value twice),
# the fused output is reshaped back to heads; a second pass, after the whole-block one.
fusion("ort-mha-heads", "ort", _rules(MultiHeadAttention, "ort-mha-heads", merged=False),
       [("com.microsoft", "MultiHeadAttention", 1)],
       "the same block up to the head transpose -> MultiHeadAttention + Reshape to [B, S, H, D]",
       needs=("Softmax",))
fusion("attention", "portable", _rules(Attention23, "attention"), [("", "Attention", 23)],
       "QK^T*scale (+mask) + softmax + PV on 4-D heads -> Attention (opset 23)", needs=("Softmax",))
