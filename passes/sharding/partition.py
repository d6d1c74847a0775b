"""Partition a planned model into one ONNX graph per rank, with explicit collectives.

Guarantees, for every rank of the plan's mesh:

- each weight is the rank's own slice of the original (split ones shrink by the mesh
  axis size; replicated ones are copied whole);
- where the plan converts a layout, the graph holds the step as a node: collectives in
  the ``gcomp.distributed`` domain (``AllReduce{mesh_axes}``, ``AllGather{axis,
  mesh_axis, blocks}``) and, for a replicated value that must be split, a standard
  ``Slice`` of the rank's part (no communication);
- a row-parallel ``Gemm``'s bias is taken out of the Gemm and added after its
  all-reduce; a vocabulary-parallel ``Gather`` looks up only the rank's rows (other ids
  give zeros) and its all-reduce completes the lookup; ``Reshape`` / ``Expand`` targets,
  ``Split`` sizes and attention ops' head counts are rewritten to the rank's local sizes
  (heads / tp for attention);
- graph inputs and outputs keep their names; inputs arrive as the rank's slice (batch /
  dp), outputs leave whole (all-gathered).

Refuses (ShardingError): a split tensor without a static shape (run it on concrete
input shapes: :func:`gcomp.distributed.prepare` specializes first), nodes with subgraphs.
"""

from __future__ import annotations

__all__ = ["DOMAIN", "combine_parts", "local_slice", "partition", "partition_rank"]

import numpy as np
import onnx_ir as ir
from gcomp.passes.sharding.attention_ops import ATTENTION_OPS, local_attributes
from gcomp.passes.sharding.mesh import Layout, ShardingError
from gcomp.passes.sharding.propagate import Plan, collective_steps, is_const, shape_of

DOMAIN = "gcomp.distributed"


def local_slice(array: np.ndarray, lay: Layout, coords: dict[str, int], sizes: dict[str, int]) -> np.ndarray:
    """The part of ``array`` that the rank at ``coords`` holds under ``lay`` (a copy)."""
    out = np.asarray(array)
    for axis, d in enumerate(lay.dims):
        if d is None:
            continue
        n, i = sizes[d.mesh] // d.repeat, coords[d.mesh] // d.repeat
        shape = out.shape
        blocked = out.reshape(shape[:axis] + (d.blocks, shape[axis] // d.blocks) + shape[axis + 1:])
        chunk = shape[axis] // d.blocks // n
        part = np.take(blocked, range(i * chunk, (i + 1) * chunk), axis=axis + 1)
        out = part.reshape(shape[:axis] + (d.blocks * chunk,) + shape[axis + 1:])
    return np.ascontiguousarray(out)


def combine_parts(parts: list[np.ndarray], axis: int, blocks: int = 1) -> np.ndarray:
    """Inverse of :func:`local_slice` along one axis: the ranks' parts, in group order."""
    if blocks == 1:
        return np.concatenate(parts, axis=axis)
    pieces = [np.split(p, blocks, axis=axis) for p in parts]
    return np.concatenate([pieces[r][b] for b in range(blocks) for r in range(len(parts))], axis=axis)


def _static(v: ir.Value, why: str) -> tuple[int, ...]:
    s = shape_of(v)
    if s is None or any(not isinstance(d, int) for d in s):
        raise ShardingError(
            f"tensor '{v.name}': {why} needs a static shape (got {list(s) if s else 'unknown'}); "
            "give concrete input shapes"
        )
    return tuple(s)


def partition(model: ir.Model, plan: Plan) -> list[ir.Model]:
    return [partition_rank(model, plan, r) for r in range(plan.mesh.size)]


class _Builder:
    def __init__(self, model: ir.Model, plan: Plan, rank: int):
        self.model, self.plan, self.rank = model, plan, rank
        self.mesh = plan.mesh
        self.coords = self.mesh.coords(rank)
        self.sizes = dict(self.mesh.axes)
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []
        self.vmap: dict[ir.Value, ir.Value] = {}
        self.const_cache: dict[tuple[ir.Value, Layout], ir.Value] = {}
        self.conv_cache: dict[tuple[ir.Value, Layout], ir.Value] = {}
        self.names: set[str] = set()
        self.counter = 0

    def fresh(self, base: str) -> str:
        name = base
        while name in self.names:
            self.counter += 1
            name = f"{base}_{self.counter}"
        self.names.add(name)
        return name

    def const(self, v: ir.Value, lay: Layout | None) -> ir.Value:
        lay = Layout(lay.dims) if lay is not None else None
        if lay is None or lay.is_replicated:
            key = (v, None)
        else:
            key = (v, lay)
        if key in self.const_cache:
            return self.const_cache[key]
        if key[1] is None:
            tensor = v.const_value
        else:
            arr = local_slice(v.const_value.numpy(), lay, self.coords, self.sizes)
            tensor = ir.Tensor(arr, name=v.name)
        name = self.fresh(v.name)
        new = ir.Value(name=name, type=v.type, shape=ir.Shape(tensor.shape), const_value=tensor)
        self.initializers.append(new)
        self.const_cache[key] = new
        return new

    def new_const(self, base: str, array: np.ndarray) -> ir.Value:
        name = self.fresh(base)
        t = ir.Tensor(np.asarray(array), name=name)
        v = ir.Value(name=name, type=ir.TensorType(t.dtype), shape=ir.Shape(t.shape), const_value=t)
        self.initializers.append(v)
        return v

    def emit(self, domain, op, inputs, attrs, name, outputs_like: list[tuple[ir.Value, tuple | None]]):
        node = ir.Node(domain, op, inputs, attributes=attrs, num_outputs=len(outputs_like), name=name)
        for out, (like, shape) in zip(node.outputs, outputs_like):
            out.name = self.fresh(like.name if isinstance(like, ir.Value) else like)
            if isinstance(like, ir.Value):
                out.type = like.type
            if shape is not None:
                out.shape = ir.Shape(shape)
        self.nodes.append(node)
        return node

    def convert(self, v: ir.Value, dst: Layout) -> ir.Value:
        src = self.plan.layout(v)
        x = self.vmap[v]
        if src == dst:
            return x
        key = (v, dst)
        if key in self.conv_cache:
            return self.conv_cache[key]
        shape = _static(v, "a reshard")
        cur = src
        for step, info in collective_steps(src, dst):
            local = list(cur.local_shape(shape, self.mesh))
            if step == "AllReduce":
                cur = Layout(cur.dims, cur.partial - set(info["mesh_axes"]))
                node = self.emit(DOMAIN, "AllReduce", [x], [ir.AttrStrings("mesh_axes", info["mesh_axes"])],
                                 self.fresh(f"{v.name}/AllReduce"), [(f"{v.name}/reduced", tuple(local))])
            elif step == "AllGather":
                a = info["axis"]
                dims = list(cur.dims)
                dims[a] = None
                cur = Layout(tuple(dims), cur.partial)
                attrs = [ir.AttrInt64("axis", a), ir.AttrString("mesh_axis", info["mesh_axis"]),
                         ir.AttrInt64("blocks", info["blocks"])]
                if info.get("repeat", 1) > 1:
                    attrs.append(ir.AttrInt64("repeat", info["repeat"]))
                node = self.emit(
                    DOMAIN, "AllGather", [x], attrs,
                    self.fresh(f"{v.name}/AllGather"), [(f"{v.name}/gathered", tuple(cur.local_shape(shape, self.mesh)))])
            else:  # local slice of a replicated axis: no communication
                a = info["axis"]
                if info["blocks"] != 1:
                    raise ShardingError(f"tensor '{v.name}': cannot slice a blocked axis of an activation")
                start, chunk = self._slice_bounds(shape[a], info["src"], info["dst"])
                dims = list(cur.dims)
                dims[a] = dst.dims[a]
                cur = Layout(tuple(dims), cur.partial)
                ins = [x, self.new_const(f"{v.name}/start", np.array([start], np.int64)),
                       self.new_const(f"{v.name}/end", np.array([start + chunk], np.int64)),
                       self.new_const(f"{v.name}/axis", np.array([a], np.int64))]
                node = self.emit("", "Slice", ins, [], self.fresh(f"{v.name}/LocalSlice"),
                                 [(f"{v.name}/local", tuple(cur.local_shape(shape, self.mesh)))])
            node.outputs[0].type = v.type
            x = node.outputs[0]
        self.conv_cache[key] = x
        return x

    def _slice_bounds(self, size: int, src, dst) -> tuple[int, int]:
        """(start, length) inside this rank's ``src`` part (None: the whole axis) of its ``dst`` part."""
        chunk = size // dst.parts(self.mesh)
        first = src.index(self.coords) * (dst.parts(self.mesh) // src.parts(self.mesh)) if src is not None else 0
        return (dst.index(self.coords) - first) * chunk, chunk

    def local_shape(self, v: ir.Value) -> tuple[int, ...] | None:
        s = shape_of(v)
        if s is None or any(not isinstance(d, int) for d in s):
            return None
        return self.plan.layout(v).local_shape(tuple(s), self.mesh)

    def node(self, node: ir.Node) -> None:
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            raise ShardingError(f"node '{node.name}' ({node.op_type}) has subgraphs: not partitioned yet")
        inputs = []
        for i, v in enumerate(node.inputs):
            req = self.plan.required.get((node, i))
            if v is None:
                inputs.append(None)
            elif is_const(v):
                inputs.append(self.const(v, req))
            else:
                inputs.append(self.convert(v, req) if req is not None else self.vmap[v])
        attrs = list(node.attributes.values())
        op = node.op_type
        outs = node.outputs
        sharded_out = any(not self.plan.layout(o).is_replicated for o in outs) or any(
            not self.plan.layout(v).is_replicated for v in node.inputs if v is not None and not is_const(v)
        )
        if sharded_out and node.domain in ("", "ai.onnx"):
            if op in ("Reshape", "Expand") and len(inputs) > 1:
                local = self.local_shape(outs[0])
                if local is None:
                    _static(outs[0], f"{op} '{node.name}' on a split tensor")
                if op == "Reshape" or any(d is not None for d in self.plan.layout(outs[0]).dims):
                    inputs[1] = self.new_const(f"{node.name}/local_shape", np.array(local, np.int64))
            elif op == "Split":
                axis = node.attributes["axis"].value if "axis" in node.attributes else 0
                locals_ = [self.local_shape(o) for o in outs]
                if any(s is None for s in locals_):
                    _static(outs[0], f"Split '{node.name}'")
                sizes = np.array([s[axis] for s in locals_], np.int64)
                if len(inputs) > 1 and inputs[1] is not None:
                    inputs[1] = self.new_const(f"{node.name}/local_split", sizes)
                elif "split" in node.attributes:
                    attrs = [a for a in attrs if a.name != "split"] + [ir.AttrInt64s("split", sizes.tolist())]
        if sharded_out and (node.domain, op) in ATTENTION_OPS:
            attrs = local_attributes(node, attrs, self.plan)  # this rank's head counts
        if node in self.plan.split_bias:
            self._gemm_split_bias(node, inputs, attrs)
            return
        if node in self.plan.vocab_parallel:
            self._vocab_gather(node, inputs)
            return
        new = ir.Node(node.domain, op, inputs, attributes=attrs, num_outputs=len(outs), name=node.name,
                      version=node.version, overload=node.overload)
        self.names.add(node.name or "")
        for o, n in zip(outs, new.outputs):
            n.name = o.name
            self.names.add(o.name)
            n.type = o.type
            local = self.local_shape(o)
            n.shape = ir.Shape(local) if local is not None else o.shape
            self.vmap[o] = n
        self.nodes.append(new)

    def _gemm_split_bias(self, node, inputs, attrs):
        """Gemm(A, B, C) with a contraction split: Gemm(A, B) -> AllReduce -> Add(beta * C)."""
        out = node.outputs[0]
        beta = node.attributes["beta"].value if "beta" in node.attributes else 1.0
        c = inputs[2]
        if beta != 1.0:
            c = self.new_const(f"{c.name}/beta", c.const_value.numpy() * np.float32(beta))
        keep = [a for a in attrs if a.name != "beta"]
        local = self.local_shape(out)
        g = self.emit(node.domain, "Gemm", inputs[:2], keep, node.name, [(f"{out.name}/partial", local)])
        g.outputs[0].type = out.type
        r = self.emit(DOMAIN, "AllReduce", [g.outputs[0]], [ir.AttrStrings("mesh_axes", sorted(self._gemm_partial(node)))],
                      self.fresh(f"{out.name}/AllReduce"), [(f"{out.name}/reduced", local)])
        r.outputs[0].type = out.type
        a = ir.Node("", "Add", [r.outputs[0], c], num_outputs=1, name=self.fresh(f"{node.name}/bias"))
        a.outputs[0].name = out.name
        self.names.add(out.name)
        a.outputs[0].type = out.type
        if local is not None:
            a.outputs[0].shape = ir.Shape(local)
        self.nodes.append(a)
        self.vmap[out] = a.outputs[0]

    def _vocab_gather(self, node, inputs):
        """Gather(table rows [lo, hi) of this rank, ids): ids outside the rows give zeros,
        so the sum over the ranks (the all-reduce that follows) is the full lookup."""
        table, ids = inputs
        out = node.outputs[0]
        shard = self.plan.required[(node, 0)].dims[0]
        rows = table.const_value.shape[0]
        lo = self.coords[shard.mesh] * rows
        dtype = ids.type.dtype.numpy() if ids.type is not None else np.int64
        local = self.local_shape(out)
        base = out.name

        def op(kind, ins, name, like=None, attrs=()):
            n = ir.Node("", kind, ins, attributes=list(attrs), num_outputs=1, name=self.fresh(f"{node.name}/{name}"))
            n.outputs[0].name = self.fresh(f"{base}/{name}")
            if like is not None:
                n.outputs[0].type = like.type
            self.nodes.append(n)
            return n.outputs[0]

        shifted = op("Sub", [ids, self.new_const(f"{base}/lo", np.array(lo, dtype))], "shifted", ids)
        ge = op("GreaterOrEqual", [shifted, self.new_const(f"{base}/zero", np.array(0, dtype))], "ge")
        lt = op("Less", [shifted, self.new_const(f"{base}/rows", np.array(rows, dtype))], "lt")
        mine = op("And", [ge, lt], "mine")
        safe = op("Where", [mine, shifted, self.new_const(f"{base}/zero_id", np.array(0, dtype))], "safe", ids)
        looked = op("Gather", [table, safe], "lookup", out, [ir.AttrInt64("axis", 0)])
        mask = op("Unsqueeze", [mine, self.new_const(f"{base}/last", np.array([-1], np.int64))], "mask")
        zero = self.new_const(f"{base}/zero_row", np.zeros((), out.type.dtype.numpy() if out.type else np.float32))
        res = op("Where", [mask, looked, zero], "masked", out)
        res.name = out.name
        self.names.add(out.name)
        if local is not None:
            res.shape = ir.Shape(local)
        self.vmap[out] = res

    def _gemm_partial(self, node) -> set[str]:
        ta = "transA" in node.attributes and node.attributes["transA"].value
        req = self.plan.required[(node, 0)]
        k = req.dims[0] if ta else req.dims[1]
        return {k.mesh} if k is not None else set()

    def build(self) -> ir.Model:
        g = self.model.graph
        inputs = []
        for v in g.inputs:
            if v.const_value is not None and v.name in g.initializers:
                continue
            lay = self.plan.layout(v)
            shape = v.shape
            if not lay.is_replicated:
                shape = ir.Shape(lay.local_shape(_static(v, "a split input"), self.mesh))
            new = ir.Value(name=v.name, type=v.type, shape=shape)
            self.names.add(v.name)
            inputs.append(new)
            self.vmap[v] = new
        for node in g:
            self.node(node)
        outputs = []
        for k, v in enumerate(g.outputs):
            x = self.vmap[v] if not is_const(v) else self.const(v, None)
            y = self.convert(v, self.plan.output_required[k]) if not is_const(v) else x
            if y is not x:
                x.name = self.fresh(f"{v.name}/local")
                y.name = v.name
            outputs.append(y)
        opsets = dict(self.model.opset_imports)
        opsets[DOMAIN] = 1
        graph = ir.Graph(inputs, outputs, nodes=self.nodes, initializers=self.initializers,
                         opset_imports=opsets, name=f"{g.name or 'main'}_rank{self.rank}")
        model = ir.Model(graph, ir_version=self.model.ir_version, producer_name="gcomp")
        model.metadata_props["gcomp.mesh"] = str(self.mesh)
        model.metadata_props["gcomp.rank"] = str(self.rank)
        return model


def partition_rank(model: ir.Model, plan: Plan, rank: int) -> ir.Model:
    """The graph rank ``rank`` runs (see the module docstring for what it guarantees)."""
    if not 0 <= rank < plan.mesh.size:
        raise ShardingError(f"rank {rank} outside mesh {plan.mesh} of {plan.mesh.size} ranks")
    return _Builder(model, plan, rank).build()
