"""Attention written as one op: the layout rule, the head counts, and each rank's attributes.

Three ops compute multi-head attention whole:

- ONNX ``Attention`` (opset 23; torch.export writes it for scaled-dot-product attention at
  opset 23): Q, K, V as ``[batch, heads, seq, head_dim]`` or ``[batch, seq, heads * head_dim]``
  (then ``q_num_heads`` / ``kv_num_heads`` say the counts), an optional mask broadcast over
  ``[batch, heads, q_seq, kv_seq]``, optional past K/V ``[batch, kv_heads, past, head_dim]``;
  outputs Y (Q's layout), present K/V, the scores. Fewer KV heads than heads: GQA.
- ``com.microsoft.MultiHeadAttention``: Q, K, V ``[batch, seq, heads * head_dim]``, an optional
  packed Q/K/V bias ``[3 * hidden]``, ``attention_bias`` ``[batch|1, heads|1, q_seq, kv_seq]``,
  past K/V ``[batch, heads, past, head_dim]``; ``num_heads``.
- ``com.microsoft.Attention``: the input ``[batch, seq, hidden]`` and its own packed Q/K/V
  weight ``[hidden, 3 * hidden]`` and bias ``[3 * hidden]``; past ``[2, batch, heads, past,
  head_dim]``; ``num_heads``.

Heads are independent, so each rank runs the op on its heads: Q's head axis split over tp
(for the packed op: the weight's Q/K/V blocks, seeded by the plan), K/V by KV heads (each
KV head on its query group's ranks where tp exceeds them), a mask or bias with a heads axis
split alike, the batch axis following Q's; outputs split the same way. The ranks' graphs
carry the local head counts (:func:`local_attributes`). Anything else (Q without a split
head axis, heads that tp does not divide) runs replicated.
"""

from __future__ import annotations

__all__ = ["ATTENTION_OPS", "attention_rule", "head_counts", "local_attributes"]

import onnx_ir as ir
from gcomp.passes.sharding.mesh import Layout, Shard
from gcomp.passes.sharding.tensors import shape_of

MS = "com.microsoft"
ATTENTION_OPS = {("", "Attention"), ("ai.onnx", "Attention"), (MS, "MultiHeadAttention"), (MS, "Attention")}

# per op: input index -> role; roles: q, kv (head axis from rank), kv4 (axis 1), mask, wqkv, bqkv, past5
_INPUTS = {
    "Attention": {0: "q", 1: "kv", 2: "kv", 3: "mask", 4: "kv4", 5: "kv4"},
    "MultiHeadAttention": {0: "q", 1: "kv", 2: "kv", 3: "bqkv", 5: "mask", 6: "kv4", 7: "kv4"},
    "PackedAttention": {1: "wqkv", 2: "bqkv", 4: "past5", 5: "mask"},  # com.microsoft.Attention
}
_OUTPUTS = {
    "Attention": ["q", "kv4", "kv4", "q4"],
    "MultiHeadAttention": ["q", "kv4", "kv4", "q4"],
    "PackedAttention": ["q", "past5"],
}


def _kind(node: ir.Node) -> str:
    return "PackedAttention" if node.domain == MS and node.op_type == "Attention" else node.op_type


def _attr(node: ir.Node, name: str):
    a = node.attributes.get(name)
    return a.value if a is not None else None


def head_counts(node: ir.Node) -> tuple[int, int] | None:
    """(heads, KV heads) of an attention op, from its attributes or Q/K shapes."""
    kind = _kind(node)
    if kind != "Attention":
        n = _attr(node, "num_heads")
        return (n, n) if isinstance(n, int) and n > 0 else None
    q, k = shape_of(node.inputs[0]), shape_of(node.inputs[1])
    if q is not None and len(q) == 4 and k is not None and len(k) == 4:
        return (q[1], k[1]) if isinstance(q[1], int) and isinstance(k[1], int) else None
    h, kv = _attr(node, "q_num_heads"), _attr(node, "kv_num_heads")
    return (h, kv) if isinstance(h, int) and isinstance(kv, int) else None


def _head_axis(role: str, rank: int | None) -> int | None:
    if role in ("q", "kv"):
        return {4: 1, 3: 2}.get(rank)
    if role in ("kv4", "q4"):
        return 1 if rank == 4 else None
    if role == "mask":  # broadcast to [batch, heads, q_seq, kv_seq] from the right
        return rank - 3 if rank is not None and rank >= 3 else None
    return 2 if role == "past5" and rank == 5 else None


def _split(ctx, heads: int, kv: int) -> tuple[Shard, Shard] | None:
    """The Q and KV head shards, or None where the op must run whole."""
    node = ctx.node
    if _kind(node) == "PackedAttention":
        w = ctx.lay(1).dims
        q = Shard(w[1].mesh) if len(w) == 2 and w[1] is not None and w[1].blocks == 3 and w[1].repeat == 1 else None
    else:
        lay, rank = ctx.lay(0), len(shape_of(node.inputs[0]) or ())
        axis = _head_axis("q", rank)
        q = lay.dims[axis] if axis is not None and not lay.partial else None
    if q is None or q.repeat != 1 or q.blocks != 1 or heads % q.parts(ctx.mesh):
        return None
    parts = q.parts(ctx.mesh)
    if kv % parts == 0:
        return q, q
    if parts % kv == 0:
        return q, Shard(q.mesh, 1, ctx.mesh.axis_size(q.mesh) // kv)
    return None


def attention_rule(ctx):
    """Layouts for an attention op (see the module docstring)."""
    from gcomp.passes.sharding.rules import default_rule

    node = ctx.node
    counts = head_counts(node)
    found = _split(ctx, *counts) if counts else None
    if found is None:
        return default_rule(ctx)
    q, kv = found
    kind = _kind(node)
    q_shape = shape_of(node.inputs[0])
    batch = ctx.lay(0).dims[0] if q_shape and ctx.lay(0).dims and ctx.lay(0).dims[0] != q else None
    shards = {"q": q, "q4": q, "kv": kv, "kv4": kv, "past5": q, "mask": q}
    req = []
    for i, v in enumerate(node.inputs):
        role = _INPUTS[kind].get(i)
        s = shape_of(v)
        if v is None or s is None:
            req.append(Layout(()) if v is None else Layout.replicated(len(ctx.lay(i).dims)))
            continue
        dims: list[Shard | None] = [None] * len(s)
        if role == "wqkv":
            dims[1] = Shard(q.mesh, 3)
        elif role == "bqkv":
            dims[0] = Shard(q.mesh, 3)
        else:
            axis = _head_axis(role, len(s)) if role else None
            if role == "mask" and axis is not None and s[axis] != counts[0]:
                axis = None  # broadcast over the heads
            if axis is not None:
                dims[axis] = shards[role]
            batched = role not in ("past5", "mask") or len(s) == 4
            if batch is not None and batched and len(s) >= 2 and s[0] == q_shape[0] and s[0] != 1:
                dims[0] = batch
        req.append(Layout(tuple(dims)))
    outs = []
    for j, o in enumerate(node.outputs):
        s = shape_of(o)
        role = _OUTPUTS[kind][j] if j < len(_OUTPUTS[kind]) else None
        dims = [None] * len(s or ())
        axis = _head_axis(role, len(dims)) if role else None
        if axis is not None:
            dims[axis] = shards[role]
        if batch is not None and len(dims) >= 2 and role != "past5":
            dims[0] = batch
        outs.append(Layout(tuple(dims)))
    return req, outs


def local_attributes(node: ir.Node, attrs: list, plan) -> list:
    """``attrs`` of an attention op with the head counts of one rank of ``plan``."""
    mesh = plan.mesh
    kind = _kind(node)
    lay = plan.required.get((node, 1 if kind == "PackedAttention" else 0))
    if lay is None:
        return attrs
    axis = 1 if kind == "PackedAttention" else _head_axis("q", len(lay.dims))
    q = lay.dims[axis] if axis is not None and axis < len(lay.dims) else None
    if q is None:
        return attrs
    parts = q.parts(mesh)
    k_lay = plan.required.get((node, 1)) if kind == "Attention" else None
    k_axis = _head_axis("kv", len(k_lay.dims)) if k_lay is not None else None
    k = k_lay.dims[k_axis] if k_axis is not None else None
    out = []
    for a in attrs:
        if a.name in ("num_heads", "q_num_heads"):
            a = ir.AttrInt64(a.name, a.value // parts)
        elif a.name == "kv_num_heads" and k is not None:
            a = ir.AttrInt64(a.name, a.value // k.parts(mesh))
        elif a.name == "qkv_hidden_sizes":
            a = ir.AttrInt64s(a.name, [x // parts for x in a.value])
        out.append(a)
    return out
