"""IR v11 sharding annotations: emit, read back, check; and the plan's human summary.

What is written (standard ONNX, onnx >= 1.18, IR version 11):

- ``ModelProto.configuration``: one ``DeviceConfigurationProto`` named ``gcomp:<mesh>``
  (e.g. ``gcomp:dp=2,tp=2``) with ``num_devices`` = ranks and devices ``rank0..``;
- ``NodeProto.device_configurations``: per node, the ``ShardingSpecProto`` of each input
  the node uses split and each split output. An axis split over mesh axis ``m`` has one
  ``SimpleShardedDimProto(dim, num_shards=|m|)`` per block (a fused QKV weight: three);
  ``device`` lists the shards in order; a shard held by several ranks (replicated along
  the other mesh axes) names a group key (``-1, -2, ...``) that
  ``index_to_device_group_map`` expands. Unlisted tensors are replicated.
- gcomp's own keys in ``metadata_props``: ``gcomp.sharding.inputs`` (the graph inputs'
  layouts, JSON), ``gcomp.sharding.seeds`` (the plan's seeds: what ``gcomp run`` re-plans
  from after specializing to the input shapes) and, per node, ``gcomp.sharding.partial``
  (outputs that are partial sums, which ONNX's specs cannot express). Without them, seeds
  are read from the standard specs of constant inputs.

:func:`check_annotations` validates what the onnx checker does not: configuration ids,
axes in range, shard counts that divide static sizes, device lists of the right length,
device indices and group keys in range, one spec per tensor per node. Errors name the
tensor and the node.
"""

from __future__ import annotations

__all__ = ["annotate", "check_annotations", "clear_annotations", "read_annotations", "summarize"]

import itertools
import json
import math

import onnx_ir as ir
from gcomp.passes.sharding.mesh import Layout, Mesh, Shard, ShardingError, parse_mesh
from gcomp.passes.sharding.propagate import (
    Plan,
    collective_steps,
    conversions,
    element_bytes,
    is_const,
    shape_of,
)

CONFIG_PREFIX = "gcomp:"
INPUTS_KEY = "gcomp.sharding.inputs"
SEEDS_KEY = "gcomp.sharding.seeds"
PARTIAL_KEY = "gcomp.sharding.partial"


def _layout_json(lay: Layout) -> list:
    return [([d.mesh, d.blocks] + ([d.repeat] if d.repeat > 1 else [])) if d else None for d in lay.dims]


def _layout_from_json(data: list) -> Layout:
    return Layout(tuple(Shard(d[0], int(d[1]), int(d[2]) if len(d) > 2 else 1) if d else None for d in data))


def clear_annotations(model: ir.Model) -> None:
    for node in model.graph:
        node.device_configurations = tuple(
            dc for dc in node.device_configurations
            if dc.configuration is None or not dc.configuration.name.startswith(CONFIG_PREFIX))
        node.metadata_props.pop(PARTIAL_KEY, None)
    for cfg in list(model.device_configurations):
        if cfg.name.startswith(CONFIG_PREFIX):
            model.remove_device_configuration(cfg)
    model.metadata_props.pop(INPUTS_KEY, None)
    model.metadata_props.pop(SEEDS_KEY, None)


def _spec(v: ir.Value, lay: Layout, mesh: Mesh) -> ir.ShardingSpec:
    s = shape_of(v) or (None,) * len(lay.dims)
    sharded = [(a, d) for a, d in enumerate(lay.dims) if d is not None]
    dims = []
    for a, d in sharded:
        n = d.parts(mesh)
        size = s[a] // d.blocks if isinstance(s[a], int) else ir.SymbolicDim(s[a] if isinstance(s[a], str) else None)
        dims.append(ir.ShardedDim(axis=a, simple_shardings=tuple(ir.SimpleShardedDim(size, n) for _ in range(d.blocks))))
    devices, groups = [], []
    for idx in itertools.product(*[range(d.parts(mesh)) for _, d in sharded]):
        fixed = [(d, i) for (_, d), i in zip(sharded, idx)]
        ranks = [r for r in range(mesh.size) if all(d.index(mesh.coords(r)) == i for d, i in fixed)]
        if len(ranks) == 1:
            devices.append(ranks[0])
        else:
            key = -(len(groups) + 1)
            groups.append(ir.IndexToDeviceGroupMapEntry(key, tuple(ranks)))
            devices.append(key)
    return ir.ShardingSpec(value=v, device=tuple(devices), index_to_device_group_map=tuple(groups),
                           sharded_dims=tuple(dims))


def annotate(model: ir.Model, plan: Plan) -> int:
    """Write ``plan`` into ``model`` as IR v11 annotations; returns the number of specs."""
    clear_annotations(model)
    mesh = plan.mesh
    cfg = model.add_device_configuration(
        f"{CONFIG_PREFIX}{mesh}", num_devices=mesh.size, device_names=tuple(f"rank{r}" for r in range(mesh.size))
    )
    count = 0
    for node in model.graph:
        specs = []
        for i, v in enumerate(node.inputs):
            lay = plan.required.get((node, i))
            if v is not None and is_const(v) and v.name in plan.seeds and (lay is None or lay.is_replicated):
                lay = plan.seeds[v.name]  # a split weight, even where shapes hid the rest of the plan
            if v is None or lay is None or all(d is None for d in lay.dims):
                continue
            if any(sp.value is v for sp in specs):
                continue
            specs.append(_spec(v, lay, mesh))
        partial = []
        for o in node.outputs:
            lay = plan.layout(o)
            if lay.partial:
                partial.append(f"{o.name}:{','.join(sorted(lay.partial))}")
            if any(d is not None for d in lay.dims) and not any(sp.value is o for sp in specs):
                specs.append(_spec(o, lay, mesh))
        if node in plan.split_bias:
            partial.append("gemm-bias-after-all-reduce")
        if partial:
            node.metadata_props[PARTIAL_KEY] = ";".join(partial)
        if specs:
            node.device_configurations = (
                *node.device_configurations, ir.NodeDeviceConfiguration(configuration=cfg, sharding_specs=tuple(specs)))
            count += len(specs)
    inputs = {v.name: _layout_json(plan.layout(v)) for v in model.graph.inputs if v.const_value is None}
    model.metadata_props[INPUTS_KEY] = json.dumps(inputs, sort_keys=True)
    seeds = {name: _layout_json(lay) for name, lay in plan.seeds.items()}
    model.metadata_props[SEEDS_KEY] = json.dumps(seeds, sort_keys=True)
    model.ir_version = max(model.ir_version, 11)
    return count


def _config(model: ir.Model):
    for cfg in model.device_configurations:
        if cfg.name.startswith(CONFIG_PREFIX):
            return cfg
    return None


def _layout_of_spec(spec: ir.ShardingSpec, rank: int, mesh: Mesh, where: str) -> Layout:
    dims: list[Shard | None] = [None] * rank
    names = [n for n, _ in mesh.axes]
    for sd in spec.sharded_dims:
        axis = sd.axis + rank if sd.axis < 0 else sd.axis
        if not 0 <= axis < rank:
            raise ShardingError(f"{where}: sharded axis {sd.axis} out of range for rank {rank}")
        counts = {s.num_shards for s in sd.simple_shardings}
        if len(counts) != 1:
            raise ShardingError(f"{where}: axis {sd.axis} has blocks with different shard counts")
        n = counts.pop()
        free = [m for m in names if m not in {d.mesh for d in dims if d}]
        candidates = [m for m in free if mesh.axis_size(m) == n]
        if not candidates:  # fewer parts than ranks: each part held by a group (a repeated KV head)
            candidates = [m for m in free if n > 1 and mesh.axis_size(m) % n == 0][:1]
        if not candidates:
            raise ShardingError(f"{where}: axis {sd.axis} split {n} ways, which matches no free mesh axis of {mesh}")
        # With equal axis sizes (dp=2,tp=2) the device order tells them apart.
        mesh_axis = _axis_from_devices(spec, mesh, candidates, len(dims) and [d for d in dims if d])
        dims[axis] = Shard(mesh_axis, len(sd.simple_shardings), mesh.axis_size(mesh_axis) // n)
    return Layout(tuple(dims))


def _axis_from_devices(spec, mesh, candidates, _done) -> str:
    if len(candidates) == 1:
        return candidates[0]
    first = spec.device[0] if spec.device else 0
    groups = {e.key: e.value for e in spec.index_to_device_group_map}
    ranks = groups.get(first, (first,))
    second = spec.device[1] if len(spec.device) > 1 else None
    second_ranks = groups.get(second, (second,)) if second is not None else ()
    for m in candidates:
        if second_ranks and mesh.coords(second_ranks[0])[m] == 1 and mesh.coords(ranks[0])[m] == 0:
            others = [k for k in mesh.names() if k != m]
            if all(mesh.coords(second_ranks[0])[k] == mesh.coords(ranks[0])[k] for k in others):
                return m
    return candidates[-1]


def read_annotations(model: ir.Model) -> tuple[Mesh, dict[str, Layout]] | None:
    """(mesh, seeds) from gcomp's annotations, or None when the model has none; checks them."""
    cfg = _config(model)
    if cfg is None:
        return None
    check_annotations(model)
    mesh = parse_mesh(cfg.name[len(CONFIG_PREFIX):])
    seeds: dict[str, Layout] = {}
    for node in model.graph:
        for dc in node.device_configurations:
            for spec in dc.sharding_specs:
                v = spec.value
                if v is None or not is_const(v) or v.name in seeds:
                    continue
                s = shape_of(v)
                seeds[v.name] = _layout_of_spec(spec, len(s), mesh, f"tensor '{v.name}'")
    for key in (INPUTS_KEY, SEEDS_KEY):  # gcomp's own record wins over what the specs imply
        raw = model.metadata_props.get(key)
        if not raw:
            continue
        try:
            data = json.loads(raw)
            for name, lay in data.items():
                if any(d is not None for d in lay):
                    seeds[name] = _layout_from_json(lay)
        except (json.JSONDecodeError, AttributeError, TypeError, IndexError, ValueError):
            raise ShardingError(f"metadata {key} is not a valid gcomp layout record") from None
    return mesh, seeds


def check_annotations(model: ir.Model) -> None:
    """Raise ShardingError, naming the tensor and node, on the first inconsistent spec."""
    configs = {c.name: c for c in model.device_configurations}
    for node in model.graph:
        where_node = f"node '{node.name}' ({node.op_type})"
        for dc in node.device_configurations:
            cfg = dc.configuration
            if cfg is None or cfg.name not in configs:
                raise ShardingError(f"{where_node}: device configuration "
                                    f"'{getattr(cfg, 'name', None)}' is not declared by the model")
            n_dev = cfg.num_devices
            seen = set()
            for spec in dc.sharding_specs:
                v = spec.value
                if v is None:
                    raise ShardingError(f"{where_node}: a sharding spec names no tensor of the node")
                where = f"tensor '{v.name}' at {where_node}"
                if v.name in seen:
                    raise ShardingError(f"{where}: conflicting specs (listed twice)")
                seen.add(v.name)
                if v not in node.inputs and v not in node.outputs:
                    raise ShardingError(f"{where}: not an input or output of the node")
                s = shape_of(v)
                total = 1
                axes = set()
                for sd in spec.sharded_dims:
                    if s is not None and not -len(s) <= sd.axis < len(s):
                        raise ShardingError(f"{where}: sharded axis {sd.axis} out of range for rank {len(s)}")
                    axis = sd.axis + len(s) if s is not None and sd.axis < 0 else sd.axis
                    if axis in axes:
                        raise ShardingError(f"{where}: axis {sd.axis} sharded twice")
                    axes.add(axis)
                    if not sd.simple_shardings:
                        raise ShardingError(f"{where}: axis {sd.axis} has no shardings")
                    block_total = 0
                    for ss in sd.simple_shardings:
                        if ss.num_shards < 1:
                            raise ShardingError(f"{where}: num_shards {ss.num_shards} < 1 on axis {sd.axis}")
                        if isinstance(ss.dim, int):
                            if ss.dim % ss.num_shards:
                                raise ShardingError(
                                    f"{where}: axis {sd.axis} size {ss.dim} is not divisible by {ss.num_shards} shards")
                            block_total += ss.dim
                    known = s is not None and isinstance(s[axis], int) and block_total
                    if known and all(isinstance(ss.dim, int) for ss in sd.simple_shardings) and block_total != s[axis]:
                        raise ShardingError(
                            f"{where}: axis {sd.axis} declares size {block_total}, the tensor has {s[axis]}")
                    total *= sd.simple_shardings[0].num_shards
                if len(spec.device) != total:
                    raise ShardingError(f"{where}: {len(spec.device)} devices listed for {total} shards")
                groups = {e.key: e.value for e in spec.index_to_device_group_map}
                for d in spec.device:
                    if d < 0:
                        if d not in groups:
                            raise ShardingError(f"{where}: device group {d} is not in index_to_device_group_map")
                        bad = [x for x in groups[d] if not 0 <= x < n_dev]
                        if bad:
                            raise ShardingError(f"{where}: device {bad[0]} out of range (num_devices {n_dev})")
                    elif d >= n_dev:
                        raise ShardingError(f"{where}: device {d} out of range (num_devices {n_dev})")


def _bytes(v: ir.Value, lay: Layout, mesh: Mesh) -> int | None:
    s = shape_of(v)
    if s is None or any(not isinstance(d, int) for d in s):
        return None
    n = 1
    for d in lay.local_shape(tuple(s), mesh):
        n *= d
    return math.ceil(n * element_bytes(v))  # onnx-ir itemsize is 0.5 for 4-bit types


def _partial_origin(v: ir.Value, plan: Plan) -> str:
    """Why ``v`` is a partial sum: the row-parallel MatMul/Gemm or the vocabulary lookup."""
    for _ in range(64):
        p = v.producer()
        if p is None:
            break
        if p.op_type in ("MatMul", "Gemm"):
            return f"row-parallel {p.op_type}"
        if p in plan.vocab_parallel:
            return "vocab-parallel embedding"
        nxt = [x for x in p.inputs if x is not None and plan.layout(x).partial]
        if not nxt:
            break
        v = nxt[0]
    return "partial sum"


def summarize(model: ir.Model, plan: Plan) -> dict:
    """Per-rank parameter bytes and the collectives of one forward pass (JSON-able)."""
    mesh = plan.mesh
    g = model.graph
    used: dict[ir.Value, set[Layout]] = {}
    for node in g:
        for i, v in enumerate(node.inputs):
            if is_const(v) and v.name in g.initializers:
                lay = plan.required.get((node, i)) or plan.layout(v)
                used.setdefault(v, set()).add(Layout(lay.dims))
    full = sharded_full = replicated = per_rank = 0
    params = []
    for v, lays in used.items():
        nbytes = v.const_value.nbytes
        full += nbytes
        local = sum(_bytes(v, lay, mesh) or nbytes for lay in lays)
        if all(lay.is_replicated for lay in lays):
            replicated += nbytes
        else:
            sharded_full += nbytes
            params.append({"tensor": v.name, "role": plan.roles.get(v.name, "follows"), "bytes": nbytes,
                           "bytes_per_rank": local})
        per_rank += local
    order = {n: i for i, n in enumerate(g)}
    colls = []
    for c in conversions(model, plan):
        for step, info in collective_steps(c.src, c.dst):
            if step == "Slice":
                continue
            lay = c.src if step == "AllReduce" else c.dst
            if step == "AllReduce":
                reason = _partial_origin(c.value, plan)
            else:
                reason = f"{c.node.op_type} needs axis {info['axis']} whole" if c.node else "graph output"
            colls.append({"kind": step, "tensor": c.value.name, "mesh_axes": info.get("mesh_axes") or [info["mesh_axis"]],
                          "bytes": _bytes(c.value, lay, mesh), "reason": reason,
                          "at": order.get(c.value.producer(), -1) if c.value.producer() else -1})
    for node in plan.split_bias:
        o = node.outputs[0]
        colls.append({"kind": "AllReduce", "tensor": o.name, "mesh_axes": ["tp"], "bytes": _bytes(o, plan.layout(o), mesh),
                      "reason": f"row-parallel {node.op_type} (bias added after)", "at": order[node]})
    seen_keys = set()
    unique = []
    for c in sorted(colls, key=lambda c: c["at"]):
        key = (c["kind"], c["tensor"], tuple(c["mesh_axes"]))
        if key not in seen_keys:
            seen_keys.add(key)
            unique.append({k: v for k, v in c.items() if k != "at"})
    return {
        "mesh": str(mesh),
        "ranks": mesh.size,
        "parameter_bytes": full,
        "sharded_parameter_bytes": sharded_full,
        "replicated_parameter_bytes": replicated,
        "parameter_bytes_per_rank": per_rank,
        "sharded_parameters": params,
        "collectives": unique,
        "all_reduces": sum(1 for c in unique if c["kind"] == "AllReduce"),
        "row_parallel_all_reduces": sum(1 for c in unique if c["reason"].startswith("row-parallel")),
        "all_gathers": sum(1 for c in unique if c["kind"] == "AllGather"),
        "unplanned": list(plan.unplanned),
    }
