"""Rotary position embeddings on 4-D heads -> ``RotaryEmbedding`` (ONNX opset 23).

The same rewrite as ``ort-rotary`` (math, recognition and caches:
:mod:`gcomp.passes.fusion._rotary`), emitting the standard op: ``RotaryEmbedding(x,
cos_cache, sin_cache, position_ids, interleaved)`` on x [B, N, S, H] (ONNX reads a 4-D input
as [batch, heads, sequence, head size], as the contrib op does). Never emitted below opset
23 (``--target-opset 23`` upgrades first) nor for a target that cannot run it: TVM 0.27's
ONNX frontend has no converter for it, so ``portable`` (every backend) leaves the rotation
unfused and ``--explain-fusion`` says so; ONNX Runtime runs it (``--target ort-cpu|ort-cuda
--target-opset 23``). What the fused model accepts is what ``ort-rotary``'s does.
"""

from __future__ import annotations

__all__ = ["ROTARY"]

import onnx_ir as ir

from gcomp.passes.fusion._engine import FusionRun, fusion
from gcomp.passes.fusion._rotary import RotaryRule


def _emit(run: FusionRun, x: ir.Value, position: ir.Value, cos: ir.Value, sin: ir.Value,
          interleaved: bool) -> ir.Node:
    node = ir.node("RotaryEmbedding", [x, cos, sin, position], attributes={"interleaved": int(interleaved)},
                   name=run.fresh_name("rotary_embedding"))
    node.outputs[0].name = run.fresh_name("rotary")
    return node


def _build(run: FusionRun) -> list[RotaryRule]:
    return [RotaryRule(run, "rotary", _emit)]


ROTARY = fusion(
    "rotary", _build, [("", "RotaryEmbedding", 23), ("", "Range", 11)],
    "rotary position embeddings (rotate_half or GPT-J interleaved, cos/sin proven by value against the "
    "positions) -> RotaryEmbedding (23) on the 4-D heads, cos/sin caches computed once per run",
    needs=("Concat",))
