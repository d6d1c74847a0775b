"""Sharding annotation, propagation, checking and partitioning (IR v11 sharding specs).

Flow: :func:`plan` seeds a mesh (``tp=N``, ``dp=N``, ``dp=A,tp=B``) with Megatron's
plan (:mod:`.megatron`), propagates layouts through every node to a checked fixed point
(:mod:`.propagate`); :func:`annotate` writes them as standard IR v11 annotations that
:func:`read_annotations` reads back and :func:`check_annotations` validates;
:func:`summarize` gives per-rank parameter bytes and collectives; :func:`partition`
builds one ONNX graph per rank with explicit collectives (:mod:`.partition`).
Execution lives in :mod:`gcomp.distributed`.

Modules: ``mesh`` (meshes, layouts), ``canonical`` (exact rewrites before planning),
``heads`` (attention blocks), ``megatron`` (seeds), ``propagate`` (the driver) and ``rules``
(per-op layout rules), ``blocks`` (blocks whose split breaks are left replicated, with
why), ``annotate`` (IR v11 in and out, checker, summary), ``partition`` (per-rank graphs),
``tensors`` (shape helpers).
"""

from __future__ import annotations

__all__ = [
    "Layout",
    "Mesh",
    "Shard",
    "ShardPass",
    "ShardingError",
    "annotate",
    "annotate_seeds",
    "check_annotations",
    "parse_mesh",
    "partition",
    "partition_rank",
    "plan",
    "read_annotations",
    "summarize",
]

from typing import Annotated

import onnx_ir as ir
from gcomp.passes.sharding.annotate import annotate, check_annotations, read_annotations, summarize
from gcomp.passes.sharding.mesh import Layout, Mesh, Shard, ShardingError, parse_mesh
from gcomp.passes.sharding.partition import partition, partition_rank

from gcomp.registry import PassContext, register_pass


def plan(model: ir.Model, mesh: str | Mesh, *, overrides: dict[str, str] | None = None):
    """The propagated plan of ``model`` on ``mesh``; ``overrides``: ``{tensor: "AXIS:MESH,..."}``
    or ``"replicated"``, replacing the Megatron/dp seeds by tensor name.

    ``model`` is first canonicalized in place (:mod:`.canonical`: exact rewrites only);
    blocks whose split would not survive propagation are left replicated and listed, with
    the reason, in the plan's ``unplanned`` (:mod:`.blocks`)."""
    from gcomp.passes.sharding.blocks import settle
    from gcomp.passes.sharding.canonical import canonicalize
    from gcomp.passes.sharding.megatron import parse_override, seed_plan
    from gcomp.passes.sharding.propagate import shape_of

    mesh = mesh if isinstance(mesh, Mesh) else parse_mesh(mesh)
    values = {v.name: v for v in model.graph.inputs}
    values.update(model.graph.initializers)
    parsed = {}
    for name, spec in (overrides or {}).items():
        if name not in values:
            raise ShardingError(f"tensor '{name}': override names no graph input or initializer")
        s = shape_of(values[name])
        _, lay = parse_override(f"{name}={spec}", len(s) if s is not None else None)
        parsed[name] = lay
    canonicalize(model)
    return settle(model, mesh, seed_plan(model, mesh, parsed))


def annotate_seeds(model: ir.Model, found) -> bool:
    """Annotate ``model`` as it is (symbolic shapes allowed) with the seeds of ``found``, a
    plan made on a specialized copy of it; False (nothing written) when a split seed names
    no tensor of ``model`` (specialization folded it into a new one)."""
    from gcomp.passes.sharding.propagate import propagate

    names = {v.name for v in model.graph.inputs} | set(model.graph.initializers)
    split = {k: v for k, v in found.seeds.items() if not v.is_replicated}
    if any(k not in names for k in split):
        return False
    annotate(model, propagate(model, found.mesh, split, found.roles))
    return True


@register_pass("shard")
class ShardPass(ir.passes.InPlacePass):
    """Annotate the model with IR v11 sharding specs for a mesh (Megatron tp, batch dp).

    Main graph only. The plan's seeds are always recorded; the standard per-node specs are
    complete where shapes are static (``gcomp shard --input-shape`` specializes first)."""

    def __init__(
        self, *, shard: Annotated[str, "mesh: tp=N, dp=N or dp=A,tp=B"] = "tp=2", context: PassContext | None = None
    ) -> None:
        super().__init__()
        self.mesh = parse_mesh(shard)
        self.context = context or PassContext()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # Structure is found on a folded copy with gcomp's default input shapes (exporters'
        # Shape chains hide it otherwise); the seeds then annotate this model as it is.
        if self.context.specialize is None:
            raise ShardingError("the shard pass folds a copy of the model for the mesh: run it through "
                                "gcomp.optimize or give it context=gcomp.runtime.pass_context()")
        copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
        folded = self.context.specialize(copy, self.mesh)
        found = plan(folded, self.mesh)
        if not annotate_seeds(model, found):
            missing = sorted(k for k, v in found.seeds.items() if not v.is_replicated
                             and k not in model.graph.initializers and k not in {i.name for i in model.graph.inputs})
            raise ShardingError(f"tensor '{missing[0]}': planned on the folded model, absent from this one "
                                "(run the shard pass after constant folding, e.g. O1,shard)")
        return ir.passes.PassResult(model, modified=True)
