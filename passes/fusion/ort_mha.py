"""The whole attention block, head split to head merge -> ONNX Runtime's ``com.microsoft.MultiHeadAttention``.

Math (see _attention.py): with Q, K, V the [B, S, H*D] projections, the block

    Reshape(Transpose(softmax(split(Q) @ split(K)^T * c + M) @ split(V), [0, 2, 1, 3]), [B, S, H*D])

is ``MultiHeadAttention(Q, K, V, attention_bias=M, num_heads=H, scale=c)`` on the 3-D
projections; its output is the merged ``out`` directly. Where the block ends at the head
transpose [B, S, H, D] (GPT-2 reads that value twice, so the merge is not the block's own),
the fused output is reshaped back to [B, S, H, D] (``ort-mha-heads``). The mask is broadcast
to the query axis when it would broadcast there (ORT's kernels broadcast over batch and
heads only).

For ``ort-cpu`` only from 8 heads up (measured: below that ORT's own unfused kernels are
faster; :data:`_CPU_MIN_HEADS`; figures in docs/measurements.md). Refused besides the core's cases: head reshapes whose H
and D disagree between Q, K and V or with the hidden size, projections that are not rank 3
with a static hidden size or not float32/float16, batch or key lengths that differ, a merge
reshape that does not keep [B, S], any intermediate used elsewhere.
"""

from __future__ import annotations

__all__ = ["ORT_MHA", "ORT_MHA_HEADS", "MultiHeadAttention"]

import numpy as np
from onnxscript.rewriter import pattern

from gcomp.passes.fusion._attention import (check_core, clamp_for_guard, core, full_query_axis, heads, int64s, scale_of, variant_rules,
                                            with_query_axis)
from gcomp.passes.fusion._dims import same_dim
from gcomp.passes.fusion._engine import FusionRun, RunRule, fusion

# Measured on ORT 1.31's CPU provider (2 threads, best of 40): MultiHeadAttention vs the
# unfused block, [B,S,heads,D] = [2,128,4,64]: 4.9 vs 4.2 ms; [2,197,3,64]: 6.5 vs 6.0 ms;
# [1,384,12,64]: 21.7 vs 27.0 ms. Few heads: ORT's own FusedMatMul/Softmax path wins.
_CPU_MIN_HEADS = 8


class MultiHeadAttention(RunRule):
    """The whole block, split to merge, -> com.microsoft.MultiHeadAttention (ORT)."""

    cpu_min_heads = _CPU_MIN_HEADS

    def __init__(self, name: str, run: FusionRun, *, divide: bool, masked: bool, merged: bool = True,
                 guarded: bool = False):
        super().__init__(name, run)
        self.divide, self.masked, self.merged, self.guarded = divide, masked, merged, guarded

    def pattern(self, op, q3, k3, v3, qs, ks, vs, c, mask, out_shape, nan_zero):
        q4 = op.Transpose(op.Reshape(q3, qs, _outputs=["qr"]), perm=[0, 2, 1, 3])
        kt = op.Transpose(op.Reshape(k3, ks, _outputs=["kr"]), perm=[0, 2, 3, 1])
        v4 = op.Transpose(op.Reshape(v3, vs, _outputs=["vr"]), perm=[0, 2, 1, 3])
        o = core(op, q4, kt, v4, c, mask, divide=self.divide, masked=self.masked, guarded=self.guarded,
                 nan_zero=nan_zero)
        if not self.merged:  # [B, S, H, D]: the merge reshape is shared or missing
            return op.Transpose(o, perm=[0, 2, 1, 3], _outputs=["out"])
        return op.Reshape(op.Transpose(o, perm=[0, 2, 1, 3]), out_shape, _outputs=["out"])

    def check(self, context, q3, k3, v3, qr, kr, vr, c, probs, out, mask=None, nan_zero=None, **_):
        result = pattern.MatchResult()
        failed = check_core(self.run, result, probs, c, self.divide, mask, nan_zero)
        if failed is not None:
            return failed
        for v in (q3, k3, v3):
            if v.shape is None or v.shape.rank() != 3 or not isinstance(v.shape[2], int):
                return result.fail("projection is not rank 3 with a static hidden size", v)
            if v.dtype is None or v.dtype.numpy() not in (np.float32, np.float16):
                return result.fail("projection dtype is not float32/float16", v)
        split = [heads(self.run, r, v.shape[2]) for r, v in ((qr, q3), (kr, k3), (vr, v3))]
        if None in split or len(set(split)) != 1:
            return result.fail("Q, K, V head splits disagree or are unknown", qr)
        h, d = split[0]
        if self.run.target.name == "ort-cpu" and h < self.cpu_min_heads:
            return result.fail(f"ort-cpu: MultiHeadAttention measured slower than ORT's own kernels below "
                               f"{self.cpu_min_heads} heads (this block has {h})", qr)
        if any(v.shape[2] != h * d for v in (q3, k3, v3)):
            return result.fail("hidden size is not heads * head size", q3)
        if not (same_dim(k3.shape[0], q3.shape[0]) and same_dim(v3.shape[0], q3.shape[0])
                and same_dim(k3.shape[1], v3.shape[1])):
            return result.fail("Q, K, V batch / key lengths differ", k3)
        if self.merged and not _keeps_batch_and_sequence(self.run, out, q3, h * d):
            return result.fail("the merge reshape does not keep [batch, sequence]", out)
        return result

    def rewrite(self, op, q3, k3, v3, qr, c, mask=None, **_):
        mask = clamp_for_guard(op, mask, self.guarded)
        h, _d = heads(self.run, qr, q3.shape[2])
        if mask is not None and not full_query_axis(mask, q3.shape[1]):
            mask = with_query_axis(op, mask, q3, 1)
        inputs = [q3, k3, v3] + ([None, None, mask] if mask is not None else [])
        out = op.MultiHeadAttention(*inputs, num_heads=h, scale=scale_of(self.run, c, self.divide),
                                    _domain="com.microsoft")
        if self.merged:
            return out
        return op.Reshape(out, int64s(op, [0, 0, h, v3.shape[2] // h]))


def _keeps_batch_and_sequence(run: FusionRun, out, q3, hidden) -> bool:
    """Reshape([B, S, H, D] -> out) is the head merge [B, S, H*D]."""
    node = out.producer()
    allowzero = node.attributes.get("allowzero")
    target = run.const(node.inputs[1])
    if target is not None and target.shape == (3,) and (allowzero is None or allowzero.as_int() == 0):
        if target[0] == 0 and target[1] == 0 and target[2] in (-1, hidden):
            return True  # 0 copies the input's dim: [B, S, -1] by construction
    return (out.shape is not None and out.shape.rank() == 3
            and same_dim(out.shape[0], q3.shape[0]) and same_dim(out.shape[1], q3.shape[1]))


_EMITS = [("com.microsoft", "MultiHeadAttention", 1)]
ORT_MHA = fusion(
    "ort-mha", lambda run: variant_rules(MultiHeadAttention, "ort-mha", run, guards=True), _EMITS,
    "head split + QK^T*scale (+mask) + softmax + PV + head merge -> com.microsoft MultiHeadAttention",
    needs=("Softmax",))
ORT_MHA_HEADS = fusion(
    "ort-mha-heads", lambda run: variant_rules(MultiHeadAttention, "ort-mha-heads", run, merged=False, guards=True), _EMITS,
    "the same block up to the head transpose -> MultiHeadAttention + Reshape to [B, S, H, D]", needs=("Softmax",))
