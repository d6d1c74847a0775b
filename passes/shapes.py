"""Shape inference: ONNX's, run on the weightless model, merged back into the IR.

Guarantees: only fills in or refines value types and shapes; never changes a node.
Inferred annotations serve the passes that follow; ``forget-inferred-shapes`` (the last
step of O1) puts back what the model declared before, because writing ONNX's inferences
into the saved model can make a runtime reject a model it used to run: ORT then checks
the annotation (e.g. an If output inferred as ``[1]`` feeding Range, which ORT requires
to be a scalar at load time but accepts as one element at run time).
Refuses: nothing — when ONNX's inference fails on a model, the model is left as is
and the pass reports no change. Scopes: main graph and subgraphs (as ONNX infers them).
"""

from __future__ import annotations

__all__ = ["InferShapes", "ForgetInferredShapes", "keep_inferred_shapes"]

from typing import Annotated

import onnx_ir as ir

from gcomp.io import call_without_weights
from gcomp.registry import register_pass


@register_pass("infer-shapes")
class InferShapes(ir.passes.InPlacePass):
    """Infer value types and shapes with ONNX shape inference (weights never serialized)."""

    # Annotates, never transforms: its changes alone don't make a pipeline stage run again.
    analysis = True

    def __init__(self, *, data_prop: Annotated[bool, "propagate small constant values through shape ops"] = True) -> None:
        super().__init__()
        self.data_prop = data_prop

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        import onnx

        # ONNX's data propagation allocates per element of every 1-D value's declared dim:
        # a hostile 300-byte model declaring float[2**31] would need ~170 GB.
        data_prop = self.data_prop and not _has_long_vector(model)

        def infer(proto):
            _proxy_contrib_ops(proto)  # the temporary, weightless copy only
            return onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=data_prop)

        try:
            inferred = call_without_weights(infer, model)
        except Exception:  # inference is best effort: an unknown op or bad annotation stops it
            return ir.passes.PassResult(model, modified=False)
        # Read only the inferred types (not the whole model back into the IR: at 100k nodes
        # that costs seconds and a second copy of the model).
        types = _inferred_types(inferred)
        modified = False
        for graph in model.graphs():
            for value in _values(graph):
                type_proto = types.get(value.name)
                if type_proto is None:
                    continue
                twin_type = ir.serde.deserialize_type_proto_for_type(type_proto)
                twin_shape = ir.serde.deserialize_type_proto_for_shape(type_proto)
                new_type = value.type is None and twin_type is not None
                new_shape = twin_shape is not None and (value.shape is None or _more_specific(twin_shape, value.shape))
                if new_type or new_shape:
                    value.meta.setdefault(_KEY, (value.type, value.shape))
                    modified = True
                if new_type:
                    value.type = twin_type  # whole type: a sequence stays a sequence
                if new_shape:
                    value.shape = twin_shape
        return ir.passes.PassResult(model, modified=modified)


@register_pass("forget-inferred-shapes")
class ForgetInferredShapes(ir.passes.InPlacePass):
    """Restore the types and shapes the model declared before ``infer-shapes`` refined them."""

    analysis = True

    def __init__(self) -> None:
        super().__init__()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for graph in model.graphs():
            for value in _values(graph):
                if _KEY in value.meta:
                    value.type, value.shape = value.meta.pop(_KEY)
                    modified = True
        return ir.passes.PassResult(model, modified=modified)


_KEY = "gcomp.inferred_from"  # also cleared by gcomp.passes.rewire.take_interface


def keep_inferred_shapes(model: ir.Model) -> int:
    """Make what ``infer-shapes`` inferred the model's own annotations (``forget-inferred-shapes``
    then leaves them); the number of values kept. For ``static-shapes``, which writes them."""
    kept = 0
    for graph in model.graphs():
        for value in _values(graph):
            kept += value.meta.pop(_KEY, None) is not None
    return kept


# ONNX's inference does not know the com.microsoft ops gcomp's fusions emit, and every value
# downstream of one would lose its shape. For inference only, each is replaced by standard
# ops with the same output shapes (same output names).
def _gqa_proxy(helper, node, ins, outs) -> list:
    """GroupQueryAttention (separate query/key/value, as gcomp emits it): the output has the
    query's shape; present = Concat(past, new keys split into kv_num_heads heads) on axis 2."""
    made = [helper.make_node("Identity", [ins[0]], [outs[0]])]
    kv_heads = next((a.i for a in node.attribute if a.name == "kv_num_heads"), 0)
    if not kv_heads or not ins[3] or not ins[4]:
        return made
    split = f"{outs[0]}__gqa_proxy_split"
    made.append(helper.make_node("Constant", [], [split], value=helper.make_tensor(split, 7, [4], [0, 0, kv_heads, -1])))
    for new, past, out in ((ins[1], ins[3], outs[1] if len(outs) > 1 else ""),
                           (ins[2], ins[4], outs[2] if len(outs) > 2 else "")):
        if out:
            made += [helper.make_node("Reshape", [new, split], [f"{out}__gqa_proxy_heads"]),
                     helper.make_node("Transpose", [f"{out}__gqa_proxy_heads"], [f"{out}__gqa_proxy_bnsh"],
                                      perm=[0, 2, 1, 3]),
                     helper.make_node("Concat", [past, f"{out}__gqa_proxy_bnsh"], [out], axis=2)]
    return made


def _proxy_contrib_ops(proto) -> None:
    from onnx import AttributeProto, helper

    def proxy(node):
        ins, outs = list(node.input), list(node.output)
        op = node.op_type
        if op in ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization") and len(ins) >= 2:
            made = [helper.make_node("Add", ins[:2], [outs[0]])]
            if len(outs) > 3 and outs[3]:
                made.append(helper.make_node("Identity", [outs[0]], [outs[3]]))
            return made
        if op in ("BiasGelu", "FastGelu", "Gelu", "QuickGelu", "SimplifiedLayerNormalization") and ins and outs:
            return [helper.make_node("Identity", [ins[0]], [outs[0]])]
        if op == "MultiHeadAttention" and ins and outs:  # gcomp emits it with equal Q and V widths
            return [helper.make_node("Identity", [ins[0]], [outs[0]])]
        if op == "RotaryEmbedding" and ins and outs:
            return [helper.make_node("Identity", [ins[0]], [outs[0]])]
        if op == "GroupQueryAttention" and len(ins) > 4 and ins[1] and outs:
            return _gqa_proxy(helper, node, ins, outs)
        if op == "FusedConv":
            attrs = [a for a in node.attribute if a.name not in ("activation", "activation_params")]
            made = helper.make_node("Conv", ins[:3], outs[:1])
            made.attribute.extend(attrs)
            return [made]
        return None

    stack = [proto.graph]
    while stack:
        graph = stack.pop()
        nodes = []
        changed = False
        for node in graph.node:
            # ORT registers SimplifiedLayerNormalization in the default domain (no ONNX inference)
            ort_op = node.domain == "com.microsoft" or node.op_type == "SimplifiedLayerNormalization"
            made = proxy(node) if ort_op else None
            if made is None:
                nodes.append(node)
                for attr in node.attribute:
                    if attr.type == AttributeProto.GRAPH:
                        stack.append(attr.g)
                    elif attr.type == AttributeProto.GRAPHS:
                        stack.extend(attr.graphs)
            else:
                nodes.extend(made)
                changed = True
        if changed:
            del graph.node[:]
            graph.node.extend(nodes)


def _inferred_types(proto) -> dict:
    """Value name -> TypeProto over every graph of the model (names are unique across
    scopes in a valid model; the first one wins otherwise)."""
    from onnx import AttributeProto

    types: dict = {}
    stack = [proto.graph]
    while stack:
        graph = stack.pop()
        for info in (*graph.input, *graph.value_info, *graph.output):
            if info.name and info.HasField("type"):
                types.setdefault(info.name, info.type)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == AttributeProto.GRAPH:
                    stack.append(attr.g)
                elif attr.type == AttributeProto.GRAPHS:
                    stack.extend(attr.graphs)
    return types


def _has_long_vector(model: ir.Model, limit: int = 1 << 16) -> bool:
    for graph in model.graphs():
        for value in _values(graph):
            if value.shape is not None and len(value.shape) == 1 and isinstance(value.shape[0], int) and value.shape[0] > limit:
                return True
    return False


def _values(graph: ir.Graph):
    yield from graph.inputs
    for node in graph:
        yield from node.outputs


def _more_specific(new: ir.Shape, old: ir.Shape) -> bool:
    if len(new) != len(old):
        return False
    gained = False
    for a, b in zip(new, old):
        if isinstance(b, int):
            if a != b:
                return False
        elif isinstance(a, int):
            gained = True
    return gained
