"""Running an exported gcomp TVM artifact with the TVM runtime alone.

An artifact is a folder: ``model.so`` (the Relax VM executable and its kernels),
``gcomp-tvm.json`` (inputs, outputs, target, kernel map), and, when the weights were
kept out of ``model.so`` (``gcomp compile --weights separate``), ``weights.safetensors``.
:func:`load` opens one and returns an :class:`Artifact` with ``input_names``,
``output_names`` and ``run(feeds) -> outputs``.

What this module guarantees:

- It needs only NumPy, ``tvm_ffi`` and TVM's runtime libraries (``libtvm_runtime.so``;
  ``libtvm_runtime_cuda.so`` and CUDA's ``libcudart`` for ``cuda`` artifacts). It never
  imports the ``tvm`` Python package, so it never loads ``libtvm_compiler.so`` (259 MB
  in apache-tvm 0.27) and works where only the runtime is installed.
- It imports nothing from gcomp (its errors subclass gcomp's ``BackendError`` when gcomp
  is importable), so the file travels alone: ``gcomp bundle`` ships it as
  ``gcomp_tvm_runtime.py`` beside the runtime libraries, and ``python
  gcomp_tvm_runtime.py ARTIFACT --check`` runs the inputs the artifact was verified on
  and compares with the reference outputs stored beside it (``check.npz``).
- The runtime libraries are looked for beside this file (``tvm_runtime/``, the bundle's
  layout), then in ``tvm/lib`` of every ``sys.path`` entry (an installed apache-tvm).
- Weights are written and read as safetensors (a JSON header and raw little-endian
  bytes; :func:`write_safetensors`, :func:`read_safetensors`), readable by the
  ``safetensors`` package too.
"""

from __future__ import annotations

__all__ = [
    "CHECK_FILE",
    "LIB_FILE",
    "META_FILE",
    "WEIGHTS_FILE",
    "Artifact",
    "ArtifactError",
    "Machine",
    "input_tensors",
    "load",
    "native_stderr_off",
    "read_meta",
    "read_safetensors",
    "runtime_function",
    "write_safetensors",
]

import contextlib
import ctypes
import json
import mmap
import os
import struct
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

try:  # inside gcomp its errors are gcomp's; in a bundle the file stands alone
    from gcomp.errors import BackendError as _Base
except ImportError:  # pragma: no cover - exercised by the bundle test in a subprocess
    _Base = RuntimeError

META_FILE = "gcomp-tvm.json"
LIB_FILE = "model.so"
WEIGHTS_FILE = "weights.safetensors"
CHECK_FILE = "check.npz"
_DEVICE_TYPES = {"llvm": 1, "cuda": 2}  # DLPack's kDLCPU, kDLCUDA
_POOLED_ALLOCATOR = 2
_LOADED: dict[str, Any] = {}


class ArtifactError(_Base):
    """The artifact cannot be opened or run here; the message says why in one line."""


def input_tensors(machine: Any, names: Sequence[str], dtypes: Mapping[str, str],
                  feeds: Mapping[str, np.ndarray]) -> list:
    """``feeds`` for ``names`` as ``machine``'s device tensors, in order; a missing input or
    one of another dtype than ``dtypes`` says is one line (for loaded artifacts and for
    executables compiled in this process alike)."""
    missing = [n for n in names if n not in feeds]
    if missing:
        raise ArtifactError(f"tvm: missing inputs: {', '.join(missing)}")
    args = []
    for name in names:
        arr = np.ascontiguousarray(feeds[name])
        want = dtypes.get(name)
        if want and arr.dtype.name != want:
            raise ArtifactError(f"tvm: input '{name}' is {arr.dtype.name}, the model takes {want}")
        args.append(machine.tensor(arr))
    return args


@contextlib.contextmanager
def native_stderr_off():
    """Silence TVM's C++ log lines (written straight to file descriptor 2, e.g. a warning
    per memory scope when a VM executable loads) around a call; errors still arrive as
    exceptions."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# -- the runtime libraries -------------------------------------------------------


def _library_dirs() -> list[Path]:
    """Where ``libtvm_runtime.so`` is: the folder of the one already loaded when the full
    ``tvm`` package was imported first (never a second copy), beside this file (a
    bundle), or an installed apache-tvm's ``tvm/lib``."""
    dirs = []
    loaded = getattr(getattr(sys.modules.get("tvm"), "base", None), "_LOADED_LIBS", {}).get("tvm_runtime")
    if loaded is not None:
        dirs.append(Path(loaded._name).resolve().parent)
    dirs.append(Path(__file__).resolve().parent / "tvm_runtime")
    dirs += [Path(p or ".") / "tvm" / "lib" for p in sys.path]
    return [d for d in dirs if (d / "libtvm_runtime.so").is_file()]


def _settle_threads() -> None:
    """Kernels run on every core unless TVM_NUM_THREADS or OMP_NUM_THREADS says otherwise
    (TVM's own default idles half the cores of a machine without hyper-threads). Only
    before anything started TVM's thread pool: changing the count later stalls kernels."""
    if sys.modules.get("tvm") is not None or any(os.environ.get(v, "").strip().isdigit()
                                   for v in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")):
        return
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
    except ImportError:
        cores = None
    os.environ["TVM_NUM_THREADS"] = str(cores or os.cpu_count() or 1)


def _load_runtime(kind: str = "llvm") -> None:
    """``libtvm_runtime.so`` (and ``libtvm_runtime_extra.so``: sort, top-k), plus the CUDA
    runtime for ``cuda``; once per process."""
    if "runtime" not in _LOADED:
        # tvm_ffi's import otherwise imports torch, where installed, and may JIT-build a C++
        # addon for torch tensors; this loader passes NumPy arrays only.
        os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
        try:
            import tvm_ffi  # noqa: F401  (loads libtvm_ffi.so, which the runtime links to)
        except ImportError as e:
            raise ArtifactError(f"the TVM runtime needs tvm_ffi (pip install apache-tvm-ffi): {e}") from None
        dirs = _library_dirs()
        if not dirs:
            raise ArtifactError("no TVM runtime library (libtvm_runtime.so) beside this loader or in an "
                                "installed apache-tvm (tvm/lib on sys.path)")
        _settle_threads()
        _LOADED["runtime"] = ctypes.CDLL(str(dirs[0] / "libtvm_runtime.so"), mode=ctypes.RTLD_GLOBAL)
        _LOADED["dir"] = dirs[0]
        extra = dirs[0] / "libtvm_runtime_extra.so"
        if extra.is_file():
            _LOADED["extra"] = ctypes.CDLL(str(extra), mode=ctypes.RTLD_LOCAL)
    if kind == "cuda" and "cuda" not in _LOADED:
        _load_cudart()
        try:
            _LOADED["cuda"] = ctypes.CDLL(str(_LOADED["dir"] / "libtvm_runtime_cuda.so"), mode=ctypes.RTLD_LOCAL)
        except OSError as e:
            raise ArtifactError(f"TVM's CUDA runtime does not load here: {e}") from None


def _load_cudart() -> None:
    """CUDA's runtime library that ``libtvm_runtime_cuda.so`` links to (``libcudart.so.13``
    for apache-tvm 0.27), from the bundle or a pip ``nvidia-cuda-runtime`` if present;
    otherwise the system's loader path decides."""
    name = "libcudart.so.13"
    places = [_LOADED["dir"] / name] + [Path(p or ".") / "nvidia" / sub / "lib" / name
                                         for p in sys.path for sub in ("cu13", "cuda_runtime")]
    for path in places:
        if path.is_file():
            with_path = str(path)
            break
    else:
        return
    try:
        _LOADED["cudart"] = ctypes.CDLL(with_path, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        raise ArtifactError(f"{with_path}: does not load: {e}") from None


def runtime_function(name: str, kind: str = "llvm"):
    """A global function of TVM's runtime (``runtime.NumThreads``...), the libraries loaded."""
    _load_runtime(kind)
    import tvm_ffi

    return tvm_ffi.get_global_func(name)


# -- a Relax VM on one device ----------------------------------------------------


class Machine:
    """The Relax VM of a runtime module on the CPU (``llvm``) or the first CUDA GPU."""

    def __init__(self, module, kind: str) -> None:
        import tvm_ffi

        _load_runtime(kind)
        code = _DEVICE_TYPES[kind]
        if kind == "cuda" and not runtime_function("runtime.GetDeviceAttr")(code, 0, 0):
            raise ArtifactError("no CUDA GPU visible to TVM's CUDA runtime")
        self.kind = kind
        self.device = tvm_ffi.device("cuda" if kind == "cuda" else "cpu", 0)
        self.vm = module["vm_load_executable"]()
        init = [code, 0, _POOLED_ALLOCATOR] + ([1, 0, _POOLED_ALLOCATOR] if kind == "cuda" else [])
        self.vm["vm_initialization"](*init)
        self.main = self.vm["main"]
        self._alloc = runtime_function("runtime.TVMTensorAllocWithScope")
        self._from_bytes = runtime_function("runtime.TVMTensorCopyFromBytes")
        self._to_bytes = runtime_function("runtime.TVMTensorCopyToBytes")
        self._sync = runtime_function("runtime.Device_StreamSync")

    def tensor(self, data, dtype: str | None = None, shape=None):
        """A device tensor holding ``data`` (a NumPy array, or raw bytes with dtype and shape)."""
        import tvm_ffi

        if isinstance(data, np.ndarray):
            data = np.ascontiguousarray(data)
            dtype, shape = str(data.dtype), data.shape
        buf = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
        t = self._alloc(tvm_ffi.Shape([int(d) for d in shape]), tvm_ffi.dtype(dtype), self.device, None)
        self._from_bytes(t, buf.ctypes.data_as(ctypes.c_void_p), buf.nbytes)
        return t

    def numpy(self, t) -> np.ndarray:
        """A NumPy copy of a tensor on any device."""
        name = str(t.dtype)
        try:
            dtype = np.dtype(name)
        except TypeError:
            import ml_dtypes  # bfloat16, float8 types

            dtype = np.dtype(getattr(ml_dtypes, name))
        out = np.empty(tuple(t.shape), dtype)
        self._to_bytes(t, out.ctypes.data_as(ctypes.c_void_p), out.nbytes)
        return out

    def flatten(self, result) -> list[np.ndarray]:
        """The tensors of a VM result (a tensor or nested tuples of them), as NumPy arrays."""
        import tvm_ffi

        if isinstance(result, tvm_ffi.Tensor):
            return [self.numpy(result)]
        return [a for item in result for a in self.flatten(item)]

    def sync(self) -> None:
        self._sync(self.device, 0)

    def set_instrument(self, instrument) -> None:
        """Call ``instrument(func, symbol, before, ret, *args)`` around every VM call."""
        self.vm["set_instrument"](instrument)


# -- weights ---------------------------------------------------------------------

_ST_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
             "int32": "I32", "int16": "I16", "int8": "I8", "uint64": "U64", "uint32": "U32", "uint16": "U16",
             "uint8": "U8", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
_ST_NAMES = {v: k for k, v in _ST_CODES.items()}


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray]) -> int:
    """Write ``tensors`` in order as a safetensors file; returns its size in bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "gcomp-tvm"}}
    offset = 0
    arrays = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        code = _ST_CODES.get(str(arr.dtype))
        if code is None:
            raise ArtifactError(f"weight '{name}': dtype {arr.dtype} has no safetensors code")
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for arr in arrays:
            f.write(arr.reshape(-1).view(np.uint8).data)
    return 8 + len(raw) + offset


def read_safetensors(path: str | os.PathLike) -> list[tuple[str, str, tuple[int, ...], memoryview]]:
    """``(name, dtype, shape, raw bytes)`` of every tensor of a safetensors file, in file
    order; the bytes are a view of the mapped file (no copy)."""
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        (size,) = struct.unpack_from("<Q", mm, 0)
        header = json.loads(bytes(mm[8:8 + size]))
    except (OSError, ValueError, struct.error) as e:
        raise ArtifactError(f"{path}: not a readable safetensors file: {e}") from None
    body = memoryview(mm)[8 + size:]
    entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
    entries.sort(key=lambda kv: kv[1]["data_offsets"][0])
    out = []
    for name, info in entries:
        begin, end = info["data_offsets"]
        if info["dtype"] not in _ST_NAMES or end > len(body):
            raise ArtifactError(f"{path}: tensor '{name}' has dtype {info['dtype']} or bytes this file lacks")
        out.append((name, _ST_NAMES[info["dtype"]], tuple(info["shape"]), body[begin:end]))
    return out


# -- an artifact -----------------------------------------------------------------


class Artifact:
    """An exported artifact opened on the TVM runtime: ``run(feeds)`` on its device."""

    def __init__(self, folder: Path, meta: dict, module) -> None:
        self.folder = folder
        self.meta = meta
        self.kind = meta["target"]
        self.input_names = [i["name"] for i in meta["inputs"]]
        self.output_names = list(meta["outputs"])
        self._dtypes = {i["name"]: i["dtype"] for i in meta["inputs"] if i.get("dtype")}
        self._module = module
        self._machine: Machine | None = None
        self._weights: list | None = None

    @property
    def machine(self) -> Machine:
        """The VM on this artifact's device, made at first use."""
        if self._machine is None:
            self._machine = Machine(self._module, self.kind)
        return self._machine

    def weights(self) -> list:
        """The separate weights as device tensors, in the order ``main`` takes them."""
        if self._weights is None:
            want = (self.meta.get("weights") or {}).get("names", [])
            found = {}
            if want:
                found = {n: (d, s, b) for n, d, s, b in read_safetensors(self.folder / WEIGHTS_FILE)}
            missing = [n for n in want if n not in found]
            if missing:
                raise ArtifactError(f"{self.folder / WEIGHTS_FILE}: lacks weight(s) {', '.join(missing[:3])}")
            self._weights = [self.machine.tensor(found[n][2], found[n][0], found[n][1]) for n in want]
        return self._weights

    def arguments(self, feeds: Mapping[str, np.ndarray]) -> list:
        """``main``'s arguments: the inputs on the device, then the weights."""
        return input_tensors(self.machine, self.input_names, self._dtypes, feeds) + self.weights()

    def outputs(self, result) -> dict[str, np.ndarray]:
        flat = self.machine.flatten(result)
        if len(flat) != len(self.output_names):
            raise ArtifactError(f"tvm: {len(flat)} outputs for {len(self.output_names)} graph outputs")
        return dict(zip(self.output_names, flat))

    def run(self, feeds: Mapping[str, np.ndarray], **_ignored: Any) -> dict[str, np.ndarray]:
        args = self.arguments(feeds)
        try:
            return self.outputs(self.machine.main(*args))
        except ArtifactError:
            raise
        except Exception as e:
            raise ArtifactError(f"tvm: run failed: {_message(e)}") from None


def _message(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip() and not ln.startswith(("  ", "File "))]
    return (lines[-1] if lines else type(e).__name__)[:300]


def read_meta(folder: str | os.PathLike) -> dict:
    """``gcomp-tvm.json`` of an artifact folder, checked to be one."""
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file() or not (folder / LIB_FILE).is_file():
        raise ArtifactError(f"{folder}: not a gcomp TVM artifact (expected {LIB_FILE} and {META_FILE})")
    try:
        return json.loads(meta_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ArtifactError(f"{meta_path}: unreadable: {e}") from None


def load(path: str | os.PathLike) -> Artifact:
    """Open an artifact folder on the TVM runtime alone (see the module's docstring)."""
    folder = Path(path)
    meta = read_meta(folder)
    kind = meta.get("target")
    if kind not in _DEVICE_TYPES:
        raise ArtifactError(f"{folder}: target {kind!r} is not one this loader runs (llvm, cuda)")
    if kind == "cuda" and meta.get("cuda_code", "source") == "source":
        raise ArtifactError(f"{folder}: holds CUDA C source only, which the TVM runtime cannot load; "
                            "compile it again where nvcc is found (pip install nvidia-cuda-nvcc)")
    _load_runtime(kind)
    import tvm_ffi

    try:
        with native_stderr_off():
            module = tvm_ffi.load_module(str(folder / LIB_FILE))
    except Exception as e:
        raise ArtifactError(f"{folder / LIB_FILE}: cannot load: {_message(e)}") from None
    return Artifact(folder, meta, module)


def _check_one(path: str, a) -> tuple[dict, bool]:
    """Run one artifact on its ``check.npz`` inputs: (the JSON-able verdict, ok)."""
    import time

    try:
        art = load(path)
        data = np.load(Path(path) / CHECK_FILE)
        feeds = {k[6:]: data[k] for k in data.files if k.startswith("input:")}
        got = art.run(feeds)
        args = art.arguments(feeds)
        times = []
        for _ in range(max(1, a.iters)):
            t0 = time.perf_counter()
            art.machine.main(*args)
            art.machine.sync()
            times.append((time.perf_counter() - t0) * 1e3)
    except (ArtifactError, OSError, KeyError) as e:
        return {"artifact": path, "error": str(e)}, False
    want = {n: data["output:" + n] for n in art.output_names}
    errors = [float(np.max(np.abs(got[n].astype(np.float64) - want[n].astype(np.float64)))) if want[n].size else 0.0
              for n in art.output_names]
    ok = all(np.allclose(got[n], want[n], rtol=a.rtol, atol=a.atol) for n in art.output_names)
    return {"artifact": path, "target": art.kind, "outputs": {n: list(v.shape) for n, v in got.items()},
            "max_abs_error": max(errors, default=0.0), "within_tolerance": ok, "p50_ms": float(np.median(times)),
            "tvm_imported": sys.modules.get("tvm") is not None}, ok


def _check(argv: list[str] | None = None) -> int:
    """``python gcomp_tvm_runtime.py ARTIFACT... [--check] [--iters N]``: run each artifact
    on the inputs stored in it and print one JSON line per artifact (outputs, max abs
    error against the stored reference, whether it is within the tolerances, median
    latency). Exit 1 when one fails to run, or with ``--check`` when one is off."""
    import argparse

    p = argparse.ArgumentParser(prog="gcomp_tvm_runtime.py")
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--check", action="store_true", help="fail (exit 1) when outputs differ from check.npz")
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--iters", type=int, default=10)
    a = p.parse_args(argv)
    code = 0
    for path in a.artifacts:
        verdict, ok = _check_one(path, a)
        print(json.dumps(verdict), flush=True)
        if "error" in verdict or (a.check and not ok):
            code = 1
    return code


if __name__ == "__main__":
    sys.exit(_check())
