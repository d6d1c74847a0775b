"""TVM artifacts that run where only TVM's runtime is: the loader, separate weights,
CUDA code a GPU machine can load, and the bundle that carries them there.

Hiding TVM's compiler works as in tests/test_install.py: a subprocess whose
``sitecustomize`` (on PYTHONPATH) puts ``None`` in ``sys.modules`` for the ``tvm``
package, so nothing can import ``tvm`` or ``tvm.relax``; the subprocess then also checks
that ``libtvm_compiler.so`` was never mapped into it.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

pytest.importorskip("tvm")

from gcomp.backends.tvm import artifact, load
from gcomp.backends.tvm.cuda_code import fatbin_contents, find_nvcc

from tests.conftest import ort_run

REPO = Path(__file__).resolve().parents[1]
SITECUSTOMIZE = """\
import os, sys
for _name in os.environ.get("GCOMP_TEST_HIDE", "").split(","):
    if _name:
        sys.modules[_name] = None
"""

# Runs an artifact in a process where `tvm` cannot be imported; prints what it saw as JSON.
RUN_HIDDEN = """\
import json, sys
import numpy as np
from gcomp.backends.tvm import load
exe = load(sys.argv[1])
feeds = dict(np.load(sys.argv[2]))
out = exe.run(feeds)
np.savez(sys.argv[3], **out)
maps = open("/proc/self/maps").read()
print(json.dumps({"inputs": exe.input_names, "outputs": exe.output_names,
                  "compiler_mapped": "libtvm_compiler" in maps, "runtime_mapped": "libtvm_runtime.so" in maps,
                  "tvm_imported": sys.modules.get("tvm") is not None}))
"""


# Opens a CUDA model.so on a machine without TVM's CUDA runtime: a stand-in loader for
# kind "cuda" records the format and where the fatbin starts in the module's bytes.
FAKE_CUDA_LOADER = """\
import json, struct, sys
import tvm_ffi
from gcomp.backends.tvm import artifact
artifact.runtime_function("runtime.NumThreads")
seen = []
@tvm_ffi.register_global_func("ffi.Module.load_from_bytes.cuda")
def _load(data):
    data = bytes(data)
    (n,) = struct.unpack_from("<Q", data, 0)
    seen.append({"fmt": data[8:8 + n].decode(), "fatbin_at": data.find(struct.pack("<I", 0xBA55ED50))})
    return tvm_ffi.system_lib()
tvm_ffi.load_module(sys.argv[1])
print(json.dumps(seen))
"""


def gcomp(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gcomp", *map(str, args)], capture_output=True, text=True, check=False,
                          timeout=300, env=env)


def mlp(path: Path, *, hidden: int = 256) -> Path:
    """x[2,64] -> MatMul(64 x hidden) + Add -> Relu -> MatMul(hidden x 10) -> Softmax; the
    first weight is 64 KiB at hidden=256, so whether it sits in model.so shows in its size."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((64, hidden)).astype(np.float32) * 0.1
    b1 = rng.standard_normal(hidden).astype(np.float32)
    w2 = rng.standard_normal((hidden, 10)).astype(np.float32) * 0.1
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "b1"], ["h1"], name="bias1"),
             helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
             helper.make_node("MatMul", ["h2", "w2"], ["h3"], name="fc2"),
             helper.make_node("Softmax", ["h3"], ["y"], name="softmax", axis=-1)]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 10])],
        [onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(b1, "b1"),
         onnx.numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """One llvm artifact of the MLP, compiled by the CLI, with the model and its input."""
    root = tmp_path_factory.mktemp("artifacts")
    model = mlp(root / "mlp.onnx")
    out = root / "mlp.tvm"
    proc = gcomp("compile", model, "-o", out, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["verification"]["status"] == "passed"
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    np.savez(root / "feeds.npz", x=x)
    return {"root": root, "model": model, "artifact": out, "feeds": {"x": x}}


def run_without_tvm(art: Path, feeds: Path, out: Path, root: Path) -> dict:
    shim = root / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (shim / "run_hidden.py").write_text(RUN_HIDDEN)
    env = {**os.environ, "GCOMP_TEST_HIDE": "tvm", "PYTHONPATH": str(shim)}
    proc = subprocess.run([sys.executable, str(shim / "run_hidden.py"), str(art), str(feeds), str(out)],
                          capture_output=True, text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_an_artifact_runs_on_the_runtime_alone_and_matches_onnx_runtime(compiled):
    root = compiled["root"]
    seen = run_without_tvm(compiled["artifact"], root / "feeds.npz", root / "out.npz", root)
    assert seen == {"inputs": ["x"], "outputs": ["y"], "compiler_mapped": False, "runtime_mapped": True,
                    "tvm_imported": False}
    got = np.load(root / "out.npz")["y"]
    want = ort_run(onnx.load(compiled["model"]), compiled["feeds"])["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # the artifact carries the inputs it was verified on and ONNX Runtime's outputs for them
    check = np.load(compiled["artifact"] / "check.npz")
    assert sorted(check.files) == ["input:x", "output:y"]
    np.testing.assert_allclose(load(compiled["artifact"]).run({"x": check["input:x"]})["y"], check["output:y"],
                               rtol=1e-5, atol=1e-6)


def test_the_loader_file_imports_nothing_from_gcomp_but_its_error_class():
    source = (REPO / "backends" / "tvm" / "artifact.py").read_text()
    imports = [ln.strip() for ln in source.splitlines() if ln.strip().startswith(("import ", "from "))]
    gcomp_imports = [ln for ln in imports if "gcomp" in ln]
    assert gcomp_imports == ["from gcomp.errors import BackendError as _Base"]
    assert not [ln for ln in imports if ln.split()[1].split(".")[0] == "tvm"]


def test_loading_what_is_not_an_artifact_is_one_clear_error(tmp_path):
    (tmp_path / "model.so").write_bytes(b"not a library")
    with pytest.raises(artifact.ArtifactError, match="not a gcomp TVM artifact"):
        load(tmp_path)
    (tmp_path / "gcomp-tvm.json").write_text(json.dumps({"target": "cuda", "inputs": [], "outputs": []}))
    with pytest.raises(artifact.ArtifactError, match="CUDA C source only"):
        load(tmp_path)
    (tmp_path / "gcomp-tvm.json").write_text(json.dumps({"target": "llvm", "inputs": [], "outputs": []}))
    with pytest.raises(artifact.ArtifactError, match="cannot load"):
        load(tmp_path)


@pytest.mark.slow
def test_weights_kept_out_of_model_so_travel_beside_it_and_load(compiled):
    root = compiled["root"]
    out = root / "mlp.sep.tvm"
    proc = gcomp("compile", compiled["model"], "-o", out, "--weights", "separate", "--json")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["check.npz", "gcomp-tvm.json", "model.so", "weights.safetensors"]
    meta = json.loads((out / "gcomp-tvm.json").read_text())
    assert meta["weights"]["file"] == "weights.safetensors" and meta["weights"]["names"]
    # the 64 KiB first-layer weight and the rest left model.so for the weights file
    stored = artifact.read_safetensors(out / "weights.safetensors")
    weight_bytes = sum(len(raw) for *_, raw in stored)
    assert weight_bytes >= 64 * 256 * 4 + 256 * 10 * 4
    embedded = (compiled["artifact"] / "model.so").stat().st_size
    assert (out / "model.so").stat().st_size <= embedded - weight_bytes * 0.9
    safetensors = pytest.importorskip("safetensors.numpy")  # the file is standard safetensors
    standard = safetensors.load_file(str(out / "weights.safetensors"))
    assert sorted(standard) == sorted(name for name, *_ in stored)
    seen = run_without_tvm(out, root / "feeds.npz", root / "out_sep.npz", root)
    assert seen["compiler_mapped"] is False and seen["tvm_imported"] is False
    want = ort_run(onnx.load(compiled["model"]), compiled["feeds"])["y"]
    np.testing.assert_allclose(np.load(root / "out_sep.npz")["y"], want, rtol=1e-5, atol=1e-6)


def test_weights_option_is_checked(compiled, tmp_path):
    proc = gcomp("compile", compiled["model"], "--backend", "ort", "--weights", "separate", "-o", tmp_path / "x.onnx")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "gcomp: error: --weights separate is for --backend tvm"], proc.stderr
    assert not (tmp_path / "x.onnx").exists()
    from gcomp.backends.tvm import TvmBackend

    from gcomp.errors import BackendError

    with pytest.raises(BackendError, match="weights must be one of embedded, separate"):
        TvmBackend().compile(compiled["model"], "llvm", weights="outside")


def test_safetensors_round_trip_keeps_dtype_shape_and_bytes(tmp_path):
    import ml_dtypes

    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 0, 1], dtype=bool),
               "c": np.arange(4, dtype=np.int64), "d": np.ones((2, 2), dtype=ml_dtypes.bfloat16)}
    size = artifact.write_safetensors(tmp_path / "w.safetensors", tensors)
    assert size == (tmp_path / "w.safetensors").stat().st_size
    back = artifact.read_safetensors(tmp_path / "w.safetensors")
    assert [(n, d, s) for n, d, s, _ in back] == [("a", "float32", (2, 3)), ("b", "bool", (3,)),
                                                   ("c", "int64", (4,)), ("d", "bfloat16", (2, 2))]
    for (name, _, _, raw) in back:
        assert bytes(raw) == tensors[name].tobytes()
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(artifact.ArtifactError, match="not a readable safetensors file"):
        artifact.read_safetensors(tmp_path / "bad.safetensors")


def _cuda_meta(out: Path) -> dict:
    return json.loads((out / "gcomp-tvm.json").read_text())


@pytest.mark.slow
def test_cuda_host_code_is_portable_and_the_architecture_is_the_one_asked_for(compiled, tmp_path):
    out = tmp_path / "mlp.cuda"
    env = {**os.environ, "GCOMP_NVCC": "none"}  # the source-only artifact, whatever this machine has
    proc = gcomp("compile", compiled["model"], "--target", "cuda", "--cuda-arch", "sm_90", "-o", out, env=env)
    assert proc.returncode == 0, proc.stderr
    target = json.loads(_cuda_meta(out)["tvm_target"])
    assert target["arch"] == "sm_90" and target["host"]["mcpu"] == "x86-64-v3"
    assert _cuda_meta(out)["cuda_code"] == "source" and "no nvcc found" in proc.stdout
    with pytest.raises(artifact.ArtifactError, match="CUDA C source only"):
        load(out)


@pytest.mark.parametrize(("args", "message"), [
    (["--target", "cuda", "--cuda-arch", "90"], "--cuda-arch: CUDA architecture '90' is not of the form sm_XY (e.g. sm_80, sm_90, sm_90a)"),
    (["--cuda-arch", "sm_90"], "--cuda-arch is for --backend tvm --target cuda"),
])
def test_cuda_arch_is_checked(compiled, tmp_path, args, message):
    proc = gcomp("compile", compiled["model"], *args, "-o", tmp_path / "out")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"gcomp: error: {message}"], proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.skipif(find_nvcc() is None, reason="no nvcc (pip install nvidia-cuda-nvcc)")
def test_with_nvcc_a_cuda_artifact_carries_sass_and_ptx_instead_of_source(compiled, tmp_path):
    out = tmp_path / "mlp.cuda"
    proc = gcomp("compile", compiled["model"], "--target", "cuda", "--cuda-arch", "sm_90", "--weights", "separate",
                 "-o", out, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["verification"]["status"] == "unverified"
    assert doc["artifact"]["cuda_code"] == "fatbin" and doc["artifact"]["fatbin"] == [["ptx", 90], ["sass", 90]]
    assert _cuda_meta(out)["cuda_code"] == "fatbin"
    lib = (out / "model.so").read_bytes()
    at = lib.find(struct.pack("<I", 0xBA55ED50))
    assert at > 0 and fatbin_contents(lib[at:]) == [("sass", 90), ("ptx", 90)]
    assert b"__global__" not in lib  # the CUDA C source left model.so
    # TVM's own deserializer reads the swapped module blob: with a stand-in for the CUDA
    # loader (only a driver-backed runtime registers the real one) it reaches fmt "fatbin"
    proc = subprocess.run([sys.executable, "-c", FAKE_CUDA_LOADER, str(out / "model.so")], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    (seen,) = json.loads(proc.stdout)
    assert seen["fmt"] == "fatbin" and seen["fatbin_at"] > 0
    assert (out / "weights.safetensors").stat().st_size > (out / "model.so").stat().st_size / 8


def _numpy_only(root: Path) -> Path:
    """A folder holding NumPy alone (links to the installed one and its bundled libraries)."""
    folder = root / "numpy_only"
    if not folder.exists():
        folder.mkdir()
        installed = Path(np.__file__).parent
        for name in ("numpy", "numpy.libs"):
            if (installed.parent / name).exists():
                (folder / name).symlink_to(installed.parent / name)
    return folder


@pytest.mark.slow
def test_a_bundle_runs_its_artifacts_with_python_and_numpy_alone(compiled, tmp_path):
    import tarfile

    root = compiled["root"]
    separate = root / "mlp.sep.tvm"
    if not separate.exists():
        assert gcomp("compile", compiled["model"], "-o", separate, "--weights", "separate").returncode == 0
    archive = tmp_path / "bundle.tar.gz"
    proc = gcomp("bundle", compiled["artifact"], separate, "-o", archive, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["bytes"] == archive.stat().st_size < 64 * 2**20 and doc["artifacts"] == ["mlp.tvm", "mlp.sep.tvm"]
    assert doc["tvm_runtime"] == ["libtvm_runtime.so", "libtvm_runtime_extra.so"]  # no CUDA artifact, no CUDA runtime
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        tar.extractall(tmp_path, filter="data")
    assert not [n for n in names if "libtvm_compiler" in n or n.endswith(".h")]
    bundle = tmp_path / "gcomp-tvm-bundle"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = os.pathsep.join([str(bundle), str(_numpy_only(root))])
    # -S: no site-packages, so nothing but the bundle, NumPy and the standard library
    code = "import importlib.util as u; print([u.find_spec(m) is None for m in ('gcomp', 'tvm', 'onnx', 'numpy', 'tvm_ffi')])"
    probe = subprocess.run([sys.executable, "-S", "-c", code],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60, check=False)
    assert probe.stdout.strip() == "[True, True, True, False, False]", probe.stderr
    run = subprocess.run([sys.executable, "-S", str(bundle / "gcomp_tvm_runtime.py"),
                          *[str(bundle / "artifacts" / n) for n in ("mlp.tvm", "mlp.sep.tvm")], "--check", "--iters", "2"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    verdicts = [json.loads(line) for line in run.stdout.strip().splitlines()]  # one line per artifact
    assert [Path(v["artifact"]).name for v in verdicts] == ["mlp.tvm", "mlp.sep.tvm"]
    for seen in verdicts:
        assert seen["within_tolerance"] is True and seen["tvm_imported"] is False and seen["outputs"] == {"y": [2, 10]}
        assert seen["max_abs_error"] < 1e-5
    stored = dict(np.load(bundle / "artifacts" / "mlp.tvm" / "check.npz"))
    stored["output:y"] = stored["output:y"] + 0.01  # a reference the artifact does not meet
    np.savez(bundle / "artifacts" / "mlp.tvm" / "check.npz", **stored)
    run = subprocess.run([sys.executable, "-S", str(bundle / "gcomp_tvm_runtime.py"), str(bundle / "artifacts" / "mlp.tvm"),
                          "--check", "--iters", "1"], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert run.returncode == 1 and json.loads(run.stdout)["within_tolerance"] is False, run.stdout + run.stderr


@pytest.mark.parametrize(("args", "code", "message"), [
    (["-o", "{tmp}/b.zip"], 2, "gcomp: error: {tmp}/b.zip: a bundle is a .tar.gz archive"),
    (["-o", "{tmp}/b.tar.gz", "--python", "312"], 2, "gcomp: error: --python 312: expected a version such as 3.12"),
])
def test_bundle_options_are_checked(compiled, tmp_path, args, code, message):
    proc = gcomp("bundle", compiled["artifact"], *[a.format(tmp=tmp_path) for a in args])
    assert proc.returncode == code and proc.stderr.strip().splitlines() == [message.format(tmp=tmp_path)], proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_bundling_a_folder_that_is_not_an_artifact_fails_in_one_line(tmp_path):
    proc = gcomp("bundle", tmp_path, "-o", tmp_path / "b.tar.gz")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"gcomp: error: {tmp_path}: not a gcomp TVM artifact (expected model.so and gcomp-tvm.json)"], proc.stderr
    assert not (tmp_path / "b.tar.gz").exists()


def test_a_bundle_inside_its_artifact_folder_is_refused(compiled):
    """The archive (and its scratch folder) would be packed into itself."""
    art = Path(compiled["artifact"])
    before = sorted(p.name for p in art.iterdir())
    proc = gcomp("bundle", art, "-o", art / "b.tar.gz")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"gcomp: error: -o {art / 'b.tar.gz'}: inside the artifact folder {art}; write the bundle elsewhere"], proc.stderr
    assert sorted(p.name for p in art.iterdir()) == before


def test_compile_without_verification_runs_no_reference_and_writes_no_check(compiled, tmp_path):
    out = tmp_path / "nv.tvm"
    proc = gcomp("compile", compiled["model"], "-o", out, "--no-verify")
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.so").exists() and not (out / "check.npz").exists()
