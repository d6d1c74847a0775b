"""TVM Relax backend: ONNX → Relax → fused, scheduled kernels → a Relax VM executable.

The backend receives a model already prepared for TVM: the core's
:func:`gcomp.autoselect.prepare_for_tvm` binds the input shapes and runs gcomp's
pipeline for the ``tvm-<kind>`` target first (shape arithmetic folded, since TVM 0.27's
importer fails on a ``Shape`` of a shape value; the fusions TVM accepts applied). A
backend never runs the pipeline itself. What :meth:`TvmBackend.compile` does, in order
(:mod:`~gcomp.backends.tvm.lowering`):

1. Bind the ``input_shapes`` given, if any (a copy; the caller's model is never modified).
2. *Refuse clearly* (:mod:`~gcomp.backends.tvm.capabilities`): ops TVM's ONNX frontend has
   no converter for (LSTM, GRU, Loop, Scan, QLinearConv, ...), non-default domains, and
   opset-23 ``Attention`` (the frontend reads it as ORT's contrib Attention and fails)
   raise :class:`BackendError` naming every such op type and one node of each, before
   any import is tried.
3. Import with ``from_onnx`` (weights become constants) while naming every op's result
   after its ONNX node, so kernels can be traced back to graph nodes.
4. Legalize and fuse (``FuseOps``/``FuseTIR``), apply the tuning database (and tune first
   when ``tune_trials`` > 0, see :mod:`~gcomp.backends.tvm.tuning`), then give every kernel
   still unscheduled the default schedules (dlight: GPU rules on ``cuda``, CPU GEMV and
   reduction rules on ``llvm``), and build for the target.

Targets (:mod:`~gcomp.backends.tvm.targets`): ``llvm`` (alias ``cpu``) is the host CPU
with its real features; ``cuda`` is generated with dlight schedules and compiles without
a GPU (``run=False`` on a machine without one gives a code-only executable whose CUDA
source can be inspected); running needs a GPU. Kernels run on every core
(:mod:`~gcomp.backends.tvm.threads`).

The executable (:mod:`~gcomp.backends.tvm.executable`) runs, profiles every kernel call
against its ONNX node, and exports a folder (``model.so`` + ``gcomp-tvm.json``) that
:func:`load` reopens without the original model.
"""

from __future__ import annotations

__all__ = [
    "LIB_FILE",
    "META_FILE",
    "TARGETS",
    "TvmBackend",
    "TvmExecutable",
    "WEIGHTS",
    "bind_input_shapes",
    "check_importable",
    "cuda_available",
    "cuda_target",
    "host_target",
    "load",
    "physical_cores",
    "require_tvm",
    "runtime_threads",
    "supported_ops",
    "supports",
    "target_kind",
    "unsupported_nodes",
]

import os
from collections.abc import Callable, Mapping
from typing import Any

import onnx_ir as ir

from gcomp import io
from gcomp.backends.tvm import lowering
from gcomp.backends.tvm.capabilities import check_importable, supported_ops, supports, unsupported_nodes
from gcomp.backends.tvm.executable import LIB_FILE, META_FILE, TvmExecutable, load
from gcomp.backends.tvm.lowering import bind_input_shapes
from gcomp.backends.tvm.targets import (
    TARGETS,
    cuda_available,
    cuda_target,
    host_target,
    target_kind,
    tvm_target,
)
from gcomp.backends.tvm.threads import physical_cores, require_tvm, runtime_threads
from gcomp.errors import BackendError

WEIGHTS = ("embedded", "separate")  # where an artifact's weights are: in model.so, or beside it


class TvmBackend:
    """The ``tvm`` backend: targets ``llvm`` (host CPU) and ``cuda``."""

    name = "tvm"
    targets = TARGETS

    def require(self) -> None:
        """:class:`gcomp.deps.MissingExtraError` when TVM is not installed (``gcomp[tvm]``)."""
        require_tvm()

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
        weights: str = "embedded",
        cuda_arch: str | None = None,
        **_ignored: Any,
    ) -> TvmExecutable:
        """Compile a model prepared for TVM (:func:`gcomp.autoselect.prepare_for_tvm`) for
        ``target``; tune first when ``tune_trials`` > 0 (records are cached).

        ``run=False`` builds only (the default when the target's device is absent, so
        CUDA code generation works on a CPU machine); such an executable can export and
        show its generated source but refuses to run. ``weights="separate"`` keeps the
        weights out of the built code: the executable passes them to ``main`` after the
        inputs, and its artifact holds them in ``weights.safetensors``. ``cuda_arch``
        (``sm_90``) is the GPU architecture ``cuda`` code is generated for.
        """
        kind = target_kind(target)
        if tune_trials < 0:
            raise BackendError("tvm: tune trials must be >= 0")
        if weights not in WEIGHTS:
            raise BackendError(f"tvm: weights must be one of {', '.join(WEIGHTS)}, not {weights!r}")
        require_tvm(tuning=tune_trials > 0)
        say = progress or (lambda _msg: None)
        path = None if isinstance(model, ir.Model) else str(model)
        source = io.load(model) if path else model
        check_importable(source)
        prepared = bind_input_shapes(source, input_shapes) if input_shapes else source
        tgt = tvm_target(kind, cuda_arch)
        say("importing into Relax")
        mod, names = lowering.import_onnx(prepared)
        say("fusing")
        mod, fused = lowering.fuse(mod, tgt)
        mod, tuning = _schedule(mod, tgt, kind, trials=tune_trials, seconds=tune_seconds, root=cache_dir,
                                progress=say)
        kernels = lowering.kernel_calls(mod)
        mod, params = lowering.detach_weights(mod) if weights == "separate" else (mod, [])
        say("building")
        ex = lowering.build(mod, tgt, kind)
        if run is None:
            run = kind == "llvm" or cuda_available()
        return TvmExecutable(
            ex, kind=kind, target=tgt, model=prepared, source_path=path, names=names, kernels=kernels,
            fused=fused, tuning=tuning, runnable=run, weights=params,
        )


def _schedule(mod, tgt, kind: str, *, trials: int, seconds: float | None, root, progress):
    """``mod`` scheduled: tuned first when ``trials`` > 0, the tuning database's records
    applied, dlight's defaults on the rest; also returns the tuning stats (or None)."""
    from gcomp.backends.tvm.database import apply_database
    from gcomp.backends.tvm.tuning import tune

    tuning = None
    if trials > 0:
        if kind == "cuda" and not cuda_available():
            raise BackendError("tvm: tuning for 'cuda' needs a CUDA GPU; none found")
        tuning = tune(mod, tgt, trials=trials, seconds=seconds, root=root, progress=progress)
    mod = apply_database(mod, tgt, root)
    return lowering.default_schedules(mod, tgt, kind), tuning
