"""Reduced precision on the core's side: checking fp16/bf16 candidates, and calibrating on
the verification inputs.

- :func:`emulated_outputs`: a candidate that holds fp16/bf16 values is run with the
  emulating evaluator (:mod:`.emulate`), not plainly on ONNX Runtime (which upcasts on the
  CPU and would hide overflow), and its outputs are compared with the precision's
  tolerances (:data:`.emulate.TOLERANCES`) unless the caller gave explicit ones. A model
  the emulator cannot rewrite runs on ORT instead, and the note says so.
- :func:`calibration_feeds`: feeds made as verification makes its inputs (given arrays
  or files, the rest generated with the same seed and shapes), so calibration sees the
  values verification checks; the pipeline's :class:`gcomp.registry.PassContext` hands
  them to passes (``context.inputs``).
"""

from __future__ import annotations

__all__ = ["calibration_feeds", "emulated_outputs"]

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from gcomp import inputs as _inputs
from gcomp import io, runtime
from gcomp.errors import first_line
from gcomp.verify.compare import Tolerance
from gcomp.verify.emulate import TOLERANCES, emulate, reduced_precision


def emulated_outputs(
    candidate: ir.Model | str | Path,
    feeds: Mapping[str, np.ndarray],
    expected: Mapping[str, Any],
    explicit: Mapping[str, Tolerance],
    timeout: float | None = None,
) -> tuple[dict[str, Any], dict[str, Tolerance], str] | None:
    """(outputs in the expected dtypes, tolerances, a note), or None for a full-precision model."""
    model = candidate if isinstance(candidate, ir.Model) else io.load(candidate, check=False)
    precision = reduced_precision(model)
    if precision is None:
        return None
    try:
        outputs = emulate(model, feeds, timeout=timeout)
        how = (f"evaluated by emulation (fp32 compute, every {precision} value rounded where it is made)")
    except Exception as e:  # noqa: BLE001  (a model the emulator cannot rewrite is still checked)
        outputs = runtime.reference(model).run(feeds, **({"timeout": timeout} if timeout else {}))
        how = (f"emulation not possible ({first_line(e)[:120]}): run on ONNX Runtime, which upcasts "
               "and may hide overflow")
    for name, e in expected.items():
        a = outputs.get(name)
        same_kind = isinstance(a, np.ndarray) and isinstance(e, np.ndarray) and e.dtype.kind == "f"
        if same_kind and a.dtype != e.dtype and (a.dtype.kind == "f" or str(a.dtype) == "bfloat16"):
            outputs[name] = a.astype(e.dtype)
    tol = TOLERANCES[precision]
    tolerances = {"float32": tol, "float16": tol, "bfloat16": tol, "float64": tol, **explicit}
    note = f"reduced precision ({precision}): {how}; compared with rtol={tol.rtol:g}, atol={tol.atol:g}"
    return outputs, tolerances, note


def calibration_feeds(
    model: ir.Model,
    *,
    given: Mapping[str, np.ndarray] | None = None,
    path: str | Path | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Feeds for every input of ``model``: ``given``, updated with those read from ``path``
    (an ``.npz`` or ``test_data_set`` folder), the rest generated (:mod:`gcomp.inputs`)."""
    arrays = dict(given or {})
    if path:
        arrays.update(_inputs.load_inputs(Path(path), model))
    feeds, _ = _inputs.generate_inputs(model, shapes=dict(input_shapes or {}), given=arrays, seed=seed)
    return feeds
