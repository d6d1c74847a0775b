"""The fusion engine: what a fusion is, the state of one run, and the runner that applies
fusions with per-rule counts and near-miss explanations.

A fusion module declares :class:`Fusion` objects: a name, the ops its rewrite emits, and a
``build`` function that makes its onnxscript rewriter rules (``pattern`` / ``check`` /
``rewrite``) for one run. The runner applies a fusion only when

- the model's opset (``ai.onnx``) is at least the version that introduced each emitted
  standard op (never emit an op newer than the model: ``--target-opset`` upgrades first),
- and the target accepts every emitted op (``Capabilities.accepts``, defined by
  ``gcomp.backends``; the pass receives it through its :class:`gcomp.registry.PassContext`).

Everything a rule may ask besides its match (the target, which values are constants in
this model, names no value has yet) is a :class:`FusionRun`, made once per run and handed
to ``build``; rules keep it as ``self.run``. No module state survives a run.

Fusions run one at a time in the order they are given (a fusion's output can feed a later
one: LayerNormalization, then Add + LayerNormalization -> SkipLayerNormalization), each
over the main graph, every If/Loop/Scan body and every model function, repeated until a
round fires nothing (at most ``MAX_ROUNDS``).

A fusion whose pattern has several roots (sibling MatMuls of one input) cannot be a
single-output rewriter pattern; it is a :class:`GraphRule` instead, applied the same way.
"""

from __future__ import annotations

__all__ = [
    "BuiltRules",
    "MAX_ROUNDS",
    "Fusion",
    "FusionReport",
    "FusionRun",
    "GraphRule",
    "Refused",
    "RunRule",
    "canonical_operands",
    "fusion",
    "run_fusions",
]

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from gcomp.passes.fold import _constant
from gcomp.passes.fusion import _onnxscript
from gcomp.passes.opsets import model_opset
from gcomp.passes.scopes import all_scopes, listed_are_constant
from gcomp.registry import Capabilities, Runtime

MAX_ROUNDS = 4
T = TypeVar("T")


class FusionRun:
    """The state of one fusion pass run, shared by the rules built for it.

    ``target``: what the output must run on (a rule whose output depends on the device
    reads it: ORT CUDA's FusedConv runs only Relu). :meth:`const` reads constants the way
    this model defines them; :meth:`fresh_name` makes names no value, node or initializer
    of the model has.
    """

    def __init__(self, model: ir.Model, target: Capabilities) -> None:
        self.target = target
        # Contracts the user accepted beyond the model's own (``--set rotary_in_attention=1``):
        # a rule that relies on one says so in its docstring.
        self.rotary_in_attention = False
        # The reference runtime, where the pipeline gives one: a rule may run a subgraph of the
        # model on it to prove what the subgraph computes (None: such rules keep the exact form).
        self.runtime: Runtime | None = None
        self.restart(model)

    def restart(self, model: ir.Model) -> None:
        """Serve a run over ``model``: rules built for an earlier run of the same pass (same
        target) are reused, since building them (patterns, commuted variants) costs more
        than a run of them on a small model."""
        self.inputs_are_constant = listed_are_constant(model)
        self._taken = _all_names(model)
        self._counter = itertools.count()

    def const(self, value: ir.Value | None) -> np.ndarray | None:
        """The value's constant contents (initializer or Constant output), else None.

        An initializer that is also a graph input is a default the caller may override, so
        it is not a constant, except in IR version < 4 models (the same rule as constant
        folding: ``fold._constant``).
        """
        if value is None:
            return None
        try:
            return _constant(value, inputs_are_constant=self.inputs_are_constant)
        except Exception:
            return None

    def fresh_name(self, base: str) -> str:
        """A name made from ``base`` that nothing in the model has, nor any earlier fresh name."""
        while True:
            name = f"{base or 'fused'}__f{next(self._counter)}"
            if name not in self._taken:
                break
        self._taken.add(name)
        return name

    def fresh_initializer(self, op, array: np.ndarray, base: str) -> ir.Value:
        """A new initializer holding ``array``, named after ``base`` and unique in the model."""
        name = self.fresh_name(base)
        return op.initializer(ir.tensor(np.ascontiguousarray(array), name=name), name=name)


class RunRule(pattern.RewriteRuleClassBase):
    """A rewriter rule built for one run: ``self.run`` is the run's :class:`FusionRun`."""

    def __init__(self, name: str, run: FusionRun, **options: Any) -> None:
        super().__init__(name, **options)
        self.run = run


class Refused(Exception):
    """Why one site a :class:`GraphRule` looked at cannot be fused (a near miss)."""


class GraphRule:
    """A rule that rewrites the model as a whole: ``apply(model)`` returns how many sites it
    fused; it must leave the model unchanged where it does not fire, like a rewriter rule.
    ``apply`` clears :attr:`misses` and matches each site through :meth:`attempt`."""

    name: str = ""

    def __init__(self, run: FusionRun) -> None:
        self.run = run
        self.misses: list[str] = []
        # What a site that *did* fuse gave up, kept for the whole run (``apply`` clears only
        # ``misses``, which a later round may resolve).
        self.notes: list[str] = []

    def apply(self, model: ir.Model) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def attempt(self, node: ir.Node, match: Callable[[], T]) -> T | None:
        """``match()``, or None with why not recorded as a near miss at ``node``: the
        :class:`Refused` reason, or, for a malformed site (missing inputs, odd attributes:
        not this rule's to fix), the error that reading it raised."""
        where = node.name or node.outputs[0].name
        try:
            return match()
        except Refused as e:
            self.misses.append(f"at {where}: {e}")
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
            self.misses.append(f"at {where}: not read ({type(e).__name__}: {e})")
        return None

    def near_misses(self, model: ir.Model) -> list[str]:
        """Why sites this rule looked at were not fused in its last ``apply``, and what fused
        sites gave up in any (``--explain-fusion``)."""
        return [*self.misses, *self.notes]


@dataclass(frozen=True)
class Fusion:
    """One fusion: a name, what its rewrite emits, and how to build its rules for a run.

    ``needs``: op types of which at least one must be in the model for the rules to be
    tried at all (a cheap filter: matching every rule at every node is the cost of fusion).
    ``not_for``: ``(target, measured reason)`` pairs where the fused op runs slower than
    what it replaces; a target-specific fusion exists to be faster, so it stays off there.
    """

    name: str
    build: Callable[[FusionRun], Sequence[Any]]
    emits: tuple[tuple[str, str, int], ...]  # (domain, op_type, opset version that has it)
    summary: str
    needs: frozenset[str] = frozenset()
    not_for: tuple[tuple[str, str], ...] = ()

    def allowed(self, target: Capabilities, opset: int) -> tuple[bool, str]:
        """Whether the fusion may run for ``target`` on a model of ``opset``; if not, why."""
        for slow_target, why in self.not_for:
            if target.name == slow_target:
                return False, f"not applied for {target.name}: {why}"
        for domain, op_type, since in self.emits:
            standard = domain in ("", "ai.onnx")
            if standard and opset < since:
                return False, f"emits {op_type}-{since}; the model's opset is {opset} (use --target-opset {since})"
            if not target.accepts(domain, op_type, max(since, opset) if standard else 1):
                return False, f"target '{target.name}' does not accept {domain or 'ai.onnx'}::{op_type}"
        return True, ""

    def rules(self, run: FusionRun) -> list[Any]:
        """The rules of this fusion for ``run``, named after it, each tried only at its root op."""
        rules = []
        for rule in self.build(run):
            rule.name = rule.name or self.name
            rules.append(rule if isinstance(rule, GraphRule) else _onnxscript.root_filtered(rule))
        return rules


def fusion(name: str, build: Callable[[FusionRun], Sequence[Any]], emits: Sequence[tuple[str, str, int]],
           summary: str, *, needs: Sequence[str] = (), not_for: Sequence[tuple[str, str]] = ()) -> Fusion:
    """A :class:`Fusion` (the order fusions run in is the list a pass gives the runner)."""
    return Fusion(name, build, tuple(emits), summary, frozenset(needs), tuple(not_for))


# --------------------------------------------------------------------------- runner


@dataclass
class FusionReport:
    fired: dict[str, int]
    skipped: dict[str, str]  # fusion -> why it did not run at all (opset / target)
    near_misses: dict[str, list[str]]  # fusion -> reasons check() rejected (explain only)


@dataclass
class BuiltRules:
    """Rules built for one pass's runs (one target), kept by the pass between its runs."""

    run: FusionRun | None = None
    rules: dict[str, list[Any]] = field(default_factory=dict)


def run_fusions(model: ir.Model, fusions: Sequence[Fusion], target: Capabilities, *,
                explain: bool = False, built: BuiltRules | None = None,
                rotary_in_attention: bool = False, runtime: Runtime | None = None) -> FusionReport:
    """Apply ``fusions`` in order, round after round, for ``target``; ``built`` keeps the
    rules for the next run of the same pass; ``rotary_in_attention``: see
    :class:`FusionRun`."""
    built = built if built is not None else BuiltRules()
    if built.run is None or built.run.target is not target:
        built.run, built.rules = FusionRun(model, target), {}
    else:
        built.run.restart(model)
    run = built.run
    run.rotary_in_attention = rotary_in_attention
    run.runtime = runtime
    opset = model_opset(model)
    report = FusionReport({}, {}, {})
    runnable: list[Fusion] = []
    for f in fusions:
        ok, why = f.allowed(target, opset)
        if ok:
            runnable.append(f)
            report.fired[f.name] = 0
        else:
            report.skipped[f.name] = why
    swapped = canonical_operands(model, run)
    rules = built.rules  # built when first needed
    for built_rules in rules.values():  # kept from an earlier run: its notes were reported there
        for r in built_rules:
            if isinstance(r, GraphRule):
                r.notes = []

    def rules_of(f: Fusion) -> list[Any]:
        if f.name not in rules:
            rules[f.name] = f.rules(run)
        return rules[f.name]

    for _ in range(MAX_ROUNDS):
        round_total = 0
        for f in runnable:
            if f.needs and not (f.needs & _op_types(model)):
                continue
            count = _apply(rules_of(f), model)
            report.fired[f.name] += count
            round_total += count
        if not round_total:
            break
    if not any(report.fired.values()):
        for node in swapped:  # nothing fused: leave the model exactly as it was
            _swap(node)
    if explain:
        present = _op_types(model)
        for f in runnable:
            if f.name not in rules:
                continue  # never built: its ops were never in the model
            # A graph rule's misses and notes were recorded as it ran, even where it fused every
            # site (so its ops are gone); the rewriter's near misses are matched now.
            reasons = [m for r in rules_of(f) if isinstance(r, GraphRule) for m in r.near_misses(model)]
            if not f.needs or f.needs & present:
                reasons += _onnxscript.near_misses([r for r in rules_of(f) if not isinstance(r, GraphRule)], model)
            if reasons:
                report.near_misses[f.name] = sorted(set(reasons))[:20]
    return report


def _apply(rules: Sequence[Any], model: ir.Model) -> int:
    count = sum(r.apply(model) for r in rules if isinstance(r, GraphRule))
    rewrite_rules = [r for r in rules if not isinstance(r, GraphRule)]
    if rewrite_rules:
        count += _onnxscript.apply_rules(rewrite_rules, model)
    return count


_COMMUTATIVE = frozenset({"Add", "Mul", "Max", "Min", "Sum", "And", "Or", "Xor", "Equal"})


def canonical_operands(model: ir.Model, run: FusionRun) -> list[ir.Node]:
    """Put a constant operand of a two-input commutative op second (``2 * x`` -> ``x * 2``).

    Exact (the ops are commutative elementwise with broadcasting either way round), and it
    lets rules match constants in one position. Returns the nodes it swapped.
    """
    swapped = []
    for scope in all_scopes(model):
        for node in scope:
            if (node.op_type in _COMMUTATIVE and node.domain in ("", "ai.onnx") and len(node.inputs) == 2
                    and node.inputs[0] is not None and node.inputs[1] is not None
                    and run.const(node.inputs[0]) is not None and run.const(node.inputs[1]) is None):
                _swap(node)
                swapped.append(node)
    return swapped


def _swap(node: ir.Node) -> None:
    a, b = node.inputs
    node.replace_input_with(0, b)
    node.replace_input_with(1, a)


def _op_types(model: ir.Model) -> set[str]:
    return {node.op_type for scope in all_scopes(model) for node in scope} | {
        node.op_type for f in model.functions.values() for node in f
    }


def _all_names(model: ir.Model) -> set[str]:
    """Every value, node and initializer name in the model (functions included)."""
    names: set[str] = set(model.graph.initializers)
    for scope in all_scopes(model):
        for v in getattr(scope, "inputs", ()):
            names.add(v.name)
        for node in scope:
            if node.name:
                names.add(node.name)
            names.update(v.name for v in node.outputs if v.name)
    return names
