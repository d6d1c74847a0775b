"""Packaging: a real wheel installs gcomp.passes / gcomp.backends and no stray top-level module."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    (path,) = out.glob("gcomp-*.whl")
    return path


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"gcomp"}
    for folder, package in (("passes", "gcomp/passes"), ("backends", "gcomp/backends")):
        for src in (REPO / folder).rglob("*.py"):
            rel = src.relative_to(REPO / folder).as_posix()
            assert f"{package}/{rel}" in names, f"{folder}/{rel} missing from the wheel"
    assert "gcomp/schemas/report.schema.json" in names


def test_wheel_imports_in_isolation(wheel, tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    code = (
        "import json, importlib.util, gcomp, gcomp.passes, gcomp.backends, gcomp.backends.ort, gcomp.registry\n"
        "print(json.dumps({'gcomp': gcomp.__file__, 'passes': gcomp.passes.__file__,"
        " 'backends': gcomp.backends.__file__, 'pipelines': sorted(gcomp.registry.pipelines()),"
        " 'top_passes': importlib.util.find_spec('passes') is not None,"
        " 'top_backends': importlib.util.find_spec('backends') is not None}))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout)
    for key in ("gcomp", "passes", "backends"):
        assert info[key].startswith(str(site)), info
    assert info["pipelines"][:2] == ["O0", "O1"]
    assert not info["top_passes"] and not info["top_backends"]


def _requirements(wheel: Path):
    from packaging.requirements import Requirement

    names = zipfile.ZipFile(wheel).namelist()
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    return [Requirement(line.split(":", 1)[1].strip()) for line in meta.splitlines() if line.startswith("Requires-Dist:")]


def test_dependency_markers(wheel):
    """The core is light: plain onnxruntime on every platform and never onnxruntime-gpu,
    in no extra (the two install into one folder and must never meet; README,
    "Installing"); TVM and MPI only behind their extras; [all] brings both, [test] all."""
    reqs = _requirements(wheel)

    def wanted(env: dict, extra: str | None) -> set[str]:
        """Distribution names installed for ``extra``, gcomp's own extras expanded."""
        names = set()
        for r in reqs:
            if r.marker is None or r.marker.evaluate({**env, "extra": extra or ""}):
                if r.name == "gcomp":
                    for inner in r.extras:
                        names |= wanted(env, inner)
                else:
                    names.add(r.name)
        return names

    linux = {"sys_platform": "linux", "platform_machine": "x86_64"}
    mac = {"sys_platform": "darwin", "platform_machine": "arm64"}
    arm = {"sys_platform": "linux", "platform_machine": "aarch64"}
    heavy = {"apache-tvm", "apache-tvm-ffi", "xgboost", "xgboost-cpu", "cloudpickle", "mpi4py", "mpich"}
    for env in (linux, mac, arm):
        core = wanted(env, None)
        assert "onnxruntime" in core and not (core & heavy), core
        for extra in ("tvm", "distributed", "all", "test", "bench", "export"):
            assert "onnxruntime-gpu" not in wanted(env, extra), extra
        assert {"apache-tvm", "apache-tvm-ffi", "cloudpickle"} <= wanted(env, "tvm") - core
        assert "mpi4py" in wanted(env, "distributed")
        assert wanted(env, "all") == wanted(env, "tvm") | wanted(env, "distributed")
        assert wanted(env, "all") <= wanted(env, "test")
    assert "xgboost-cpu" in wanted(linux, "tvm") and "xgboost" in wanted(mac, "tvm")
    assert "mpich" in wanted(linux, "distributed") and "mpich" not in wanted(mac, "distributed")
    pins = {r.name: str(r.specifier) for r in reqs}
    assert pins["apache-tvm-ffi"] == "==0.1.14.post1"
