"""``com.microsoft.Attention`` in ``quantize-dynamic``: its packed Q/K/V projection quantized as a unit.

ONNX Runtime's ``Attention(X, W, b, mask_index?, past?, attention_bias?)`` projects
``X [B, S, K]`` by ``W [K, 3H]`` (+ ``b``) into Q, K and V and runs the attention core. Its
quantized twin ``QAttention(Xq, Wq, b, a, s, mask_index?, z, wz)`` takes the uint8
activation of ``DynamicQuantizeLinear(X) -> (Xq, a, z)`` and the int8 weight with one scale
per column (``s [3H]``): the same math as ``DynamicQuantizeMatMul`` (see
:mod:`.dynamic`), with the attention core in float. On MiniLM at 1x128 it is what takes
int8-dynamic from about 2.0x to about 2.6x fp32 (the projection and core in one kernel; the
activation quantized once, not three times; bench/QUANT.md).

QAttention has no ``attention_bias`` input: a mask reaches it only as ``mask_index``. gcomp's
attention fusion passes the exporter's additive mask ``M [B, 1, S|1, T]`` as
``attention_bias``; a key-padding mask is ``M[b, :, :, t] = 0`` where the ``[B, T]`` mask
``m`` input is 1 and ``c`` (a large negative constant) where it is 0, which is exactly
``mask_index = Cast(m, int32)`` with ``mask_filter_value = c`` (ONNX Runtime adds
``mask_filter_value`` where ``mask_index`` is 0). Exporters build ``M`` in many ways
(transformers 5 gathers the flattened mask at computed indices and ANDs it with index
comparisons), so the form is not pattern-matched: :func:`plan_masks` requires that ``M``'s
values depend on one rank-2 graph input ``m`` only (other inputs only through their shapes),
then runs the float model with ``M`` exposed on the calibration samples with probe masks in
``m`` (all ones, left and right padding, random 0/1 with one random position of each row
kept) and accepts when every probe gives exactly ``M = where(m != 0, 0, c)`` broadcast,
with one ``c <= -1e4`` (which becomes ``mask_filter_value``; under ``unidirectional`` the
causal fill takes it too, equal after softmax unless a whole row is masked). Limits of the
proof: shapes and batch are those of the samples (a mask that depends on position only
beyond their length, or mixes rows of a batch larger than theirs, would not be seen), and
masks are probed with 0 and 1 only (QAttention keeps a position whose mask value is > 0;
masks holding other values mean something else to the exporter's arithmetic). The
verification of the quantized model runs at the same shapes.

An Attention whose mask is not such a key-padding mask keeps its mask exactly: its
projection becomes ``DynamicQuantizeMatMul`` (with the bias), ``Split`` into Q, K, V and
``com.microsoft.MultiHeadAttention(Q, K, V, attention_bias=M)`` (about 2.1x on MiniLM).

Refused (the node stays float, with the reason): weights that are not a constant 2-D float32
``[K, 3H]``, a float activation that is not float32, a past state or present output (KV
cache), rotary or shared-buffer attributes, unequal ``qkv_hidden_sizes``, and both a
``mask_index`` and an ``attention_bias``.
"""

from __future__ import annotations

__all__ = ["ATTENTION", "MaskPlan", "attention_candidates", "drop_dead", "plan_masks", "quantized_attention"]

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from gcomp.errors import GcompError
from gcomp.passes.quant._calibration import exposed_runs, samples_for
from gcomp.passes.masks import mask_source
from gcomp.passes.opsets import model_opset
from gcomp.passes.quant._common import ORT_DOMAIN, Candidate, Workspace, node_label, read_const
from gcomp.registry import PassContext

ATTENTION = "Attention"
MASK, PAST, BIAS, PAST_LENGTH = 3, 4, 5, 6  # com.microsoft.Attention's input slots
MIN_FILTER = -1e4  # ONNX Runtime's default mask_filter_value; a weaker mask is not a padding mask
PROBES = 3  # random masks per sample shape
_UNSUPPORTED = ("do_rotary", "past_present_share_buffer", "rotary_embedding_dim")
_COPIED = ("num_heads", "scale", "unidirectional", "mask_filter_value")


def attention_candidates(graph: ir.Graph) -> list[Candidate]:
    """The main graph's ``com.microsoft.Attention`` nodes, each with its activation, constant
    weight and bias, or the reason it cannot be quantized."""
    found = []
    for index, node in enumerate(graph):
        if node.domain != ORT_DOMAIN or node.op_type != ATTENTION:
            continue
        c = Candidate(node, node_label(node, index), ATTENTION, activation=node.inputs[0],
                      weight=read_const(_input(node, 1)), bias=_input(node, 2))
        c.reason = _refusal(c)
        found.append(c)
    return found


def _input(node: ir.Node, slot: int) -> ir.Value | None:
    return node.inputs[slot] if len(node.inputs) > slot else None


def _refusal(c: Candidate) -> str | None:
    node = c.node
    if c.weight is None:
        return "the packed Q/K/V weights are not a constant"
    if c.weight.array.ndim != 2 or c.weight.array.dtype != np.float32:
        return f"the weights are {c.weight.array.ndim}-D {c.weight.array.dtype}, not a 2-D float32 [K, 3H] matrix"
    if c.activation is None or c.activation.dtype not in (None, ir.DataType.FLOAT):
        return "the activation is not float32"
    if _input(node, PAST) is not None or _input(node, PAST_LENGTH) is not None or \
            any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return "it has a past state or present output (a KV cache); QAttention here takes none"
    for name in _UNSUPPORTED:
        attr = node.attributes.get(name)
        if attr is not None and attr.value:
            return f"attribute {name}={attr.value} has no QAttention equivalent"
    sizes = node.attributes.get("qkv_hidden_sizes")
    if sizes is not None and len(set(sizes.value)) > 1:
        return f"qkv_hidden_sizes {list(sizes.value)} are unequal (QAttention splits the projection in thirds)"
    if c.weight.array.shape[1] % 3:
        return f"the weights have {c.weight.array.shape[1]} columns, not 3 equal parts"
    if _input(node, MASK) is not None and _input(node, BIAS) is not None:
        return "it has both a mask_index and an attention_bias"
    if _input(node, MASK) is not None and _input(node, MASK).dtype not in (None, ir.DataType.INT32):
        return "its mask_index is not int32"
    return None


@dataclass
class MaskPlan:
    """How one Attention's mask reaches the quantized node: ``mask`` (a rank-2 graph input
    read as ``mask_index``) with ``filter`` as ``mask_filter_value``; or ``mask`` None and
    ``reason`` why the additive mask stays (the MultiHeadAttention form)."""

    mask: ir.Value | None = None
    filter: float | None = None
    reason: str | None = None

    def describe(self) -> str:
        if self.mask is None:
            return f"DynamicQuantizeMatMul + MultiHeadAttention: its attention_bias stays ({self.reason})"
        return f"QAttention (mask_index from '{self.mask.name}', mask_filter_value {self.filter:g})"


def plan_masks(model: ir.Model, todo: Sequence[Candidate], context: PassContext | None) -> dict[str, MaskPlan]:
    """A :class:`MaskPlan` for each Attention of ``todo`` reading an ``attention_bias`` (module
    docstring); one probe run of the float model per random mask and sample."""
    biased = [c for c in todo if c.op_type == ATTENTION and _input(c.node, BIAS) is not None]
    plans: dict[str, MaskPlan] = {}
    sources: dict[str, ir.Value] = {}
    for c in biased:
        source = mask_source(model, _input(c.node, BIAS))
        if isinstance(source, str):
            plans[c.name] = MaskPlan(reason=source)
        else:
            sources[c.name] = source
    if not sources:
        return plans
    samples, why = samples_for(model, context)
    if not samples:
        plans.update({name: MaskPlan(reason=f"its mask could not be probed: {why}") for name in sources})
        return plans
    probes = _probes(samples, {s.name for s in sources.values()})
    names = sorted({_input(c.node, BIAS).name for c in biased if c.name in sources})
    try:
        runs = list(exposed_runs(model, context.runtime, [feeds for feeds, _ in probes], names))
    except GcompError as e:
        reason = f"its mask could not be probed ({str(e).splitlines()[0]})"
        plans.update({name: MaskPlan(reason=reason) for name in sources})
        return plans
    for c in biased:
        if c.name in sources:
            bias, m = _input(c.node, BIAS), sources[c.name]
            plans[c.name] = _judge([(run[bias.name], feeds[m.name]) for run, (feeds, _) in zip(runs, probes)], m)
    return plans


def _probes(samples, masks: set[str]) -> list[tuple[dict[str, np.ndarray], None]]:
    """Each sample (up to two) with each mask input replaced by: all ones, left padding,
    right padding, and random 0/1 masks (seeded; one random position of each row kept)."""
    rng = np.random.default_rng(0)
    probes = []
    for sample in list(samples)[:2]:
        for k in range(PROBES + 3):
            feeds = dict(sample)
            for name in masks:
                shape, dtype = np.shape(sample[name]), np.asarray(sample[name]).dtype
                bits = _probe_bits(k, shape, rng)
                feeds[name] = bits.astype(dtype)
            probes.append((feeds, None))
    return probes


def _probe_bits(k: int, shape: tuple[int, ...], rng) -> np.ndarray:
    """Probe ``k``'s mask: 0 all ones, 1 the first half of each row masked, 2 the second
    half, then random with one random position of each row kept."""
    length = shape[-1]
    bits = np.ones(shape, bool)
    if k == 1:
        bits[..., : length // 2] = False
    elif k == 2:
        bits[..., (length + 1) // 2:] = False
    elif k > 2:
        bits = rng.random(shape) < 0.6
        keep = rng.integers(0, length, size=shape[:-1])
        np.put_along_axis(bits, keep[..., None], True, axis=-1)
    return bits


def _judge(pairs: list[tuple[np.ndarray, np.ndarray]], m: ir.Value) -> MaskPlan:
    """Accept ``m`` when every probe's bias is exactly ``where(m != 0, 0, c)`` broadcast."""
    fill = None
    for bias, mask in pairs:
        bias, keep = np.asarray(bias), np.asarray(mask) != 0
        b, t = keep.shape
        if bias.dtype != np.float32 or bias.ndim != 4 or bias.shape[-1] != t or bias.shape[0] not in (1, b) or \
                (bias.shape[0] == 1 and b != 1):
            return MaskPlan(reason=f"its attention_bias of shape {list(bias.shape)} is not a [batch, 1, query|1, "
                                   f"length] mask of '{m.name}' {list(keep.shape)}")
        masked = bias[np.broadcast_to(~keep[:, None, None, :], bias.shape)]
        if masked.size:
            value = float(masked.flat[0])
            fill = value if fill is None else fill
            if value != fill or not np.all(masked == fill) or fill > MIN_FILTER:
                return MaskPlan(reason=f"its attention_bias is not one large negative constant ({MIN_FILTER:g} or "
                                       f"below) where '{m.name}' is 0")
        if not np.all(bias[np.broadcast_to(keep[:, None, None, :], bias.shape)] == 0):
            return MaskPlan(reason=f"its attention_bias is not 0 wherever '{m.name}' is 1 (a causal or other "
                                   "positional mask)")
    if fill is None:
        return MaskPlan(reason="no probe masked a position")
    return MaskPlan(mask=m, filter=fill)


def quantized_attention(ws: Workspace, c: Candidate, arrays: list[ir.Value], plan: MaskPlan | None,
                        masks: dict[str, ir.Value]) -> None:
    """Replace the Attention ``c`` (reading ``c.activation``, perhaps smoothed) by
    QAttention, or by DynamicQuantizeMatMul + Split + MultiHeadAttention when its additive
    mask stays (``plan.mask`` None). ``arrays``: the int8 weight, its scales and zero points;
    ``masks``: int32 casts already made, by mask input name (shared by all layers)."""
    node, (wq, scale, zero) = c.node, arrays
    attributes = {k: node.attributes[k].value for k in _COPIED if k in node.attributes}
    bias = c.bias if c.bias is not None else ws.initializers(
        ("zero-bias", c.kn[1]), lambda: [(f"{c.name}_bias", np.zeros(c.kn[1], np.float32))])[0]
    if plan is not None and plan.mask is None:
        ws.replace(node, _with_mha(ws, c, wq, scale, zero, bias, attributes))
        return
    mask = _input(node, MASK)
    if plan is not None:
        mask = masks.get(plan.mask.name)
        if mask is None:
            cast = ws.node("Cast", [plan.mask], ws.fresh(f"{plan.mask.name}/mask_index"),
                           attributes={"to": ir.DataType.INT32})
            ws.graph.insert_before(ws.graph.node(0), [cast])
            mask = masks[plan.mask.name] = cast.outputs[0]
        attributes["mask_filter_value"] = plan.filter
    quant = ws.node("DynamicQuantizeLinear", [c.activation], ws.fresh(f"{c.name}/DynamicQuantizeLinear"), outputs=3)
    xq, a, z = quant.outputs
    op = ws.node("QAttention", [xq, wq, bias, a, scale, mask, z, zero], c.name, domain=ORT_DOMAIN,
                 attributes=attributes)
    ws.replace(node, [quant, op])


def _with_mha(ws, c, wq, scale, zero, bias, attributes) -> list[ir.Node]:
    """DynamicQuantizeMatMul (projection and bias) -> Split in thirds -> MultiHeadAttention."""
    third = c.kn[1] // 3
    proj = ws.node("DynamicQuantizeMatMul", [c.activation, wq, scale, zero, bias], ws.fresh(f"{c.name}/qkv"),
                   domain=ORT_DOMAIN)
    if model_opset(ws.model) < 13:  # sizes are an attribute before opset 13, an input from it
        split = ws.node("Split", [proj.outputs[0]], ws.fresh(f"{c.name}/split"),
                        attributes={"axis": -1, "split": [third] * 3}, outputs=3)
    else:
        sizes = ws.initializers(("split", third), lambda: [(f"{c.name}_qkv_sizes", np.full(3, third, np.int64))])[0]
        split = ws.node("Split", [proj.outputs[0], sizes], ws.fresh(f"{c.name}/split"), attributes={"axis": -1},
                        outputs=3)
    mha = ws.node("MultiHeadAttention", [*split.outputs, None, None, _input(c.node, BIAS)], c.name,
                  domain=ORT_DOMAIN, attributes=attributes)
    return [proj, split, mha]


def drop_dead(graph: ir.Graph, values: Sequence[ir.Value]) -> None:
    """Remove the main-graph nodes that made ``values`` and now feed nothing (the additive
    masks QAttention no longer reads), walking up while their producers feed nothing."""
    stack = list(values)
    while stack:
        value = stack.pop()
        producer = value.producer()
        if producer is None:
            if not value.uses() and not value.is_graph_input() and not value.is_graph_output() and \
                    graph.initializers.get(value.name) is value:
                graph.initializers.pop(value.name)
            continue
        if producer.graph is not graph or any(o.uses() or o.is_graph_output() for o in producer.outputs):
            continue
        inputs = [v for v in producer.inputs if v is not None]
        graph.remove(producer, safe=True)
        stack.extend(inputs)
