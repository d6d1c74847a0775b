"""Static shapes: every dim of the model fixed at given input shapes (``gcomp optimize --static``).

Guarantees: the main graph's runtime inputs get the given shapes; every symbolic dim an
input names (``batch``, ``seq``) gets that size on every value that declares it, in every
graph; then ONNX shape inference runs (with data propagation, so a Reshape target computed
from Shape ops is known) and what it infers becomes the model's own annotations, so the
written model declares int dims on its values (``forget-inferred-shapes`` leaves them).
Run before a pipeline, the folding that follows turns the Shape/Gather/Concat arithmetic
into constants; run again after it, it annotates the values the pipeline made.

Refuses, with a one-line :class:`~gcomp.errors.OptionError`: a runtime input whose dims
stay unknown (symbolic and named by no given shape, or undeclared), a shape for an input
the model does not have, a shape of the wrong rank or contradicting a fixed dim, and one
dim name given two sizes.

Left as they are: values whose size depends on data (``NonZero``, a Loop's carried
values) or that ONNX cannot infer; ``details`` counts them and names the first few.
Scopes: main graph inputs; annotations and inference in the main graph and subgraphs
(model functions stay generic).
"""

from __future__ import annotations

__all__ = ["StaticShapes", "format_shapes", "parse_shapes", "static_input_shapes"]

from collections.abc import Mapping
from typing import Annotated

import onnx_ir as ir

from gcomp.errors import OptionError
from gcomp.passes.result import DetailedResult
from gcomp.passes.shapes import InferShapes, keep_inferred_shapes
from gcomp.registry import register_pass

Shapes = dict[str, tuple[int, ...]]


def format_shapes(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """``{"x": (1, 16)}`` as the pass option's text, ``x=1,16`` (``;`` between inputs)."""
    return ";".join(f"{name}={','.join(str(d) for d in dims)}" for name, dims in shapes.items())


def parse_shapes(text: str) -> Shapes:
    """The pass option's text as shapes (see :func:`format_shapes`); ``x=`` is a scalar."""
    shapes: Shapes = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        name, sep, dims = item.rpartition("=")
        try:
            shapes[name] = tuple(int(d) for d in dims.split(",") if d.strip())
        except ValueError:
            sep = ""
        if not sep or not name or any(d < 0 for d in shapes.get(name, ())):
            raise OptionError(f"static-shapes: '{item}' is not NAME=D1,D2,... with non-negative ints")
    return shapes


def _runtime_inputs(model: ir.Model) -> list[ir.Value]:
    return [v for v in model.graph.inputs if v.const_value is None]


def _known(dim) -> bool:
    return isinstance(dim, int) and dim >= 0


def _bind(model: ir.Model, given: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Dim name -> size from the given shapes, checked against each input's declaration."""
    inputs = {v.name: v for v in _runtime_inputs(model)}
    bound: dict[str, int] = {}
    where: dict[str, str] = {}
    for name, dims in given.items():
        value = inputs.get(name)
        if value is None:
            raise OptionError(f"--static: the model has no input '{name}' (inputs: {', '.join(inputs) or 'none'})")
        declared = value.shape
        if declared is None:
            continue
        if len(declared) != len(dims):
            raise OptionError(f"--static: input '{name}' has rank {len(declared)} ({_show(declared)}), "
                              f"the shape given has {len(dims)} dims ({list(dims)})")
        for dim, size in zip(declared, dims):
            if _known(dim) and dim != size:
                raise OptionError(f"--static: input '{name}' is {_show(declared)}, the shape given is {list(dims)}")
            symbol = dim.value if isinstance(dim, ir.SymbolicDim) else None
            if not symbol:
                continue
            if bound.setdefault(symbol, size) != size:
                raise OptionError(f"--static: dim '{symbol}' is {bound[symbol]} on input '{where[symbol]}' "
                                  f"and {size} on input '{name}'")
            where.setdefault(symbol, name)
    return bound


def static_input_shapes(model: ir.Model, given: Mapping[str, tuple[int, ...]]) -> Shapes:
    """Every runtime input's static shape: as given, or its declared dims with the names
    the given shapes bind filled in. Raises :class:`OptionError` naming the first input
    whose dims stay unknown."""
    bound = _bind(model, given)
    shapes: Shapes = {}
    for value in _runtime_inputs(model):
        if value.name in given:
            shapes[value.name] = tuple(int(d) for d in given[value.name])
            continue
        declared = value.shape
        dims = [] if declared is None else [d if _known(d) else bound.get(getattr(d, "value", None)) for d in declared]
        if declared is None or None in dims:
            what = "declares no shape" if declared is None else f"has unknown dims {_show(declared)}"
            example = ",".join("D" + str(i + 1) for i in range(len(declared or ()))) or "D1,D2,..."
            raise OptionError(f"--static: input '{value.name}' {what}: give its shape with "
                              f"--input-shape {value.name}={example} (input_shapes= in Python)")
        shapes[value.name] = tuple(dims)
    return shapes


def _show(shape: ir.Shape) -> str:
    return "[" + ", ".join(str(d) if _known(d) else (getattr(d, "value", None) or "?") for d in shape) + "]"


def _values(graph: ir.Graph):
    yield from graph.inputs
    for node in graph:
        yield from node.outputs


def _static(value: ir.Value) -> bool:
    return value.shape is not None and all(_known(d) for d in value.shape)


@register_pass("static-shapes")
class StaticShapes(ir.passes.InPlacePass):
    """Fix every dim at the given input shapes and keep the shapes inference finds (--static)."""

    def __init__(
        self,
        *,
        shapes: Annotated[str, "the graph inputs' shapes, NAME=D1,D2,... separated by ';' "
                               "(inputs whose dims are all fixed or named by these may be left out)"] = "",
    ) -> None:
        super().__init__()
        self.shapes = shapes
        self._given = parse_shapes(shapes)

    def call(self, model: ir.Model) -> DetailedResult:
        shapes = static_input_shapes(model, self._given)
        bound = _bind(model, shapes)
        modified = False
        for value in _runtime_inputs(model):
            new = ir.Shape(list(shapes[value.name]))
            if value.shape is None or list(value.shape) != list(new):
                value.shape = new
                modified = True
        for graph in model.graphs():
            for value in _values(graph):
                modified |= _fill_named_dims(value, bound)
        InferShapes()(model)
        modified |= keep_inferred_shapes(model) > 0
        dynamic = [v.name for g in model.graphs() for v in _values(g) if not _static(v)]
        details = {"input_shapes": {k: list(v) for k, v in shapes.items()}, "not_static": len(dynamic),
                   "not_static_examples": dynamic[:10]}
        return DetailedResult(model, modified, details)


def _fill_named_dims(value: ir.Value, bound: Mapping[str, int]) -> bool:
    """Replace the symbolic dims of ``value``'s shape that ``bound`` names; whether any was."""
    shape = value.shape
    if shape is None or not any(isinstance(d, ir.SymbolicDim) and d.value in bound for d in shape):
        return False
    value.shape = ir.Shape([bound[d.value] if isinstance(d, ir.SymbolicDim) and d.value in bound else d for d in shape])
    return True
