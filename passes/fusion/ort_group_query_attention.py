"""Decoder self-attention (grouped or not, with or without a KV cache) ->
``com.microsoft.GroupQueryAttention`` (ONNX Runtime).

Math, per batch b, query head h (N query heads, G = N / N_kv heads share one KV head),
with Q [B, N, S, D], new keys/values K_n, V_n [B, N_kv, S, D], a cache P_k, P_v
[B, N_kv, P, D] and an additive mask M broadcast to [B, N, S, P + S]:

    K = concat(P_k, K_n, axis=2)   V = concat(P_v, V_n, axis=2)      (present_key / value)
    O_h = softmax(c * Q_h K_{h/G}^T + M) V_{h/G} ;   out = merge_h(O_h) -> [B, S, N * D]

which is ``GroupQueryAttention(q, k, v, P_k, P_v, seqlens_k, total_sequence_length,
attention_bias=M', num_heads=N, kv_num_heads=N_kv, scale=c, causal=0)`` with q, k, v the
[B, S, heads * D] projections before their head split, ``total_sequence_length`` = P + S
and ``seqlens_k`` = P + S - 1 for every row: the kernel then attends every key of the
cache and the new tokens, and the mask alone decides (``causal=0``, so a mask that is not
causal stays exact). M' is made in one of two ways:

- where M is proven to be the causal + padding mask of the ``attention_mask`` input m
  (``M = 0`` where key j <= P + i and m[b, j] != 0, <= -1e4 elsewhere, on every row with a
  key to attend; proven by probes of the subgraph that makes it, :mod:`gcomp.passes.masks`),
  M' is that mask built afresh from m and the lengths in 13 nodes, once for all layers, in
  place of the export's builder (about 30 nodes on transformers 5 exports, run at every
  step: a few µs of ONNX Runtime's overhead each);
- else M' = max(M, lowest) (below), the export's own mask, so a mask that is not causal +
  padding (a window, a prefix) stays exact.

Exporters write the head repeat (``repeat_kv``) as Unsqueeze at axis
2 + Expand + Reshape to N heads, K^T as ``Transpose(perm [0, 1, 3, 2])`` or (dynamo) as a
Reshape to 3-D, ``Transpose(perm [0, 2, 1])`` and a Reshape back, and the scale as one
constant after the scores or its square root on each of Q and K^T: all are read here.
Rotary embeddings fused by ``ort-rotary`` (``RotaryEmbedding`` on the 4-D heads) are moved
onto the 3-D projection (``num_heads`` set), where the contrib op applies them per head; or,
where the batch is known to be 1 (or with ``--set rotary_in_attention=1``), into the kernel
itself (``do_rotary=1``, Q/K/V packed straight in): see :func:`_inner_rotary` for why only there.

M' = max(M, lowest finite value of the dtype): on every row with at least one attended
key the result is unchanged (exp(lowest - max) is 0 as exp(-inf) is); a row whose every
key is masked (the pad positions of a left-padded prompt) gets finite values instead of
the NaN that ``-inf`` would give the kernel and that would then reach every later token
through the cache (the export's own ``Where(IsNaN(p), 0, p)`` guard has no counterpart in
the kernel). Such rows are garbage in the original too; their outputs differ.

The fused node is ONNX Runtime's contract, narrower than the export's in one way: a step
with a cache and more than one new token needs batch 1 ("batch_size must be 1 when
sequence_length > 1 and past context is given": an error, never different numbers).

Refused, with the reason in ``--explain-fusion``: a softmax over another axis, a scale that
is not a positive scalar constant, a mask added before a scale, a mask that is not a float
rank-4 tensor, heads that cannot be read as [B, S, heads, D] splits, a head repeat other
than Unsqueeze(2) + Expand + Reshape, V read without the same repeat, a cache concat that
is not past-then-new on axis 2, intermediate values read elsewhere, model functions and
subgraphs (cache decoders keep attention in the main graph).
"""

from __future__ import annotations

__all__ = ["ORT_GROUP_QUERY_ATTENTION", "GroupQueryAttention"]

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from gcomp.passes.fusion._attention import heads as heads_of
from gcomp.passes.fusion._engine import FusionRun, GraphRule, fusion
from gcomp.passes.fusion._engine import Refused as _Refused
from gcomp.passes.masks import Dims, causal_padding, mask_source
from gcomp.passes.opsets import model_opset

MS = "com.microsoft"
_ROTARY = ("RotaryEmbedding",)


def _std(node: ir.Node | None, *op_types: str) -> bool:
    return node is not None and node.domain in ("", "ai.onnx") and node.op_type in op_types


def _ints(run: FusionRun, value: ir.Value | None) -> list[int] | None:
    array = run.const(value)
    return None if array is None else [int(v) for v in np.asarray(array).reshape(-1)]


def _perm(node: ir.Node) -> list[int] | None:
    attr = node.attributes.get("perm")
    return None if attr is None else list(attr.as_ints())


def _only_use(value: ir.Value, why: str) -> ir.Node:
    """The one reader of ``value`` besides Shape/Size reads (exporters compute the next
    Reshape's target from them; they die with the block)."""
    uses = [u.node for u in value.uses() if not _std(u.node, "Shape", "Size")]
    if len(uses) != 1 or value.is_graph_output():
        raise _Refused(f"{why} is read elsewhere")
    return uses[0]


def _dim(value: ir.Value, axis: int) -> int | str | None:
    shape = value.shape
    if shape is None or not -shape.rank() <= axis < shape.rank():
        return None
    d = shape[axis]
    if isinstance(d, int):
        return d
    name = d.value if isinstance(d, ir.SymbolicDim) else None
    return name if name and not name.startswith("unk__") else None  # ONNX's unk__N: a fresh unknown


@dataclass
class _Heads:
    """A [B, heads, S, D] tensor read from a [B, S, heads * D] projection ``source``;
    ``rotary``: the RotaryEmbedding applied on the 4-D heads (moved onto ``source``)."""

    source: ir.Value
    heads: int
    size: int
    rotary: ir.Node | None = None
    merged: bool = True  # False: ``source`` is the [B, heads, S, D] tensor itself


@dataclass
class _Site:
    softmax: ir.Node
    q: _Heads
    k: _Heads
    v: _Heads
    past_k: ir.Value | None
    past_v: ir.Value | None
    present_k: ir.Value | None
    present_v: ir.Value | None
    mask: ir.Value | None
    scale: float
    out: ir.Value  # the [B, S, N * D] merge
    anchor: ir.Node  # the node the fused ones go before (the output Reshape)


class GroupQueryAttention(GraphRule):
    name = "ort-group-query-attention"

    def apply(self, model: ir.Model) -> int:
        self.misses = []
        graph, fired, shared = model.graph, 0, {}
        for node in list(graph):
            if not _std(node, "Softmax") or node.graph is not graph:
                continue
            site = self.attempt(node, lambda: self._match(node))
            if site is None:
                continue
            why = _rewrite(self.run, model, site, shared)
            if why:
                where = node.name or node.outputs[0].name
                self.notes.append(f"at {where}: fused with the export's mask as attention_bias: {why}")
            fired += 1
        if fired:
            _drop_dead(graph)
        return fired

    # ------------------------------------------------------------------ match

    def _match(self, softmax: ir.Node) -> _Site:
        x = softmax.inputs[0]
        axis = softmax.attributes.get("axis")
        rank = x.shape.rank() if x.shape is not None else 4
        if rank != 4 or (axis is not None and axis.as_int() not in (-1, 3)):
            raise _Refused("softmax is not over the last axis of a rank-4 tensor")
        pv = self._after_softmax(softmax.outputs[0])
        scores, mask, scale = self._scores(x)
        left, right = scores.producer().inputs
        q4, q_scale = self._scaled(left)
        kt, k_scale = self._scaled(right)
        k_rep, kt_scale = self._scaled(self._untransposed(kt))
        scale *= q_scale * k_scale * kt_scale
        if not (np.isfinite(scale) and scale > 0):
            raise _Refused("the attention scale is not a positive constant")
        k_all, group_k = self._unrepeated(k_rep)
        v_all, group_v = self._unrepeated(pv.inputs[1])
        if group_k != group_v:
            raise _Refused("K and V heads are repeated differently")
        past_k, k4, present_k = self._cache(k_all, "key")
        past_v, v4, present_v = self._cache(v_all, "value")
        if (past_k is None) != (past_v is None):
            raise _Refused("only one of K and V has a cache")
        q, k, v = self._heads(q4, "query"), self._heads(k4, "key"), self._heads(v4, "value")
        if v.rotary is not None:
            raise _Refused("V has a rotary embedding")
        if q.size != k.size or k.size != v.size or k.heads != v.heads or q.heads != k.heads * group_k:
            raise _Refused(f"head counts/sizes do not agree (Q {q.heads}x{q.size}, K {k.heads}x{k.size}, "
                           f"V {v.heads}x{v.size}, repeat {group_k})")
        if past_k is None and group_k == 1 and q.rotary is None and k.rotary is None:
            raise _Refused("no KV cache, no grouped KV heads and no rotary embedding: an encoder's attention, "
                           "left to the Attention / MultiHeadAttention fusions")
        out, anchor = self._merge(pv.outputs[0], q.heads * q.size)
        if mask is not None and (mask.dtype != x.dtype or mask.shape is None or mask.shape.rank() != 4):
            raise _Refused("the mask is not a float rank-4 tensor of the scores' dtype")
        if x.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            raise _Refused("scores are not float32/float16")
        return _Site(softmax, q, k, v, past_k, past_v, present_k, present_v, mask, float(scale), out, anchor)

    def _after_softmax(self, probs: ir.Value) -> ir.Node:
        """The ``P @ V`` MatMul reading the softmax (through the exporter's NaN guard
        ``Where(IsNaN(p), 0, p)``, which the kernel does not need: see the docstring)."""
        uses = [u.node for u in probs.uses()]
        if probs.is_graph_output():
            raise _Refused("the probabilities are a graph output")
        if len(uses) == 2 and {n.op_type for n in uses} == {"IsNaN", "Where"}:
            isnan = next(n for n in uses if n.op_type == "IsNaN")
            where = next(n for n in uses if n.op_type == "Where")
            zero = self.run.const(where.inputs[1])
            if (where.inputs[0] is not isnan.outputs[0] or where.inputs[2] is not probs or zero is None
                    or zero.size != 1 or float(zero.reshape(-1)[0]) != 0.0):
                raise _Refused("the softmax's NaN guard is not Where(IsNaN(p), 0, p)")
            probs = where.outputs[0]
            uses = [u.node for u in probs.uses()]
        if len(uses) != 1 or not _std(uses[0], "MatMul") or uses[0].inputs[0] is not probs:
            raise _Refused("the probabilities do not feed one P @ V MatMul")
        return uses[0]

    def _scaled(self, value: ir.Value) -> tuple[ir.Value, float]:
        """``value`` = base * c (Mul or Div by positive scalar constants): (base, c)."""
        factor = 1.0
        node = value.producer()
        while _std(node, "Mul", "Div") and len(node.inputs) == 2:
            c = self.run.const(node.inputs[1])
            if c is None or c.size != 1:
                break
            c = float(np.asarray(c, dtype=np.float64).reshape(()))
            factor *= c if node.op_type == "Mul" else 1.0 / c
            _only_use(node.outputs[0], "a scale Mul's output")
            value = node.inputs[0]
            node = value.producer()
        return value, factor

    def _scores(self, x: ir.Value) -> tuple[ir.Value, ir.Value | None, float]:
        """(scores MatMul output, additive mask or None, scale after the MatMul)."""
        mask = None
        node = x.producer()
        if _std(node, "Add"):
            for i in (0, 1):
                base, scale = self._scaled(node.inputs[i])
                if _std(base.producer(), "MatMul"):
                    mask = node.inputs[1 - i]
                    _only_use(node.inputs[i], "the scores")
                    x = node.inputs[i]
                    break
            else:
                raise _Refused("the softmax input is not a scores MatMul times constant scales plus a mask")
        base, scale = self._scaled(x)
        if mask is None and _std(base.producer(), "Add"):
            raise _Refused("the mask is added before the scale")
        if not _std(base.producer(), "MatMul"):
            raise _Refused("the softmax input is not a scores MatMul times constant scales")
        _only_use(base, "the scores")
        return base, mask, scale

    def _untransposed(self, kt: ir.Value) -> ir.Value:
        """K from K^T: Transpose(perm [0, 1, 3, 2]), or Reshape(Transpose(Reshape(K, 3-D),
        [0, 2, 1]), 4-D) (the heads merged into the batch while transposing)."""
        node = kt.producer()
        if _std(node, "Transpose") and _perm(node) == [0, 1, 3, 2]:
            _only_use(kt, "K^T")
            return node.inputs[0]
        if _std(node, "Reshape"):
            mid = node.inputs[0].producer()
            if _std(mid, "Transpose") and _perm(mid) == [0, 2, 1]:
                first = mid.inputs[0].producer()
                if _std(first, "Reshape"):
                    for v in (kt, node.inputs[0], mid.inputs[0]):
                        _only_use(v, "K^T")
                    return first.inputs[0]
        raise _Refused("K^T is not a transpose of the last two axes of K")

    def _unrepeated(self, rep: ir.Value) -> tuple[ir.Value, int]:
        """(KV tensor, group size G) of repeat_kv(x, G) = Reshape(Expand(Unsqueeze(x, 2), [B, N_kv,
        G, T, D]), [B, N_kv * G, T, D]); (rep, 1) when there is no repeat."""
        reshape = rep.producer()
        if not _std(reshape, "Reshape"):
            return rep, 1
        expand = reshape.inputs[0].producer()
        if not _std(expand, "Expand"):
            return rep, 1
        unsq = expand.inputs[0].producer()
        axes = None
        if _std(unsq, "Unsqueeze"):
            attr = unsq.attributes.get("axes")
            axes = list(attr.as_ints()) if attr is not None else _ints(self.run, unsq.inputs[1] if len(unsq.inputs) > 1
                                                                        else None)
        if axes != [2]:
            raise _Refused("the KV head repeat is not Unsqueeze(axis 2) + Expand + Reshape")
        x = unsq.inputs[0]
        kv, heads = _dim(x, 1), _dim(rep, 1)
        if not isinstance(kv, int) or not isinstance(heads, int) or heads % kv:
            raise _Refused("the KV head repeat's head counts are unknown")
        group = heads // kv
        wide = _dim(expand.outputs[0], 2)
        if isinstance(wide, int) and wide != group:
            raise _Refused("the KV head repeat's Expand does not widen axis 2 by the group size")
        for a in (0, 2, 3):  # batch, length, head size unchanged (where both are known)
            d_in, d_out = _dim(x, a), _dim(rep, a)
            if d_in is not None and d_out is not None and d_in != d_out:
                raise _Refused("the KV head repeat changes a dim other than the heads")
        for v in (unsq.outputs[0], expand.outputs[0]):
            _only_use(v, "the KV head repeat")
        return x, group

    def _cache(self, full: ir.Value, what: str) -> tuple[ir.Value | None, ir.Value, ir.Value | None]:
        """(past, new, present) of ``full`` = Concat(past, new, axis=2); (None, full, None)."""
        node = full.producer()
        if not _std(node, "Concat"):
            return None, full, None
        axis = node.attributes.get("axis")
        if axis is None or axis.as_int() not in (2, -2) or len(node.inputs) != 2:
            raise _Refused(f"the {what} cache concat is not past + new on axis 2")
        past, new = node.inputs
        if past.shape is None or past.shape.rank() != 4 or _dim(past, 1) != _dim(new, 1) or _dim(past, 3) != _dim(new, 3):
            raise _Refused(f"the past {what} is not a rank-4 tensor of the new {what}s' heads and size")
        return past, new, full

    def _heads(self, x4: ir.Value, what: str) -> _Heads:
        """``x4`` [B, H, S, D] = (RotaryEmbedding of) Transpose(Reshape(src [B, S, H * D]), [0, 2, 1, 3])."""
        rotary = x4.producer()
        if rotary is not None and rotary.op_type in _ROTARY and rotary.domain in (MS, "", "ai.onnx"):
            _only_use(x4, f"the {what} rotary output")
            x4 = rotary.inputs[0]
        else:
            rotary = None
        transpose = x4.producer()
        split = transpose.inputs[0].producer() if _std(transpose, "Transpose") else None
        if _perm(transpose) != [0, 2, 1, 3] or not _std(split, "Reshape"):
            if rotary is None:  # 4-D heads computed otherwise (rotary math left unfused): merged back
                heads, size = _dim(x4, 1), _dim(x4, 3)
                if isinstance(heads, int) and isinstance(size, int):
                    return _Heads(x4, heads, size, merged=False)
            raise _Refused(f"the {what} heads are neither a [B, S, heads, D] split + Transpose(perm [0, 2, 1, 3]) "
                           "nor a rank-4 tensor of static heads and size")
        src = split.inputs[0]
        hidden = _dim(src, -1)
        # From the split's inferred shape, else its constant target (exporters' [0, 0, H, D] forms).
        split_dims = heads_of(self.run, split.outputs[0], hidden) or (None, None)
        heads, size = split_dims
        batch_src, batch_x = _dim(src, 0), _dim(x4, 0)
        if (not isinstance(heads, int) or not isinstance(size, int) or src.shape is None or src.shape.rank() != 3
                or hidden != heads * size or (batch_src is not None and batch_x is not None and batch_src != batch_x)):
            raise _Refused(f"the {what} split is not [B, S, heads, D] of a [B, S, heads * D] projection")
        return _Heads(src, heads, size, rotary)

    def _merge(self, o4: ir.Value, hidden: int) -> tuple[ir.Value, ir.Node]:
        transpose = _only_use(o4, "the attention output")
        if _std(transpose, "Reshape") and _same_layout(o4, transpose.outputs[0]):  # TorchScript's sdpa
            transpose = _only_use(transpose.outputs[0], "the attention output")
        if not _std(transpose, "Transpose") or _perm(transpose) != [0, 2, 1, 3]:
            raise _Refused("the heads are not merged by Transpose(perm [0, 2, 1, 3])")
        reshape = _only_use(transpose.outputs[0], "the merged heads")
        out = reshape.outputs[0]
        if not _std(reshape, "Reshape") or out.shape is None or out.shape.rank() != 3 or _dim(out, 2) not in (None, hidden):
            raise _Refused("the merged heads are not reshaped to [B, S, heads * D]")
        return out, reshape


def _same_layout(x: ir.Value, y: ir.Value) -> bool:
    """A Reshape of the [B, N, S, D] attention output back to [B, N, S, D] (TorchScript's
    sdpa writes one, its target computed from shapes): rank 4 to rank 4, the same static
    head size, and every dim equal where both are known. Read as the identity; a target
    that regroups B, N and S would not be caught here, which the pipeline's verification
    of the whole model would."""
    if y.shape is None or y.shape.rank() != 4 or x.shape is None or x.shape.rank() != 4:
        return False
    if not isinstance(_dim(x, 3), int) or _dim(x, 3) != _dim(y, 3):
        return False
    return all(_dim(x, a) is None or _dim(y, a) is None or _dim(x, a) == _dim(y, a) for a in (0, 1, 2))


# ---------------------------------------------------------------------- rewrite


def _rewrite(run: FusionRun, model: ir.Model, s: _Site, shared: dict) -> str | None:
    """Replace the block by the fused node; ``shared``: the masks and the lengths the layers of
    one model have in common (made once, at the first layer). Returns why the export's mask
    was kept as the bias (None: the mask built afresh, or no mask)."""
    graph = model.graph
    model.opset_imports.setdefault(MS, 1)
    nodes: list[ir.Node] = []
    base = s.softmax.name or "attention"

    def add(op: str, inputs, domain: str = "", num_outputs: int = 1, **attrs) -> ir.Node:
        node = ir.node(op, list(inputs), attributes=attrs, domain=domain, num_outputs=num_outputs,
                       name=run.fresh_name(f"{base}_gqa_{op.lower()}"))
        for out in node.outputs:
            out.name = run.fresh_name(f"{base}_gqa")
        nodes.append(node)
        return node

    def const(array: np.ndarray) -> ir.Value:
        return add("Constant", [], value=ir.tensor(array)).outputs[0]

    heads = (s.q, s.k, s.v)
    packed = _pack_projections(run, graph, add, heads)
    rotary = _inner_rotary(run, s, model_opset(model))
    attrs = {}
    if packed is not None and (rotary is not None or (s.q.rotary is None and s.k.rotary is None)):
        q, k, v = packed, None, None  # Q/K/V packed straight into the kernel: no Split
    else:
        if packed is not None:
            split = _split(add, const, packed, heads, model_opset(model))
            s.q, s.k, s.v = (dataclasses.replace(h, source=src) for h, src in zip(heads, split))
        rotary = None
        q, k = (_projection(add, h) for h in (s.q, s.k))
        v = _projection(add, s.v)  # V too may arrive as the 4-D heads (a fused QKV split by Slice)
    dtype = s.softmax.inputs[0].dtype.numpy()
    key = _lengths_key(s)
    if key is None or key not in shared:
        lengths = _lengths(add, const, q, k if k is not None else q, s.past_k)
        if key is not None:
            shared[key] = lengths
    seqlens, total32, total, seq = shared[key] if key is not None else lengths
    bias, why = None, None
    if s.mask is not None:
        if ("plan", s.mask) not in shared:  # probed once per mask, before any layer is rewritten
            shared[("plan", s.mask)] = _padding_of(run, model, s)
        padding, why = shared[("plan", s.mask)]
        bias = shared.get(("bias", s.mask))
        if bias is None and padding is not None:
            bias = shared[("bias", s.mask)] = _causal_padding_bias(add, const, padding, total, seq, dtype,
                                                                   model_opset(model))
        elif bias is None:
            bias = shared[("bias", s.mask)] = add(
                "Max", [s.mask, const(np.array(np.finfo(dtype).min, dtype=dtype))]).outputs[0]
    cos = sin = position = None
    if rotary is not None:
        cos, sin, position = _rotary_inputs(add, const, rotary, total, shared)
        attrs = {"do_rotary": 1, "rotary_interleaved": rotary.interleaved}
    inputs = [q, k, v, s.past_k, s.past_v, seqlens, total32, cos, sin, position, bias]
    while inputs[-1] is None:
        inputs.pop()
    gqa = add("GroupQueryAttention", inputs, domain=MS, num_outputs=3, num_heads=s.q.heads,
              kv_num_heads=s.k.heads, scale=s.scale, causal=0, **attrs)
    out, present_k, present_v = gqa.outputs
    graph.insert_before(s.anchor, nodes)
    _replace(graph, s.out, out)
    for old, new in ((s.present_k, present_k), (s.present_v, present_v)):
        if old is not None:
            _replace(graph, old, new)
    return why


def _padding_of(run: FusionRun, model: ir.Model, s: _Site) -> tuple[ir.Value | None, str | None]:
    """(the [B, T] ``attention_mask`` input, None) when ``s.mask`` is proven to be its causal +
    padding mask (:mod:`gcomp.passes.masks`), else (None, why not)."""
    if model_opset(model) < 11:
        return None, "the fresh mask needs Range (opset 11); the model is opset " + str(model_opset(model))
    source = mask_source(model, s.mask)
    if isinstance(source, str):
        return None, source
    batch, total, seq = _dim(source, 0), _dim(source, 1), _dim(s.q.source, 1)
    past = _dim(s.past_k, 2) if s.past_k is not None else None
    if batch is None or not isinstance(total, str) or not isinstance(seq, str) or (
            s.past_k is not None and not isinstance(past, str)):
        return None, "the mask's, the new tokens' or the past's length is not a named dim"
    why = causal_padding(model, s.mask, source, Dims(batch, total, seq, past), run.runtime)
    return (None, why) if why else (source, None)


def _causal_padding_bias(add, const, mask: ir.Value, total: ir.Value, seq: ir.Value, dtype: np.dtype,
                         opset: int) -> ir.Value:
    """``Where(j <= P + i and mask[b, j] != 0, 0, lowest)`` [B, 1, S, T] from the [B, >= T] mask
    and the int64 scalars T and S: the export's causal + padding mask (proven equal on every
    row with a key to attend) in 13 nodes, made once for all layers. Built here rather than left
    to the kernel's ``causal=1``: ONNX Runtime 1.32's CPU kernel is slower causal than with
    a bias (tiny Llama, one decoded token: 0.381 against 0.245 ms per step, 4 layers)."""
    i64 = lambda v: const(np.array(v, np.int64))  # noqa: E731
    first = add("Sub", [total, seq]).outputs[0]  # P: the first new token's position
    query = add("Range", [first, total, i64(1)]).outputs[0]  # [S]: P .. P + S - 1
    column = (add("Unsqueeze", [query, i64([1])]) if opset >= 13 else add("Unsqueeze", [query], axes=[1])).outputs[0]
    key = add("Range", [i64(0), total, i64(1)]).outputs[0]  # [T]
    causal = (add("LessOrEqual", [key, column]) if opset >= 12
              else add("Not", [add("Greater", [key, column]).outputs[0]])).outputs[0]  # [S, T]
    # The mask's first T positions: exports slice a longer attention_mask so (proven by a probe).
    ends = (add("Unsqueeze", [total, i64([0])]) if opset >= 13 else add("Unsqueeze", [total], axes=[0])).outputs[0]
    first_t = add("Slice", [mask, i64([0]), ends, i64([1])]).outputs[0]
    keep = add("Cast", [first_t], to=ir.DataType.BOOL).outputs[0]
    rows = (add("Unsqueeze", [keep, i64([1, 2])]) if opset >= 13 else add("Unsqueeze", [keep], axes=[1, 2])).outputs[0]
    allowed = add("And", [causal, rows]).outputs[0]  # [B, 1, S, T]
    return add("Where", [allowed, const(np.zeros((), dtype)), const(np.array(np.finfo(dtype).min, dtype))]).outputs[0]


def _linear(run: FusionRun, value: ir.Value) -> tuple[ir.Value, np.ndarray, np.ndarray | None] | None:
    """(x, W [K, N], b [N] or None) when ``value`` = x @ W (+ b), W and b constants."""
    node, bias = value.producer(), None
    if _std(node, "Add"):
        for i in (0, 1):
            b, mm = run.const(node.inputs[i]), node.inputs[1 - i].producer()
            if b is not None and b.ndim == 1 and _std(mm, "MatMul"):
                bias, node = b, mm
                break
        else:
            return None
    if not _std(node, "MatMul"):
        return None
    w = run.const(node.inputs[1])
    if w is None or w.ndim != 2 or (bias is not None and (bias.shape != (w.shape[1],) or bias.dtype != w.dtype)):
        return None
    return node.inputs[0], w, bias


def _pack_projections(run: FusionRun, graph: ir.Graph, add, heads: tuple[_Heads, ...]) -> ir.Value | None:
    """Q, K and V as one MatMul on the concatenated weights (and biases), [B, S, (N + 2 N_kv) D],
    when they are projections of one input with constant weights that die with the block.

    Exact: column block i of x @ [W_q | W_k | W_v] is x @ W_i. Why (bench/LLM.md, 125 M
    Llama, ONNX Runtime's CPU provider, one decoded token): one kernel instead of three per
    layer; ONNX Runtime GenAI's packed graph spent 14.0 ms of MatMul per step against 15.6
    for gcomp's separate projections, and gcomp's int4 model decoded at 3.25 instead of 3.42
    ms per token with Q/K/V packed before weight-only quantization (which then makes one
    MatMulNBits of them). Only Q/K/V: packing the MLP's gate and up projections the same
    way made a 64-token prompt's MatMul 3x slower ([64, 768] x [768, 4096] against two
    [768, 2048], fp32 and int4). The kernel takes the packed tensor as its query (key and
    value absent) unless Q and K are rotated outside it: then :func:`_split` cuts it."""
    if not all(h.merged for h in heads):
        return None
    parts = [_linear(run, h.source) for h in heads]
    if any(p is None for p in parts):
        return None
    x = parts[0][0]
    if any(p[0] is not x for p in parts) or len({(p[1].dtype, p[1].shape[0]) for p in parts}) != 1:
        return None
    for h in heads:  # the separate projections must die with the block (shape reads aside)
        if h.source.is_graph_output() or any(not _std(u.node, "Reshape", "Shape", "Size") for u in h.source.uses()):
            return None
    widths = [int(p[1].shape[1]) for p in parts]
    y = add("MatMul", [x, _initializer(run, graph, np.concatenate([p[1] for p in parts], axis=1),
                                       "qkv_packed_weight")]).outputs[0]
    if any(p[2] is not None for p in parts):
        bias = np.concatenate([p[2] if p[2] is not None else np.zeros(w, parts[0][1].dtype)
                               for p, w in zip(parts, widths)])
        y = add("Add", [y, _initializer(run, graph, bias, "qkv_packed_bias")]).outputs[0]
    src = heads[0].source
    y.dtype = src.dtype
    if src.shape is not None and src.shape.rank() == 3:
        y.shape = ir.Shape([src.shape[0], src.shape[1], sum(widths)])
    return y


def _split(add, const, packed: ir.Value, heads: tuple[_Heads, ...], opset: int) -> list[ir.Value]:
    """The Q, K and V projections cut back out of the packed one."""
    widths = [h.heads * h.size for h in heads]
    if opset >= 13:
        split = add("Split", [packed, const(np.array(widths, np.int64))], num_outputs=3, axis=-1)
    else:
        split = add("Split", [packed], num_outputs=3, axis=-1, split=widths)
    for out, h in zip(split.outputs, heads):
        out.dtype, out.shape = h.source.dtype, h.source.shape
    return list(split.outputs)


@dataclass
class _InnerRotary:
    """The rotation ``ort-rotary`` made for Q and K, for the kernel's own (``do_rotary=1``)."""

    position: ir.Value  # [B, S] row indices into the caches
    cos: ir.Value  # [rows, D / 2]
    sin: ir.Value
    interleaved: int


def _inner_rotary(run: FusionRun, s: _Site, opset: int) -> _InnerRotary | None:
    """Q's and K's RotaryEmbedding as the kernel's ``do_rotary=1``, where that is exact or the
    user accepted its contract (``rotary_in_attention``); else None (they stay outside).

    The kernel rotates the packed Q and K itself from ``cos_cache``/``sin_cache`` rows chosen
    by ``position_ids``, one row per token at every step with a cache, but at a first
    prompt (an empty or absent cache, any number of tokens) from row ``position_ids[0, 0] + s``
    for every batch row b (ONNX Runtime's GroupQueryAttention, CPU and CUDA). ``ort-rotary``'s
    caches hold one row per token (row b * S + s, read through the index
    ``Reshape(Range(0, Size(p), 1), Shape(p))``, required here: a model's own table read at
    its own positions would be read at ``p[0, 0] + s``, and past its end from the padding
    rows), so the two agree whenever the batch is 1, and
    for larger batches only when every row's positions equal the first's: a left-padded
    batch's first prompt would rotate its keys at the wrong positions (measured: cached
    keys off by up to 2.97 on a tiny Llama), and every later token reads them. Hence only
    where the batch is known to be 1, or with ``--set rotary_in_attention=1``.

    The kernel's rotary also needs a head size that is a multiple of 16 (ONNX Runtime: "head_size
    shall be a multiple of 16"), refused at run time otherwise.

    Why fold it at all (bench/LLM.md, 125 M Llama at int4 on ONNX Runtime's CPU provider):
    the 24 RotaryEmbedding and 12 Split nodes took 234 µs of kernel time per decoding step."""
    rq, rk = s.q.rotary, s.k.rotary
    if rq is None or rk is None or not s.q.merged or not s.k.merged or opset < 11:  # Pad's pads as an input
        return None
    if s.q.size % 16:
        return None
    if not (run.rotary_in_attention or _dim(s.q.source, 0) == 1):
        return None
    if any(r.domain != MS or r.op_type != "RotaryEmbedding" or len(r.inputs) != 4 for r in (rq, rk)):
        return None
    if list(rq.inputs[1:]) != list(rk.inputs[1:]):
        return None
    attrs = [{k: v.value for k, v in r.attributes.items()} for r in (rq, rk)]
    interleaved = {int(a.get("interleaved", 0)) for a in attrs}
    if len(interleaved) != 1 or any(set(a) - {"interleaved", "num_heads", "rotary_embedding_dim", "scale"}
                                    for a in attrs):
        return None
    if any(a.get("rotary_embedding_dim", 0) != 0 or float(a.get("scale", 1.0)) != 1.0 for a in attrs):
        return None
    position, cos, sin = rq.inputs[1:]
    # The kernel, like RotaryEmbedding, rotates the first 2 * cos_cache.shape[1] channels of a head.
    if any(c.shape is not None and c.shape.rank() != 2 for c in (cos, sin)):
        return None  # a cache of another layout (per batch row)
    if (position.shape is not None and position.shape.rank() != 2) or not _per_token_index(run, position):
        return None
    return _InnerRotary(position, cos, sin, interleaved.pop())


def _per_token_index(run: FusionRun, index: ir.Value) -> bool:
    """``index`` = Reshape(Range(0, Size(p), 1), Shape(p)): row b * S + s of per-token caches."""
    reshape = index.producer()
    if not _std(reshape, "Reshape") or len(reshape.inputs) != 2:
        return False
    rng, shape = (v.producer() for v in reshape.inputs)
    if not _std(rng, "Range") or not _std(shape, "Shape") or shape.attributes:
        return False
    size = rng.inputs[1].producer()
    if not _std(size, "Size") or size.inputs[0] is not shape.inputs[0]:
        return False
    return _ints(run, rng.inputs[0]) == [0] and _ints(run, rng.inputs[2]) == [1]


def _rotary_inputs(add, const, rotary: _InnerRotary, total: ir.Value, shared: dict) -> tuple[ir.Value, ...]:
    """(cos_cache, sin_cache, position_ids) for the kernel: the per-token caches followed by
    ``total`` rows of zeros, never read (ONNX Runtime requires at least
    total_sequence_length rows; the per-token caches have B * S)."""
    key = ("rotary", rotary.cos, rotary.sin, total)
    if key not in shared:
        pads = add("Concat", [const(np.array([0, 0], np.int64)),
                              add("Reshape", [total, const(np.array([1], np.int64))]).outputs[0],
                              const(np.array([0], np.int64))], axis=0).outputs[0]
        shared[key] = tuple(add("Pad", [c, pads]).outputs[0] for c in (rotary.cos, rotary.sin))
    cos, sin = shared[key]
    return cos, sin, rotary.position


def _initializer(run: FusionRun, graph: ir.Graph, array: np.ndarray, base: str) -> ir.Value:
    name = run.fresh_name(base)
    value = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), shape=ir.Shape(array.shape),
                     const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    graph.register_initializer(value)
    return value


def _lengths_key(s: _Site) -> tuple | None:
    """Layers whose batch, new and past lengths carry the same symbolic dims and which read
    the same mask share one (seqlens_k, total_sequence_length): the mask ties every layer's
    key length to its own (the scores + mask Add), the dims the rest."""
    dims = (_dim(s.q.source, 0), _dim(s.k.source, 1), _dim(s.past_k, 2) if s.past_k is not None else 0)
    if any(d is None for d in dims):
        return None
    return ("lengths", s.mask, *dims)


def _lengths(add, const, q: ir.Value, k: ir.Value, past: ir.Value | None) -> tuple[ir.Value, ...]:
    """(seqlens_k = total - 1 for every row [B] int32, total_sequence_length P + S int32 scalar,
    the same int64, S int64 scalar)."""
    def dim(value, axis, shape):
        return add("Gather", [add("Shape", [value]).outputs[0], const(np.array(axis, np.int64) if not shape
                                                                       else np.array([axis], np.int64))],
                   axis=0).outputs[0]

    seq = total = dim(k, 1, False)
    if past is not None:
        total = add("Add", [dim(past, 2, False), seq]).outputs[0]
    total32 = add("Cast", [total], to=ir.DataType.INT32).outputs[0]
    last = add("Sub", [total32, const(np.array(1, np.int32))]).outputs[0]
    return add("Expand", [last, dim(q, 0, True)]).outputs[0], total32, total, seq


def _projection(add, heads: _Heads) -> ir.Value:
    """The [B, S, heads * D] input of the fused node: the projection, rotated in place when
    the 4-D heads were (the contrib op rotates a 3-D input head by head given num_heads)."""
    rotary = heads.rotary
    if not heads.merged:
        moved = add("Transpose", [heads.source], perm=[0, 2, 1, 3]).outputs[0]
        return add("Reshape", [moved, add("Constant", [], value=ir.tensor(np.array([0, 0, -1], np.int64))).outputs[0]]
                   ).outputs[0]
    if rotary is None:
        return heads.source
    inputs = list(rotary.inputs)
    slot = 0  # the rotated tensor is input 0 in both domains
    inputs[slot] = heads.source
    attrs = {k: v for k, v in rotary.attributes.items()}
    attrs["num_heads"] = ir.AttrInt64("num_heads", heads.heads)
    node = add("RotaryEmbedding", inputs, domain=rotary.domain)
    for key, attr in attrs.items():
        node.attributes[key] = attr
    return node.outputs[0]


def _replace(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Readers and graph outputs of ``old`` read ``new``, which takes ``old``'s name, type and
    shape (a graph output keeps its name)."""
    new.dtype, new.shape = old.dtype, old.shape
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    name = old.name
    old.name = None
    new.name = name


def _drop_dead(graph: ir.Graph) -> None:
    """Remove the nodes nothing reads any more (the replaced blocks), so a later round does
    not match their softmax again."""
    for node in reversed(list(graph)):
        if not any(out.uses() or out.is_graph_output() for out in node.outputs):
            graph.remove(node, safe=True)


ORT_GROUP_QUERY_ATTENTION = fusion(
    "ort-group-query-attention", lambda run: [GroupQueryAttention(run)], [(MS, "GroupQueryAttention", 1)],
    "decoder self-attention (KV heads repeated or not, KV cache or not, rotary moved onto the projections) "
    "-> com.microsoft GroupQueryAttention (mask as attention_bias, causal=0)",
    needs=("Softmax",))
