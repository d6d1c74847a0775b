"""CUDA kernels an artifact can carry to a GPU machine that has TVM's runtime alone.

TVM 0.27 turns CUDA kernels into machine code through a compile callback that its
codegen calls only when TVM's CUDA runtime is loaded, and that runtime
(``libtvm_runtime_cuda.so``) needs the NVIDIA driver (``libcuda.so.1``). On a machine
without a GPU the codegen therefore keeps the CUDA C source (format ``cuda``), which only
a full TVM with a CUDA compiler can turn into kernels at load time. TVM's other path to
PTX, its LLVM NVPTX backend (target ``nvptx``), emits barrier calls its bundled LLVM
rejects ("Incorrect number of arguments passed to called function"), for every kernel
with a ``__syncthreads``.

So, when ``nvcc`` is found (:func:`find_nvcc`: ``$GCOMP_NVCC``, ``PATH``, ``$CUDA_PATH``,
or pip's ``nvidia-cuda-nvcc`` package), export compiles the source with TVM's own nvcc
driver (:func:`tvm.support.nvcc.compile_cuda`, TVM's flags) into a fatbin holding SASS
for the target's architecture and its PTX (which newer GPUs JIT-compile), and
:func:`packer` swaps it for the source in the module blob ``model.so`` embeds: the
CUDA module then loads with fmt ``fatbin``, on the runtime alone. The blob's format is
TVM's (``src/target/codegen.cc``): a length, the import tree's two uint64 vectors, then
per module its kind string and, unless it is the host library (``_lib``), its bytes; a
CUDA module's bytes are its format string, its function map, and its code string.
"""

from __future__ import annotations

__all__ = ["fatbin_contents", "find_nvcc", "packer"]

import contextlib
import os
import shutil
import struct
import sys
from pathlib import Path

from gcomp.backends.tvm.diagnostics import first_line

from gcomp.errors import BackendError

_FATBIN_MAGIC = 0xBA55ED50


def find_nvcc() -> Path | None:
    """``nvcc``: ``$GCOMP_NVCC`` (``none`` turns the search off), then ``PATH``,
    ``$CUDA_PATH/bin``, then pip's ``nvidia-cuda-nvcc`` (``nvidia/cu13/bin``, or
    ``nvidia/cuda_nvcc/bin`` for CUDA 12) on ``sys.path``."""
    given = os.environ.get("GCOMP_NVCC")
    if given is not None:
        return None if given.lower() in ("", "none") else Path(given)
    places = [shutil.which("nvcc")]
    if os.environ.get("CUDA_PATH"):
        places.append(os.path.join(os.environ["CUDA_PATH"], "bin", "nvcc"))
    places += [os.path.join(p or ".", "nvidia", sub, "bin", "nvcc") for p in sys.path for sub in ("cu13", "cuda_nvcc")]
    for place in places:
        if place and os.path.isfile(place) and os.access(place, os.X_OK):
            return Path(place)
    return None


def _compile_fatbin(source: str, tgt, nvcc: Path) -> bytes:
    """SASS for ``tgt``'s architecture plus its PTX, by TVM's nvcc driver."""
    from tvm.support import nvcc as tvm_nvcc

    number = str(tgt.attrs["arch"])[3:]
    arch = ["-gencode", f"arch=compute_{number},code=[sm_{number},compute_{number}]"]
    saved = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{nvcc.parent}{os.pathsep}{saved}"  # TVM runs "nvcc" from PATH
    try:
        with tgt:
            return bytes(tvm_nvcc.compile_cuda(source, target_format="fatbin", arch=arch, compiler="nvcc"))
    except Exception as e:
        raise BackendError(f"tvm: nvcc ({nvcc}) failed on the CUDA kernels: {first_line(e)[-200:]}") from None
    finally:
        os.environ["PATH"] = saved


def fatbin_contents(data: bytes) -> list[tuple[str, int]]:
    """``[("sass" | "ptx", architecture number)]`` of a CUDA fatbin's entries."""
    magic, _version, header, size = struct.unpack_from("<IHHQ", data, 0)
    if magic != _FATBIN_MAGIC:
        return []
    found, off = [], header
    while off < header + size:
        kind, _v, entry_header, payload = struct.unpack_from("<HHIQ", data, off)
        arch = struct.unpack_from("<I", data, off + 28)[0]
        found.append(({1: "ptx", 2: "sass"}.get(kind, str(kind)), arch))
        off += entry_header + payload
    return found


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def u64(self) -> int:
        (value,) = struct.unpack_from("<Q", self.data, self.pos)
        self.pos += 8
        return value

    def string(self) -> bytes:
        n = self.u64()
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def vector(self) -> bytes:
        n = self.u64()
        self.pos += 8 * n
        return self.data[self.pos - 8 * n - 8:self.pos]


def _string(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def _swap_sources(blob: bytes, compiled: dict[bytes, bytes]) -> tuple[bytes, int]:
    """``blob`` (without its length header) with every CUDA module's source code replaced
    by its fatbin; returns the new blob and how many modules were swapped."""
    r = _Reader(blob)
    rows = r.vector()
    out = [rows, r.vector()]
    swapped = 0
    for _ in range(struct.unpack_from("<Q", rows, 0)[0] - 1):
        key = r.string()
        out.append(_string(key))
        if key == b"_lib":
            continue
        body = r.string()
        if key == b"cuda" and body.startswith(_string(b"cuda")):
            for source, fatbin in compiled.items():
                tail = _string(source)
                if body.endswith(tail):
                    fmap = body[len(_string(b"cuda")):len(body) - len(tail)]
                    body = _string(b"fatbin") + fmap + _string(fatbin)
                    swapped += 1
                    break
        out.append(_string(body))
    if r.pos != len(blob):
        raise BackendError("tvm: the module blob TVM packed is not in the layout gcomp reads; artifact not written")
    return b"".join(out), swapped


def _cuda_sources(mod) -> list[str]:
    found = []

    def walk(m):
        if m.kind == "cuda":
            found.append(m.inspect_source("cuda"))
        for sub in m.imports:
            walk(sub)

    walk(mod)
    return [s for s in found if s]


def packer(tgt, nvcc: Path, info: dict):
    """An ``fpack_imports`` for ``export_library`` that embeds the module blob with each
    CUDA module's kernels compiled by ``nvcc``; fills ``info`` (format, fatbin contents)."""
    import tvm_ffi

    def pack(mod, is_system_lib, prefix, workspace_dir):
        sources = _cuda_sources(mod)
        compiled = {s.encode(): _compile_fatbin(s, tgt, nvcc) for s in sources}
        raw = bytes(tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(mod).numpy())
        blob, swapped = _swap_sources(raw[8:], compiled)
        if swapped != len(compiled):
            raise BackendError(f"tvm: found {swapped} of {len(compiled)} CUDA modules in the packed blob")
        host = _host_target_string(mod)
        llvm = tvm_ffi.get_global_func("codegen.codegen_blob")(struct.pack("<Q", len(blob)) + blob,
                                                               is_system_lib, host, prefix)
        path = os.path.join(workspace_dir, f"{prefix}devc.o")
        llvm.write_to_file(path)
        info.update(cuda_code="fatbin", fatbin=sorted({e for f in compiled.values() for e in fatbin_contents(f)}))
        return path

    return pack


def _host_target_string(mod) -> str:
    with contextlib.suppress(Exception):
        if mod.kind == "llvm":
            return mod.get_function("_get_target_string")()
    for sub in mod.imports:
        found = _host_target_string(sub)
        if found:
            return found
    return ""
