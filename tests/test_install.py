"""Installation: what a command says when an optional extra is missing, or when two ONNX
Runtime builds are installed (gcomp/deps.py), and what the core installs alone.

A missing package is simulated without touching the environment: the CLI runs in a
subprocess whose ``sitecustomize`` (on PYTHONPATH) puts ``None`` in ``sys.modules`` for
the hidden names, which is what Python does for a module that cannot be imported
(``import tvm`` raises ModuleNotFoundError, ``importlib.util.find_spec`` answers None).
A second ONNX Runtime build is simulated by a fake dist-info folder on PYTHONPATH, which is
all that ``importlib.metadata`` (and pip) read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gcomp import deps
from gcomp.errors import GcompError

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "models" / "default.onnx"
TVM_LINE = "gcomp: error: the TVM backend needs apache-tvm, which is not installed: pip install 'gcomp[tvm]'"

SITECUSTOMIZE = """\
import os, sys
for _name in os.environ.get("GCOMP_TEST_HIDE", "").split(","):
    if _name:
        sys.modules[_name] = None
"""


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hide")
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return folder


def gcomp(*args, hide: str = "", pythonpath: list[Path] = (), cwd=None) -> subprocess.CompletedProcess:
    """``python -m gcomp ARGS`` with the modules in ``hide`` (comma-separated) missing."""
    env = {**os.environ, "GCOMP_TEST_HIDE": hide, "PYTHONPATH": os.pathsep.join(map(str, pythonpath))}
    return subprocess.run([sys.executable, "-m", "gcomp", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def one_line(proc: subprocess.CompletedProcess, code: int = 1) -> str:
    """The single stderr line of a failed command (no traceback), checked."""
    assert proc.returncode == code, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_compile_without_tvm_names_the_extra(shim, tmp_path):
    out = tmp_path / "model.tvm"
    proc = gcomp("compile", DEFAULT, "-o", out, hide="tvm,tvm_ffi", pythonpath=[shim])
    assert one_line(proc) == TVM_LINE
    assert not out.exists()
    proc = gcomp("profile", DEFAULT, "--backend", "tvm", "-q", hide="tvm,tvm_ffi", pythonpath=[shim])
    assert one_line(proc) == TVM_LINE


def test_tuning_without_its_cost_model_names_the_extra(shim):
    proc = gcomp("compile", DEFAULT, "--tune-trials", "4", hide="xgboost", pythonpath=[shim])
    assert one_line(proc) == ("gcomp: error: tuning TVM kernels (--tune-trials) needs xgboost, which is not "
                              "installed: pip install 'gcomp[tvm]'")


def test_backend_auto_skips_a_missing_tvm_with_a_note(shim):
    proc = gcomp("compile", DEFAULT, "--backend", "auto", "--json", hide="tvm,tvm_ffi", pythonpath=[shim])
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["backend"] == "ort" and doc["selection"]["chosen"] == "ort/cpu"
    skipped = [c for c in doc["selection"]["candidates"] if c["status"] == "skipped"]
    assert [(c["backend"], c["error"]) for c in skipped] == [("tvm", TVM_LINE.removeprefix("gcomp: error: "))]
    # the printed table shows the note as written (rich would eat "[tvm]" as markup)
    proc = gcomp("compile", DEFAULT, "--backend", "auto", hide="tvm,tvm_ffi", pythonpath=[shim])
    assert proc.returncode == 0, proc.stderr
    assert "tvm/llvm: skipped, " + TVM_LINE.removeprefix("gcomp: error: ") in " ".join(proc.stdout.split())


def test_run_over_mpi_without_mpi4py_names_the_extra(shim, tmp_path):
    proc = gcomp("run", DEFAULT, "--ranks", "2", hide="mpi4py", pythonpath=[shim])
    assert one_line(proc) == ("gcomp: error: running on MPI ranks needs mpi4py, which is not installed: "
                              "pip install 'gcomp[distributed]' (or run every rank in this process with --simulate)")
    # what needs no MPI still works: a simulated run, and sharding
    proc = gcomp("run", DEFAULT, "--ranks", "2", "--simulate", "-q", hide="mpi4py", pythonpath=[shim])
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "tp2.onnx"
    proc = gcomp("shard", DEFAULT, "-o", out, "--shard", "tp=2", "-q", hide="mpi4py", pythonpath=[shim])
    assert proc.returncode == 0 and out.is_file(), proc.stderr


def test_no_mpiexec_names_the_extra(monkeypatch, tmp_path):
    from gcomp.distributed.launch import find_mpiexec

    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(deps.MissingExtraError, match=r"needs mpiexec.*pip install 'gcomp\[distributed\]'"):
        find_mpiexec()


def test_require_raises_one_line_and_never_imports(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    assert deps.missing("mpi4py") and not deps.missing("json")
    assert deps.missing("gcomp_no_such_module_anywhere")
    with pytest.raises(deps.MissingExtraError) as caught:
        deps.require("running on MPI ranks", "json", "mpi4py")
    assert str(caught.value) == ("running on MPI ranks needs mpi4py, which is not installed: "
                                 "pip install 'gcomp[distributed]'")
    assert isinstance(caught.value, GcompError) and caught.value.exit_code == 1
    deps.require("anything", "json")  # installed: no error
    # the table knows every package an extra brings that gcomp imports
    assert {extra for extra, _ in deps.EXTRAS.values()} == {"tvm", "distributed"}


def fake_build(folder: Path, name: str, version: str, top_level: str | None = "onnxruntime",
               record: str = "") -> None:
    """A dist-info folder as pip writes it for distribution ``name`` (nothing installed beside it)."""
    info = folder / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    if top_level is not None:
        (info / "top_level.txt").write_text(top_level + "\n")
    if record:
        (info / "RECORD").write_text(record)


def test_two_onnxruntime_builds_stop_gcomp_in_one_line(tmp_path):
    real = deps.onnxruntime_builds()
    assert len(real) == 1, real  # the test environment itself holds one build
    other = "onnxruntime-gpu" if "onnxruntime" in real else "onnxruntime"
    fake_build(tmp_path / "site", other, "1.2.3")
    builds = {**real, other: "1.2.3"}
    gpu = "onnxruntime-gpu"
    out = tmp_path / "out.onnx"
    line = one_line(gcomp("optimize", DEFAULT, "-o", out, pythonpath=[tmp_path / "site"]))
    assert line == (f"gcomp: error: 2 ONNX Runtime builds are installed (onnxruntime {builds['onnxruntime']}, "
                    f"{gpu} {builds[gpu]}); they share the 'onnxruntime' package folder, so none can be trusted: "
                    f"keep one with pip uninstall -y onnxruntime {gpu} && pip install {gpu} "
                    f"(or onnxruntime for the CPU only)")
    assert not out.exists()
    # a command that runs no model is not stopped; python -m gcomp.deps lists both builds
    assert gcomp("inspect", DEFAULT, "-q", pythonpath=[tmp_path / "site"]).returncode == 0
    listed = subprocess.run([sys.executable, "-m", "gcomp.deps"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert listed.stdout.split() == ["onnxruntime", gpu], listed.stderr


def test_no_onnxruntime_is_one_line(shim, tmp_path):
    out = tmp_path / "out.onnx"
    proc = gcomp("optimize", DEFAULT, "-o", out, hide="onnxruntime", pythonpath=[shim])
    assert one_line(proc) == ("gcomp: error: ONNX Runtime is not installed: pip install onnxruntime "
                              "(or onnxruntime-gpu for CUDA; never both)")
    assert not out.exists()

def test_onnxruntime_builds_are_told_by_the_package_they_install(tmp_path, monkeypatch):
    fake_build(tmp_path, "onnxruntime-genai", "0.5.0", top_level="onnxruntime_genai")  # another package
    fake_build(tmp_path, "onnxruntime-directml", "1.20.0", top_level=None, record="onnxruntime/__init__.py,,\n")
    assert deps.onnxruntime_builds([str(tmp_path)]) == {"onnxruntime-directml": "1.20.0"}
    deps.check_onnxruntime([str(tmp_path)])  # one build: fine
    fake_build(tmp_path, "onnxruntime", "1.20.0")
    with pytest.raises(GcompError, match=r"^2 ONNX Runtime builds are installed \(onnxruntime 1\.20\.0, "
                                         r"onnxruntime-directml 1\.20\.0\);.* pip uninstall -y onnxruntime "
                                         r"onnxruntime-directml && pip install onnxruntime-directml \(or"):
        deps.check_onnxruntime([str(tmp_path)])
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(GcompError, match=r"^ONNX Runtime is not installed: pip install onnxruntime \(or "
                                         r"onnxruntime-gpu for CUDA; never both\)$"):
        deps.check_onnxruntime([str(tmp_path / "nothing")])


@pytest.mark.slow
def test_the_core_installs_alone_and_runs(tmp_path):
    """A fresh venv with ``pip install gcomp`` (the wheel of this tree, its core
    dependencies resolved by pip as a user's are) holds ONNX Runtime's plain build and no
    heavy extra; gcomp optimize works there, and the commands that need an extra say which."""
    wheels = tmp_path / "wheel"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(wheels)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py, exe = venv / "bin" / "python", venv / "bin" / "gcomp"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
                              *wheels.glob("gcomp-*.whl")], capture_output=True, text=True, env=env, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]

    def run(*args):
        return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=env, cwd=tmp_path,
                              timeout=300)

    code = ("import importlib.util as u, json, gcomp.deps as d; print(json.dumps([d.onnxruntime_builds(), "
            "[m for m in ('tvm', 'tvm_ffi', 'mpi4py', 'xgboost', 'cloudpickle', 'torch') if u.find_spec(m)]]))")
    probe = subprocess.run([str(py), "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                           timeout=120)
    builds, heavy = json.loads(probe.stdout)
    assert list(builds) == ["onnxruntime"] and heavy == [], probe.stdout + probe.stderr
    out = tmp_path / "default.opt.onnx"
    done = run("optimize", DEFAULT, "-o", out, "-q")
    assert done.returncode == 0 and out.is_file(), done.stderr
    assert one_line(run("compile", DEFAULT)) == TVM_LINE
    assert "pip install 'gcomp[distributed]'" in one_line(run("run", DEFAULT, "--ranks", "2"))
