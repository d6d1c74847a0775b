"""The fusion engine: a catalogue of rules, which targets accept their output, and the
runner that applies them with per-rule counts and near-miss explanations.

A fusion module defines onnxscript rewriter rules (``pattern`` / ``check`` /
``rewrite``) and registers them with :func:`fusion`, declaring the ops its rewrite
emits. The runner applies a rule only when

- the model's opset (``ai.onnx``) is at least the version that introduced each emitted
  standard op (never emit an op newer than the model: ``--target-opset`` upgrades first),
- and the target accepts every emitted op (:func:`gcomp.passes.fusion.targets.accepts`).

Rules run one at a time in catalogue order (a rule's output can feed a later rule:
LayerNormalization, then Add + LayerNormalization -> SkipLayerNormalization), each over
the main graph, every If/Loop/Scan body and every model function, repeated until a
round fires nothing (at most ``MAX_ROUNDS``).

A fusion whose pattern has several roots (sibling MatMuls of one input) cannot be a
single-output rewriter pattern; it is a :class:`GraphRule` instead, applied the same way.
"""

from __future__ import annotations

__all__ = [
    "Fusion",
    "FUSIONS",
    "GraphRule",
    "fusion",
    "fusions_for",
    "run_fusions",
    "const_array",
    "fresh_initializer",
    "fresh_name",
    "model_opset",
]

import itertools
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

MAX_ROUNDS = 4


@dataclass(frozen=True)
class Fusion:
    """One fusion: a name, its rewriter rules, and what its rewrite emits."""

    name: str
    family: str  # "portable" (standard ONNX ops, O2) or a backend name ("ort", "tvm"; O3)
    rules: tuple[Any, ...]
    emits: tuple[tuple[str, str, int], ...]  # (domain, op_type, opset version that has it)
    summary: str
    module: str = ""
    needs: frozenset[str] = frozenset()  # run only when one of these op types is in the model
    not_for: tuple[tuple[str, str], ...] = ()  # (target, why): targets where it was measured slower

    def allowed(self, target: str, opset: int) -> tuple[bool, str]:
        from gcomp.passes.fusion.targets import accepts

        for slow_target, why in self.not_for:
            if target == slow_target:
                return False, f"not applied for {target}: {why}"

        for domain, op_type, since in self.emits:
            if domain in ("", "ai.onnx") and opset < since:
                return False, f"emits {op_type}-{since}; the model's opset is {opset} (use --target-opset {since})"
            version = since if domain in ("", "ai.onnx") else 1
            if not accepts(target, domain, op_type, max(version, opset if domain in ("", "ai.onnx") else 1)):
                return False, f"target '{target}' does not accept {domain or 'ai.onnx'}::{op_type}"
        return True, ""


class GraphRule:
    """A rule that rewrites the model as a whole: ``apply(model)`` returns how many sites it
    fused; it must leave the model unchanged where it does not fire, like a rewriter rule."""

    name: str = ""

    def apply(self, model: ir.Model) -> int:  # pragma: no cover - interface
        raise NotImplementedError


def _apply_rules(rules: Sequence[Any], model: ir.Model, tracer: Any = None) -> int:
    from onnxscript.rewriter._rewrite_rule import RewriteRuleSet

    graph_rules = [r for r in rules if isinstance(r, GraphRule)]
    count = sum(r.apply(model) for r in graph_rules) if tracer is None else 0
    rewrite_rules = [r for r in rules if not isinstance(r, GraphRule)]
    if rewrite_rules:
        count += RewriteRuleSet(rewrite_rules).apply_to_model(model, tracer=tracer)
    return count


FUSIONS: list[Fusion] = []
# The target of the run in progress: a rule whose output depends on the device (ORT CUDA's
# FusedConv runs only Relu) reads it in check().
TARGET = "portable"


def fusion(name: str, family: str, rules: Sequence[Any], emits: Sequence[tuple[str, str, int]], summary: str,
           *, needs: Sequence[str] = (), not_for: Sequence[tuple[str, str]] = ()) -> Fusion:
    """Register a fusion (catalogue order = application order).

    ``needs``: op types of which at least one must be in the model for the rules to be
    tried at all (a cheap filter: matching every rule at every node is the cost of fusion).
    ``not_for``: ``(target, measured reason)`` pairs where the fused op runs slower than
    what it replaces; a target-specific fusion exists to be faster, so it stays off there.
    """
    for rule in rules:
        rule.name = rule.name or name
        if not isinstance(rule, GraphRule):
            _filter_by_root(rule)
    module = sys._getframe(1).f_globals.get("__name__", "")
    entry = Fusion(name, family, tuple(rules), tuple(emits), summary, module, frozenset(needs), tuple(not_for))
    FUSIONS[:] = [f for f in FUSIONS if f.name != name] + [entry]
    return entry


def _filter_by_root(rule) -> None:
    """Try the rule only at nodes of its root op type.

    onnxscript's rewriter calls every rule at every node and lets the matcher reject; with
    the commuted variants that is ~10^5 calls on a small transformer. A single-output
    pattern can only match at a node of its output node's op type.
    """
    from onnxscript.rewriter._pattern_ir import NodeOutputPattern, StringConstantPattern

    if getattr(rule, "_gcomp_filtered", False):
        return
    outputs = getattr(getattr(rule, "_target_pattern", None), "_outputs", ())
    if len(outputs) != 1 or not isinstance(outputs[0], NodeOutputPattern):
        return
    root = outputs[0].producer()
    # (commuted copies of a pattern keep the op as a constant pattern, not an identifier)
    if not isinstance(root.op, StringConstantPattern) or not isinstance(root.domain, StringConstantPattern):
        return
    op_type, domain = root.op.value(), root.domain.value()
    domain = "" if domain in ("", "ai.onnx") else domain
    original = rule.try_rewrite

    def try_rewrite(model, graph_or_function, node, **kwargs):
        if node.op_type != op_type or (node.domain if node.domain != "ai.onnx" else "") != domain:
            return None
        return original(model, graph_or_function, node, **kwargs)

    rule.try_rewrite = try_rewrite
    rule._gcomp_filtered = True


def fusions_for(families: Sequence[str]) -> list[Fusion]:
    return [f for f in FUSIONS if f.family in families]


def model_opset(model_or_context: Any) -> int:
    model = getattr(model_or_context, "model", model_or_context)
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)))


# --------------------------------------------------------------------------- helpers for rules


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant contents (initializer or Constant output), else None.

    An initializer that is also a graph input is a default the caller may override, so
    it is not a constant, except in IR version < 4 models, where every initializer had
    to be listed as an input (the same rule as constant folding: ``fold.constant_lookup``).
    """
    from gcomp.passes.fold import _constant

    if value is None:
        return None
    try:
        return _constant(value, inputs_are_constant=_IR3)
    except Exception:
        return None


_IR3 = False  # set by run_fusions for the model being fused


_counter = itertools.count()
_taken: set[str] = set()


def fresh_name(base: str) -> str:
    """A name made from ``base`` that no value, node or initializer of the model has."""
    while True:
        name = f"{base or 'fused'}__f{next(_counter)}"
        if name not in _taken:
            break
    _taken.add(name)
    return name


def fresh_initializer(op, array: np.ndarray, base: str) -> ir.Value:
    """A new initializer holding ``array``, named after ``base`` and unique in the model."""
    name = fresh_name(base)
    return op.initializer(ir.tensor(np.ascontiguousarray(array), name=name), name=name)


# --------------------------------------------------------------------------- runner


@dataclass
class FusionReport:
    fired: dict[str, int]
    skipped: dict[str, str]  # fusion -> why it did not run at all (opset / target)
    near_misses: dict[str, list[str]]  # fusion -> reasons check() rejected (explain only)


def run_fusions(model: ir.Model, fusions: Sequence[Fusion], target: str, *, explain: bool = False) -> FusionReport:
    from onnxscript.rewriter import _basics

    global TARGET, _IR3
    TARGET = target
    _IR3 = model.ir_version is not None and model.ir_version < 4
    _taken.clear()
    _taken.update(_all_names(model))
    opset = model_opset(model)
    fired: dict[str, int] = {}
    skipped: dict[str, str] = {}
    near: dict[str, list[str]] = {}
    runnable = []
    for f in fusions:
        ok, why = f.allowed(target, opset)
        if ok:
            runnable.append(f)
            fired[f.name] = 0
        else:
            skipped[f.name] = why
    swapped = canonical_operands(model)
    for _ in range(MAX_ROUNDS):
        round_total = 0
        for f in runnable:
            if f.needs and not (f.needs & _op_types(model)):
                continue
            count = _apply_rules(f.rules, model)
            fired[f.name] += count
            round_total += count
        if not round_total:
            break
    if not any(fired.values()):
        for node in swapped:  # nothing fused: leave the model exactly as it was
            _swap(node)
    if explain:
        for f in runnable:
            if f.needs and not (f.needs & _op_types(model)):
                continue
            tracer = _basics.MatchingTracer()
            _apply_rules(f.rules, model, tracer)
            reasons: list[str] = []
            for matches in tracer.best_matches_map.values():
                for info in matches:
                    if info.status == _basics.MatchStatus.CONDITION_FAILED:
                        where = info.root_node.name or info.root_node.op_type
                        reasons.append(f"at {where}: {info.match_result.reason or 'check failed'}")
            if reasons:
                near[f.name] = sorted(set(reasons))[:20]
    return FusionReport(fired, skipped, near)


_COMMUTATIVE = frozenset({"Add", "Mul", "Max", "Min", "Sum", "And", "Or", "Xor", "Equal"})


def canonical_operands(model: ir.Model) -> list[ir.Node]:
    """Put a constant operand of a two-input commutative op second (``2 * x`` -> ``x * 2``).

    Exact (the ops are commutative elementwise with broadcasting either way round), and it
    lets rules match constants in one position. Returns the nodes it swapped.
    """
    from gcomp.passes.scopes import all_scopes

    swapped = []
    for scope in all_scopes(model):
        for node in scope:
            if (node.op_type in _COMMUTATIVE and node.domain in ("", "ai.onnx") and len(node.inputs) == 2
                    and node.inputs[0] is not None and node.inputs[1] is not None
                    and const_array(node.inputs[0]) is not None and const_array(node.inputs[1]) is None):
                _swap(node)
                swapped.append(node)
    return swapped


def _swap(node: ir.Node) -> None:
    a, b = node.inputs
    node.replace_input_with(0, b)
    node.replace_input_with(1, a)


def _op_types(model: ir.Model) -> set[str]:
    from gcomp.passes.scopes import all_scopes

    return {node.op_type for scope in all_scopes(model) for node in scope} | {
        node.op_type for f in model.functions.values() for node in f
    }


def _all_names(model: ir.Model) -> set[str]:
    from gcomp.passes.scopes import all_scopes

    names: set[str] = set()
    for scope in all_scopes(model):
        for v in getattr(scope, "inputs", ()):
            names.add(v.name)
        for node in scope:
            for v in node.outputs:
                if v.name:
                    names.add(v.name)
    names.update(model.graph.initializers)
    return names
