"""Residual Add + LayerNormalization -> ``com.microsoft.SkipLayerNormalization`` (ORT).

Math: with s = x + skip (+ bias, a constant over the last axis),

    SkipLayerNormalization(x, skip, gamma, beta, bias) = (LayerNorm(s; gamma, beta, eps), s)

the second output (``input_skip_bias_sum``) is the sum itself, so a residual stream that
reads s after the norm keeps reading it, from the fused node. The contrib op normalises
the last axis only, keeps its statistics in fp32 and takes inputs of rank 3 with equal
shapes. Refused: another axis, a LayerNormalization whose Mean/InvStdDev outputs are
read, operands that are not both rank 3 with the same static hidden size, operands whose
known dims differ or whose sequence dim is a static 1 on one side only (broadcast), a bias that is not a 1-D constant of the hidden size.

For ``ort-cuda`` only: on ORT's CPU provider the fused kernel is much slower than the Add
and LayerNormalization it replaces (measured 3-20x on BERT/ViT shapes, best of 60 runs of
20, in two sessions: [2,128,256] 920 vs 46 us and 201.5 vs 50.5 us; docs/measurements.md),
so ``ort-cpu`` keeps them.

When the batch/sequence dims cannot be proven equal (symbols lost through reshapes), the
fusion still fires: ORT's kernel accepts a skip of the input's shape or ``[1, S, H]``, which
it computes exactly, and fails with an error for any other pair, so the result is the
original's or an error at run time, never a different number.
"""

from __future__ import annotations

__all__ = ["ORT_SKIP_LAYER_NORM"]

import numpy as np
from onnxscript.rewriter import pattern

from gcomp.passes.fusion._engine import FusionRun, RunRule, fusion


def _compatible(a, b) -> bool:
    """Same rank, same static hidden size, no pair of known dims that differ, and no sequence
    dim that is a static 1 on one side only (it broadcasts in the Add; the kernel needs the
    last two dims equal and would fail)."""
    if not isinstance(a.shape[-1], int) or a.shape[-1] != b.shape[-1]:
        return False
    for x, y in zip(a.shape.dims, b.shape.dims):
        if isinstance(x, int) and isinstance(y, int) and x != y:
            return False
    x, y = a.shape[-2], b.shape[-2]
    return not ((x == 1) != (y == 1))


class SkipLayerNorm(RunRule):
    def __init__(self, name: str, run: FusionRun, *, with_bias: bool, with_beta: bool):
        super().__init__(name, run)
        self.with_bias, self.with_beta = with_bias, with_beta

    def pattern(self, op, x, skip, bias, gamma, beta):
        left = op.Add(x, bias) if self.with_bias else x
        s = op.Add(left, skip, _outputs=["s"])
        if self.with_beta:
            y = op.LayerNormalization(s, gamma, beta, _outputs=["y"])
        else:
            y = op.LayerNormalization(s, gamma, _outputs=["y"])
        return y, s

    def check(self, context, x, skip, gamma, y, s, bias=None, beta=None, **_):
        result = pattern.MatchResult()
        ln = y.producer()
        if any(out.uses() for out in ln.outputs[1:]):
            return result.fail("LayerNormalization's mean / inv-std outputs are used", ln)
        if x.shape is None or x.shape.rank() != 3:
            return result.fail("input is not rank 3", x)
        axis = ln.attributes.get("axis")
        axis = -1 if axis is None else axis.as_int()
        if axis % 3 != 2:
            return result.fail("normalises an axis other than the last", ln)
        if skip.shape is None or skip.shape.rank() != 3:
            return result.fail("skip is not rank 3", skip)
        if not _compatible(x, skip):
            return result.fail("the two Add operands have different dims", skip)
        hidden = x.shape[2]
        if not isinstance(hidden, int):
            return result.fail("hidden size is symbolic", x)
        for name, v in (("gamma", gamma), ("beta", beta)):
            if v is not None and (v.shape is None or list(v.shape.dims) != [hidden]):
                return result.fail(f"{name} is not 1-D of the hidden size", v)
        if bias is not None:
            b = self.run.const(bias)
            if b is None or b.shape != (hidden,) or x.dtype is None or b.dtype != x.dtype.numpy():
                return result.fail("bias is not a 1-D constant of the hidden size and input dtype", bias)
        if x.dtype is None or x.dtype.numpy() not in (np.float32, np.float16):
            return result.fail("input dtype is not float32/float16", x)
        return result

    def rewrite(self, op, x, skip, gamma, y, s, bias=None, beta=None, **_):
        eps = y.producer().attributes.get("epsilon")
        eps = 1e-5 if eps is None else eps.as_float()
        inputs = [x, skip, gamma, beta if beta is not None else None]
        if bias is not None:
            inputs.append(bias)
        while inputs and inputs[-1] is None:
            inputs.pop()
        out, _mean, _inv, total = op.SkipLayerNormalization(
            *inputs, epsilon=eps, _domain="com.microsoft", _outputs=4
        )
        return out, total


def _rules(run: FusionRun) -> list:
    rules = []
    for with_bias in (True, False):
        for with_beta in (True, False):
            rules.extend(SkipLayerNorm.rule(f"skip-layer-norm-{int(with_bias)}{int(with_beta)}", run,
                                            with_bias=with_bias, with_beta=with_beta).commute())
    return rules


# Measured (module docstring; docs/measurements.md): ORT's CPU kernel is the slow one.
_CPU_SLOWER = ("ORT's CPU SkipLayerNormalization kernel measured 3-20x slower than Add + "
               "LayerNormalization ([2,128,256]: 920 vs 46 us; [2,197,192]: 534 vs 58 us, onnxruntime 1.31)")
ORT_SKIP_LAYER_NORM = fusion(
    "ort-skip-layer-norm", _rules, [("com.microsoft", "SkipLayerNormalization", 1)],
    "Add(+bias) + LayerNormalization -> com.microsoft SkipLayerNormalization (sum kept as its 4th output)",
    needs=("LayerNormalization",), not_for=[("ort-cpu", _CPU_SLOWER)])
