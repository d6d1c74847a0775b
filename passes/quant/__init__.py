"""Quantization passes: each module opens with its math (how a value is quantized and
dequantized, exactly).

Passes registered here:

- ``quantize-dynamic`` (:mod:`.dynamic`): int8 MatMul/Gemm weights stored offline (per
  output column or per tensor), activations quantized at run time;
  ``com.microsoft.DynamicQuantizeMatMul`` for ONNX Runtime, standard
  ``DynamicQuantizeLinear``/``MatMulInteger`` otherwise.
- ``quantize-weights`` (:mod:`.weights`): weight-only block-wise int4/int8 of MatMul/Gemm
  weights and embedding tables; ``com.microsoft.MatMulNBits``/``GatherBlockQuantized`` for
  ONNX Runtime, block-wise ``DequantizeLinear`` (opset 21) for portable.
- ``quantize-static`` (:mod:`.static`): int8 weights and int8 activations whose ranges are
  calibrated on ``--calibration`` samples (minmax, percentile or entropy:
  :mod:`._calibration`), as QuantizeLinear/DequantizeLinear pairs around the float ops
  (QDQ), the form ONNX Runtime fuses into QLinearConv/QLinearMatMul/QGemm/QLinearAdd.

Each module has ``candidates(model, ...)``: the nodes its pass would quantize, by ONNX node
name, without changing the model, so the core can measure each node's sensitivity by
re-running the pass with ``exclude_nodes``. All three passes work on the main graph only,
leave an already-quantized model unchanged, and report ``quantized``, ``skipped``,
``weight_bytes_before`` and ``weight_bytes_after`` (:mod:`._common`). Accuracy budgets,
calibration data and the speed gate are the core's (:mod:`gcomp.quantize`).
"""

from __future__ import annotations

from gcomp.passes.quant import dynamic, static, weights

__all__ = ["dynamic", "static", "weights"]
