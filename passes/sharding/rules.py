"""The per-op layout rules propagation applies (see :mod:`.propagate` for the contract).

A rule gets a :class:`Ctx` (the node, the layouts arriving so far, shapes) and returns
(the layout it requires of each input, the layout of each output). Rules: elementwise with
broadcasting (partial sums pass linear ops: Add of partials, Mul/Div by a replicated factor,
Neg, Cast, Identity), MatMul / Gemm (batch, row, column and contraction splits; a
contraction split gives a partial sum; Gemm's bias moves after the reduce), Reshape /
Flatten / Squeeze / Unsqueeze by tracking which output axis a split input axis becomes
(needs its shapes), Transpose, Softmax / LogSoftmax / LayerNormalization /
RMSNormalization / Reduce* on unsplit axes, Concat, Split (a fused QKV split whose blocks
match the outputs), Slice on unsplit axes (rotary embeddings' halves), Gather, Expand,
Where, and attention written as one op (ONNX ``Attention``, ``com.microsoft``
``MultiHeadAttention`` / ``Attention``: heads split, :mod:`.attention_ops`). Any other op
sees every input replicated; so does a node with subgraphs.
"""

from __future__ import annotations

__all__ = ["RULES", "Ctx", "default_rule", "rule_for"]

import onnx_ir as ir
from gcomp.passes.sharding.mesh import Layout, Shard
from gcomp.passes.sharding.tensors import Dim, is_const, shape_of


# --------------------------------------------------------------------------- helpers
def _prod(dims) -> tuple[int, tuple[str, ...]] | None:
    k, syms = 1, []
    for d in dims:
        if d is None:
            return None
        if isinstance(d, int):
            k *= d
        else:
            syms.append(d)
    return k, tuple(sorted(syms))


def _divisible(size: Dim, n: int) -> bool:
    return isinstance(size, int) and size % n == 0 and size > 0


class Ctx:
    """One node under propagation: its inputs' current layouts, shapes and constants."""

    def __init__(self, node: ir.Node, plan):
        self.node = node
        self.plan = plan
        self.mesh = plan.mesh

    def inp(self, i):
        ins = self.node.inputs
        return ins[i] if i < len(ins) else None

    def lay(self, i) -> Layout:
        v = self.inp(i)
        return self.plan.layout(v) if v is not None else Layout(())

    def shape(self, i):
        return shape_of(self.inp(i))

    def out_shape(self, j=0):
        return shape_of(self.node.outputs[j]) if j < len(self.node.outputs) else None

    def const(self, i) -> bool:
        return is_const(self.inp(i))

    def ints(self, i):
        v = self.inp(i)
        if v is None or v.const_value is None:
            return None
        return [int(x) for x in v.const_value.numpy().reshape(-1).tolist()]

    def attr(self, name, default=None):
        a = self.node.attributes.get(name)
        return a.value if a is not None else default

    def fits(self, size: Dim, shard: Shard) -> bool:
        return _divisible(size, shard.parts(self.mesh) * shard.blocks)


def default_rule(ctx: Ctx):
    req = [Layout.replicated(len(ctx.lay(i).dims)) for i in range(len(ctx.node.inputs))]
    outs = []
    for o in ctx.node.outputs:
        s = shape_of(o)
        outs.append(Layout.replicated(len(s) if s is not None else 0))
    return req, outs


def _rank(ctx, i) -> int | None:
    s = ctx.shape(i)
    return len(s) if s is not None else None


# --------------------------------------------------------------------------- rules
_UNARY_LINEAR = {"Neg", "Identity", "Cast", "Dropout"}
_UNARY = _UNARY_LINEAR | {
    "Relu", "Gelu", "Erf", "Tanh", "Sigmoid", "Exp", "Log", "Sqrt", "Abs", "Not", "Reciprocal",
    "Softplus", "HardSigmoid", "LeakyRelu", "Elu", "Selu", "IsNaN", "IsInf", "Sign", "Floor",
    "Ceil", "Round", "Sin", "Cos", "HardSwish", "Mish", "Celu", "FastGelu", "QuickGelu", "BiasGelu",
    "Clip", "ThresholdedRelu",
}
_BINARY = {
    "Add", "Sub", "Mul", "Div", "Pow", "And", "Or", "Xor", "Equal", "Less", "Greater",
    "LessOrEqual", "GreaterOrEqual", "Max", "Min", "Mod", "Where", "PRelu", "Sum", "Mean", "BitShift",
}


def _elementwise(ctx: Ctx):
    node = ctx.node
    op = node.op_type
    tensor_inputs = list(range(len(node.inputs)))
    if op == "Clip":
        tensor_inputs = [0]
    out_s = ctx.out_shape()
    ranks = [_rank(ctx, i) for i in tensor_inputs if ctx.inp(i) is not None]
    if out_s is None or any(r is None for r in ranks):
        return default_rule(ctx)
    out_rank = len(out_s)
    chosen: list[Shard | None] = [None] * out_rank
    used: set[str] = set()

    def bcast(i, a):
        s = ctx.shape(i)
        off = out_rank - len(s)
        return s[a] == 1 and out_s[off + a] != 1

    for consts in (False, True):
        for i in tensor_inputs:
            if ctx.inp(i) is None or ctx.const(i) != consts:
                continue
            dims = ctx.lay(i).dims
            off = out_rank - len(dims)
            for a, d in enumerate(dims):
                k = off + a
                if d and chosen[k] is None and d.mesh not in used and not bcast(i, a) and ctx.fits(out_s[k], d):
                    chosen[k] = d
                    used.add(d.mesh)
    partials = {i: ctx.lay(i).partial for i in tensor_inputs if ctx.inp(i) is not None}
    out_partial: frozenset[str] = frozenset()
    keep: set[int] = set()
    with_partial = [i for i, p in partials.items() if p]
    if with_partial:
        if op in _UNARY_LINEAR and not (op == "Cast" and not _is_float_cast(ctx)):
            out_partial, keep = partials[0], {0}
        elif op in ("Add", "Sub", "Sum") and len(with_partial) == len(partials) and len(set(partials.values())) == 1:
            out_partial, keep = partials[with_partial[0]], set(with_partial)
        elif op in ("Mul", "Div") and len(with_partial) == 1 and (op == "Mul" or with_partial[0] == 0):
            i = with_partial[0]
            other = 1 - i
            if not ctx.lay(other).mesh_axes() & partials[i]:
                out_partial, keep = partials[i], {i}
    req = []
    for i in range(len(node.inputs)):
        v = ctx.inp(i)
        if v is None:
            req.append(Layout(()))
            continue
        if i not in tensor_inputs:
            req.append(Layout.replicated(len(ctx.lay(i).dims)))
            continue
        s = ctx.shape(i)
        off = out_rank - len(s)
        dims = tuple(None if bcast(i, a) else chosen[off + a] for a in range(len(s)))
        req.append(Layout(dims, out_partial if i in keep else frozenset()))
    outs = [Layout(tuple(chosen), out_partial)] + [Layout.replicated(len(shape_of(o) or ())) for o in node.outputs[1:]]
    return req, outs


def _is_float_cast(ctx):
    to = ctx.attr("to")
    return to in (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, 1, 10, 11, 16)


def _matmul_core(ctx: Ctx, A: Layout, B: Layout, a_const: bool, b_const: bool, out_rank: int, out_s,
                 ra: int, rb: int, a_shape, b_shape):
    """Returns (req_A_dims, req_B_dims, out_dims, out_partial, req_A_partial, req_B_partial), axes in
    the canonical (…, m, k) x (…, k, n) order."""
    kA, kB = A.dims[-1], B.dims[-2]
    if not a_const:
        k = kA
    elif not b_const:
        k = kB
    else:
        k = kA or kB
    if k is not None and not ctx.fits(a_shape[-1], k):
        k = None
    used = {k.mesh} if k else set()
    # partial inputs: linear in each argument separately
    pa, pb = A.partial, B.partial
    if pa and pb:
        pb = frozenset()
    if k and (pa | pb) & {k.mesh}:
        pa, pb = pa - {k.mesh}, pb - {k.mesh}
    used |= pa | pb
    nb = out_rank - 2
    batch: list[Shard | None] = [None] * nb
    for lay, r, shp, const in ((A, ra, a_shape, a_const), (B, rb, b_shape, b_const)):
        if const and any(batch):
            continue
        off = nb - (r - 2)
        for a in range(r - 2):
            d = lay.dims[a]
            if d and batch[off + a] is None and d.mesh not in used and shp[a] != 1 and ctx.fits(out_s[off + a], d):
                batch[off + a] = d
                used.add(d.mesh)
    m = A.dims[-2] if ra >= 2 else None
    if m and (m.mesh in used or not ctx.fits(out_s[-2], m)):
        m = None
    if m:
        used.add(m.mesh)
    n = B.dims[-1]
    if n and (n.mesh in used or not ctx.fits(out_s[-1], n)):
        n = None

    def bdims(r, shp):
        off = nb - (r - 2)
        return [None if shp[a] == 1 and out_s[off + a] != 1 else batch[off + a] for a in range(r - 2)]

    req_a = tuple(bdims(ra, a_shape) + [m, k])
    req_b = tuple(bdims(rb, b_shape) + [k, n])
    out_partial = frozenset({k.mesh}) if k else frozenset()
    out_partial |= pa | pb
    return req_a, req_b, tuple(batch + [m, n]), out_partial, pa, pb


def _matmul(ctx: Ctx):
    sa, sb, so = ctx.shape(0), ctx.shape(1), ctx.out_shape()
    if sa is None or sb is None or so is None or len(sa) < 2 or len(sb) < 2:
        return default_rule(ctx)
    A, B = ctx.lay(0), ctx.lay(1)
    ra_, rb_, od, op_, pa, pb = _matmul_core(ctx, A, B, ctx.const(0), ctx.const(1), len(so), so, len(sa), len(sb), sa, sb)
    return [Layout(ra_, pa), Layout(rb_, pb)], [Layout(od, op_)]


def _gemm(ctx: Ctx):
    sa, sb, so = ctx.shape(0), ctx.shape(1), ctx.out_shape()
    if sa is None or sb is None or so is None or len(sa) != 2 or len(sb) != 2:
        return default_rule(ctx)
    ta, tb = bool(ctx.attr("transA", 0)), bool(ctx.attr("transB", 0))
    A, B = ctx.lay(0), ctx.lay(1)
    Ad = A.dims[::-1] if ta else A.dims
    Bd = B.dims[::-1] if tb else B.dims
    sa_ = sa[::-1] if ta else sa
    sb_ = sb[::-1] if tb else sb
    ra_, rb_, od, op_, pa, pb = _matmul_core(
        ctx, Layout(Ad, A.partial), Layout(Bd, B.partial), ctx.const(0), ctx.const(1), 2, so, 2, 2, sa_, sb_)
    req = [Layout(ra_[::-1] if ta else ra_, pa), Layout(rb_[::-1] if tb else rb_, pb)]
    has_c = len(ctx.node.inputs) > 2 and ctx.inp(2) is not None
    if has_c:
        sc = ctx.shape(2)
        if sc is None:
            return default_rule(ctx)
        off = 2 - len(sc)
        cd = tuple(None if sc[a] == 1 and so[off + a] != 1 else od[off + a] for a in range(len(sc)))
        if op_:
            if not ctx.const(2) or pa or pb:
                return default_rule(ctx)
            # Megatron: the row-parallel bias is added once, after the all-reduce.
            ctx.plan.split_bias.add(ctx.node)
            op_ = frozenset()
        req.append(Layout(cd))
    else:
        ctx.plan.split_bias.discard(ctx.node)
    return req, [Layout(od, op_)]


def _reshape_like(ctx: Ctx):
    si, so = ctx.shape(0), ctx.out_shape()
    X = ctx.lay(0)
    if si is None or so is None:
        return default_rule(ctx)
    out: list[Shard | None] = [None] * len(so)
    keep = []
    for i, d in enumerate(X.dims):
        if d is None:
            keep.append(None)
            continue
        j = _map_axis(si, so, i, d, ctx)
        if j is None or out[j] is not None:
            keep.append(None)
        else:
            out[j] = d
            keep.append(d)
    req = [Layout(tuple(keep), X.partial)] + [Layout.replicated(len(ctx.lay(i).dims)) for i in range(1, len(ctx.node.inputs))]
    return req, [Layout(tuple(out), X.partial)]


def _map_axis(si, so, i, d: Shard, ctx) -> int | None:
    p_in = _prod(si[:i])
    if p_in is None:
        return None
    for j in range(len(so)):
        p_out = _prod(so[:j])
        if p_out is None:
            return None
        if p_out != p_in or so[j] == 1:
            continue
        if not ctx.fits(so[j], d):
            return None
        if so[j] == si[i]:
            return j
        if d.blocks != 1:
            return None
        end_in = _prod(si[: i + 1])
        # split: si[i] becomes so[j] * so[j+1] * ...; merge: si[i] * si[i+1] * ... becomes so[j]
        if any(_prod(so[: j + 1 + u]) == end_in for u in range(len(so) - j)):
            return j
        end_out = _prod(so[: j + 1])
        if any(_prod(si[: i + 1 + t]) == end_out for t in range(len(si) - i)) and ctx.fits(si[i], d):
            return j
        return None
    return None


def _transpose(ctx: Ctx):
    X = ctx.lay(0)
    perm = ctx.attr("perm")
    if perm is None:
        perm = list(range(len(X.dims)))[::-1]
    if len(perm) != len(X.dims):
        return default_rule(ctx)
    return [X], [Layout(tuple(X.dims[p] for p in perm), X.partial)]


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _axis_rule(ctx: Ctx, axes: list[int], extra_replicated=True):
    """Output keeps the input's layout except ``axes``, which must be whole; no partial."""
    X = ctx.lay(0)
    r = len(X.dims)
    axes = {_norm_axis(a, r) for a in axes}
    dims = tuple(None if a in axes else d for a, d in enumerate(X.dims))
    req = [Layout(dims)] + [Layout.replicated(len(ctx.lay(i).dims)) for i in range(1, len(ctx.node.inputs))]
    outs = [Layout(dims)] + [Layout.replicated(len(shape_of(o) or ())) for o in ctx.node.outputs[1:]]
    return req, outs


def _softmax(ctx: Ctx):
    if _rank(ctx, 0) is None:
        return default_rule(ctx)
    return _axis_rule(ctx, [ctx.attr("axis", -1)])


def _layernorm(ctx: Ctx):
    r = _rank(ctx, 0)
    if r is None or len([o for o in ctx.node.outputs if o.uses()]) > 1:
        return default_rule(ctx)
    axis = _norm_axis(ctx.attr("axis", -1), r)
    return _axis_rule(ctx, list(range(axis, r)))


def _reduce(ctx: Ctx):
    r = _rank(ctx, 0)
    so = ctx.out_shape()
    if r is None or so is None:
        return default_rule(ctx)
    axes = ctx.attr("axes")
    if axes is None and len(ctx.node.inputs) > 1 and ctx.inp(1) is not None:
        axes = ctx.ints(1)
        if axes is None:
            return default_rule(ctx)
    if axes is None:
        axes = [] if ctx.attr("noop_with_empty_axes", 0) else list(range(r))
    axes = {_norm_axis(a, r) for a in axes}
    X = ctx.lay(0)
    dims_in = tuple(None if a in axes else d for a, d in enumerate(X.dims))
    keepdims = ctx.attr("keepdims", 1)
    out = dims_in if keepdims else tuple(d for a, d in enumerate(dims_in) if a not in axes)
    if len(out) != len(so):
        return default_rule(ctx)
    partial = X.partial if ctx.node.op_type in ("ReduceSum", "ReduceMean") else frozenset()
    req = [Layout(dims_in, partial)] + [Layout.replicated(len(ctx.lay(i).dims)) for i in range(1, len(ctx.node.inputs))]
    return req, [Layout(out, partial)]


def _gather(ctx: Ctx):
    sd, si, so = ctx.shape(0), ctx.shape(1), ctx.out_shape()
    if sd is None or si is None or so is None:
        return default_rule(ctx)
    axis = _norm_axis(ctx.attr("axis", 0), len(sd))
    D, I = ctx.lay(0), ctx.lay(1)
    vocab = D.dims[axis] if axis == 0 and ctx.const(0) and not ctx.const(1) else None
    if vocab is not None and (vocab.blocks != 1 or not ctx.fits(sd[0], vocab) or I.partial):
        vocab = None
    ddims = tuple(vocab if a == axis else d for a, d in enumerate(D.dims))
    used = {d.mesh for d in ddims if d}
    idims = tuple(d if d and d.mesh not in used else None for d in I.dims)
    out = ddims[:axis] + idims + ddims[axis + 1:]
    if vocab is not None:
        # Megatron's vocabulary-parallel embedding: each rank looks up the ids in its rows
        # and zeros the others; the sum over ranks is the lookup (one all-reduce).
        ctx.plan.vocab_parallel.add(ctx.node)
        out = idims + ddims[1:]
        return [Layout(ddims), Layout(idims)], [Layout(out, frozenset({vocab.mesh}))]
    ctx.plan.vocab_parallel.discard(ctx.node)
    return [Layout(ddims), Layout(idims)], [Layout(out)]


def _concat(ctx: Ctx):
    so = ctx.out_shape()
    if so is None or any(_rank(ctx, i) != len(so) for i in range(len(ctx.node.inputs))):
        return default_rule(ctx)
    axis = _norm_axis(ctx.attr("axis", 0), len(so))
    chosen: list[Shard | None] = [None] * len(so)
    for consts in (False, True):
        for i in range(len(ctx.node.inputs)):
            if ctx.const(i) != consts:
                continue
            for a, d in enumerate(ctx.lay(i).dims):
                if a != axis and d and chosen[a] is None and d.mesh not in {c.mesh for c in chosen if c}:
                    chosen[a] = d
    dims = tuple(chosen)
    return [Layout(dims) for _ in ctx.node.inputs], [Layout(dims)]


def _split(ctx: Ctx):
    si = ctx.shape(0)
    if si is None:
        return default_rule(ctx)
    axis = _norm_axis(ctx.attr("axis", 0), len(si))
    X = ctx.lay(0)
    d = X.dims[axis]
    n_out = len(ctx.node.outputs)
    sizes = ctx.ints(1) if len(ctx.node.inputs) > 1 and ctx.inp(1) is not None else None
    if d is not None:
        equal = sizes is None or len(set(sizes)) == 1
        if d.blocks == n_out and equal and isinstance(si[axis], int) and (si[axis] // n_out) % d.parts(ctx.mesh) == 0:
            out_d = Shard(d.mesh, 1, d.repeat)
            dims = X.dims[:axis] + (out_d,) + X.dims[axis + 1:]
            req = [X] + [Layout.replicated(1)] * (len(ctx.node.inputs) - 1)
            return req, [Layout(dims, X.partial) for _ in ctx.node.outputs]
        dims = X.dims[:axis] + (None,) + X.dims[axis + 1:]
    else:
        dims = X.dims
    req = [Layout(dims, X.partial)] + [Layout.replicated(len(ctx.lay(i).dims)) for i in range(1, len(ctx.node.inputs))]
    return req, [Layout(dims, X.partial) for _ in ctx.node.outputs]


def _expand(ctx: Ctx):
    si, so = ctx.shape(0), ctx.out_shape()
    if si is None or so is None:
        return default_rule(ctx)
    X = ctx.lay(0)
    off = len(so) - len(si)
    dims_in = tuple(None if si[a] == 1 and so[off + a] != 1 else d for a, d in enumerate(X.dims))
    out = (None,) * off + dims_in
    return [Layout(dims_in, X.partial), Layout.replicated(1)], [Layout(out, X.partial)]


def _slice(ctx: Ctx):
    """Axes the Slice cuts must be whole; the others keep their split (rotary halves of a head)."""
    r = _rank(ctx, 0)
    if r is None or "starts" in ctx.node.attributes:  # opset < 10 (attributes): not planned
        return default_rule(ctx)
    starts, ends = ctx.ints(1), ctx.ints(2)
    axes = ctx.ints(3) if ctx.inp(3) is not None else (list(range(len(starts))) if starts is not None else None)
    steps = ctx.ints(4) if ctx.inp(4) is not None else [1] * len(axes or ())
    if axes is None or starts is None or ends is None or steps is None:
        return default_rule(ctx)
    si = ctx.shape(0)
    cut = [a for a, b, e, k in zip(axes, starts, ends, steps)
           if not (b == 0 and k == 1 and isinstance(si[a], int) and e >= si[a])]
    return _axis_rule(ctx, cut)


RULES = {
    **{op: _elementwise for op in _UNARY | _BINARY},
    "MatMul": _matmul,
    "Gemm": _gemm,
    "Reshape": _reshape_like,
    "Flatten": _reshape_like,
    "Squeeze": _reshape_like,
    "Unsqueeze": _reshape_like,
    "Transpose": _transpose,
    "Softmax": _softmax,
    "LogSoftmax": _softmax,
    "LayerNormalization": _layernorm,
    "RMSNormalization": _layernorm,
    "ReduceMean": _reduce,
    "ReduceSum": _reduce,
    "ReduceMax": _reduce,
    "ReduceMin": _reduce,
    "ReduceProd": _reduce,
    "Gather": _gather,
    "Concat": _concat,
    "Split": _split,
    "Expand": _expand,
    "Slice": _slice,
}


def rule_for(node: ir.Node):
    from gcomp.passes.sharding.attention_ops import ATTENTION_OPS, attention_rule

    if (node.domain, node.op_type) in ATTENTION_OPS:
        return attention_rule
    if node.domain not in ("", "ai.onnx"):
        return default_rule
    if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
        return default_rule
    return RULES.get(node.op_type, default_rule)
