"""Mixed precision: fp16/bf16 conversion, Cast minimisation, reduced-precision validation.

- ``policy``: which ops keep fp32 (sensitive), which convert (compute), which follow.
- ``mincut``: the exact minimum cut that places the Casts.
- ``assign``: precision variables and Cast hyperedges built from a model.
- ``convert``: applying an assignment (types, constants saturated, Casts, clean-up).
- ``emulate``: the emulating evaluator (fp32 copy rounding every low value) and errors.
- ``mixed``: the ``convert-precision`` pass, calibration and the ``auto`` search.
"""

from __future__ import annotations

from gcomp.passes.precision import mixed

__all__ = ["mixed"]
