"""Distributed execution: ``gcomp run`` over real MPI ranks, the CLI, torch-exported models.

The MPI tests launch 2 processes with the ``mpiexec`` gcomp installs (the ``mpich``
wheel); CI has 2 cores, which is what they need.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gcomp import io
from gcomp.distributed import runner
from models.transformer import build

REPO = Path(__file__).resolve().parents[1]
GCOMP = [sys.executable, "-m", "gcomp"]


@pytest.fixture(scope="module")
def block_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist") / "block.onnx"
    io.save(build(layers=2, hidden=64, heads=4, ffn=256, vocab=100), path)
    return path


def _gcomp(*args, timeout=240):
    return subprocess.run([*GCOMP, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          check=False)


def _mpiexec_available() -> bool:
    try:
        from gcomp.distributed.launch import find_mpiexec

        find_mpiexec()
        import mpi4py  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


needs_mpi = pytest.mark.skipif(not _mpiexec_available(), reason="no mpiexec/mpi4py (pip install mpich mpi4py)")


@needs_mpi
def test_run_launches_two_mpi_ranks_and_equals_unsharded(block_path, tmp_path):
    out = tmp_path / "out.npz"
    r = _gcomp("run", block_path, "--ranks", "2", "--check", "--input-shape", "input_ids=2,8",
               "--outputs", out, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["simulated"] is False and doc["ranks"] == 2 and doc["mesh"] == "tp=2"
    assert doc["check"] == "passed" and doc["max_abs_error"] <= 1e-4
    assert doc["collectives"] == 4  # 2 layers x Megatron's 2 all-reduces
    saved = np.load(out)
    assert saved["last_hidden_state"].shape == (2, 8, 64)


@needs_mpi
def test_run_under_a_users_mpirun(block_path):
    """``mpirun -n 2 gcomp run ...``: each process runs its rank; rank 0 alone reports."""
    from gcomp.distributed.launch import find_mpiexec

    r = subprocess.run([find_mpiexec(), "-n", "2", *GCOMP, "run", str(block_path), "--shard", "tp=2", "--check",
                        "--json"], capture_output=True, text=True, timeout=240, cwd=REPO, check=False)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)  # one document: the other rank printed nothing
    assert doc["simulated"] is False and doc["check"] == "passed" and doc["collectives"] == 4


@needs_mpi
def test_two_hosts_on_loopback_with_a_hostfile(block_path, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost:1\n127.0.0.1:1\n")
    r = _gcomp("run", block_path, "--shard", "dp=2", "--hostfile", hosts, "--check", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["check"] == "passed" and doc["mesh"] == "dp=2"


@needs_mpi
def test_a_rank_error_is_one_line_and_no_rank_hangs(block_path):
    r = _gcomp("run", block_path, "--shard", "dp=2", "--input-shape", "input_ids=3,8", timeout=120)
    assert r.returncode != 0
    # planned before any process starts: one line
    assert r.stderr.strip().splitlines() == ["gcomp: error: tensor 'input_ids': axis 0 of size 3 is not divisible by dp=2"]
    # a rank that fails under MPI prints one line and aborts the others (no hang)
    from gcomp.distributed.launch import find_mpiexec

    params = json.dumps({"model": str(block_path), "shard": "dp=2", "input_shapes": ["input_ids=3,8"]})
    r = subprocess.run([find_mpiexec(), "-n", "2", sys.executable, "-m", "gcomp.distributed.launch", params],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode != 0
    assert "gcomp: error: tensor 'input_ids': axis 0 of size 3 is not divisible by dp=2" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_run_simulated_and_errors(block_path, tmp_path):
    out = tmp_path / "o.npz"
    r = _gcomp("run", block_path, "--shard", "dp=2,tp=2", "--simulate", "--check", "--outputs", out)
    assert r.returncode == 0, r.stderr
    assert "4 ranks (simulated in one process)" in r.stdout and "passed" in r.stdout
    assert out.exists()
    r = _gcomp("run", block_path, "--shard", "tp=8", "--simulate")
    expected = ("gcomp: error: tensor '/encoder/layer.0/attention/self/MatMul_1_output_0': "
                "4 attention heads are not divisible by tp=8")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [expected]
    r = _gcomp("run", block_path, "--shard", "tp=2", "--ranks", "4", "--simulate")
    assert r.returncode == 2 and "does not match mesh tp=2" in r.stderr
    r = _gcomp("run", block_path, "--shard", "xp=2", "--simulate")
    assert r.returncode == 2 and r.stderr.startswith("gcomp: error: --shard 'xp=2'")


def test_cli_run_outputs_equal_onnx_runtime_on_given_inputs(block_path, tmp_path):
    """--inputs in, --outputs out: rank 0's outputs equal the unsharded model on ORT."""
    from tests.conftest import ort_run

    ids = np.random.default_rng(5).integers(0, 100, (4, 8)).astype(np.int64)
    np.savez(tmp_path / "in.npz", input_ids=ids)
    out = tmp_path / "out.npz"
    r = _gcomp("run", block_path, "--shard", "dp=2,tp=2", "--simulate", "--inputs", tmp_path / "in.npz",
               "--outputs", out)
    assert r.returncode == 0, r.stderr
    expected = ort_run(io.load(block_path), {"input_ids": ids})["last_hidden_state"]
    np.testing.assert_allclose(np.load(out)["last_hidden_state"], expected, rtol=1e-4, atol=1e-4)


def test_cli_shard_annotates_and_run_reads_the_annotations(block_path, tmp_path):
    out = tmp_path / "sharded.onnx"
    ranks = tmp_path / "ranks"
    r = _gcomp("shard", block_path, "-o", out, "--shard", "tp=2", "--input-shape", "input_ids=2,8",
               "--ranks-dir", ranks, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["all_reduces"] == 4 and summary["all_gathers"] == 0
    assert summary["parameter_bytes_per_rank"] < summary["parameter_bytes"]
    assert sorted(p.name for p in ranks.iterdir()) == ["rank0.onnx", "rank1.onnx"]
    r = _gcomp("run", out, "--simulate", "--check", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["mesh"] == "tp=2" and doc["check"] == "passed"
    r = _gcomp("shard", block_path, "-o", block_path, "--shard", "tp=2")
    assert r.returncode != 0 and "gcomp: error:" in r.stderr


# ----------------------------------------------------------------- torch-exported models
@pytest.fixture(scope="module")
def exported(torch_export):
    small = {
        "bert": {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 256},
        "gpt2": {"n_layer": 2, "n_embd": 64},
    }
    return {name: torch_export(name, cfg) for name, cfg in small.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "gpt2"])
@pytest.mark.parametrize("mesh", ["tp=2", "tp=4", "dp=2", "dp=2,tp=2"])
def test_exported_models_sharded_equal_unsharded(exported, name, mesh):
    shapes = {"input_ids": (2, 8), "attention_mask": (2, 8)}
    if name == "bert":
        shapes["token_type_ids"] = (2, 8)
    result = runner.run(exported[name], mesh, simulate=True, check=True, input_shapes=shapes)
    assert result.max_abs_error <= 1e-4
    feeds = result.feeds
    prepared = runner.prepare(io.load(exported[name]), mesh, feeds)
    from gcomp.passes.sharding import summarize

    s = summarize(prepared.model, prepared.plan)
    tp = prepared.mesh.axis_size("tp")
    if tp > 1:
        assert s["row_parallel_all_reduces"] == 2 * 2  # Megatron's 2 per layer, 2 layers
        # plus one for the vocabulary-parallel token embedding (8192 x 64: most of the weights)
        assert s["all_reduces"] == 2 * 2 + 1
    if prepared.mesh.axis_size("dp") == 1:
        assert s["all_gathers"] == 0
        assert s["parameter_bytes_per_rank"] <= s["sharded_parameter_bytes"] / tp + s["replicated_parameter_bytes"]


@pytest.mark.slow
def test_run_on_other_shapes_than_planned_is_one_line_before_any_rank(block_path, tmp_path):
    """A model ``gcomp shard --input-shape`` fixed to [2, 8], run on [1, 5]: one line naming the
    planned shapes and how to re-plan, exit 1, before any process starts (was ONNX Runtime's
    "Got invalid dimensions" from every rank, then MPI_Abort)."""
    fixed = tmp_path / "fixed.onnx"
    r = _gcomp("shard", block_path, "-o", fixed, "--shard", "tp=2", "--input-shape", "input_ids=2,8", "-q")
    assert r.returncode == 0, r.stderr
    expected = ("gcomp: error: input 'input_ids' has shape [1, 5], but the model was sharded for input_ids=2,8: "
                "run it on inputs of those shapes, or re-plan the unsharded model for these: gcomp shard "
                "UNSHARDED.onnx -o OUT.onnx --shard tp=2 --input-shape input_ids=1,5 (without --input-shape, "
                "gcomp shard keeps the shapes open)")
    runs = [("--shard", "tp=2", "--simulate")]
    if _mpiexec_available():
        runs.append(("--ranks", "2"))
    for extra in runs:
        r = _gcomp("run", fixed, *extra, "--input-shape", "input_ids=1,5")
        assert r.returncode == 1 and r.stderr.strip().splitlines() == [expected], (extra, r.stderr)
        assert r.stdout == ""


@pytest.mark.slow
def test_shard_without_input_shapes_keeps_them_open(block_path, tmp_path):
    """Without --input-shape the written model keeps its symbolic inputs: gcomp run re-plans it
    for any inputs, with the same 2 all-reduces per layer, equal to the unsharded model."""
    out = tmp_path / "open.onnx"
    r = _gcomp("shard", block_path, "-o", out, "--shard", "tp=2", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["shapes_fixed"] is False and doc["input_shapes"] == {"input_ids": [1, 32]}
    assert str(io.load(out).graph.inputs[0].shape) == "[batch,seq]"  # as the unsharded model's
    r = _gcomp("run", out, "--simulate", "--check", "--json", "--input-shape", "input_ids=3,7")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["mesh"] == "tp=2" and doc["check"] == "passed" and doc["collectives"] == 4
    assert doc["outputs"]["last_hidden_state"] == [3, 7, 64]


def test_a_wrong_rank_on_open_shapes_is_not_a_replan(tmp_path):
    """A sharded model that kept its input shapes open is re-specialised to any feeds; an
    input of the wrong rank is a plain 'does not fit', not advice to re-plan."""
    import onnx_ir as ir

    from gcomp.distributed.runner import check_input_shapes
    from gcomp.errors import GcompError

    x = ir.Value(name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", "seq"]))
    node = ir.Node("", "Identity", [x], name="id")
    model = ir.Model(ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 17}), ir_version=10)
    with pytest.raises(GcompError, match=r"^input 'input_ids': shape \[2\] does not fit the model's \[\?, \?\]$"):
        check_input_shapes(model, {"input_ids": np.zeros((2,), np.int64)}, sharded_for="tp=2")
    check_input_shapes(model, {"input_ids": np.zeros((3, 7), np.int64)}, sharded_for="tp=2")  # fits: no error
