"""Conformance of every quantization mode on the ONNX backend node test cases it applies to.

The cases of ``onnx.backend.test.case.node`` whose one op a mode quantizes (MatMul, Gemm and
Conv for the int8 modes, MatMul, Gemm and Gather for the weight-only ones) are turned into
quantizable models: their weight inputs (every input but the activation: the second and
later of MatMul/Gemm/Conv, the table of Gather) become initializers holding the case's own
data. Each model then goes through ``gcomp.optimize(model, quantize=MODE)`` (verification on;
the speed gate off, since timing one-op models says nothing and takes long; static int8
calibrated on eight samples made from the case's activation), and must end one of two ways:

- **verified**: a quantized model whose verification passed under the accuracy budget, that
  runs on ONNX Runtime on the case's own inputs with finite outputs of the expected shapes;
- **declined**: a :class:`gcomp.errors.GcompError` of one line (nothing to quantize, the budget
  cannot be met, an op ONNX Runtime has no kernel for...).

Anything else (another exception, a multi-line error, a model that does not run, a failed
verification returned as success) is a failure. The test prints how many cases each mode
verified and declined, and requires each mode to verify at least :data:`MIN_VERIFIED`.
"""

from __future__ import annotations

import collections
import functools
import warnings
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import gcomp
from gcomp import runtime
from gcomp.errors import GcompError

MODES = {
    "int8-dynamic": ("MatMul", "Gemm"),
    "int8": ("MatMul", "Gemm", "Conv"),
    "int8-weights": ("MatMul", "Gemm", "Gather"),
    "int4": ("MatMul", "Gemm", "Gather"),
}
MIN_VERIFIED = 8  # measured: 9-15 per mode; fewer means a broken harness or a pass refusing what it took


@functools.lru_cache(maxsize=1)
def _cases() -> tuple[Any, ...]:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tuple(collect_testcases(None))


def _constantized(case: Any) -> tuple[onnx.ModelProto, dict[str, np.ndarray]] | None:
    """The case's model with its weight inputs as initializers, and the feeds left; None
    when the case does not fit (not one op, inputs that are not float tensors, no data)."""
    model = case.model
    if len(model.graph.node) != 1 or not case.data_sets:
        return None
    node = model.graph.node[0]
    inputs, _ = case.data_sets[0]
    names = [i.name for i in model.graph.input]
    if len(inputs) != len(names) or len(names) < 2:
        return None
    weights = {0} if node.op_type == "Gather" else set(range(1, len(names)))
    model = onnx.ModelProto.FromString(model.SerializeToString())
    feeds = {}
    for index, (name, value) in enumerate(zip(names, inputs)):
        if not isinstance(value, np.ndarray):
            return None
        if index in weights:
            model.graph.initializer.append(numpy_helper.from_array(value, name))
        else:
            feeds[name] = value
    kept = [i for i in model.graph.input if i.name in feeds]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    activation = feeds.get(names[0]) if node.op_type != "Gather" else None
    if activation is not None and activation.dtype != np.float32:
        return None
    return model, feeds


def _applicable(ops: tuple[str, ...]) -> list[tuple[str, onnx.ModelProto, dict[str, np.ndarray]]]:
    found = []
    for case in _cases():
        if case.model.graph.node and case.model.graph.node[0].op_type in ops:
            made = _constantized(case)
            if made is not None and _runs(*made):
                found.append((case.name, *made))
    return found


def _runs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> bool:
    try:
        runtime.reference(model.SerializeToString()).run(feeds)
    except Exception:  # noqa: BLE001  (ORT cannot run the original: not a quantization case)
        return False
    return True


def _calibration(folder, feeds: dict[str, np.ndarray]) -> str:
    """Eight samples: the case's feeds and seven perturbed copies (float inputs only)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        sample = {k: (v + (0.1 * i) * rng.standard_normal(v.shape).astype(v.dtype)
                      if v.dtype == np.float32 else v) for k, v in feeds.items()}
        np.savez(folder / f"sample_{i}.npz", **sample)
    return str(folder)


def _outcome(mode: str, model: onnx.ModelProto, feeds: dict[str, np.ndarray], folder) -> str:
    """"verified", "declined: ...", or "FAIL: ..."."""
    calibration = _calibration(folder, feeds) if mode == "int8" else None
    try:
        result = gcomp.optimize(model, quantize=mode, calibration=calibration, speed_gate=False)
    except GcompError as e:
        text = str(e)
        return f"declined: {text}" if "\n" not in text else f"FAIL: a multi-line error: {text!r}"
    except Exception as e:  # noqa: BLE001  (a crash)
        return f"FAIL: {type(e).__name__}: {e}"
    if result.verification is None or not result.verification.passed:
        return f"FAIL: returned without passing verification ({result.verification})"
    expected = runtime.reference(model.SerializeToString()).run(feeds)
    try:
        actual = runtime.reference(result.model).run(feeds)
    except Exception as e:  # noqa: BLE001
        return f"FAIL: the quantized model does not run on the case's inputs: {e}"
    for name, e in expected.items():
        a = np.asarray(actual[name])
        if a.shape != np.asarray(e).shape or (a.dtype.kind == "f" and not np.isfinite(a).all()):
            return f"FAIL: output {name}: shape {a.shape} (expected {np.asarray(e).shape}) or non-finite values"
    return "verified"


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_every_applicable_node_case_is_verified_or_cleanly_declined(mode, tmp_path, capsys):
    cases = _applicable(MODES[mode])
    assert len(cases) >= 10, f"only {len(cases)} node cases apply to {mode}: the harness is broken"
    outcomes = {name: _outcome(mode, model, feeds, tmp_path / name) for name, model, feeds in cases}
    counts = collections.Counter(o.split(":")[0] for o in outcomes.values())
    with capsys.disabled():
        print(f"\nquantize {mode}: {len(cases)} node cases apply; {counts['verified']} verified, "
              f"{counts['declined']} declined, {counts['FAIL']} failed")
        for reason, n in collections.Counter(o for o in outcomes.values() if o.startswith("declined")).most_common(6):
            print(f"  {n} x {reason[:160]}")
    failures = {n: o for n, o in outcomes.items() if o.startswith("FAIL")}
    assert not failures, "\n".join(f"{n}: {o}" for n, o in failures.items())
    assert counts["verified"] >= MIN_VERIFIED, outcomes
