"""RMSNorm -> ONNX Runtime's SimplifiedLayerNormalization, and residual Add + it ->
com.microsoft.SkipSimplifiedLayerNormalization (ort-cuda only: not faster on ORT's CPU)."""

from __future__ import annotations

import collections
import subprocess
import sys
import types

import numpy as np
import onnx
import pytest
from onnx import helper

from tests.conftest import assert_same_outputs, make_model, tensor, vinfo
from tests.fusion._util import fuse, op_counts

SHAPE = (2, 5, 16)
SLN, SKIP = "SimplifiedLayerNormalization", "com.microsoft::SkipSimplifiedLayerNormalization"


def _rms(*, form="torchscript", scaled=True, residual=False, dtype=np.float32, opset=None, axes=(-1,),
         eps_input=False, expose_ms=False):
    """An RMSNorm as the exporters write it: TorchScript (opset 17, axes attribute,
    x * (1 / sqrt(.)) with Pow) or dynamo (opset 18, axes input, x * Reciprocal(sqrt(.))).
    ``residual``: x is a + b, and the residual stream reads that sum again after the norm."""
    opset = opset or (17 if form == "torchscript" else 18)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [tensor("two", np.array(2, dtype)), tensor("one", np.array(1, dtype)),
             tensor("g", np.linspace(0.5, 1.5, 16).astype(dtype)), tensor("axes", np.array(axes, np.int64))]
    inputs = [vinfo("a", elem, SHAPE)]
    nodes = []
    if residual:
        inputs.append(vinfo("b", elem, SHAPE))
        nodes.append(helper.make_node("Add", ["a", "b"], ["x"]))
    else:
        nodes.append(helper.make_node("Identity", ["a"], ["x"]))
    if eps_input:
        inputs.append(vinfo("eps", elem, []))
    else:
        inits.append(tensor("eps", np.array(1e-6, dtype)))
    nodes.append(helper.make_node("Pow", ["x", "two"], ["sq"]))
    if opset >= 18:
        nodes.append(helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1))
    else:
        nodes.append(helper.make_node("ReduceMean", ["sq"], ["ms"], axes=list(axes), keepdims=1))
    nodes += [helper.make_node("Add", ["ms", "eps"], ["mse"]), helper.make_node("Sqrt", ["mse"], ["r"])]
    if form == "torchscript":
        nodes.append(helper.make_node("Div", ["one", "r"], ["inv"]))
    else:
        nodes.append(helper.make_node("Reciprocal", ["r"], ["inv"]))
    nodes.append(helper.make_node("Mul", ["x", "inv"], ["n"]))
    nodes.append(helper.make_node("Mul", ["g", "n"], ["y0"]) if scaled else helper.make_node("Identity", ["n"], ["y0"]))
    if residual:  # the next layer's residual Add reads the sum
        nodes.append(helper.make_node("Add", ["y0", "x"], ["y"]))
    else:
        nodes.append(helper.make_node("Identity", ["y0"], ["y"]))
    outputs = [vinfo("y", elem, SHAPE)]
    if expose_ms:
        outputs.append(helper.make_tensor_value_info("ms", elem, None))
    return make_model(nodes, inputs, outputs, inits, opset=opset)


def _feeds(rng, model, dtype=np.float32):
    feeds = {}
    for i in model.graph.input:
        shape = [d.dim_value for d in i.type.tensor_type.shape.dim]
        feeds[i.name] = (np.array(1e-6) if i.name == "eps" else rng.standard_normal(shape)).astype(dtype)
    return feeds


def _fuse(rng, target="ort-cpu", dtype=np.float32, explain=False, **case):
    model = _rms(dtype=dtype, **case)
    tol = 2e-3 if dtype == np.float16 else 1e-5
    return fuse(model, _feeds(rng, model, dtype), target=target, family="ort", rtol=tol, atol=tol, explain=explain)


@pytest.mark.parametrize("form", ["torchscript", "dynamo"])
@pytest.mark.parametrize("scaled", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_rms_norm_becomes_simplified_layer_norm(rng, form, scaled, dtype):
    model, result = _fuse(rng, form=form, scaled=scaled, dtype=dtype)
    counts = op_counts(model)
    assert counts[SLN] == 1 and "ReduceMean" not in counts and "Sqrt" not in counts, (counts, result.details)
    node = next(n for n in model.graph if n.op_type == SLN)
    assert node.domain == "" and node.attributes["axis"].as_int() == 2
    assert node.attributes["epsilon"].as_float() == pytest.approx(1e-6, rel=0.02)  # fp16 rounds it


@pytest.mark.parametrize("form", ["torchscript", "dynamo"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_residual_add_and_norm_become_skip_form_on_ort_cuda(rng, form, dtype):
    model, result = _fuse(rng, target="ort-cuda", form=form, dtype=dtype, residual=True)
    counts = op_counts(model)
    assert counts[SKIP] == 1 and SLN not in counts, (counts, result.details)
    # The residual stream's Add now reads the fused node's 4th output, the sum.
    skip = next(n for n in model.graph if n.op_type == "SkipSimplifiedLayerNormalization")
    assert counts["Add"] == 1 and skip.outputs[3].uses(), counts


def test_skip_form_stays_off_for_ort_cpu_with_the_measured_reason(rng):
    model, result = _fuse(rng, target="ort-cpu", residual=True, explain=True)
    counts = op_counts(model)
    assert counts[SLN] == 1 and SKIP not in counts and counts["Add"] == 2, counts
    assert "no faster" in result.details["rules"]["ort-skip-simplified-layer-norm"]["not_run"]


@pytest.mark.parametrize("case", [{"axes": (1,)}, {"eps_input": True}, {"expose_ms": True}])
def test_must_not_fire(rng, case):
    """A non-trailing axis, an epsilon that is an input, a statistic read elsewhere."""
    model, _ = _fuse(rng, target="ort-cuda", residual=True, **case)
    counts = op_counts(model)
    assert SLN not in counts and SKIP not in counts and counts["ReduceMean"] == 1, counts


def test_opset_23_leaves_the_norm_to_rms_normalization(rng):
    """From opset 23 the standard RMSNormalization (same ORT kernel) is emitted instead, and
    the skip form takes it on ort-cuda."""
    import onnx_ir as ir

    from gcomp import optimize

    model, result = _fuse(rng, form="dynamo", opset=23, explain=True)
    assert SLN not in op_counts(model)
    assert any("opset >= 23" in m for m in result.details["rules"]["ort-simplified-layer-norm"]["near_misses"])
    for target, want in (("ort-cpu", "RMSNormalization"), ("ort-cuda", SKIP)):
        done = optimize(ir.serde.deserialize_model(_rms(form="dynamo", residual=True)), "O3", target=target,
                        target_opset=23)
        assert done.verification.passed, done.verification.summary()
        counts = op_counts(done.model)
        assert counts[want] == 1 and SLN not in counts, (target, counts)


def test_optimized_model_is_read_back_by_gcomp(tmp_path):
    """ONNX's checker knows no SimplifiedLayerNormalization in the default domain; gcomp
    registers ORT's schema, so it reads (and optimizes again) what it wrote, and infers
    shapes through the op."""
    src, out, again = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "o2.onnx"
    onnx.save(_rms(residual=True), src)  # the norm feeds an Add, not a graph output
    gcomp = [sys.executable, "-m", "gcomp"]
    for a, b in ((src, out), (out, again)):
        done = subprocess.run([*gcomp, "optimize", str(a), "-o", str(b), "-O3", "--target", "ort-cpu"],
                              capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
    written = onnx.load(again)
    assert [n.op_type for n in written.graph.node].count(SLN) == 1

    from gcomp import io
    from gcomp.passes.shapes import InferShapes

    del written.graph.value_info[:]  # shapes only from inference
    model = io.from_proto(written)
    InferShapes()(model)
    norm = next(n for n in model.graph if n.op_type == SLN)
    assert norm.outputs[0].shape is not None and norm.outputs[0].shape[2] == 16


# --------------------------------------------------------------------------- decoders


@pytest.fixture(scope="module")
def llama_exports(tmp_path_factory):
    pytest.importorskip("torch", reason="needs torch==2.13.0 (the test extra installs it)")
    pytest.importorskip("transformers", reason="needs transformers (the test extra installs it)")
    from models import decoder

    root = tmp_path_factory.mktemp("llama_norms")
    return {dynamo: decoder.export("llama", root, cache=True, dynamo=dynamo, check=False) for dynamo in (False, True)}


def _decoder_feeds():
    from models import decoder

    config = types.SimpleNamespace(**decoder.TINY)
    rng = np.random.default_rng(3)
    head_dim = config.hidden_size // config.num_attention_heads
    cache = {name: rng.standard_normal((1, config.num_key_value_heads, 3, head_dim)).astype(np.float32)
             for name in decoder.cache_names(config)}
    return decoder.step_feeds([[5, 7]], config, cache)


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("target,plain,skip", [("ort-cpu", 5, 0), ("ort-cuda", 1, 4)])
def test_every_llama_norm_fuses(llama_exports, dynamo, target, plain, skip):
    """2 layers x 2 norms + the final one: all SimplifiedLayerNormalization on ort-cpu; on
    ort-cuda the first (it reads the embedding, no residual Add) stays plain and the other
    four take their residual Add."""
    import gcomp

    path = llama_exports[dynamo]
    result = gcomp.optimize(path, "O3", target=target)
    assert result.verification.passed, result.verification.summary()
    counts = collections.Counter(n.op_type for n in result.model.graph)
    assert (counts[SLN], counts["SkipSimplifiedLayerNormalization"]) == (plain, skip), counts
    assert "ReduceMean" not in counts and "Pow" not in counts, counts
    assert_same_outputs(onnx.load(path), result.model, _decoder_feeds(), rtol=1e-4, atol=1e-4)


def test_a_layer_norms_tail_is_left_to_the_layer_norm_fusions():
    """(x - mean(x)) / sqrt(mean((x - mean)^2) + eps) * g is a LayerNorm, whose tail is an RMS
    norm of x - mean: O3 runs the target's fusions first, and taking the tail here left
    LayerNormalization (and SkipLayerNormalization on ort-cuda) unfused."""
    inits = [tensor("two", np.array(2, np.float32)), tensor("eps", np.array(1e-5, np.float32)),
             tensor("g", np.linspace(0.5, 1.5, 16).astype(np.float32))]
    nodes = [helper.make_node("ReduceMean", ["x"], ["mu"], axes=[-1]), helper.make_node("Sub", ["x", "mu"], ["d"]),
             helper.make_node("Pow", ["d", "two"], ["d2"]), helper.make_node("ReduceMean", ["d2"], ["var"], axes=[-1]),
             helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
             helper.make_node("Div", ["d", "sd"], ["n"]), helper.make_node("Mul", ["n", "g"], ["y"])]
    proto = make_model(nodes, [vinfo("x", onnx.TensorProto.FLOAT, SHAPE)], [vinfo("y", onnx.TensorProto.FLOAT, SHAPE)],
                       inits)
    feeds = {"x": np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)}
    model, result = fuse(proto, feeds, target="ort-cpu", family="ort", explain=True)
    assert SLN not in op_counts(model)
    misses = result.details["rules"]["ort-simplified-layer-norm"].get("near_misses", [])
    assert any("LayerNorm's tail" in m for m in misses), misses
    import gcomp

    fused = gcomp.optimize(proto.SerializeToString(), "O3", target="ort-cpu")
    assert fused.after.op_types.get("LayerNormalization") == 1 and SLN not in fused.after.op_types
