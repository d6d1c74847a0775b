"""Compiling for a backend from the CLI, and choosing the fastest backend by measurement.

- :func:`compile_model` is ``gcomp compile``: compile (and tune) on one backend, check the
  executable's outputs against the reference runtime (ONNX Runtime, optimizations off)
  on seeded inputs, and export the artifact.
- :func:`select_backend` is ``--backend auto``: compile for every available
  (backend, target), run each on the same inputs, keep only those whose outputs match the
  reference within the fp32 tolerances, time them, and pick the fastest. Every
  candidate's figures (compile seconds, latency, error, or why it was refused) are
  returned, to go into the report. A backend whose extra is not installed (TVM without
  ``gcomp[tvm]``) is a ``skipped`` candidate whose error names the ``pip install``. With
  an ONNX Runtime execution provider named (``--provider``), ORT's candidate is that
  provider (with its options) in place of ORT's usual targets (:func:`provider_pairs`).
- :func:`prepare_for_tvm` runs gcomp's pipeline for the TVM target before the TVM backend
  compiles (backends never run the pipeline).
"""

from __future__ import annotations

__all__ = ["Candidate", "Selection", "candidates", "compile_model", "prepare_for_tvm", "select_backend"]

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from gcomp.errors import BackendError, GcompError


@dataclass
class Candidate:
    backend: str
    target: str
    status: str = "pending"  # "ok" | "mismatch" | "failed" | "skipped" (not installed)
    compile_seconds: float | None = None
    mean_ms: float | None = None
    p50_ms: float | None = None
    min_ms: float | None = None
    max_abs_error: float | None = None
    error: str | None = None
    chosen: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Selection:
    chosen: Candidate | None
    candidates: list[Candidate] = field(default_factory=list)
    executable: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": None if self.chosen is None else f"{self.chosen.backend}/{self.chosen.target}",
            "candidates": [c.to_dict() for c in self.candidates],
        }


def candidates(skipped: list[Candidate] | None = None) -> list[tuple[str, str]]:
    """(backend, target) pairs available on this machine, ORT first. A backend that is not
    installed is left out, and added to ``skipped`` (when given) with the reason."""
    from gcomp.backends import BACKENDS, get_backend
    from gcomp.deps import MissingExtraError

    pairs = []
    for name in BACKENDS:
        backend = get_backend(name)
        try:
            getattr(backend, "require", lambda: None)()  # a backend whose runtime is optional
        except MissingExtraError as e:
            if skipped is not None:
                skipped.append(Candidate(name, backend.targets[0], status="skipped", error=str(e)))
            continue
        for target in backend.available_targets():
            pairs.append((name, target))
    return pairs


def provider_pairs(provider: str, *, tvm_targets: set[str] | None = None,
                   skipped: list[Candidate] | None = None) -> list[tuple[str, str]]:
    """The candidates of ``--backend auto --provider PROVIDER``: ORT on that provider, then
    the TVM targets available here; with ``tvm_targets``, only those of them (``gcomp
    profile`` keeps to the provider's device: ``llvm`` for the CPU, ``cuda`` for CUDA and
    TensorRT, none for a provider whose device gcomp cannot tell). ``skipped`` as for
    :func:`candidates`."""
    from gcomp.backends.ort_providers import short_name

    tvm = [p for p in candidates(skipped) if p[0] == "tvm" and (tvm_targets is None or p[1] in tvm_targets)]
    return [("ort", short_name(provider)), *tvm]


# The TVM targets on the device an execution provider runs on (for gcomp profile's auto).
_PROVIDER_DEVICE = {"CPUExecutionProvider": {"cpu", "llvm"}, "CUDAExecutionProvider": {"cuda"},
                    "TensorrtExecutionProvider": {"cuda"}, "NvTensorRTRTXExecutionProvider": {"cuda"}}


def _reference(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    from gcomp.backends.ort import OrtBackend

    return OrtBackend().compile(model, "cpu", optimization="disable").run(feeds)


def _reduced_precision(model: ir.Model | None) -> str | None:
    """"float16"/"bfloat16" when ``model`` computes in that precision inside."""
    if model is None:
        return None
    found = {v.dtype for v in model.graph.initializers.values() if v.dtype is not None}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        found.update(v.dtype for v in node.outputs if v.dtype is not None)
    for low, name in ((ir.DataType.FLOAT16, "float16"), (ir.DataType.BFLOAT16, "bfloat16")):
        if low in found:
            return name
    return None


def _check(expected, actual, model: ir.Model | None = None) -> tuple[bool, float]:
    """Outputs agree: fp32 tolerances element by element; for a model that computes in
    fp16/bf16 inside (fp32 at its edges), the reduced-precision criterion of gcomp's
    precision passes, ``max|a-e| / max(1, max|e|)`` within that precision's rtol: the
    reference (ORT on CPU) upcasts many fp16 ops while TVM computes in fp16, so elements
    near zero legitimately differ by more than an fp32 element-wise tolerance."""
    from gcomp.verify import TOLERANCES, compare_outputs

    checks = compare_outputs(expected, actual, TOLERANCES)
    worst = max((c.max_abs_error for c in checks), default=0.0)
    low = _reduced_precision(model)
    if low is None or any(c.ok is False and (c.nan or c.inf or "missing" in c.detail) for c in checks):
        return all(c.ok for c in checks), worst
    rtol = TOLERANCES[low].rtol
    for name, e in expected.items():
        a = np.asarray(actual[name], dtype=np.float64)
        e = np.asarray(e, dtype=np.float64)
        if a.shape != e.shape or np.abs(a - e).max(initial=0.0) / max(1.0, np.abs(e).max(initial=0.0)) > rtol:
            return False, worst
    return True, worst


def _compile(backend: str, target: str, model: ir.Model, shapes, *, tune_trials=0, tune_seconds=None,
             cache_dir=None, progress=None, optimization="all", threads=None, provider_options=None,
             tvm_options=None):
    from gcomp.backends import get_backend

    be = get_backend(backend)
    if backend == "tvm":
        prepared = prepare_for_tvm(model, shapes, target=target, progress=progress)
        return be.compile(prepared, target, tune_trials=tune_trials, tune_seconds=tune_seconds,
                          cache_dir=cache_dir, progress=progress, **(tvm_options or {}))
    return be.compile(model, target, optimization=optimization, threads=threads, provider_options=provider_options)


def prepare_for_tvm(
    model: ir.Model | str | os.PathLike,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    *,
    target: str = "llvm",
    progress: Callable[[str], None] | None = None,
) -> ir.Model:
    """A copy of ``model`` that the TVM backend can import, for its ``target`` (``llvm``,
    ``cuda`` or an alias): the backend's own part first (the target named, every op
    importable, given input shapes bound), then gcomp's pipeline, which the backend never
    runs itself: O3 for ``tvm-<kind>`` folds the shape arithmetic, so
    ``Shape → Gather → Concat → Reshape`` chains become constants (TVM 0.27's importer
    fails on a ``Shape`` of a shape value), and applies the fusions TVM accepts
    (BatchNormalization folded into Conv weights, LayerNormalization/Gelu/Gemm: fewer,
    cheaper kernels; cnn: compile 16.6 s -> 4.6 s), with the TVM family on top (Q/K/V
    projections packed into one MatMul). O1 is used when that fails.

    Refuses (BackendError) an unknown target, ops TVM cannot import, and an input shape
    of the wrong rank. The original is untouched.
    """
    from gcomp import io
    from gcomp.backends import tvm
    from gcomp.pipeline import optimize

    kind = tvm.target_kind(target)
    source = model if isinstance(model, ir.Model) else io.load(model)
    tvm.check_importable(source)
    if progress:
        progress("preparing the model for TVM (binding shapes, folding)")
    bound = tvm.bind_input_shapes(source, input_shapes)
    backup = ir.serde.serialize_model(bound)
    try:
        return optimize(bound, "O3", verify=False, target=f"tvm-{kind}").model
    except GcompError:
        return optimize(ir.serde.deserialize_model(backup), "O1", verify=False).model


def select_backend(
    model: ir.Model,
    feeds: Mapping[str, np.ndarray],
    *,
    iters: int = 20,
    warmup: int = 3,
    tune_trials: int = 0,
    tune_seconds: float | None = None,
    cache_dir: str | os.PathLike | None = None,
    pairs: list[tuple[str, str]] | None = None,
    skipped: list[Candidate] | None = None,
    provider_options: Mapping[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Selection:
    """Compile on every available backend, verify each, time each, pick the fastest verified.
    ``pairs`` default to :func:`candidates`; ``skipped`` candidates (backends not installed)
    are listed after the others.

    ``provider_options`` go to ORT's candidates (their execution provider's options).
    Raises BackendError only when no candidate both runs and matches the reference.
    """
    say = progress or (lambda _m: None)
    if pairs is None:
        skipped = []
        pairs = candidates(skipped)
    shapes = {k: tuple(np.shape(v)) for k, v in feeds.items() if isinstance(v, (np.ndarray, np.generic))}
    expected = _reference(model, feeds)
    selection = Selection(chosen=None)
    best_exe = None
    for backend, target in pairs:
        cand = Candidate(backend, target)
        selection.candidates.append(cand)
        say(f"candidate {backend}/{target}: compiling")
        t0 = time.perf_counter()
        try:
            exe = _compile(backend, target, model, shapes, tune_trials=tune_trials, tune_seconds=tune_seconds,
                           cache_dir=cache_dir, progress=say,
                           provider_options=provider_options if backend == "ort" else None)
            cand.compile_seconds = time.perf_counter() - t0
            ok, err = _check(expected, exe.run(feeds), model)
            cand.max_abs_error = err
            if not ok:
                cand.status = "mismatch"
                cand.error = f"outputs differ from the reference (max abs error {err:.3g})"
                continue
            say(f"candidate {backend}/{target}: timing")
            samples = []
            for _ in range(warmup):
                exe.run(feeds)
            for _ in range(iters):
                t = time.perf_counter()
                exe.run(feeds)
                samples.append((time.perf_counter() - t) * 1e3)
            samples.sort()
            cand.mean_ms = float(np.mean(samples))
            cand.p50_ms = float(np.median(samples))
            cand.min_ms = samples[0]
            cand.status = "ok"
        except GcompError as e:
            cand.status = "failed"
            cand.error = str(e)
            continue
        if selection.chosen is None or cand.p50_ms < selection.chosen.p50_ms:
            selection.chosen, best_exe = cand, exe
    selection.candidates.extend(skipped or ())
    if selection.chosen is None:
        reasons = "; ".join(f"{c.backend}/{c.target}: {c.error}" for c in selection.candidates)
        raise BackendError(f"no backend runs this model correctly ({reasons})")
    selection.chosen.chosen = True
    selection.executable = best_exe
    return selection


def compile_model(
    model_path: str | os.PathLike,
    *,
    backend: str,
    target: str,
    output: str | os.PathLike | None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    inputs: str | os.PathLike | None = None,
    tune_trials: int = 0,
    tune_seconds: float | None = None,
    cache_dir: str | os.PathLike | None = None,
    verify: bool = True,
    max_tensor_bytes: int | None = None,
    progress: Callable[[str], None] | None = None,
    tvm_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``gcomp compile``: returns a JSON-able summary; writes ``output`` only after the
    executable verified (or verification was off), never over the input. A TVM artifact
    also holds the inputs and ONNX Runtime's outputs for them (``check.npz``), so the
    machine it is run on can check it; ``tvm_options`` go to the TVM backend's compile
    (``weights``, ``cuda_arch``)."""
    from gcomp import io
    from gcomp.inputs import generate_inputs, load_inputs

    say = progress or (lambda _m: None)
    if backend == "tvm":  # before reading the model: one line naming gcomp[tvm]
        from gcomp.backends.tvm import require_tvm

        require_tvm(tuning=tune_trials > 0)
    m = io.load(model_path)
    if output is not None:
        out = Path(output)
        if out.resolve() == Path(model_path).resolve():
            raise GcompError(f"{out}: refusing to write over the input model")
    given = load_inputs(inputs, m) if inputs else None
    feeds, notes = generate_inputs(m, shapes=dict(input_shapes or {}), given=given, max_bytes=max_tensor_bytes)
    shapes = {k: tuple(np.shape(v)) for k, v in feeds.items() if isinstance(v, (np.ndarray, np.generic))}
    expected = None
    if backend == "auto":
        sel = select_backend(m, feeds, tune_trials=tune_trials, tune_seconds=tune_seconds, cache_dir=cache_dir,
                             progress=say)
        exe, backend, target = sel.executable, sel.chosen.backend, sel.chosen.target
        selection = sel.to_dict()
        verified = {"status": "passed", "max_abs_error": sel.chosen.max_abs_error}
        seconds = sel.chosen.compile_seconds
    else:
        selection = None
        t0 = time.perf_counter()
        exe = _compile(backend, target, m, shapes, tune_trials=tune_trials, tune_seconds=tune_seconds,
                       cache_dir=cache_dir, progress=say, tvm_options=tvm_options)
        seconds = time.perf_counter() - t0
        verified = {"status": "skipped"}
        runnable = getattr(exe, "_runnable", True)
        if verify and not runnable:
            verified = {"status": "unverified", "reason": f"no device to run {target} code on"}
        elif verify:
            say("verifying against ONNX Runtime")
            expected = _reference(m, feeds)
            ok, err = _check(expected, exe.run(feeds), m)
            verified = {"status": "passed" if ok else "failed", "max_abs_error": err}
            if not ok:
                raise GcompError(
                    f"{backend}/{target}: outputs differ from the reference (max abs error {err:.3g}); nothing written"
                )
    written = None
    if output is not None and backend == "tvm":
        # check.npz holds the verified reference; with verification off nothing runs on ONNX
        # Runtime (a model it cannot run still exports) and the artifact has no check.npz
        written = str(exe.export(output, check=(feeds, expected) if expected is not None else None))
    elif output is not None:
        written = str(exe.export(output))
    tuning = getattr(exe, "tuning", None)
    return {
        "kind": "compile",
        "model": str(model_path),
        "backend": backend,
        "target": target,
        "input_shapes": {k: list(v) for k, v in shapes.items()},
        "compile_seconds": seconds,
        "tuning": tuning.to_dict() if tuning is not None else None,
        "verification": verified,
        "output": written,
        "artifact": getattr(exe, "artifact_info", None) if written else None,
        "selection": selection,
        "notes": notes,
    }


def compile_for_profile(
    backend: str,
    device: str,
    model_path: str | os.PathLike,
    model: ir.Model,
    feeds: Mapping[str, np.ndarray],
    *,
    optimization: str = "all",
    threads: int | None = None,
    provider: str | None = None,
    provider_options: Mapping[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[Any, Selection | None]:
    """The executable ``gcomp profile`` measures: on ``backend`` for ``device`` (cpu or
    cuda), or with ``backend == "auto"`` the fastest verified one for that device. With
    ``provider`` (ORT's name of an execution provider), ORT runs on it with
    ``provider_options``, and auto races it against TVM on that provider's device."""
    shapes = {k: tuple(np.shape(v)) for k, v in feeds.items() if isinstance(v, (np.ndarray, np.generic))}
    if backend == "auto":
        if provider is not None:
            wanted = _PROVIDER_DEVICE.get(provider, set())
        else:
            wanted = {"cpu": {"cpu", "llvm"}, "cuda": {"cuda"}}.get(device, {device})
        skipped: list[Candidate] = []
        if provider is not None:
            pairs = provider_pairs(provider, tvm_targets=wanted, skipped=skipped)
        else:
            pairs = [p for p in candidates(skipped) if p[1] in wanted]
        if not pairs:
            raise BackendError(f"no backend has a '{device}' target on this machine")
        sel = select_backend(model, feeds, pairs=pairs, skipped=[c for c in skipped if c.target in wanted],
                             provider_options=provider_options, progress=progress)
        return sel.executable, sel
    if backend == "tvm":
        from gcomp.backends.tvm import cuda_available

        if device == "cuda" and not cuda_available():
            raise BackendError("tvm: profiling on 'cuda' needs a CUDA GPU; none found")
        return _compile("tvm", device, model, shapes, progress=progress), None
    return _compile(backend, provider or device, model_path, shapes, optimization=optimization, threads=threads,
                    provider_options=provider_options), None


def optimize_selection(
    model: ir.Model,
    *,
    inputs: str | os.PathLike | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    max_tensor_bytes: int | None = None,
    provider: str | None = None,
    provider_options: Mapping[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``gcomp optimize --backend auto``: the selection for the optimized ``model`` as a
    report section (every candidate's figures, the chosen one marked). With ``provider``,
    ORT's candidate runs on it (:func:`provider_pairs`)."""
    from gcomp.inputs import generate_inputs, load_inputs

    given = load_inputs(inputs, model) if inputs else None
    feeds, _ = generate_inputs(model, shapes=dict(input_shapes or {}), given=given, max_bytes=max_tensor_bytes)
    skipped: list[Candidate] = []
    pairs = provider_pairs(provider, skipped=skipped) if provider is not None else None
    return select_backend(model, feeds, pairs=pairs, skipped=skipped, provider_options=provider_options,
                          progress=progress).to_dict()
