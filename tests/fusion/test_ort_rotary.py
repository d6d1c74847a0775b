"""Rotary position embeddings -> com.microsoft.RotaryEmbedding (ort-rotary) and ONNX
RotaryEmbedding-23 (rotary): proven on ONNX Runtime against the unfused graph, on synthetic
graphs (half-split, GPT-J interleaved, a scale, batch rows at different positions, positions
far past any table) and on both torch exporters' tiny Llama, with and without a KV cache;
cos/sin that do not prove out by value are refused with the reason."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from tests.conftest import make_model, ort_run, tensor, vinfo
from tests.fusion._util import fuse, op_counts

B, N, S, H = 2, 3, 5, 8
INV = (1.0 / 10000 ** (np.arange(0, H, 2) / H)).astype(np.float32)
MS_ROTARY = "com.microsoft::RotaryEmbedding"


def _cos_sin(nodes, inits, *, interleaved=False, scale=None, extra_input=False, layout_swap=False,
             dynamic=False):
    """cos4/sin4 [B, 1, S, H] from position_ids, as transformers computes them."""
    nodes += [helper.make_node("Unsqueeze", ["position_ids", "ax2"], ["p3"]),
              helper.make_node("Cast", ["p3"], ["pf"], to=TensorProto.FLOAT)]
    inits += [tensor("ax2", np.array([2], np.int64)), tensor("ax1", np.array([1], np.int64))]
    if dynamic:  # frequencies stretched by the largest position (dynamic-NTK-like)
        nodes += [helper.make_node("ReduceMax", ["pf"], ["pmax"], keepdims=1),
                  helper.make_node("Mul", ["pmax", "ntk"], ["stretch0"]),
                  helper.make_node("Add", ["stretch0", "one"], ["stretch"]),
                  helper.make_node("Div", ["pf", "stretch"], ["pf2"])]
        inits += [tensor("ntk", np.float32(1e-3)), tensor("one", np.float32(1))]
    pos = "pf2" if dynamic else "pf"
    if interleaved:  # each frequency twice, next to itself (repeat_interleave)
        nodes.append(helper.make_node("Mul", [pos, "inv_rep"], ["emb"]))
        inits.append(tensor("inv_rep", np.repeat(INV, 2)))
    else:
        nodes.append(helper.make_node("Mul", [pos, "inv"], ["f"]))
        inits.append(tensor("inv", INV))
        second = "f"
        if layout_swap:  # the second half's frequencies reversed: not concat(f, f)'s layout
            nodes.append(helper.make_node("Mul", [pos, "inv_rev"], ["g"]))
            inits.append(tensor("inv_rev", INV[::-1].copy()))
            second = "g"
        nodes.append(helper.make_node("Concat", ["f", second], ["emb"], axis=-1))
    if extra_input:  # cos/sin also read another input
        nodes.append(helper.make_node("Mul", ["emb", "t"], ["emb_t"]))
    angle = "emb_t" if extra_input else "emb"
    nodes += [helper.make_node("Cos", [angle], ["cos"]), helper.make_node("Sin", [angle], ["sin"])]
    sin = "sin"
    cs = ["cos", sin]
    if scale is not None:
        nodes += [helper.make_node("Mul", ["cos", "a"], ["cos_a"]), helper.make_node("Mul", [sin, "a"], ["sin_a"])]
        inits.append(tensor("a", np.float32(scale)))
        cs = ["cos_a", "sin_a"]
    nodes += [helper.make_node("Unsqueeze", [cs[0], "ax1"], ["cos4"]),
              helper.make_node("Unsqueeze", [cs[1], "ax1"], ["sin4"])]


def _rotate(nodes, inits, x, *, interleaved=False, wrong=False):
    """rotate_half(x) (or rotate_every_two) as the exporters write it; ``wrong`` swaps the
    negated half (concat(-x1, x2): not a rotation by +angle)."""
    h = H // 2
    big = np.iinfo(np.int64).max
    c = lambda name, v: inits.append(tensor(f"{x}_{name}", np.array([v], np.int64))) or f"{x}_{name}"
    axis = c("axis", -1)
    if interleaved:
        nodes += [helper.make_node("Slice", [x, c("z", 0), c("e", big), axis, c("two", 2)], [f"{x}_even"]),
                  helper.make_node("Slice", [x, c("o", 1), f"{x}_e", axis, f"{x}_two"], [f"{x}_odd"]),
                  helper.make_node("Neg", [f"{x}_odd"], [f"{x}_nodd"]),
                  helper.make_node("Unsqueeze", [f"{x}_nodd", f"{x}_axis"], [f"{x}_u1"]),
                  helper.make_node("Unsqueeze", [f"{x}_even", f"{x}_axis"], [f"{x}_u2"]),
                  helper.make_node("Concat", [f"{x}_u1", f"{x}_u2"], [f"{x}_st"], axis=-1),
                  helper.make_node("Reshape", [f"{x}_st", f"{x}_shape"], [f"{x}_rot"])]
        inits.append(tensor(f"{x}_shape", np.array([0, 0, 0, H], np.int64)))
        return f"{x}_rot"
    nodes += [helper.make_node("Slice", [x, c("z", 0), c("h", h), axis, c("one", 1)], [f"{x}_lo"]),
              helper.make_node("Slice", [x, f"{x}_h", c("e", big), axis, f"{x}_one"], [f"{x}_hi"])]
    first, second = (f"{x}_lo", f"{x}_hi") if wrong else (f"{x}_hi", f"{x}_lo")
    nodes += [helper.make_node("Neg", [first], [f"{x}_neg"]),
              helper.make_node("Concat", [f"{x}_neg", second], [f"{x}_rot"], axis=-1)]
    return f"{x}_rot"


def _rope(*, opset=17, interleaved=False, wrong=False, cos_interleaved=None, **cos_sin):
    """q and k [B, N, S, H] rotated by the same cos/sin of position_ids [B, S]
    (``cos_interleaved``: the cos/sin layout, when it is not the rotation's)."""
    nodes, inits = [], []
    _cos_sin(nodes, inits, interleaved=interleaved if cos_interleaved is None else cos_interleaved, **cos_sin)
    for x in ("q", "k"):
        rot = _rotate(nodes, inits, x, interleaved=interleaved, wrong=wrong)
        nodes += [helper.make_node("Mul", [x, "cos4"], [f"{x}_c"]),
                  helper.make_node("Mul", [rot, "sin4"], [f"{x}_s"]),
                  helper.make_node("Add", [f"{x}_c", f"{x}_s"], [f"{x}_out"])]
    inputs = [vinfo("q", shape=(B, N, S, H)), vinfo("k", shape=(B, N, S, H)),
              vinfo("position_ids", TensorProto.INT64, (B, S))]
    if cos_sin.get("extra_input"):
        inputs.append(vinfo("t", shape=(1,)))
    outputs = [vinfo("q_out", shape=(B, N, S, H)), vinfo("k_out", shape=(B, N, S, H))]
    return make_model(nodes, inputs, outputs, inits, opset=opset)


def _feeds(rng, positions):
    feeds = {"q": rng.standard_normal((B, N, S, H)).astype(np.float32),
             "k": rng.standard_normal((B, N, S, H)).astype(np.float32),
             "position_ids": np.asarray(positions, np.int64)}
    return feeds


ROWS = [np.arange(S), np.arange(S) + 37]  # batch 2, each row at its own positions
FAR = [np.arange(S) + 70000, [3, 9, 4000, 1, 0]]  # past every probe and any fixed table


SAME = [[0] * S, [2] * S]  # fewer distinct positions than tokens (the kernel still wants S rows)


@pytest.mark.parametrize("case", [{}, {"interleaved": True}, {"scale": 0.7}, {"interleaved": True, "scale": 1.3}])
@pytest.mark.parametrize("positions", [ROWS, FAR, SAME], ids=["rows", "far", "same"])
def test_rotary_fuses_and_matches(rng, case, positions):
    model, result = fuse(_rope(**case), _feeds(rng, positions), target="ort-cpu", family="ort", explain=True)
    counts = op_counts(model)
    assert counts[MS_ROTARY] == 2, (counts, result.details)
    assert counts["Cos"] == 1 and counts["Sin"] == 1 and "Neg" not in counts, counts  # one cache for both
    node = next(n for n in model.graph if n.op_type == "RotaryEmbedding")
    assert node.attributes["interleaved"].as_int() == int(bool(case.get("interleaved")))
    _reads_one_row_per_token(node.inputs[1], node.inputs[2])


def _reads_one_row_per_token(index, cos):
    """The caches hold one row per token (computed from position_ids itself), read at
    b * S + s: no row count that grows with the positions."""
    assert index.producer().op_type == "Reshape"
    assert index.producer().inputs[0].producer().op_type == "Range"
    node, seen = cos.producer(), set()
    stack = [node]
    while stack:  # position_ids reaches the cache through Cast, never through ReduceMax
        n = stack.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        stack.extend(v.producer() for v in n.inputs if v is not None)
    assert "ReduceMax" not in {n.op_type for n in seen}
    assert any(v is not None and v.name == "position_ids" for n in seen for v in n.inputs)


def test_rotary_23_on_ort_at_opset_23(rng):
    """--target ort-cpu --target-opset 23: the standard op, its inputs in ONNX's order."""
    model, _ = fuse(_rope(opset=23, scale=0.5), _feeds(rng, ROWS), target="ort-cpu")
    counts = op_counts(model)
    assert counts["RotaryEmbedding"] == 2 and MS_ROTARY not in counts, counts
    node = next(n for n in model.graph if n.op_type == "RotaryEmbedding")
    assert node.domain == ""
    _reads_one_row_per_token(node.inputs[3], node.inputs[1])


def test_rotary_23_not_for_portable_or_old_opsets(rng):
    _, result = fuse(_rope(opset=23), _feeds(rng, ROWS), explain=True)
    assert "does not accept ai.onnx::RotaryEmbedding" in result.details["rules"]["rotary"]["not_run"]
    _, result = fuse(_rope(opset=17), _feeds(rng, ROWS), target="ort-cpu", explain=True)
    assert "--target-opset 23" in result.details["rules"]["rotary"]["not_run"]


@pytest.mark.parametrize("case,why", [
    ({"extra_input": True}, "more than one graph input (position_ids, t)"),
    ({"wrong": True}, "neither rotate_half"),
    ({"layout_swap": True}, "not in the concat(f, f) layout"),
    ({"cos_interleaved": True}, "not in the concat(f, f) layout"),
    ({"interleaved": True, "cos_interleaved": False}, "not in the repeat_interleave(f, 2) layout"),
    ({"dynamic": True}, "for constant frequencies"),
])
def test_rotary_refusals(rng, case, why):
    proto = _rope(**case)
    feeds = _feeds(rng, ROWS)
    if case.get("extra_input"):
        feeds["t"] = np.ones(1, np.float32)
    model, result = fuse(proto, feeds, target="ort-cpu", family="ort", explain=True)
    assert MS_ROTARY not in op_counts(model)
    misses = result.details["rules"]["ort-rotary"].get("near_misses", [])
    assert any(why in m for m in misses), misses


# ------------------------------------------------------------------ torch exports


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    pytest.importorskip("torch", reason="needs torch==2.13.0 (the test extra installs it)")
    pytest.importorskip("transformers", reason="needs transformers (the test extra installs it)")
    from models import decoder

    root = tmp_path_factory.mktemp("rotary")
    exports = {(dynamo, cache): decoder.export("llama", root / f"{int(dynamo)}{int(cache)}", cache=cache,
                                               dynamo=dynamo, check=False)
               for dynamo in (False, True) for cache in (False, True)}
    # YaRN scaling: other frequencies and an attention scaling factor a != 1 on cos and sin
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128}
    exports["yarn"] = decoder.export("llama", root / "yarn", check=False, config={"rope_parameters": yarn})
    return exports


def _decoder_feeds(cache: bool, batch: int, seq: int, past: int, positions) -> dict:
    rng = np.random.default_rng(1)
    feeds = {"input_ids": rng.integers(0, 512, (batch, seq)),
             "attention_mask": np.ones((batch, past + seq), np.int64),
             "position_ids": np.asarray(positions, np.int64).reshape(batch, seq)}
    if cache:
        for i in range(2):
            for kv in ("key", "value"):
                feeds[f"past_key_values.{i}.{kv}"] = rng.standard_normal((batch, 2, past, 16)).astype(np.float32)
    return feeds


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("cache", [False, True], ids=["no-cache", "cache"])
def test_llama_exports_fuse_two_rotaries_per_layer(llamas, dynamo, cache):
    """O3 for ort-cpu: 2 RotaryEmbedding per layer (kept by GroupQueryAttention on the
    projections), the cos/sin computed once; outputs equal the export's within 1e-4 at the
    verification's inputs and at rows of different, large positions."""
    import gcomp

    path = llamas[(dynamo, cache)]
    result = gcomp.optimize(path, "O3")
    assert result.verification.passed, result.verification.summary()
    ops = result.after.op_types
    assert ops.get(MS_ROTARY) == 2 * 2 and ops.get("Cos") == 1 and ops.get("Sin") == 1, ops
    past = 6 if cache else 0
    cases = [(2, 3, [[past + i for i in range(3)], [past + 900 + i for i in range(3)]])]
    if cache:  # GroupQueryAttention: several new tokens after a past only at batch 1
        cases = [(2, 1, [[past], [5000]]), (1, 3, [[past, past + 1, past + 2]])]
    for batch, seq, positions in cases:
        feeds = _decoder_feeds(cache, batch, seq, past, positions)
        want, got = ort_run(path, feeds), ort_run(result.model, feeds)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.slow
def test_yarn_scaled_rotary_fuses(llamas):
    """transformers' YaRN rope scaling (frequencies blended, cos/sin scaled by 0.1 ln(4) + 1):
    the scale goes into the caches; equal to the export at positions past the original 128."""
    import gcomp

    result = gcomp.optimize(llamas["yarn"], "O3")
    assert result.verification.passed, result.verification.summary()
    assert result.after.op_types.get(MS_ROTARY) == 4, result.after.op_types
    cos = next(n for n in result.model.graph if n.op_type == "Cos")
    (scale,) = [u.node.inputs[1].const_value.numpy() for u in cos.outputs[0].uses()]
    assert scale == pytest.approx(0.1 * np.log(4.0) + 1, rel=1e-6)
    feeds = _decoder_feeds(False, 2, 3, 0, [[0, 1, 2], [3000, 3001, 3002]])
    want, got = ort_run(llamas["yarn"], feeds), ort_run(result.model, feeds)
    np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-4, atol=1e-4)
