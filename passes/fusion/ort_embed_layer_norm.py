"""Embedding lookups + their sum + LayerNormalization -> ``com.microsoft.EmbedLayerNormalization``.

Math: a transformer's embedding layer is, per batch b and position s,

    x[b, s] = W[ids[b, s]] + P[pos(b, s)] (+ T[seg[b, s]])         (Gathers on axis 0, Adds)
    y[b, s] = LayerNorm(x[b, s]; gamma, beta, eps)                 (over the last axis, H)

which is what ``EmbedLayerNormalization(ids, seg, W, P, T, gamma, beta)`` computes, with
``y`` its first output and ``x`` its third (``embedding_sum``: GPT-2's residual stream
reads the sum as well as its norm). Its position lookup is ``P[s]`` when no position ids
are given, so the position Gather's indices must be the range 0..S-1 (S: the ids'
sequence length): a constant, a ``Slice(arange(N), 0, S)`` of a constant range buffer
(BERT), or ``Range(0, S, 1)`` (GPT-2), with S proven to be the ids' dim 1 (a ``Shape`` /
``Gather(Shape(.), 1)`` of a tensor whose dim 1 is the ids' own). Otherwise position ids
of shape [B|1, S] are passed as the op's ``position_ids`` input (the same lookup). The
two other lookups take [B, S] ids of provably equal shapes; the op adds the same three
rows (in the order word + position + segment: the float sum may differ from the graph's
order by an ulp, far inside the 1e-5 tolerances) and normalises them with the same
formula (the mean, then the mean of squared deviations, in fp32).

The op takes int32 ids: int64 ids go through ``Cast(to=INT32)``, exact on every id the
original accepts, since a Gather accepts only ids in [-N, N) of its table's N rows and
the fusion refuses tables whose N is unknown or above 2^31 - 1. A negative id (a Gather
counts it from the end) makes ORT's kernel fail with "input index out of range": the
result is the original's or an error at run time, never a different number.

Refused: a Gather on another axis or with a table that is not 2-D with static dims and
the same hidden size H, ids that are not 2-D or whose shapes cannot be proven equal, two
lookups of which neither is a proven 0..S-1 range nor usable as position ids, a
LayerNormalization over another axis, with its Mean/InvStdDev outputs read, or whose
gamma/beta are not 1-D of size H, a dtype the target's kernel lacks (ORT's CPU kernel is
float32 only), and (the matcher's rule) an intermediate Add read elsewhere.

For ``ort-cuda`` only: on ORT's CPU provider the fused kernel measured no faster or slower than
the ops it replaces at small and medium sequence lengths (``_CPU_SLOWER`` below; measured with
bench/bench_contrib_ops.py), so ``ort-cpu`` keeps them.
"""

from __future__ import annotations

__all__ = ["ORT_EMBED_LAYER_NORM", "ORT_EMBED_SHAPE"]

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from gcomp.passes.fusion._dims import holds_dim, int_attr, same_dim, shape_range
from gcomp.passes.fusion._engine import FusionRun, RunRule, fusion

_INT32_MAX = 2**31 - 1


def _is_arange(array: np.ndarray) -> bool:
    flat = array.reshape(-1)
    return np.issubdtype(array.dtype, np.integer) and np.array_equal(flat, np.arange(flat.size))


def _is_position_range(run: FusionRun, pids, ids, rows: int) -> bool:
    """``pids`` is provably 0..S-1, shaped [S] or [1, S] (S: the ids' sequence length), or
    the original fails where the op would (``rows``: the position table's)."""
    # (each form below proves the [S] / [1, S] shape itself: inference often leaves it unknown)
    c = run.const(pids)
    if c is not None:
        return (c.ndim in (1, 2) and c.shape[:-1] in ((), (1,)) and isinstance(ids.shape[1], int)
                and c.shape[-1] == ids.shape[1] and _is_arange(c))
    node = pids.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Unsqueeze":  # [S] -> [1, S]
        axes = run.const(node.inputs[1]) if len(node.inputs) > 1 else None
        if axes is None and node.attributes.get("axes") is not None:
            axes = np.array(node.attributes["axes"].as_ints())
        return (axes is not None and axes.reshape(-1).tolist() in ([0], [-2])
                and _is_position_range(run, node.inputs[0], ids, rows))
    if node.op_type == "Range":
        start, delta = run.const(node.inputs[0]), run.const(node.inputs[2])
        return (start is not None and delta is not None and start.size == 1 and delta.size == 1
                and int(start.reshape(())) == 0 and int(delta.reshape(())) == 1 and holds_dim(run, node.inputs[1], ids, 1))
    if node.op_type == "Slice":  # a prefix of a constant range buffer: arange(N)[..., 0:S]
        data = run.const(node.inputs[0])
        if data is None or data.ndim not in (1, 2) or data.shape[:-1] not in ((), (1,)) or not _is_arange(data):
            return False
        inputs = list(node.inputs) + [None] * (5 - len(node.inputs))
        starts = run.const(inputs[1])
        axes = run.const(inputs[3]) if inputs[3] is not None else np.array([0])
        steps = run.const(inputs[4]) if inputs[4] is not None else np.array([1])
        if starts is None or axes is None or steps is None or starts.size != 1 or axes.size != 1 or steps.size != 1:
            return False
        last = int(axes.reshape(())) % data.ndim == data.ndim - 1
        if not (last and int(starts.reshape(())) == 0 and int(steps.reshape(())) == 1):
            return False
        # arange(N)[0:S] is 0..S-1 when S <= N. With N at least the table's rows, S > N means
        # S > rows: the fused kernel fails its range check, and the original fails too (a
        # Gather index out of range, or N > 1 rows that cannot broadcast against S). A
        # buffer of N = 1 would broadcast position 0 over every token: refused.
        return data.shape[-1] >= max(rows, 2) and holds_dim(run, inputs[2], ids, 1)
    return False


class EmbedLayerNorm(RunRule):
    def __init__(self, name: str, run: FusionRun, *, lookups: int, top: str, with_beta: bool, keep_sum: bool):
        super().__init__(name, run)
        self.lookups, self.top, self.with_beta, self.keep_sum = lookups, top, with_beta, keep_sum

    def pattern(self, op, t0, i0, t1, i1, t2, i2, gamma, beta):
        e0 = op.Gather(t0, i0, _outputs=["e0"])
        e1 = op.Gather(t1, i1, _outputs=["e1"])
        add = op.Sum if self.top == "sum" else op.Add
        if self.lookups == 3:
            s = add(op.Add(e0, e1), op.Gather(t2, i2, _outputs=["e2"]), _outputs=["s"])
        else:
            s = add(e0, e1, _outputs=["s"])
        if self.with_beta:
            y = op.LayerNormalization(s, gamma, beta, _outputs=["y"])
        else:
            y = op.LayerNormalization(s, gamma, _outputs=["y"])
        return (y, s) if self.keep_sum else y

    def check(self, context, y, s, gamma, beta=None, **kw):
        result = pattern.MatchResult()
        _, failure = self._roles(y, s, gamma, beta, kw)
        if failure:
            return result.fail(*failure)
        return result

    def _roles(self, y, s, gamma, beta, kw):
        """((word, position, segment | None, position_is_range), None) or (None, (reason, culprit))."""
        ln = y.producer()
        if any(out.uses() or out.is_graph_output() for out in ln.outputs[1:]):
            return None, ("LayerNormalization's mean / inv-std outputs are used", ln)
        if int_attr(ln, "axis", -1) not in (-1, 2):
            return None, ("LayerNormalization is not over the last axis of a rank-3 sum", ln)
        lookups = [(kw[f"e{k}"].producer(), kw[f"t{k}"], kw[f"i{k}"]) for k in range(self.lookups)]
        failure = self._lookups_failure(lookups, s, gamma, beta)
        return (None, failure) if failure else self._assign(lookups, s)

    def _lookups_failure(self, lookups, s, gamma, beta):
        """Why the Gathers, their tables and ids, or gamma/beta cannot go into the op (None: they can)."""
        hidden = None
        dtype = s.dtype
        if dtype is None or dtype.numpy() not in (np.float32, np.float16):
            return "embeddings are not float32/float16", s
        if self.run.target.name == "ort-cpu" and dtype.numpy() != np.float32:
            return "ort-cpu: ORT's EmbedLayerNormalization kernel is float32 only", s
        for node, table, idx in lookups:
            if int_attr(node, "axis", 0) != 0:
                return "a Gather is not over axis 0", node
            shape = table.shape
            if shape is None or shape.rank() != 2 or not all(isinstance(d, int) for d in shape.dims):
                return "an embedding table is not 2-D with static dims", table
            if shape[0] > _INT32_MAX:
                return "an embedding table has more rows than int32 ids can address", table
            if table.dtype != dtype:
                return "an embedding table's dtype differs from the sum's", table
            if hidden is not None and shape[1] != hidden:
                return "the embedding tables' hidden sizes differ", table
            hidden = shape[1]
            if idx.dtype not in (ir.DataType.INT64, ir.DataType.INT32):
                return "ids are not int64/int32", idx
            if idx.shape is None or idx.shape.rank() not in (1, 2):
                return "ids are not 1-D or 2-D", idx
        for name, v in (("gamma", gamma), ("beta", beta)):
            if v is not None and (v.shape is None or list(v.shape.dims) != [hidden] or v.dtype != dtype):
                return f"{name} is not 1-D of the hidden size {hidden}", v
        return None

    def _assign(self, lookups, s):
        """Which lookup is the word, the position, the segment one: the word (and segment) ids
        are [B, S] of equal shapes; the position ids a proven 0..S-1 range, else [B|1, S] ids."""
        ids_like = [k for k, (_, _, idx) in enumerate(lookups) if idx.shape.rank() == 2]
        if not ids_like:
            return None, ("no lookup takes [batch, sequence] ids", s)
        first = lookups[ids_like[0]][2]

        def reference(k):  # the ids a position candidate k is measured against: another lookup's
            return next((lookups[j][2] for j in ids_like if j != k), None)

        position = next((k for k, (_, table, idx) in enumerate(lookups) if reference(k) is not None
                         and _is_position_range(self.run, idx, reference(k), table.shape[0])), None)
        is_range = position is not None
        if position is None:
            # Position ids of [B|1, S] go in as the op's position_ids input (the same lookup).
            candidates = [k for k in ids_like if same_dim(lookups[k][2].shape[1], first.shape[1])
                          and (same_dim(lookups[k][2].shape[0], 1) or same_dim(lookups[k][2].shape[0], first.shape[0]))]
            if len(ids_like) != self.lookups or not candidates:
                return None, ("no lookup is a proven 0..S-1 position range or [B|1, S] position ids", s)
            position = next((k for k in candidates if same_dim(lookups[k][2].shape[0], 1)), candidates[-1])
        others = [k for k in range(self.lookups) if k != position]
        for k in others:
            idx = lookups[k][2]
            if idx.shape.rank() != 2 or not all(
                    same_dim(a, b) for a, b in zip(idx.shape.dims, lookups[others[0]][2].shape.dims)):
                return None, ("the word / segment ids' shapes cannot be proven equal", idx)
        if not is_range:
            pids, ids = lookups[position][2], lookups[others[0]][2]
            if not (same_dim(pids.shape[1], ids.shape[1])
                    and (same_dim(pids.shape[0], 1) or same_dim(pids.shape[0], ids.shape[0]))):
                return None, ("position ids are not [1, S] or [B, S] of the ids' shape", pids)
        word = lookups[others[0]]
        segment = lookups[others[1]] if len(others) > 1 else None
        return (word, lookups[position], segment, is_range), None

    def rewrite(self, op, y, s, gamma, beta=None, **kw):
        (word, position, segment, is_range), _ = self._roles(y, s, gamma, beta, kw)
        ln = y.producer()
        eps = ln.attributes.get("epsilon")
        eps = 1e-5 if eps is None else eps.as_float()
        if beta is None:
            beta = self.run.fresh_initializer(op, np.zeros(gamma.shape[0], dtype=s.dtype.numpy()), "embed_ln_beta")

        def int32(v):
            return v if v.dtype == ir.DataType.INT32 else op.Cast(v, to=ir.DataType.INT32)

        inputs = [int32(word[2]), int32(segment[2]) if segment else None, word[1], position[1],
                  segment[1] if segment else None, gamma, beta]
        if not is_range:
            inputs += [None, int32(position[2])]
        outs = op.EmbedLayerNormalization(*inputs, epsilon=eps, mask_index_type=0, _domain="com.microsoft",
                                          _outputs=3 if self.keep_sum else 1)
        return (outs[0], outs[2]) if self.keep_sum else outs


def _embedding(e) -> bool:
    """``e`` is an embedding lookup the fusion below may take: a Gather on axis 0 whose
    output also feeds an Add/Sum that feeds a LayerNormalization."""
    node = e.producer()
    if node is None or node.op_type != "Gather" or int_attr(node, "axis", 0) != 0:
        return False
    return any(u.node.op_type in ("Add", "Sum")
               and any(v.node.op_type in ("LayerNormalization", "Add") for out in u.node.outputs for v in out.uses())
               for u in e.uses())


class ShapeOfLookup(RunRule):
    """Dims of an embedding lookup read from its ids instead (GPT-2 takes the position
    range's length from ``Shape(wte(ids))``, which keeps the lookup alive after fusion).

    Math: ``Gather(T, ids, axis=0)`` has shape ``ids.shape + T.shape[1:]``, so its dim k is
    the ids' dim k for k < rank(ids): ``Gather(Shape(e), k) = Gather(Shape(ids), k)`` and
    ``Shape(e, start, end) = Shape(ids, start, end)`` for a range inside the ids' dims.
    The Shape may have other readers: the rewrite leaves it for them (``remove_nodes=False``).
    """

    def __init__(self, name: str, run: FusionRun, *, gathered: bool):
        super().__init__(name, run, remove_nodes=False)
        self.gathered = gathered

    def pattern(self, op, e, k):
        if self.gathered:
            return op.Gather(op.Shape(e, _outputs=["shape"]), k, _outputs=["out"])
        return op.Shape(e, _outputs=["out"])

    def _ids_range(self, e, out, k=None):
        """(ids, start, end) of the ids' Shape that equals ``out``, or None."""
        if not _embedding(e):
            return None
        ids = e.producer().inputs[1]
        if ids.shape is None or ids.shape.rank() is None:
            return None
        rank = ids.shape.rank()
        if self.gathered:
            shape_node = out.producer().inputs[0].producer()
            if shape_node.attributes.get("start") is not None or shape_node.attributes.get("end") is not None:
                return None
            index = self.run.const(k)
            if int_attr(out.producer(), "axis", 0) != 0 or index is None or index.size != 1:
                return None
            dim = int(index.reshape(()))
            dim = dim + rank + 1 if dim < 0 else dim  # e has rank(ids) + 1 dims (a 2-D table)
            return (ids, dim, dim + 1) if 0 <= dim < rank else None
        node = out.producer()
        if node.attributes.get("start") is None and node.attributes.get("end") is None:
            return None  # the whole shape: not only the ids' dims
        start, end = shape_range(node, rank + 1)  # e has rank(ids) + 1 dims
        return (ids, start, end) if 0 <= start < end <= rank else None

    def check(self, context, e, out, k=None, **_):
        result = pattern.MatchResult()
        table = e.producer().inputs[0] if e.producer() is not None else None
        if table is None or table.shape is None or table.shape.rank() != 2:
            return result.fail("not a lookup in a 2-D table", e)
        if self._ids_range(e, out, k) is None:
            return result.fail("not an embedding lookup's dims inside its ids' dims", out)
        return result

    def rewrite(self, op, e, out, k=None, **_):
        ids, start, end = self._ids_range(e, out, k)
        if self.gathered:
            scalar = self.run.const(k).ndim == 0
            index = op.Constant(value=ir.tensor(np.array(start if scalar else [start], dtype=np.int64)))
            return op.Gather(op.Shape(ids), index, axis=0)
        return op.Shape(ids, start=start, end=end)


def _rules(run: FusionRun, keep_sum: bool) -> list:
    tag = "-sum" if keep_sum else ""
    return [
        rule
        for lookups in (3, 2)
        for top in ("add", "sum")  # Sum: the residual-sum rewrite of an Add before a LayerNormalization
        for with_beta in (True, False)
        for rule in EmbedLayerNorm.rule(f"embed-layer-norm{tag}-{lookups}-{top}{'' if with_beta else '-nobeta'}",
                                        run, lookups=lookups, top=top, with_beta=with_beta, keep_sum=keep_sum).commute()
    ]


# Measured with bench/bench_contrib_ops.py embed (fresh process, ORT_ENABLE_ALL, 2 threads,
# 1200 runs in interleaved blocks, onnxruntime 1.31; docs/measurements.md): ORT's CPU kernel is slower than
# the lookups + Adds + LayerNormalization it replaces at the sizes the bench runs.
_CPU_SLOWER = ("ORT's CPU EmbedLayerNormalization measured no faster or slower than Gathers + Adds + "
               "LayerNormalization (median, onnxruntime 1.31, 2 threads: [2,16,256] BERT-style 22-24 vs 22-25 us, "
               "GPT-2-style 22-24 vs 18-22 us; [2,64,256] 62-63 vs 51-54 us and 63 vs 44 us; faster only at "
               "[2,128,256] BERT-style: 115-117 vs 132-142 us)")
ORT_EMBED_SHAPE = fusion(
    "ort-embed-shape",
    lambda run: [ShapeOfLookup.rule("embed-shape-gather", run, gathered=True),
                 ShapeOfLookup.rule("embed-shape-slice", run, gathered=False)],
    [("com.microsoft", "EmbedLayerNormalization", 1)],
    "dims of an embedding lookup read from its ids (so the EmbedLayerNormalization fusion can take the lookup)",
    needs=("LayerNormalization",), not_for=[("ort-cpu", _CPU_SLOWER)])
# The sum read only by the norm first (one output); then the sum read elsewhere too (GPT-2's
# residual stream), which takes the op's embedding_sum output.
ORT_EMBED_LAYER_NORM = fusion(
    "ort-embed-layer-norm", lambda run: _rules(run, False) + _rules(run, True),
    [("com.microsoft", "EmbedLayerNormalization", 1)],
    "word/position(/segment) Gathers + Adds + LayerNormalization -> com.microsoft EmbedLayerNormalization",
    needs=("LayerNormalization",), not_for=[("ort-cpu", _CPU_SLOWER)])
