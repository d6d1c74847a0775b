"""``gcomp bundle``: one archive with what a machine needs to run TVM artifacts, and no more.

A machine that runs artifacts needs neither gcomp nor TVM's compiler (``libtvm_compiler.so``,
259 MB in apache-tvm 0.27), only the runtime. The archive (``.tar.gz``) unpacks to
``gcomp-tvm-bundle/``:

- ``gcomp_tvm_runtime.py``: the loader (:mod:`~gcomp.backends.tvm.artifact`, which imports
  nothing from gcomp); ``python gcomp_tvm_runtime.py artifacts/NAME --check`` runs an
  artifact on the inputs stored in it and compares with ONNX Runtime's outputs;
- ``tvm_runtime/``: ``libtvm_runtime.so`` and ``libtvm_runtime_extra.so`` (sort, top-k)
  from the installed apache-tvm; for CUDA artifacts also ``libtvm_runtime_cuda.so`` and
  CUDA's ``libcudart.so.13`` it links to (from an installed or given
  ``nvidia-cuda-runtime`` 13 wheel, when one is found);
- ``tvm_ffi/`` and ``typing_extensions.py`` (tvm_ffi's one dependency): the installed
  tvm_ffi when the target Python is this one, else the ``tvm_ffi`` of an
  ``apache-tvm-ffi`` wheel for that Python, given with ``--wheel`` or fetched with ``pip
  download`` (the installed version, ``--python-version``, manylinux x86-64 binaries);
  C++ headers, sources and test libraries are left out;
- ``artifacts/NAME/``: each artifact folder as it is.

With ``PYTHONPATH`` at the unpacked folder, Python and NumPy are all the target machine
needs (and the NVIDIA driver for CUDA artifacts).
"""

from __future__ import annotations

__all__ = ["ROOT", "unpacked_size", "write_bundle"]

import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from gcomp.backends.tvm import artifact
from gcomp.errors import BackendError, OptionError

ROOT = "gcomp-tvm-bundle"
# Parts of tvm_ffi a loader never reads: C++ headers and sources, Cython sources, CMake
# files, bytecode caches. (core.so links libtvm_ffi_testing.so, so that one stays.)
_FFI_SKIP = ("include/", "3rdparty/", "src/", "share/", "cython/", "__pycache__/")


def _package_dir(name: str) -> Path:
    for entry in sys.path:
        folder = Path(entry or ".") / name
        if (folder / "__init__.py").is_file():
            return folder
    raise BackendError(f"bundle: {name} is not installed here")


def _ffi_version() -> str:
    from importlib.metadata import version

    return version("apache-tvm-ffi")


def _keep(relative: str) -> bool:
    """Whether a file of the tvm_ffi package (path relative to it) goes into the bundle."""
    for part in _FFI_SKIP:
        if part.endswith("/") and f"/{part}" in f"/{relative}":
            return False
        if relative == part:
            return False
    return True


def _download(spec: str, python: str, into: Path) -> Path:
    """``pip download`` one binary wheel of ``spec`` for ``python`` on manylinux x86-64."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", python,
           "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_27_x86_64", "--platform",
           "manylinux2014_x86_64", "-d", str(into), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise BackendError(f"bundle: pip download {spec} for Python {python} failed ({last}); give the wheel "
                           "with --wheel instead")
    return wheels[0]


def _wheel(wheels: Sequence[Path], prefix: str, python: str | None) -> Path | None:
    tag = f"-cp{python.replace('.', '')}-" if python else ""
    for w in wheels:
        if w.name.startswith(prefix) and tag in w.name:
            return w
    return None


def _add_ffi(tar: tarfile.TarFile, python: str, wheels: Sequence[Path], scratch: Path) -> str:
    """tvm_ffi into the archive; returns where it came from."""
    if python == f"{sys.version_info.major}.{sys.version_info.minor}" and not _wheel(wheels, "apache_tvm_ffi", None):
        folder = _package_dir("tvm_ffi")
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder).as_posix()
            if path.is_file() and _keep(rel):
                tar.add(path, f"{ROOT}/tvm_ffi/{rel}")
        return f"installed tvm_ffi {_ffi_version()} ({folder})"
    wheel = _wheel(wheels, "apache_tvm_ffi", python) or _download(f"apache-tvm-ffi=={_ffi_version()}", python, scratch)
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith("tvm_ffi/") and not name.endswith("/") and _keep(name[len("tvm_ffi/"):]):
                _add_bytes(tar, f"{ROOT}/{name}", z.read(name), executable=name.endswith(".so"))
    return wheel.name


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, *, executable: bool = False) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o755 if executable else 0o644
    tar.addfile(info, io.BytesIO(data))


def _cudart(wheels: Sequence[Path], python: str, scratch: Path) -> tuple[bytes, str] | None:
    """``libcudart.so.13`` from a given or installed nvidia-cuda-runtime 13 wheel, else pip's."""
    name = "libcudart.so.13"
    given = _wheel(wheels, "nvidia_cuda_runtime", None)
    if given is None:
        for entry in sys.path:
            found = Path(entry or ".") / "nvidia" / "cu13" / "lib" / name
            if found.is_file():
                return found.read_bytes(), str(found)
        given = _download("nvidia-cuda-runtime==13.0.*", python, scratch)
    with zipfile.ZipFile(given) as z:
        for member in z.namelist():
            if member.endswith(f"/{name}"):
                return z.read(member), given.name
    return None


def _add_runtime(tar: tarfile.TarFile, cuda: bool, wheels: Sequence[Path], python: str, scratch: Path) -> dict:
    lib = _package_dir("tvm") / "lib"
    names = ["libtvm_runtime.so", "libtvm_runtime_extra.so"] + (["libtvm_runtime_cuda.so"] if cuda else [])
    for name in names:
        if (lib / name).is_file():
            tar.add(lib / name, f"{ROOT}/tvm_runtime/{name}")
    found = {"tvm_runtime": [n for n in names if (lib / n).is_file()]}
    if cuda:
        got = _cudart(wheels, python, scratch)
        if got is not None:
            _add_bytes(tar, f"{ROOT}/tvm_runtime/libcudart.so.13", got[0], executable=True)
            found["cudart"] = got[1]
    return found


def write_bundle(
    artifacts: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    python: str | None = None,
    wheels: Sequence[str | os.PathLike] = (),
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Write the archive (see the module's docstring) for ``python`` (``3.12``; default:
    this interpreter's version); returns a summary with its size. Atomic."""
    say = progress or (lambda _m: None)
    out = Path(output)
    if not out.name.endswith((".tar.gz", ".tgz")):
        raise OptionError(f"{out}: a bundle is a .tar.gz archive")
    python = python or f"{sys.version_info.major}.{sys.version_info.minor}"
    folders = [Path(a) for a in artifacts]
    metas = [artifact.read_meta(f) for f in folders]
    names = [f.resolve().name for f in folders]
    if len(set(names)) != len(names):
        raise OptionError("bundle: two artifacts with the same folder name")
    given = [Path(w) for w in wheels]
    for w in given:
        if not (w.is_file() and w.suffix == ".whl"):
            raise OptionError(f"--wheel {w}: not a wheel file")
    for folder in folders:  # the archive (and its scratch folder) would be packed into itself
        if out.resolve().is_relative_to(folder.resolve()):
            raise OptionError(f"-o {out}: inside the artifact folder {folder}; write the bundle elsewhere")
    cuda = any(m.get("target") == "cuda" for m in metas)
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gcomp-bundle-", dir=out.resolve().parent) as tmp:
        scratch = Path(tmp)
        partial = scratch / "bundle.tar.gz"
        with tarfile.open(partial, "w:gz", compresslevel=6) as tar:
            tar.add(Path(artifact.__file__), f"{ROOT}/gcomp_tvm_runtime.py")
            say("adding TVM's runtime libraries")
            summary = _add_runtime(tar, cuda, given, python, scratch)
            say("adding tvm_ffi")
            summary["tvm_ffi"] = _add_ffi(tar, python, given, scratch)
            tar.add(_module_file("typing_extensions"), f"{ROOT}/typing_extensions.py")
            for folder, name in zip(folders, names):
                say(f"adding {folder}")
                tar.add(folder, f"{ROOT}/artifacts/{name}")
        os.replace(partial, out)
    return {"output": str(out), "bytes": out.stat().st_size, "unpacked_bytes": unpacked_size(out), "python": python,
            "artifacts": names, **summary}


def _module_file(name: str) -> Path:
    for entry in sys.path:
        path = Path(entry or ".") / f"{name}.py"
        if path.is_file():
            return path
    raise BackendError(f"bundle: {name} is not installed here")


def unpacked_size(archive: str | os.PathLike) -> int:
    """Bytes the archive's files take once unpacked."""
    with tarfile.open(archive) as tar:
        return sum(m.size for m in tar.getmembers() if m.isfile())

