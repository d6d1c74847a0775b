"""A constant bias Add after Conv / ConvTranspose / Gemm -> their bias input.

Math. With ``b`` constant per output channel (see _affine.py for what that means):

    Conv(x, W, B) + b            ==  Conv(x, W, B + b)        (b: [M], [M,1,1], [1,M,1,1], scalar, ...)
    Gemm(A, B, C; beta) + b      ==  Gemm(A, B, beta*C + b; beta=1)   (b: [N], [1,N], scalar)

Exact (the same additions, the bias constants summed once in float64 and rounded).
``b + y`` is matched as well as ``y + b``. (MatMul + bias -> Gemm is matmul_add_gemm.py.)

Refused: a ``b`` that broadcasts over the batch or spatial axes (``[1,1,H,W]``,
``[M,N]``: folding it would change the output), a rank above the output's (it would
grow it), an operand that is not a constant, and any match whose intermediate value is
used elsewhere.
"""

from __future__ import annotations

__all__ = ["BIAS"]

from gcomp.passes.fusion._affine import fold_rules
from gcomp.passes.fusion._engine import fusion

BIAS = fusion("bias", lambda run: fold_rules(run, "bias", ("add", "add-r")),
              [("", "Conv", 1), ("", "ConvTranspose", 1), ("", "Gemm", 1)],
              "Conv/ConvTranspose/Gemm + per-channel constant -> the bias input (beta respected)")
