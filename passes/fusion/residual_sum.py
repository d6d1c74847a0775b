"""A residual ``Add`` feeding ``LayerNormalization`` is written as ``Sum`` (not for ORT CUDA);
a bias Add and the residual Add after it become one 3-input ``Sum`` (:class:`BiasResidualSum`).

Math: ``Sum(a, b) = Add(a, b)`` exactly (both elementwise, multidirectional broadcasting,
same type), so ``LayerNormalization(Sum(a, b))`` is the model unchanged.

Why: ONNX Runtime's session-time SkipLayerNormFusion turns ``Add -> LayerNormalization``
into ``com.microsoft.SkipLayerNormalization`` whenever it can prove the operands' shapes
equal, and on the CPU provider that kernel is 3-8x slower than the two ops it replaces
(best of 60 x 20 runs, onnxruntime 1.31, 2 threads: [2,16,128] 24.9 vs 7.8 us; [2,128,256]
201.5 vs 50.5 us; [2,197,192] 477.7 vs 60.7 us; FACTS.md). The fusion matches ``Add`` only.
gcomp's own folding makes those shapes provable more often than in the exported model,
so without this the optimized model could run slower than the original under
ORT_ENABLE_ALL (the default runtime; measured on the zoo transformer: O2 0.87x before).
It is portable (standard ``Sum``; TVM fuses either). For ``ort-cuda`` the fused kernel is
the fast one: not applied there (O3 for CUDA emits SkipLayerNormalization itself).
"""

from __future__ import annotations

__all__ = ["ORDER"]

from onnxscript.rewriter import pattern

from gcomp.passes.fusion._engine import const_array, fusion

ORDER = 90  # after the LayerNorm fusions that make the pattern


_TVM_WHY = ("TVM legalizes Sum as broadcast_to + stack + sum, a kernel of its own, where the Add "
            "fuses into the producing MatMul's kernel")


class ResidualSum(pattern.RewriteRuleClassBase):
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


fusion("residual-sum", "portable", [ResidualSum.rule("residual-sum")], [("", "Sum", 8)],
       "Add -> LayerNormalization written as Sum, so ORT's CPU SkipLayerNormFusion (a slower kernel) leaves it",
       needs=("LayerNormalization",),
       not_for=[("ort-cuda", "ORT's CUDA SkipLayerNormalization is the fast kernel there"),
                ("tvm-llvm", _TVM_WHY), ("tvm-cuda", _TVM_WHY)])


class BiasResidualSum(pattern.RewriteRuleClassBase):
    """``(y + c) + r`` with c a constant and ``y + c`` used only there -> ``Sum(y, c, r)``.

    Math: Sum is n-ary Add with the same multidirectional broadcasting (the broadcast of
    three shapes does not depend on the order they meet), so ``Sum(y, c, r)`` is
    ``(y + c) + r`` element for element, up to the order a runtime adds the three terms
    (one rounding more or less). The outer op may be ``Add`` or a two-input ``Sum`` (what
    residual-sum writes); the operands may come in either order.

    Why: a projection's bias and the residual are added in one pass over the activations
    instead of two, and ORT's CPU SkipLayerNormFusion (a slower kernel) does not take the
    pair (BERT-mini on 2 cores, ORT_ENABLE_ALL: 1.44 vs 1.50 ms min; bench/FUSION.md).
    """

    def __init__(self, name: str, *, outer: str, bias_first: bool, inner_first: bool):
        super().__init__(name)
        self.outer, self.bias_first, self.inner_first = outer, bias_first, inner_first

    def pattern(self, op, y, c, r):
        inner = op.Add(c, y) if self.bias_first else op.Add(y, c)
        args = (inner, r) if self.inner_first else (r, inner)
        return getattr(op, self.outer)(*args, _outputs=["out"])

    def check(self, context, y, c, r, out, **_):
        result = pattern.MatchResult()
        if const_array(c) is None:
            return result.fail("the inner Add has no constant operand", c)
        if const_array(r) is not None or const_array(y) is not None:
            return result.fail("the other operands are not both computed values", r)
        types = {v.dtype for v in (y, c, r)}
        if None in types or len(types) != 1:
            return result.fail("operand types differ or are unknown", r)
        return result

    def rewrite(self, op, y, c, r, **_):
        return op.Sum(y, c, r)


_NOT_FOR = [("ort-cuda", "ORT's CUDA SkipLayerNormalization (with its bias input) is the fast kernel there"),
            ("tvm-llvm", _TVM_WHY), ("tvm-cuda", _TVM_WHY)]
fusion("bias-residual-sum", "portable",
       [BiasResidualSum.rule(f"bias-residual-sum-{outer.lower()}-{int(f)}{int(i)}", outer=outer, bias_first=f,
                             inner_first=i)
        for outer in ("Add", "Sum") for f in (False, True) for i in (True, False)],
       [("", "Sum", 8)],
       "(y + constant) + r -> Sum(y, constant, r): bias and residual in one pass",
       needs=("Add",), not_for=_NOT_FOR)
