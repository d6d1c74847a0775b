"""Models ONNX Runtime runs that the ONNX checker or onnx-ir refuse as written, made loadable.

:mod:`gcomp.io` applies both repairs to the ``onnx.ModelProto`` as it enters the IR (and
nothing else should); each comes with a one-line note for the user
(:func:`gcomp.io.load_notes`):

- **Legacy IR** (:func:`legacy_ir_note`): IR version 3 requires every initializer to be
  listed among its graph's inputs (where it is an input with a default value); a model
  whose initializers are not all listed fails the checker, yet ONNX Runtime runs it. IR
  version 4 allows unlisted initializers and makes them constants, which is what ONNX
  Runtime computes with them, and keeps listed ones inputs with defaults, as IR 3 says;
  so the model is read (and written) as IR version 4. Listing the missing initializers
  as inputs instead would turn weights into overridable inputs (a wider interface, and
  nothing left to fold). (ONNX Runtime 1.31 treats even listed initializers of an IR-3
  model as constants, refusing a value for them: the IR-4 model accepts every feed the
  original accepted, with the same results, and also the overrides IR 3 promises.)
- **Legacy IR after the passes** (:func:`settle_legacy_initializers`): an IR-3 model
  keeps its IR version, but what the passes did to its weights is put in IR 3's terms.
  Its listed initializers are constants to gcomp's passes, as to ONNX Runtime (which
  exposes none of them as an input and refuses a feed for them), so a weight folded
  away (BatchNormalization into a Conv) leaves its original unread: that original is
  dropped, input and data, or the file would carry every folded weight twice (ResNet-50
  from 98 to 187 MB). The weights passes add are listed as graph inputs, after the
  others, as IR 3 requires of every initializer (else the checker refuses the output).
  The inputs a caller feeds keep their names and places.
- **Map-typed tails** (:func:`detach_map_tail`, :func:`attach_map_tail`): onnx-ir has no
  map types, so a scikit-learn classifier converted with its default ZipMap output (a
  sequence of maps) cannot enter the IR. The nodes that make map-typed values (ZipMap, or
  a node a declaration says makes a map) and every node downstream of them form the
  *tail*: it is taken out of the graph with the outputs and value_info it makes, and the
  values it reads from the rest become extra graph outputs, so passes keep them (and
  their names). Attaching puts the tail back unchanged, drops the extra outputs and
  restores the original outputs in their order. :mod:`gcomp.io`
  attaches it wherever the model leaves the IR as a whole (saving, serializing for a
  runtime, ONNX's checker and shape inference), so verification runs the whole model and
  compares the maps too. A map-typed graph input, or a map type inside a subgraph, is
  refused in one line.
- **ONNX Runtime's ops in the default domain** (:func:`register_runtime_schemas`): ONNX
  Runtime registers ``SimplifiedLayerNormalization`` (its RMSNorm, which its transformers
  optimizer and gcomp's ``ort-simplified-layer-norm`` fusion write) in the default domain,
  where the ONNX checker knows no such op and refuses the model. Its schema, as ONNX
  Runtime declares it, is registered with ONNX once per process, before gcomp checks a
  model, so such a model is checked like any other (no note: the model is not changed).
"""

from __future__ import annotations

__all__ = ["LEGACY_IR_REPAIRED", "MapTail", "attach_map_tail", "detach_map_tail", "holds_maps", "legacy_ir_note",
           "register_runtime_schemas", "settle_legacy_initializers", "unread_legacy_initializers"]

import functools
from dataclasses import dataclass, field

from gcomp.errors import ModelLoadError, ModelSaveError

# Node types whose outputs are maps (or sequences of maps) whatever the declarations say.
_MAP_MAKERS = {("ai.onnx.ml", "ZipMap")}


# The IR version read in place of an older one whose initializers are not all graph inputs.
LEGACY_IR_REPAIRED = 4


def legacy_ir_note(proto) -> str | None:
    """The note when ``proto`` is IR version 3 (or older) with initializers missing from
    its graph inputs, to be read as :data:`LEGACY_IR_REPAIRED`; None when it needs no
    repair. ``proto`` is not modified."""
    if proto.ir_version >= LEGACY_IR_REPAIRED:
        return None
    unlisted = [name for graph in _graphs(proto) for name in _unlisted_initializers(graph)]
    if not unlisted:
        return None
    shown = ", ".join(f"'{n}'" for n in unlisted[:3]) + (f" and {len(unlisted) - 3} more" if len(unlisted) > 3 else "")
    return (
        f"IR version {proto.ir_version} requires initializers to be graph inputs, and {len(unlisted)} are not "
        f"({shown}): read and written as IR version {LEGACY_IR_REPAIRED}, where they are constants, "
        "as ONNX Runtime runs them"
    )


def settle_legacy_initializers(model, unread_before: frozenset[str] = frozenset()) -> None:
    """Put an IR < 4 ``onnx_ir.Model`` back in IR 3's terms after passes (module docstring):
    drop the listed initializers the passes left unread (``unread_before``: the names nothing
    read before them, which stay, as written), list new ones as inputs, and make a body's
    initializers ``Constant`` nodes (a body cannot list inputs for them; most passes make
    them so already, ``gcomp.passes.scopes``, but a rewrite through onnxscript's rewriter,
    e.g. a BatchNormalization folded into a Conv inside an If branch, adds initializers)."""
    if model.ir_version is None or model.ir_version >= LEGACY_IR_REPAIRED:
        return
    import onnx_ir as ir

    graph = model.graph
    for value in [v for v in graph.inputs if _listed_unread(v)]:
        if value.name not in unread_before:
            graph.inputs.remove(value)
            graph.initializers.pop(value.name)
    listed = set(graph.inputs)
    graph.inputs.extend(v for v in graph.initializers.values() if v not in listed)
    for body in graph.subgraphs():
        for value in list(body.initializers.values()):
            body.initializers.pop(value.name)
            node = ir.node("Constant", [], attributes={"value": value.const_value})
            if len(body):
                body.insert_before(body[0], node)
            else:
                body.append(node)
            made = node.outputs[0]
            made.dtype, made.shape = value.dtype, value.shape
            ir.convenience.replace_all_uses_with(value, made, replace_graph_outputs=True)
            made.name = value.name
            value.name = None


def unread_legacy_initializers(model) -> frozenset[str]:
    """The listed initializers of an IR < 4 model that nothing reads (empty otherwise): what
    :func:`settle_legacy_initializers` keeps after the passes, as the model had them."""
    if model.ir_version is None or model.ir_version >= LEGACY_IR_REPAIRED:
        return frozenset()
    return frozenset(v.name for v in model.graph.inputs if _listed_unread(v))


def _listed_unread(value) -> bool:
    """A graph input that is an initializer nothing reads (nor returns)."""
    return value.is_initializer() and not value.uses() and not value.is_graph_output()


def _unlisted_initializers(graph) -> list[str]:
    listed = {value.name for value in graph.input}
    return [t.name for t in graph.initializer if t.name not in listed]


def _graphs(proto):
    """The main graph and every subgraph (If/Loop/Scan bodies), functions' included."""
    stack = [proto.graph]
    for function in proto.functions:
        stack.extend(_attribute_graphs(function.node))
    while stack:
        graph = stack.pop()
        yield graph
        stack.extend(_attribute_graphs(graph.node))


def _attribute_graphs(nodes):
    from onnx import AttributeProto

    for node in nodes:
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                yield attr.g
            elif attr.type == AttributeProto.GRAPHS:
                yield from attr.graphs


@dataclass
class MapTail:
    """The map-typed end of a model, kept aside as protos while the rest is in the IR."""

    nodes: list = field(default_factory=list)  # NodeProtos, in graph order
    outputs: list = field(default_factory=list)  # (position among the original outputs, ValueInfoProto)
    value_info: list = field(default_factory=list)  # ValueInfoProtos of values the tail makes
    boundary: list[str] = field(default_factory=list)  # values it reads, appended as graph outputs
    opsets: dict[str, int] = field(default_factory=dict)  # domain -> version, of the tail's nodes

    def note(self) -> str:
        ops = ", ".join(sorted({n.op_type for n in self.nodes}))
        outs = ", ".join(f"'{info.name}'" for _, info in self.outputs)
        what = f"output(s) {outs} hold maps" if outs else "values inside the model hold maps"
        return (
            f"{what}, which gcomp's IR cannot: the {len(self.nodes)} node(s) making them ({ops}) are kept aside "
            "unchanged and written back; the rest is optimized, and verification compares every output, maps included"
        )


def _holds_map(type_proto) -> bool:
    kind = type_proto.WhichOneof("value")
    if kind == "map_type":
        return True
    if kind == "sequence_type":
        return _holds_map(type_proto.sequence_type.elem_type)
    if kind == "optional_type":
        return _holds_map(type_proto.optional_type.elem_type)
    return False


def holds_maps(proto) -> bool:
    """Whether the main graph declares a map-typed value or has a node making maps (then
    :func:`detach_map_tail` has work to do; subgraphs are its business)."""
    graph = proto.graph
    return any(_holds_map(i.type) for i in (*graph.input, *graph.output, *graph.value_info)) or any(
        (n.domain, n.op_type) in _MAP_MAKERS for n in graph.node
    )


def detach_map_tail(proto, where: str) -> MapTail | None:
    """Take the map-typed tail out of ``proto`` (in place); None when it has no map types.

    Raises:
        ModelLoadError: a map-typed graph input, or a map type inside a subgraph.
    """
    graph = proto.graph
    for info in graph.input:
        if _holds_map(info.type):
            raise ModelLoadError(
                f"{where}: input '{info.name}' is a map, which gcomp's IR (onnx-ir) cannot hold; "
                "gcomp reads maps only as outputs made at the end of the graph (ZipMap)"
            )
    declared_maps = {i.name for i in (*graph.output, *graph.value_info) if _holds_map(i.type)}
    tail_nodes, made = _downstream(graph.node, declared_maps)
    if not tail_nodes:
        return None
    for sub in _graphs(proto):
        if sub is not graph and any(_holds_map(i.type) for i in (*sub.input, *sub.output, *sub.value_info)):
            raise ModelLoadError(f"{where}: graph '{sub.name}' declares a map, which gcomp's IR (onnx-ir) cannot hold")
    tail = MapTail(nodes=[_copy(n) for n in tail_nodes])
    tail.outputs = [(i, _copy(o)) for i, o in enumerate(graph.output) if o.name in made]
    tail.value_info = [_copy(v) for v in graph.value_info if v.name in made]
    tail.opsets = {o.domain: o.version for o in proto.opset_import if o.domain in {n.domain for n in tail_nodes}}
    head_nodes = [n for n in graph.node if id(n) not in {id(t) for t in tail_nodes}]
    in_scope = {o for n in head_nodes for o in n.output} | {i.name for i in (*graph.input, *graph.initializer)}
    outputs = {o.name for o in graph.output}
    tail.boundary = [name for name in _reads(tail_nodes) if name in in_scope and name not in outputs]
    known = {v.name: v for v in (*graph.value_info, *graph.input)}
    _rewrite(graph, head_nodes, made)
    for name in tail.boundary:
        extra = graph.output.add()
        extra.name = name
        if name in known and known[name].HasField("type"):
            extra.type.CopyFrom(known[name].type)
    return tail


def _downstream(nodes, declared_maps: set[str]) -> tuple[list, set[str]]:
    """The nodes making a map (by op or declaration) and every node reading what they make
    (inside its subgraphs too), in graph order; and the names they make."""
    tail, made = [], set()
    for node in nodes:  # a valid graph is sorted: one pass sees producers first
        makes_map = (node.domain, node.op_type) in _MAP_MAKERS or any(o in declared_maps for o in node.output)
        if makes_map or any(name in made for name in _reads([node])):
            tail.append(node)
            made.update(o for o in node.output if o)
    return tail, made


def _reads(nodes) -> list[str]:
    """Names the nodes read, their subgraphs' outer-scope references included, in order."""
    seen: dict[str, None] = {}
    for node in nodes:
        for name in node.input:
            if name:
                seen.setdefault(name)
        for sub in _attribute_graphs([node]):
            for inner in _reads(sub.node):
                seen.setdefault(inner)  # a superset of outer references: harmless here
    return list(seen)


def _rewrite(graph, keep_nodes: list, made: set[str]) -> None:
    kept = [_copy(n) for n in keep_nodes]
    del graph.node[:]
    graph.node.extend(kept)
    for container in (graph.output, graph.value_info):
        kept_infos = [_copy(v) for v in container if v.name not in made]
        del container[:]
        container.extend(kept_infos)


def attach_map_tail(proto, tail: MapTail | None) -> None:
    """Put ``tail`` back into ``proto`` (a serialized head, in place): its nodes after the
    head's, its outputs at their original positions, the extra outputs it reads from
    dropped. They are found by name (a pass keeps graph output names: verification
    compares outputs by name), so outputs appended since (a run exposing intermediate
    values) stay, after the original ones.

    Raises:
        ModelSaveError: a value the tail reads is no longer a graph output.
    """
    if tail is None:
        return
    from onnx import helper

    graph = proto.graph
    outputs = list(graph.output)
    for name in tail.boundary:
        index = next((i for i, o in enumerate(outputs) if o.name == name), None)
        if index is None:
            raise ModelSaveError(f"the model lost the value '{name}' its map-typed outputs are made from")
        del outputs[index]
    for position, info in sorted(tail.outputs, key=lambda item: item[0]):
        outputs.insert(min(position, len(outputs)), info)
    del graph.output[:]
    graph.output.extend(_copy(o) for o in outputs)
    graph.node.extend(_copy(n) for n in tail.nodes)
    graph.value_info.extend(_copy(v) for v in tail.value_info)
    imported = {o.domain for o in proto.opset_import}
    for domain, version in tail.opsets.items():
        if domain not in imported:
            proto.opset_import.append(helper.make_opsetid(domain, version))


def _copy(message):
    clone = type(message)()
    clone.CopyFrom(message)
    return clone


_FLOATS = ["tensor(float16)", "tensor(float)", "tensor(double)", "tensor(bfloat16)"]


@functools.cache
def register_runtime_schemas() -> None:
    """Register with ONNX the schema ONNX Runtime declares for its default-domain
    ``SimplifiedLayerNormalization`` (since version 1; unless ONNX defines the op itself),
    so the checker accepts models that use it. Idempotent; no inference function (gcomp's
    shape inference gives its output the input's shape)."""
    from onnx import defs, helper

    try:
        defs.get_schema("SimplifiedLayerNormalization", 1, "")
        return
    except defs.SchemaError:
        pass
    param, attr = defs.OpSchema.FormalParameter, defs.OpSchema.Attribute
    defs.register_schema(defs.OpSchema(
        "SimplifiedLayerNormalization", "", 1,
        "ONNX Runtime's RMSNorm: X / sqrt(mean(X^2 over axes >= axis) + epsilon) * scale",
        inputs=[param("X", "T"), param("scale", "V")],
        outputs=[param("Y", "V"), param("inv_std_var", "U", param_option=defs.OpSchema.FormalParameterOption.Optional)],
        type_constraints=[("T", _FLOATS, ""), ("U", ["tensor(float)", "tensor(double)"], ""), ("V", _FLOATS, "")],
        attributes=[attr(name, helper.make_attribute(name, default))
                    for name, default in (("axis", -1), ("epsilon", 1e-5), ("stash_type", 1))],
    ))
