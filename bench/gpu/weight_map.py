"""A TVM artifact's weights made from a torch module's parameters: recipes, derived and checked.

An artifact compiled with ``gcomp compile --weights separate`` takes its weights as
``weight_0`` ... ``weight_N``: the constants left once gcomp's pipeline and TVM folded the
export's initializers (a Linear's matrix transposed, BatchNorm folded into the
convolution before it, Q/K/V packed into one matrix, the position table cut to the
sequence, a CPU convolution's kernel laid out HWIO, a cast to fp16). BERT-base's weights
(440 MB) cannot travel to the GPU machine, so they are made there from the torch module
the check builds, by a recipe per weight:

- :func:`derive` (on the machine that compiled the artifact, where the module that was
  exported is at hand) finds each weight's recipe and replays it at once: copies, cuts and
  casts must give the weight bit for bit, a BatchNorm fold within 4 ulps of its dtype at
  the weight's scale. A float weight no recipe gives is refused (:class:`MapError`, one
  line naming it); a weight that is no float (index arithmetic, a mask) is *carried*: it
  travels as it is, since no parameter makes it.
- :func:`produce` replays the recipes on another module of the same architecture (the GPU
  machine's own, whatever its random weights), refusing in one line a parameter the
  module lacks or has in another shape.

A recipe (JSON)::

    {"name": "weight_7", "dtype": "float32", "shape": [32, 96], "axis": 1, "parts": [PART, ...]}
    {"name": "weight_5", "dtype": "int64", "shape": [2, 1, 1, 16], "carried": true}

``axis`` is null for a weight made by one part. A PART is a source tensor, transposed by
``perm``, flattened, its first ``count`` elements (all of them, or a leading cut such as
the first rows of a position table), cast to the weight's dtype; the parts laid side by
side along ``axis`` make the weight. A source is a parameter or buffer, ``{"param":
NAME, "shape": [...]}``, or a BatchNorm folded into the convolution before it,
``{"fold": {"conv": PREFIX, "bn": PREFIX, "eps": E, "what": "weight" | "bias"}}``.

Only NumPy here; :func:`module_params` and :func:`conv_bn_pairs` take a torch module.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["MapError", "conv_bn_pairs", "derive", "module_params", "produce"]

FOLD_ULPS = 4  # a BatchNorm fold: its arithmetic may round differently from the export's


class MapError(ValueError):
    """A weight cannot be made from the module; the message says which, in one line."""


# -- the torch side ---------------------------------------------------------------


def module_params(module: Any) -> dict[str, np.ndarray]:
    """The floating parameters and buffers of a torch module, as float32 NumPy arrays."""
    return {name: t.detach().float().cpu().numpy() for name, t in module.state_dict().items()
            if t.is_floating_point()}


def conv_bn_pairs(module: Any) -> list[dict]:
    """Every convolution directly followed by a BatchNorm of its output channels (the pairs
    an exporter folds), as ``{"conv": prefix, "bn": prefix, "eps": eps}``."""
    import torch

    mods = list(module.named_modules())
    pairs = []
    for (conv_name, conv), (bn_name, bn) in itertools.pairwise(mods):
        if (isinstance(conv, torch.nn.modules.conv._ConvNd) and isinstance(bn, torch.nn.modules.batchnorm._BatchNorm)
                and bn.num_features == conv.out_channels):
            pairs.append({"conv": conv_name, "bn": bn_name, "eps": float(bn.eps)})
    return pairs


# -- sources ----------------------------------------------------------------------


def _folded(params: Mapping[str, np.ndarray], fold: Mapping[str, Any]) -> np.ndarray:
    """The convolution's weight or bias with the BatchNorm after it folded in (float32)."""
    conv, bn = fold["conv"], fold["bn"]
    names = [conv + ".weight"] + [f"{bn}.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
    missing = [n for n in names if n not in params]
    if missing:
        raise MapError(f"BatchNorm fold {conv} + {bn}: the module has no {missing[0]}")
    w, gamma, beta, mean, var = (params[n] for n in names)
    scale = gamma / np.sqrt(var + np.float32(fold["eps"]))
    if fold["what"] == "weight":
        return w * scale.reshape(-1, *[1] * (w.ndim - 1))
    bias = params.get(conv + ".bias")
    return beta - mean * scale if bias is None else beta + (bias - mean) * scale


def _source(params: Mapping[str, np.ndarray], part: Mapping[str, Any]) -> np.ndarray:
    if "fold" in part:
        return _folded(params, part["fold"])
    name, shape = part["param"], tuple(part["shape"])
    if name not in params:
        raise MapError(f"the module has no parameter {name} (a weight's recipe needs it)")
    if params[name].shape != shape:
        raise MapError(f"parameter {name} is {list(params[name].shape)} in the module, the recipe wants {list(shape)}")
    return params[name]


def _flat(src: np.ndarray, perm: Sequence[int], count: int, dtype: np.dtype) -> np.ndarray:
    return np.transpose(src, perm).reshape(-1)[:count].astype(dtype, copy=False)


# -- derive -----------------------------------------------------------------------


class _Finder:
    """The sources of one module, cast per dtype and indexed by their first element."""

    def __init__(self, params: Mapping[str, np.ndarray], folds: Sequence[Mapping[str, Any]]) -> None:
        self.sources: list[tuple[dict, np.ndarray, bool]] = [
            ({"param": n, "shape": list(a.shape)}, a, True) for n, a in sorted(params.items()) if a.size]
        for fold in folds:
            for what in ("weight", "bias"):
                spec = {"fold": {**fold, "what": what}}
                self.sources.append((spec, _folded(params, spec["fold"]), False))
        self._by_dtype: dict[str, tuple[list, dict]] = {}

    def _index(self, dtype: np.dtype) -> tuple[list, dict]:
        if dtype.name not in self._by_dtype:
            cast = [(spec, a.astype(dtype), exact) for spec, a, exact in self.sources]
            first: dict[float, list] = {}
            for item in cast:
                if item[2]:
                    first.setdefault(float(item[1].reshape(-1)[0]), []).append(item)
            self._by_dtype[dtype.name] = (cast, first)
        return self._by_dtype[dtype.name]

    def candidates(self, dtype: np.dtype, first: float) -> list:
        cast, by_first = self._index(dtype)
        return by_first.get(first, []) + [item for item in cast if not item[2]]

    def part(self, block: np.ndarray, dtype: np.dtype, whole: bool, among: list | None = None) -> dict | None:
        """The part giving ``block`` (all of a source, or with ``whole`` a leading cut),
        from ``among`` or every candidate."""
        want = block.reshape(-1)
        for spec, src, exact in self.candidates(dtype, float(want[0])) if among is None else among:
            if src.size < want.size or (src.size != want.size and not whole):
                continue
            for perm in itertools.permutations(range(src.ndim)):
                if _same(_flat(src, perm, want.size, dtype), want, exact):
                    return {**spec, "perm": list(perm), "count": int(want.size)}
        return None


def _same(got: np.ndarray, want: np.ndarray, exact: bool) -> bool:
    if exact:
        return bool(np.array_equal(got, want))
    scale = float(np.max(np.abs(want.astype(np.float64)))) or 1.0
    err = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
    return err <= FOLD_ULPS * float(np.finfo(want.dtype).eps) * scale


def _next_part(finder: _Finder, weight: np.ndarray, axis: int, offset: int) -> dict | None:
    """The whole source that starts at ``offset`` along ``axis`` of ``weight``."""
    row = weight.size // weight.shape[axis]
    first = float(np.take(weight, offset, axis=axis).reshape(-1)[0])
    for cand in finder.candidates(weight.dtype, first):
        n = cand[1].size // row if cand[1].size % row == 0 else 0
        if n and offset + n <= weight.shape[axis]:
            block = np.take(weight, range(offset, offset + n), axis=axis)
            part = finder.part(block, weight.dtype, whole=False, among=[cand])
            if part is not None:
                return part
    return None


def _packed(finder: _Finder, weight: np.ndarray) -> tuple[int, list] | None:
    """``(axis, parts)`` when ``weight`` is whole sources laid side by side along one axis."""
    for axis in range(weight.ndim):
        if weight.shape[axis] < 2:
            continue
        row = weight.size // weight.shape[axis]
        parts, offset = [], 0
        while offset < weight.shape[axis]:
            part = _next_part(finder, weight, axis, offset)
            if part is None:
                break
            parts.append(part)
            offset += part["count"] // row
        if offset == weight.shape[axis] and len(parts) > 1:
            return axis, parts
    return None


def derive(weights: Sequence[tuple[str, np.ndarray]], params: Mapping[str, np.ndarray],
           folds: Sequence[Mapping[str, Any]] = ()) -> list[dict]:
    """Each weight's recipe from ``params`` (see the module's docstring), checked by
    replaying it; :class:`MapError` for a float weight none gives."""
    finder = _Finder(params, folds)
    recipes = []
    for name, weight in weights:
        head = {"name": name, "dtype": weight.dtype.name, "shape": list(weight.shape)}
        if not np.issubdtype(weight.dtype, np.floating):
            recipes.append({**head, "carried": True})
            continue
        part = finder.part(weight, weight.dtype, whole=True) if weight.size else None
        found = (None, [part]) if part is not None else _packed(finder, weight)
        if found is None:
            raise MapError(f"{name} ({weight.dtype.name} {list(weight.shape)}): no parameter of the module gives it "
                           "(copied, transposed, cut, packed, BatchNorm-folded or cast)")
        recipe = {**head, "axis": found[0], "parts": found[1]}
        made = produce([recipe], params)[name]
        if not _same(made.reshape(-1), weight.reshape(-1), all("param" in p for p in found[1])):
            raise MapError(f"{name}: its recipe does not give it back")  # pragma: no cover - derive's own check
        recipes.append(recipe)
    return recipes


# -- produce ----------------------------------------------------------------------


def produce(recipes: Sequence[Mapping[str, Any]], params: Mapping[str, np.ndarray],
            carried: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """``{weight name: array}`` made from ``params`` by ``recipes``; carried weights come
    from ``carried``."""
    out = {}
    for r in recipes:
        name, dtype, shape = r["name"], np.dtype(r["dtype"]), tuple(r["shape"])
        if r.get("carried"):
            if carried is None or name not in carried:
                raise MapError(f"{name}: a carried constant, missing from the carried file")
            out[name] = np.asarray(carried[name]).reshape(shape)
            continue
        flats = [_flat(_source(params, p), p["perm"], p["count"], dtype) for p in r["parts"]]
        if r["axis"] is None:
            out[name] = flats[0].reshape(shape)
            continue
        axis, row = r["axis"], int(np.prod(shape)) // shape[r["axis"]]
        blocks = [f.reshape(shape[:axis] + (f.size // row,) + shape[axis + 1:]) for f in flats]
        out[name] = np.concatenate(blocks, axis=axis)
    return out
