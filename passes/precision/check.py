"""Verification of reduced-precision models: what :mod:`gcomp.verify` calls.

A candidate that holds fp16/bf16 values is run with the emulating evaluator
(:mod:`.emulate`), not plainly on ONNX Runtime (which upcasts on the CPU and would hide
overflow), and its outputs are compared with the precision's tolerances
(:data:`.emulate.TOLERANCES`) unless the caller gave explicit ones. A model the emulator
cannot rewrite runs on ORT instead, and the note says so.
"""

from __future__ import annotations

__all__ = ["emulated_outputs"]

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from gcomp.verify import Tolerance


def emulated_outputs(
    candidate: ir.Model | str | Path,
    feeds: Mapping[str, np.ndarray],
    expected: Mapping[str, Any],
    explicit: Mapping[str, Tolerance],
    timeout: float | None = None,
) -> tuple[dict[str, Any], dict[str, Tolerance], str] | None:
    """(outputs in the expected dtypes, tolerances, a note), or None for a full-precision model."""
    from gcomp.passes.precision.emulate import TOLERANCES, emulate, reduced_precision

    from gcomp import io

    model = candidate if isinstance(candidate, ir.Model) else io.load(candidate, check=False)
    precision = reduced_precision(model)
    if precision is None:
        return None
    try:
        outputs = emulate(model, feeds, timeout=timeout)
        how = (f"evaluated by emulation (fp32 compute, every {precision} value rounded where it is made)")
    except Exception as e:  # noqa: BLE001  (a model the emulator cannot rewrite is still checked)
        from gcomp.backends.ort import OrtBackend

        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        outputs = OrtBackend().compile(model, "cpu", optimization="disable").run(
            feeds, **({"timeout": timeout} if timeout else {}))
        how = f"emulation not possible ({text[:120]}): run on ONNX Runtime, which upcasts and may hide overflow"
    for name, e in expected.items():
        a = outputs.get(name)
        same_kind = isinstance(a, np.ndarray) and isinstance(e, np.ndarray) and e.dtype.kind == "f"
        if same_kind and a.dtype != e.dtype and (a.dtype.kind == "f" or str(a.dtype) == "bfloat16"):
            outputs[name] = a.astype(e.dtype)
    tol = TOLERANCES[precision]
    tolerances = {"float32": tol, "float16": tol, "bfloat16": tol, "float64": tol, **explicit}
    note = f"reduced precision ({precision}): {how}; compared with rtol={tol.rtol:g}, atol={tol.atol:g}"
    return outputs, tolerances, note
