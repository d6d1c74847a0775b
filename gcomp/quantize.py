"""Quantization as the core runs it: the pass, an accuracy budget, and a speed gate.

``gcomp.optimize(..., quantize=MODE)`` calls :func:`quantize` on the model the pipeline
produced (fusion first, so fused ops are quantized as units):

1. **Samples**: the calibration data (``--calibration``), else the user's ``--inputs``,
   else :data:`GENERATED_SAMPLES` seeded generated samples (dynamic and weight-only modes
   need no calibration: their accuracy is still measured).
2. **Quantize** a copy with the mode's registry pass (``passes/quant``), and measure the
   error against the float model on every sample under the budget's metric
   (:mod:`gcomp.verify.metrics`; default cosine >= 0.99).
3. **Sensitivity**, when the budget is not met: each quantized node's contribution is
   measured (the error of its own output quantized, on the activation it really
   receives: :mod:`gcomp.quantize_regions`); the most sensitive nodes return
   to float, the fewest that meet the budget (found by bisection over the ranking), and
   they are reported by ONNX node name with their contribution.
4. **Speed gate**: for int8-dynamic, each quantized node is first timed alone against its
   float form (:mod:`gcomp.quantize_regions`); nodes slower quantized return to float.
   Then float and quantized models are timed on ONNX Runtime (all its
   optimizations, the target's device) interleaved in one process. int8 must be faster
   (median ratio > 1); weight-only modes are chosen for size and are refused only when
   more than :data:`WEIGHT_ONLY_SLOWDOWN` slower. When the p10-p90 spread of the blocks'
   ratios straddles that threshold (a busy machine), both are timed again, three times
   longer, and that decides. ``speed_gate=False`` skips it.

A model gcomp declines to quantize (nothing to quantize, budget unreachable, slower)
raises :class:`QuantizationDeclined`: one line with the figures; the CLI exits 1 and
writes nothing.
"""

from __future__ import annotations

__all__ = ["MODES", "QuantizationDeclined", "QuantReport", "budget_of", "quantize", "summary"]

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from gcomp import inputs as _inputs
from gcomp import registry, runtime
from gcomp.backends.ort import OrtBackend
from gcomp.errors import BackendError, GcompError, OptionError, first_line
from gcomp.verify.limits import DEFAULT_MAX_TENSOR_BYTES, huge_tensor
from gcomp.verify.reference import DEFAULT_RUN_TIMEOUT
from gcomp.verify.metrics import Budget, OutputError, measure

# mode -> (registry pass, its options)
MODES: dict[str, tuple[str, dict[str, Any]]] = {
    "int8": ("quantize-static", {}),
    "int8-dynamic": ("quantize-dynamic", {}),
    "int8-weights": ("quantize-weights", {"bits": 8}),
    "int4": ("quantize-weights", {"bits": 4}),
}
WEIGHT_ONLY = frozenset({"int8-weights", "int4"})
CALIBRATED = frozenset({"int8"})  # modes that need real calibration data
PER_NODE_GATE = frozenset({"int8-dynamic"})  # each quantized node is a region of its own (gcomp.quantize_regions)
WEIGHT_ONLY_SLOWDOWN = 1.10  # weight-only modes are refused only when more than 10 % slower
GENERATED_SAMPLES = 4
SPEED_BLOCKS, SPEED_BLOCK = 6, 8  # 6 alternating blocks of 8 runs per model; the median ratio decides


class QuantizationDeclined(GcompError):
    """gcomp will not quantize this model (nothing to quantize, accuracy, or speed)."""


@dataclass
class QuantReport:
    """What quantization did, for the report and the CLI."""

    mode: str
    target: str
    budget: str
    samples: int
    sample_source: str
    quantized: list[dict[str, Any]] = field(default_factory=list)
    returned_to_float: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    accuracy: list[dict[str, Any]] = field(default_factory=list)
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    speed: dict[str, Any] | None = None
    regions: list[dict[str, Any]] = field(default_factory=list)  # per-node timings (int8-dynamic)
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Attempt:
    model: ir.Model
    details: dict[str, Any]
    errors: list[OutputError]
    excluded: frozenset[str] = frozenset()

    @property
    def within(self) -> bool:
        return all(e.within for e in self.errors)

    @property
    def worst(self) -> float:
        return max((e.error for e in self.errors if e.bounded), default=0.0)


def quantize(
    model: ir.Model,
    mode: str,
    *,
    target: str = "ort-cpu",
    budget: Budget | None = None,
    calibration: str | None = None,
    inputs: Any = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    speed_gate: bool = True,
    options: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
    verification_feeds: Mapping[str, np.ndarray] | None = None,
    timing_feeds: Mapping[str, np.ndarray] | None = None,
    timeout: float | None = None,
    max_tensor_bytes: int | None = None,
) -> tuple[ir.Model, QuantReport]:
    """The quantized model (a new one; ``model`` is not changed) and its report.

    ``verification_feeds``: the inputs the pipeline verifies on; they join the samples, so
    the budget is met on what verification then checks. ``timing_feeds``: what the speed gate
    times on (default: the first sample); a weight-only LLM calibrated on whole prompts is
    deployed one token at a time, and the two regimes differ (GPT-2 small int4: 0.8x at
    1x128, 5.7x at one token). ``timeout`` (seconds per model run)
    and ``max_tensor_bytes`` bound every run the way verification bounds its own."""
    budget = budget or Budget()
    say = progress or (lambda _text: None)
    pass_name, fixed = _mode(mode, target)
    clash = sorted(k for k in fixed if k in (options or {}))
    if clash:
        raise OptionError(f"--quantize {mode} sets {', '.join(clash)} itself; choose the mode instead")
    if mode in CALIBRATED and calibration is None:
        raise OptionError(f"--quantize {mode} calibrates activation ranges and needs real data: give "
                          "--calibration PATH (a folder of .npz samples, test_data_set_* folders, or one .npz with a "
                          "leading sample axis; at least 8 samples); generated inputs calibrate nothing real")
    samples, source = _samples(model, calibration, inputs, input_shapes, max_tensor_bytes)
    if verification_feeds is not None and (calibration is None) == (inputs is None):
        # what verification checks joins the samples (with neither, the generated ones; with
        # both, the user's --inputs: a decoder calibrated on prompts and verified on one token
        # passed its budget at 0.994 and then failed verification at 0.980); with --calibration
        # alone verification runs on its first sample, with --inputs alone on those inputs
        samples = [dict(verification_feeds), *samples]
        source += " and the verification inputs"
    if timing_feeds is None and inputs is not None and calibration is not None:  # no verification run
        try:
            timing_feeds = _given(model, inputs, dict(input_shapes or {}), max_tensor_bytes or DEFAULT_MAX_TENSOR_BYTES)
        except _inputs.CannotGenerate as e:
            raise QuantizationDeclined(f"cannot time on the given inputs: {e}; nothing written") from None
    expected = _float_outputs(model, samples, source, timeout, max_tensor_bytes)
    _refuse_empty(samples, expected, source)
    run = _Quantizer(model, pass_name, {**fixed, **dict(options or {}), "target": target}, samples, expected,
                     budget, timeout)
    say(f"quantize ({mode}): quantizing")
    attempt = run.attempt(frozenset(run.excluded))
    _check_excluded(run.excluded, attempt.details)
    report = QuantReport(mode, target, budget.describe(), len(samples), source)
    if not attempt.details.get("quantized"):
        reason = attempt.details.get("note") or _nothing_to_quantize(mode, attempt.details)
        raise QuantizationDeclined(f"--quantize {mode}: {reason}; nothing written")
    if not attempt.within:
        say(f"quantize ({mode}): {budget.describe()} not met; measuring each node's contribution")
        attempt, report.returned_to_float = run.meet_budget(attempt)
    if speed_gate and mode in PER_NODE_GATE:
        say(f"quantize ({mode}): timing each quantized node against its float form")
        attempt = _per_node_gate(run, attempt, report, timing_feeds or samples[0], target)
    _describe(report, attempt)
    if speed_gate:
        say(f"quantize ({mode}): timing float and quantized models")
        report.speed = _speed(model, attempt.model, timing_feeds or samples[0], target, mode)
        _gate(mode, report.speed)
    attempt.model.metadata_props["gcomp.quantize"] = mode
    return attempt.model, report


def _mode(mode: str, target: str) -> tuple[str, dict[str, Any]]:
    if mode not in MODES:
        raise OptionError(f"unknown quantization mode '{mode}' (modes: {', '.join(MODES)})")
    if target.startswith("tvm"):
        raise OptionError(f"--quantize {mode}: quantized models are timed and verified on ONNX Runtime; "
                          f"TVM targets ({target}) are not supported yet: use --target ort-cpu or portable")
    return MODES[mode]


def _samples(model, calibration, inputs, input_shapes, max_bytes) -> tuple[list[dict[str, np.ndarray]], str]:
    """The samples accuracy is measured on; inputs are generated under verification's size
    bound (found by the fuzz campaign: a declared dim of 10^12 allocated terabytes)."""
    if calibration is not None:
        return _inputs.load_calibration(calibration, model), f"calibration data ({calibration})"
    shapes = dict(input_shapes or {})
    limit = max_bytes or DEFAULT_MAX_TENSOR_BYTES
    try:
        if inputs is not None:
            return [_given(model, inputs, shapes, limit)], "the given inputs"
        samples = [_inputs.generate_inputs(model, shapes=shapes, seed=seed, max_bytes=limit)[0]
                   for seed in range(GENERATED_SAMPLES)]
    except _inputs.CannotGenerate as e:  # InputsTooLarge included
        raise QuantizationDeclined(f"cannot measure accuracy: {e}; nothing written") from None
    return samples, f"{GENERATED_SAMPLES} generated samples (seeded; --calibration gives real data)"


def _given(model, inputs, shapes, limit) -> dict[str, np.ndarray]:
    """Feeds from the user's ``inputs`` (a path or arrays), the rest generated."""
    given = _inputs.load_inputs(inputs, model) if not isinstance(inputs, Mapping) else dict(inputs)
    return _inputs.generate_inputs(model, shapes=shapes, given=given, max_bytes=limit)[0]


def _run_all(model: ir.Model, samples, timeout: float | None) -> list[dict[str, np.ndarray]]:
    """``model``'s outputs on every sample, from one reference session (building a session
    serializes the model: on GPT-2 small, 0.6 s a time, which per sample was two thirds of
    int4's build time)."""
    exe = runtime.reference(model)
    return [exe.run(s, timeout=timeout or DEFAULT_RUN_TIMEOUT) for s in samples]


def _float_outputs(model, samples, source: str, timeout, max_tensor_bytes) -> list[dict[str, np.ndarray]]:
    """The float model's outputs on every sample, under verification's limits: nothing runs
    that would allocate a tensor over ``max_tensor_bytes`` or loop forever, and every run
    has a deadline."""
    too_big = huge_tensor(model, max_tensor_bytes or DEFAULT_MAX_TENSOR_BYTES)
    if too_big:
        raise QuantizationDeclined(f"cannot measure accuracy: {too_big}; nothing written")
    try:
        return _run_all(model, samples, timeout)
    except BackendError as e:
        raise QuantizationDeclined(f"cannot measure accuracy: the float model does not run on {source}: "
                                   f"{first_line(e)}; nothing written") from None


def _refuse_empty(samples, expected, source: str) -> None:
    """A sample on which every float output is empty (a batch or sequence of 0) measures no
    accuracy, and some quantized kernels divide by its size (ONNX Runtime's QAttention dies of
    SIGFPE on a batch of 0; found by the fuzz campaign): decline before running one."""
    for i, (feeds, outputs) in enumerate(zip(samples, expected)):
        floats = [np.asarray(v) for v in outputs.values()
                  if isinstance(v, np.ndarray) and v.dtype.kind == "f"]
        if floats and all(v.size == 0 for v in floats):
            empty = next((f"input '{k}' has shape {list(np.shape(v))}" for k, v in feeds.items()
                          if isinstance(v, np.ndarray) and v.size == 0), "its inputs are empty")
            raise QuantizationDeclined(
                f"cannot measure accuracy: every float output is empty on sample {i + 1} of {source} ({empty}); "
                "give inputs with data (--inputs, --calibration or --input-shape); nothing written")


def _copy(model: ir.Model) -> ir.Model:
    return model.clone()


class _Quantizer:
    """Quantizes copies of one float model with one pass, leaving chosen nodes float."""

    def __init__(self, model, pass_name, options, samples, expected, budget: Budget, timeout=None) -> None:
        self.model, self.pass_name, self.samples, self.expected, self.budget = (
            model, pass_name, samples, expected, budget)
        self.timeout = timeout
        options = dict(options)
        self.excluded = frozenset(options.pop("exclude_nodes", ()) or ())
        self.options = options
        self.context = dataclasses.replace(runtime.pass_context(), calibration=tuple(samples), memo={})

    def attempt(self, excluded: frozenset[str]) -> _Attempt:
        copy = _copy(self.model)
        step = registry.get_pass(self.pass_name).create(
            context=self.context, exclude_nodes=tuple(sorted(excluded)), **self.options)
        result = step(copy)
        details = getattr(result, "details", {}) or {}
        actual = _run_all(result.model, self.samples, self.timeout) if details.get("quantized") else self.expected
        return _Attempt(result.model, details, measure(self.expected, actual, self.budget), excluded)

    def meet_budget(self, full: _Attempt) -> tuple[_Attempt, list[dict[str, Any]]]:
        """Return the most sensitive nodes to float, the fewest that meet the budget."""
        from gcomp.quantize_regions import local_errors

        nodes = [q["node"] for q in full.details["quantized"]]
        contribution = local_errors(self.model, nodes, self.samples[0], self.budget, pass_name=self.pass_name,
                                    options=self.options, target=self.options.get("target", "ort-cpu"))
        contribution.update({n: self._alone(nodes, n) for n in nodes if n not in contribution})
        ranked = sorted(nodes, key=lambda n: -contribution[n])
        best = None
        lo, hi = 1, len(ranked)
        while lo <= hi:  # the smallest k whose top-k exclusion meets the budget
            k = (lo + hi) // 2
            trial = self.attempt(self.excluded | frozenset(ranked[:k]))
            if trial.within:
                best, hi = (k, trial), k - 1
            else:
                lo = k + 1
        if best is None or not best[1].details.get("quantized"):
            worst = ", ".join(f"{n} ({contribution[n]:.3g})" for n in ranked[:5])
            raise QuantizationDeclined(
                f"{self.budget.describe()} cannot be met with any node quantized (error {full.worst:.4g} "
                f"quantizing all; most sensitive: {worst}); nothing written")
        k, attempt = best
        back = [{"node": n, "contribution": contribution[n], "reason": f"its own output's {self.budget.metric} "
                 f"error quantized: {contribution[n]:.4g}"} for n in ranked[:k]]
        return attempt, back

    def _alone(self, nodes: list[str], node: str) -> float:
        """The model's error with only ``node`` quantized (for nodes the one-node
        measure cannot rebuild, such as an embedding Gather)."""
        return self.attempt(self.excluded | (frozenset(nodes) - {node})).worst


def _per_node_gate(run: _Quantizer, attempt: _Attempt, report: QuantReport, feeds, target: str) -> _Attempt:
    """Nodes slower quantized than float return to float (measured one node at a time)."""
    from gcomp.quantize_regions import ROUNDS, slower_nodes

    names = [q["node"] for q in attempt.details["quantized"]]
    timings = slower_nodes(run.model, names, feeds, pass_name=run.pass_name, options=run.options, target=target)
    slow = [t for t in timings if not t.faster]
    narrower = run.attempt(attempt.excluded | {t.node for t in slow}) if slow else None
    kept = narrower is None or not narrower.within or not narrower.details.get("quantized")
    report.regions = [dict(t.to_dict(), decision="quantized" if t.faster else (
        "quantized (slower, but float breaks the budget or leaves nothing)" if kept else "float (slower quantized)"))
        for t in timings]
    if kept:
        return attempt
    report.returned_to_float += [{"node": t.node, "contribution": None, "reason": (
        f"slower quantized: {t.quantized_us:.1f} us vs {t.float_us:.1f} us float (median of "
        f"{ROUNDS} interleaved runs of the node alone)")} for t in slow]
    return narrower


def _check_excluded(excluded: frozenset[str], details: Mapping[str, Any]) -> None:
    """An ``exclude_nodes`` name that is no candidate is a mistake (a typo, or a node a fusion
    before quantization replaced: int8-dynamic on ort-* quantizes fused Attention nodes)."""
    known = {e["node"] for e in (*(details.get("quantized") or ()), *(details.get("skipped") or ()))}
    unknown = sorted(excluded - known)
    if unknown:
        shown = ", ".join(sorted(known)[:8]) + (", ..." if len(known) > 8 else "")
        raise OptionError(f"exclude_nodes: no quantization candidate named {', '.join(repr(n) for n in unknown)} "
                          f"(candidates after the pipeline: {shown or 'none'})")


def _nothing_to_quantize(mode: str, details: Mapping[str, Any]) -> str:
    skipped = details.get("skipped") or []
    what = "MatMul/Gemm" + (" or embedding Gather" if mode in WEIGHT_ONLY else "") + (" or Conv" if mode in CALIBRATED else "")
    if skipped:
        reasons = sorted({s["reason"] for s in skipped})
        return f"no {what} could be quantized ({len(skipped)} candidate(s): {'; '.join(reasons[:3])})"
    return f"the model has no {what} with constant weights to quantize"


def _describe(report: QuantReport, attempt: _Attempt) -> None:
    d = attempt.details
    report.quantized = list(d.get("quantized") or [])
    report.skipped = list(d.get("skipped") or [])
    report.weight_bytes_before = int(d.get("weight_bytes_before") or 0)
    report.weight_bytes_after = int(d.get("weight_bytes_after") or 0)
    report.accuracy = [e.to_dict() for e in attempt.errors]


def _threshold(mode: str) -> float:
    """The speed-up below which the gate declines."""
    return 1 / WEIGHT_ONLY_SLOWDOWN if mode in WEIGHT_ONLY else 1.0


def _speed(float_model: ir.Model, quant_model: ir.Model, feeds, target: str, mode: str) -> dict[str, Any]:
    """Both models on ONNX Runtime (all optimizations) on the target's device, interleaved
    in blocks (gcomp.runtime.time_interleaved)."""
    device = "cuda" if target.endswith("cuda") else "cpu"
    exes = [OrtBackend().compile(m, device) for m in (float_model, quant_model)]
    t = runtime.time_interleaved(*exes, feeds, blocks=SPEED_BLOCKS, block=SPEED_BLOCK).summary()
    if t["ratio_p10"] <= _threshold(mode) <= t["ratio_p90"]:
        # the blocks' spread straddles the decision (a busy machine): measure three times longer
        t = runtime.time_interleaved(*exes, feeds, blocks=3 * SPEED_BLOCKS, block=SPEED_BLOCK).summary()
    return {
        "rounds": t["rounds"], "float_ms_min": t["a_ms_min"], "quantized_ms_min": t["b_ms_min"],
        "float_ms_median": t["a_ms_median"], "quantized_ms_median": t["b_ms_median"],
        "speedup_median": t["ratio_median"], "speedup_p10": t["ratio_p10"], "speedup_p90": t["ratio_p90"],
    }


def _gate(mode: str, speed: Mapping[str, Any]) -> None:
    ratio = speed["speedup_median"]
    figures = (f"float {speed['float_ms_median']:.3f} ms, quantized {speed['quantized_ms_median']:.3f} ms "
               f"(median of {speed['rounds']} runs in interleaved blocks; speed-up {ratio:.2f}x, "
               f"p10-p90 {speed['speedup_p10']:.2f}-{speed['speedup_p90']:.2f}x)")
    if mode in WEIGHT_ONLY and ratio < _threshold(mode):
        raise QuantizationDeclined(f"--quantize {mode} is more than 10 % slower than float: {figures}; "
                                   "nothing written (--no-speed-gate keeps it)")
    if mode not in WEIGHT_ONLY and ratio <= _threshold(mode):
        raise QuantizationDeclined(f"--quantize {mode} is not faster than float: {figures}; nothing written "
                                   "(--no-speed-gate keeps it)")


def summary(report: QuantReport) -> list[str]:
    """Lines for the CLI."""
    lines = [f"quantized ({report.mode}, {report.target}): {len(report.quantized)} node(s); accuracy on "
             f"{report.samples} sample(s) from {report.sample_source}: {report.budget}"]
    for a in report.accuracy:
        cos = f", cosine {a['cosine']:.5f}" if a.get("cosine") is not None else ""
        margin = f", largest float margin at a changed token {a['margin']:.4g}" if a.get("margin") is not None else ""
        bound = "" if a.get("bounded", True) else " (KV cache: reported, not bounded)"
        lines.append(f"  output '{a['name']}': error {a['error']:.4g}{cos}{margin}{bound}")
    if report.weight_bytes_before:
        lines.append(f"  weights touched: {report.weight_bytes_before:,} -> {report.weight_bytes_after:,} bytes "
                     f"({report.weight_bytes_after / report.weight_bytes_before:.3f}x)")
    for r in report.returned_to_float:
        lines.append(f"  kept float: {r['node']} ({r['reason']})")
    if report.speed:
        s = report.speed
        lines.append(f"  speed: {s['speedup_median']:.2f}x (p10-p90 {s['speedup_p10']:.2f}-{s['speedup_p90']:.2f}x; "
                     f"float {s['float_ms_median']:.3f} ms, quantized {s['quantized_ms_median']:.3f} ms)")
    return lines


def budget_of(metric: str | None, tolerance: float | None) -> Budget:
    return Budget(metric or "cosine", tolerance if tolerance is not None else 0.01)
