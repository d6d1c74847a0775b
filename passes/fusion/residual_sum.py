"""A residual ``Add`` feeding ``LayerNormalization`` is written as ``Sum`` (not for ORT CUDA).

Math: ``Sum(a, b) = Add(a, b)`` exactly (both elementwise, multidirectional broadcasting,
same type), so ``LayerNormalization(Sum(a, b))`` is the model unchanged.

Why: ONNX Runtime's session-time SkipLayerNormFusion turns ``Add -> LayerNormalization``
into ``com.microsoft.SkipLayerNormalization`` whenever it can prove the operands' shapes
equal, and on the CPU provider that kernel is 3-20x slower than the two ops it replaces
(best of 60 x 20 runs, onnxruntime 1.31, 2 threads, two sessions: [2,16,128] 24.9 vs 7.8 us,
[2,128,256] 201.5 vs 50.5 us, [2,197,192] 477.7 vs 60.7 us in one; [2,128,256] 920 vs 46 us,
[2,197,192] 534 vs 58 us in the other; docs/measurements.md). The fusion matches ``Add`` only.
gcomp's own folding makes those shapes provable more often than in the exported model,
so without this the optimized model could run slower than the original under
ORT_ENABLE_ALL (the default runtime; measured on the zoo transformer: O2 0.87x before).
It is portable (standard ``Sum``; TVM fuses either). For ``ort-cuda`` the fused kernel is
the fast one: not applied there (O3 for CUDA emits SkipLayerNormalization itself).
"""

from __future__ import annotations

__all__ = ["RESIDUAL_SUM", "TVM_SUM_SLOWER"]

from onnxscript.rewriter import pattern

from gcomp.passes.fusion._engine import RunRule, fusion

TVM_SUM_SLOWER = ("TVM legalizes Sum as broadcast_to + stack + sum, a kernel of its own, where the Add "
            "fuses into the producing MatMul's kernel")


class ResidualSum(RunRule):
    def pattern(self, op, a, b):
        s = op.Add(a, b)
        return op.LayerNormalization(s, _allow_other_inputs=True, _outputs=["y"])

    def check(self, context, a, b, y, **_):
        result = pattern.MatchResult()
        ln = y.producer()
        if any(out.uses() or out.is_graph_output() for out in ln.outputs[1:]):
            return result.fail("LayerNormalization's mean / inv-std outputs are used", ln)
        if a.dtype is not None and b.dtype is not None and a.dtype != b.dtype:
            return result.fail("operand types differ", b)
        return result

    def rewrite(self, op, a, b, y, **_):
        ln = y.producer()
        return op.LayerNormalization(op.Sum(a, b), *ln.inputs[1:], **ln.attributes)


RESIDUAL_SUM = fusion(
    "residual-sum", lambda run: [ResidualSum.rule("residual-sum", run)], [("", "Sum", 8)],
    "Add -> LayerNormalization written as Sum, so ORT's CPU SkipLayerNormFusion (a slower kernel) leaves it",
    needs=("LayerNormalization",),
    not_for=[("ort-cuda", "ORT's CUDA SkipLayerNormalization is the fast kernel there"),
             ("tvm-llvm", TVM_SUM_SLOWER), ("tvm-cuda", TVM_SUM_SLOWER)])
