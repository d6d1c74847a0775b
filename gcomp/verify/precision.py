"""Reduced precision on the core's side: checking fp16/bf16 candidates, and calibrating on
the verification inputs.

- :func:`emulated_outputs`: a candidate that holds fp16/bf16 values is run with the
  emulating evaluator (:mod:`.emulate`), not plainly on ONNX Runtime (which upcasts on the
  CPU and would hide overflow), and its outputs are compared with the precision's
  tolerances (:data:`.emulate.TOLERANCES`) unless the caller gave explicit ones. A model
  the emulator cannot rewrite runs on ORT instead, and the note says so.
- :func:`judge_signal`: the element-wise check is absolute below magnitude 1 (an output
  of 1e-9 flushed to zeros is within it), so every float output of a reduced-precision
  candidate is also held to the signal bounds (:mod:`gcomp.passes.precision.accuracy`):
  not all zeros where fp32 is not, cosine and rel-l2 within :func:`signal_bounds` (those
  the conversion recorded, else the precision's defaults: fp16 cosine >= 0.999 and
  rel-l2 <= 1e-2, bf16 0.99 and 5e-2). Outputs all zeros or constant in fp32 have no
  direction: no cosine there (rel-l2 still, unless all zeros: the element-wise check
  judges those). Each output's cosine, rel-l2 and counts of elements flushed to zero or
  left subnormal (non-zero in fp32) go into its :class:`~.compare.OutputCheck`.
- :func:`precision_options`: :func:`gcomp.optimize`'s ``metric`` names the measure the
  ``tolerance`` option bounds for quantization, or, without quantization, for the
  precision conversion (its ``metric`` option), whose bounds verification then applies.
- :func:`calibration_feeds`: feeds made as verification makes its inputs (given arrays
  or files, the rest generated with the same seed and shapes), so calibration sees the
  values verification checks; the pipeline's :class:`gcomp.registry.PassContext` hands
  them to passes (``context.inputs``).
"""

from __future__ import annotations

__all__ = ["calibration_feeds", "emulated_outputs", "judge_signal", "precision_options", "signal_bounds"]

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from gcomp import inputs as _inputs
from gcomp import io, runtime
from gcomp.errors import first_line
from gcomp.passes.precision import accuracy
from gcomp.verify.compare import OutputCheck, Tolerance
from gcomp.verify.emulate import TOLERANCES, emulate, reduced_precision


def emulated_outputs(
    candidate: ir.Model | str | Path,
    feeds: Mapping[str, np.ndarray],
    expected: Mapping[str, Any],
    explicit: Mapping[str, Tolerance],
    timeout: float | None = None,
) -> tuple[dict[str, Any], dict[str, Tolerance], str, tuple[str, accuracy.Bounds]] | None:
    """(outputs in the expected dtypes, tolerances, a note, (precision, signal bounds)), or
    None for a full-precision model."""
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
    bounds = signal_bounds(model, precision)
    note = (f"reduced precision ({precision}): {how}; compared with rtol={tol.rtol:g}, atol={tol.atol:g}, "
            f"every float output within {bounds.describe()}")
    return outputs, tolerances, note, (precision, bounds)


def signal_bounds(model: ir.Model, precision: str) -> accuracy.Bounds:
    """The bounds the conversion recorded on ``model`` (in memory), else ``precision``'s defaults."""
    recorded = model.graph.meta.get(accuracy.BOUNDS_META)
    return recorded if isinstance(recorded, accuracy.Bounds) else accuracy.BOUNDS[precision]


def judge_signal(checks: list[OutputCheck], expected: Mapping[str, Any], actual: Mapping[str, Any],
                 precision: str, bounds: accuracy.Bounds) -> None:
    """Measure every float output's signal into its check; fail the checks that miss ``bounds``."""
    rows = {r.name: r for r in accuracy.compare(expected, actual, precision)}
    for check in checks:
        row = rows.get(check.name)
        if row is None:
            continue
        check.cosine, check.rel_l2 = row.cosine, row.rel_l2
        check.flushed, check.subnormal = row.flushed, row.subnormal
        why = row.miss(bounds, precision)
        if why:
            check.detail = why if check.ok else f"{check.detail}; {why}"
            check.ok = False


def precision_options(options: dict[str, Any], precision: str | None, metric: str | None,
                      quantize: str | None) -> dict[str, Any]:
    """``options`` with ``metric`` for the ``convert-precision`` pass when it serves the
    precision conversion (``precision`` given, no quantization, which takes it otherwise)."""
    return dict(options, metric=metric) if precision and metric and not quantize else options


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
