"""Q, K, V projected from one input by constant weights and biases + the attention block ->
ONNX Runtime's ``com.microsoft.Attention`` with the three weights packed side by side.

Math: [Q | K | V] = x @ [Wq | Wk | Wv] + [bq | bk | bv], so one GEMM replaces three (and
three bias Adds), and the attention block after it is the MultiHeadAttention math of
ort_mha.py (BERT/ViT's three biased projections of one input); the additive mask goes in
as ``attention_bias``.

Measured on ORT's CPU provider (2 threads, torch BERT 4 layers/4 heads, batch 2): seq 16
2.41 ms vs 3.43 original, 2.66 unfused O3; seq 128 9.06 vs 9.38 and 9.90; ViT 9.05 vs
9.60 — faster at every size, so no head limit on ``ort-cpu`` (unlike MultiHeadAttention).

Refused besides MultiHeadAttention's cases: weights or biases that are not constant 2-D /
1-D tensors of one shape and of the input's dtype, an input that is not rank 3.
"""

from __future__ import annotations

__all__ = ["ORT_ATTENTION"]

import numpy as np

from gcomp.passes.fusion._attention import clamp_for_guard, full_query_axis, heads, scale_of, variant_rules, with_query_axis
from gcomp.passes.fusion._engine import fusion
from gcomp.passes.fusion.ort_mha import MultiHeadAttention


class PackedAttention(MultiHeadAttention):
    """x@Wq+bq, x@Wk+bk, x@Wv+bv + the block -> com.microsoft.Attention(x, [Wq|Wk|Wv], [bq|bk|bv])."""

    cpu_min_heads = 1

    def pattern(self, op, x, wq, wk, wv, bq, bk, bv, qs, ks, vs, c, mask, out_shape, nan_zero):
        q3 = op.Add(op.MatMul(x, wq), bq, _outputs=["q3"])
        k3 = op.Add(op.MatMul(x, wk), bk, _outputs=["k3"])
        v3 = op.Add(op.MatMul(x, wv), bv, _outputs=["v3"])
        return super().pattern(op, q3, k3, v3, qs, ks, vs, c, mask, out_shape, nan_zero)

    def check(self, context, x, wq, wk, wv, bq, bk, bv, q3, **kw):
        result = super().check(context, q3=q3, x=x, **kw)
        if not result:
            return result
        ws = [self.run.const(w) for w in (wq, wk, wv)]
        bs = [self.run.const(b) for b in (bq, bk, bv)]
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
        mask = clamp_for_guard(op, mask, self.guarded)
        run = self.run
        h, _d = heads(run, qr, q3.shape[2])
        w = run.fresh_initializer(op, np.concatenate([run.const(v) for v in (wq, wk, wv)], axis=1), "qkv_weight")
        b = run.fresh_initializer(op, np.concatenate([run.const(v) for v in (bq, bk, bv)]), "qkv_bias")
        inputs = [x, w, b]
        if mask is not None:
            if not full_query_axis(mask, q3.shape[1]):
                mask = with_query_axis(op, mask, x, 1)  # x: same [B, S] as q3, which goes away
            inputs += [None, None, mask]
        return op.Attention(*inputs, num_heads=h, scale=scale_of(run, c, self.divide), _domain="com.microsoft")


ORT_ATTENTION = fusion(
    "ort-attention", lambda run: variant_rules(PackedAttention, "ort-attention", run, guards=True),
    [("com.microsoft", "Attention", 1)],
    "x@Wq+bq, x@Wk+bk, x@Wv+bv + the attention block -> com.microsoft Attention with packed QKV weights",
    needs=("Softmax",))
