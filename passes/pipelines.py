"""The named pipelines. Each level extends the one below it.

- ``O0``: validate only (load, check, save): proves gcomp round-trips the model.
- ``O1``: O0, then housekeeping to a fixed point: identity elimination, CSE,
  initializer dedup, unused nodes/functions/opsets; then a topological sort.
  (The constant-folding issue extends O1; fusion adds O2/O3.)
"""

from __future__ import annotations

__all__ = ["O0", "O1", "CLEANUP"]

from gcomp.registry import Stage, register_pipeline

CLEANUP = Stage(
    (
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
    "O0 + cleanup to a fixed point (identity, CSE, dedup, unused nodes/functions/opsets) + sort",
    *O0.stages,
    CLEANUP,
    Stage(("topological-sort",)),
)
