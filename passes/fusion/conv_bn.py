"""BatchNormalization (inference form) after Conv / ConvTranspose / Gemm -> folded into its weights.

Math. Inference BatchNormalization over the channel axis (1) is a per-channel affine map

    bn(y)[c] = gamma[c] * (y[c] - mean[c]) / sqrt(var[c] + eps) + beta[c]
             = y[c] * s[c] + t[c],   s = gamma / sqrt(var + eps),   t = beta - mean * s

and Conv / ConvTranspose / Gemm are linear per output channel (their output channel is
BatchNormalization's axis 1; for Gemm's [M, N] output that is N), so (see _affine.py)

    bn(Conv(x, W, B))  ==  Conv(x, W * s[:, None, ...], B * s + t)

ConvTranspose scales W along its axis 1 within each group; Gemm scales the output
columns of B' (axis 0 of B when transB=1, else axis 1) and takes ``C' = beta*C*s + t``.
Exact up to rounding: s and t are computed in float64, the new weights rounded once.

Fires only for the inference form (one output, training_mode 0, no legacy
``spatial=0``) with constant gamma/beta/mean/var and constant weights (and bias, when
present); new weights are fresh initializers, so weights shared with other nodes keep
their values.
"""

from __future__ import annotations

__all__ = ["CONV_BN"]

import numpy as np
from onnxscript.rewriter import pattern

from gcomp.passes.fusion._affine import LINEAR_OPS, check_fold, fold, linear_of
from gcomp.passes.fusion._engine import FusionRun, RunRule, fusion


def _bn_affine(run: FusionRun, bn) -> tuple[np.ndarray | None, np.ndarray | None, np.dtype | None, str]:
    """(s, t, parameter dtype) of an inference BatchNormalization node (float64), or why not."""
    if len(bn.outputs) != 1:
        return None, None, None, "BatchNormalization has running-statistics outputs (training form)"
    mode = bn.attributes.get("training_mode")
    if mode is not None and mode.as_int() != 0:
        return None, None, None, "BatchNormalization in training mode"
    spatial = bn.attributes.get("spatial")
    if spatial is not None and spatial.as_int() == 0:
        return None, None, None, "legacy spatial=0 BatchNormalization (per-element statistics)"
    params = [run.const(v) for v in bn.inputs[1:5]]
    if len(params) != 4 or any(p is None for p in params):
        return None, None, None, "BatchNormalization parameters are not constants"
    if any(p.ndim != 1 or p.shape != params[0].shape for p in params):
        return None, None, None, "BatchNormalization parameters are not 1-D of one length"
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    eps_attr = bn.attributes.get("epsilon")
    eps = 1e-5 if eps_attr is None else eps_attr.as_float()
    s = gamma / np.sqrt(var + eps)
    return s, beta - mean * s, params[0].dtype, ""


class _FoldBatchNorm(RunRule):
    def __init__(self, name: str, run: FusionRun, *, op_type: str):
        super().__init__(name, run)
        self.op_type = op_type

    def pattern(self, op, x, gamma, beta, mean, var):
        y = getattr(op, self.op_type)(x, _allow_other_inputs=True, _outputs=["lin_out"])
        return op.BatchNormalization(y, gamma, beta, mean, var, _outputs=["bn_out"])

    def _plan(self, lin_out, bn_out):
        lin, why = linear_of(self.run, lin_out.producer())
        if lin is None:
            return None, why
        s, t, dtype, why = _bn_affine(self.run, bn_out.producer())
        if s is None:
            return None, why
        if dtype != lin.dtype:
            return None, f"BatchNormalization parameters are {dtype}, the weights {lin.dtype}"
        if lin.channels is not None and s.size != lin.channels:
            return None, f"BatchNormalization has {s.size} channels, the {lin.node.op_type} {lin.channels}"
        why = check_fold(lin, s, t)
        return ((lin, s, t) if not why else None), why

    def check(self, context, lin_out, bn_out, **_):
        plan, why = self._plan(lin_out, bn_out)
        return pattern.MatchResult() if plan else pattern.MatchResult().fail(why, bn_out)

    def rewrite(self, op, x, lin_out, bn_out, **_):
        lin, s, t = self._plan(lin_out, bn_out)[0]
        return fold(op, self.run, lin, x, s, t)


def _rules(run: FusionRun) -> list:
    return [_FoldBatchNorm.rule(f"{t.lower()}-bn", run, op_type=t) for t in LINEAR_OPS]


CONV_BN = fusion("conv-bn", _rules, [("", "Conv", 1), ("", "ConvTranspose", 1), ("", "Gemm", 1)],
                 "BatchNormalization(Conv/ConvTranspose/Gemm) -> the same op with BN folded into weights and bias")
