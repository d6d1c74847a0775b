"""Micro-benchmark: an ONNX Runtime contrib op vs the standard-op subgraph it would replace.

Usage (from the repository root)::

    .venv/bin/python bench/bench_contrib_ops.py embed --shape 2,16,256            # BERT-style
    .venv/bin/python bench/bench_contrib_ops.py embed --shape 2,16,256 --keep-sum # GPT-2-style
    .venv/bin/python bench/bench_contrib_ops.py attention --shape 2,16,256 --heads 4
    .venv/bin/python bench/bench_contrib_ops.py rms --shape 1,64,768       # RMSNormalization-23 vs Simplified...
    .venv/bin/python bench/bench_contrib_ops.py skip-rms --shape 1,1,768  # Add + Simplified... vs Skip...

A target-specific fusion exists to be faster; this is the measurement behind the
``not_for`` of ``ort-embed-layer-norm`` and the packed Attention's lack of a head limit in
passes/fusion/ (docs/measurements.md has the figures, and names the decisions no script
here measures yet: SkipLayerNormalization, MultiHeadAttention).

* ``embed``: word + position (+ segment) Gathers, their sum and LayerNormalization, with
  int64 ids and positions from ``Slice(arange buffer, 0, S)`` (the torch BERT export), vs
  ``Cast`` + ``com.microsoft.EmbedLayerNormalization`` (``--keep-sum``: no segment, the sum
  also an output, as GPT-2 reads it).
* ``attention``: GPT-2's block (flatten, Gemm, reshape, Split, head reshapes, scores * scale
  + additive causal/padding mask, Softmax, PV, head transpose) vs ``com.microsoft.Attention``
  with the projection's packed weight and the mask as ``attention_bias`` + Reshape to heads.
* ``rms``: ``SimplifiedLayerNormalization`` (ORT's RMSNorm op, default domain) vs the
  standard ``RMSNormalization`` of opset 23, both in an opset-23 model, over the last axis.
* ``skip-rms``: a decoder's residual ``Add`` + ``SimplifiedLayerNormalization`` (the sum
  also an output: the residual stream reads it) vs ``com.microsoft.SkipSimplifiedLayerNormalization``
  (the sum as its 4th output).

Both graphs run on ORT's CPU provider with ORT_ENABLE_ALL and ``--threads`` intra-op threads
in this process (which imports nothing else), interleaved in blocks (each block first runs
its session once untimed: ORT's threads spin after a run). Prints the max abs difference
and min / median microseconds. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np


def _helpers():
    from onnx import TensorProto, helper, numpy_helper

    return TensorProto, helper, numpy_helper


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> bytes:
    _, helper, _ = _helpers()
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8).SerializeToString()


def embed_graphs(batch: int, seq: int, hidden: int, vocab: int, keep_sum: bool):
    TP, helper, nh = _helpers()
    mk = helper.make_node
    rng = np.random.default_rng(0)
    inits = [nh.from_array(rng.standard_normal((vocab, hidden)).astype(np.float32), "W"),
             nh.from_array(rng.standard_normal((512, hidden)).astype(np.float32), "P"),
             nh.from_array(rng.standard_normal((2, hidden)).astype(np.float32), "T"),
             nh.from_array(rng.standard_normal(hidden).astype(np.float32), "g"),
             nh.from_array(rng.standard_normal(hidden).astype(np.float32), "b"),
             nh.from_array(np.arange(512, dtype=np.int64)[None], "pbuf"),
             nh.from_array(np.array(1, np.int64), "one"), nh.from_array(np.array([0], np.int64), "zero1"),
             nh.from_array(np.array([1], np.int64), "one1")]
    names = ["ids"] if keep_sum else ["ids", "seg"]
    inputs = [helper.make_tensor_value_info(n, TP.INT64, ["B", "S"]) for n in names]
    outputs = [helper.make_tensor_value_info("y", TP.FLOAT, None)]
    if keep_sum:
        outputs.append(helper.make_tensor_value_info("s", TP.FLOAT, None))
    unfused = [mk("Shape", ["ids"], ["sh"]), mk("Gather", ["sh", "one"], ["sl"], axis=0),
               mk("Unsqueeze", ["sl", "zero1"], ["sl1"]), mk("Slice", ["pbuf", "zero1", "sl1", "one1", "one1"], ["pids"]),
               mk("Gather", ["W", "ids"], ["ew"]), mk("Gather", ["P", "pids"], ["ep"])]
    if keep_sum:
        unfused.append(mk("Add", ["ew", "ep"], ["s"]))
    else:
        unfused += [mk("Gather", ["T", "seg"], ["es"]), mk("Add", ["ew", "es"], ["a"]), mk("Add", ["a", "ep"], ["s"])]
    unfused.append(mk("LayerNormalization", ["s", "g", "b"], ["y"], axis=-1, epsilon=1e-12))
    fused = [mk("Cast", [n], [f"{n}32"], to=TP.INT32) for n in names]
    fused.append(mk("EmbedLayerNormalization",
                    ["ids32", "" if keep_sum else "seg32", "W", "P", "" if keep_sum else "T", "g", "b"],
                    ["y", "", "s"] if keep_sum else ["y"], domain="com.microsoft", epsilon=1e-12, mask_index_type=0))
    feeds = {"ids": rng.integers(0, vocab, (batch, seq))}
    if not keep_sum:
        feeds["seg"] = rng.integers(0, 2, (batch, seq))
    return _model(unfused, inputs, outputs, inits), _model(fused, inputs, outputs, inits), feeds


def attention_graphs(batch: int, seq: int, hidden: int, heads: int):
    TP, helper, nh = _helpers()
    mk = helper.make_node
    d = hidden // heads
    rng = np.random.default_rng(0)
    scale = float(1 / np.sqrt(d))
    inits = [nh.from_array((0.05 * rng.standard_normal((hidden, 3 * hidden))).astype(np.float32), "W"),
             nh.from_array((0.05 * rng.standard_normal(3 * hidden)).astype(np.float32), "b"),
             nh.from_array(np.array([-1, hidden], np.int64), "flat"), nh.from_array(np.array([3 * hidden], np.int64), "last"),
             nh.from_array(np.array([hidden] * 3, np.int64), "split"),
             nh.from_array(np.array([0, 0, heads, d], np.int64), "heads"), nh.from_array(np.array(scale, np.float32), "c")]
    inputs = [helper.make_tensor_value_info("x", TP.FLOAT, ["B", "S", hidden]),
              helper.make_tensor_value_info("mask", TP.FLOAT, ["B", 1, "S", "S"])]
    outputs = [helper.make_tensor_value_info("y", TP.FLOAT, None)]
    unfused = [mk("Shape", ["x"], ["bs"], start=0, end=2), mk("Concat", ["bs", "last"], ["unflat"], axis=0),
               mk("Reshape", ["x", "flat"], ["x2"]), mk("Gemm", ["x2", "W", "b"], ["p"]),
               mk("Reshape", ["p", "unflat"], ["qkv"]), mk("Split", ["qkv", "split"], ["q", "k", "v"], axis=2),
               mk("Reshape", ["q", "heads"], ["qr"]), mk("Transpose", ["qr"], ["q4"], perm=[0, 2, 1, 3]),
               mk("Reshape", ["k", "heads"], ["kr"]), mk("Transpose", ["kr"], ["kt"], perm=[0, 2, 3, 1]),
               mk("Reshape", ["v", "heads"], ["vr"]), mk("Transpose", ["vr"], ["v4"], perm=[0, 2, 1, 3]),
               mk("MatMul", ["q4", "kt"], ["sc"]), mk("Mul", ["sc", "c"], ["ss"]), mk("Add", ["ss", "mask"], ["sm"]),
               mk("Softmax", ["sm"], ["pr"], axis=-1), mk("MatMul", ["pr", "v4"], ["o"]),
               mk("Transpose", ["o"], ["y"], perm=[0, 2, 1, 3])]
    fused = [mk("Attention", ["x", "W", "b", "", "", "mask"], ["a"], domain="com.microsoft", num_heads=heads, scale=scale),
             mk("Reshape", ["a", "heads"], ["y"])]
    tri = np.triu(np.full((seq, seq), np.finfo(np.float32).min, np.float32), 1)
    mask = np.broadcast_to(tri, (batch, 1, seq, seq)).copy()
    mask[0, :, :, : min(2, seq - 1)] = np.finfo(np.float32).min  # causal + left padding in batch 0
    feeds = {"x": rng.standard_normal((batch, seq, hidden)).astype(np.float32), "mask": mask}
    return _model(unfused, inputs, outputs, inits), _model(fused, inputs, outputs, inits), feeds


def rms_graphs(batch: int, seq: int, hidden: int, skip: bool):
    TP, helper, nh = _helpers()
    mk = helper.make_node
    rng = np.random.default_rng(0)
    inits = [nh.from_array((1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32), "g")]
    names = ["x", "skip"] if skip else ["x"]
    inputs = [helper.make_tensor_value_info(n, TP.FLOAT, ["B", "S", hidden]) for n in names]
    outputs = [helper.make_tensor_value_info(n, TP.FLOAT, None) for n in (["y", "s"] if skip else ["y"])]
    feeds = {n: rng.standard_normal((batch, seq, hidden)).astype(np.float32) for n in names}
    norm = {"axis": -1, "epsilon": 1e-6}
    if not skip:
        a = [mk("SimplifiedLayerNormalization", ["x", "g"], ["y"], **norm)]
        b = [mk("RMSNormalization", ["x", "g"], ["y"], **norm)]
        return _model(a, inputs, outputs, inits, 23), _model(b, inputs, outputs, inits, 23), feeds
    a = [mk("Add", ["x", "skip"], ["s"]), mk("SimplifiedLayerNormalization", ["s", "g"], ["y"], **norm)]
    b = [mk("SkipSimplifiedLayerNormalization", ["x", "skip", "g"], ["y", "", "", "s"], domain="com.microsoft",
            epsilon=1e-6)]
    return _model(a, inputs, outputs, inits), _model(b, inputs, outputs, inits), feeds


# What each op compares: (the first graph, the second).
_LABELS = {"rms": ("SimplifiedLayerNormalization", "RMSNormalization-23"),
           "skip-rms": ("Add+SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")}


def _session(model: bytes, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("op", choices=("embed", "attention", "rms", "skip-rms"))
    parser.add_argument("--shape", default="2,16,256", help="batch,sequence,hidden")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--keep-sum", action="store_true", help="embed: GPT-2-style, the sum also an output")
    parser.add_argument("--rounds", type=int, default=60, help="timed rounds (after 3 warm-up rounds)")
    parser.add_argument("--block", type=int, default=20, help="timed runs per session per round")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    batch, seq, hidden = (int(v) for v in args.shape.split(","))
    if args.op == "embed":
        unfused, fused, feeds = embed_graphs(batch, seq, hidden, args.vocab, args.keep_sum)
    elif args.op == "attention":
        unfused, fused, feeds = attention_graphs(batch, seq, hidden, args.heads)
    else:
        unfused, fused, feeds = rms_graphs(batch, seq, hidden, args.op == "skip-rms")
    first, second = _LABELS.get(args.op, ("unfused", "fused"))
    sessions = {first: _session(unfused, args.threads), second: _session(fused, args.threads)}
    results = [s.run(None, feeds) for s in sessions.values()]
    diff = max(float(np.abs(a - b).max()) for a, b in zip(*results))
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    for round_ in range(3 + args.rounds):
        for key, sess in sessions.items():
            sess.run(None, feeds)
            for _ in range(args.block):
                t0 = time.perf_counter()
                sess.run(None, feeds)
                if round_ >= 3:
                    samples[key].append((time.perf_counter() - t0) * 1e6)
    label = f"{args.op} [{batch},{seq},{hidden}]" + (f" {args.heads} heads" if args.op == "attention" else "")
    if args.op == "embed":
        label += " word+pos, sum kept" if args.keep_sum else " word+pos+seg"
    print(f"{label}: max abs diff {diff:.1e}; " + ", ".join(
        f"{k} min {min(v):.1f} us / median {statistics.median(v):.1f} us" for k, v in samples.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
