"""What an attention mask is computed from, and whether it is a decoder's causal + padding mask.

Exporters build the additive mask ``M`` of attention (``softmax(scores + M)``) from the
``[B, T]`` ``attention_mask`` input in many ways (transformers 5 gathers the flattened mask
at computed indices and ANDs it with index comparisons; the TorchScript and dynamo
exporters write that out differently again), so its form is not pattern-matched. Two
steps prove what it is instead:

- :func:`mask_source`: ``M``'s *values* depend on one rank-2 graph input ``m`` only; other
  inputs reach it through their shapes alone (a walk that follows data, and behind a
  ``Shape``/``Size`` only the inputs that set an output shape by their values).
- :func:`causal_padding`: ``M`` is evaluated on probes and must equal, on every query row
  with at least one key to attend, ``0`` where ``j <= P + i and m[b, j] != 0`` and one
  constant ``<= -1e4`` elsewhere (P the past length, i the query, j the key). Rows with no
  key to attend (the pad positions of a left-padded prompt) are not judged: every kernel
  returns garbage there. The probes run the subgraph that makes ``M`` alone, with zeros for
  the inputs read only through their shapes, at batch 1 to 3, past lengths 0 to 5000 and
  1 to 5 new tokens, with the mask all ones, left-padded, right-padded and random: a
  sliding window shorter than 5000 positions, a mask that mixes batch rows or that reads a
  position's value other than 0 / 1 through the causal part would show. A mask longer than
  past + new tokens is probed too (:func:`_longer_mask`). What is proven is the mask of 0 /
  1 values ``attention_mask`` holds: the fused graph reads any nonzero value as "attend",
  where an export might read ``m == 1`` (a value of 2 is outside the proof).

Used by ``quantize-dynamic`` (a key-padding mask becomes QAttention's ``mask_index``) and by
``ort-group-query-attention`` (a causal + padding mask is built afresh in a few nodes, in
place of the export's builder).
"""

from __future__ import annotations

__all__ = ["MAX_ANCESTORS", "MIN_FILL", "causal_padding", "mask_source"]

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from gcomp.errors import GcompError
from gcomp.passes.scopes import listed_are_constant
from gcomp.registry import Runtime

MAX_ANCESTORS = 5000  # nodes walked back from a mask before giving up
MIN_FILL = -1e4  # the weakest "masked" value accepted: exp(-1e4 + any real score) is 0 in float32
_ORT_DOMAIN = "com.microsoft"

# Inputs whose *values* set an op's output shape (the rest set it through their shapes only,
# or not at all); ops whose output shape depends on their inputs' values in any slot.
_SHAPE_BY_VALUE = {"Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4), "ConstantOfShape": (0,),
                   "Range": (0, 1, 2), "Pad": (1, 2), "OneHot": (1,), "Resize": (1, 2, 3), "Upsample": (1,),
                   "TopK": (1,), "Squeeze": (1,), "Unsqueeze": (1,), "Split": (1,), "ReduceSum": (1,),
                   "ReduceMean": (1,), "ReduceMax": (1,), "ReduceMin": (1,), "ReduceProd": (1,), "CenterCropPad": (1,),
                   "ReduceL1": (1,), "ReduceL2": (1,), "ReduceLogSum": (1,), "ReduceLogSumExp": (1,),
                   "ReduceSumSquare": (1,), "Col2Im": (1, 2), "DFT": (1, 2), "STFT": (1, 3), "AffineGrid": (1,),
                   "HannWindow": (0,), "HammingWindow": (0,), "BlackmanWindow": (0,), "MelWeightMatrix": (0, 1)}
_SHAPE_FROM_DATA = frozenset({"NonZero", "Compress", "Unique", "StringSplit", "RegexFullMatch", "NonMaxSuppression"})
# com.microsoft ops (gcomp's own fusions among them) whose output shapes follow from their
# inputs' shapes alone; any other non-standard op makes every input's values matter.
_ORT_SHAPE_FROM_SHAPES = frozenset({
    "Attention", "MultiHeadAttention", "BiasGelu", "FastGelu", "Gelu", "QuickGelu", "BiasAdd",
    "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "EmbedLayerNormalization", "FusedMatMul",
    "FusedConv", "FusedGemm", "DynamicQuantizeMatMul", "MatMulNBits", "MatMulIntegerToFloat", "QAttention",
    "GroupQueryAttention", "RotaryEmbedding", "SkipSimplifiedLayerNormalization"})


def mask_source(model: ir.Model, bias: ir.Value) -> ir.Value | str:
    """The one rank-2 graph input of ``model`` whose values ``bias`` depends on, or why there
    is none. A graph input with an initializer default counts as an input (a caller may
    override it), except in IR < 4, where every initializer is listed and none can be fed.

    The walk follows values (data) and, behind a Shape or Size, shapes: a shape depends on a
    graph input's values only through the inputs that set an output shape by their values
    (a Reshape's target, a Range's bounds, ...) or through ops whose output shape is data
    (NonZero, ...). Control flow (If/Loop/Scan, whose bodies read outer values that are not
    node inputs) is refused."""
    graph = model.graph
    defaults_are_constant = listed_are_constant(model)
    inputs = {id(v) for v in graph.inputs}
    reached: dict[int, ir.Value] = {}
    seen: set[tuple[int, bool]] = set()
    stack = [(bias, True)]  # (value, its values matter; else only its shape)
    while stack:
        value, data = stack.pop()
        if (id(value), data) in seen:
            continue
        seen.add((id(value), data))
        if len(seen) > MAX_ANCESTORS:
            return f"its attention_bias has more than {MAX_ANCESTORS} ancestors"
        if id(value) in inputs:
            if data and (value.const_value is None or not defaults_are_constant):
                reached[id(value)] = value
            continue
        producer = value.producer()
        if producer is None:
            continue  # an initializer
        if producer.graph is not graph:
            return "its attention_bias is made in a subgraph"
        if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in producer.attributes.values()):
            return f"its attention_bias depends on control flow ({producer.op_type} '{producer.name}')"
        standard = producer.domain in ("", "ai.onnx") or (
            producer.domain == _ORT_DOMAIN and producer.op_type in _ORT_SHAPE_FROM_SHAPES)
        if standard and producer.op_type in ("Shape", "Size"):
            stack.extend((v, False) for v in producer.inputs if v is not None)
            continue
        by_value = () if data else _SHAPE_BY_VALUE.get(producer.op_type, ()) if standard else None
        for i, v in enumerate(producer.inputs):
            if v is not None:
                # a shape from data (or an op gcomp does not know) makes every input's values matter
                matters = data or by_value is None or producer.op_type in _SHAPE_FROM_DATA or i in by_value
                stack.append((v, matters))
    if len(reached) != 1:
        names = ", ".join(sorted(v.name for v in reached.values())) or "none"
        return f"its attention_bias is not computed from one mask input (it reads {names})"
    m = next(iter(reached.values()))
    if m.shape is None or m.shape.rank() != 2:
        return f"its attention_bias comes from '{m.name}', which is not a rank-2 [batch, length] mask"
    if m.dtype not in (ir.DataType.INT64, ir.DataType.INT32, ir.DataType.BOOL, ir.DataType.FLOAT):
        return f"its attention_bias comes from '{m.name}' of type {m.dtype}, not an int/bool/float mask"
    return m


# (batch, past length, new tokens) of the probes; past 5000 puts a sliding window in sight.
_PROBE_SHAPES = ((1, 0, 5), (2, 0, 4), (3, 2, 1), (2, 3, 3), (1, 37, 1), (2, 5000, 2))
_PROBE_SHAPES_NO_CACHE = ((1, 0, 5), (2, 0, 4), (3, 0, 7))


@dataclass(frozen=True)
class Dims:
    """The symbolic dims that size a decoder's attention: ``batch`` and ``total`` (the mask's
    two axes), ``seq`` (new tokens), ``past`` (cached positions; None without a cache)."""

    batch: str | int
    total: str
    seq: str
    past: str | None


def causal_padding(model: ir.Model, bias: ir.Value, m: ir.Value, dims: Dims, runtime: Runtime | None) -> str | None:
    """None when ``bias`` (computed from ``m`` alone: :func:`mask_source`) is the causal +
    padding mask of ``m`` on every probe (module docstring), else why not."""
    if runtime is None:
        return "no runtime to probe the mask on (run the pass through gcomp.optimize)"
    lengths = [dims.total, dims.seq] + ([dims.past] if dims.past else [])
    if len(set(lengths)) != len(lengths) and not (dims.past is None and dims.total == dims.seq):
        return "the mask's length, the new tokens and the past length are not distinct symbolic dims"
    try:
        sub = _making(model, bias)
    except ValueError as e:
        return str(e)
    rng = np.random.default_rng(0)
    for batch, past, seq in (_PROBE_SHAPES if dims.past else _PROBE_SHAPES_NO_CACHE):
        if isinstance(dims.batch, int):
            batch = dims.batch
        sizes = {dims.batch: batch, dims.seq: seq, dims.total: past + seq}
        if dims.past:
            sizes[dims.past] = past
        for k in range(4):
            keep = _probe_mask(k, batch, past + seq, rng)
            try:
                feeds = _feeds(sub, m.name, keep, sizes)
                out = np.asarray(runtime.run(sub, feeds)[bias.name])
            except (GcompError, ValueError) as e:
                return f"its mask could not be probed ({str(e).splitlines()[0]})"
            why = _judge(out, keep, past, seq)
            if why:
                return f"{why} (probe: batch {batch}, past {past}, {seq} new token(s))"
    return _longer_mask(sub, bias, m, dims, runtime, rng)


def _longer_mask(sub: ir.Model, bias: ir.Value, m: ir.Value, dims: Dims, runtime: Runtime, rng) -> str | None:
    """A mask longer than the keys (past + new tokens): where the model makes a bias as long as
    the keys from it, that bias must be the one of the mask's first positions (transformers
    exports slice ``attention_mask[:, :keys]``), which is what the fused graph computes. A
    bias as long as the mask cannot be added to the scores: the model refuses such a mask."""
    batch, past, seq, extra = 2, 3 if dims.past else 0, 2, 3
    if isinstance(dims.batch, int):
        batch = dims.batch
    sizes = {dims.batch: batch, dims.seq: seq, dims.total: past + seq + extra}
    if dims.past:
        sizes[dims.past] = past
    keep = _probe_mask(3, batch, past + seq + extra, rng)
    try:
        out = np.asarray(runtime.run(sub, _feeds(sub, m.name, keep, sizes))[bias.name])
    except (GcompError, ValueError):
        return None  # the model refuses a longer mask; the fused graph may take it
    if out.ndim != 4 or out.shape[-1] != past + seq:
        return None
    why = _judge(out, keep[:, : past + seq], past, seq)
    return f"{why}, of a mask longer than the keys (its first positions)" if why else None


def _making(model: ir.Model, value: ir.Value) -> ir.Model:
    """A copy of ``model`` that computes ``value`` alone, from the inputs it reads."""
    if not value.name:
        raise ValueError("the mask has no name to probe it by")
    copy = model.clone()
    target = next((v for node in copy.graph for v in node.outputs if v.name == value.name), None)
    if target is None:
        raise ValueError("the mask is not made by a node of the main graph")
    copy.graph.outputs.clear()
    copy.graph.outputs.append(target)
    ir.passes.common.RemoveUnusedNodesPass()(copy)
    for v in [v for v in copy.graph.inputs if not v.uses() and v.const_value is None]:
        copy.graph.inputs.remove(v)
    return copy


def _feeds(sub: ir.Model, mask_name: str, keep: np.ndarray, sizes: dict) -> dict[str, np.ndarray]:
    """Zeros for every input of ``sub`` but the mask (read for their shapes only), at ``sizes``."""
    feeds = {}
    for v in sub.graph.inputs:
        if v.const_value is not None:
            continue
        if v.shape is None or v.dtype is None:
            raise ValueError(f"input '{v.name}' has no declared shape")
        shape = []
        for d in v.shape:
            key = d if isinstance(d, int) else (d.value if isinstance(d, ir.SymbolicDim) else None)
            if isinstance(key, int):
                shape.append(key)
            elif key in sizes:
                shape.append(sizes[key])
            else:
                raise ValueError(f"input '{v.name}' has a dim ({key}) the probes cannot size")
        dtype = v.dtype.numpy()
        feeds[v.name] = keep.astype(dtype) if v.name == mask_name else np.zeros(shape, dtype)
        if v.name == mask_name and tuple(shape) != keep.shape:
            raise ValueError(f"the mask '{v.name}' is declared {shape}, not [batch, total]")
    return feeds


def _probe_mask(k: int, batch: int, total: int, rng) -> np.ndarray:
    """Probe ``k``: 0 all ones, 1 left padding, 2 right padding (row 0 unpadded, the others by
    growing amounts), 3 random with the last position of each row kept."""
    keep = np.ones((batch, total), bool)
    for b in range(1, batch) if k in (1, 2) else ():
        n = min(total - 1, b * max(1, total // 4))
        if k == 1:
            keep[b, :n] = False
        else:
            keep[b, total - n:] = False
    if k == 1 and batch == 1 and total > 1:
        keep[0, : total // 2] = False
    if k == 3:
        keep = rng.random((batch, total)) < 0.6
        keep[:, -1] = True
    return keep


def _judge(bias: np.ndarray, keep: np.ndarray, past: int, seq: int) -> str | None:
    batch, total = keep.shape
    if bias.ndim != 4 or bias.dtype.kind != "f":
        return f"the mask is {bias.dtype} of rank {bias.ndim}, not a float [batch, heads, query, key] tensor"
    try:
        full = np.broadcast_to(bias, (batch, bias.shape[1], seq, total))
    except ValueError:
        return f"the mask's shape {list(bias.shape)} does not broadcast to [{batch}, heads, {seq}, {total}]"
    attend = (np.arange(total)[None, :] <= past + np.arange(seq)[:, None])[None] & keep[:, None, :]  # [B, S, T]
    rows = attend.any(-1)  # query rows with a key to attend
    for h in range(full.shape[1]):
        per_head = full[:, h]
        if not np.all(per_head[attend] == 0):
            return "the mask is not 0 wherever a key is before the query and unpadded"
        masked = per_head[rows[..., None] & ~attend]
        if masked.size and not np.all(masked <= MIN_FILL):
            return (f"the mask is not {MIN_FILL:g} or below wherever a key is after the query or padded "
                    "(a window, or another positional mask)")
    return None
