"""Greedy decoding of decoder LLMs on ONNX Runtime, with their KV cache.

What is guaranteed:

- :func:`layout_of` reads a decoder's interface from its graph inputs and outputs: a token
  input (``input_ids``-like, int ``[batch, seq]``), an optional ``attention_mask`` ``[batch,
  past + seq]`` and ``position_ids`` ``[batch, seq]``, a ``logits`` output ``[batch, seq,
  vocab]``, and KV-cache inputs ``past_key_values.{i}.key``/``.value`` (or ``past.{i}.key``,
  ``past_key.{i}``/``past_value.{i}``, as optimum and ONNX Runtime GenAI name them) each paired
  with an output ``present.{i}.key``/``.value`` (``present_key_values.{i}.key``,
  ``present_key.{i}``), all ``[batch, kv_heads, length, head_size]``. The KV heads, head size
  and dtype are read from the past inputs. What it cannot pair or read is one
  :class:`~gcomp.errors.GcompError` line naming the inputs/outputs concerned: no
  recognisable layout (it says what it looked for), a past without its present (or the
  reverse), a pair whose dtypes or fixed dims differ, an input it does not know how to feed.
- It also reads the bounds the model exposes: the most positions (a static sequence dim of
  the token input; a position table, i.e. a ``Gather`` on a constant table indexed by the
  positions; a rotary cos/sin cache ``[max_positions, ...]`` that ``RotaryEmbedding`` or
  ``GroupQueryAttention`` indexes by position; a ``max_position_embeddings`` metadata
  property) and the vocabulary (the embedding ``Gather``'s constant table, else the logits'
  static last dim). :func:`check_prompt` refuses, in one line (exit 2), an empty prompt, a
  token id outside the vocabulary and a prompt (or prompt + new tokens) longer than the
  model allows; where the model exposes no bound, nothing is checked.
- :func:`generate` decodes greedily (batch 1): the prompt in one run with an empty cache
  (past length 0), then one token per run, each run's ``present.*`` fed back as the next
  ``past.*``, the mask all ones over past + sequence, positions P..P+S-1. A model without
  a cache (no past inputs, a logits output) is decoded by running the whole sequence again
  for every token (a note says so). It returns the new tokens (prompt excluded), the
  prompt run's and every decode step's seconds, and the KV cache's bytes at the end.
- :func:`profile_decode` is ``gcomp profile --decode N``: prefill latency, decode tokens per
  second (median over the steps), ONNX Runtime's per-op profile of the last decode step
  (the backend's own ``profile``, so the rows are those of ``gcomp profile``), and the KV
  cache's memory (bytes of the present tensors at the final length, and per token).
"""

from __future__ import annotations

__all__ = ["NO_CACHE_NOTE", "CachePair", "DecodeLayout", "Generation", "check_prompt", "default_prompt", "generate",
           "layout_of", "profile_decode"]

import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from gcomp.errors import GcompError, OptionError

# (regex, layer group, kind group) for the cache names the exporters write.
_PAST_NAMES = (re.compile(r"^(?:past_key_values|past)[._](\d+)[._](key|value)$"),
               re.compile(r"^past_(key|value)s?[._](\d+)$"))
_PRESENT_NAMES = (re.compile(r"^(?:present|present_key_values)[._](\d+)[._](key|value)$"),
                  re.compile(r"^present_(key|value)s?[._](\d+)$"))
_LOOKED_FOR = ("past_key_values.{i}.key/.value, past.{i}.key/.value or past_key.{i}/past_value.{i} inputs "
               "paired with present.{i}.key/.value or present_key.{i}/present_value.{i} outputs")
_TOKEN_NAMES = re.compile(r"^(input_ids|ids|tokens?|input)$", re.IGNORECASE)
_INTS = (ir.DataType.INT64, ir.DataType.INT32)
# Ops that pass positions or token ids through unchanged on the way to their table lookup.
_PASS_THROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"}
# Ops that index a rotary cos/sin cache [max_positions, ...] by position: (op, positions input, cos input).
_ROTARY_OPS = {("RotaryEmbedding", "com.microsoft"): (1, 2), ("RotaryEmbedding", ""): (3, 1),
               ("GroupQueryAttention", "com.microsoft"): (None, 7)}
_MAX_POSITION_KEYS = ("max_position_embeddings", "max_positions", "n_positions", "max_seq_len", "context_length")


@dataclass(frozen=True)
class CachePair:
    """One cache tensor: the past input a step reads and the present output it writes."""

    layer: int
    kind: str  # "key" or "value"
    past: str
    present: str


@dataclass
class DecodeLayout:
    """A decoder's interface, as :func:`layout_of` read it."""

    tokens: str
    token_dtype: np.dtype
    logits: str
    mask: str | None = None
    mask_dtype: np.dtype | None = None
    positions: str | None = None
    positions_dtype: np.dtype | None = None
    cache: list[CachePair] = field(default_factory=list)
    kv_heads: int | None = None
    head_size: int | None = None
    cache_dtype: np.dtype | None = None
    static_seq: int | None = None
    max_positions: int | None = None
    max_positions_from: str | None = None
    vocab: int | None = None
    vocab_from: str | None = None

    def empty_cache(self) -> dict[str, np.ndarray]:
        """The past inputs of the prompt's run: batch 1, length 0."""
        empty = np.zeros((1, self.kv_heads, 0, self.head_size), self.cache_dtype)
        return {p.past: empty for p in self.cache}

    def feeds(self, ids: np.ndarray, past: int, cache: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        """One run's feeds: ``ids`` ``[1, S]`` after ``past`` cached positions."""
        seq = ids.shape[1]
        out = {self.tokens: ids.astype(self.token_dtype)}
        if self.mask is not None:
            out[self.mask] = np.ones((1, past + seq), self.mask_dtype)
        if self.positions is not None:
            out[self.positions] = np.arange(past, past + seq, dtype=self.positions_dtype)[None]
        return {**out, **(cache or {})}


def layout_of(model: ir.Model) -> DecodeLayout:
    """The decoder interface of ``model``, or one GcompError line saying what does not fit."""
    inputs = [v for v in model.graph.inputs if v.const_value is None]
    outputs = list(model.graph.outputs)
    pairs = _cache_pairs(inputs, outputs)
    others = [v for v in inputs if v.name not in {p.past for p in pairs}]
    tokens = _token_input(others, inputs, outputs)
    logits = _logits_output(outputs, {p.present for p in pairs}, inputs)
    layout = DecodeLayout(tokens=tokens.name, token_dtype=tokens.dtype.numpy(), logits=logits.name, cache=pairs)
    for v in others:
        if v is tokens:
            continue
        _bind_side_input(layout, v)
    if pairs:
        _read_cache_dims(layout, {v.name: v for v in inputs}, {v.name: v for v in outputs})
    if tokens.shape is not None and len(tokens.shape) == 2 and isinstance(tokens.shape[1], int):
        layout.static_seq = tokens.shape[1]
    _read_bounds(layout, model, tokens, logits)
    return layout


def _cache_name(name: str, patterns) -> tuple[int, str] | None:
    for pattern in patterns:
        m = pattern.match(name)
        if m:
            a, b = m.groups()
            return (int(a), b) if a.isdigit() else (int(b), a)
    return None


def _cache_pairs(inputs: list[ir.Value], outputs: list[ir.Value]) -> list[CachePair]:
    """Past inputs paired with present outputs by (layer, key/value); one line for any
    past or present left without its partner."""
    past = {key: v.name for v in inputs if (key := _cache_name(v.name, _PAST_NAMES))}
    present = {key: v.name for v in outputs if (key := _cache_name(v.name, _PRESENT_NAMES))}
    alone = [f"input {past[k]} has no output {_partner(k, 'present')}" for k in sorted(set(past) - set(present))]
    alone += [f"output {present[k]} has no input {_partner(k, 'past_key_values')}"
              for k in sorted(set(present) - set(past))]
    if alone:
        more = f" (and {len(alone) - 2} more)" if len(alone) > 2 else ""
        raise GcompError(f"KV-cache names do not pair up: {'; '.join(alone[:2])}{more}")
    return [CachePair(layer, kind, past[(layer, kind)], present[(layer, kind)]) for layer, kind in sorted(past)]


def _partner(key: tuple[int, str], prefix: str) -> str:
    return f"{prefix}.{key[0]}.{key[1]} (or the same layer's {key[1]} in another naming)"


def _no_layout(missing: str, inputs: list[ir.Value], outputs: list[ir.Value]) -> GcompError:
    def names(values: list[ir.Value]) -> str:
        return ", ".join(v.name for v in values[:8]) + (f" (+{len(values) - 8} more)" if len(values) > 8 else "")

    return GcompError(f"no recognisable decoder layout ({missing}): looked for a token input (input_ids, int "
                      f"[batch, seq]), a logits output [batch, seq, vocab] and a KV cache ({_LOOKED_FOR}); "
                      f"the model has inputs {names(inputs) or 'none'} and outputs {names(outputs) or 'none'}")


def _token_input(others: list[ir.Value], inputs: list[ir.Value], outputs: list[ir.Value]) -> ir.Value:
    """The int [batch, seq] token input: one named like input_ids, else the only int rank-2
    input that is neither a mask nor positions."""
    ints = [v for v in others if v.dtype in _INTS and v.shape is not None and len(v.shape) == 2]
    named = [v for v in ints if _TOKEN_NAMES.match(v.name)]
    plain = [v for v in ints if not re.search("mask|position|token_type|segment", v.name, re.IGNORECASE)]
    found = named or (plain if len(plain) == 1 else [])
    if not found:
        raise _no_layout("no token input", inputs, outputs)
    return found[0]


def _logits_output(outputs: list[ir.Value], presents: set[str], inputs: list[ir.Value]) -> ir.Value:
    rest = [v for v in outputs if v.name not in presents]
    named = [v for v in rest if "logits" in v.name.lower()]
    ranked = [v for v in rest if v.shape is not None and len(v.shape) == 3 and v.dtype is not None
              and v.dtype.is_floating_point()]
    found = named or (ranked if len(rest) == 1 and presents else [])
    if not found:
        raise _no_layout("no logits output", inputs, outputs)
    return found[0]


def _bind_side_input(layout: DecodeLayout, v: ir.Value) -> None:
    """The attention mask or the positions; anything else is an input gcomp cannot feed."""
    name = v.name.lower()
    if v.dtype in (*_INTS, ir.DataType.BOOL, ir.DataType.FLOAT) and "mask" in name and layout.mask is None:
        layout.mask, layout.mask_dtype = v.name, v.dtype.numpy()
    elif v.dtype in _INTS and "position" in name and layout.positions is None:
        layout.positions, layout.positions_dtype = v.name, v.dtype.numpy()
    else:
        kind = "looks like a KV cache, but its name is not one" if re.search("past|cache", name) else "is not an input"
        raise GcompError(f"input {v.name} {kind} gcomp generate feeds (a token input, "
                         f"attention_mask, position_ids, or {_LOOKED_FOR})")


def _read_cache_dims(layout: DecodeLayout, inputs: dict[str, ir.Value], outputs: dict[str, ir.Value]) -> None:
    """KV heads, head size and dtype from the past inputs; each present must agree."""
    found = set()
    for pair in layout.cache:
        past, present = inputs[pair.past], outputs[pair.present]
        shape = past.shape
        if shape is None or len(shape) != 4:
            raise GcompError(f"{pair.past}: expected a 4-D cache [batch, kv_heads, past, head_size], got "
                             f"{_shape_text(shape)}")
        if isinstance(shape[2], int):
            raise GcompError(f"{pair.past}: its length (axis 2) is fixed at {shape[2]}; gcomp generate needs a "
                             "growing cache (a symbolic past length)")
        if present.dtype is not None and present.dtype != past.dtype:
            raise GcompError(f"{pair.past} is {past.dtype} but {pair.present} is {present.dtype}")
        if present.shape is not None and not _same_fixed_dims(shape, present.shape):
            raise GcompError(f"{pair.past} {_shape_text(shape)} and {pair.present} {_shape_text(present.shape)} "
                             "differ outside the length axis (2)")
        found.add((_fixed(shape[1], present, 1), _fixed(shape[3], present, 3), past.dtype))
    if len(found) != 1 or any(d is None for d in next(iter(found))[:2]):
        raise GcompError(f"cannot read one KV-head count and head size from the cache inputs "
                         f"({', '.join(p.past for p in layout.cache[:4])}...: {sorted(found, key=str)})")
    (heads, size, dtype), = found
    layout.kv_heads, layout.head_size, layout.cache_dtype = heads, size, dtype.numpy()


def _fixed(dim: Any, other: ir.Value, axis: int) -> int | None:
    if isinstance(dim, int):
        return dim
    alt = other.shape[axis] if other.shape is not None and len(other.shape) > axis else None
    return alt if isinstance(alt, int) else None


def _same_fixed_dims(a: ir.Shape, b: ir.Shape) -> bool:
    if len(a) != len(b):
        return False
    return all(not (isinstance(x, int) and isinstance(y, int)) or x == y for i, (x, y) in enumerate(zip(a, b))
               if i != 2)


def _shape_text(shape: ir.Shape | None) -> str:
    return "of unknown shape" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]"


def _read_bounds(layout: DecodeLayout, model: ir.Model, tokens: ir.Value, logits: ir.Value) -> None:
    bounds = []
    if layout.positions is not None:
        bounds += _position_tables(model, layout.positions)
    for key, value in model.metadata_props.items():
        if key.lower().split(".")[-1] in _MAX_POSITION_KEYS and value.strip().isdigit():
            bounds.append((int(value), f"metadata {key}={value}"))
    if bounds:
        layout.max_positions, layout.max_positions_from = min(bounds)
    vocab = _lookups(tokens)
    if vocab:
        layout.vocab, layout.vocab_from = min(vocab)
    elif logits.shape is not None and len(logits.shape) == 3 and isinstance(logits.shape[2], int):
        layout.vocab, layout.vocab_from = logits.shape[2], f"{logits.name}'s last dim"


def _reached(value: ir.Value) -> list[tuple[ir.Node, int]]:
    """(node, input index) of every use of ``value``, through ops that pass it on unchanged."""
    uses, seen, todo = [], set(), [value]
    while todo:
        v = todo.pop()
        for node, index in v.uses():
            if node.op_type in _PASS_THROUGH and node.domain == "" and index == 0:
                if id(node) not in seen:
                    seen.add(id(node))
                    todo.extend(node.outputs)
            else:
                uses.append((node, index))
    return uses


def _rows(table: ir.Value | None) -> int | None:
    """Axis 0 of a constant table (an initializer or a Constant node's value)."""
    if table is None:
        return None
    tensor = table.const_value
    if tensor is None and table.producer() is not None and table.producer().op_type == "Constant":
        attr = table.producer().attributes.get("value")
        tensor = attr.value if attr is not None else None
    if tensor is None or len(tensor.shape) < 1 or not isinstance(tensor.shape[0], int):
        return None
    return tensor.shape[0]


def _lookups(value: ir.Value) -> list[tuple[int, str]]:
    """Rows of the constant tables a ``Gather`` (axis 0) indexes with ``value``."""
    out = []
    for node, index in _reached(value):
        if node.op_type == "Gather" and node.domain == "" and index == 1 and node.attributes.get_int("axis", 0) == 0:
            rows = _rows(node.inputs[0])
            if rows is not None:
                out.append((rows, f"the table {node.inputs[0].name} that Gather {node.name} indexes"))
    return out


def _position_tables(model: ir.Model, positions: str) -> list[tuple[int, str]]:
    """Position tables and rotary caches indexed by the position input."""
    value = next(v for v in model.graph.inputs if v.name == positions)
    out = _lookups(value)
    uses = {id(n) for n, _ in _reached(value)}
    for node in model.graph:
        slots = _ROTARY_OPS.get((node.op_type, node.domain))
        if slots is None or (slots[0] is not None and id(node) not in uses):
            continue
        cos = node.inputs[slots[1]] if len(node.inputs) > slots[1] else None
        rows = _rows(cos)
        if rows is not None and (slots[0] is not None or node.attributes.get_int("do_rotary", 0)):
            out.append((rows, f"the rotary cache {cos.name} of {node.op_type} {node.name}"))
    return out


def check_prompt(layout: DecodeLayout, prompt: list[int], max_new_tokens: int) -> None:
    """One line (exit 2) for a prompt the model cannot take: empty, a token id outside the
    vocabulary, longer (with the new tokens) than the positions the model allows, or of
    lengths a static sequence dim does not take."""
    if not prompt:
        raise OptionError("the prompt is empty: give at least one token id (--prompt-ids 1,2,3)")
    if max_new_tokens < 1:
        raise OptionError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    high = layout.vocab if layout.vocab is not None else np.iinfo(layout.token_dtype).max + 1
    for i, token in enumerate(prompt):
        if not 0 <= token < high:
            where = f" (0..{high - 1}, from {layout.vocab_from})" if layout.vocab is not None else ""
            raise OptionError(f"token id {token} (prompt position {i}) is outside the vocabulary{where}")
    if layout.max_positions is not None:
        _check_positions(len(prompt), max_new_tokens, layout.max_positions, layout.max_positions_from)
    if layout.static_seq is not None:
        _check_static(layout, len(prompt), max_new_tokens)


def _check_positions(prompt: int, new: int, limit: int, source: str | None) -> None:
    """The prompt, and the prompt with the new tokens (all but the last are fed), within ``limit``."""
    if prompt > limit:
        raise OptionError(f"the prompt of {prompt} tokens is longer than the model allows: at most {limit} "
                          f"positions ({source})")
    needed = prompt + new - 1
    if needed > limit:
        raise OptionError(f"the prompt of {prompt} tokens and {new} new ones need {needed} positions; the model "
                          f"allows {limit} ({source}): ask for at most {limit - prompt + 1} new tokens")


def _check_static(layout: DecodeLayout, prompt: int, new: int) -> None:
    """A static sequence dim takes only runs of its length: the prompt's, then one token
    per step (with a cache) or the whole sequence (without)."""
    static = layout.static_seq
    if prompt > static:
        raise OptionError(f"the prompt of {prompt} tokens is longer than the model allows: {layout.tokens} "
                          f"takes {static} (a static sequence dim)")
    runs = [prompt] + ([1] * (new - 1) if layout.cache else [prompt + i for i in range(1, new)])
    if any(r != static for r in runs):
        raise OptionError(f"{layout.tokens} has a static sequence length of {static}, but decoding runs "
                          f"{', '.join(map(str, sorted(set(runs))))} tokens at once: export the model with a "
                          "symbolic sequence dim")


@dataclass
class Generation:
    """What :func:`generate` decoded and how long it took."""

    tokens: list[int]
    prompt_tokens: int
    prefill_s: float
    step_s: list[float]
    cache_bytes: int | None = None  # the present tensors after the last run
    cache_length: int | None = None  # the positions they hold
    notes: list[str] = field(default_factory=list)
    last_feeds: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # the last run's

    @property
    def decode_tokens_per_s(self) -> float | None:
        """One over the median decode step (None with no step after the prompt's run)."""
        if not self.step_s:
            return None
        median = statistics.median(self.step_s)
        return 1.0 / median if median > 0 else None

    def to_dict(self) -> dict[str, Any]:
        median = statistics.median(self.step_s) if self.step_s else None
        per_token = self.cache_bytes / self.cache_length if self.cache_bytes and self.cache_length else None
        return {
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": len(self.tokens),
            "tokens": list(self.tokens),
            "prefill_ms": self.prefill_s * 1e3,
            "decode_steps": len(self.step_s),
            "decode_step_ms": [s * 1e3 for s in self.step_s],
            "decode_step_p50_ms": median * 1e3 if median is not None else None,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "kv_cache": None if self.cache_bytes is None else {
                "bytes": self.cache_bytes, "positions": self.cache_length, "bytes_per_token": per_token},
        }


NO_CACHE_NOTE = "the model has no KV cache (no past inputs): every step runs the whole sequence again"


def generate(exe: Any, layout: DecodeLayout, prompt: list[int], max_new_tokens: int) -> Generation:
    """Greedy decoding of ``max_new_tokens`` tokens after ``prompt`` on ``exe`` (an
    executable whose ``run(feeds)`` returns outputs by name: ONNX Runtime's)."""
    check_prompt(layout, prompt, max_new_tokens)
    ids = np.asarray([prompt], dtype=layout.token_dtype)
    cache = layout.empty_cache() if layout.cache else None
    past, tokens, seconds = 0, [], []
    feeds: dict[str, np.ndarray] = {}
    got: dict[str, np.ndarray] = {}
    for _ in range(max_new_tokens):
        feeds = layout.feeds(ids, past, cache)
        start = time.perf_counter()
        got = exe.run(feeds)
        seconds.append(time.perf_counter() - start)
        tokens.append(int(np.argmax(got[layout.logits][0, -1])))
        if cache is None:  # no cache: the next run takes the whole sequence
            ids = np.concatenate([ids, np.asarray([[tokens[-1]]], ids.dtype)], axis=1)
            continue
        past += ids.shape[1]
        cache = _next_cache(layout, got, past)
        ids = np.asarray([[tokens[-1]]], ids.dtype)
    result = Generation(tokens, len(prompt), seconds[0], seconds[1:], last_feeds=feeds,
                        notes=[] if layout.cache else [NO_CACHE_NOTE])
    if layout.cache:
        result.cache_bytes = sum(int(got[p.present].nbytes) for p in layout.cache)
        result.cache_length = past
    return result


def _next_cache(layout: DecodeLayout, got: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """The presents as the next run's pasts; each must hold the ``length`` positions fed so far."""
    cache = {}
    for pair in layout.cache:
        present = got[pair.present]
        if present.ndim != 4 or present.shape[2] != length:
            raise GcompError(f"{pair.present} came back {list(present.shape)} after {length} positions: not a "
                             f"cache gcomp can feed back as {pair.past} (expected axis 2 = {length})")
        cache[pair.past] = present
    return cache


def profile_decode(model_path: Any, model: ir.Model, prompt: list[int], new_tokens: int, *,
                   target: str = "cpu", optimization: str = "all", threads: int | None = None,
                   provider_options: dict[str, str] | None = None, iters: int = 50, warmup: int = 5,
                   status=None) -> tuple[Any, Generation]:
    """``gcomp profile --decode``: (the per-op profile of the last decode step, the decode
    figures). The generation is run once untimed first (with ``warmup`` > 0) so the timed
    one does not pay for the session's first runs."""
    from gcomp.backends import get_backend
    from gcomp.profiling import finish_profile

    status = status or (lambda _text: None)
    layout = layout_of(model)
    check_prompt(layout, prompt, new_tokens)
    if new_tokens < 2:
        raise OptionError("--decode needs at least 2 new tokens: the first comes from the prompt's run")
    status(f"compiling for ort/{target}")
    exe = get_backend("ort").compile(model_path, target, optimization=optimization, threads=threads,
                                     provider_options=provider_options)
    if warmup:
        status("decoding once untimed (warm-up)")
        generate(exe, layout, prompt, new_tokens)
    status(f"decoding {new_tokens} tokens after a prompt of {len(prompt)}")
    gen = generate(exe, layout, prompt, new_tokens)
    status(f"profiling the last decode step: {warmup} warm-up + {iters} timed runs, then per-op times")
    prof = exe.profile(gen.last_feeds, iters=iters, warmup=warmup)
    return finish_profile(prof, model, gen.last_feeds, path=model_path, status=status), gen


def default_prompt(layout: DecodeLayout, new_tokens: int, length: int = 16, seed: int = 0) -> list[int]:
    """A seeded prompt of ``length`` ids (fewer where the model's positions do not fit it and
    ``new_tokens``) drawn from the vocabulary (token 0 when its size is unknown)."""
    if layout.max_positions is not None:
        length = max(1, min(length, layout.max_positions - new_tokens + 1))
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(0, layout.vocab or 1, size=length)]
