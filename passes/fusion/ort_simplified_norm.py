"""RMSNorm -> ONNX Runtime's ``SimplifiedLayerNormalization``, and with its residual Add ->
``com.microsoft.SkipSimplifiedLayerNormalization`` (the ops of ORT's Llama/Qwen kernels).

Math: over the trailing axes A of x,

    y = x / sqrt(ReduceMean(x * x, A) + eps) * gamma
      = SimplifiedLayerNormalization(x, gamma, axis=min(A), epsilon=eps, stash_type=1)

ORT registers ``SimplifiedLayerNormalization`` in the default domain (since version 1, so at
any opset ORT loads); ONNX itself does not define it. The match and its checks are those
of ``rms_norm.py`` (``RmsNormFusion``: both exporters' forms, with or without gamma, the
same refusals); only the emitted op differs. From opset 23 this rule leaves the norm to
``rms-norm``, whose standard ``RMSNormalization`` ORT runs with the same kernel (measured
the same speed on the CPU: docs/measurements.md; its CUDA kernel is ORT's LayerNorm kernel
too), so an opset-23 model stays portable.

With s = x + skip (+ bias, a constant over the last axis),

    SkipSimplifiedLayerNormalization(x, skip, gamma[, bias]) = (RMSNorm(s; gamma, eps), -, -, s)

its 4th output (``input_skip_bias_sum``) is the sum, so the residual stream that reads s
after the norm keeps reading it from the fused node. The norm it matches is
``SimplifiedLayerNormalization`` (made by the rule above) or ``RMSNormalization``, over the
last axis with fp32 statistics (``stash_type=1``); everything else (rank-3 operands of the
same shape, a 1-D gamma and bias of the hidden size, fp32/fp16) is checked as in
``ort_skip_layer_norm.py``, whose rule this one specialises. A decoder's first norm (it
reads the embedding Gather) has no Add and stays ``SimplifiedLayerNormalization``.

The skip form is for ``ort-cuda`` only: on ORT's CPU provider its kernel is no faster than
Add + SimplifiedLayerNormalization at one decoded token and up to 2x slower over a prompt
(docs/measurements.md), and ORT does not fuse the pair itself on the CPU.
"""

from __future__ import annotations

__all__ = ["ORT_SIMPLIFIED_LAYER_NORM", "ORT_SIMPLIFIED_LAYER_NORM_NO_SCALE", "ORT_SKIP_SIMPLIFIED_LAYER_NORM"]

from onnxscript.rewriter import pattern

from gcomp.passes.fusion._engine import FusionRun, fusion
from gcomp.passes.fusion._norm import variant_rules
from gcomp.passes.fusion.ort_skip_layer_norm import SkipLayerNorm
from gcomp.passes.fusion.rms_norm import RmsNormFusion
from gcomp.passes.opsets import model_opset

# From this opset the standard RMSNormalization (rms-norm) is emitted instead: same kernel.
STANDARD_FROM = 23


def _centred(x) -> bool:
    """``x`` is ``y - ReduceMean(y)`` (either operand order of the mean's reader)."""
    sub = x.producer()
    if sub is None or sub.op_type != "Sub" or sub.domain not in ("", "ai.onnx") or len(sub.inputs) != 2:
        return False
    mean = sub.inputs[1].producer() if sub.inputs[1] is not None else None
    return mean is not None and mean.op_type == "ReduceMean" and mean.inputs[0] is sub.inputs[0]


class SimplifiedLayerNorm(RmsNormFusion):
    """``RmsNormFusion``'s match, emitting ORT's ``SimplifiedLayerNormalization``."""

    def check(self, context, x, eps, ms, gamma=None, **_):
        if model_opset(context.model) >= STANDARD_FROM:
            return pattern.MatchResult().fail(
                f"opset >= {STANDARD_FROM}: left to rms-norm (RMSNormalization, the same ORT kernel)", ms)
        if _centred(x):
            # O3 runs the target's fusions before the portable ones in each round: without
            # this, a decomposed LayerNorm's tail would become this op and LayerNormalization
            # (and SkipLayerNormalization after it) would never fire.
            return pattern.MatchResult().fail("x - mean(x): a LayerNorm's tail, left to the layer-norm fusions", x)
        return super().check(context, x, eps, ms, gamma)

    def emit(self, op, x, gamma, *, axis: int, eps: float):
        return op.SimplifiedLayerNormalization(x, gamma, axis=axis, epsilon=eps, stash_type=1)


def _plain_rules(scaled: bool):
    return lambda run: variant_rules(SimplifiedLayerNorm, f"ort-simplified-layer-norm-{int(scaled)}", run,
                                     scaled=scaled)


class SkipSimplifiedLayerNorm(SkipLayerNorm):
    """``SkipLayerNorm``'s checks on Add (+ bias) + an RMS norm op, emitting the contrib op."""

    def __init__(self, name: str, run: FusionRun, *, with_bias: bool, norm: str):
        super().__init__(name, run, with_bias=with_bias, with_beta=False)
        self.norm = norm

    def pattern(self, op, x, skip, bias, gamma):
        left = op.Add(x, bias) if self.with_bias else x
        s = op.Add(left, skip, _outputs=["s"])
        return getattr(op, self.norm)(s, gamma, _outputs=["y"]), s

    def check(self, context, x, skip, gamma, y, s, bias=None, **_):
        stash = y.producer().attributes.get("stash_type")
        if stash is not None and stash.as_int() != 1:
            return pattern.MatchResult().fail("statistics not in fp32 (stash_type != 1)", y.producer())
        return super().check(context, x, skip, gamma, y, s, bias=bias)

    def rewrite(self, op, x, skip, gamma, y, s, bias=None, **_):
        eps = y.producer().attributes.get("epsilon")
        eps = 1e-5 if eps is None else eps.as_float()  # both norms' default
        inputs = [x, skip, gamma] + ([bias] if bias is not None else [])
        out, _mean, _inv, total = op.SkipSimplifiedLayerNormalization(
            *inputs, epsilon=eps, _domain="com.microsoft", _outputs=4)
        return out, total


def _skip_rules(run: FusionRun) -> list:
    return [rule
            for norm in ("SimplifiedLayerNormalization", "RMSNormalization")
            for with_bias in (True, False)
            for rule in SkipSimplifiedLayerNorm.rule(f"skip-simplified-layer-norm-{norm}-{int(with_bias)}", run,
                                                     with_bias=with_bias, norm=norm).commute()]


_NEEDS = ("ReduceMean",)
# The scaled form first, as rms-norm: the bare one would take x / rms and leave gamma's Mul.
ORT_SIMPLIFIED_LAYER_NORM = fusion(
    "ort-simplified-layer-norm", _plain_rules(True), [("", "SimplifiedLayerNormalization", 1)],
    "x / sqrt(mean(x^2) + eps) * gamma -> SimplifiedLayerNormalization (ORT, below opset 23)", needs=_NEEDS)
ORT_SIMPLIFIED_LAYER_NORM_NO_SCALE = fusion(
    "ort-simplified-layer-norm-no-scale", _plain_rules(False), [("", "SimplifiedLayerNormalization", 1)],
    "x / sqrt(mean(x^2) + eps) -> SimplifiedLayerNormalization with a unit scale (ORT, below opset 23)",
    needs=_NEEDS)

# Measured (module docstring; docs/measurements.md): ORT's CPU kernel is not the fast one.
_CPU_NOT_FASTER = ("ORT's CPU SkipSimplifiedLayerNormalization kernel is no faster than Add + "
                   "SimplifiedLayerNormalization at one token ([1,1,768]: 5.5 vs 5.5 us) and slower over a "
                   "prompt ([1,64,768]: 25.0 vs 19.3 us, 37.3 vs 18.5 us on one thread; onnxruntime 1.31)")
ORT_SKIP_SIMPLIFIED_LAYER_NORM = fusion(
    "ort-skip-simplified-layer-norm", _skip_rules, [("com.microsoft", "SkipSimplifiedLayerNormalization", 1)],
    "Add(+bias) + SimplifiedLayerNormalization / RMSNormalization -> com.microsoft "
    "SkipSimplifiedLayerNormalization (sum kept as its 4th output)",
    needs=("SimplifiedLayerNormalization", "RMSNormalization"), not_for=[("ort-cpu", _CPU_NOT_FASTER)])
