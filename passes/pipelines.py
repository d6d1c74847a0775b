"""The named pipelines. Each level extends the one below it.

- ``O0``: validate only (load, check, save): proves gcomp round-trips the model.
- ``O1``: O0, then to a fixed point: shape inference (again each round: a folded
  Reshape target lets ONNX carry symbolic dims further), constant and shape folding,
  simplification (no-ops, merges, exact identities, constant Ifs), identity
  elimination, CSE, initializer dedup, unused nodes/functions/opsets; then a
  topological sort. (Fusion adds O2/O3.)
"""

from __future__ import annotations

__all__ = ["O0", "O1", "CLEANUP"]

from gcomp.registry import Stage, register_pipeline

CLEANUP = Stage(
    (
        "infer-shapes",
        "fold-constants",
        "simplify",
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
    "O0 + shape inference + to a fixed point: constant/shape folding, simplify, identity, CSE, dedup, unused removal + sort",
    *O0.stages,
    CLEANUP,
    Stage(("forget-inferred-shapes", "topological-sort")),
)
