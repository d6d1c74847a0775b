"""The core side of quantization: error measures, calibration data, and their errors."""

from __future__ import annotations

import re

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from gcomp.errors import OptionError
from gcomp.inputs import load_calibration
from gcomp.verify.metrics import Budget, measure
from tests.conftest import make_model, tensor, vinfo


def _mlp(k=16, n=4):
    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="proj")]
    return ir.from_proto(make_model(nodes, [vinfo("x", shape=("batch", k))], [vinfo("y", shape=("batch", n))],
                                    [tensor("W", w)]))


# ------------------------------------------------------------------------------ metrics


def test_cosine_catches_a_lost_signal_that_max_abs_misses():
    """A small output whose direction is gone: max-abs error tiny, cosine far from 1."""
    e = np.array([[1e-3, -1e-3, 2e-3, 0.0]], np.float32)
    a = -e  # same magnitudes, opposite direction
    cos = measure([{"y": e}], [{"y": a}], Budget("cosine", 0.01))[0]
    abs_ = measure([{"y": e}], [{"y": a}], Budget("max-abs", 0.01))[0]
    assert abs_.within and abs_.error < 0.005
    assert not cos.within and cos.error == pytest.approx(2.0)
    assert cos.cosine == pytest.approx(-1.0)


def test_each_metric_matches_its_definition_on_the_worst_sample():
    rng = np.random.default_rng(1)
    e1, e2 = rng.standard_normal((3, 10)), rng.standard_normal((3, 10))
    a1, a2 = e1 + 0.01 * rng.standard_normal((3, 10)), e2 + 0.2 * rng.standard_normal((3, 10))
    exp, act = [{"y": e1}, {"y": e2}], [{"y": a1}, {"y": a2}]
    rel = max(np.linalg.norm(a - e) / np.linalg.norm(e) for e, a in ((e1, a1), (e2, a2)))
    cos = max(1 - np.dot(e.ravel(), a.ravel()) / np.linalg.norm(e) / np.linalg.norm(a)
              for e, a in ((e1, a1), (e2, a2)))
    assert measure(exp, act, Budget("rel-l2", 1))[0].error == pytest.approx(rel)
    assert measure(exp, act, Budget("cosine", 1))[0].error == pytest.approx(cos)
    assert measure(exp, act, Budget("max-abs", 1))[0].error == pytest.approx(np.abs(a2 - e2).max())
    flips = sum(int((e.argmax(-1) != a.argmax(-1)).sum()) for e, a in ((e1, a1), (e2, a2)))
    assert measure(exp, act, Budget("top1", 1))[0].error == pytest.approx(flips / 6)


def test_new_nan_or_changed_integers_are_infinite_errors():
    e = np.ones((2, 3), np.float32)
    a = e.copy()
    a[0, 0] = np.nan
    assert measure([{"y": e}], [{"y": a}], Budget())[0].error == float("inf")
    ints = measure([{"i": np.arange(3)}], [{"i": np.array([0, 1, 3])}], Budget())[0]
    assert not ints.within


def test_budget_refuses_unknown_metrics_and_non_positive_tolerances():
    with pytest.raises(OptionError, match="unknown metric 'l1'"):
        Budget("l1", 0.1)
    with pytest.raises(OptionError, match="tolerance must be positive"):
        Budget("cosine", 0)
    assert Budget().describe() == "cosine >= 0.99"
    with pytest.raises(OptionError, match="non-negative"):
        Budget("tokens", -0.1)
    assert Budget("tokens", 0).tolerance == 0  # a count: none may change


def test_tokens_bounds_the_token_scores_and_reports_the_cache():
    """``tokens``: top1 over the token scores, with the float model's margin where a token
    changed; a KV cache's outputs are reported, not bounded."""
    logits = np.array([[[5.0, 1.0, 0.0], [2.0, 1.9, 0.0], [0.0, 0.0, 3.0]]], np.float32)  # [1, 3 positions, vocab 3]
    flipped = logits.copy()
    flipped[0, 1] = [1.8, 2.0, 0.0]  # the near-tie at position 1 flips
    cache = np.ones((1, 2, 3, 4), np.float32)
    exp = [{"logits": logits, "present.0.key": cache}]
    act = [{"logits": flipped, "present.0.key": -cache}]  # the cache's direction is gone
    rows = {r.name: r for r in measure(exp, act, Budget("tokens", 0))}
    assert rows["logits"].error == pytest.approx(1 / 3) and not rows["logits"].within
    assert rows["logits"].margin == pytest.approx(0.1, abs=1e-6)  # 2.0 - 1.9 at the changed position
    assert rows["present.0.key"].within and not rows["present.0.key"].bounded
    assert rows["present.0.key"].cosine == pytest.approx(-1.0)
    assert all(r.within for r in measure(exp, [{"logits": logits, "present.0.key": -cache}], Budget("tokens", 0)))


# ------------------------------------------------------------------------------ calibration data


def _samples(n, k=16, batch=2):
    rng = np.random.default_rng(2)
    return [rng.standard_normal((batch, k)).astype(np.float32) for _ in range(n)]


def test_calibration_from_a_folder_of_npz_a_stacked_npz_and_test_data_sets(tmp_path):
    model = _mlp()
    arrays = _samples(8)
    folder = tmp_path / "npz"
    folder.mkdir()
    for i, x in enumerate(arrays):
        np.savez(folder / f"s{i}.npz", x=x)
    stacked = tmp_path / "all.npz"
    np.savez(stacked, x=np.stack(arrays))
    sets = tmp_path / "sets"
    for i, x in enumerate(arrays):
        (sets / f"test_data_set_{i}").mkdir(parents=True)
        (sets / f"test_data_set_{i}" / "input_0.pb").write_bytes(
            numpy_helper.from_array(x, "x").SerializeToString())
    for path in (folder, stacked, sets):
        loaded = load_calibration(path, model)
        assert len(loaded) == 8
        assert all(np.array_equal(s["x"], x) for s, x in zip(loaded, arrays)), path


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda d: None, "the folder holds no .npz files"),
        (lambda d: [np.savez(d / f"s{i}.npz", x=x) for i, x in enumerate(_samples(3))], "3 sample(s); at least 8"),
        (lambda d: [np.savez(d / f"s{i}.npz", z=x) for i, x in enumerate(_samples(8))], "unknown: z"),
        (lambda d: [np.savez(d / f"s{i}.npz", x=x.astype(np.float64)) for i, x in enumerate(_samples(8))],
         "input 'x' is float64, the model expects float32"),
        (lambda d: [np.savez(d / f"s{i}.npz", x=x) for i, x in enumerate(_samples(8, k=5))],
         "input 'x' has shape [2, 5], the model expects [?x16]"),
    ],
)
def test_calibration_data_that_does_not_fit_is_one_clear_error(tmp_path, make, expected):
    folder = tmp_path / "cal"
    folder.mkdir()
    make(folder)
    with pytest.raises(OptionError, match=re.escape(expected)):
        load_calibration(folder, _mlp())


def test_a_stacked_npz_needs_one_sample_axis_shared_by_every_array(tmp_path):
    nodes = [helper.make_node("Add", ["a", "b"], ["y"])]
    model = ir.from_proto(make_model(nodes, [vinfo("a"), vinfo("b")], [vinfo("y")]))
    np.savez(tmp_path / "bad.npz", a=np.zeros((8, 1, 4), np.float32), b=np.zeros((9, 1, 4), np.float32))
    with pytest.raises(OptionError, match="same leading sample axis"):
        load_calibration(tmp_path / "bad.npz", model)
    with pytest.raises(OptionError, match="no such file"):
        load_calibration(tmp_path / "missing", model)


@pytest.mark.parametrize(("mode", "first", "timed"), [
    ("int8-dynamic", (0.9, 1.2), [6, 18]),  # straddles 1.0: timed again, three times longer
    ("int8-dynamic", (1.3, 1.6), [6]),  # clearly faster: once
    ("int4", (0.8, 0.95), [6, 18]),  # straddles 1/1.1 for weight-only
    ("int4", (0.95, 1.05), [6]),  # straddles 1.0 only: no matter for weight-only
])
def test_speed_gate_measures_longer_when_the_spread_straddles_its_threshold(monkeypatch, mode, first, timed):
    from gcomp import quantize, runtime

    calls = []

    class Fake:
        def __init__(self, blocks):
            self.blocks = blocks

        def summary(self):
            low, high = first if len(calls) == 1 else (1.5, 1.6)
            return {"rounds": self.blocks * 8, "a_ms_min": 1.0, "b_ms_min": 1.0, "a_ms_median": 1.0,
                    "b_ms_median": 1.0, "ratio_median": (low + high) / 2, "ratio_p10": low, "ratio_p90": high}

    def fake_timing(a, b, feeds, *, blocks, block):
        calls.append(blocks)
        return Fake(blocks)

    monkeypatch.setattr(runtime, "time_interleaved", fake_timing)
    monkeypatch.setattr(quantize.OrtBackend, "compile", lambda self, model, device: None)
    speed = quantize._speed(None, None, {}, "ort-cpu", mode)
    assert calls == timed
    assert speed["rounds"] == timed[-1] * 8


def _calibrated_and_deployed(folder):
    """One MatMul over rows of 64, with ``calibration.npz`` (8 samples of 32 rows) and
    ``deployed.npz`` (one row) written to ``folder``."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    np.savez(folder / "calibration.npz", x=rng.standard_normal((8, 32, 64)).astype(np.float32))
    np.savez(folder / "deployed.npz", x=rng.standard_normal((1, 64)).astype(np.float32))
    return make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="proj")],
                      [vinfo("x", shape=("rows", 64))], [vinfo("y", shape=("rows", 64))], [tensor("W", w)])


def test_speed_gate_times_on_the_given_inputs_the_shape_the_model_is_deployed_at(monkeypatch, tmp_path):
    """Calibrated on 8 x 32 rows, deployed one row at a time (--inputs): the gate times what
    --inputs describes, not the first calibration sample."""
    import gcomp
    from gcomp import runtime
    from gcomp.quantize import QuantizationDeclined

    proto = _calibrated_and_deployed(tmp_path)
    timed = []
    real = runtime.time_interleaved

    def spy(a, b, feeds, **kwargs):
        timed.append({k: v.shape for k, v in feeds.items()})
        return real(a, b, feeds, **kwargs)

    monkeypatch.setattr(runtime, "time_interleaved", spy)
    for given, shape in (({"inputs": tmp_path / "deployed.npz"}, (1, 64)), ({}, (32, 64)),
                         ({"inputs": tmp_path / "deployed.npz", "verify": False}, (1, 64))):
        timed.clear()
        try:  # a model this small may well be declined as slower: what it was timed on is the point
            gcomp.optimize(proto, quantize="int4", calibration=tmp_path / "calibration.npz", tolerance=0.5, **given)
        except QuantizationDeclined:
            pass
        assert timed and all(t == {"x": shape} for t in timed), (given, timed)


def test_the_budget_is_measured_on_what_verification_checks(tmp_path):
    """--calibration and --inputs together: verification runs on --inputs, so the budget is
    measured on them too (before, a model could meet its budget on the samples and then fail
    verification)."""
    import gcomp

    proto = _calibrated_and_deployed(tmp_path)
    both = gcomp.optimize(proto, quantize="int4", calibration=tmp_path / "calibration.npz",
                          inputs=tmp_path / "deployed.npz", speed_gate=False, tolerance=0.5)
    assert both.quantization.samples == 9 and "verification inputs" in both.quantization.sample_source
    alone = gcomp.optimize(proto, quantize="int4", calibration=tmp_path / "calibration.npz", speed_gate=False,
                           tolerance=0.5)
    assert alone.quantization.samples == 8 and "verification" not in alone.quantization.sample_source
