"""The ONNX Runtime backend behind the protocol: compile, run, profile, export, CUDA gating."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from gcomp import io
from gcomp.backends import get_backend
from gcomp.backends.base import Backend, Executable
from gcomp.backends.ort import cuda_available
from gcomp.errors import BackendError, OptionError
from tests.conftest import assert_same_outputs, ort_run

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "models" / "default.onnx"


@pytest.fixture(scope="module")
def feeds():
    return {"input_ids": np.random.default_rng(0).integers(0, 1000, size=(1, 16)).astype(np.int64)}


def test_protocol_and_run_matches_reference(feeds):
    backend = get_backend("ort")
    assert isinstance(backend, Backend)
    exe = backend.compile(io.load(DEFAULT), "cpu", optimization="all")
    assert isinstance(exe, Executable)
    out = exe.run(feeds)
    ref = ort_run(DEFAULT, feeds)
    np.testing.assert_allclose(out["last_hidden_state"], ref["last_hidden_state"], rtol=1e-4, atol=1e-5)


def test_profile_rows_are_graph_nodes(feeds):
    exe = get_backend("ort").compile(DEFAULT, "cpu", optimization="disable")
    prof = exe.profile(feeds, iters=5, warmup=1)
    nodes = {n.name: n.op_type for n in onnx.load(DEFAULT).graph.node}
    assert prof.latency.iterations == 5 and prof.latency.min_ms <= prof.latency.p50_ms <= prof.latency.max_ms
    assert prof.ops, "no per-node rows from the ORT trace"
    for row in prof.ops:
        assert nodes[row.node] == row.op_type
    assert abs(sum(r.share for r in prof.ops) - 1.0) < 1e-6
    assert prof.ops == sorted(prof.ops, key=lambda r: -r.time_ms)
    assert prof.backend["providers"] == ["CPUExecutionProvider"]
    assert prof.memory["peak_rss_bytes"] > 0


def test_export_offline_optimized_model(tmp_path, feeds):
    exe = get_backend("ort").compile(DEFAULT, "cpu", optimization="basic")
    out = exe.export(tmp_path / "ort.onnx")
    assert out.is_file() and len(onnx.load(out).graph.node) < len(onnx.load(DEFAULT).graph.node)
    assert_same_outputs(DEFAULT, out, feeds, rtol=1e-4, atol=1e-5)
    with pytest.raises(BackendError, match="refusing to write over the input"):
        exe.export(DEFAULT)


def test_bad_target_and_level():
    backend = get_backend("ort")
    with pytest.raises(BackendError, match="unknown target"):
        backend.compile(DEFAULT, "tpu")
    with pytest.raises(BackendError, match="unknown optimization level"):
        backend.compile(DEFAULT, "cpu", optimization="max")
    with pytest.raises(OptionError, match="unknown backend"):
        get_backend("tensorrt")


@pytest.mark.skipif(cuda_available(), reason="a CUDA GPU is present")
def test_cuda_refused_without_gpu():
    """One line either way: the GPU build without a GPU needs one; the plain build (what a
    fresh install gets) does not have the CUDA provider at all."""
    import onnxruntime as ort

    assert get_backend("ort").available_targets() == ["cpu"]
    gpu_build = "CUDAExecutionProvider" in ort.get_available_providers()
    expected = "needs a CUDA GPU" if gpu_build else "CUDAExecutionProvider is not in this ONNX Runtime build"
    with pytest.raises(BackendError, match=expected) as e:
        get_backend("ort").compile(DEFAULT, "cuda")
    assert "\n" not in str(e.value)


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="no CUDA GPU with onnxruntime-gpu's CUDA provider")
def test_cuda_matches_cpu(feeds):
    gpu = get_backend("ort").compile(DEFAULT, "cuda")
    cpu = get_backend("ort").compile(DEFAULT, "cpu")
    np.testing.assert_allclose(gpu.run(feeds)["last_hidden_state"], cpu.run(feeds)["last_hidden_state"], rtol=1e-3, atol=1e-3)
