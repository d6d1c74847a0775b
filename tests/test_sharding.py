"""Sharding: plans, propagation, IR v11 annotations, per-rank partitions, simulated runs.

Numerical proof: every sharded run is compared with the unsharded model on ONNX Runtime
(optimizations off) on the same inputs, within 1e-4.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from gcomp.passes.sharding import (
    ShardingError,
    annotate,
    check_annotations,
    parse_mesh,
    partition,
    plan,
    read_annotations,
    summarize,
)
from gcomp.passes.sharding.partition import DOMAIN
from onnx import helper

from gcomp import io
from gcomp.distributed import runner
from gcomp.errors import OptionError
from models.transformer import build
from tests.conftest import make_model, tensor, vinfo

LAYERS, HIDDEN, HEADS, FFN = 2, 64, 4, 256
MESHES = ["tp=2", "tp=4", "dp=2", "dp=2,tp=2"]


def _builder():
    return build(layers=LAYERS, hidden=HIDDEN, heads=HEADS, ffn=FFN, vocab=100)


def _prepared(mesh, model=None, batch=2, seq=8):
    feeds = {"input_ids": np.random.default_rng(0).integers(0, 100, (batch, seq)).astype(np.int64)}
    return runner.prepare(model or _builder(), mesh, feeds), feeds


def test_parse_mesh_orders_axes_and_refuses_garbage():
    mesh = parse_mesh("tp=2,dp=2")
    assert str(mesh) == "dp=2,tp=2" and mesh.size == 4
    assert mesh.coords(3) == {"dp": 1, "tp": 1}
    assert mesh.groups("tp") == [[0, 1], [2, 3]] and mesh.groups("dp") == [[0, 2], [1, 3]]
    for bad in ("tp", "pp=2", "tp=0", "tp=2,tp=2", ""):
        with pytest.raises(OptionError):
            parse_mesh(bad)


@pytest.mark.parametrize("mesh", ["tp=2", "tp=4"])
def test_megatron_plan_two_all_reduces_per_layer(mesh):
    prepared, _ = _prepared(mesh)
    s = summarize(prepared.model, prepared.plan)
    assert s["all_reduces"] == 2 * LAYERS
    assert s["all_gathers"] == 0
    roles = prepared.plan.roles
    for i in range(LAYERS):
        p = f"encoder.layer.{i}"
        for w in ("query", "key", "value"):
            assert "column" in roles[f"{p}.attention.self.{w}.weight"]
        assert roles[f"{p}.attention.output.dense.weight"] == "attention output (row)"
        assert roles[f"{p}.intermediate.dense.weight"] == "mlp in (column)"
        assert roles[f"{p}.output.dense.weight"] == "mlp out (row)"


@pytest.mark.parametrize("mesh", MESHES)
def test_simulated_run_equals_unsharded(mesh):
    result = runner.run(_builder(), mesh, simulate=True, check=True, input_shapes={"input_ids": (2, 8)})
    assert result.max_abs_error <= 1e-4
    assert result.outputs["last_hidden_state"].shape == (2, 8, HIDDEN)
    dp, tp = parse_mesh(mesh).axis_size("dp"), parse_mesh(mesh).axis_size("tp")
    # tp: 2 all-reduces per layer; dp: one all-gather of the output
    assert result.collectives == (2 * LAYERS if tp > 1 else 0) + (1 if dp > 1 else 0)


@pytest.mark.parametrize("mesh", ["tp=2", "tp=4", "dp=2,tp=2"])
def test_rank_graphs_hold_their_share_and_explicit_collectives(mesh):
    prepared, _ = _prepared(mesh)
    m = parse_mesh(mesh)
    tp = m.axis_size("tp")
    s = summarize(prepared.model, prepared.plan)
    ranks = partition(prepared.model, prepared.plan)
    assert len(ranks) == m.size
    for r, rm in enumerate(ranks):
        weights = sum(v.const_value.nbytes for v in rm.graph.initializers.values() if v.const_value.size > 8)
        assert weights <= s["sharded_parameter_bytes"] / tp + s["replicated_parameter_bytes"]
        reduces = [n for n in rm.graph if n.domain == DOMAIN and n.op_type == "AllReduce"]
        assert len(reduces) == 2 * LAYERS
        # heads split: every 4-D reshape target holds heads / tp
        targets = [n.inputs[1].const_value.numpy().tolist() for n in rm.graph if n.op_type == "Reshape"]
        four_d = [t for t in targets if len(t) == 4]
        assert four_d and all(t[2] == HEADS // tp for t in four_d)
        assert rm.metadata_props["gcomp.rank"] == str(r)


@pytest.mark.parametrize("mesh", ["tp=2", "dp=2,tp=2"])
def test_vocab_parallel_embedding_where_it_pays(mesh):
    """A 4096-row table is most of the weights: split by rows, one more all-reduce, still equal."""
    model = build(layers=1, hidden=64, heads=4, ffn=256, vocab=4096)
    prepared, feeds = _prepared(mesh, model=model)
    assert prepared.plan.roles["embeddings.word_embeddings.weight"] == "embedding (vocab)"
    s = summarize(prepared.model, prepared.plan)
    assert s["row_parallel_all_reduces"] == 2 and s["all_reduces"] == 3
    assert next(c["reason"] for c in s["collectives"] if c["kind"] == "AllReduce") == "vocab-parallel embedding"
    outs, _ = runner.simulate(prepared, feeds)
    ref = runner.reference_outputs(build(layers=1, hidden=64, heads=4, ffn=256, vocab=4096), feeds)
    assert runner.max_abs_error(outs, ref) <= 1e-4
    rank1 = partition(prepared.model, prepared.plan)[prepared.mesh.rank_of({"tp": 1})]
    table = next(v for v in rank1.graph.initializers.values() if v.name == "embeddings.word_embeddings.weight")
    assert table.const_value.shape[0] == 4096 // 2


def test_heads_not_divisible_is_refused_naming_the_tensor():
    with pytest.raises(ShardingError, match=r"tensor '.*': 4 attention heads are not divisible by tp=8"):
        _prepared("tp=8")


def test_batch_not_divisible_by_dp_is_refused():
    with pytest.raises(Exception, match="not divisible by dp=2"):
        runner.run(_builder(), "dp=2", simulate=True, input_shapes={"input_ids": (3, 8)})


def test_override_replicates_a_weight():
    prepared, _ = _prepared("tp=2")
    model = prepared.model
    name = "encoder.layer.0.intermediate.dense.weight"
    p = plan(model, "tp=2", overrides={name: "replicated", "encoder.layer.0.output.dense.weight": "replicated"})
    assert summarize(model, p)["all_reduces"] == 2 * LAYERS - 1
    with pytest.raises(ShardingError, match="tensor 'nope'"):
        plan(model, "tp=2", overrides={"nope": "0:tp"})
    small = ir.serde.deserialize_model(_mlp_softmax_model())
    with pytest.raises(ShardingError, match="tensor 'W1': axis 0 of size 8 is not divisible by tp=3"):
        plan(small, "tp=3", overrides={"W1": "0:tp"})
    with pytest.raises(ShardingError, match="tensor 'W1': axis 0 split over 'dp', not an axis of mesh tp=2"):
        plan(small, "tp=2", overrides={"W1": "0:dp"})


def _mlp_softmax_model():
    """An MLP x @ W1 + B1 -> Relu -> @ W2 -> Softmax, and a branch x @ W3 -> Softmax."""
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((8, 16)).astype(np.float32)
    w2 = rng.standard_normal((16, 8)).astype(np.float32)
    w3 = rng.standard_normal((8, 6)).astype(np.float32)
    b1 = rng.standard_normal(16).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("Add", ["h", "B1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["y0"]),
        helper.make_node("Softmax", ["y0"], ["y"], axis=-1),
        helper.make_node("MatMul", ["x", "W3"], ["z0"]),
        helper.make_node("Softmax", ["z0"], ["z"], axis=-1),
    ]
    outputs = [vinfo("y", shape=(4, 8)), vinfo("z", shape=(4, 6))]
    inits = [tensor("W1", w1), tensor("W2", w2), tensor("W3", w3), tensor("B1", b1)]
    return make_model(nodes, [vinfo("x", shape=(4, 8))], outputs, inits)


def test_propagation_reshards_only_where_a_rule_demands():
    model = ir.serde.deserialize_model(_mlp_softmax_model())
    feeds = {"x": np.random.default_rng(2).standard_normal((4, 8)).astype(np.float32)}
    prepared = runner.prepare(model, "tp=2", feeds, overrides={"W3": "1:tp"})
    assert prepared.plan.roles["W1"] == "mlp in (column)" and prepared.plan.roles["W2"] == "mlp out (row)"
    s = summarize(prepared.model, prepared.plan)
    kinds = sorted((c["kind"], c["tensor"]) for c in s["collectives"])
    # one all-reduce after the row-parallel MatMul (the bias B1 is sliced, not gathered);
    # the column-split z0 is gathered because Softmax needs its whole axis
    assert kinds == [("AllGather", "z0"), ("AllReduce", "y0")]
    outs, calls = runner.simulate(prepared, feeds)
    ref = runner.reference_outputs(ir.serde.deserialize_model(_mlp_softmax_model()), feeds)
    assert runner.max_abs_error(outs, ref) <= 1e-5
    assert sorted(c[0] for c in calls) == ["AllGather", "AllReduce"]


def test_annotations_survive_save_and_load(tmp_path):
    prepared, _ = _prepared("dp=2,tp=2")
    model = prepared.model
    count = annotate(model, prepared.plan)
    assert count > 0
    path = tmp_path / "annotated.onnx"
    io.save(model, path)
    proto = onnx.load(str(path))
    assert proto.ir_version >= 11
    assert [c.name for c in proto.configuration] == ["gcomp:dp=2,tp=2"] and proto.configuration[0].num_devices == 4
    specs = {s.tensor_name: s for n in proto.graph.node for dc in n.device_configurations for s in dc.sharding_spec}
    qkv = specs["encoder.layer.0.attention.self.query.weight"]
    assert qkv.sharded_dim[0].axis == 1 and qkv.sharded_dim[0].simple_sharding[0].num_shards == 2
    # a tp shard is replicated over dp: two device groups of two ranks each
    assert list(qkv.device) == [-1, -2]
    assert {tuple(e.value) for e in qkv.index_to_device_group_map} == {(0, 2), (1, 3)}
    back = read_annotations(io.load(path))
    assert back is not None
    mesh, seeds = back
    assert str(mesh) == "dp=2,tp=2"
    for name, lay in prepared.plan.seeds.items():
        assert seeds[name] == lay, name


def test_annotated_model_runs_from_its_own_annotations(tmp_path):
    prepared, feeds = _prepared("tp=2")
    annotate(prepared.model, prepared.plan)
    path = tmp_path / "a.onnx"
    io.save(prepared.model, path)
    result = runner.run(path, None, simulate=True, check=True, inputs=feeds)
    assert result.mesh == "tp=2" and result.max_abs_error <= 1e-4 and result.collectives == 2 * LAYERS


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda s: setattr(s.sharded_dim[0].simple_sharding[0], "num_shards", 3), "not divisible by 3 shards"),
        (lambda s: setattr(s.sharded_dim[0], "axis", 5), "sharded axis 5 out of range"),
        (lambda s: s.device.append(7), "3 devices listed for 2 shards"),
        (lambda s: s.device.__setitem__(0, 9), "device 9 out of range"),
    ],
)
def test_checker_rejects_a_corrupt_spec_naming_the_tensor(tmp_path, corrupt, message):
    prepared, _ = _prepared("tp=2")
    annotate(prepared.model, prepared.plan)
    proto = ir.serde.serialize_model(prepared.model)
    target = "encoder.layer.0.attention.self.query.weight"
    spec = next(s for n in proto.graph.node for dc in n.device_configurations for s in dc.sharding_spec
                if s.tensor_name == target)
    corrupt(spec)
    path = tmp_path / "bad.onnx"
    onnx.save(proto, str(path))
    model = io.load(path)
    with pytest.raises(ShardingError, match=f"tensor '{target}'.*{message}"):
        check_annotations(model)


def test_unplanned_model_runs_replicated_and_equal():
    """No MLP/attention: nothing is split by tp, the result is still exact."""
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    model = ir.serde.deserialize_model(make_model(nodes, [vinfo("x", shape=(2, 4))], [vinfo("y", shape=(2, 4))]))
    result = runner.run(model, "tp=2", simulate=True, check=True)
    assert result.max_abs_error == 0.0 and result.collectives == 0


def test_model_proto_round_trip_keeps_gcomp_domain(tmp_path):
    prepared, _ = _prepared("tp=2")
    rank0 = partition(prepared.model, prepared.plan)[0]
    path = tmp_path / "rank0.onnx"
    io.save(rank0, path)
    proto = onnx.load(str(path))
    assert any(o.domain == DOMAIN for o in proto.opset_import)
    assert sum(1 for n in proto.graph.node if n.domain == DOMAIN) == 2 * LAYERS




def test_standard_specs_alone_give_the_weight_seeds(tmp_path):
    """Another tool's IR v11 specs (no gcomp metadata) are enough to re-plan the weights."""
    prepared, _ = _prepared("tp=2")
    annotate(prepared.model, prepared.plan)
    for key in ("gcomp.sharding.seeds", "gcomp.sharding.inputs"):
        del prepared.model.metadata_props[key]
    path = tmp_path / "specs_only.onnx"
    io.save(prepared.model, path)
    mesh, seeds = read_annotations(io.load(path))
    weights = {k: v for k, v in prepared.plan.seeds.items() if k in prepared.model.graph.initializers}
    assert str(mesh) == "tp=2" and weights and all(seeds[k] == v for k, v in weights.items())


def test_shard_pass_in_a_pipeline_on_a_symbolic_model(tmp_path):
    """The registered pass plans on a folded copy and annotates the model as it is."""
    import gcomp

    result = gcomp.optimize(_builder(), "O1,shard", shard="dp=2,tp=2")
    assert result.verification.passed  # annotations change no numbers
    model = result.model
    assert [c.name for c in model.device_configurations] == ["gcomp:dp=2,tp=2"]
    assert sum(len(n.device_configurations) for n in model.graph) >= 6 * LAYERS
    path = tmp_path / "annotated.onnx"
    io.save(model, path)
    run = runner.run(path, None, simulate=True, check=True)
    assert run.mesh == "dp=2,tp=2" and run.max_abs_error <= 1e-4
    assert run.collectives == 2 * LAYERS + 1  # + the dp all-gather of the output


def test_lm_head_split_by_vocabulary_where_it_pays():
    """x -> LayerNorm -> MatMul(W [64, 4096]) -> logits: column-split, one all-gather of the logits."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((64, 4096)) * 0.05).astype(np.float32)
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["n"], axis=-1),
        helper.make_node("MatMul", ["n", "W"], ["logits"]),
    ]
    inits = [tensor("W", w), tensor("g", np.ones(64, np.float32)), tensor("b", np.zeros(64, np.float32))]
    proto = make_model(nodes, [vinfo("x", shape=(2, 8, 64))], [vinfo("logits", shape=(2, 8, 4096))], inits)
    feeds = {"x": rng.standard_normal((2, 8, 64)).astype(np.float32)}
    prepared = runner.prepare(ir.serde.deserialize_model(proto), "tp=2", feeds)
    assert prepared.plan.roles["W"] == "lm head (column)"
    s = summarize(prepared.model, prepared.plan)
    assert [(c["kind"], c["reason"]) for c in s["collectives"]] == [("AllGather", "graph output")]
    assert s["parameter_bytes_per_rank"] <= w.nbytes // 2 + 2 * 64 * 4
    outs, _ = runner.simulate(prepared, feeds)
    ref = runner.reference_outputs(ir.serde.deserialize_model(proto), feeds)
    assert runner.max_abs_error(outs, ref) <= 1e-5


@pytest.mark.parametrize("lead", [(2, 4), (8,)])
def test_batched_transpose_through_a_merged_batch_becomes_one_transpose(lead):
    """torch.export writes K^T as Reshape([b*h, s, d]) -> Transpose -> Reshape([b, h, d, s]):
    canonicalized to one 4-D Transpose (its output keeps its name), bit-identical; a
    Transpose that moves the merged axis is left alone."""
    from gcomp.passes.sharding.canonical import canonicalize
    from onnx_ir.passes.common import ShapeInferencePass

    from tests.conftest import ort_run

    x = np.random.default_rng(0).standard_normal((2, 4, 8, 16)).astype(np.float32)

    def model(perm, out_shape):
        nodes = [helper.make_node("Reshape", ["x", "s1"], ["r1"]), helper.make_node("Transpose", ["r1"], ["t"], perm=perm),
                 helper.make_node("Reshape", ["t", "s2"], ["y"])]
        inits = [tensor("s1", np.array([-1, 8, 16], np.int64)), tensor("s2", np.array(out_shape, np.int64))]
        return make_model(nodes, [vinfo("x", shape=(2, 4, 8, 16))], [vinfo("y", shape=tuple(out_shape))], inits)

    proto = model([0, 2, 1], [*lead, 16, 8])
    m = ShapeInferencePass()(ir.serde.deserialize_model(proto)).model
    assert canonicalize(m) == 1
    assert [n.op_type for n in m.graph] == (["Transpose"] if lead == (2, 4) else ["Reshape", "Transpose"])
    assert [o.name for o in m.graph.outputs] == ["y"]
    assert np.array_equal(ort_run(m, {"x": x})["y"], ort_run(ir.serde.deserialize_model(proto), {"x": x})["y"])
    moved = ShapeInferencePass()(ir.serde.deserialize_model(model([1, 0, 2], [8, 8, 16]))).model
    assert canonicalize(moved) == 0


def _attention_model(variant="plain", B=2, S=8, E=32, H=4):
    """x -> Q/K/V projections -> heads -> softmax attention -> merge -> output projection + x.
    ``d_major``: features laid out [head_dim, heads] (a column split cuts the head size);
    ``two_q``: Q is the sum of two projections."""
    D = E // H
    rng = np.random.default_rng(4)
    names = ["Wq", "Wk", "Wv", "Wo"] + (["Wq2"] if variant == "two_q" else [])
    inits = [tensor(n, (rng.standard_normal((E, E)) * 0.2).astype(np.float32)) for n in names]
    split, to_heads, back = ([B, S, D, H], [0, 3, 1, 2], [0, 2, 3, 1]) if variant == "d_major" else \
        ([B, S, H, D], [0, 2, 1, 3], [0, 2, 1, 3])
    inits += [tensor("split", np.array(split, np.int64)), tensor("merge", np.array([B, S, E], np.int64)),
              tensor("scale", np.array(np.sqrt(D), np.float32))]
    nodes = [helper.make_node("MatMul", ["x", f"W{r}"], [f"{r}0"]) for r in "qkv"]
    if variant == "two_q":
        nodes += [helper.make_node("MatMul", ["x", "Wq2"], ["q1"]), helper.make_node("Add", ["q0", "q1"], ["q2"])]
    for r in "qkv":
        src = "q2" if r == "q" and variant == "two_q" else f"{r}0"
        nodes += [helper.make_node("Reshape", [src, "split"], [f"{r}r"]),
                  helper.make_node("Transpose", [f"{r}r"], [f"{r}h"], perm=to_heads)]
    nodes += [helper.make_node("Transpose", ["kh"], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["qh", "kt"], ["s0"]), helper.make_node("Div", ["s0", "scale"], ["s"]),
              helper.make_node("Softmax", ["s"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "vh"], ["c"]),
              helper.make_node("Transpose", ["c"], ["ct"], perm=back), helper.make_node("Reshape", ["ct", "merge"], ["cm"]),
              helper.make_node("MatMul", ["cm", "Wo"], ["o"]), helper.make_node("Add", ["o", "x"], ["y"])]
    return make_model(nodes, [vinfo("x", shape=(B, S, E))], [vinfo("y", shape=(B, S, E))], inits)


@pytest.mark.parametrize(("variant", "reason"), [
    ("plain", None),
    ("two_q", "the query is computed from several weight projections ('Wq', 'Wq2')"),
    ("d_major", ("the split is undone inside it: Softmax 'p' needs 's' all-reduced (the split axis is contracted "
                 "before the block's last projection)")),
])
def test_an_attention_that_cannot_be_split_is_kept_whole_and_named(variant, reason):
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 8, 32)).astype(np.float32)}
    prepared = runner.prepare(ir.serde.deserialize_model(_attention_model(variant)), "tp=2", feeds)
    s = summarize(prepared.model, prepared.plan)
    if reason is None:
        assert s["unplanned"] == [] and s["row_parallel_all_reduces"] == 1
    else:
        assert s["unplanned"] == [{"layer": "attention 'Softmax -> p'", "reason": reason}]
        assert s["all_reduces"] == 0 and s["sharded_parameter_bytes"] == 0
    outs, _ = runner.simulate(prepared, feeds, threads=1)
    ref = runner.reference_outputs(ir.serde.deserialize_model(_attention_model(variant)), feeds)
    assert runner.max_abs_error(outs, ref) <= 1e-5


def test_gcomp_shard_names_the_layer_it_leaves_whole(tmp_path):
    """The summary's line (--json lists the same entries: summarize's ``unplanned``, above)."""
    import subprocess
    import sys

    path = tmp_path / "two_q.onnx"
    onnx.save(_attention_model("two_q"), path)
    cmd = [sys.executable, "-m", "gcomp", "shard", str(path), "-o", str(tmp_path / "s.onnx"), "--shard", "tp=2"]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert ("  not split: attention 'Softmax -> p': the query is computed from several weight projections "
            "('Wq', 'Wq2')") in r.stdout.splitlines()


def _attention_op_model(kind, kv=4, B=2, S=8, E=32, H=4):
    """x -> projections -> one attention op -> output projection + x. ``onnx4d``: ONNX Attention
    on [batch, heads, seq, head_dim] with a causal mask; ``onnx3d``: on [batch, seq, hidden]
    with q_num_heads / kv_num_heads; ``mha``: com.microsoft.MultiHeadAttention; ``packed``:
    com.microsoft.Attention with its own Q/K/V weight and bias. ``kv`` < H: grouped-query."""
    D = E // H
    rng = np.random.default_rng(5)

    def w(name, cols):
        return tensor(name, (rng.standard_normal((E, cols)) * 0.2).astype(np.float32))

    inits, nodes = [w("Wo", E)], []
    if kind == "packed":
        inits += [w("Wqkv", 3 * E), tensor("Bqkv", (rng.standard_normal(3 * E) * 0.1).astype(np.float32))]
        nodes.append(helper.make_node("Attention", ["x", "Wqkv", "Bqkv"], ["c"], domain="com.microsoft", num_heads=H))
    else:
        inits += [w("Wq", E), w("Wk", kv * D), w("Wv", kv * D)]
        nodes += [helper.make_node("MatMul", ["x", f"W{r}"], [f"{r}0"]) for r in "qkv"]
    if kind == "mha":
        nodes.append(helper.make_node("MultiHeadAttention", ["q0", "k0", "v0"], ["c"], domain="com.microsoft",
                                      num_heads=H))
    elif kind == "onnx3d":
        nodes.append(helper.make_node("Attention", ["q0", "k0", "v0"], ["c"], q_num_heads=H, kv_num_heads=kv))
    elif kind == "onnx4d":
        for r, n in (("q", H), ("k", kv), ("v", kv)):
            inits.append(tensor(f"s{r}", np.array([B, S, n, D], np.int64)))
            nodes += [helper.make_node("Reshape", [f"{r}0", f"s{r}"], [f"{r}r"]),
                      helper.make_node("Transpose", [f"{r}r"], [f"{r}h"], perm=[0, 2, 1, 3])]
        inits += [tensor("mask", np.tril(np.ones((S, S), bool))[None, None]),
                  tensor("merge", np.array([B, S, E], np.int64))]
        nodes += [helper.make_node("Attention", ["qh", "kh", "vh", "mask"], ["ch"]),
                  helper.make_node("Transpose", ["ch"], ["ct"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", ["ct", "merge"], ["c"])]
    nodes += [helper.make_node("MatMul", ["c", "Wo"], ["o"]), helper.make_node("Add", ["o", "x"], ["y"])]
    graph = helper.make_graph(nodes, "attention", [vinfo("x", shape=(B, S, E))], [vinfo("y", shape=(B, S, E))], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)])
    proto.ir_version = 10
    return proto


@pytest.mark.parametrize(("kind", "kv"), [("onnx4d", 4), ("onnx4d", 2), ("onnx3d", 2), ("mha", 4), ("packed", 4)])
def test_attention_ops_split_by_heads(kind, kv):
    """Attention written as one op: heads split (KV heads grouped on their query ranks where
    tp exceeds them), each rank's op told its own head counts, one all-reduce after the output
    projection, every projection weight divided by tp (K/V by the KV heads), equal to unsharded."""
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 8, 32)).astype(np.float32)}
    ref = runner.reference_outputs(ir.serde.deserialize_model(_attention_op_model(kind, kv)), feeds)
    for tp in (2, 4):
        prepared = runner.prepare(ir.serde.deserialize_model(_attention_op_model(kind, kv)), f"tp={tp}", feeds)
        s = summarize(prepared.model, prepared.plan)
        assert (s["all_reduces"], s["all_gathers"], s["unplanned"]) == (1, 0, [])
        weights = {n: v.const_value.nbytes for n, v in prepared.model.graph.initializers.items()
                   if n.startswith(("W", "B"))}
        kv_bytes = sum(b for n, b in weights.items() if n in ("Wk", "Wv"))
        ideal = sum(weights.values()) / tp + kv_bytes * (1 / min(tp, kv) - 1 / tp)
        assert s["parameter_bytes_per_rank"] - (s["parameter_bytes"] - sum(weights.values())) <= ideal
        outs, _ = runner.simulate(prepared, feeds, threads=1)
        assert runner.max_abs_error(outs, ref) <= 1e-5
        rank1 = prepared.rank_model(1)
        core = next(n for n in rank1.graph if n.op_type in ("Attention", "MultiHeadAttention"))
        heads = {a.name: a.value for a in core.attributes.values() if "num_heads" in a.name}
        expected = {"onnx4d": {}, "onnx3d": {"q_num_heads": 4 // tp, "kv_num_heads": max(kv // tp, 1)}}
        assert heads == expected.get(kind, {"num_heads": 4 // tp})


def test_kv_heads_held_by_query_groups_round_trip_through_ir_v11_specs(tmp_path):
    """2 KV heads on tp=4: K/V are cut in 2 parts, each held by a group of 2 ranks; the
    standard specs say so (2 shards, device groups {0,1} and {2,3}) and read back alike,
    with or without gcomp's own metadata."""
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 8, 32)).astype(np.float32)}
    prepared = runner.prepare(ir.serde.deserialize_model(_attention_op_model("onnx4d", 2)), "tp=4", feeds)
    annotate(prepared.model, prepared.plan)
    proto = ir.serde.serialize_model(prepared.model)
    spec = next(s for n in proto.graph.node for dc in n.device_configurations for s in dc.sharding_spec
                if s.tensor_name == "Wk")
    assert [sd.simple_sharding[0].num_shards for sd in spec.sharded_dim] == [2]
    assert {e.key: list(e.value) for e in spec.index_to_device_group_map} == {-1: [0, 1], -2: [2, 3]}
    for keep_metadata in (True, False):
        if not keep_metadata:
            for key in ("gcomp.sharding.seeds", "gcomp.sharding.inputs"):
                del proto.metadata_props[[p.key for p in proto.metadata_props].index(key)]
        path = tmp_path / f"gqa{keep_metadata}.onnx"
        onnx.save(proto, path)
        mesh, seeds = read_annotations(io.load(path))
        assert str(mesh) == "tp=4" and seeds["Wk"] == seeds["Wv"] == prepared.plan.seeds["Wk"]
        assert prepared.plan.seeds["Wk"].dims[1].repeat == 2
        result = runner.run(path, None, simulate=True, check=True, inputs=feeds, threads=1)
        assert result.max_abs_error <= 1e-5 and result.collectives == 1
