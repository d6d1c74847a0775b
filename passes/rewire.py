"""Rewiring values while keeping every graph's interface intact.

The one place that knows the rules for replacing a node's output by another value:
uses move over; a graph output keeps its name and must stay produced by a node of
that graph (an input, an initializer, another output or an outer-scope value cannot
simply take its place).
"""

from __future__ import annotations

__all__ = ["bypass", "can_take_place_of_output", "take_interface"]

import onnx_ir as ir


def can_take_place_of_output(graph: ir.Graph | ir.Function, src: ir.Value) -> bool:
    """Whether ``src`` may become a graph output in place of another value (taking its name)."""
    producer = src.producer()
    if producer is None or producer.graph is not graph:
        return False  # an input, an initializer or an outer-scope value
    return src not in graph.outputs and src not in graph.inputs and not src.is_initializer()


def take_interface(old: ir.Value, new: ir.Value) -> None:
    """``new`` becomes a graph output in ``old``'s place: it takes the declared type and
    shape of the interface (the checker requires an output's type), for good: an
    annotation from shape inference would otherwise be forgotten at the end of O1."""
    if old.type is not None:
        new.type = old.type
    if old.shape is not None or new.shape is None:
        new.shape = old.shape if old.shape is not None else new.shape
    new.meta.pop("gcomp.inferred_from", None)


def bypass(graph: ir.Graph | ir.Function, old: ir.Value, new: ir.Value) -> bool:
    """Point every use of ``old`` (an output of a node in ``graph``) at ``new``.

    When ``old`` is a graph output, ``new`` takes its place and its name, if it can
    (see :func:`can_take_place_of_output`); otherwise nothing changes and False is
    returned. The caller removes the node once none of its outputs is used.
    """
    outputs = list(graph.outputs)
    if old in outputs:
        if not can_take_place_of_output(graph, new):
            return False
        name = old.name
        graph.outputs[outputs.index(old)] = new
        ir.convenience.replace_all_uses_with(old, new)
        old.name = None
        new.name = name
        take_interface(old, new)
        return True
    ir.convenience.replace_all_uses_with(old, new)
    return True
