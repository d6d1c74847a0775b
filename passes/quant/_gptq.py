"""Error-compensating block-wise quantization of a linear weight (GPTQ), in numpy.

Rounding each weight to its nearest code (:func:`._blockwise.quantize_blocks`) minimizes the
error of the *weight*; what matters is the error of the node's *output* ``X W`` on the
activations ``X`` it really receives. GPTQ (Frantar et al., 2022, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers") quantizes the K rows
of ``W [K, N]`` one at a time and, after each, spreads that row's rounding error over the
rows not yet quantized so that ``X W`` moves as little as possible, using the inverse of
``H = X^T X`` (the second moment of the activation over the calibration rows):

    for k in 0 .. K-1:                           (U = upper Cholesky factor of H^-1)
        q_k   = quantize(w_k)                    (the block's scale, taken when its first row
                                                  is reached, from the rows as updated so far)
        e     = (w_k - q_k) / U[k, k]
        w_j  -= e * U[k, j]     for j > k

Updates are applied lazily in row batches (:data:`LAZY` rows at a time, whole blocks) so the
bulk of the work is one matrix product per batch. ``H`` gets ``DAMP`` times its mean diagonal
added (1 % as in the paper, the mean over channels seen non-zero), and an input channel
that is zero on every calibration row is rounded to nearest (decoupled from the rest).

Why our own: ONNX Runtime's ``matmul_nbits_quantizer`` offers GPTQ only through Intel Neural
Compressor and torch, on ``MatMul`` nodes of a model path, and cannot feed it the exported
graph's activations through gcomp's runtime; here it is the quantizer of a single weight,
fed by :func:`grams`, with the same code layout as round-to-nearest (:class:`Blocks`).

Measured on GPT-2 small (random weights, 12 layers): round-to-nearest int4 in blocks of 32
leaves each Gemm's output with a cosine error of about 0.0037 on held-out tokens; GPTQ
lowers it to 0.0007-0.0012 (and 1e-5 where the activation is low-rank), and the model's
last hidden state from cosine 0.977 to above 0.99 (docs/measurements.md).
"""

from __future__ import annotations

__all__ = ["DAMP", "LAZY", "MAX_GRAM_BYTES", "Moments", "gptq_blocks", "grams", "output_error"]

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from gcomp.passes.quant._blockwise import Blocks
from gcomp.passes.quant._calibration import exposed_runs
from gcomp.registry import Runtime

DAMP = 0.01
LAZY = 128  # rows per lazy batch (rounded to whole blocks)
MAX_GRAM_BYTES = 1 << 30  # float64 second moments held at once; more: several passes over the samples


@dataclass
class Moments:
    """An activation's second moment ``X^T X / rows`` (float64 ``[K, K]``) from two disjoint
    halves of the calibration rows: GPTQ fits on one and is checked on the other."""

    fit: np.ndarray
    held_out: np.ndarray


def grams(model: ir.Model, runtime: Runtime, samples: Sequence[Mapping[str, np.ndarray]],
          values: Sequence[ir.Value]) -> dict[str, Moments]:
    """:class:`Moments` of each activation of ``values``: the float model run on ``samples``
    with them exposed, rows over every leading axis; the halves are alternate samples (alternate
    rows with one sample). Values are taken in chunks whose moments fit
    :data:`MAX_GRAM_BYTES` (one pass over the samples per chunk)."""
    found: dict[str, Moments] = {}
    for chunk in _chunks([v for v in values if v.name], MAX_GRAM_BYTES):
        names = [v.name for v in chunk]
        sums: dict[str, list] = {n: [0.0, 0.0] for n in names}
        rows = {n: [0, 0] for n in names}
        for index, arrays in enumerate(exposed_runs(model, runtime, samples, names)):
            for name, x in arrays.items():
                x = np.asarray(x, np.float64)
                x = np.nan_to_num(x.reshape(-1, x.shape[-1]), nan=0.0, posinf=0.0, neginf=0.0)
                halves = ((index % 2, x),) if len(samples) > 1 else ((0, x[0::2]), (1, x[1::2]))
                for half, part in halves:
                    sums[name][half] = sums[name][half] + part.T @ part
                    rows[name][half] += len(part)
        found.update({n: Moments(sums[n][0] / rows[n][0], sums[n][1] / rows[n][1])
                      for n in names if all(rows[n])})
    return found


def output_error(w: np.ndarray, approx: np.ndarray, gram: np.ndarray) -> float:
    """``||X (w - approx)||^2 / ||X w||^2`` for activations of second moment ``gram``."""
    delta = (w - approx).astype(np.float64)
    w = w.astype(np.float64)
    signal = float(np.einsum("kn,kn->", w, gram @ w))
    return float(np.einsum("kn,kn->", delta, gram @ delta)) / signal if signal > 0 else 0.0


def _chunks(values: Sequence[ir.Value], limit: int) -> list[list[ir.Value]]:
    chunks: list[list[ir.Value]] = [[]]
    used = 0
    for v in values:
        k = v.shape[-1] if v.shape is not None and v.shape.rank() and isinstance(v.shape[-1], int) else 4096
        size = 8 * k * k
        if chunks[-1] and used + size > limit:
            chunks.append([])
            used = 0
        chunks[-1].append(v)
        used += size
    return [c for c in chunks if c]


def gptq_blocks(w: np.ndarray, gram: np.ndarray, bits: int, block: int, symmetric: bool) -> Blocks:
    """``w`` (float ``[K, N]``) quantized in blocks of ``block`` rows along K, rows chosen to
    keep ``X w`` close for activations whose second moment is ``gram`` ``[K, K]``; the same
    layout and code ranges as :func:`._blockwise.quantize_blocks`."""
    k, n = w.shape
    k_blocks = -(-k // block)
    rows = k_blocks * block
    weight = np.zeros((rows, n), np.float64)
    weight[:k] = w
    h = np.zeros((rows, rows))
    h[:k, :k] = gram
    live = np.diag(h) > 0
    scale = float(np.mean(np.diag(h)[live])) if live.any() else 1.0
    # rows never seen (padding, a channel zero on every sample) get the live rows' mean on the
    # diagonal: decoupled from the rest, they are rounded to nearest, and the damping below
    # follows the activation's scale, not a constant
    h[~live, ~live] = scale
    h[np.diag_indices(rows)] += DAMP * scale
    u = _inverse_cholesky_upper(h)
    codes = np.zeros((rows, n), np.int32)
    scale = np.zeros((k_blocks, n), np.float32)
    zero = None if symmetric else np.zeros((k_blocks, n), np.int32)
    lazy = block * max(1, LAZY // block)
    for start in range(0, rows, lazy):
        stop = min(start + lazy, rows)
        errors = _quantize_batch(weight, u, start, stop, codes, scale, zero, bits, block)
        weight[stop:] -= u[start:stop, stop:].T @ errors
    return Blocks(codes, scale, zero, k, bits, block)


def _inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor of ``h^-1``, adding damping until ``h`` is positive definite."""
    damp = DAMP * float(np.mean(np.diag(h)))
    for _ in range(8):
        try:
            inverse = np.linalg.inv(h)
            return np.linalg.cholesky((inverse + inverse.T) / 2).T
        except np.linalg.LinAlgError:
            h = h + np.eye(len(h)) * damp
            damp *= 10
    raise np.linalg.LinAlgError("the activation's second moment is not positive definite")


def _quantize_batch(weight, u, start, stop, codes, scale, zero, bits, block) -> np.ndarray:
    """Quantize rows ``start:stop`` of ``weight`` (updated in place within the batch); the
    scaled errors ``[stop - start, N]`` for the rows after the batch."""
    errors = np.zeros((stop - start, weight.shape[1]))
    for i in range(start, stop):
        if i % block == 0:
            _block_scale(weight[i:i + block], i // block, scale, zero, bits)
        b = i // block
        s = scale[b].astype(np.float64)
        if zero is None:
            half = 1 << (bits - 1)
            q = np.clip(np.round(weight[i] / s), -half, half - 1)
            approx = q * s
        else:
            q = np.clip(np.round(weight[i] / s) + zero[b], 0, (1 << bits) - 1)
            approx = (q - zero[b]) * s
        codes[i] = q
        err = (weight[i] - approx) / u[i, i]
        weight[i + 1:stop] -= np.outer(u[i, i + 1:stop], err)
        errors[i - start] = err
    return errors


def _block_scale(rows: np.ndarray, b: int, scale: np.ndarray, zero: np.ndarray | None, bits: int) -> None:
    """Block ``b``'s scale (and zero point) from its rows as they stand, by the rule of
    :func:`._blockwise.quantize_blocks`."""
    if zero is None:
        half = 1 << (bits - 1)
        extreme = np.take_along_axis(rows, np.abs(rows).argmax(axis=0)[None, :], axis=0)[0]
        scale[b] = np.where(extreme != 0, extreme / -half, 1.0)
        return
    top = (1 << bits) - 1
    lo, hi = np.minimum(rows.min(axis=0), 0.0), np.maximum(rows.max(axis=0), 0.0)
    scale[b] = np.where(hi > lo, (hi - lo) / top, 1.0)
    zero[b] = np.clip(np.round(-lo / scale[b].astype(np.float64)), 0, top)
