"""Installation: what a command says when an optional extra is missing (gcomp/deps.py).

A missing package is simulated without touching the environment: the CLI runs in a
subprocess whose ``sitecustomize`` (on PYTHONPATH) puts ``None`` in ``sys.modules`` for
the hidden names, which is what Python does for a module that cannot be imported
(``import tvm`` raises ModuleNotFoundError, ``importlib.util.find_spec`` answers None).
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
