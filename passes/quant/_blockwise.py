"""Block-wise weight quantization in numpy, and the layouts ONNX Runtime and ONNX read.

The math is stated in :mod:`gcomp.passes.quant.weights`; this module computes it and lays
the codes out three ways: ``MatMulNBits``' packed ``[N, k_blocks, blob]`` bytes,
``GatherBlockQuantized``'s rows of packed bytes, and typed int4/int8 (uint4/uint8)
tensors for standard ``DequantizeLinear``.

Packing (ONNX Runtime's, for 4 bits): two codes per byte along the packed axis, the
element of even index in the low nibble, the next one in the high nibble; 8-bit codes are
one byte each. Stored codes are unsigned: a symmetric code ``q`` is stored as
``q + 2^(bits-1)``, which is the zero point ONNX Runtime assumes when none is given.
"""

from __future__ import annotations

__all__ = ["Blocks", "pack", "quantize_blocks"]

from dataclasses import dataclass

import ml_dtypes
import numpy as np


@dataclass
class Blocks:
    """A [K, N] weight quantized in blocks of ``block`` rows along K (axis 0).

    ``codes``: int32 ``[k_blocks * block, N]`` (K padded with zeros to whole blocks): signed
    in ``[-2^(bits-1), 2^(bits-1) - 1]`` when symmetric, unsigned in ``[0, 2^bits - 1]`` otherwise; ``scale``:
    float32 ``[k_blocks, N]``; ``zero``: int32 ``[k_blocks, N]`` (asymmetric only)."""

    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray | None
    k: int
    bits: int
    block: int

    @property
    def offset(self) -> int:
        """What a symmetric code is stored plus: ONNX Runtime's default zero point."""
        return 1 << (self.bits - 1)

    def unsigned(self) -> np.ndarray:
        """The codes as stored unsigned (``[k_blocks * block, N]``, padded)."""
        return self.codes + self.offset if self.zero is None else self.codes

    def dequantize(self) -> np.ndarray:
        """The float [K, N] weight the codes stand for."""
        zero = 0 if self.zero is None else np.repeat(self.zero, self.block, axis=0)
        return ((self.codes - zero) * np.repeat(self.scale, self.block, axis=0))[: self.k].astype(np.float32)

    def typed(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(codes ``[K, N]``, zero ``[k_blocks, N]`` or None) as ONNX's int4/int8 (symmetric) or
        uint4/uint8 (asymmetric) tensors, for ``DequantizeLinear``."""
        if self.zero is None:
            kind = ml_dtypes.int4 if self.bits == 4 else np.int8
        else:
            kind = ml_dtypes.uint4 if self.bits == 4 else np.uint8
        zero = None if self.zero is None else self.zero.astype(kind)
        return self.codes[: self.k].astype(kind), zero


def quantize_blocks(w: np.ndarray, bits: int, block: int, symmetric: bool) -> Blocks:
    """Quantize a float [K, N] weight in blocks of ``block`` consecutive rows (along K)."""
    k, n = w.shape
    k_blocks = -(-k // block)
    padded = np.zeros((k_blocks * block, n), np.float64)
    padded[:k] = w
    blocks = padded.reshape(k_blocks, block, n)
    if symmetric:  # the signed extreme maps to -2^(b-1): all 2^b codes used, the extreme exact
        half = 1 << (bits - 1)
        extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None, :], axis=1)[:, 0, :]
        scale = np.where(extreme != 0, extreme / -half, 1.0).astype(np.float32)
        codes = np.clip(np.round(blocks / scale[:, None, :]), -half, half - 1)
        zero = None
    else:
        top = (1 << bits) - 1
        lo, hi = np.minimum(blocks.min(axis=1), 0.0), np.maximum(blocks.max(axis=1), 0.0)
        scale = np.where(hi > lo, (hi - lo) / top, 1.0).astype(np.float32)
        zero = np.clip(np.round(-lo / scale), 0, top).astype(np.int32)
        codes = np.clip(np.round(blocks / scale[:, None, :]) + zero[:, None, :], 0, top)
    return Blocks(codes.reshape(k_blocks * block, n).astype(np.int32), scale, zero, k, bits, block)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes packed along the last axis as ONNX Runtime unpacks them (uint8)."""
    codes = np.asarray(codes).astype(np.uint8)
    if bits == 8:
        return np.ascontiguousarray(codes)
    if codes.shape[-1] % 2:  # an odd count: the last high nibble is padding
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), np.uint8)], axis=-1)
    return np.ascontiguousarray(codes[..., 0::2] | (codes[..., 1::2] << 4))
