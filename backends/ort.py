"""ONNX Runtime backend: sessions on any execution provider this ORT build offers.

- ``compile`` builds an ``InferenceSession`` with a chosen graph-optimization level
  (``disable`` is the reference runtime gcomp verifies against). Its target is a provider,
  full or short (``cpu``, ``cuda``, ``tensorrt``, ``CUDAExecutionProvider``...; see
  :mod:`gcomp.backends.ort_providers`), with that provider's options; a provider other
  than the CPU gets the CPU after it, for the nodes it does not take.
- A GPU provider is requested only when a GPU is really present, so a CPU machine with
  onnxruntime-gpu installed never prints CUDA loading errors; a session that leaves the
  requested provider out anyway is an error, never a silent run on the CPU.
- ``profile`` times whole runs (warm-up excluded) on the plain session and per-node
  kernel times from ORT's own profiling trace (a second session, so profiling overhead
  does not pollute the latency figures).
- ``export`` writes ORT's offline-optimized model, with its own external data file.
"""

from __future__ import annotations

__all__ = ["OrtBackend", "OrtExecutable", "cuda_available", "run_sharing_weights", "OPTIMIZATION_LEVELS"]

import contextlib
import functools
import json
import os
import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from gcomp import io
from gcomp.backends._device import nvidia_gpu_present, peak_memory
from gcomp.backends.ort_providers import (
    CPU,
    check_machine,
    check_session,
    effective_options,
    native_stderr,
    option_error,
    resolve_provider,
    session_request,
    short_name,
)
from gcomp.errors import BackendError, OptionError
from gcomp.perf import LatencyStats, OpRow, Profile, environment, model_identity

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
_NO_KERNEL = re.compile(
    r"Could not find an implementation for (\w+)\((\d+)\) node with name '([^']*)'"
)


def _ort():
    from gcomp.deps import ensure_onnxruntime

    ensure_onnxruntime()  # one line when two ONNX Runtime builds share its folder, or none is installed
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    return onnxruntime


@functools.cache
def cuda_available() -> bool:
    """True when a CUDA device is present and ONNX Runtime has its CUDA provider."""
    if not nvidia_gpu_present():
        return False
    return "CUDAExecutionProvider" in _ort().get_available_providers()


class OrtBackend:
    name = "ort"
    targets = ("cpu", "cuda")

    def available_targets(self) -> list[str]:
        return ["cpu"] + (["cuda"] if cuda_available() else [])

    def supports(self, op_type: str, domain: str = "", opset: int | None = None) -> bool:
        """Whether ONNX Runtime registers the op (see :mod:`gcomp.backends.target_ops`)."""
        from gcomp.backends.target_ops import ort_supports

        return ort_supports(op_type, domain, opset)

    def compile(
        self,
        model: ir.Model | str | os.PathLike,
        target: str = "cpu",
        *,
        optimization: str = "all",
        threads: int | None = None,
        provider_options: Mapping[str, str] | None = None,
    ) -> OrtExecutable:
        """``target``: an execution provider, full or short (``cpu``, ``cuda``,
        ``TensorrtExecutionProvider``...), with ``provider_options`` for it."""
        try:
            provider = resolve_provider(target, what="ort: target")
        except OptionError as e:
            raise BackendError(f"ort: unknown target '{target}' ({str(e).split(': ', 2)[-1]})") from None
        check_machine(provider)
        if optimization not in OPTIMIZATION_LEVELS:
            raise BackendError(
                f"ort: unknown optimization level '{optimization}' ({', '.join(OPTIMIZATION_LEVELS)})"
            )
        return OrtExecutable(model, provider, optimization, threads, provider_options)


class OrtExecutable:
    """A model loaded into ONNX Runtime. Keeps the source so it can re-open sessions."""

    def __init__(self, model, provider: str, optimization: str, threads: int | None,
                 provider_options: Mapping[str, str] | None = None) -> None:
        self.provider = provider
        self.provider_options = effective_options(provider, provider_options)  # gcomp's defaults under them
        self.target = short_name(provider)
        self.optimization = optimization
        self.threads = threads
        self._tmp: str | None = None
        self._ir = model if isinstance(model, ir.Model) else None
        self._path = None if isinstance(model, (ir.Model, bytes)) else str(model)
        self._source = self._materialize(model)
        self._session = self._new_session()
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]

    def __del__(self) -> None:
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def _materialize(self, model) -> str | bytes:
        if isinstance(model, bytes):  # a serialized ModelProto
            return model
        if not isinstance(model, ir.Model):
            return str(model)
        if io.initializer_bytes(model) < io.PROTOBUF_LIMIT_BYTES // 2:
            return io.serialize(model)
        # Too large for one protobuf: give ORT a file with external data.
        self._tmp = tempfile.mkdtemp(prefix="gcomp-ort-")
        path = Path(self._tmp) / "model.onnx"
        io.save(model, path, external_data=True)
        return str(path)

    @property
    def providers(self) -> list[str]:
        """The providers the session really uses (ORT's ``get_providers()``)."""
        return list(self._session.get_providers())

    def _options(self, **extra):
        ort = _ort()
        so = ort.SessionOptions()
        so.log_severity_level = 4  # failures reach the caller as exceptions; no log spam
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.optimization]
        if self.threads:
            so.intra_op_num_threads = self.threads
        for key, value in extra.items():
            setattr(so, key, value)
        return so

    def _new_session(self, options=None):
        """A session on the provider, which must really use it (``check_session``). ORT's
        own fallback (a stdout banner, then a CPU session) is off; for a provider other
        than the CPU, ORT's log is captured to say why it could not be used."""
        ort = _ort()
        providers, provider_options = session_request(self.provider, self.provider_options)
        log = None
        try:
            with native_stderr() if self.provider != CPU else contextlib.nullcontext() as log:
                session = ort.InferenceSession(
                    self._source, sess_options=options or self._options(), providers=providers,
                    provider_options=provider_options, enable_fallback=0,
                )
        except Exception as e:
            where = "" if self.provider == CPU else f" on {self.provider}"
            raise option_error(self.provider, e) or _backend_error(f"cannot load the model{where}", e) from None
        check_session(session, self.provider, self.provider_options, log.text if log is not None else "")
        return session

    def run(self, feeds: Mapping[str, np.ndarray], *, timeout: float | None = None) -> dict[str, np.ndarray]:
        """Run once. With ``timeout`` (seconds), a run still going is stopped (ORT's
        terminate flag, honoured between kernels, inside Loop bodies too)."""
        return self._run(self._session, feeds, timeout)

    def _run(self, session, feeds: Mapping[str, np.ndarray], timeout: float | None = None) -> dict[str, np.ndarray]:
        import threading

        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise BackendError(f"ort: missing inputs: {', '.join(missing)}")
        options = _ort().RunOptions()
        options.log_severity_level = 4
        timer = None
        if timeout is not None:
            timer = threading.Timer(timeout, lambda: setattr(options, "terminate", True))
            timer.daemon = True
            timer.start()
        try:
            outputs = session.run(None, {k: feeds[k] for k in self.input_names}, options)
        except Exception as e:
            if timeout is not None and options.terminate:
                raise BackendError(f"ONNX Runtime: run stopped after {timeout:g} s") from None
            raise _backend_error("run failed", e) from None
        finally:
            if timer is not None:
                timer.cancel()
        return dict(zip(self.output_names, outputs))

    def profile(
        self, feeds: Mapping[str, np.ndarray], *, iters: int = 50, warmup: int = 5, profile_runs: int = 10
    ) -> Profile:
        if iters < 1 or warmup < 0:
            raise BackendError("ort: profile needs iters >= 1 and warmup >= 0")
        for _ in range(warmup):
            self.run(feeds)
        samples = []
        for _ in range(iters):
            t0 = time.perf_counter()
            self.run(feeds)
            samples.append((time.perf_counter() - t0) * 1e3)
        runs = max(1, min(profile_runs, iters))
        ops, timeline, spans = self._node_times(feeds, runs)
        model = self._ir if self._ir is not None else io.load(self._path, check=False)
        prof = Profile(
            model=model_identity(model, self._path),
            environment=environment(),
            backend={
                "name": "ort",
                "target": self.target,
                "provider": self.provider,
                **({"provider_options": dict(self.provider_options)} if self.provider_options else {}),
                "providers": self._session.get_providers(),
                "optimization": self.optimization,
                "threads": self.threads,
            },
            latency=LatencyStats.from_samples(samples, warmup),
            ops=ops,
            memory=peak_memory(),
            timeline=timeline,
            profiled_run_ms=statistics.median(s for s, _ in spans) if spans else None,
            run_coverage=statistics.median(c for _, c in spans) if spans else None,
        ).finish()
        # a sequence or optional input has no one shape
        shapes = {k: tuple(np.shape(v)) for k, v in feeds.items() if isinstance(v, (np.ndarray, np.generic))}
        return prof.annotate(model, shapes)

    def _node_times(self, feeds, runs: int) -> tuple[list[OpRow], list[dict], list[tuple[float, float]]]:
        tmp = tempfile.mkdtemp(prefix="gcomp-prof-")
        try:
            options = self._options(enable_profiling=True, profile_file_prefix=str(Path(tmp) / "ort"))
            session = self._new_session(options)
            self._run(session, feeds)  # the first run initialises kernels: not counted
            for _ in range(runs):
                self._run(session, feeds)
            trace_path = session.end_profiling()
            events = json.loads(Path(trace_path).read_text())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return _parse_trace(events, runs), _timeline(events), _run_spans(events, runs)

    def export(self, path: str | os.PathLike) -> Path:
        """Write ONNX Runtime's offline-optimized model (its own external data beside it)."""
        out = Path(path)
        src = Path(self._path).resolve() if self._path else None
        if src is not None and out.resolve() == src:
            raise BackendError(f"{out}: refusing to write over the input model")
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.resolve().parent))
        try:
            options = self._options(optimized_model_filepath=str(tmpdir / out.name))
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", out.name + ".data"
            )
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_min_size_in_bytes", str(1 << 20)
            )
            self._new_session(options)
            if (tmpdir / (out.name + ".data")).exists():
                os.replace(tmpdir / (out.name + ".data"), out.resolve().parent / (out.name + ".data"))
            os.replace(tmpdir / out.name, out)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        return out


_SHAREABLE = {ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.INT64,
              ir.DataType.INT32, ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.BOOL}


def run_sharing_weights(copy: ir.Model, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``copy`` on ORT with its large weights passed as OrtValues (``add_initializer``).

    Optimizations off (the reference). Serializing a BERT-base-sized copy for ORT costs
    more than running it, and the emulator (gcomp.verify.emulate) builds one copy per trial.
    ``copy`` is changed: its shared weights point into a placeholder file afterwards. ORT takes an added initializer instead of
    the model's own, but still checks that the model's external-data file exists: the
    model is written with its weights pointing into a sparse placeholder file.
    """
    ort = _ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4
    folder = tempfile.mkdtemp(prefix="gcomp-emulate-")
    keep = []  # the arrays and OrtValues must outlive the session
    try:
        offset = 0
        for v in copy.graph.initializers.values():
            t = v.const_value
            if t is None or t.dtype not in _SHAREABLE or t.nbytes < 4096:
                continue
            array = np.ascontiguousarray(t.numpy())
            value = ort.OrtValue.ortvalue_from_numpy(array)
            keep.append((array, value))
            so.add_initializer(v.name, value)
            v.const_value = ir.ExternalTensor("weights.bin", offset, t.nbytes, t.dtype, shape=t.shape,
                                              name=v.name, base_dir=folder)
            offset += t.nbytes
        with open(f"{folder}/weights.bin", "wb") as f:
            f.truncate(offset)  # sparse: ORT checks it exists, never reads it
        path = f"{folder}/model.onnx"
        with open(path, "wb") as f:
            f.write(ir.to_proto(copy).SerializeToString())
        try:
            session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            names = [o.name for o in session.get_outputs()]
            wanted = {i.name for i in session.get_inputs()}
            return dict(zip(names, session.run(None, {k: v for k, v in feeds.items() if k in wanted})))
        except Exception as e:  # noqa: BLE001  (ORT raises its own types; the caller gets a BackendError)
            raise _backend_error("emulated run", e) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _parse_trace(events: list, runs: int) -> list[OpRow]:
    """Per-node kernel times from ORT's Chrome trace, over the timed runs.

    ORT records every run after the first; kernel events are ``cat == "Node"`` with
    names ``<node>_kernel_time``. The first run's events are dropped by keeping the
    last ``runs`` occurrences of each node. A node run once per run gets the median of
    its runs (other processes on a busy machine stretch single kernels several times
    over: the mean follows them, the median does not); one run several times per run
    (inside a loop) gets its total divided by the runs. Each row keeps the tensor shapes
    ORT ran the node on (``input_type_shape``/``output_type_shape``), so runtime-made
    kernels are priced as executed.
    """
    per_node: dict[str, list[float]] = {}
    meta: dict[str, tuple[str, str | None, list | None, list | None]] = {}
    for ev in events:
        if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time"):
            continue
        node = ev["name"][: -len("_kernel_time")]
        args = ev.get("args", {})
        per_node.setdefault(node, []).append(float(ev.get("dur", 0)) / 1e3)
        meta[node] = (args.get("op_name", "?"), args.get("provider"),
                      _trace_tensors(args.get("input_type_shape")), _trace_tensors(args.get("output_type_shape")))
    rows = []
    for node, durs in per_node.items():
        timed = durs[-runs:]
        calls_per_run = max(1, len(timed) // runs) if len(durs) >= runs else 1
        op_type, provider, inputs, outputs = meta[node]
        rows.append(
            OpRow(
                node=node,
                op_type=op_type,
                time_ms=statistics.median(timed) if len(timed) == runs else sum(timed) / runs,
                calls=calls_per_run,
                provider=provider,
                inputs=inputs,
                outputs=outputs,
            )
        )
    return rows


def _trace_tensors(items) -> list | None:
    """ORT's ``[{"float": [1, 3, 224, 224]}, ...]`` as ``[{"dtype": "float", "shape": [...]}]``."""
    if not isinstance(items, list):
        return None
    out = []
    for item in items:
        if isinstance(item, dict) and len(item) == 1:
            (dtype, shape), = item.items()
            out.append({"dtype": dtype, "shape": [int(d) for d in shape]} if isinstance(shape, list) else None)
        else:
            out.append(None)
    return out


def _run_spans(events: list, runs: int) -> list[tuple[float, float]]:
    """(span ms, share of it inside kernels) of each of the last ``runs`` runs in the trace:
    taken run by run, so load that stretches some runs cannot skew the ratio."""
    spans = [ev for ev in events if ev.get("cat") == "Session" and ev.get("name") == "model_run"][-runs:]
    kernels = [(float(ev.get("ts", 0)), float(ev.get("dur", 0))) for ev in events
               if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time")]
    out = []
    for span in spans:
        lo, dur = float(span["ts"]), float(span.get("dur", 0))
        inside = sum(d for ts, d in kernels if lo <= ts <= lo + dur)
        if dur > 0:
            out.append((dur / 1e3, inside / dur))
    return out


def _timeline(events: list) -> list[dict]:
    """The last run in ORT's trace: its span, then its kernels, times relative to its start (ms)."""
    runs = [ev for ev in events if ev.get("cat") == "Session" and ev.get("name") == "model_run"]
    if not runs:
        return []
    last = runs[-1]
    start, end = float(last["ts"]), float(last["ts"]) + float(last.get("dur", 0))
    rows = [{"node": "model_run", "op_type": None, "start_ms": 0.0, "dur_ms": float(last.get("dur", 0)) / 1e3}]
    for ev in events:
        if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time"):
            continue
        ts = float(ev.get("ts", 0))
        if start <= ts <= end:
            rows.append({
                "node": ev["name"][: -len("_kernel_time")],
                "op_type": ev.get("args", {}).get("op_name"),
                "start_ms": (ts - start) / 1e3,
                "dur_ms": float(ev.get("dur", 0)) / 1e3,
            })
    return rows


def _backend_error(what: str, e: Exception) -> BackendError:
    text = str(e).strip()
    m = _NO_KERNEL.search(text)
    if m:
        err = BackendError(
            f"ONNX Runtime has no kernel for {m.group(1)} (opset {m.group(2)}), node '{m.group(3)}'"
        )
        err.missing_kernel = m.group(1)
        return err
    first = text.splitlines()[0] if text else type(e).__name__
    first = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", first)
    first = re.sub(r"^/\S+:\d+ [^(]*\([^)]*\) ", "", first)  # "/src/file.cc:729 void f(args) message"
    err = BackendError(f"ONNX Runtime: {what}: {first}")
    err.missing_kernel = None
    return err
