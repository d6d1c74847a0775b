"""Mixed precision: fp16/bf16 conversion, Cast minimisation, reduced-precision validation.

- ``policy``: which ops keep fp32 (sensitive), which convert (compute), which follow.
- ``mincut``: the exact minimum cut that places the Casts.
- ``assign``: precision variables and Cast hyperedges built from a model.
- ``convert``: applying an assignment (types, constants saturated, Casts, clean-up).
- ``accuracy``: a reduced-precision run's errors against fp32 (the ``auto`` search's measure).
- ``mixed``: the ``convert-precision`` pass, calibration and the ``auto`` search.

The pass runs models only through the runtime the pipeline hands it (``context``); the
emulating evaluator (fp32 copy rounding every low value) is :mod:`gcomp.verify.emulate`.
"""

from __future__ import annotations

from gcomp.passes.precision import mixed

__all__ = ["mixed"]
