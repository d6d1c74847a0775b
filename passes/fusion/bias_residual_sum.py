"""A bias Add and the residual Add after it -> one 3-input ``Sum`` (not for ORT CUDA or TVM).

Math: ``Sum`` is n-ary ``Add`` with the same multidirectional broadcasting (the broadcast of
three shapes does not depend on the order they meet), so

    (y + c) + r  ==  Sum(y, c, r)        (c a constant; y + c used only there)

element for element, up to the order a runtime adds the three terms (one rounding more
or less). The outer op may be ``Add`` or a two-input ``Sum`` (what residual_sum.py writes
before a LayerNormalization); the operands may come in either order.

Why: a projection's bias and the residual are added in one pass over the activations
instead of two, and ORT's CPU SkipLayerNormFusion (a slower kernel, see residual_sum.py)
does not take the pair. Not for ``ort-cuda`` (its SkipLayerNormalization, bias input
included, is the fast kernel) nor TVM (its ``Sum`` is a kernel of its own).

Refused: an inner Add without a constant operand, an outer operand that is a constant,
operand types that differ or are unknown.
"""

from __future__ import annotations

__all__ = ["BIAS_RESIDUAL_SUM"]

from onnxscript.rewriter import pattern

from gcomp.passes.fusion._engine import FusionRun, RunRule, fusion
from gcomp.passes.fusion.residual_sum import TVM_SUM_SLOWER


class BiasResidualSum(RunRule):
    """``(y + c) + r`` (outer op ``Add`` or ``Sum``) -> ``Sum(y, c, r)``.

    Measured: BERT-mini on 2 cores, ORT_ENABLE_ALL: 1.44 vs 1.50 ms min (bench/FUSION.md).
    """

    def __init__(self, name: str, run: FusionRun, *, outer: str, bias_first: bool, inner_first: bool):
        super().__init__(name, run)
        self.outer, self.bias_first, self.inner_first = outer, bias_first, inner_first

    def pattern(self, op, y, c, r):
        inner = op.Add(c, y) if self.bias_first else op.Add(y, c)
        args = (inner, r) if self.inner_first else (r, inner)
        return getattr(op, self.outer)(*args, _outputs=["out"])

    def check(self, context, y, c, r, out, **_):
        result = pattern.MatchResult()
        if self.run.const(c) is None:
            return result.fail("the inner Add has no constant operand", c)
        if self.run.const(r) is not None or self.run.const(y) is not None:
            return result.fail("the other operands are not both computed values", r)
        types = {v.dtype for v in (y, c, r)}
        if None in types or len(types) != 1:
            return result.fail("operand types differ or are unknown", r)
        return result

    def rewrite(self, op, y, c, r, **_):
        return op.Sum(y, c, r)


_NOT_FOR = [("ort-cuda", "ORT's CUDA SkipLayerNormalization (with its bias input) is the fast kernel there"),
            ("tvm-llvm", TVM_SUM_SLOWER), ("tvm-cuda", TVM_SUM_SLOWER)]


def _bias_residual_rules(run: FusionRun) -> list:
    return [BiasResidualSum.rule(f"bias-residual-sum-{outer.lower()}-{int(f)}{int(i)}", run, outer=outer,
                                 bias_first=f, inner_first=i)
            for outer in ("Add", "Sum") for f in (False, True) for i in (True, False)]


BIAS_RESIDUAL_SUM = fusion("bias-residual-sum", _bias_residual_rules, [("", "Sum", 8)],
                           "(y + constant) + r -> Sum(y, constant, r): bias and residual in one pass",
                           needs=("Add",), not_for=_NOT_FOR)
