"""The TVM Relax backend behind the protocol: parity with ORT on the zoo, per-kernel
profiles tied to graph nodes, export/reload, clear refusals, CUDA code generation,
op-support declarations, the CLI, and --backend auto."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gcomp.backends import get_backend
from gcomp.backends.base import Backend, Executable
from gcomp.backends.tvm import TvmBackend, cuda_available, load
from onnx import TensorProto, helper

import models
from gcomp import backends, io
from gcomp.autoselect import prepare_for_tvm
from gcomp.errors import BackendError
from gcomp.inputs import generate_inputs
from tests.conftest import make_model, ort_run, tensor, vinfo

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "models" / "default.onnx"

# Every zoo builder, at a size that compiles in seconds; symbolic dims bound at compile.
ZOO = {
    "mlp": {},
    "cnn": {"size": 16},
    "transformer": {"layers": 1, "hidden": 64, "heads": 2, "ffn": 128, "vocab": 100},
    "resnet18": {"size": 32, "num_classes": 10},
}


def _feeds(model, **shapes):
    return generate_inputs(model, shapes=shapes or None, seed=0)[0]


def _shapes(feeds):
    return {k: v.shape for k, v in feeds.items()}


def _compile(model, target="llvm", *, input_shapes=None, **options):
    """Compile as gcomp does: the core prepares the model (gcomp's pipeline for the TVM
    target), then the backend compiles what it was given."""
    prepared = prepare_for_tvm(model, input_shapes, target=target, progress=options.get("progress"))
    return TvmBackend().compile(prepared, target, **options)


def test_every_zoo_builder_is_covered():
    assert set(ZOO) == set(models.BUILDERS)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "resnet18" else n for n in sorted(ZOO)])
def test_zoo_parity_with_ort(name):
    model = models.build(name, **ZOO[name])
    feeds = _feeds(model)
    exe = _compile(model, input_shapes=_shapes(feeds))
    assert isinstance(exe, Executable)
    out, ref = exe.run(feeds), ort_run(model, feeds)
    assert list(out) == list(ref)
    for k in ref:
        assert out[k].shape == ref[k].shape and out[k].dtype == ref[k].dtype
        np.testing.assert_allclose(out[k], ref[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_default_model_parity_and_profile_rows_are_graph_nodes():
    model = io.load(DEFAULT)
    feeds = _feeds(model)
    exe = _compile(DEFAULT, "cpu", input_shapes=_shapes(feeds))
    ref = ort_run(DEFAULT, feeds)
    np.testing.assert_allclose(exe.run(feeds)["last_hidden_state"], ref["last_hidden_state"], rtol=1e-4, atol=1e-5)
    prof = exe.profile(feeds, iters=3, warmup=1, profile_runs=2)
    assert prof.backend["name"] == "tvm" and prof.backend["target"] == "llvm"
    assert "mcpu" in prof.backend["tvm_target"]  # the host's CPU, not a generic llvm
    assert prof.latency.iterations == 3 and prof.latency.min_ms <= prof.latency.max_ms
    nodes = {n.name: n.op_type for n in model.graph}
    mapped = [r for r in prof.ops if r.node in nodes]
    assert prof.ops and len(mapped) >= len(prof.ops) // 2, [r.node for r in prof.ops]
    for row in mapped:
        assert nodes[row.node] in row.op_type.split("+")
        assert row.provider.startswith("tvm:")
    assert abs(sum(r.share for r in prof.ops) - 1.0) < 1e-6
    # The transformer's matmuls are profiled as its graph's MatMul nodes (which kernel is the
    # heaviest is a timing, and a loaded machine once put a layer_norm first).
    assert any("MatMul" in r.op_type and r.node in nodes for r in prof.ops), [r.op_type for r in prof.ops]


def test_protocol_registry_and_caller_model_untouched():
    backend = get_backend("tvm")
    assert isinstance(backend, Backend) and "tvm" in backends.BACKENDS
    assert backend.available_targets()[0] == "llvm"
    model = models.build("mlp")
    before = [str(v.shape) for v in model.graph.inputs]
    backend.compile(model, "llvm", input_shapes={"x": (3, 64)})
    assert [str(v.shape) for v in model.graph.inputs] == before
    with pytest.raises(BackendError, match="unknown target 'tpu'"):
        backend.compile(model, "tpu")
    with pytest.raises(BackendError, match="rank 2, shape given"):
        backend.compile(model, "llvm", input_shapes={"x": (3,)})
    prepared = prepare_for_tvm(model, {"x": (3, 64)})
    assert [str(v.shape) for v in model.graph.inputs] == before
    assert [tuple(v.shape) for v in prepared.graph.inputs] == [(3, 64)]
    with pytest.raises(BackendError, match="rank 2, shape given"):
        prepare_for_tvm(model, {"x": (3,)})
    with pytest.raises(BackendError, match="unknown target 'tpu'"):
        prepare_for_tvm(model, target="tpu")


def _lstm_model():
    nodes = [helper.make_node("LSTM", ["x", "W", "R"], ["y"], name="the_lstm", hidden_size=4)]
    rng = np.random.default_rng(0)
    inits = [tensor("W", rng.normal(size=(1, 16, 3)).astype(np.float32)),
             tensor("R", rng.normal(size=(1, 16, 4)).astype(np.float32))]
    return make_model(nodes, [vinfo("x", shape=(2, 1, 3))], [vinfo("y", shape=(2, 1, 1, 4))], inits)


def test_unsupported_ops_are_named():
    with pytest.raises(BackendError) as info:
        TvmBackend().compile(_as_ir(_lstm_model()))
    assert "does not support LSTM (node 'the_lstm')" in str(info.value)
    assert info.value.unsupported_ops == ["LSTM"]


def test_opset23_attention_is_refused_with_the_reason():
    q = vinfo("q", shape=(1, 2, 4, 8))
    node = helper.make_node("Attention", ["q", "q", "q"], ["y"], name="attn")
    model = make_model([node], [q], [vinfo("y", shape=(1, 2, 4, 8))], opset=23)
    with pytest.raises(BackendError, match=r"Attention \(node 'attn'.*opset-23 Attention"):
        TvmBackend().compile(_as_ir(model))
    assert not backends.supports("tvm-llvm", "Attention", "", 23)
    assert backends.supports("ort-cpu", "Attention", "", 23)


def _as_ir(proto):
    import onnx_ir as ir

    return ir.serde.deserialize_model(proto)


def test_target_op_declarations():
    assert backends.targets() == ["ort-cpu", "ort-cuda", "tvm-llvm", "tvm-cuda", "portable"]
    for target in backends.targets():
        assert backends.supports(target, "MatMul", "", 17)
        assert backends.supports(target, "LayerNormalization", "", 17)
    assert backends.supports("ort-cpu", "FastGelu", "com.microsoft", 1)
    assert not backends.supports("tvm-llvm", "FastGelu", "com.microsoft", 1)  # contrib: ORT only
    assert not backends.supports("portable", "FastGelu", "com.microsoft", 1)
    assert backends.supports("ort-cpu", "LSTM", "", 17) and not backends.supports("portable", "LSTM", "", 17)
    assert not backends.supports("ort-cpu", "NoSuchOp", "", 17)
    assert get_backend("ort").supports("SkipLayerNormalization", "com.microsoft", 1)
    assert not get_backend("tvm").supports("Loop", "", 17)
    with pytest.raises(KeyError):
        backends.supports("nope", "Relu")


def test_export_reload_round_trip(tmp_path):
    model = models.build("cnn", size=16)
    feeds = _feeds(model)
    exe = _compile(model, input_shapes=_shapes(feeds))
    out = exe.export(tmp_path / "cnn.tvm")
    assert sorted(p.name for p in out.iterdir()) == ["gcomp-tvm.json", "model.so"]
    again = load(out)
    a, b = exe.run(feeds), again.run(feeds)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    prof = again.profile(feeds, iters=2, warmup=0, profile_runs=1)
    assert any(r.op_type.startswith("Conv") for r in prof.ops)
    exe.export(out)  # an artifact may be replaced by a new one
    (tmp_path / "plain").write_text("keep me")
    with pytest.raises(BackendError, match="not a gcomp TVM artifact"):
        exe.export(tmp_path / "plain")
    assert (tmp_path / "plain").read_text() == "keep me"
    with pytest.raises(BackendError, match="not a gcomp TVM artifact"):
        load(tmp_path)


def test_cuda_code_generation_without_a_gpu(tmp_path):
    exe = _compile(models.build("mlp"), "cuda", input_shapes={"x": (2, 64)}, run=False)
    src = exe.generated_source()
    assert "__global__" in src and "threadIdx" in src
    out = exe.export(tmp_path / "mlp.cuda")  # the artifact a GPU machine would load
    meta = json.loads((out / "gcomp-tvm.json").read_text())
    assert meta["target"] == "cuda" and (out / "model.so").stat().st_size > 0
    with pytest.raises(BackendError, match="no CUDA GPU"):
        exe.run({"x": np.zeros((2, 64), np.float32)})


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="no CUDA GPU")
def test_cuda_parity_on_gpu():
    model = models.build("mlp")
    feeds = _feeds(model, x=(2, 64))
    exe = _compile(model, "cuda", input_shapes=_shapes(feeds))
    np.testing.assert_allclose(exe.run(feeds)["probs"], ort_run(model, feeds)["probs"], rtol=1e-4, atol=1e-5)


def gcomp(*args):
    return subprocess.run([sys.executable, "-m", "gcomp", *map(str, args)], check=False, capture_output=True,
                          text=True, timeout=300)


def test_cli_unsupported_model_one_line_error(tmp_path):
    import onnx

    path = tmp_path / "lstm.onnx"
    onnx.save(_lstm_model(), path)
    proc = gcomp("compile", path, "--backend", "tvm", "-o", tmp_path / "out")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines == ["gcomp: error: tvm: TVM's ONNX importer does not support LSTM (node 'the_lstm')"], proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_compile_then_profile_auto(tmp_path):
    path = tmp_path / "mlp.onnx"
    io.save(models.build("mlp"), path)
    proc = gcomp("compile", path, "--input-shape", "x=2,64", "-o", tmp_path / "mlp.tvm", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["backend"] == "tvm" and doc["verification"]["status"] == "passed"
    assert doc["input_shapes"] == {"x": [2, 64]} and (tmp_path / "mlp.tvm" / "model.so").is_file()
    proc = gcomp("profile", path, "--backend", "auto", "--iters", "3", "--warmup", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    sel = doc["backend_selection"]
    assert {(c["backend"], c["target"]) for c in sel["candidates"]} >= {("ort", "cpu"), ("tvm", "llvm")}
    chosen = [c for c in sel["candidates"] if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["status"] == "ok"
    assert sel["chosen"] == f"{chosen[0]['backend']}/{chosen[0]['target']}" == (
        f"{doc['backend']['name']}/{doc['backend']['target']}"
    )
    ok = [c for c in sel["candidates"] if c["status"] == "ok"]
    assert chosen[0]["p50_ms"] == min(c["p50_ms"] for c in ok)


def _two_kernel_model(rows=1, k=32, hidden=48, out=16):
    """x[rows,k] -> MatMul W1 -> Relu -> MatMul W2: two tuning tasks (MatMul+Relu, MatMul),
    each tiny at the default sizes."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2")]
    inits = [tensor("W1", rng.normal(size=(k, hidden)).astype(np.float32)),
             tensor("W2", rng.normal(size=(hidden, out)).astype(np.float32))]
    return _as_ir(make_model(nodes, [vinfo("x", shape=(rows, k))], [vinfo("y", shape=(rows, out))], inits))


@pytest.mark.slow
def test_tuning_database_is_reused_and_survives_an_interrupt(tmp_path):
    from gcomp.backends.tvm.database import count_records

    model = _two_kernel_model()
    feeds = _feeds(model)
    ref = ort_run(model, feeds)
    cache = tmp_path / "cache"

    def stop_at_second_task(msg):
        if msg.startswith("tuning task 2/"):
            raise KeyboardInterrupt

    # Interrupted before the second task: the first task's records are committed, whole.
    with pytest.raises(KeyboardInterrupt):
        _compile(model, tune_trials=16, cache_dir=cache, progress=stop_at_second_task)
    (db_dir,) = (cache / "tvm").iterdir()
    first = count_records(db_dir)
    assert first > 0
    for name in ("database_workload.json", "database_tuning_record.json"):
        for line in (db_dir / name).read_text().splitlines():
            json.loads(line)
    # Resumed: the finished task is reused, only the other one is tuned.
    exe = _compile(model, tune_trials=16, cache_dir=cache)
    t = exe.tuning
    assert (t.tasks, t.reused, t.tuned, t.skipped) == (2, 1, 1, 0) and t.trials > 0
    second = count_records(db_dir)
    assert second > first
    np.testing.assert_allclose(exe.run(feeds)["y"], ref["y"], rtol=1e-4, atol=1e-4)
    # Everything is in the database now: no new trials, same records, same answers.
    exe = _compile(model, tune_trials=16, cache_dir=cache)
    assert (exe.tuning.reused, exe.tuning.tuned, exe.tuning.trials) == (2, 0, 0)
    assert count_records(db_dir) == second
    np.testing.assert_allclose(exe.run(feeds)["y"], ref["y"], rtol=1e-4, atol=1e-4)
    # A larger budget tunes each kernel up to its new share (8 -> 16 trials each).
    exe = _compile(model, tune_trials=32, cache_dir=cache)
    assert (exe.tuning.reused, exe.tuning.tuned) == (0, 2) and exe.tuning.trials > 0
    assert count_records(db_dir) > second
    np.testing.assert_allclose(exe.run(feeds)["y"], ref["y"], rtol=1e-4, atol=1e-4)


def test_cli_auto_falls_back_to_ort_and_optimize_records_candidates(tmp_path):
    import onnx

    lstm = tmp_path / "lstm.onnx"
    onnx.save(_lstm_model(), lstm)
    proc = gcomp("compile", lstm, "--backend", "auto", "-o", tmp_path / "lstm.ort.onnx", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    by = {(c["backend"], c["target"]): c for c in doc["selection"]["candidates"]}
    assert by[("tvm", "llvm")]["status"] == "failed" and "LSTM" in by[("tvm", "llvm")]["error"]
    assert by[("ort", "cpu")]["chosen"] and doc["backend"] == "ort"
    assert (tmp_path / "lstm.ort.onnx").is_file()

    path = tmp_path / "mlp.onnx"
    io.save(models.build("mlp", batch=2), path)
    proc = gcomp("optimize", path, "-o", tmp_path / "opt.onnx", "--backend", "auto", "--report", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    sel = json.loads((tmp_path / "r.json").read_text())["backend_selection"]
    assert [c["chosen"] for c in sel["candidates"]].count(True) == 1
    assert all(c["status"] == "ok" and c["max_abs_error"] < 1e-4 for c in sel["candidates"])


def test_mixed_precision_model_compiles_and_verifies_at_its_precision():
    from gcomp.autoselect import _check, _reference
    from gcomp.pipeline import optimize

    model = models.build("transformer", layers=1)
    fp16 = optimize(model, "O1", precision="fp16", verify=False).model
    assert any(v.dtype == ir_dtype("FLOAT16") for v in fp16.graph.initializers.values())
    feeds = _feeds(fp16)
    exe = _compile(fp16, input_shapes=_shapes(feeds))
    ok, err = _check(_reference(fp16, feeds), exe.run(feeds), fp16)
    assert ok and err > 1e-3  # TVM computes in fp16: close to the reference, not bit-equal
    # The same difference in an fp32 model is a mismatch.
    fp32 = models.build("transformer", layers=1)  # optimize() converted `model` in place
    assert not _check(_reference(fp16, feeds), exe.run(feeds), fp32)[0]


def ir_dtype(name):
    import onnx_ir as ir

    return getattr(ir.DataType, name)


@pytest.mark.slow
def test_indexing_kernels_are_not_tuned(tmp_path):
    """A take/gather kernel reads out of bounds on MetaSchedule's random arguments
    (a segfault when timed in-process): such tasks stay on the default schedule."""
    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    node = helper.make_node("Gather", ["table", "ids"], ["y"], name="lookup")
    model = _as_ir(make_model([node], [vinfo("ids", TensorProto.INT64, (3,))], [vinfo("y", shape=(3, 4))],
                              [tensor("table", table)]))
    exe = _compile(model, tune_trials=8, cache_dir=tmp_path)
    t = exe.tuning
    assert t.skipped >= 1 and not any("take" in name for name in t.task_names), t  # the index fix-up is tuned
    ids = np.array([0, 9, 3], dtype=np.int64)
    np.testing.assert_array_equal(exe.run({"ids": ids})["y"], table[ids])


def test_trial_budget_follows_the_kernels_guessed_time():
    from gcomp.backends.tvm.tuning import trial_shares

    # A GEMM guessed 10x the time of a layer norm gets the larger share; every kernel at
    # least 16 trials; the shares never exceed the budget.
    shares = trial_shares([10.0, 1.0, 0.0], 400)
    assert shares[0] > 5 * shares[1] and min(shares) == 16 and sum(shares) <= 400
    assert shares[2] == 16
    # A budget too small for 16 each: an even split, at least 8 (one search round).
    assert trial_shares([5.0, 1.0], 16) == [8, 8]
    assert trial_shares([], 100) == []
    assert trial_shares([0.0, 0.0], 100) == [50, 50]


def test_kernels_run_on_every_core_unless_the_user_says_otherwise():
    # TVM's default halves the x86 thread count (hyper-threads); with one thread per core
    # that idles half the machine. gcomp sets TVM_NUM_THREADS to the core count before
    # TVM's pool starts, and leaves a user's setting alone. Fresh processes: the pool
    # starts once per process.
    code = ("from gcomp.backends.tvm import runtime_threads, physical_cores; import os; "
            "print(runtime_threads(), physical_cores(), os.environ.get('TVM_NUM_THREADS'))")
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    threads, cores, var = out.stdout.split()
    assert threads == cores == var
    out = subprocess.run([sys.executable, "-c", code], env={**env, "TVM_NUM_THREADS": "1"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == "1" and out.stdout.split()[2] == "1"


def test_a_time_budget_scales_every_kernels_share_instead_of_dropping_the_last():
    from gcomp.backends.tvm.tuning import _fit

    assert _fit(400, 1000, 2000.0) == 400  # everything fits: unchanged
    assert _fit(400, 1000, 500.0) == 200  # half fits: every share halved
    assert _fit(20, 1000, 100.0) == 8  # never below one search round


@pytest.mark.slow
def test_every_kernel_gets_a_round_before_any_gets_a_second(tmp_path, monkeypatch):
    """Phase 1 gives each kernel one search round (heaviest first); phase 2 gives the
    rest of the budget, a round at a time, to the kernel with the most measured time per
    trial so far. Rounds of 8 here so the test runs in seconds."""
    from gcomp.backends.tvm import tuning

    monkeypatch.setattr(tuning, "_ROUND", 8)
    model = _two_kernel_model(rows=64, k=256, hidden=256, out=4)
    said = []
    exe = _compile(model, tune_trials=40, cache_dir=tmp_path, progress=said.append)
    rounds = [m.split()[3] for m in said if m.startswith("tuning task")]
    big = next(n for n in rounds if "relu" in n)
    small = next(n for n in rounds if "relu" not in n)
    # Heaviest first, each once, then the remaining 24 trials all go to the kernel that
    # measures ~60x slower (8 trials had each: its time per trial stays the larger).
    assert rounds == [big, small, big, big, big], said
    t = exe.tuning
    assert (t.tasks, t.tuned, t.reused, t.skipped) == (2, 2, 0, 0) and 0 < t.trials <= 40
    (db_dir,) = (tmp_path / "tvm").iterdir()
    had = json.loads((db_dir / "gcomp-trials.json").read_text())
    assert sorted(had.values()) == [8, 32]
    feeds = _feeds(model)
    np.testing.assert_allclose(exe.run(feeds)["y"], ort_run(model, feeds)["y"], rtol=1e-4, atol=1e-3)
    # The same budget again: nothing to do.
    again = _compile(model, tune_trials=40, cache_dir=tmp_path).tuning
    assert (again.tuned, again.trials, again.reused) == (0, 0, 2)


def test_channels_last_convolutions_keep_every_op_around_them_exact():
    """On the CPU, Conv2D runs NHWC with HWIO weights (faster kernels); the ops after it
    either follow the layout or get a transpose back. Channel-axis ops, grouped, strided,
    dilated and 1x1 convolutions all match ORT."""
    rng = np.random.default_rng(0)

    def w(*shape):
        return rng.normal(scale=0.3, size=shape).astype(np.float32)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], group=8, pads=[2, 2, 2, 2], dilations=[2, 2]),
        helper.make_node("Conv", ["r1", "w3"], ["c3"]),
        helper.make_node("Concat", ["c2", "c3"], ["cat"], axis=1),
        helper.make_node("Softmax", ["cat"], ["sm"], axis=1),
        helper.make_node("ReduceMean", ["sm"], ["rm"], axes=[1], keepdims=1),
        helper.make_node("Split", ["cat", "halves"], ["s1", "s2"], axis=1),
        helper.make_node("Mul", ["s1", "s2"], ["m"]),
        helper.make_node("Resize", ["m", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("GlobalAveragePool", ["up"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["y"]),
    ]
    inits = [tensor("w1", w(8, 3, 3, 3)), tensor("b1", w(8)), tensor("w2", w(8, 1, 3, 3)), tensor("w3", w(8, 8, 1, 1)),
             tensor("halves", np.array([8, 8], np.int64)),
             tensor("scales", np.array([1, 1, 2, 2], np.float32))]
    model = _as_ir(make_model(nodes, [vinfo("x", shape=(1, 3, 12, 12))],
                              [vinfo("y", shape=(1, 8)), vinfo("rm", shape=(1, 1, 6, 6))], inits))
    feeds = _feeds(model)
    exe = _compile(model)
    out, ref = exe.run(feeds), ort_run(model, feeds)
    for k in ref:
        np.testing.assert_allclose(out[k], ref[k], rtol=1e-4, atol=1e-5, err_msg=k)
    conv_kernels = [k for k in exe.generated_source().split("\n") if "conv2d_nhwc" in k]
    assert conv_kernels, "the convolutions were not converted to NHWC"
