"""gcomp generate and gcomp profile --decode: greedy decoding with a KV cache on ONNX Runtime.

The tokens are checked against a reference greedy loop written on ONNX Runtime directly
(models.decoder.greedy for the Llama export, numpy for the small synthetic models), for the
export and for its -O3 --target ort-cpu output (GroupQueryAttention, RotaryEmbedding); each
bad input is one line with its exit code.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from gcomp import decode, io
from gcomp.errors import GcompError, OptionError
from tests.conftest import make_model, tensor, vinfo

PROMPT = [5, 17, 42, 99, 3]
NEW = 6


def gcomp(*args):
    return subprocess.run([sys.executable, "-m", "gcomp", *map(str, args)], capture_output=True, text=True, check=False,
                          timeout=300)


def one_error(r, code):
    """A refusal: exit ``code``, nothing on stdout, one line on stderr, no traceback."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert r.stdout == "" and len(lines) == 1 and lines[0].startswith("gcomp: error: "), r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The tiny Llama cache export, its -O3 ort-cpu output, and the reference tokens."""
    pytest.importorskip("torch", reason="needs torch==2.13.0 (the test extra installs it)")
    pytest.importorskip("transformers", reason="needs transformers (the test extra installs it)")
    import onnxruntime as ort

    from models import decoder

    root = tmp_path_factory.mktemp("generate")
    path = decoder.export("llama", root, cache=True, check=False)
    fused = root / "llama_o3.onnx"
    r = gcomp("optimize", path, "-o", fused, "-O3", "--target", "ort-cpu", "-q")
    assert r.returncode == 0, r.stderr
    config = decoder.build("llama").config
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = decoder.greedy(session, np.array([PROMPT], np.int64), NEW, config)
    return {"path": path, "fused": fused, "expected": expected, "config": config}


@pytest.mark.parametrize("which", ["path", "fused"])
def test_generate_gives_the_reference_greedy_tokens(llama, which):
    """The export and its fused form (GroupQueryAttention with the cache) give the tokens of
    the reference loop; stdout is that one line, the timings are on stderr."""
    if which == "fused":
        ops = {n.op_type for n in onnx.load(str(llama["fused"])).graph.node}
        assert "GroupQueryAttention" in ops, ops
    r = gcomp("generate", llama[which], "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", NEW)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ",".join(map(str, llama["expected"])) + "\n"
    assert "prefill" in r.stderr and f"median of {NEW - 1} steps" in r.stderr, r.stderr
    if which == "path":  # -q: the answer alone
        quiet = gcomp("generate", llama[which], "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", 2, "-q")
        expected = ",".join(map(str, llama["expected"][:2])) + "\n"
        assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, expected, "")


def test_generate_api_reads_the_cache_layout(llama):
    from gcomp.backends import get_backend

    layout = decode.layout_of(io.load(llama["path"]))
    cfg = llama["config"]
    assert [p.past for p in layout.cache] == [f"past_key_values.{i}.{k}" for i in range(2) for k in ("key", "value")]
    assert layout.cache[0].present == "present.0.key"
    assert (layout.kv_heads, layout.head_size) == (cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads)
    assert layout.vocab == cfg.vocab_size and layout.max_positions is None  # rotary computed from positions
    gen = decode.generate(get_backend("ort").compile(llama["path"], "cpu"), layout, PROMPT, NEW)
    assert gen.tokens == llama["expected"] and len(gen.step_s) == NEW - 1
    positions = len(PROMPT) + NEW - 1  # the last new token is not fed back
    assert gen.cache_length == positions
    assert gen.cache_bytes == 4 * cfg.num_key_value_heads * positions * layout.head_size * 4


def test_prompt_errors_are_one_line(llama):
    r = gcomp("generate", llama["path"], "--prompt-ids", "", "--max-new-tokens", 2)
    assert "the prompt is empty" in one_error(r, 2)
    r = gcomp("generate", llama["path"], "--prompt-ids", "1,512", "--max-new-tokens", 2)
    assert "token id 512" in one_error(r, 2) and "0..511" in r.stderr
    r = gcomp("generate", llama["path"], "--prompt-ids", "1,two", "--max-new-tokens", 2)
    assert "'two' is not a token id" in one_error(r, 2)


def test_prompt_longer_than_the_metadata_allows(llama, tmp_path):
    """A max_position_embeddings property bounds the positions: the prompt, then the prompt
    with the new tokens (all but the last are fed)."""
    proto = onnx.load(str(llama["path"]))
    helper.set_model_props(proto, {"max_position_embeddings": "8"})
    bounded = tmp_path / "bounded.onnx"
    onnx.save(proto, bounded)
    r = gcomp("generate", bounded, "--prompt-ids", ",".join(["1"] * 9), "--max-new-tokens", 1)
    assert "prompt of 9 tokens is longer than the model allows: at most 8" in one_error(r, 2)
    r = gcomp("generate", bounded, "--prompt-ids", ",".join(["1"] * 6), "--max-new-tokens", 4)
    assert "ask for at most 3 new tokens" in one_error(r, 2)
    r = gcomp("generate", bounded, "--prompt-ids", ",".join(["1"] * 6), "--max-new-tokens", 3)
    assert r.returncode == 0 and len(r.stdout.strip().split(",")) == 3, r.stderr


@pytest.mark.slow
def test_profile_decode_reports_prefill_rate_ops_and_cache(llama, tmp_path):
    """One profile: the console summary, the JSON report (schema, decode figures, the last
    decode step's kernels) and its markdown."""
    import jsonschema

    from gcomp.report import render_markdown, schema

    report = tmp_path / "decode.json"
    r = gcomp("profile", llama["fused"], "--decode", 4, "--prompt-ids", ",".join(map(str, PROMPT)), "--iters", 3,
              "--warmup", 1, "--top", 3, "--report", report)
    assert r.returncode == 0, r.stderr
    positions = len(PROMPT) + 3
    text = " ".join(r.stdout.split())  # rich wraps the title
    assert f"the last decode step (1 token after {positions - 1} cached)" in text and "(median of 3 steps)" in text
    assert f"KV cache 4.0 KiB at {positions} positions (512 B per token)" in text
    doc = json.loads(report.read_text())
    jsonschema.validate(doc, schema())
    d = doc["decode"]
    assert d["tokens"] == llama["expected"][:4] and d["prompt_tokens"] == len(PROMPT)
    assert d["decode_steps"] == 3 and len(d["decode_step_ms"]) == 3 and d["prefill_ms"] > 0
    assert d["decode_tokens_per_s"] == pytest.approx(1e3 / d["decode_step_p50_ms"])
    assert d["kv_cache"] == {"positions": positions, "bytes": 4 * 2 * positions * 16 * 4,
                             "bytes_per_token": 4 * 2 * 16 * 4}
    assert {o["op_type"] for o in doc["ops"]} >= {"GroupQueryAttention", "MatMul"}
    # The per-op rows are the decode step's: one token, after the cache (GQA ran on [1, 1, ...]).
    gqa = next(o for o in doc["ops"] if o["op_type"] == "GroupQueryAttention")
    assert gqa["inputs"][0]["shape"][:2] == [1, 1], gqa["inputs"]
    assert "## Decoding" in render_markdown(doc)


def test_profile_decode_refusals(llama):
    r = gcomp("profile", llama["path"], "--decode", 2, "--backend", "tvm")
    assert "--decode runs on ONNX Runtime" in one_error(r, 2)
    r = gcomp("profile", llama["path"], "--prompt-ids", "1,2")
    assert "--prompt-ids is for --decode N" in one_error(r, 2)


# --------------------------------------------------------------------------- synthetic models
def _cache_model(path, *, present_names=("present.0.key", "present.0.value"), present_dtype=TensorProto.FLOAT,
                 past_names=("past_key_values.0.key", "past_key_values.0.value")):
    """A one-layer cache interface (the cache is echoed: only names, shapes and dtypes matter)."""
    kv = ["batch", 2, "past", 8]
    inputs = [vinfo("input_ids", TensorProto.INT64, ["batch", "seq"]),
              vinfo(past_names[0], TensorProto.FLOAT, kv), vinfo(past_names[1], TensorProto.FLOAT, kv)]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["logits"]),
             helper.make_node("Identity", [past_names[0]], [present_names[0]]),
             helper.make_node("Cast", [past_names[1]], [present_names[1]], to=present_dtype)]
    outputs = [vinfo("logits", TensorProto.FLOAT, ["batch", "seq", 16]),
               vinfo(present_names[0], TensorProto.FLOAT, ["batch", 2, "total", 8]),
               vinfo(present_names[1], present_dtype, ["batch", 2, "total", 8])]
    emb = tensor("emb", np.eye(16, dtype=np.float32))
    onnx.save(make_model(nodes, inputs, outputs, [emb]), path)
    return path


@pytest.mark.parametrize("past,present", [(("past.0.key", "past.0.value"), ("present.0.key", "present.0.value")),
                                          (("past_key.0", "past_value.0"), ("present_key.0", "present_value.0"))])
def test_other_cache_namings_pair_up(tmp_path, past, present):
    layout = decode.layout_of(io.load(_cache_model(tmp_path / "m.onnx", past_names=past, present_names=present)))
    assert [(p.layer, p.kind, p.past, p.present) for p in layout.cache] == [
        (0, "key", past[0], present[0]), (0, "value", past[1], present[1])]
    assert (layout.kv_heads, layout.head_size, layout.vocab, layout.mask) == (2, 8, 16, None)


def test_cache_names_that_do_not_pair_are_named(tmp_path):
    path = _cache_model(tmp_path / "unpaired.onnx", present_names=("present.0.key", "present.1.value"))
    line = one_error(gcomp("generate", path, "--prompt-ids", "1", "--max-new-tokens", 2), 1)
    assert "do not pair up" in line and "past_key_values.0.value" in line and "present.1.value" in line
    path = _cache_model(tmp_path / "dtypes.onnx", present_dtype=TensorProto.FLOAT16)
    with pytest.raises(GcompError, match="past_key_values.0.value is FLOAT but present.0.value is FLOAT16"):
        decode.layout_of(io.load(path))


def test_a_model_without_a_decoder_layout_is_one_line():
    line = one_error(gcomp("generate", "models/default.onnx", "--prompt-ids", "1,2", "--max-new-tokens", 2), 1)
    assert "no recognisable decoder layout" in line and "past_key_values.{i}.key" in line
    assert "outputs last_hidden_state" in line


def _table_model(path, *, seq="seq"):
    """A cacheless decoder with a position table: logits = (wte[id] + wpe[pos]) @ w."""
    rng = np.random.default_rng(0)
    wte, wpe, w = (rng.standard_normal(s).astype(np.float32) for s in ((16, 8), (6, 8), (8, 16)))
    nodes = [helper.make_node("Gather", ["wte", "input_ids"], ["tok"]),
             helper.make_node("Cast", ["position_ids"], ["pos"], to=TensorProto.INT64),
             helper.make_node("Gather", ["wpe", "pos"], ["where"]),
             helper.make_node("Add", ["tok", "where"], ["h"]),
             helper.make_node("MatMul", ["h", "w"], ["logits"])]
    inputs = [vinfo("input_ids", TensorProto.INT64, [1, seq]), vinfo("position_ids", TensorProto.INT64, [1, seq])]
    model = make_model(nodes, inputs, [vinfo("logits", TensorProto.FLOAT, [1, seq, 16])],
                       [tensor("wte", wte), tensor("wpe", wpe), tensor("w", w)])
    onnx.save(model, path)
    return path, (wte, wpe, w)


def test_a_model_without_a_cache_reruns_the_sequence(tmp_path):
    path, (wte, wpe, w) = _table_model(tmp_path / "table.onnx")
    ids = [3, 7]
    for _ in range(4):  # the reference: greedy over the whole sequence, in numpy
        ids.append(int(np.argmax((wte[ids[-1]] + wpe[len(ids) - 1]) @ w)))
    r = gcomp("generate", path, "--prompt-ids", "3,7", "--max-new-tokens", 4)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ",".join(map(str, ids[2:])) + "\n"
    assert decode.NO_CACHE_NOTE in r.stderr


def test_a_position_table_bounds_the_prompt(tmp_path):
    path, _ = _table_model(tmp_path / "table.onnx")
    layout = decode.layout_of(io.load(path))
    assert layout.max_positions == 6 and "wpe" in layout.max_positions_from and layout.vocab == 16
    line = one_error(gcomp("generate", path, "--prompt-ids", "1,2,3,4,5,6,7", "--max-new-tokens", 1), 2)
    assert "prompt of 7 tokens is longer than the model allows: at most 6 positions" in line and "wpe" in line
    with pytest.raises(OptionError, match="ask for at most 4 new tokens"):
        decode.check_prompt(layout, [1, 2, 3], 5)


def test_a_static_sequence_dim_bounds_the_prompt(tmp_path):
    path, _ = _table_model(tmp_path / "static.onnx", seq=4)
    layout = decode.layout_of(io.load(path))
    assert layout.static_seq == 4
    with pytest.raises(OptionError, match="prompt of 5 tokens is longer than the model allows: input_ids takes 4"):
        decode.check_prompt(layout, [1] * 5, 1)
    with pytest.raises(OptionError, match="static sequence length of 4, but decoding runs 3, 4 tokens"):
        decode.check_prompt(layout, [1] * 3, 2)
    decode.check_prompt(layout, [1] * 4, 1)  # the one run that fits


def test_a_rotary_cache_bounds_the_positions(tmp_path):
    """com.microsoft.RotaryEmbedding indexes a cos/sin cache [max_positions, rotary/2] by position."""
    cos = tensor("cos", np.ones((10, 4), np.float32))
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["x"]),
             helper.make_node("RotaryEmbedding", ["x", "position_ids", "cos", "cos"], ["logits"],
                              domain="com.microsoft", num_heads=2)]
    inputs = [vinfo("input_ids", TensorProto.INT64, [1, "seq"]), vinfo("position_ids", TensorProto.INT64, [1, "seq"])]
    model = make_model(nodes, inputs, [vinfo("logits", TensorProto.FLOAT, [1, "seq", 16])],
                       [tensor("emb", np.zeros((32, 16), np.float32)), cos],
                       extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, tmp_path / "rotary.onnx")
    layout = decode.layout_of(io.load(tmp_path / "rotary.onnx", check=False))
    assert layout.max_positions == 10 and "rotary cache cos" in layout.max_positions_from


def test_a_cache_that_does_not_grow_is_refused(tmp_path):
    """A present that does not hold past + new positions cannot be fed back: one line."""
    path = _cache_model(tmp_path / "echo.onnx")  # present = past: it never grows
    line = one_error(gcomp("generate", path, "--prompt-ids", "1,2", "--max-new-tokens", 2), 1)
    assert "present.0.key came back [1, 2, 0, 8] after 2 positions" in line


def test_an_input_gcomp_cannot_feed_is_named(tmp_path):
    proto = onnx.load(str(_cache_model(tmp_path / "m.onnx")))
    proto.graph.input.append(vinfo("cache_position", TensorProto.FLOAT, ["seq"]))
    onnx.save(proto, tmp_path / "extra.onnx")
    with pytest.raises(GcompError, match="input cache_position looks like a KV cache, but its name is not one gcomp"):
        decode.layout_of(io.load(tmp_path / "extra.onnx"))
    proto.graph.input[-1].name = "temperature"
    onnx.save(proto, tmp_path / "extra.onnx")
    with pytest.raises(GcompError, match="input temperature is not an input gcomp generate feeds"):
        decode.layout_of(io.load(tmp_path / "extra.onnx"))
