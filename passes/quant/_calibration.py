"""Activation ranges for static quantization: the float model run on calibration samples.

:func:`collect` runs a copy of the float model once per sample (through the pass's
:class:`gcomp.registry.Runtime`) with every tensor asked for exposed as an extra graph
output, and returns one range ``(lo, hi)`` per tensor (only finite values count):

- ``minmax``: ``lo = min``, ``hi = max`` over every element of every sample.
- ``percentile`` (``p``, 99.999 by default): a second run per sample fills a histogram of
  :data:`BINS` bins over the min/max range. Asymmetric: ``(100 - p) / 2`` % of the
  elements are cut from each end: ``lo`` is the left edge of the first bin where the
  cumulative fraction reaches ``(100 - p) / 200``, ``hi`` the right edge of the first bin
  where it reaches ``1 - (100 - p) / 200``. Symmetric: the histogram is of ``|x|`` over
  ``[0, max |x|]`` and ``t`` is the right edge of the first bin where it reaches
  ``p / 100``; the range is ``(-t, t)``. Either way the range lies inside min/max.
- ``entropy`` (TensorRT's calibration, also ONNX Runtime's): a histogram of ``|x|`` over
  ``[0, max |x|]`` in :data:`BINS` bins, exact zeros left out (0 is exact at any
  threshold, and the spike a Relu leaves there would otherwise dominate the divergence of
  every threshold whose first quantized level spans more than one bin: measured, it cut a
  Relu output's range to a quarter); for each candidate threshold ``i`` (in bins, from
  the number of quantized levels ``L`` up to :data:`BINS`) the reference distribution
  ``P`` is ``hist[:i]`` with every count beyond ``i`` added to its last bin, and the
  candidate ``Q`` is ``hist[:i]`` merged into ``L`` equal chunks, each chunk's total spread
  evenly back over its non-empty bins; the ``i`` minimising ``KL(P || Q) = sum P log(P /
  Q)`` (both normalised; an empty ``Q`` bin where ``P`` has mass counts as 1e-10) gives
  ``t = i * bin width``. ``L`` is 255 for an asymmetric (uint8) tensor that is never
  negative, else 128 (int8's magnitudes, or a uint8 range split around zero). The range is
  ``(-t, t)`` when symmetric, else ``(max(lo, -t), min(hi, t))``.

numpy only; the runtime is the pass context's (ONNX Runtime with its optimizations off).
"""

from __future__ import annotations

__all__ = ["BINS", "METHODS", "collect", "exposed_runs", "kl_threshold", "samples_for"]

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from gcomp.errors import BackendError, GcompError
from gcomp.registry import PassContext, Runtime

METHODS = ("minmax", "percentile", "entropy")
BINS = 2048
_EPS = 1e-10

Feeds = Mapping[str, np.ndarray]


def samples_for(model: ir.Model, context: PassContext | None) -> tuple[list[Feeds], str | None]:
    """(the samples a calibrating pass measures on, None), or ([], why there are none):
    ``context.calibration``, else one sample made by ``context.inputs`` the way verification
    makes its own."""
    if context is None or context.runtime is None:
        return [], ("no runtime to calibrate on (run the pass through gcomp.optimize or give it "
                    "context=gcomp.runtime.pass_context())")
    if context.calibration:
        return list(context.calibration), None
    if context.inputs is None:
        return [], "no calibration samples (the context has neither calibration nor inputs)"
    try:
        return [context.inputs(model, None)], None
    except GcompError as e:
        return [], f"no calibration samples ({str(e).splitlines()[0]})"


def collect(model: ir.Model, runtime: Runtime, samples: Sequence[Feeds], values: Sequence[ir.Value], *,
            method: str = "minmax", percentile: float = 99.999,
            symmetric: bool = False) -> dict[str, tuple[float, float]]:
    """``{value name: (lo, hi)}`` for each of ``values`` (float tensors of ``model``'s main
    graph, graph inputs included) over ``samples``, by ``method`` (module docstring)."""
    names = [v.name for v in values]
    lo = dict.fromkeys(names, np.inf)
    hi = dict.fromkeys(names, -np.inf)
    for arrays in exposed_runs(model, runtime, samples, names):
        for name, x in _finite(arrays).items():
            if x.size:
                lo[name], hi[name] = min(lo[name], float(x.min())), max(hi[name], float(x.max()))
    ranges = {n: (lo[n], hi[n]) if lo[n] <= hi[n] else (0.0, 0.0) for n in names}
    if method == "minmax":
        return ranges
    absolute = symmetric or method == "entropy"
    hists = {n: np.zeros(BINS, np.int64) for n in names}
    for arrays in exposed_runs(model, runtime, samples, names):
        for name, x in _finite(arrays).items():
            if method == "entropy":
                x = x[x != 0]  # 0 is exact at every threshold: a Relu's spike there would skew the KL
            hists[name] += _histogram(np.abs(x) if absolute else x, _hist_range(ranges[name], absolute))
    return {n: _narrow(ranges[n], hists[n], method, percentile, symmetric) for n in names}


def _exposing(model: ir.Model, names: Sequence[str]) -> ir.Model:
    """A copy of ``model`` whose graph also outputs ``names`` (graph inputs are fed)."""
    copy = model.clone()
    graph = copy.graph
    present = {v.name for v in graph.outputs} | {v.name for v in graph.inputs}
    wanted = set(names) - present
    for node in graph:
        for v in node.outputs:
            if v.name in wanted:
                if v.type is None:
                    v.type = ir.TensorType(ir.DataType.FLOAT)
                graph.outputs.append(v)
                wanted.discard(v.name)
    if wanted:
        raise GcompError(f"quantization: cannot find tensor(s) {', '.join(sorted(wanted))} to calibrate")
    return copy


def exposed_runs(model: ir.Model, runtime: Runtime, samples: Sequence[Feeds],
                 names: Sequence[str]) -> Iterator[dict[str, np.ndarray]]:
    """Per sample, ``{name: array}`` for each of ``names`` (float tensors of ``model``'s main
    graph, graph inputs included): one run of a copy with them exposed as outputs."""
    copy = _exposing(model, names)
    for feeds in samples:
        try:
            outs = runtime.run(copy, feeds)
        except BackendError as e:
            raise GcompError(f"calibration: the float model does not run: {str(e).splitlines()[0]}") from None
        yield {name: np.asarray(feeds[name] if name in feeds else outs[name]) for name in names}


def _finite(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The finite float32 elements of each array, flattened."""
    found = {}
    for name, x in arrays.items():
        x = np.asarray(x, dtype=np.float32).ravel()
        found[name] = x[np.isfinite(x)]
    return found


def _hist_range(rng: tuple[float, float], absolute: bool) -> tuple[float, float]:
    lo, hi = rng
    return (0.0, max(abs(lo), abs(hi))) if absolute else (lo, hi)


def _histogram(x: np.ndarray, rng: tuple[float, float]) -> np.ndarray:
    lo, hi = rng
    if hi <= lo:
        return np.zeros(BINS, np.int64)
    return np.histogram(x, bins=BINS, range=(lo, hi))[0]


def _narrow(rng: tuple[float, float], hist: np.ndarray, method: str, percentile: float,
            symmetric: bool) -> tuple[float, float]:
    """The percentile or entropy range of one tensor from its histogram."""
    lo, hi = rng
    total = hist.sum()
    if total == 0 or hi <= lo:
        return rng
    if method == "entropy" or symmetric:
        width = max(abs(lo), abs(hi)) / BINS
        if method == "entropy":
            levels = 255 if not symmetric and lo >= 0 else 128
            t = kl_threshold(hist, width, levels)
        else:
            t = (int(np.searchsorted(np.cumsum(hist) / total, percentile / 100.0)) + 1) * width
        return (-t, t) if symmetric else (max(lo, -t), min(hi, t))
    cdf = np.cumsum(hist) / total
    cut = (100.0 - percentile) / 200.0
    edges = np.linspace(lo, hi, BINS + 1)
    left = int(np.searchsorted(cdf, cut))
    right = min(int(np.searchsorted(cdf, 1.0 - cut)), BINS - 1)
    return float(max(lo, edges[left])), float(min(hi, edges[right + 1]))


def kl_threshold(hist: np.ndarray, width: float, levels: int) -> float:
    """The threshold (``i * width``) whose clipped, ``levels``-level quantized histogram is
    closest in KL divergence to the clipped reference (module docstring)."""
    hist = hist.astype(np.float64)
    n = len(hist)
    if n <= levels:
        return n * width
    beyond = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])  # beyond[i] = sum(hist[i:])
    best, best_i = np.inf, n
    for i in range(levels, n + 1):
        p = hist[:i].copy()
        p[-1] += beyond[i]
        kl = _kl(p, _merged(hist[:i], levels))
        if kl < best:
            best, best_i = kl, i
    return best_i * width


def _merged(ref: np.ndarray, levels: int) -> np.ndarray:
    """``ref`` merged into ``levels`` chunks, each total spread over its non-empty bins."""
    bounds = (np.arange(levels + 1) * len(ref)) // levels
    nonzero = (ref > 0).astype(np.float64)
    sums = np.add.reduceat(ref, bounds[:-1])
    counts = np.add.reduceat(nonzero, bounds[:-1])
    per = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    return np.repeat(per, np.diff(bounds)) * nonzero


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    if q.sum() == 0:
        return np.inf
    p, q = p / p.sum(), q / q.sum()
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], _EPS))))
