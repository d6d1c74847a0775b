"""The profile data model: one run of a model on a backend, as numbers tied to graph nodes.

Every backend's ``Executable.profile`` returns a :class:`Profile`; every renderer in
:mod:`gcomp.report` (JSON, Markdown, HTML, Chrome traces) reads one. The JSON form is
documented by ``gcomp/schemas/report.schema.json`` and carries ``schema_version``.

:meth:`Profile.annotate` adds what gcomp computes itself, whatever the backend: FLOPs and
bytes per op from shapes (:mod:`gcomp.perf.flops`), achieved GFLOP/s and GB/s, and whether
each op is compute- or memory-bound on this machine's roofline (:mod:`gcomp.perf.roofline`).
Backends only report times, and shapes when they know the ones they ran.
"""

from __future__ import annotations

__all__ = [
    "SCHEMA_VERSION",
    "LatencyStats",
    "OpRow",
    "Profile",
    "environment",
    "gpu_memory_of_process",
    "model_identity",
    "provider_counts",
]

import hashlib
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from gcomp.perf import flops as fl
from gcomp.perf import roofline as rl
from gcomp.perf.stats import memory_estimate, model_stats

# 1.1 added: op costs and roofline fields, totals, timeline, environment cpu_features/gpu,
# optimize reports' per-pass max_abs_error and before/after profiles, kind "compare".
# 1.2 added: optimize profiles' interleaved "speed"; ops' attainable_gflops_per_s and
# above_roof; roofline peak_method, bandwidth_method, gemm_gflops; memory weights_bytes,
# activations_peak_bytes, unsized_activations, model_bytes_estimate, model_bytes_method.
SCHEMA_VERSION = "1.3"


@dataclass
class LatencyStats:
    """Wall-clock latency of whole-model runs, warm-up excluded, in milliseconds."""

    iterations: int
    warmup: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float
    stdev_ms: float
    throughput_per_s: float
    samples_ms: list[float] = field(default_factory=list)  # every timed run, in run order

    @classmethod
    def from_samples(cls, samples_ms: list[float], warmup: int) -> LatencyStats:
        if not samples_ms:
            raise ValueError("no latency samples")
        ordered = sorted(samples_ms)
        mean = statistics.fmean(ordered)
        return cls(
            iterations=len(ordered),
            warmup=warmup,
            mean_ms=mean,
            p50_ms=_percentile(ordered, 50),
            p90_ms=_percentile(ordered, 90),
            p99_ms=_percentile(ordered, 99),
            min_ms=ordered[0],
            max_ms=ordered[-1],
            stdev_ms=statistics.stdev(ordered) if len(ordered) > 1 else 0.0,
            throughput_per_s=1000.0 / mean if mean > 0 else 0.0,
            samples_ms=list(samples_ms),
        )


def _percentile(ordered: list[float], q: float) -> float:
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class OpRow:
    """Time one kernel takes per model run (a backend's typical run: ORT's is the median
    over the profiled runs), with gcomp's costs once :meth:`Profile.annotate` ran."""

    node: str
    op_type: str
    time_ms: float
    calls: int = 1
    share: float = 0.0
    provider: str | None = None
    # The node's name in the profiled graph, or None for a node the runtime made itself
    # (e.g. ONNX Runtime's fused or layout-converted kernels).
    graph_node: str | None = None
    # The graph nodes one fused kernel computes, when the backend knows them (e.g. TVM's
    # fused functions): the kernel is priced as their sum, bytes at the group's boundary.
    graph_nodes: list[str] | None = None
    # Tensors the backend reports for the node: [{"dtype": "float", "shape": [1, 64, 56, 56]}]
    inputs: list[dict[str, Any] | None] | None = None
    outputs: list[dict[str, Any] | None] | None = None
    # Filled by Profile.annotate (None when unknown):
    flops: int | None = None
    macs: int | None = None
    bytes: int | None = None
    gflops_per_s: float | None = None
    gb_per_s: float | None = None
    intensity: float | None = None  # FLOP per byte
    bound: str | None = None  # "compute" | "memory"
    roof_efficiency: float | None = None  # achieved / attainable at this intensity (never above 1)
    # The roof at this kernel's intensity (GFLOP/s), and whether the kernel measured above
    # it: a calibration or timing error, shown as such (roof_efficiency is then None).
    attainable_gflops_per_s: float | None = None
    above_roof: bool = False


def provider_counts(ops) -> dict[str, int]:
    """ONNX Runtime execution provider -> how many kernels it ran, busiest first, from op
    rows (:class:`OpRow` or their dicts). ORT's trace names each node's provider; other
    backends' rows (TVM's ``tvm:<kernel>``) are not providers and are not counted. Reports
    show a provider column when more than one ran."""
    counts: dict[str, int] = {}
    for op in ops:
        provider = op.get("provider") if isinstance(op, dict) else op.provider
        if isinstance(provider, str) and provider.endswith("ExecutionProvider"):
            counts[provider] = counts.get(provider, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


@dataclass
class Profile:
    """One model's profile on one backend: latency, per-op rows, memory, and once
    :meth:`annotate` ran, the roofline and totals. ``to_dict``/``from_dict`` are its JSON form."""

    model: dict[str, Any]
    environment: dict[str, Any]
    backend: dict[str, Any]
    latency: LatencyStats
    ops: list[OpRow] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)
    schema_version: str = SCHEMA_VERSION
    roofline: dict[str, Any] | None = None
    totals: dict[str, Any] | None = None
    # One profiled run, ops as slices: [{"node", "op_type", "start_ms", "dur_ms"}], start
    # relative to the run's start; a row {"node": "model_run", "op_type": None} spans it.
    timeline: list[dict[str, Any]] = field(default_factory=list)
    # The runtime's own span of a profiled run (median), when it reports one: what the
    # per-op times of those same runs add up against.
    profiled_run_ms: float | None = None
    run_coverage: float | None = None  # median over those runs of (kernel time / run span)

    def finish(self) -> Profile:
        """Sort ops by time and fill in each op's share of the total op time."""
        total = sum(o.time_ms for o in self.ops)
        for op in self.ops:
            op.share = op.time_ms / total if total > 0 else 0.0
        self.ops.sort(key=lambda o: o.time_ms, reverse=True)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "kind": "profile",
            "model": self.model,
            "environment": self.environment,
            "backend": self.backend,
            "latency": asdict(self.latency),
            "memory": self.memory,
            "roofline": self.roofline,
            "totals": self.totals,
            "ops": [asdict(o) for o in self.ops],
            "timeline": self.timeline,
        }

    def annotate(
        self,
        model,
        input_shapes: dict[str, tuple[int, ...]] | None = None,
        *,
        calibrate: bool = True,
    ) -> Profile:
        """Add FLOPs, bytes, achieved rates and roofline bounds to every op row.

        A row that is a graph node is priced from the graph at ``input_shapes``
        (:func:`gcomp.perf.flops.graph_costs`); a kernel the runtime made itself (fused,
        layout converted) from the tensor shapes the backend reported for it, so it is
        priced as executed (its bytes miss weights the runtime's trace leaves out, e.g. ones
        ONNX Runtime pre-packed). ``totals`` gets the sums and the whole graph's FLOPs;
        ``memory`` gets what the model itself needs (:func:`gcomp.perf.stats.memory_estimate`)
        beside the process's peak RSS the backend recorded.
        """
        graph = {n.name: n for n in model.graph if n.name}
        # ONNX Runtime names a kernel it made after the value it writes
        # ("<value>_nchwc", or the value itself): that value's producer is the graph node
        # the kernel ends with.
        producers = {v.name: n for n in model.graph for v in n.outputs if v.name}
        graph_tensors: dict[str, tuple[list, list]] = {}
        try:
            graph_cost = fl.graph_costs(model, input_shapes, tensors=graph_tensors)
        except Exception:  # shape inference is best effort; rows priced by their own shapes
            graph_cost = {}
        m = rl.machine(calibrate=calibrate)
        self.roofline = m.to_dict()
        for op in self.ops:
            node = _graph_node(op, graph, producers)
            cost = _row_cost(op, node, model, graph_cost, graph_tensors)
            if cost is not None:
                _set_rates(op, cost, m)
        self.totals = self._totals(graph_cost)
        self.memory.update(memory_estimate(model, graph_tensors))
        return self

    def _totals(self, graph_cost: dict[str, fl.Cost]) -> dict[str, Any]:
        op_time = sum(o.time_ms for o in self.ops)
        flops_total = sum(o.flops or 0 for o in self.ops)
        graph_flops = [c.flops for c in graph_cost.values()]
        p50_s = self.latency.p50_ms / 1e3
        return {
            "op_time_ms": op_time,
            "flops": flops_total,
            "macs": sum(o.macs or 0 for o in self.ops),
            "bytes": sum(o.bytes or 0 for o in self.ops),
            "unpriced_ops": sum(1 for o in self.ops if o.flops is None),
            "above_roof_ops": sum(1 for o in self.ops if o.above_roof),
            "graph_flops": sum(f for f in graph_flops if f is not None) if graph_cost else None,
            "graph_macs": sum(c.macs or 0 for c in graph_cost.values()) if graph_cost else None,
            # Medians: on a busy machine a few slow runs move the mean a lot.
            "achieved_gflops_per_s": flops_total / p50_s / 1e9 if p50_s > 0 else None,
            "op_time_over_latency": op_time / self.latency.p50_ms if p50_s > 0 else None,
            "profiled_run_ms": self.profiled_run_ms,
            "op_time_over_profiled_run": self.run_coverage,
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Profile:
        """Rebuild a profile from its JSON form (unknown keys are ignored)."""
        op_fields = set(OpRow.__dataclass_fields__)
        lat_fields = set(LatencyStats.__dataclass_fields__)
        return cls(
            model=doc["model"],
            environment=doc["environment"],
            backend=doc["backend"],
            latency=LatencyStats(**{k: v for k, v in doc["latency"].items() if k in lat_fields}),
            ops=[OpRow(**{k: v for k, v in o.items() if k in op_fields}) for o in doc["ops"]],
            memory=doc.get("memory") or {},
            schema_version=doc.get("schema_version", SCHEMA_VERSION),
            roofline=doc.get("roofline"),
            totals=doc.get("totals"),
            timeline=doc.get("timeline") or [],
            profiled_run_ms=(doc.get("totals") or {}).get("profiled_run_ms"),
            run_coverage=(doc.get("totals") or {}).get("op_time_over_profiled_run"),
        )


def _graph_node(op: OpRow, graph: dict, producers: dict):
    """The graph node a row computes, or None; fills ``op.graph_node`` when found.

    A kernel of another op type than its graph node (a runtime's fusion) gets None: it is
    priced from its own shapes, not from the graph node's attributes."""
    node = graph.get(op.node)
    if node is None:
        node = producers.get(op.node.removesuffix("_nchwc"))
    if op.graph_node is None and node is not None:
        op.graph_node = node.name
    if node is not None and node.op_type != op.op_type:
        return None
    return node


def _row_cost(op: OpRow, node, model, graph_cost: dict, graph_tensors: dict) -> fl.Cost | None:
    """What a row costs; fills in its tensors from the graph where the trace left them out."""
    # A graph node is priced from the graph (inferred shapes, its attributes): a runtime's
    # trace can omit inputs (ORT drops weights it pre-packed, e.g. Gemm's B). A kernel the
    # runtime made is priced from the shapes its trace reports.
    cost = graph_cost.get(op.node) if node is not None and node.name == op.node else None
    if op.graph_nodes and len(op.graph_nodes) > 1:
        cost = fl.fused_cost(model, op.graph_nodes, graph_cost, graph_tensors)
    if cost is not None and op.node in graph_tensors:
        ins, outs = graph_tensors[op.node]
        if op.inputs is None or len(op.inputs) < len(ins):  # e.g. a pre-packed weight left out
            op.inputs = [_tensor_dict(t) for t in ins]
        if op.outputs is None:
            op.outputs = [_tensor_dict(t) for t in outs]
    if (cost is None or cost.flops is None) and op.inputs is not None and op.outputs is not None:
        attrs = fl.attribute_dict(node) if node is not None else {}
        cost = fl.op_cost(op.op_type, [_tensor_info(t) for t in op.inputs],
                          [_tensor_info(t) for t in op.outputs], attrs,
                          node.domain if node is not None else "")
    return cost


def _set_rates(op: OpRow, cost: fl.Cost, m: rl.Machine) -> None:
    """A row's costs, achieved rates, bound and efficiency against this machine's roofline."""
    op.flops, op.macs, op.bytes = cost.flops, cost.macs, cost.bytes
    seconds = op.time_ms / 1e3
    if seconds > 0:
        op.gflops_per_s = cost.flops / seconds / 1e9 if cost.flops is not None else None
        op.gb_per_s = cost.bytes / seconds / 1e9
    op.intensity = cost.flops / cost.bytes if cost.flops is not None and cost.bytes else None
    op.bound = rl.classify(cost.flops, cost.bytes, m.ridge)
    verdict = rl.judge(op.gflops_per_s, rl.attainable(m.peak_gflops, m.bandwidth_gbs, op.intensity))
    op.attainable_gflops_per_s, op.roof_efficiency, op.above_roof = (
        verdict.attainable_gflops, verdict.efficiency, verdict.above_roof)


def _tensor_info(t: dict[str, Any] | None) -> fl.TensorInfo | None:
    if not t or t.get("shape") is None or any(not isinstance(d, int) or d < 0 for d in t["shape"]):
        return None
    dtype = str(t.get("dtype", "float")).lower()
    return fl.TensorInfo(tuple(t["shape"]), fl.DTYPE_BYTES.get(dtype, 4), dtype)


def _tensor_dict(t) -> dict[str, Any] | None:
    if t is None:
        return None
    return {"dtype": t.dtype or "float", "shape": list(t.shape)}


def environment() -> dict[str, Any]:
    """What machine and which libraries produced a figure (no heavy imports)."""
    from importlib import metadata

    versions = {}
    dists = ("gcomp", "onnx", "onnx-ir", "onnxscript", "onnxruntime-gpu", "onnxruntime", "numpy",
             "apache-tvm")
    for dist in dists:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": rl.cpu_model(),
        "cores": os.cpu_count(),
        "cpu_features": rl.cpu_features(),
        "gpu": _gpus(),
        "versions": versions,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _gpus() -> list[dict[str, Any]]:
    """NVIDIA GPUs from nvidia-smi (absent tool or no GPU: an empty list)."""
    gpus = []
    for parts in _nvidia_smi("gpu=name,memory.total,driver_version") or []:
        if len(parts) == 3:
            try:
                memory = int(float(parts[1])) << 20
                gpus.append({"name": parts[0], "memory_bytes": memory, "driver": parts[2]})
            except ValueError:
                continue
    return gpus


def gpu_memory_of_process(pid: int | None = None) -> int | None:
    """Bytes of GPU memory the process holds now (nvidia-smi's compute apps; None without
    nvidia-smi or when the process holds none). Runtimes keep their memory pools after a
    run, so after profiling this is close to the peak."""
    pid = os.getpid() if pid is None else pid
    total = 0
    for parts in _nvidia_smi("compute-apps=pid,used_memory") or []:
        if len(parts) == 2 and parts[0] == str(pid):
            try:
                total += int(float(parts[1])) << 20
            except ValueError:
                continue
    return total or None


def _nvidia_smi(query: str) -> list[list[str]] | None:
    """nvidia-smi's answer to ``--query-<query>``: the fields of each line (None without the
    tool or when it fails)."""
    import shutil
    import subprocess

    tool = shutil.which("nvidia-smi")
    if tool is None:
        return None
    try:
        out = subprocess.run([tool, f"--query-{query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [[p.strip() for p in line.split(",")] for line in out.strip().splitlines()]


def model_identity(model, path: str | None = None) -> dict[str, Any]:
    """Name, opsets, node and parameter counts, and a hash of the graph (not the weights)."""
    stats = model_stats(model)
    digest = hashlib.sha256()
    for node in model.graph:
        digest.update(f"{node.domain}:{node.op_type}:{node.name};".encode())
    return {
        "name": model.graph.name,
        "path": path,
        "graph_hash": digest.hexdigest()[:16],
        "opsets": dict(model.opset_imports),
        "nodes": stats.nodes,
        "parameters": stats.parameters,
        "initializer_bytes": stats.initializer_bytes,
    }
