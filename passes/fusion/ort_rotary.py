"""Rotary position embeddings on 4-D heads -> ``com.microsoft.RotaryEmbedding`` (ONNX Runtime).

Math, recognition and caches: :mod:`gcomp.passes.fusion._rotary`. For heads x [B, N, S, H]
(after the head transpose), positions p [B, S] (the int64 graph input cos/sin are computed
from) and H/2 constant frequencies w, with C = a cos(concat(f, f)), S = a sin(concat(f, f)),
f = p * w (or each frequency repeated twice for the GPT-J layout):

    x * C + rotate_half(x) * S  ==  RotaryEmbedding(x, p, cos_cache, sin_cache, interleaved=0)
    x * C + rotate_every_two(x) * S  ==  RotaryEmbedding(..., interleaved=1)

with the caches computed once per run with one row per token, cos_cache[b * S + s, j] =
a cos(p[b, s] w_j) (sin alike), read at index b * S + s in place of p, and shared by every
layer. The contrib op takes the 4-D [B, N, S, H] tensor as it is;
``ort-group-query-attention`` moves these nodes onto the 3-D projections when it fuses the
attention around them.

What the fused model accepts: every position the export does. position_ids must have x's
batch and sequence sizes (the export would broadcast a [1, S] row over the batch; the
contrib op refuses it).
"""

from __future__ import annotations

__all__ = ["ORT_ROTARY"]

import onnx_ir as ir

from gcomp.passes.fusion._engine import FusionRun, fusion
from gcomp.passes.fusion._rotary import RotaryRule

MS = "com.microsoft"


def _emit(run: FusionRun, x: ir.Value, position: ir.Value, cos: ir.Value, sin: ir.Value,
          interleaved: bool) -> ir.Node:
    node = ir.node("RotaryEmbedding", [x, position, cos, sin], domain=MS,
                   attributes={"interleaved": int(interleaved)}, name=run.fresh_name("rotary_embedding"))
    node.outputs[0].name = run.fresh_name("rotary")
    return node


def _build(run: FusionRun) -> list[RotaryRule]:
    return [RotaryRule(run, "ort-rotary", _emit)]


ORT_ROTARY = fusion(
    "ort-rotary", _build, [(MS, "RotaryEmbedding", 1), ("", "Range", 11)],
    "rotary position embeddings (rotate_half or GPT-J interleaved, cos/sin proven by value against the "
    "positions) -> com.microsoft RotaryEmbedding on the 4-D heads, cos/sin caches computed once per run",
    needs=("Concat",))
