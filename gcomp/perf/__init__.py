"""Profile data and its analysis: what a run measured, and what gcomp computes about it.

- :mod:`~gcomp.perf.profile`: the profile data model (:class:`Profile`, :class:`OpRow`,
  :class:`LatencyStats`) and the environment and model identity a figure is tied to.
- :mod:`~gcomp.perf.flops`: FLOPs and bytes per node, from tensor shapes.
- :mod:`~gcomp.perf.roofline`: this machine's peaks and where an op sits under them.
- :mod:`~gcomp.perf.stats`: counts of what a model holds (nodes, parameters, bytes).

Layer 4 of gcomp (docs/architecture.md, "Layers"): these modules import each other,
numpy, onnx and onnx-ir, and gcomp's base layer (:mod:`gcomp.registry`, :mod:`gcomp.io`,
:mod:`gcomp.errors`) only; never passes, backends or the core. onnxruntime's symbolic
shape inference is the one runtime tool used, lazily and best effort (see
:func:`~gcomp.perf.flops.graph_costs`).
"""

from __future__ import annotations

__all__ = [
    "DTYPE_BYTES",
    "SCHEMA_VERSION",
    "Cost",
    "LatencyStats",
    "Machine",
    "ModelStats",
    "OpRow",
    "Profile",
    "TensorInfo",
    "classify",
    "cpu_features",
    "cpu_model",
    "environment",
    "fused_cost",
    "gpu_memory_of_process",
    "graph_costs",
    "machine",
    "model_identity",
    "model_stats",
    "op_cost",
]

from gcomp.perf.flops import DTYPE_BYTES, Cost, TensorInfo, fused_cost, graph_costs, op_cost
from gcomp.perf.profile import (
    SCHEMA_VERSION,
    LatencyStats,
    OpRow,
    Profile,
    environment,
    gpu_memory_of_process,
    model_identity,
)
from gcomp.perf.roofline import Machine, classify, cpu_features, cpu_model, machine
from gcomp.perf.stats import ModelStats, model_stats
