"""Operator fusion: onnxscript rewriter rules, one file per fusion, each opening with its math.

Passes registered here:

- ``fuse``: the portable fusions (standard ONNX ops: Conv/Gemm folding, LayerNormalization,
  Gelu, RMSNormalization, Attention), each fired only when the model's opset has the op
  and the ``--target`` accepts it (pipeline O2).
- ``fold-into-weights``: the folds among those that only change a Conv/ConvTranspose/
  Gemm's weights and attributes (a zero Pad, BatchNormalization, a per-channel constant
  Mul/Div/Sub/Add after it): what constant folding would do if it could see through the
  linear op, run by every pipeline from O1 on (:data:`WEIGHT_FOLDS`).
- ``fuse-target``: the target-specific fusions (``com.microsoft`` ops for ONNX Runtime;
  pipeline O3).
- ``upgrade-opset``: converts the model to ``--target-opset`` first, when asked, so a
  newer fused op may be emitted.

Both fusion passes walk the main graph, every If/Loop/Scan body and every model function
(rules that need new initializers do not fire inside functions). ``--explain-fusion``
records, per rule, how often it fired, why it could not run (opset, target) and the
near misses that its ``check`` rejected.

Each fusion file (``_``-prefixed modules are shared helpers) declares its fusions; the
lists below are the order they run in, one list per family, with the reason for each place:
``fuse`` runs :data:`PORTABLE`, ``fuse-target`` the list of the target's backend
(:data:`ORT`, :data:`TVM`). Within a pass, fusions run one after another over the whole
model, round after round until nothing fires, so an order matters where one fusion makes
what a later one matches, or where two match overlapping subgraphs. File names say the
family: plain names are portable, ``ort_*`` ONNX Runtime's, ``tvm_*`` TVM's.
"""

from __future__ import annotations

__all__ = ["FAMILIES", "ORT", "PORTABLE", "TVM", "WEIGHT_FOLDS", "FoldIntoWeights", "Fuse", "FuseTarget", "UpgradeOpset",
           "fuse_model"]

from collections.abc import Sequence
from typing import Annotated, Any

import onnx_ir as ir

from gcomp.errors import OptionError
from gcomp.passes.fusion import (attention, bias, bias_residual_sum, conv_bn, gelu, layer_norm, matmul_add_gemm,
                                 ort_embed_layer_norm, ort_fused_conv, ort_fused_matmul, ort_gelu,
                                 ort_group_query_attention, ort_mha,
                                 ort_packed_attention, ort_pad_fused_conv, ort_rotary, ort_simplified_norm,
                                 ort_skip_layer_norm, ort_split_attention,
                                 pad_conv, residual_sum, rms_norm, rotary, scale, transpose_gemm, tvm_parallel_matmul,
                                 unflatten_gemm)
from gcomp.passes.fusion import _attention
from gcomp.passes.fusion._engine import BuiltRules, Fusion, run_fusions
from gcomp.passes.opsets import model_opset
from gcomp.passes.result import DetailedResult
from gcomp.registry import Capabilities, PassContext, Runtime, register_pass

# Standard ONNX ops (pass ``fuse``, pipeline O2).
PORTABLE: tuple[Fusion, ...] = (
    # A Pad into its Conv's pads: only the attribute changes, which the folds below copy.
    pad_conv.PAD_CONV,
    # BatchNormalization into the raw Conv/ConvTranspose/Gemm output: the op it leaves is
    # what bias and scale fold the constants after it into, in the same round.
    conv_bn.CONV_BN,
    # Flatten + Gemm + unflatten of an N-D linear layer -> MatMul + Add on the N-D tensor,
    # the form attention, the ORT bias fusions and bias-residual-sum read; matmul-add-gemm
    # leaves it (not rank 2).
    unflatten_gemm.UNFLATTEN_GEMM,
    # A constant Add into the linear op's bias, before scale: Conv + Add + Mul then folds in
    # one round (scale matches the Mul only once the Add is gone).
    bias.BIAS,
    # MatMul + bias -> Gemm, before scale and transpose-gemm, which fold into that Gemm.
    matmul_add_gemm.MATMUL_ADD_GEMM,
    scale.SCALE,
    # After the fusions that make Gemms: their transposed operands go into transA/transB.
    transpose_gemm.TRANSPOSE_GEMM,
    # Widest LayerNorm form first over the whole graph: the bare form would match the Div
    # (visited before the Mul/Add that hold gamma and beta) and leave them unfused.
    layer_norm.LAYER_NORM,
    layer_norm.LAYER_NORM_SCALE_SHIFT,
    layer_norm.LAYER_NORM_NO_BIAS,
    layer_norm.LAYER_NORM_NO_AFFINE,
    # After LayerNorm: its tail d / sqrt(mean(d^2) + eps) (d = x - mean) is an RMS norm of d,
    # which these would take, leaving the mean's Sub. The scaled form first (as LayerNorm).
    rms_norm.RMS_NORM,
    rms_norm.RMS_NORM_NO_SCALE,
    # No op in common with the norms; GELU reads its input twice, so the folds above never
    # take its constant Muls.
    gelu.GELU_ERF,
    gelu.GELU_TANH,
    # Rotary embeddings (opset 23): 4-D elementwise ops the folds above never take (no
    # constant operand); before attention, whose Q and K they make.
    rotary.ROTARY,
    # The score MatMuls are 4-D and the scale Mul follows a MatMul, so the Gemm folds above
    # leave the block whole.
    _attention.SCORES_SCALE,  # sdpa's split scale in the form attention reads
    attention.ATTENTION,
    # After the LayerNorm fusions, which make the LayerNormalization it matches.
    residual_sum.RESIDUAL_SUM,
    # After residual-sum: its two-input Sum is one of the outer ops this matches.
    bias_residual_sum.BIAS_RESIDUAL_SUM,
)

# The portable fusions that leave no new op: each folds into the weights, bias or pads of the
# Conv/ConvTranspose/Gemm already there, so the result runs wherever the model did (pass
# ``fold-into-weights``, in every pipeline's cleanup from O1 on; PORTABLE's order).
WEIGHT_FOLDS: tuple[Fusion, ...] = (pad_conv.PAD_CONV, conv_bn.CONV_BN, bias.BIAS, scale.SCALE)

# ONNX Runtime's com.microsoft ops (pass ``fuse-target`` for ort-cpu / ort-cuda, pipeline O3,
# which runs it before ``fuse`` in each round of its stage).
ORT: tuple[Fusion, ...] = (
    # Matches FusedConv only, which ort-fused-conv below makes: it takes those in the next round.
    ort_pad_fused_conv.ORT_PAD_FUSED_CONV,
    ort_gelu.ORT_GELU,
    # After ort-gelu, whose contrib Gelu / FastGelu it matches (same round).
    ort_gelu.ORT_BIAS_GELU,
    # Before ort-embed-layer-norm: frees the lookups from the Shape reads that keep them alive.
    ort_embed_layer_norm.ORT_EMBED_SHAPE,
    # Before ort-skip-layer-norm, which would otherwise take the last Add of the embeddings' sum.
    ort_embed_layer_norm.ORT_EMBED_LAYER_NORM,
    # No op in common with its neighbours.
    ort_fused_conv.ORT_FUSED_CONV,
    # Before the attention fusions: it refuses the score MatMuls (they reach a Softmax), so
    # the blocks those match stay whole.
    ort_fused_matmul.ORT_FUSED_MATMUL,
    ort_skip_layer_norm.ORT_SKIP_LAYER_NORM,
    # Decoder RMS norms below opset 23 (from 23 they leave them to the portable rms-norm, same
    # kernel): the scaled form before the bare one (as rms-norm), then Add + the norm they make
    # (same round) -> the skip form, which the first norm, reading the embedding, never is.
    ort_simplified_norm.ORT_SIMPLIFIED_LAYER_NORM,
    ort_simplified_norm.ORT_SIMPLIFIED_LAYER_NORM_NO_SCALE,
    ort_simplified_norm.ORT_SKIP_SIMPLIFIED_LAYER_NORM,
    # Rotary embeddings: 4-D elementwise Mul/Slice/Concat no fusion above reads; before
    # ort-group-query-attention (same round), which moves the RotaryEmbedding it makes onto
    # the Q/K projections.
    ort_rotary.ORT_ROTARY,
    # Decoder attention (a KV cache, grouped KV heads or rotary embeddings) before the other
    # attention fusions, which would take its core as MultiHeadAttention and leave the cache.
    ort_group_query_attention.ORT_GROUP_QUERY_ATTENTION,
    # sdpa's split scale (Q*a) @ (K^T*b) made (Q @ K^T)*ab, the form the fusions below read.
    _attention.ORT_SCORES_SCALE,
    # The widest attention block (with its three Q/K/V projections) first: ort-mha would take
    # the block alone and leave the projections.
    ort_packed_attention.ORT_ATTENTION,
    # Before ort-attention-split: V's sizes read from K's piece keep K's projection alive.
    ort_split_attention.ORT_ATTENTION_SPLIT_SHAPE,
    # Before ort-mha-heads, which would take the same block without its projection.
    ort_split_attention.ORT_ATTENTION_SPLIT,
    ort_mha.ORT_MHA,
    # Last: the block up to the head transpose, for merges read elsewhere (GPT-2); after the
    # whole-block form, which it would otherwise cut short.
    ort_mha.ORT_MHA_HEADS,
)

# TVM (pass ``fuse-target`` for tvm-llvm / tvm-cuda, pipeline O3).
TVM: tuple[Fusion, ...] = (
    tvm_parallel_matmul.TVM_PARALLEL_MATMUL,
)

# family (a target's backend, or "portable") -> its fusions, in order.
FAMILIES: dict[str, tuple[Fusion, ...]] = {"portable": PORTABLE, "ort": ORT, "tvm": TVM}


def fuse_model(model: ir.Model, fusions: Sequence[Fusion], target: Capabilities, *,
               explain: bool = False, built: BuiltRules | None = None,
               rotary_in_attention: bool = False, runtime: Runtime | None = None) -> DetailedResult:
    """Apply ``fusions`` in order for ``target``: what both fusion passes do with their list.

    ``details``: the target, the fusions that fired (name -> count) and, with ``explain``,
    per fusion: fired, why it did not run (``not_run``), near misses, summary.
    """
    report = run_fusions(model, fusions, target, explain=explain, built=built,
                         rotary_in_attention=rotary_in_attention, runtime=runtime)
    fired = {k: v for k, v in report.fired.items() if v}
    details: dict[str, Any] = {"target": target.name, "fired": fired}
    if explain:
        details["rules"] = {
            f.name: {
                "fired": report.fired.get(f.name, 0),
                **({"not_run": report.skipped[f.name]} if f.name in report.skipped else {}),
                **({"near_misses": report.near_misses[f.name]} if f.name in report.near_misses else {}),
                "summary": f.summary,
            }
            for f in fusions
        }
    return DetailedResult(model, modified=bool(fired), details=details)


# The target names are defined once, by gcomp.backends (which a pass does not import).
_TARGET_HELP = "what the output must run on (a gcomp target: see `gcomp optimize --help`)"
_ROTARY_HELP = ("ort: rotate Q/K inside GroupQueryAttention (do_rotary=1) for any batch size; exact for batch 1 and "
                "every step with a cache, not for a first prompt of a batch whose rows' position_ids differ "
                "(left padding), where ONNX Runtime reads only the first row's (default: only where the batch is 1)")


class _FuseBase(ir.passes.InPlacePass):
    """The two fusion passes differ only in which list of fusions they run; the registry
    reads both passes' options from this one signature. What the target accepts comes from
    ``context`` (the pipeline gives it; direct callers pass ``gcomp.runtime.pass_context()``)."""

    def __init__(
        self,
        *,
        target: Annotated[str, _TARGET_HELP] = "portable",
        explain_fusion: Annotated[bool, "record near misses of every rule in the report"] = False,
        rotary_in_attention: Annotated[bool, _ROTARY_HELP] = False,
        context: PassContext | None = None,
    ) -> None:
        super().__init__()
        self.target = target
        self.explain_fusion = explain_fusion
        self.rotary_in_attention = rotary_in_attention
        # An unknown target fails here when the context is given (OptionError), else in call().
        self.capabilities = context.target(target) if context is not None else None
        self.runtime = context.runtime if context is not None else None  # rules that probe a subgraph run it here
        self._built = BuiltRules()  # the rules of this pass's runs (the pipeline re-runs it to a fixed point)

    def fusions(self, target: Capabilities) -> tuple[Fusion, ...]:
        raise NotImplementedError

    def call(self, model: ir.Model) -> DetailedResult:
        target = self.capabilities or PassContext().target(self.target)  # the latter raises: no context
        return fuse_model(model, self.fusions(target), target, explain=self.explain_fusion, built=self._built,
                          rotary_in_attention=self.rotary_in_attention, runtime=self.runtime)


@register_pass("fuse")
class Fuse(_FuseBase):
    """Fuse subgraphs into standard ONNX ops the target accepts (Gemm, LayerNormalization, Gelu, ...)."""

    def fusions(self, target: Capabilities) -> tuple[Fusion, ...]:
        return PORTABLE


@register_pass("fold-into-weights")
class FoldIntoWeights(ir.passes.InPlacePass):
    """Fold zero Pads, BatchNormalization and per-channel constant Mul/Div/Sub/Add into the adjacent
    Conv/ConvTranspose/Gemm's weights, bias and pads (no new op: it runs wherever the model did,
    so it takes no target)."""

    def __init__(
        self,
        *,
        explain_fusion: Annotated[bool, "record near misses of every rule in the report"] = False,
        context: PassContext | None = None,
    ) -> None:
        super().__init__()
        self.explain_fusion = explain_fusion
        self.capabilities = context.target("portable") if context is not None else None
        self._built = BuiltRules()

    def call(self, model: ir.Model) -> DetailedResult:
        target = self.capabilities or PassContext().target("portable")  # the latter raises: no context
        return fuse_model(model, WEIGHT_FOLDS, target, explain=self.explain_fusion, built=self._built)


@register_pass("fuse-target")
class FuseTarget(_FuseBase):
    """Fuse into the target's own fastest ops (ONNX Runtime: com.microsoft contrib ops); no-op for portable."""

    def fusions(self, target: Capabilities) -> tuple[Fusion, ...]:
        return () if target.backend is None else FAMILIES.get(target.backend, ())


@register_pass("upgrade-opset")
class UpgradeOpset(ir.passes.InPlacePass):
    """Convert the model to a newer default-domain opset (0: leave it), so newer fused ops may be emitted."""

    def __init__(self, *, target_opset: Annotated[int, "opset to upgrade to first (0: keep the model's)"] = 0) -> None:
        super().__init__()
        self.target_opset = target_opset

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        current = model_opset(model)
        if not self.target_opset or self.target_opset == current:
            return ir.passes.PassResult(model, modified=False)
        if self.target_opset < current:
            raise OptionError(
                f"--target-opset {self.target_opset} is older than the model's opset {current}; gcomp only upgrades"
            )
        from onnxscript import version_converter

        try:
            version_converter.convert_version(model, self.target_opset, fallback=True)
        except Exception as e:  # the converter names the op it cannot adapt
            raise OptionError(f"cannot upgrade to opset {self.target_opset}: {e}") from None
        if model_opset(model) != self.target_opset:
            raise OptionError(f"cannot upgrade to opset {self.target_opset}: the converter left opset "
                              f"{model_opset(model)}")
        return ir.passes.PassResult(model, modified=True)
