"""How :func:`gcomp.optimize` fits quantization around its pipeline: the plan, the fusion it
needs first, the run, and verification under the accuracy budget.

- :func:`plan` takes the quantization pass's options out of the pipeline's.
- :func:`fusion_steps`: ``int8-dynamic`` on an ONNX Runtime target (``ort-*``) runs the
  target's fusions (O3's ``fuse-target`` stage) after the pipeline (O1 and up) when it has
  not run them,
  so an attention block is one ``com.microsoft.Attention`` that the pass quantizes as a
  unit (``QAttention``: on MiniLM at 1x128 about 2.5x fp32 where the same MatMuls quantized
  one by one give about 2.0x; bench/QUANT.md). The other modes quantize MatMul/Gemm weights
  that such a fusion would hide inside float ops, so they get none.
- :func:`run` quantizes the pipeline's result (:mod:`gcomp.quantize`).
- :func:`check` verifies under the budget and names the first node over it.
"""

from __future__ import annotations

__all__ = ["TARGET_FUSED", "Quantize", "check", "fusion_steps", "needs_target_fusion", "on_calibration_data", "plan",
           "run"]

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from gcomp import registry
from gcomp.errors import OptionError
from gcomp.passes.pipelines import FINISH, TARGET_FUSE
from gcomp.verify.metrics import Budget

TARGET_FUSED = frozenset({"int8-dynamic"})  # modes that quantize the target's fused ops (QAttention)
DEFAULT_TARGET = "ort-cpu"


@dataclass(frozen=True)
class Quantize:
    """What :func:`gcomp.optimize` quantizes, after the pipeline (``gcomp.quantize``)."""

    mode: str
    budget: Budget
    calibration: str | None = None
    speed_gate: bool = True
    target: str = DEFAULT_TARGET
    options: Mapping[str, Any] = field(default_factory=dict)


def plan(mode, calibration, metric, speed_gate, options: dict[str, Any], precision, pipeline) -> Quantize:
    """Take the quantization pass's options out of ``options`` (the pipeline's passes get
    the rest; ``tolerance`` is the accuracy budget's). ``precision`` is refused: quantization
    works on float32 weights."""
    from gcomp.quantize import MODES

    if mode not in MODES:
        raise OptionError(f"unknown quantization mode '{mode}' (modes: {', '.join(MODES)})")
    if precision:
        raise OptionError("--quantize and --precision cannot be combined: quantization works on float32 weights")
    declared = {o.name for o in registry.get_pass(MODES[mode][0]).options} - {"target"}
    mine = {k: options.pop(k) for k in list(options) if k in declared}
    tolerance = options.pop("tolerance", None)
    target = options.get("target", DEFAULT_TARGET)
    if "target" not in registry.pipeline_options(pipeline):  # no fusion pass: the target is quantization's
        options.pop("target", None)
    return Quantize(mode, Budget(metric or "cosine", 0.01 if tolerance is None else float(tolerance)),
                    str(calibration) if calibration is not None else None, speed_gate, target, mine)


def fusion_steps(quant: Quantize | None, pipeline, context: registry.PassContext,
                 options: Mapping[str, Any] | None = None) -> list:
    """The steps (in the pipeline's ``(passes, repeat)`` form) of the target's fusions, then
    the pipeline's finish (forget inferred shapes, sort), when ``quant`` needs them and
    ``pipeline`` does not run them already; else none. Each pass gets the pipeline's
    ``options`` it declares (a folding limit, say) and the quantization target."""
    if quant is None or not needs_target_fusion(quant, pipeline):
        return []
    steps = []
    for stage in (TARGET_FUSE, FINISH):
        group = []
        for name in stage.passes:
            info = registry.get_pass(name)
            mine = {o.name: options[o.name] for o in info.options if options and o.name in options}
            if any(o.name == "target" for o in info.options):
                mine["target"] = quant.target
            group.append((name, info.create(context=context, **mine)))
        steps.append((group, stage.repeat))
    return steps


def needs_target_fusion(quant: Quantize, pipeline) -> bool:
    """Whether ``quant`` runs the target's fusions after ``pipeline``: int8-dynamic on an
    ``ort-*`` target quantizing Attention, after a pipeline that cleans up (not O0, "validate
    only") and has no target fusion of its own."""
    if quant.mode not in TARGET_FUSED or not quant.target.startswith("ort"):
        return False
    if "Attention" not in quant.options.get("op_types", ("Attention",)):
        return False
    stages = [s for s in registry.resolve(pipeline) if isinstance(s, registry.Stage)]
    return any("fold-constants" in s.passes for s in stages) and not any("fuse-target" in s.passes for s in stages)


def check(reference, float_model: ir.Model, quantized: ir.Model, budget: Budget):
    """Verification under the budget; a miss names the first node over it."""
    from gcomp.verify.divergence import first_divergent_node

    verification = reference.check_budget(quantized, budget)
    if not verification.passed and verification.outputs:
        divergence = first_divergent_node(float_model, quantized, reference.feeds, budget)
        if divergence is not None:
            verification.reason += f"; {divergence.describe(budget)}"
    return verification


def on_calibration_data(checks, quant: Quantize | None, model: ir.Model):
    """Verify a model quantized on calibration data on real data too: its first sample."""
    if quant is None or quant.calibration is None or checks.inputs is not None:
        return checks
    from gcomp.inputs import load_calibration

    return dataclasses.replace(checks, inputs=load_calibration(quant.calibration, model)[0])


def run(loaded, quant: Quantize, checks, progress, reference, given: tuple[bool, bool]) -> Any:
    """Quantize the pipeline's result (gcomp.quantize); ``loaded.model`` is replaced.
    ``given``: did the user give (``--inputs``, ``--input-shape``)? The speed gate times on
    the verification inputs when the user described them (the shape the model is deployed
    at), else on the first sample."""
    user_inputs, user_shapes = given
    from gcomp.quantize import quantize

    say = (lambda text: progress(text, 0, None)) if progress else None
    loaded.model, report = quantize(
        loaded.model, quant.mode, target=quant.target, budget=quant.budget, calibration=quant.calibration,
        inputs=checks.inputs if user_inputs or quant.calibration is None else None,
        input_shapes=checks.input_shapes, speed_gate=quant.speed_gate,
        options=quant.options, progress=say, verification_feeds=reference.feeds if reference else None,
        timing_feeds=reference.feeds if reference and (user_inputs or user_shapes) else None,
        timeout=checks.verify_timeout, max_tensor_bytes=checks.max_tensor_bytes,
    )
    return report
