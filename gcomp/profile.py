"""The profile data model: one run of a model on a backend, as numbers tied to graph nodes.

Every backend's ``Executable.profile`` returns a :class:`Profile`; every renderer
(JSON, Markdown; later HTML and traces) reads one. The JSON form is documented by
``gcomp/schemas/report.schema.json`` and carries ``schema_version``.
"""

from __future__ import annotations

__all__ = [
    "SCHEMA_VERSION",
    "LatencyStats",
    "OpRow",
    "Profile",
    "environment",
    "model_identity",
]

import hashlib
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = "1.0"


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
    """Time spent in one graph node per model run (averaged over profiled runs)."""

    node: str
    op_type: str
    time_ms: float
    calls: int = 1
    share: float = 0.0
    provider: str | None = None


@dataclass
class Profile:
    model: dict[str, Any]
    environment: dict[str, Any]
    backend: dict[str, Any]
    latency: LatencyStats
    ops: list[OpRow] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)
    schema_version: str = SCHEMA_VERSION

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
            "ops": [asdict(o) for o in self.ops],
        }

    def top_op_types(self) -> list[tuple[str, float, int]]:
        """(op_type, total ms, node count), slowest first."""
        agg: dict[str, list[float]] = {}
        for op in self.ops:
            entry = agg.setdefault(op.op_type, [0.0, 0])
            entry[0] += op.time_ms
            entry[1] += 1
        return sorted(((k, v[0], int(v[1])) for k, v in agg.items()), key=lambda t: -t[1])


def environment() -> dict[str, Any]:
    """What machine and which libraries produced a figure (no heavy imports)."""
    from importlib import metadata

    versions = {}
    for dist in ("gcomp", "onnx", "onnx-ir", "onnxscript", "onnxruntime-gpu", "onnxruntime", "numpy", "apache-tvm"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "versions": versions,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def model_identity(model, path: str | None = None) -> dict[str, Any]:
    """Name, opsets, node and parameter counts, and a hash of the graph (not the weights)."""
    from gcomp.stats import model_stats

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
