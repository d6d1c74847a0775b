"""Floating-point operations and bytes moved per node, computed from tensor shapes.

Two entry points:

- :func:`op_cost` prices one operation from its op type, its input and output shapes
  and dtypes (and a few attributes when they are known). It needs no attributes for the
  heavy ops (Conv's group and kernel come from the weight's shape, Gemm's transposes from
  the output's), so it also prices nodes a runtime created itself (ONNX Runtime's
  ``FusedConv``, NCHWc ``Conv``, ``SkipLayerNormalization``, ...) from the shapes its trace
  reports.
- :func:`graph_costs` prices every node of a model's main graph for concrete input
  shapes, using ONNX shape inference on the weightless model (weights are never
  serialized), completed by ONNX Runtime's symbolic shape inference where ONNX's loses dims.

Conventions (what the numbers mean):

- ``flops`` counts a multiply-accumulate as 2 FLOPs (a multiply and an add), the
  convention of rooflines and of hardware peaks. Papers often quote multiply-accumulates
  as "FLOPs": ResNet-18's "1.82 GFLOPs" at 224x224 is 1.82 G multiply-accumulates, 3.64 G
  FLOPs here; ``macs`` holds the former.
- Convolution and matrix products: ``2 * MACs``, plus one add per output element for a
  bias. ``ConvTranspose`` scatters every input element to ``C_out/group * prod(kernel)``
  outputs.
- Attention: both products (``Q K^T`` and ``P V``) plus 5 FLOPs per score for the
  softmax (max, subtract, exp, sum, divide); ONNX Runtime's ``com.microsoft.Attention``
  also includes its packed QKV projection.
- Normalizations per element: LayerNormalization and its variants 8, RMSNormalization
  6, BatchNormalization 2 (inference: one scale and one shift), Instance/Group norm 8;
  softmax-like 5; Gelu/Erf and other transcendental activations a fixed small count
  (see ``_PER_ELEMENT``); plain elementwise arithmetic 1 per output element.
- Reductions: one FLOP per input element; pooling: one per window element per output
  (one per input element when the window is unknown).
- Data movement (Reshape, Transpose, Gather, Concat, Slice, Cast, ...): 0 FLOPs.
- ``bytes`` is every input read once plus every output written once (weights included):
  the ideal traffic of an op with perfect caching, the x-axis of a roofline.
- An op type not listed gets ``flops=None`` (unknown, not zero); its bytes still count.
"""

from __future__ import annotations

__all__ = [
    "DTYPE_BYTES",
    "Cost",
    "TensorInfo",
    "attribute_dict",
    "fused_cost",
    "graph_costs",
    "op_cost",
]

import contextlib
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import onnx_ir as ir

from gcomp.io import call_without_weights

SYMBOLIC_NODE_LIMIT = 20_000

# Element sizes by the names ORT's trace uses and by onnx-ir's DataType names (lower case).
DTYPE_BYTES: dict[str, float] = {
    "float": 4,
    "float32": 4,
    "double": 8,
    "float64": 8,
    "float16": 2,
    "bfloat16": 2,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "uint16": 2,
    "int32": 4,
    "uint32": 4,
    "int64": 8,
    "uint64": 8,
    "bool": 1,
    "float8e4m3fn": 1,
    "float8e4m3fnuz": 1,
    "float8e5m2": 1,
    "float8e5m2fnuz": 1,
    "int4": 0.5,
    "uint4": 0.5,
    "float4e2m1": 0.5,
}


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's shape (all dims known) and element size in bytes."""

    shape: tuple[int, ...]
    itemsize: float = 4
    dtype: str | None = None  # ONNX's name in lower case ("float", "int64"), when known

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return int(math.ceil(self.numel * self.itemsize))


@dataclass(frozen=True)
class Cost:
    """What one node computes and moves per run. ``flops``/``macs`` are None when the op
    type is not priced (see the module docstring)."""

    flops: int | None
    bytes: int
    macs: int | None = None


# FLOPs per output element of ops that work element by element.
_PER_ELEMENT: dict[str, int] = {
    **dict.fromkeys(
        [
            "Add",
            "Sub",
            "Mul",
            "Div",
            "Pow",
            "Max",
            "Min",
            "Mean",
            "Sum",
            "Relu",
            "LeakyRelu",
            "PRelu",
            "Neg",
            "Abs",
            "Sqrt",
            "Reciprocal",
            "Clip",
            "Where",
            "Equal",
            "Greater",
            "Less",
            "GreaterOrEqual",
            "LessOrEqual",
            "Not",
            "And",
            "Or",
            "Xor",
            "Sign",
            "Floor",
            "Ceil",
            "Round",
            "Mod",
            "BiasAdd",
            "ThresholdedRelu",
            "Shrink",
            "IsNaN",
            "IsInf",
            "BitShift",
        ],
        1,
    ),
    **dict.fromkeys(
        [
            "Exp",
            "Log",
            "Sin",
            "Cos",
            "Tan",
            "Erf",
            "Softplus",
            "Softsign",
            "Elu",
            "Selu",
            "Celu",
            "HardSigmoid",
            "HardSwish",
            "Sigmoid",
            "Tanh",
            "Atan",
            "Asin",
            "Acos",
            "Sinh",
            "Cosh",
            "Asinh",
            "Acosh",
            "Atanh",
        ],
        4,
    ),
    **dict.fromkeys(["Gelu", "FastGelu", "BiasGelu", "QuickGelu", "Mish", "Swish", "SiLU"], 8),
    **dict.fromkeys(["Softmax", "LogSoftmax", "Hardmax"], 5),
    **dict.fromkeys(
        [
            "LayerNormalization",
            "SkipLayerNormalization",
            "EmbedLayerNormalization",
            "InstanceNormalization",
            "GroupNormalization",
            "MeanVarianceNormalization",
            "LpNormalization",
        ],
        8,
    ),
    **dict.fromkeys(
        ["RMSNormalization", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"], 6
    ),
    "BatchNormalization": 2,
    "DequantizeLinear": 2,
    "QuantizeLinear": 3,
}

# FLOPs per *input* element (reductions).
_PER_INPUT = {
    "ReduceSum",
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "GlobalLpPool",
    "ArgMax",
    "ArgMin",
    "CumSum",
}

# No arithmetic: they move, copy, index or describe data.
_DATA_MOVEMENT = {
    "Reshape",
    "Transpose",
    "Gather",
    "GatherElements",
    "GatherND",
    "Concat",
    "Split",
    "Slice",
    "Cast",
    "CastLike",
    "Shape",
    "Size",
    "Squeeze",
    "Unsqueeze",
    "Flatten",
    "Expand",
    "Tile",
    "Identity",
    "Constant",
    "ConstantOfShape",
    "Pad",
    "Dropout",
    "ScatterND",
    "ScatterElements",
    "Scatter",
    "DepthToSpace",
    "SpaceToDepth",
    "Range",
    "OneHot",
    "NonZero",
    "Trilu",
    "ReorderInput",
    "ReorderOutput",
    "MemcpyToHost",
    "MemcpyFromHost",
    "EyeLike",
    "Compress",
    "Resize",
    "Upsample",
    "TopK",
    "NonMaxSuppression",
    "If",
    "Loop",
    "Scan",
}


def _io_bytes(inputs: Sequence[TensorInfo | None], outputs: Sequence[TensorInfo | None]) -> int:
    return sum(t.nbytes for t in (*inputs, *outputs) if t is not None)


def op_cost(
    op_type: str,
    inputs: Sequence[TensorInfo | None],
    outputs: Sequence[TensorInfo | None],
    attributes: Mapping[str, object] | None = None,
    domain: str = "",
) -> Cost:
    """FLOPs, multiply-accumulates and bytes of one op run on these tensors.

    ``inputs``/``outputs`` follow the node's positions; ``None`` is an absent optional
    input or an unknown shape. Returns ``flops=None`` when the op type is not priced or
    a shape it needs is unknown.
    """
    attributes = attributes or {}
    nbytes = _io_bytes(inputs, outputs)
    try:
        macs, extra = _arithmetic(op_type, list(inputs), list(outputs), attributes, domain)
    except (
        IndexError,
        ZeroDivisionError,
        TypeError,
        AttributeError,
        ValueError,
    ):  # a needed shape is unknown
        return Cost(None, nbytes)
    if macs is None and extra is None:
        return Cost(None, nbytes)
    macs = macs or 0
    return Cost(int(2 * macs + (extra or 0)), nbytes, int(macs))


def _arithmetic(op_type, inputs, outputs, attrs, domain) -> tuple[int | None, int | None]:
    """(multiply-accumulates, other FLOPs); (None, None) when not priced."""
    out = outputs[0] if outputs else None
    if op_type in (
        "MatMul",
        "FusedMatMul",
        "MatMulInteger",
        "QLinearMatMul",
        "MatMulNBits",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
    ):
        a = inputs[0]
        k = a.shape[-1] if len(a.shape) > 1 else a.shape[0]
        if op_type == "FusedMatMul" and attrs.get("transA"):
            k = a.shape[-2]
        if op_type == "MatMulNBits":
            k = int(attrs.get("K") or k)
        return out.numel * k, 0
    if op_type in ("Gemm", "FusedGemm", "QGemm"):
        a = inputs[0]
        m = out.shape[0]
        k = a.numel // m  # A is [M, K] or [K, M]: either way numel / M
        bias = out.numel if len(inputs) > 2 and inputs[2] is not None else 0
        return out.numel * k, bias
    if op_type in ("Conv", "FusedConv", "ConvInteger", "QLinearConv", "NhwcConv"):
        w = inputs[3] if op_type == "QLinearConv" else inputs[1]
        cout = w.shape[0]
        per_output = w.numel // cout  # C_in/group * prod(kernel), any weight layout
        bias_index = 8 if op_type == "QLinearConv" else 2
        has_bias = len(inputs) > bias_index and inputs[bias_index] is not None
        extra = out.numel if has_bias else 0
        if op_type == "FusedConv":  # bias, optional residual Z, activation
            extra += out.numel * (1 + (len(inputs) > 3 and inputs[3] is not None))
        return out.numel * per_output, extra
    if op_type == "ConvTranspose":
        x, w = inputs[0], inputs[1]
        per_input = w.shape[1] * math.prod(w.shape[2:])  # weight [C_in, C_out/group, k...]
        has_bias = len(inputs) > 2 and inputs[2] is not None
        return x.numel * per_input, out.numel if has_bias else 0
    if op_type in ("Attention", "MultiHeadAttention", "GroupQueryAttention"):
        return _attention(op_type, inputs, outputs, attrs, domain)
    if op_type in ("MaxPool", "AveragePool", "LpPool"):
        kernel = attrs.get("kernel_shape")
        if kernel is None:  # window unknown (a runtime's own kernel): every input read once
            return 0, inputs[0].numel
        return 0, out.numel * math.prod(kernel)
    if op_type in _PER_INPUT:
        return 0, inputs[0].numel
    if op_type in _PER_ELEMENT:
        numel = max(t.numel for t in outputs if t is not None)
        return 0, _PER_ELEMENT[op_type] * numel
    if op_type == "Einsum":
        return None, None
    if op_type in _DATA_MOVEMENT:
        return 0, 0
    return None, None


def _attention(op_type, inputs, outputs, attrs, domain) -> tuple[int | None, int | None]:
    heads = int(attrs.get("num_heads") or attrs.get("q_num_heads") or 1)
    q = inputs[0]
    if op_type == "Attention" and domain == "com.microsoft":
        # input [B, S, hidden], packed weights [hidden, 3*hidden]: projection, then attention.
        w = inputs[1]
        b, s = q.shape[0], q.shape[1]
        proj = b * s * w.shape[0] * w.shape[1]
        hidden = w.shape[1] // 3
        scores = b * heads * s * s
        return proj + 2 * b * s * s * hidden, 5 * scores + (b * s * w.shape[1])
    k, v = inputs[1], inputs[2]
    if len(q.shape) == 4:  # [B, H, S, D]
        b, hq, sq, d = q.shape
        skv = k.shape[2]
        dv = v.shape[-1]
        qk, av = b * hq * sq * skv * d, b * hq * sq * skv * dv
        scores = b * hq * sq * skv
    else:  # [B, S, hidden]
        b, sq, hidden = q.shape
        skv = k.shape[1]
        hidden_v = v.shape[-1]
        qk, av = b * sq * skv * hidden, b * sq * skv * hidden_v
        scores = b * heads * sq * skv
    return qk + av, 5 * scores


def fused_cost(
    model: ir.Model,
    members: Sequence[str],
    costs: Mapping[str, Cost],
    tensors: Mapping[str, tuple[list, list]],
) -> Cost | None:
    """The cost of one kernel that computes several graph nodes (a runtime's fusion).

    FLOPs are the members' sum; bytes are what crosses the kernel's boundary: values
    read from outside the group (inputs and weights, once each) and values written that
    something outside the group reads (or that are graph outputs). Intermediate tensors
    stay inside the kernel. ``costs``/``tensors`` come from :func:`graph_costs`. None
    when a member is not a node of the main graph.
    """
    by_name = {n.name: n for n in model.graph if n.name}
    nodes = [by_name.get(m) for m in members]
    if not nodes or any(n is None or n.name not in costs for n in nodes):
        return None
    inside = {id(v) for n in nodes for v in n.outputs}
    member_ids = {id(n) for n in nodes}
    graph_outputs = {id(v) for v in model.graph.outputs}
    read: dict[int, TensorInfo | None] = {}
    written: dict[int, TensorInfo | None] = {}
    for n in nodes:
        ins, outs = tensors.get(n.name, ([], []))
        for v, t in zip(n.inputs, ins):
            if v is not None and id(v) not in inside:
                read[id(v)] = t
        for v, t in zip(n.outputs, outs):
            if id(v) in graph_outputs or any(id(user) not in member_ids for user, _ in v.uses()):
                written[id(v)] = t
    flops = [costs[m].flops for m in members]
    macs = sum(costs[m].macs or 0 for m in members)
    nbytes = sum(t.nbytes for t in (*read.values(), *written.values()) if t is not None)
    return Cost(None if any(f is None for f in flops) else sum(flops), nbytes, macs)


def attribute_dict(node: ir.Node) -> dict[str, object]:
    """A node's int, ints and float attributes by name (what :func:`op_cost` reads)."""
    out = {}
    for name, attr in node.attributes.items():
        if isinstance(attr, ir.Attr) and attr.type in (
            ir.AttributeType.INT,
            ir.AttributeType.INTS,
            ir.AttributeType.FLOAT,
        ):
            out[name] = attr.value if attr.type != ir.AttributeType.INTS else list(attr.value)
    return out


def graph_costs(
    model: ir.Model,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    tensors: dict[str, tuple[list, list]] | None = None,
) -> dict[str, Cost]:
    """Cost of every node of the main graph, by node name, at these input shapes.

    ``input_shapes`` fixes the graph inputs' dims (e.g. the shapes of the arrays a
    profile ran on); symbolic dims left over make the dependent costs unknown. The model
    is not changed. Nodes without a name are keyed ``<op_type>_<index>``. When given,
    ``tensors`` is filled with each node's (inputs, outputs) as :class:`TensorInfo` or None.
    """
    types = _inferred(model, dict(input_shapes or {}))
    costs: dict[str, Cost] = {}
    for index, node in enumerate(model.graph):
        ins = [_info(v, types) if v is not None else None for v in node.inputs]
        outs = [_info(v, types) for v in node.outputs]
        name = node.name or f"{node.op_type}_{index}"
        costs[name] = op_cost(node.op_type, ins, outs, attribute_dict(node), node.domain)
        if tensors is not None:
            tensors[name] = (ins, outs)
    return costs


def _info(value: ir.Value, types: Mapping[str, tuple]) -> TensorInfo | None:
    found = types.get(value.name)
    if found is None:
        tensor = value.const_value
        if tensor is not None:
            return TensorInfo(
                tuple(tensor.shape), _itemsize(tensor.dtype), tensor.dtype.name.lower()
            )
        return None
    shape, itemsize, dtype = found
    if shape is None or any(not isinstance(d, int) for d in shape):
        return None
    return TensorInfo(tuple(shape), itemsize, dtype)


def _itemsize(dtype: ir.DataType | None) -> float:
    if dtype is None:
        return 4
    return DTYPE_BYTES.get(dtype.name.lower(), dtype.itemsize if hasattr(dtype, "itemsize") else 4)


def _inferred(model: ir.Model, shapes: dict[str, Sequence[int]]) -> dict[str, tuple]:
    """Value name -> (shape or None, itemsize, dtype name) after shape inference at these shapes.

    ONNX's inference first; where it leaves dims unknown (its data propagation loses the
    batch through exporters' Shape/Gather/Concat/Expand chains, e.g. torch's BERT), ONNX
    Runtime's symbolic shape inference tool fills them in when it is importable.
    """
    import onnx

    def fix_inputs(proto):
        for inp in proto.graph.input:
            if inp.name in shapes and inp.type.HasField("tensor_type"):
                dims = inp.type.tensor_type.shape.dim
                del dims[:]
                for d in shapes[inp.name]:
                    dims.add().dim_value = int(d)
        # value_info the model declared may carry symbolic dims that now conflict.
        del proto.graph.value_info[:]
        return proto

    def infer(proto):
        proto = fix_inputs(proto)
        try:
            inferred = onnx.shape_inference.infer_shapes(
                proto, check_type=False, strict_mode=False, data_prop=True
            )
        except Exception:
            inferred = proto
        out = _read_types(inferred)
        unknown_dims = any(t[0] is None or None in t[0] for t in out.values())
        incomplete = (bool(shapes) and unknown_dims) or len(out) < _value_count(proto)
        # ORT's tool is pure Python and linear in nodes (0.045 ms a node on an idle 2-core
        # machine, 0.08-0.17 ms with other work on its cores; docs/measurements.md): past
        # this size it would cost more than the profile it annotates, and the unknown costs
        # stay unknown.
        if incomplete and len(proto.graph.node) <= SYMBOLIC_NODE_LIMIT:
            try:
                # Why not ONNX's inference alone: its data propagation loses dims computed
                # through the Shape/Gather/Range/Concat/Expand chains exporters write (the
                # exporter-style models/transformer.py loses the sequence dim at its
                # position ids' Range), and every cost downstream would stay unknown. ORT's
                # tool evaluates those chains symbolically. Imported lazily: onnxruntime is
                # optional here, and the tool runs only when ONNX's result is incomplete.
                from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

                # When its own inference is incomplete, the tool saves its result as
                # "sym_shape_infer_temp.onnx" (+ external data) in the current folder: run
                # it in a temporary one, so profiling never writes into the user's folder.
                with _in_temporary_folder():
                    better = _read_types(SymbolicShapeInference.infer_shapes(proto, auto_merge=True))
            except Exception:  # a tool for what ONNX's inference missed: best effort
                better = {}
            for name, (shape, itemsize, dtype) in better.items():
                known = out.get(name, (None,))[0]
                if shape is not None and None not in shape and (known is None or None in known):
                    out[name] = (shape, itemsize, dtype)
        return out

    return call_without_weights(infer, model)


@contextlib.contextmanager
def _in_temporary_folder():
    """Run with the process's current folder set to a fresh temporary one, removed after."""
    previous = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="gcomp-symbolic-") as folder:
        os.chdir(folder)
        try:
            yield folder
        finally:
            os.chdir(previous)


def _value_count(proto) -> int:
    return len(proto.graph.input) + sum(len(n.output) for n in proto.graph.node)


def _read_types(proto) -> dict[str, tuple]:
    import onnx

    out: dict[str, tuple] = {}
    for info in (*proto.graph.input, *proto.graph.value_info, *proto.graph.output):
        if not info.type.HasField("tensor_type"):
            continue
        tt = info.type.tensor_type
        name = onnx.TensorProto.DataType.Name(tt.elem_type).lower() if tt.elem_type else "float"
        itemsize = DTYPE_BYTES.get(name, 4)
        if not tt.HasField("shape"):
            out.setdefault(info.name, (None, itemsize, name))
            continue
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        out.setdefault(info.name, (dims, itemsize, name))
    return out
