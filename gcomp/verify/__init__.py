"""Numerical verification: the original and the transformed model, same inputs, same runtime.

The reference runtime is ONNX Runtime on the CPU with its own graph optimizations off,
so what is compared is gcomp's transformation, not ORT's. Every output is compared
with explicit tolerances by dtype (:data:`TOLERANCES`):

    |actual - expected| <= atol * scale + rtol * |expected|      element-wise,

where ``scale`` is the output's root-mean-square magnitude, at least 1. Reordered
floating-point sums err in proportion to the size of their terms, not of their result:
an element near zero in an output whose typical value is 27 (ResNet-18's logits) carries
the rounding of terms of that size (6e-5 there between two correct runtimes, 2e-6 of the
scale). For outputs of order one, the check is the plain ``atol + rtol * |expected|``.

NaN must sit where NaN sat, infinities must match exactly, integers, bools and strings
must be equal, and shapes and dtypes must match. A model that cannot run on the
inputs (no ORT kernel for an op, inputs gcomp cannot guess) is *unverified*, never
*passed*: the reason says why and what to do.

The package: :mod:`.reference` (running the original, checking candidates), :mod:`.compare`
(tolerances and the element-wise comparison), :mod:`.limits` (what is refused before it
runs), :mod:`.emulate` (the fp16/bf16 emulator) and :mod:`.precision` (checking
reduced-precision candidates; the ``convert-precision`` step with its calibration feeds).
"""

from __future__ import annotations

__all__ = [
    "Tolerance",
    "TOLERANCES",
    "OutputCheck",
    "Verification",
    "Reference",
    "CannotVerify",
    "verify",
    "compare_outputs",
    "EXACT",
    "DEFAULT_MAX_TENSOR_BYTES",
    "DEFAULT_RUN_TIMEOUT",
    "MAX_LOOP_TRIPS",
    "precision_options",
]

from gcomp.verify.compare import EXACT, TOLERANCES, OutputCheck, Tolerance, compare_outputs
from gcomp.verify.limits import DEFAULT_MAX_TENSOR_BYTES, MAX_LOOP_TRIPS
from gcomp.verify.precision import precision_options
from gcomp.verify.reference import DEFAULT_RUN_TIMEOUT, CannotVerify, Reference, Verification, verify
