"""``quantize-dynamic`` on ``com.microsoft.Attention``: QAttention, its mask, and the fallback.

Every model runs float and quantized on ONNX Runtime with its optimizations off
(:func:`gcomp.runtime.reference`); accuracy is bounded by the cosine of the flattened output
(>= 0.99) and its relative L2 error (< 2e-2: one int8 projection, per-column weights and a
uint8 activation, ~1.1 % rms; tests/test_quantize_passes.py derives it). A mask test also
checks that the mask is honoured: with padding, the quantized output is close to the float
output *with* padding and far from the float output without it.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import gcomp
from gcomp import registry, runtime
from tests.conftest import make_model, tensor, vinfo

COSINE, REL = 0.99, 2e-2
B, S, K, HEADS = 2, 16, 64, 4


@pytest.fixture(scope="module")
def context():
    return runtime.pass_context()


def _errors(e: np.ndarray, a: np.ndarray) -> tuple[float, float]:
    e, a = e.ravel().astype(np.float64), a.ravel().astype(np.float64)
    return float(e @ a / (np.linalg.norm(e) * np.linalg.norm(a))), float(np.linalg.norm(a - e) / np.linalg.norm(e))


def _run(model, feeds):
    return runtime.reference(model if isinstance(model, ir.Model) else ir.serde.deserialize_model(model)).run(feeds)


def _quantize(proto, context, **options):
    model = ir.serde.deserialize_model(proto)
    result = registry.get_pass("quantize-dynamic").create(context=context, target="ort-cpu", smooth=0.0,
                                                          **options)(model)
    return result.model, result.details


def _ops(model: ir.Model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph)


def _attention_model(mask: str, opset: int = 17) -> onnx.ModelProto:
    """x [B, S, K] -> com.microsoft.Attention (4 heads), with ``mask``:

    - ``"padding"``: attention_bias = Expand((1 - Cast(Unsqueeze(m))) * -10000), m [B, S] int64;
    - ``"causal"``: that plus a constant causal triangle (a positional mask);
    - ``"weak"``: (1 - m) * -100 (not a large negative constant);
    - ``"bias-input"``: a float [B, 1, S, S] graph input;
    - ``"index"``: m as int32 mask_index (no attention_bias);
    - ``"first-kept"``: like ``"padding"``, but position 0 is always attended.
    """
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((K, 3 * K)) / np.sqrt(K)).astype(np.float32)
    b = (0.1 * rng.standard_normal(3 * K)).astype(np.float32)
    inits = [tensor("W", w), tensor("bqkv", b), tensor("one", np.array(1.0, np.float32)),
             tensor("neg", np.array(-100.0 if mask == "weak" else -10000.0, np.float32)),
             tensor("axes", np.array([1, 2], np.int64))]
    inputs = [vinfo("x", TensorProto.FLOAT, [B, S, K])]
    nodes = []
    attention_inputs = ["x", "W", "bqkv"]
    if mask == "index":
        inputs.append(vinfo("m", TensorProto.INT32, [B, S]))
        attention_inputs += ["m"]
    elif mask == "bias-input":
        inputs.append(vinfo("bias", TensorProto.FLOAT, [B, 1, S, S]))
        attention_inputs += ["", "", "bias"]
    else:
        inputs.append(vinfo("m", TensorProto.INT64, [B, S]))
        source = "m"
        if mask == "first-kept":  # position 0 always attended: not a padding mask of m
            inits += [tensor("ones_col", np.ones((B, 1), np.int64)), tensor("s1", np.array([1], np.int64)),
                      tensor("send", np.array([S], np.int64)), tensor("sax", np.array([1], np.int64))]
            nodes += [helper.make_node("Slice", ["m", "s1", "send", "sax"], ["m_tail"]),
                      helper.make_node("Concat", ["ones_col", "m_tail"], ["m_first"], axis=1)]
            source = "m_first"
        nodes += [helper.make_node("Unsqueeze", [source, "axes"], ["m4"]),
                  helper.make_node("Cast", ["m4"], ["mf"], to=TensorProto.FLOAT),
                  helper.make_node("Sub", ["one", "mf"], ["inv"]),
                  helper.make_node("Mul", ["inv", "neg"], ["pad1"]),
                  # ORT's Attention takes the bias with the query axis: [B, 1, S, S]
                  helper.make_node("Expand", ["pad1", "full"], ["pad"])]
        inits.append(tensor("full", np.array([B, 1, S, S], np.int64)))
        bias = "pad"
        if mask == "causal":
            tri = np.triu(np.full((S, S), -10000.0, np.float32), k=1)[None, None]
            inits.append(tensor("tri", tri))
            nodes.append(helper.make_node("Add", ["pad", "tri"], ["causal"]))
            bias = "causal"
        attention_inputs += ["", "", bias]
    nodes.append(helper.make_node("Attention", attention_inputs, ["y"], domain="com.microsoft", num_heads=HEADS,
                                  name="attention"))
    return make_model(nodes, inputs, [vinfo("y", TensorProto.FLOAT, [B, S, K])], inits, opset=opset,
                      extra_opsets=[helper.make_opsetid("com.microsoft", 1)])


def _feeds(mask: str, padded: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    feeds = {"x": rng.standard_normal((B, S, K)).astype(np.float32)}
    m = np.ones((B, S), np.int64)
    if padded:
        m[1, 10:] = 0
    if mask == "index":
        feeds["m"] = m.astype(np.int32)
    elif mask == "bias-input":
        feeds["bias"] = np.where(rng.random((B, 1, S, S)) < 0.3, -10000.0, 0.0).astype(np.float32)
    else:
        feeds["m"] = m
    return feeds


def _assert_close(proto, quantized, feeds, what):
    e, a = _run(proto, feeds)["y"], _run(quantized, feeds)["y"]
    cosine, rel = _errors(e, a)
    print(f"{what}: cosine {cosine:.5f}, rel-L2 {rel:.4g}")
    assert cosine >= COSINE and rel < REL, f"{what}: cosine {cosine:.5f}, rel-L2 {rel:.4g}"


@pytest.mark.parametrize("mask", ["padding", "index"])
def test_attention_becomes_qattention_with_its_mask(context, mask):
    """A key-padding mask (as an additive bias made from m, or as mask_index) reaches
    QAttention as mask_index; the mask is honoured (padded keys ignored)."""
    proto = _attention_model(mask)
    quantized, details = _quantize(proto, context)
    ops = _ops(quantized)
    assert ops["QAttention"] == 1 and ops["Attention"] == 0 and ops["MultiHeadAttention"] == 0, ops
    (entry,) = details["quantized"]
    assert entry["as"].startswith("QAttention"), entry
    if mask == "padding":  # the additive mask's arithmetic is gone; m is read as int32
        assert not {"Sub", "Unsqueeze", "Expand"} & set(ops), ops
        node = next(n for n in quantized.graph if n.op_type == "QAttention")
        assert node.attributes["mask_filter_value"].value == -10000.0
    padded, unpadded = _feeds(mask), _feeds(mask, padded=False)
    _assert_close(proto, quantized, padded, f"{mask} mask, padded")
    _assert_close(proto, quantized, unpadded, f"{mask} mask, no padding")
    # the mask matters: the padded float output is far from the unpadded one
    assert _errors(_run(proto, padded)["y"], _run(proto, unpadded)["y"])[1] > 10 * REL


@pytest.mark.parametrize("mask,opset", [("causal", 17), ("weak", 17), ("bias-input", 17), ("bias-input", 12),
                                        ("first-kept", 17)])
def test_other_masks_stay_exact_in_multihead_attention(context, mask, opset):
    """A mask that is not a key-padding mask of one [batch, length] input (positional, too
    weak, given as a float input, or one that always keeps position 0: only a left-padded
    probe tells) is kept as it is: the projection is quantized (DynamicQuantizeMatMul), then
    Split (its sizes an attribute before opset 13) and MultiHeadAttention with the same bias."""
    proto = _attention_model(mask, opset)
    quantized, details = _quantize(proto, context)
    ops = _ops(quantized)
    assert ops["MultiHeadAttention"] == 1 and ops["DynamicQuantizeMatMul"] == 1 and ops["QAttention"] == 0, ops
    (entry,) = details["quantized"]
    expected = {"causal": "causal or other positional", "weak": "large negative constant",
                "bias-input": "not a rank-2 [batch, length] mask", "first-kept": "where 'm' is 0"}[mask]
    assert expected in entry["as"], entry
    _assert_close(proto, quantized, _feeds(mask), f"{mask} mask")
    if mask == "first-kept":  # left padding: where a QAttention reading m would differ
        left = dict(_feeds(mask), m=np.concatenate([np.zeros((B, 4), np.int64), np.ones((B, S - 4), np.int64)], 1))
        _assert_close(proto, quantized, left, "first-kept mask, left padding")


def test_attention_with_a_kv_cache_stays_float(context):
    proto = _attention_model("index")
    proto.graph.input.append(vinfo("past", TensorProto.FLOAT, [2, B, HEADS, 0, K // HEADS]))
    node = proto.graph.node[-1]
    node.input.append("past")
    quantized, details = _quantize(proto, context)
    assert _ops(quantized)["Attention"] == 1
    assert "KV cache" in details["skipped"][0]["reason"], details["skipped"]


@pytest.mark.slow
def test_bert_export_int8_dynamic_quantizes_attention_as_units(torch_export):
    """A TorchScript BERT export (transformers' eager attention, its mask built from
    attention_mask by index arithmetic): --quantize int8-dynamic on ort-cpu fuses attention
    first (O2 alone does not), every layer's attention becomes QAttention reading the mask
    input, and the model verifies; padding is honoured."""
    path = torch_export("bert", {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 8,
                                 "intermediate_size": 128})
    result = gcomp.optimize(path, "O2", quantize="int8-dynamic", speed_gate=False, target="ort-cpu",
                            input_shapes={"input_ids": (2, 16), "attention_mask": (2, 16), "token_type_ids": (2, 16)})
    assert result.verification.passed, result.verification.summary()
    assert "fuse-target" in {p.name for p in result.passes}
    ops = _ops(result.model)
    assert ops["QAttention"] == 2 and ops["Attention"] == 0 and ops["MultiHeadAttention"] == 0, ops
    assert all(q["as"].startswith("QAttention (mask_index from 'attention_mask'")
               for q in result.quantization.quantized if q["op_type"] == "Attention")
    rng = np.random.default_rng(5)
    feeds = {"input_ids": rng.integers(0, 8192, (2, 16)).astype(np.int64),
             "attention_mask": np.ones((2, 16), np.int64), "token_type_ids": np.zeros((2, 16), np.int64)}
    feeds["attention_mask"][1, 9:] = 0
    e = _run(onnx.load(path), feeds)["last_hidden_state"]
    a = _run(result.model, feeds)["last_hidden_state"]
    cosine, rel = _errors(e, a)
    print(f"bert padded: cosine {cosine:.5f}, rel-L2 {rel:.4g}")
    assert cosine >= COSINE, cosine
    # the mask is honoured: on the padded row, the quantized output is far closer to the float
    # output with padding than the float output without padding is
    unpadded = dict(feeds, attention_mask=np.ones((2, 16), np.int64))
    mask_effect = _errors(e[1], _run(onnx.load(path), unpadded)["last_hidden_state"][1])[1]
    quant_error = _errors(e[1], a[1])[1]
    assert quant_error < 0.2 * mask_effect, (quant_error, mask_effect)


def test_portable_target_gets_no_target_fusion():
    """Only int8-dynamic on ort-* targets runs the target's fusions first."""
    from gcomp import quantize_plan

    steps = quantize_plan.fusion_steps(quantize_plan.Quantize("int8-dynamic", None, target="portable"), "O2",
                                       runtime.pass_context())
    assert steps == []
    steps = quantize_plan.fusion_steps(quantize_plan.Quantize("int4", None, target="ort-cpu"), "O2",
                                       runtime.pass_context())
    assert steps == []
    steps = quantize_plan.fusion_steps(quantize_plan.Quantize("int8-dynamic", None, target="ort-cpu"), "O2",
                                       runtime.pass_context())
    assert [name for name, _ in steps[0][0]][2:4] == ["fuse-target", "fuse"]
    assert quantize_plan.fusion_steps(quantize_plan.Quantize("int8-dynamic", None, target="ort-cpu"), "O3",
                                      runtime.pass_context()) == []


def test_dry_run_shows_the_fusion_int8_dynamic_runs_first(tmp_path):
    """``--dry-run`` lists the target's fusions before quantize-dynamic on ort-cpu (O2 has
    none), and none for int4 or with --target portable."""
    from tests.test_cli import DEFAULT, gcomp as run_gcomp

    def plan(*args):
        proc = run_gcomp("optimize", DEFAULT, "-o", tmp_path / "x.onnx", "--dry-run", *args)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    text = plan("--quantize", "int8-dynamic")
    assert "fuse-target (target=ort-cpu)" in text
    assert text.index("fuse-target (target=ort-cpu)") < text.index("quantize-dynamic (target=ort-cpu)")
    assert "fuse-target" not in plan("--quantize", "int4")
    assert "fuse-target" not in plan("--quantize", "int8-dynamic", "--target", "portable")


def test_static_shapes_with_int8_dynamic(tmp_path):
    """--static with --quantize: the quantized model (QAttention included) has every dim of
    every value fixed, and verifies."""
    from tests.test_cli import DEFAULT, gcomp as run_gcomp

    out = tmp_path / "static.onnx"
    proc = run_gcomp("optimize", DEFAULT, "-o", out, "--static", "--input-shape", "input_ids=1,32",
                     "--quantize", "int8-dynamic", "--no-speed-gate")
    assert proc.returncode == 0, proc.stderr
    proto = onnx.load(out)
    assert "QAttention" in {n.op_type for n in proto.graph.node}
    values = [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]
    symbolic = [v.name for v in values if any(not d.HasField("dim_value") for d in v.type.tensor_type.shape.dim)]
    assert len(values) > len(proto.graph.node) and not symbolic, symbolic  # every node output typed, all static
    assert [d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim] == [1, 32, 128]


def test_fusion_first_only_where_it_serves(tmp_path):
    """No target fusion at O0 (validate only) or when op_types leaves Attention out; the
    pipeline's own options reach the fusion's passes; the finish (sort) follows it."""
    from gcomp import quantize_plan

    quant = quantize_plan.Quantize("int8-dynamic", None, target="ort-cpu")
    assert quantize_plan.fusion_steps(quant, "O0", runtime.pass_context()) == []
    no_attention = quantize_plan.Quantize("int8-dynamic", None, target="ort-cpu", options={"op_types": ("MatMul",)})
    assert quantize_plan.fusion_steps(no_attention, "O2", runtime.pass_context()) == []
    steps = quantize_plan.fusion_steps(quant, "O1", runtime.pass_context(), {"max_fold_bytes": 1234})
    fold = dict(steps[0][0])["fold-constants"]
    assert 1234 in vars(fold).values(), vars(fold)
    assert [name for name, _ in steps[-1][0]] == ["forget-inferred-shapes", "topological-sort"]


def test_exclude_nodes_naming_no_candidate_is_an_error(tmp_path):
    """A name that is no candidate (here: a MatMul the attention fusion took) is one line."""
    from gcomp.errors import OptionError
    from tests.test_cli import DEFAULT

    with pytest.raises(OptionError, match="exclude_nodes: no quantization candidate named 'no_such_node'"):
        gcomp.optimize(DEFAULT, "O2", quantize="int8-dynamic", speed_gate=False, exclude_nodes=("no_such_node",))


def test_precision_and_quantize_are_refused_from_python_too():
    from gcomp.errors import OptionError
    from tests.test_cli import DEFAULT

    with pytest.raises(OptionError, match="cannot be combined"):
        gcomp.optimize(DEFAULT, "O2", quantize="int8-dynamic", precision="fp16")


def test_an_attention_node_is_ranked_by_its_own_error():
    """The accuracy budget ranks an Attention by its own output's error (its mask fed as an
    input), on the scale of the MatMuls' errors, not by a whole-model attempt; the per-node
    speed gate leaves it to the whole-model gate."""
    from gcomp.quantize_regions import local_errors, slower_nodes
    from gcomp.verify.metrics import Budget

    model = ir.serde.deserialize_model(_attention_model("padding"))
    errors = local_errors(model, ["attention"], _feeds("padding"), Budget(), pass_name="quantize-dynamic",
                          options={}, target="ort-cpu")
    assert set(errors) == {"attention"} and 0 < errors["attention"] < 0.01, errors  # 1 - cos of one int8 projection
    assert slower_nodes(model, ["attention"], _feeds("padding"), pass_name="quantize-dynamic", options={},
                        target="ort-cpu") == []
