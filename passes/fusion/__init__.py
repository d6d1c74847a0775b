"""Operator fusion: onnxscript rewriter rules, one file per fusion, each opening with its math.

Passes registered here:

- ``fuse``: the portable fusions (standard ONNX ops: Conv/Gemm folding, LayerNormalization,
  Gelu, RMSNormalization, Attention), each fired only when the model's opset has the op
  and the ``--target`` accepts it (pipeline O2).
- ``fuse-target``: the target-specific fusions (``com.microsoft`` ops for ONNX Runtime;
  pipeline O3).
- ``upgrade-opset``: converts the model to ``--target-opset`` first, when asked, so a
  newer fused op may be emitted.

Both fusion passes walk the main graph, every If/Loop/Scan body and every model function
(rules that need new initializers do not fire inside functions). ``--explain-fusion``
records, per rule, how often it fired, why it could not run (opset, target) and the
near misses that its ``check`` rejected.

Every module in this folder whose name does not start with ``_`` is a fusion file and
is imported (registering its rules) in alphabetical order of its ``ORDER`` constant.
"""

from __future__ import annotations

__all__ = ["Fuse", "FuseTarget", "UpgradeOpset", "FusionResult"]

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Annotated, Any

import onnx_ir as ir

from gcomp.errors import OptionError
from gcomp.passes.fusion import _engine
from gcomp.passes.fusion.targets import TARGETS, backend_of, check_target
from gcomp.registry import register_pass

_loaded = False


def _load_rules() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    ranks = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "targets":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        ranks[module.__name__] = (getattr(module, "ORDER", 50), info.name)
    # Catalogue order: by module ORDER, then registration order within a module.
    _engine.FUSIONS.sort(key=lambda f: ranks.get(f.module, (50, f.module)))


@dataclass
class FusionResult(ir.passes.PassResult):
    details: dict[str, Any] = field(default_factory=dict)


class _FuseBase(ir.passes.InPlacePass):
    """The two fusion passes differ only in which rule families they run; the registry
    reads both passes' options from this one signature."""

    families: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        target: Annotated[str, f"what the output must run on: {', '.join(TARGETS)}"] = "portable",
        explain_fusion: Annotated[bool, "record near misses of every rule in the report"] = False,
    ) -> None:
        super().__init__()
        self.target = check_target(target)
        self.explain_fusion = explain_fusion

    def _families(self) -> tuple[str, ...]:
        return self.families

    def call(self, model: ir.Model) -> FusionResult:
        _load_rules()
        fusions = _engine.fusions_for(self._families())
        report = _engine.run_fusions(model, fusions, self.target, explain=self.explain_fusion)
        fired = {k: v for k, v in report.fired.items() if v}
        details: dict[str, Any] = {"target": self.target, "fired": fired}
        if self.explain_fusion:
            details["rules"] = {
                f.name: {
                    "fired": report.fired.get(f.name, 0),
                    **({"not_run": report.skipped[f.name]} if f.name in report.skipped else {}),
                    **({"near_misses": report.near_misses[f.name]} if f.name in report.near_misses else {}),
                    "summary": f.summary,
                }
                for f in fusions
            }
        return FusionResult(model, modified=bool(fired), details=details)


@register_pass("fuse")
class Fuse(_FuseBase):
    """Fuse subgraphs into standard ONNX ops the target accepts (Gemm, LayerNormalization, Gelu, ...)."""

    families = ("portable",)


@register_pass("fuse-target")
class FuseTarget(_FuseBase):
    """Fuse into the target's own fastest ops (ONNX Runtime: com.microsoft contrib ops); no-op for portable."""

    def _families(self) -> tuple[str, ...]:
        return () if self.target == "portable" else (backend_of(self.target),)


@register_pass("upgrade-opset")
class UpgradeOpset(ir.passes.InPlacePass):
    """Convert the model to a newer default-domain opset (0: leave it), so newer fused ops may be emitted."""

    def __init__(self, *, target_opset: Annotated[int, "opset to upgrade to first (0: keep the model's)"] = 0) -> None:
        super().__init__()
        self.target_opset = target_opset

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        current = _engine.model_opset(model)
        if not self.target_opset or self.target_opset == current:
            return ir.passes.PassResult(model, modified=False)
        if self.target_opset < current:
            raise OptionError(
                f"--target-opset {self.target_opset} is older than the model's opset {current}; gcomp only upgrades"
            )
        from onnxscript import version_converter

        try:
            version_converter.convert_version(model, self.target_opset, fallback=True)
        except Exception as e:  # the converter names the op it cannot adapt
            raise OptionError(f"cannot upgrade to opset {self.target_opset}: {e}") from None
        if _engine.model_opset(model) != self.target_opset:
            raise OptionError(f"cannot upgrade to opset {self.target_opset}: the converter left opset "
                              f"{_engine.model_opset(model)}")
        return ir.passes.PassResult(model, modified=True)
