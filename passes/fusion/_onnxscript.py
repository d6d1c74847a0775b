"""The one place the fusion passes reach into onnxscript's rewriter beyond its public API.

Fusion rules are onnxscript rewriter rules written against the public
``onnxscript.rewriter.pattern`` API. The engine needs two things that API does not give,
and both live here, behind a version check:

- the root op of a rule's pattern, to try a rule only at nodes of that op
  (:class:`RootFilteredRule`; onnxscript tries every rule at every node and lets the
  matcher reject, ~10^5 calls on a small transformer with the commuted variants;
  docs/measurements.md);
- the near misses of a rule set (:func:`near_misses`: the match tracer's records of
  matches whose ``check`` failed).

Importing this module raises :class:`gcomp.errors.GcompError` when the installed
onnxscript is outside :data:`SUPPORTED`, the range these internals were tested with (the
same range pyproject.toml pins).
"""

from __future__ import annotations

__all__ = ["SUPPORTED", "RootFilteredRule", "apply_rules", "near_misses", "root_filtered"]

import re
from collections.abc import Sequence

import onnx_ir as ir
import onnxscript
from onnxscript.rewriter import pattern

from gcomp.errors import GcompError

SUPPORTED = ((0, 7), (0, 8))  # [lowest, highest): onnxscript 0.7.x


def _check_version(version: str) -> None:
    found = re.match(r"(\d+)\.(\d+)", version)
    lowest, highest = SUPPORTED
    if found is None or not lowest <= (int(found[1]), int(found[2])) < highest:
        raise GcompError(
            f"gcomp's fusion passes support onnxscript >={lowest[0]}.{lowest[1]},<{highest[0]}.{highest[1]}; "
            f"onnxscript {version} is installed (pip install 'onnxscript>={lowest[0]}.{lowest[1]},"
            f"<{highest[0]}.{highest[1]}')"
        )


_check_version(onnxscript.__version__)

# Private modules: only after the version check.
from onnxscript.rewriter._pattern_ir import NodeOutputPattern, StringConstantPattern  # noqa: E402


def _domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


def _root_op(rule: pattern.RewriteRule) -> tuple[str, str] | None:
    """(domain, op_type) of the node a single-output pattern must be rooted at, or None."""
    outputs = rule._target_pattern._outputs
    if len(outputs) != 1 or not isinstance(outputs[0], NodeOutputPattern):
        return None
    root = outputs[0].producer()
    # (commuted copies of a pattern keep the op as a constant pattern, not an identifier)
    if not isinstance(root.op, StringConstantPattern) or not isinstance(root.domain, StringConstantPattern):
        return None
    return _domain(root.domain.value()), root.op.value()


class RootFilteredRule(pattern.RewriteRule):
    """``rule``, tried only at nodes of ``op_type`` in ``domain``: a single-output pattern can
    only match at a node of its output node's op type, so skipping the others changes no
    match. Built from the rule's own pattern, replacement, check and matcher (a new rule
    object: the original is left as it was)."""

    def __init__(self, rule: pattern.RewriteRule, domain: str, op_type: str) -> None:
        super().__init__(
            rule._target_pattern, rule._replacement_pattern, rule._condition_function, rule._matcher,
            rule._verbose, rule.name, rule.remove_nodes, rule.graph_pre_visitor, rule.graph_post_visitor,
            rule.as_function,
        )
        self.root = (domain, op_type)
        # what a node's own fields may hold (onnxscript calls this at every node: keep it cheap)
        self._op_type = op_type
        self._domains = ("", "ai.onnx") if domain == "" else (domain,)

    def try_rewrite(self, model, graph_or_function, node, **kwargs):
        if node.op_type != self._op_type or node.domain not in self._domains:
            return None
        return super().try_rewrite(model, graph_or_function, node, **kwargs)


def root_filtered(rule: pattern.RewriteRule) -> pattern.RewriteRule:
    """``rule`` as a :class:`RootFilteredRule` when its pattern has one root op, else itself."""
    root = _root_op(rule)
    return rule if root is None else RootFilteredRule(rule, *root)


def apply_rules(rules: Sequence[pattern.RewriteRule], model: ir.Model) -> int:
    """Apply ``rules`` (in order at each node) to every scope of ``model``; how many fired."""
    return pattern.RewriteRuleSet(list(rules)).apply_to_model(model)


def near_misses(rules: Sequence[pattern.RewriteRule], model: ir.Model) -> list[str]:
    """``at NODE: reason`` for every match of ``rules`` that their ``check`` rejected (the
    model is left unchanged: the tracer only records)."""
    if not rules:
        return []
    tracer = pattern.MatchingTracer()
    pattern.RewriteRuleSet(list(rules)).apply_to_model(model, tracer=tracer)
    reasons = []
    for matches in tracer.best_matches_map.values():
        for info in matches:
            if info.status == pattern.MatchStatus.CONDITION_FAILED:
                where = info.root_node.name or info.root_node.op_type
                reasons.append(f"at {where}: {info.match_result.reason or 'check failed'}")
    return reasons
