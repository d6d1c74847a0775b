"""The TVM backend's executable: a built Relax VM executable, run, profiled, exported.

- :meth:`TvmExecutable.run` feeds NumPy arrays to ``main`` and returns NumPy arrays named
  after the graph outputs; a code-only executable (built for an absent device) refuses.
- :meth:`TvmExecutable.profile` times whole runs, then every kernel call through
  ``vm.set_instrument`` (the 0.27 Relax VM has no profiler); a row names the ONNX node
  whose value the kernel produces (a fused kernel covers that node and the elementwise
  nodes fused into it).
- :meth:`TvmExecutable.export` writes a folder: ``model.so`` (with the weights embedded as
  constants, or without them, then ``weights.safetensors`` beside it), ``gcomp-tvm.json``
  (inputs, outputs, target, kernel map) and, when given, ``check.npz`` (inputs and the
  reference outputs); :func:`load` reopens it without the original model, on TVM's
  runtime alone (:mod:`~gcomp.backends.tvm.artifact`: no ``tvm`` Python package, no
  compiler library), and profiles it as a compiled one.
"""

from __future__ import annotations

__all__ = ["LIB_FILE", "META_FILE", "WEIGHTS_FILE", "TvmExecutable", "load"]

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gcomp.backends._device import peak_memory
from gcomp.backends.tvm import artifact
from gcomp.backends.tvm.artifact import CHECK_FILE, LIB_FILE, META_FILE, WEIGHTS_FILE, Machine
from gcomp.backends.tvm.diagnostics import first_line, native_stderr_off
from gcomp.backends.tvm.threads import runtime_threads
from gcomp.errors import BackendError
from gcomp.perf import LatencyStats, OpRow, Profile, environment, model_identity

_NO_OP = 0  # the VM's VMInstrumentReturnKind.NO_OP: run the call as usual


class TvmExecutable:
    """A compiled Relax VM executable (or a code-only one for an absent device)."""

    def __init__(self, ex, *, kind, target, model, source_path, names, kernels, fused, tuning, runnable,
                 weights=None) -> None:
        self.ex = ex
        self.weights = list(weights or [])  # (name, array): main's parameters after the inputs
        self._artifact = None
        self._tgt = target
        self.artifact_info: dict[str, Any] = {}  # what the last export wrote: weights, CUDA code
        self.kind = kind
        self.target = kind
        self.tvm_target = str(target)
        self.tuning = tuning
        self._model = model
        self._path = source_path
        self._names = dict(names)
        self._kernels = list(kernels)
        sites = fused.get("#sites", [])
        # Positions line up with the kernel calls only if FuseTIR kept one call per site.
        self._site_members = [[n for n in v if n in self._names] for v in sites] if len(sites) == len(
            kernels) else []
        self._fused = {k: [n for n in v if n in self._names] for k, v in fused.items() if k != "#sites"}
        self._node_ops = {n.name: n.op_type for n in model.graph} if model is not None else {}
        inputs = [v for v in model.graph.inputs if v.const_value is None] if model is not None else []
        self.input_names = [v.name for v in inputs]
        self.output_names = [v.name for v in model.graph.outputs] if model is not None else []
        self._input_dtypes = {v.name: v.dtype.numpy().name for v in inputs if v.dtype is not None}
        self._vm = None
        self._runnable = runnable

    @classmethod
    def _from_artifact(cls, art: artifact.Artifact) -> TvmExecutable:
        """An executable for an artifact opened on the runtime (its ``gcomp-tvm.json``)."""
        meta, folder = art.meta, art.folder
        exe = cls.__new__(cls)
        exe.ex = None
        exe.weights = []
        exe._artifact = art
        exe.artifact_info = {}
        exe.kind = meta["target"]
        exe.target = meta["target"]
        exe.tvm_target = meta.get("tvm_target")
        exe.tuning = None
        exe._model = None
        exe._path = str(folder)
        exe._names = meta.get("names", {})
        exe._kernels = [tuple(k) for k in meta.get("kernels", [])]
        exe._fused = meta.get("fused", {})
        exe._site_members = meta.get("site_members", [])
        exe._node_ops = meta.get("nodes", {})
        exe.input_names = [i["name"] for i in meta["inputs"]]
        exe.output_names = list(meta["outputs"])
        exe._input_dtypes = {i["name"]: i["dtype"] for i in meta["inputs"] if i.get("dtype")}
        exe._vm = None
        exe._runnable = True  # artifact.load opened it on its device's runtime (a GPU is checked at run)
        return exe

    # -- running ---------------------------------------------------------------

    def _machine(self) -> Machine:
        if self._vm is None:
            if not self._runnable:
                raise BackendError(
                    f"tvm: this {self.kind} executable was built without a device to run on (no CUDA GPU)"
                )
            if self._artifact is not None:
                self._vm = self._artifact.machine
            else:
                self._vm = Machine(self.ex.jit(), self.kind)
                self._weight_tensors = [self._vm.tensor(w) for _, w in self.weights]
        return self._vm

    def _args(self, feeds: Mapping[str, np.ndarray]):
        machine = self._machine()
        if self._artifact is not None:
            return self._artifact.arguments(feeds)
        return artifact.input_tensors(machine, self.input_names, self._input_dtypes, feeds) + self._weight_tensors

    def _outputs(self, result) -> dict[str, np.ndarray]:
        flat = self._machine().flatten(result)
        if len(flat) != len(self.output_names):
            raise BackendError(f"tvm: {len(flat)} outputs for {len(self.output_names)} graph outputs")
        return dict(zip(self.output_names, flat))

    def run(self, feeds: Mapping[str, np.ndarray], **_ignored: Any) -> dict[str, np.ndarray]:
        vm = self._machine()
        try:
            return self._outputs(vm.main(*self._args(feeds)))
        except BackendError:
            raise
        except Exception as e:
            raise BackendError(f"tvm: run failed: {first_line(e)}") from None

    # -- profiling -------------------------------------------------------------

    def profile(
        self, feeds: Mapping[str, np.ndarray], *, iters: int = 50, warmup: int = 5, profile_runs: int = 10
    ) -> Profile:
        """Latency of whole runs (inputs already on the device), then per-kernel times
        from instrumented runs (a separate phase: instrumentation costs time)."""
        if iters < 1 or warmup < 0:
            raise BackendError("tvm: profile needs iters >= 1 and warmup >= 0")
        vm = self._machine()
        args = self._args(feeds)
        fn = vm.main
        sync = vm.sync
        for _ in range(warmup):
            fn(*args)
        sync()
        samples = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn(*args)
            sync()
            samples.append((time.perf_counter() - t0) * 1e3)
        ops = self._kernel_times(fn, args, max(1, min(profile_runs, iters)))
        model = self._model
        backend = {
            "name": "tvm",
            "target": self.kind,
            "tvm_target": self.tvm_target,
            "tuning": self.tuning.to_dict() if self.tuning is not None else None,
        }
        return Profile(
            model=model_identity(model, self._path) if model is not None else {"path": self._path},
            environment=environment(),
            backend=backend,
            latency=LatencyStats.from_samples(samples, warmup),
            ops=ops,
            memory=peak_memory(),
        ).finish()

    def _kernel_times(self, fn, args, runs: int) -> list[OpRow]:
        vm = self._machine()
        times: dict[tuple[str, int], float] = {}
        seen: dict[str, int] = {}
        stack: list[float] = []
        sync = vm.sync

        def instrument(func, func_symbol, before_run, ret_value, *iargs):
            if func_symbol.startswith("vm.builtin."):
                return _NO_OP
            if before_run:
                sync()
                stack.append(time.perf_counter())
            else:
                sync()
                dt = (time.perf_counter() - stack.pop()) * 1e3
                k = seen.get(func_symbol, 0)
                seen[func_symbol] = k + 1
                times[(func_symbol, k)] = times.get((func_symbol, k), 0.0) + dt
            return _NO_OP

        fn(*args)  # once uninstrumented: first-call costs are not kernel time
        vm.set_instrument(instrument)
        try:
            for _ in range(runs):
                seen.clear()
                fn(*args)
        finally:
            vm.set_instrument(_noop_instrument)  # 0.27 has no way to remove one
        return self._rows(times, runs)

    def _rows(self, times: dict[tuple[str, int], float], runs: int) -> list[OpRow]:
        # The k-th call of a kernel in a run is its k-th call site in main.
        sites: dict[str, list[str]] = {}
        positions: dict[str, list[int]] = {}
        for i, (kernel, var) in enumerate(self._kernels):
            sites.setdefault(kernel, []).append(var)
            positions.setdefault(kernel, []).append(i)
        rows: dict[str, OpRow] = {}
        for (kernel, k), total in times.items():
            var = sites.get(kernel, [])
            node = self._names.get(var[k]) if k < len(var) else None
            at = positions.get(kernel, [])
            site = self._site_members[at[k]] if k < len(at) and self._site_members else None
            members = [self._names[v] for v in (site if site is not None else self._fused.get(kernel, []))]
            if site is not None and members:
                node = members[-1]  # the site's own output, not a same-named variable elsewhere
            if node is None and members:
                node = members[-1]  # a fused kernel produces its last op's value
            if node is not None:
                ops = [self._node_ops.get(n, "?") for n in members] or [self._node_ops.get(node, "?")]
                key, op_type = node, "+".join(dict.fromkeys(ops))
            else:
                key, op_type = kernel, f"tvm:{kernel}"
            row = rows.get(key)
            if row is None:
                rows[key] = OpRow(node=key, op_type=op_type, time_ms=total / runs, calls=1,
                                  provider=f"tvm:{kernel}", graph_nodes=members or None)
            else:
                row.time_ms += total / runs
                row.calls += 1
        return list(rows.values())

    # -- artifacts -------------------------------------------------------------

    def generated_source(self) -> str:
        """The code TVM generated for the device: CUDA C for ``cuda``, LLVM IR for ``llvm``."""
        want = "cuda" if self.kind == "cuda" else "llvm"
        found = []

        def walk(m):
            if getattr(m, "kind", None) == want:
                with contextlib.suppress(Exception):
                    found.append(m.inspect_source())
            for sub in getattr(m, "imports", None) or []:
                walk(sub)

        walk(self.ex.mod if hasattr(self.ex, "mod") else self.ex)
        return "\n".join(found)

    def _artifact_meta(self) -> dict[str, Any]:
        """What ``gcomp-tvm.json`` holds: enough to run and profile without the model."""
        return {
            "format": "gcomp-tvm/1",
            "target": self.kind,
            "tvm_target": self.tvm_target,
            "inputs": [
                {"name": v.name, "dtype": self._input_dtypes.get(v.name),
                 "shape": [d if isinstance(d, int) else None for d in (v.shape or [])]}
                for v in self._model.graph.inputs if v.const_value is None
            ],
            "outputs": self.output_names,
            "nodes": self._node_ops,
            "names": self._names,
            "kernels": self._kernels,
            "fused": self._fused,
            "site_members": self._site_members,
            "tuning": self.tuning.to_dict() if self.tuning is not None else None,
        }

    def export(self, path: str | os.PathLike, *, check: tuple[Mapping, Mapping] | None = None) -> Path:
        """Write ``path/``: ``model.so``, ``gcomp-tvm.json``, ``weights.safetensors`` when the
        weights were kept out of ``model.so``, and with ``check=(inputs, reference
        outputs)`` a ``check.npz`` of both. Atomic (temp folder, rename)."""
        out = Path(path)
        if self.ex is None:
            raise BackendError(f"{out}: a loaded artifact is copied as a folder, not exported again")
        if self._path and out.resolve() == Path(self._path).resolve():
            raise BackendError(f"{out}: refusing to write over the input model")
        if out.exists() and not (out.is_dir() and (out / META_FILE).is_file()):
            raise BackendError(f"{out}: exists and is not a gcomp TVM artifact; not overwriting it")
        out.resolve().parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.resolve().parent))
        try:
            meta = self._artifact_meta()
            meta.update(self._export_library(tmp / LIB_FILE))
            if self.weights:
                size = artifact.write_safetensors(tmp / WEIGHTS_FILE, dict(self.weights))
                meta["weights"] = {"file": WEIGHTS_FILE, "names": [n for n, _ in self.weights], "bytes": size}
            self.artifact_info = {k: meta[k] for k in ("cuda_code", "cuda_arch", "fatbin") if k in meta}
            if self.weights:
                self.artifact_info["weights"] = {"file": WEIGHTS_FILE, "tensors": len(self.weights), "bytes": size}
            if check is not None:
                feeds, expected = check
                np.savez(tmp / CHECK_FILE, **{f"input:{k}": np.asarray(v) for k, v in feeds.items()},
                         **{f"output:{k}": np.asarray(v) for k, v in expected.items()})
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
            _replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out


    def _export_library(self, path: Path) -> dict[str, Any]:
        """Write ``model.so``; for ``cuda``, with its kernels compiled by nvcc when one is
        found (:mod:`~gcomp.backends.tvm.cuda_code`), else as CUDA C source. Returns
        what ``gcomp-tvm.json`` says of the device code."""
        info: dict[str, Any] = {}
        pack = None
        if self.kind == "cuda":
            from gcomp.backends.tvm.cuda_code import find_nvcc, packer

            info = {"cuda_arch": str(self._tgt.attrs["arch"]), "cuda_code": "source"}
            nvcc = find_nvcc()
            pack = packer(self._tgt, nvcc, info) if nvcc is not None else None
        with native_stderr_off():
            self.ex.export_library(str(path), fpack_imports=pack)
        return info


def _replace(tmp: Path, out: Path) -> None:
    """``tmp`` renamed to ``out``, an earlier ``out`` removed only once the new one is in place."""
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)  # left by an export that was killed mid-swap
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def load(path: str | os.PathLike) -> TvmExecutable:
    """Reopen an exported artifact folder (no ONNX model needed) on TVM's runtime alone:
    neither the ``tvm`` Python package nor its compiler library is needed or imported."""
    artifact.read_meta(path)  # not an artifact: one line, before touching any library
    runtime_threads()
    return TvmExecutable._from_artifact(artifact.load(path))


def _noop_instrument(*_args):
    return _NO_OP
