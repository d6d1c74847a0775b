"""gcomp's passes, one module per family; importing this package registers them.

- ``validate``: the ONNX checker as a pass (pipeline O0).
- ``cleanup``: housekeeping built on onnx-ir's common passes (unused nodes,
  functions, opsets; topological sort; name fixing).
- ``cse``: common-subexpression elimination that walks subgraphs and functions.
- ``identity``: Identity elimination that never renames or breaks a graph interface.
- ``dedup``: initializer dedup that reads only weights that could be duplicates.
- ``shapes``: ONNX shape inference on the weightless model (types and dims for folding).
- ``static``: every dim fixed at given input shapes (``static-shapes``, ``--static``).
- ``fold``: constant folding and shape folding with size limits.
- ``simplify``: no-op removal, merges, exact identities, constant-If inlining.
- ``fusion``: operator fusion rules (onnxscript rewriter), portable and per target.
- ``precision``: fp16/bf16 mixed precision (``convert-precision``) and its emulating evaluator.
- ``quant``: static int8 QDQ (``quantize-static``, calibrated), int8 dynamic
  (``quantize-dynamic``) and weight-only block-wise int4/int8 (``quantize-weights``).
- ``sharding``: IR v11 sharding plans (Megatron tp, dp), propagation, per-rank partitions.
- ``pipelines``: the named pipelines O0, O1, ... built from the passes above.
"""

from __future__ import annotations

from gcomp.passes import cleanup, cse, dedup, fold, fusion, identity, shapes, simplify, validate  # noqa: F401
from gcomp.passes import static  # noqa: F401  (registers static-shapes, for --static)
from gcomp.passes import precision  # noqa: F401
from gcomp.passes import quant  # noqa: F401  (registers quantize-static, quantize-dynamic, quantize-weights)
from gcomp.passes import sharding  # noqa: F401  (registers the shard pass)
from gcomp.passes import pipelines  # noqa: F401  (after the passes it names)

__all__ = ["cleanup", "cse", "dedup", "fold", "fusion", "identity", "shapes", "simplify", "static", "validate", "precision", "quant", "pipelines"]
