"""The named pipelines. Each level extends the one below it.

- ``O0``: validate only (load, check, save): proves gcomp round-trips the model.
- ``O1``: O0, then to a fixed point: shape inference (again each round: a folded
  Reshape target lets ONNX carry symbolic dims further), constant and shape folding,
  simplification (no-ops, merges, exact identities, constant Ifs), the folds into a
  Conv/ConvTranspose/Gemm's weights (zero Pad, BatchNormalization, per-channel constant
  Mul/Div/Sub/Add: no new op, so the model runs wherever it did), identity
  elimination, CSE, initializer dedup, unused nodes/functions/opsets; then a
  topological sort.
- ``O2``: O1 with an opset upgrade first (only with ``target_opset``), then to a fixed
  point: the portable fusions (standard ONNX ops that every backend, or the given
  ``target``, runs) and the cleanup they enable.
- ``O3``: O2 plus the target's own fused ops (``fuse-target``; e.g. ``com.microsoft``
  ops for ``ort-cpu``/``ort-cuda``). ``gcomp.optimize`` picks ``ort-cpu`` when O3 is
  asked for without a target.
"""

from __future__ import annotations

__all__ = ["CLEANUP", "FINISH", "FUSE", "O0", "O1", "O2", "O3", "TARGET_FUSE"]

from gcomp.registry import Stage, register_pipeline

CLEANUP = Stage(
    (
        "infer-shapes",
        "fold-constants",
        "simplify",
        "fold-into-weights",
        "eliminate-identity",
        "cse",
        "dedup-initializers",
        "remove-unused-nodes",
        "remove-unused-functions",
        "remove-unused-opsets",
    ),
    repeat=4,
)

O0 = register_pipeline("O0", "validate only: load, check, save", Stage(("validate",)))
O1 = register_pipeline(
    "O1",
    "O0 + shape inference + to a fixed point: constant/shape folding, simplify, folds into Conv/Gemm weights, identity, "
    "CSE, dedup, unused removal + sort",
    *O0.stages,
    CLEANUP,
    Stage(("forget-inferred-shapes", "topological-sort")),
)

_AFTER_FUSION = ("fold-constants", "simplify", "eliminate-identity", "cse", "remove-unused-nodes",
                 "remove-unused-opsets")
# Shapes are forgotten and inferred afresh each round: a fused op's output carries exact
# dims, and a stale, less precise symbol from an earlier round would hide equalities.
FUSE = Stage(("forget-inferred-shapes", "infer-shapes", "fuse", *_AFTER_FUSION), repeat=3)
# O3's fusion: the target's own ops, then the portable ones (also run after a lower level's
# pipeline by --quantize int8-dynamic on ort-* targets: gcomp/quantize_plan.py)
TARGET_FUSE = Stage(("forget-inferred-shapes", "infer-shapes", "fuse-target", "fuse", *_AFTER_FUSION), repeat=3)
FINISH = _FINISH = Stage(("forget-inferred-shapes", "topological-sort"))
O2 = register_pipeline(
    "O2",
    "O1 + portable fusions (Conv/Gemm folding, LayerNormalization, Gelu, RMSNormalization, Attention) the target accepts",
    *O0.stages,
    Stage(("upgrade-opset",)),
    CLEANUP,
    FUSE,
    _FINISH,
)
O3 = register_pipeline(
    "O3",
    "O2 + the target's own fused ops (--target; ONNX Runtime: com.microsoft contrib ops)",
    *O0.stages,
    Stage(("upgrade-opset",)),
    CLEANUP,
    # The target's fusions first: where both match (attention, GELU), its own op wins; what
    # builds on a portable fusion (SkipLayerNormalization on LayerNormalization) fires in
    # the stage's next round.
    TARGET_FUSE,
    _FINISH,
)
