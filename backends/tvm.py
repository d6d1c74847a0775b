"""TVM Relax backend: ONNX → Relax → fused, scheduled kernels → a Relax VM executable.

What ``compile`` does, in order:

1. *Make the model importable* (:func:`prepare`): symbolic input dims are bound to the
   shapes asked for (``input_shapes``), then gcomp's O2 for this TVM target folds the
   shape arithmetic, so ``Shape → Gather → Concat → Reshape`` chains become constants
   (TVM 0.27's importer fails on a ``Shape`` of a shape value), and applies the fusions
   TVM accepts. The caller's model is never modified.
2. *Refuse clearly*: ops TVM's ONNX frontend has no converter for (LSTM, GRU, Loop, Scan,
   QLinearConv, ...), non-default domains, and opset-23 ``Attention`` (the frontend reads it
   as ORT's contrib Attention and fails) raise :class:`BackendError` naming every such op
   type and one node of each, before any import is tried.
3. Import with ``from_onnx`` (weights become constants) while naming every op's result
   after its ONNX node, so kernels can be traced back to graph nodes.
4. Legalize and fuse (``FuseOps``/``FuseTIR``), apply the tuning database (and tune first
   when ``tune_trials`` > 0, see :mod:`gcomp.backends.tvm_tuning`), then give every kernel
   still unscheduled the default schedules (dlight: GPU rules on ``cuda``, CPU GEMV and
   reduction rules on ``llvm``), and build for the target.

Targets: ``llvm`` (alias ``cpu``) is the host CPU with its real features
(``mcpu`` from LLVM's host detection, ``num-cores``); ``cuda`` is generated with dlight
schedules and compiles without a GPU (:meth:`TvmBackend.compile` with ``run=False`` on
a machine without one gives a code-only executable whose CUDA source can be inspected);
running needs a GPU.

Profiles time every kernel call through ``vm.set_instrument`` (the 0.27 Relax VM has no
profiler); a row names the ONNX node whose value the kernel produces (a fused kernel
covers that node and the elementwise nodes fused into it).

``export(path)`` writes a folder: ``model.so`` (weights embedded as constants) and
``gcomp-tvm.json`` (inputs, outputs, target, kernel map); :func:`load` reopens it
without the original model.
"""

from __future__ import annotations

__all__ = [
    "TvmBackend",
    "TvmExecutable",
    "cuda_available",
    "host_target",
    "load",
    "prepare",
    "supported_ops",
    "unsupported_nodes",
]

import contextlib
import functools
import io as _io
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from gcomp import io
from gcomp.errors import BackendError
from gcomp.profile import LatencyStats, OpRow, Profile, environment, model_identity

TARGETS = ("llvm", "cuda")
_ALIASES = {"cpu": "llvm", "llvm": "llvm", "cuda": "cuda", "gpu": "cuda"}
META_FILE = "gcomp-tvm.json"
LIB_FILE = "model.so"
# Converters present in TVM 0.27's table that fail on what the standard op means.
# Attention: the table's Attention is ORT's contrib op (needs num_heads); ONNX's opset-23
# Attention fails with KeyError 'num_heads'.
_BROKEN = {("", "Attention"): "TVM 0.27 reads Attention as ORT's contrib op and fails on ONNX's opset-23 Attention"}
_PREFIX = "onnx__"
_CALL_TIR = frozenset({"relax.call_tir", "relax.call_tir_inplace", "relax.call_tir_with_grad"})


def _tvm():
    runtime_threads()
    import tvm

    return tvm


def runtime_threads() -> int:
    """Threads TVM's kernels run on: every core this process may use, unless the user set
    ``TVM_NUM_THREADS`` (or ``OMP_NUM_THREADS``).

    TVM's own default halves the hardware thread count on x86 to skip hyper-threads; on a
    VM with one thread per core (this 2-vCPU machine) that leaves half the cores idle: a
    tuned mini-BERT ran 1.52 ms on TVM's one thread, 0.87 ms on two (ORT: 1.03 ms;
    FACTS.md). TVM reads the setting when its thread pool starts, at the first parallel
    kernel, so this runs before gcomp builds, tunes or loads anything. When the pool had
    already started (the caller ran TVM kernels first), its size stays, and so does the
    environment: kernels launched for more threads than the pool has stall (50x slower,
    measured).
    """
    for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(var, "").strip().isdigit():
            return int(os.environ[var])
    return _start_pool()


@functools.cache
def _start_pool() -> int:
    """Set the thread count and start TVM's pool, once: after that the pool's size is fixed,
    and every later call (``_tvm()`` runs on each model run) only needs the answer."""
    want = physical_cores()
    os.environ["TVM_NUM_THREADS"] = str(want)
    import tvm

    got = int(tvm.get_global_func("runtime.NumThreads")())  # starts the pool, or reads it
    if got != want:
        del os.environ["TVM_NUM_THREADS"]
    return got


def physical_cores() -> int:
    """The machine's cores (not hyper-threads). Not this thread's affinity: TVM's thread
    pool pins the calling thread to one core when it starts, and the count must not
    change after that (it is part of the target, so of the tuning database's key)."""
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


@functools.cache
def cuda_available() -> bool:
    """True when a CUDA device is present and TVM can see it."""
    if not (Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists()):
        return False
    try:
        return bool(_tvm().cuda(0).exist)
    except Exception:
        return False


@functools.cache
def supported_ops() -> frozenset[str]:
    """Op types TVM 0.27's ONNX frontend has a converter for (default domain)."""
    from tvm.relax.frontend.onnx import onnx_frontend

    return frozenset(onnx_frontend._get_convert_map()) | {"If", "Constant"}


def supports(op_type: str, domain: str = "", opset: int | None = None) -> bool:
    """Whether TVM imports ``op_type`` of ``domain`` (at ``opset``)."""
    domain = "" if domain in ("", "ai.onnx") else domain
    if domain != "":
        return False  # the frontend ignores domains: contrib ops would be misread
    if (domain, op_type) in _BROKEN:
        return False
    return op_type in supported_ops()


def unsupported_nodes(model: ir.Model) -> dict[str, list[str]]:
    """``{op (with domain when not ONNX's): [node names]}`` TVM cannot import, every scope."""
    found: dict[str, list[str]] = {}
    opset = model.opset_imports.get("", 1)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if not supports(node.op_type, node.domain, opset):
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            found.setdefault(key, []).append(node.name or "?")
    return found


def host_target(cores: int | None = None):
    """The host CPU as an LLVM target with its real features (not generic ``llvm``)."""
    tvm = _tvm()
    from tvm.target.codegen import llvm_get_system_cpu

    cfg = {"kind": "llvm", "mcpu": llvm_get_system_cpu(), "num-cores": cores or physical_cores()}
    return tvm.target.Target(cfg)


def cuda_target(arch: str | None = None):
    """A CUDA target (the local GPU's architecture when there is one, else ``sm_80``)."""
    tvm = _tvm()
    if arch is None and cuda_available():
        with contextlib.suppress(Exception):
            major, minor = tvm.cuda(0).compute_version.split(".")
            arch = f"sm_{major}{minor}"
    return tvm.target.Target({"kind": "cuda", "arch": arch or "sm_80"}, host=host_target())


def prepare(
    model: ir.Model | str | os.PathLike,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    *,
    kind: str = "llvm",
    pipeline: str = "O2",
) -> ir.Model:
    """A copy of ``model`` that TVM can import: given input shapes bound, shapes folded,
    and (``pipeline`` O2) gcomp's fusions that TVM accepts applied (BatchNormalization
    folded into Conv weights, LayerNormalization/Gelu/Gemm: fewer, cheaper kernels;
    cnn: compile 16.6 s -> 4.6 s), with the TVM family on top (O3 for ``tvm-<kind>``:
    Q/K/V projections packed into one MatMul). O1 is used when that fails.

    Refuses (BackendError) an input shape of the wrong rank. The original is untouched.
    """
    from gcomp.errors import GcompError
    from gcomp.pipeline import optimize

    m = io.load(model) if not isinstance(model, ir.Model) else ir.serde.deserialize_model(
        ir.serde.serialize_model(model)
    )
    shapes = dict(input_shapes or {})
    for value in m.graph.inputs:
        if value.name in shapes:
            want = tuple(int(d) for d in shapes[value.name])
            if value.shape is not None and len(value.shape) != len(want):
                raise BackendError(
                    f"tvm: input '{value.name}' has rank {len(value.shape)}, shape given {list(want)}"
                )
            value.shape = ir.Shape(want)
    if pipeline == "O2":
        backup = ir.serde.serialize_model(m)
        try:
            return optimize(m, "O3", verify=False, target=f"tvm-{kind}").model
        except GcompError:
            m = ir.serde.deserialize_model(backup)
    return optimize(m, "O1", verify=False).model


class TvmBackend:
    """The ``tvm`` backend: targets ``llvm`` (host CPU) and ``cuda``."""

    name = "tvm"
    targets = TARGETS

    def available_targets(self) -> list[str]:
        return ["llvm"] + (["cuda"] if cuda_available() else [])

    def supports(self, op_type: str, domain: str = "", opset: int | None = None) -> bool:
        return supports(op_type, domain, opset)

    def compile(
        self,
        model: ir.Model | str | os.PathLike,
        target: str = "llvm",
        *,
        input_shapes: Mapping[str, tuple[int, ...]] | None = None,
        tune_trials: int = 0,
        tune_seconds: float | None = None,
        cache_dir: str | os.PathLike | None = None,
        progress: Callable[[str], None] | None = None,
        run: bool | None = None,
        **_ignored: Any,
    ) -> TvmExecutable:
        """Compile for ``target``; tune first when ``tune_trials`` > 0 (records are cached).

        ``run=False`` builds only (the default when the target's device is absent, so
        CUDA code generation works on a CPU machine); such an executable can export and
        show its generated source but refuses to run.
        """
        kind = _ALIASES.get(target)
        if kind is None:
            raise BackendError(f"tvm: unknown target '{target}' (targets: {', '.join(TARGETS)})")
        if tune_trials < 0:
            raise BackendError("tvm: tune trials must be >= 0")
        say = progress or (lambda _msg: None)
        path = None if isinstance(model, ir.Model) else str(model)
        source = io.load(model) if path else model
        bad = unsupported_nodes(source)
        if bad:
            raise _unsupported_error(bad)
        say("preparing the model for TVM (binding shapes, folding)")
        prepared = prepare(source, input_shapes, kind=kind)
        bad = unsupported_nodes(prepared)
        if bad:
            raise _unsupported_error(bad)
        tvm = _tvm()
        tgt = host_target() if kind == "llvm" else cuda_target()
        say("importing into Relax")
        mod, names = _import(prepared)
        say("fusing")
        mod, fused = _fuse(mod, tgt)
        tuning = None
        from gcomp.backends import tvm_tuning

        if tune_trials > 0:
            if kind == "cuda" and not cuda_available():
                raise BackendError("tvm: tuning for 'cuda' needs a CUDA GPU; none found")
            tuning = tvm_tuning.tune(mod, tgt, trials=tune_trials, seconds=tune_seconds, root=cache_dir,
                                     progress=say)
        mod = tvm_tuning.apply_database(mod, tgt, cache_dir)
        mod = _default_schedules(mod, tgt, kind)
        kernels = _kernel_calls(mod)
        say("building")
        try:
            with contextlib.redirect_stdout(_io.StringIO()), _native_stderr_off():
                ex = tvm.compile(mod, target=tgt, relax_pipeline=_lowering(tgt, kind))
        except Exception as e:
            raise BackendError(f"tvm: build for {kind} failed: {_first_line(e)}") from None
        if run is None:
            run = kind == "llvm" or cuda_available()
        return TvmExecutable(
            ex, kind=kind, target=tgt, model=prepared, source_path=path, names=names, kernels=kernels,
            fused=fused, tuning=tuning, runnable=run,
        )


def _unsupported_error(bad: dict[str, list[str]]) -> BackendError:
    parts = []
    for op, nodes in sorted(bad.items()):
        why = _BROKEN.get(("", op))
        more = f" and {len(nodes) - 1} more" if len(nodes) > 1 else ""
        parts.append(f"{op} (node '{nodes[0]}'{more}{'; ' + why if why else ''})")
    err = BackendError("tvm: TVM's ONNX importer does not support " + ", ".join(parts))
    err.unsupported_ops = sorted(bad)
    return err


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # TVM errors put the message after a traceback; the last line is the message.
    for line in reversed(lines):
        if not line.startswith(("  File", "File ", "Traceback", "  ")):
            return line.strip()[:300]
    return (lines[-1] if lines else type(e).__name__)[:300]


def _hint(name: str) -> str:
    return _PREFIX + re.sub(r"\W", "_", name)


def _import(model: ir.Model):
    """Relax module from ``model``, each converted op's result bound to a variable named
    after its ONNX node; returns (module, {variable name: ONNX node name})."""
    import onnx
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx, onnx_frontend

    proto = onnx.load_from_string(io.serialize(model)) if io.initializer_bytes(model) < (
        io.PROTOBUF_LIMIT_BYTES // 2
    ) else ir.serde.serialize_model(model)
    names: dict[str, str] = {}
    importer = onnx_frontend.ONNXGraphImporter
    original = importer._convert_operator

    def convert(self, op_name, inputs, attr, opset):
        out = original(self, op_name, inputs, attr, opset)
        node = (attr.get("tvm_custom") or {}).get("name")
        if node and isinstance(out, relax.Call):
            with contextlib.suppress(Exception):
                out = self.bb.normalize(out)
                if isinstance(out.ty, relax.TensorType):
                    hint = _hint(node)
                    names[hint] = node
                    out = self.bb.emit(out, name_hint=hint)
        return out

    importer._convert_operator = convert
    try:
        with contextlib.redirect_stdout(_io.StringIO()), _warnings_off(), _native_stderr_off():
            mod = from_onnx(proto, keep_params_in_input=False)
    except Exception as e:
        raise BackendError(f"tvm: import failed: {_first_line(e)}") from None
    finally:
        importer._convert_operator = original
    return mod, names


@contextlib.contextmanager
def _native_stderr_off():
    """Silence TVM's C++ log lines (warnings written straight to fd 2) around a call;
    errors still arrive as exceptions."""
    import sys

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


@contextlib.contextmanager
def _warnings_off():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _fuse(mod, tgt):
    """Legalize and fuse; also returns ``{fused kernel: [variables of its ops, in order]}``
    read between FuseOps and FuseTIR, while fused functions still hold Relax bindings."""
    import tvm
    from tvm import relax

    T = relax.transform
    before = [
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        T.DecomposeOpsForInference(),
        T.CanonicalizeBindings(),
        *_cpu_layouts(tgt),
        # exp/erf/tanh as vectorizable polynomials instead of scalar libm calls: the
        # erf-GELU kernel of a mini-BERT 43.6 -> 28.7 ms untuned, errors unchanged (2e-6).
        T.FastMathTransform(),
        T.LegalizeOps(),
        T.AnnotateTIROpPattern(),
        T.FoldConstant(),
        T.FuseOps(),
    ]
    try:
        with tgt, contextlib.redirect_stdout(_io.StringIO()), _native_stderr_off():
            mod = tvm.transform.Sequential(before)(mod)
            members = _fused_members(mod)
            mod = T.FuseTIR()(mod)
    except Exception as e:
        raise BackendError(f"tvm: lowering failed: {_first_line(e)}") from None
    return mod, members


# 2-D convolutions on the CPU run channels-last with HWIO weights: the output channels are
# then the innermost axis of both the weights and the result, so MetaSchedule vectorizes
# over them with plain loads. Measured on ResNet-18 kernels at 64 trials each (2 cores,
# AVX-512; bench/TVM.md): 3x3 64->64 at 56x56 197 -> 386 GFLOP/s, 3x3 512->512 at 7x7
# 137 -> 226, the 7x7 stem 117 -> 240. (NHWC with OHWI weights was slower than NCHW.)
# The weight transposes fold into the constants; activations are transposed once at
# the model's edges, and the ops between convolutions follow the layout.
_CPU_CONV_LAYOUT = {"relax.nn.conv2d": ["NHWC", "HWIO"]}


def _cpu_layouts(tgt) -> list:
    from tvm import relax

    if str(tgt.kind.name) != "llvm" or os.environ.get("GCOMP_TVM_LAYOUT", "").upper() == "NCHW":
        return []
    return [relax.transform.ConvertLayout(_CPU_CONV_LAYOUT), relax.transform.Normalize()]


def _fused_members(mod) -> dict[str, list[str]]:
    """``{fused function: its variables}``, plus ``"#sites"``: for every kernel call of
    ``main`` in order (call_tir or a call of a fused function), the variables it computes.
    FuseTIR turns each such call into one call_tir in the same order, so the list lines
    up with :func:`_kernel_calls` and a call site names its own ONNX nodes even when
    several sites share one kernel (Q, K, V). Variable names are not unique in Relax
    (``lv6`` twice), hence positions, not names."""
    from tvm import relax
    from tvm.ir import GlobalVar

    members: dict[str, list[str]] = {}
    for gvar, func in mod.functions.items():
        if not isinstance(func, relax.Function) or func.attrs is None or "Primitive" not in func.attrs:
            continue
        body = func.body
        names = []
        for block in getattr(body, "blocks", []):
            for binding in block.bindings:
                names.append(_name(binding.var))
        members[_name(gvar)] = names
    sites: list[list[str]] = []
    for block in getattr(mod["main"].body, "blocks", []):
        for binding in block.bindings:
            value = getattr(binding, "value", None)
            if not isinstance(value, relax.Call):
                continue
            if isinstance(value.op, GlobalVar) and _name(value.op) in members:
                sites.append(members[_name(value.op)])
            elif getattr(value.op, "name", None) in _CALL_TIR:
                sites.append([_name(binding.var)])
    members["#sites"] = sites
    return members


def _default_schedules(mod, tgt, kind: str):
    from tvm.s_tir import dlight as dl

    if kind == "cuda":
        rules = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
    else:
        rules = [dl.cpu.GEMV(), dl.cpu.Reduction()]
    try:
        with tgt:
            return dl.ApplyDefaultSchedule(*rules)(mod)
    except Exception as e:
        if kind == "cuda":
            raise BackendError(f"tvm: default GPU schedules failed: {_first_line(e)}") from None
        return mod  # CPU kernels run unscheduled (correct, slower)


def _lowering(tgt, kind: str):
    import importlib

    import tvm

    b = importlib.import_module(
        "tvm.relax.backend.cuda.pipeline" if kind == "cuda" else "tvm.relax.backend.cpu_generic.pipeline"
    )

    @tvm.transform.module_pass(opt_level=0)
    def lower(mod, _ctx):
        with tgt:
            return tvm.transform.Sequential(b.dataflow_lower_passes(tgt) + b.finalize_passes(tgt))(mod)

    return lower


def _kernel_calls(mod) -> list[tuple[str, str]]:
    """(kernel name, result variable) for every ``call_tir`` of ``main``, in call order."""
    from tvm import relax

    calls = []
    main = mod["main"]
    body = main.body
    blocks = body.blocks if isinstance(body, relax.SeqExpr) else []
    call_tir = _CALL_TIR
    for block in blocks:
        for binding in block.bindings:
            value = getattr(binding, "value", None)
            if isinstance(value, relax.Call) and getattr(value.op, "name", None) in call_tir:
                gvar = value.args[0]
                calls.append((_name(gvar), _name(binding.var)))
    return calls


def _name(var) -> str:
    for attr in ("name_hint", "name"):
        value = getattr(var, attr, None)
        if isinstance(value, str):
            return value
    return str(var)


class TvmExecutable:
    """A compiled Relax VM executable (or a code-only one for an absent device)."""

    def __init__(self, ex, *, kind, target, model, source_path, names, kernels, fused, tuning, runnable) -> None:
        self.ex = ex
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

    # -- running ---------------------------------------------------------------

    def _machine(self):
        if self._vm is None:
            if not self._runnable:
                raise BackendError(
                    f"tvm: this {self.kind} executable was built without a device to run on (no CUDA GPU)"
                )
            tvm = _tvm()
            dev = tvm.cuda(0) if self.kind == "cuda" else tvm.cpu(0)
            self._vm = tvm.relax.VirtualMachine(self.ex, dev)
            self._dev = dev
        return self._vm

    def _args(self, feeds: Mapping[str, np.ndarray]):
        tvm = _tvm()
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise BackendError(f"tvm: missing inputs: {', '.join(missing)}")
        self._machine()
        args = []
        for name in self.input_names:
            arr = np.ascontiguousarray(feeds[name])
            want = self._input_dtypes.get(name)
            if want and arr.dtype.name != want:
                raise BackendError(f"tvm: input '{name}' is {arr.dtype.name}, the model takes {want}")
            args.append(tvm.runtime.tensor(arr, self._dev))
        return args

    def _outputs(self, result) -> dict[str, np.ndarray]:
        flat = []

        def walk(x):
            if hasattr(x, "numpy"):
                flat.append(x.numpy())
            else:
                for item in x:
                    walk(item)

        walk(result)
        if len(flat) != len(self.output_names):
            raise BackendError(f"tvm: {len(flat)} outputs for {len(self.output_names)} graph outputs")
        return dict(zip(self.output_names, flat))

    def run(self, feeds: Mapping[str, np.ndarray], **_ignored: Any) -> dict[str, np.ndarray]:
        vm = self._machine()
        try:
            return self._outputs(vm["main"](*self._args(feeds)))
        except BackendError:
            raise
        except Exception as e:
            raise BackendError(f"tvm: run failed: {_first_line(e)}") from None

    def profile(
        self, feeds: Mapping[str, np.ndarray], *, iters: int = 50, warmup: int = 5, profile_runs: int = 10
    ) -> Profile:
        """Latency of whole runs (inputs already on the device), then per-kernel times
        from instrumented runs (a separate phase: instrumentation costs time)."""
        if iters < 1 or warmup < 0:
            raise BackendError("tvm: profile needs iters >= 1 and warmup >= 0")
        vm = self._machine()
        args = self._args(feeds)
        fn = vm["main"]
        sync = self._dev.sync
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
            memory=_memory(),
        ).finish()

    def _kernel_times(self, fn, args, runs: int) -> list[OpRow]:
        from tvm import relax

        vm = self._machine()
        times: dict[tuple[str, int], float] = {}
        seen: dict[str, int] = {}
        stack: list[float] = []
        sync = self._dev.sync

        def instrument(func, func_symbol, before_run, ret_value, *iargs):
            if func_symbol.startswith("vm.builtin."):
                return relax.VMInstrumentReturnKind.NO_OP
            if before_run:
                sync()
                stack.append(time.perf_counter())
            else:
                sync()
                dt = (time.perf_counter() - stack.pop()) * 1e3
                k = seen.get(func_symbol, 0)
                seen[func_symbol] = k + 1
                times[(func_symbol, k)] = times.get((func_symbol, k), 0.0) + dt
            return relax.VMInstrumentReturnKind.NO_OP

        fn(*args)  # once uninstrumented: first-call costs are not kernel time
        vm.set_instrument(instrument)
        try:
            for _ in range(runs):
                seen.clear()
                fn(*args)
        finally:
            vm.set_instrument(_noop_instrument(relax))  # 0.27 has no way to remove one
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

    def export(self, path: str | os.PathLike) -> Path:
        """Write ``path/`` with ``model.so`` and ``gcomp-tvm.json``; atomic (temp folder, rename)."""
        out = Path(path)
        if self._path and out.resolve() == Path(self._path).resolve():
            raise BackendError(f"{out}: refusing to write over the input model")
        if out.exists() and not (out.is_dir() and (out / META_FILE).is_file()):
            raise BackendError(f"{out}: exists and is not a gcomp TVM artifact; not overwriting it")
        out.resolve().parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.resolve().parent))
        try:
            with _native_stderr_off():
                self.ex.export_library(str(tmp / LIB_FILE))
            meta = {
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
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
            if out.exists():
                old = out.with_name(f".{out.name}.old")
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out


def load(path: str | os.PathLike) -> TvmExecutable:
    """Reopen an exported artifact folder (no ONNX model needed)."""
    folder = Path(path)
    meta_path = folder / META_FILE
    if not meta_path.is_file() or not (folder / LIB_FILE).is_file():
        raise BackendError(f"{folder}: not a gcomp TVM artifact (expected {LIB_FILE} and {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise BackendError(f"{meta_path}: unreadable: {e}") from None
    tvm = _tvm()
    try:
        lib = tvm.runtime.load_module(str(folder / LIB_FILE))
    except Exception as e:
        raise BackendError(f"{folder / LIB_FILE}: cannot load: {_first_line(e)}") from None
    exe = TvmExecutable.__new__(TvmExecutable)
    exe.ex = lib
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
    exe._runnable = exe.kind == "llvm" or cuda_available()
    return exe


def _noop_instrument(relax):
    def instrument(*_args):
        return relax.VMInstrumentReturnKind.NO_OP

    return instrument


def _memory() -> dict:
    try:
        import resource

        return {"peak_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}
    except (ImportError, OSError):
        return {}
