"""Benchmark gcomp's fp16/bf16 conversion against onnxconverter-common and ORT's float16 tool.

Usage (from the repository root)::

    .venv/bin/python bench/bench_precision.py                        # zoo + small torch exports
    .venv/bin/python bench/bench_precision.py --models transformer,large_activations
    .venv/bin/python bench/bench_precision.py --big                  # adds a BERT-base export (438 MB)
    .venv/bin/python bench/bench_precision.py --md bench/PRECISION.md --json bench/precision_results.json

Every tool converts the *same* fp32 model: the model after ``gcomp optimize -O1`` (so
all start from one graph), with ``keep_io_types=True`` (fp32 interface: a drop-in
replacement). Per (model, tool) the table gives:

* ``casts``: Cast nodes in the output (main graph and bodies);
* ``bytes``: float initializer bytes of the output / of the fp32 model;
* ``error``: max |a - e| / max(1, max |e|) over the outputs, where ``a`` is the output
  evaluated in *emulated* reduced precision (gcomp.verify.emulate: fp32 compute,
  every fp16/bf16 value rounded where it is made, overflow to inf) and ``e`` the fp32
  original on the same seeded inputs; ``nonfinite`` counts NaN/Inf in the outputs;
* ``cosine`` / ``rel-l2``: the worst output's cosine similarity and ||a - e|| / ||e||
  (gcomp.passes.precision.accuracy), what verification bounds (fp16 >= 0.999 and
  <= 0.01, bf16 >= 0.99 and <= 0.05; ``signal`` names the first miss);
* ``checker``: whether the output passes ``onnx.checker.check_model(full_check=True)``
  (peers leave graphs unsorted with keep_io_types; they are sorted before evaluation);
* ``seconds``: the conversion call alone (in this process, median of ``--repeat``).

The tools: ``gcomp fp16`` (the safe policy), ``gcomp auto`` (fp16, search within
``--tolerance``), ``gcomp bf16``; ``occ`` = onnxconverter-common ``convert_float_to_float16``
and ``ort`` = ``onnxruntime.transformers.float16.convert_float_to_float16``, each with its
defaults and with ``+block`` = ``op_block_list`` set to gcomp's precision-sensitive ops
(the same policy, so Casts compare like for like).

Torch models are exported with models/export_torch.py (the ``export`` extra) and cached in
``--cache`` (default /tmp/gcomp-bench-cache/precision). This is a benchmark, not a test.
"""

from __future__ import annotations

import dataclasses

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ZOO = ("transformer", "cnn", "mlp", "large_activations")
SMALL_TEXT = {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 512}
TORCH = {
    "torch_bert": ("bert", {}),
    "torch_gpt2": ("gpt2", {"n_layer": 4, "n_embd": 256, "n_head": 4}),
    "torch_vit": ("vit", {}),
    "torch_resnet": ("resnet", {}),
}
BIG = {"torch_bert_base": ("bert", {"num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12,
                                    "intermediate_size": 3072, "vocab_size": 30522})}
TOOLS = ("gcomp fp16", "gcomp auto", "gcomp bf16", "occ", "occ+block", "ort", "ort+block")
SHAPES = {"input_ids": (1, 128), "attention_mask": (1, 128), "token_type_ids": (1, 128)}


def _load(name: str, cache: Path):
    import onnx_ir as ir

    import gcomp
    from gcomp import io

    if name in ZOO:
        from models import build, large_activations

        model = large_activations.build() if name == "large_activations" else build(name)
    else:
        arch, config = {**TORCH, **BIG}[name]
        folder = cache / name
        path = folder / f"{arch}.onnx"
        if not path.exists():
            from models.export_torch import export

            print(f"exporting {name} ...", file=sys.stderr)
            export(arch, folder, config=config)
        model = io.load(path)
    shapes = {k: v for k, v in SHAPES.items() if k in {i.name for i in model.graph.inputs}}
    model = gcomp.optimize(model, "O1", verify=False).model
    assert isinstance(model, ir.Model)
    return model, shapes


def _float_bytes_proto(proto) -> int:
    import numpy as np
    import onnx
    from onnx import numpy_helper

    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    total = 0
    for g in _graphs(proto.graph):
        for t in g.initializer:
            if t.data_type in floats:
                total += int(np.prod(t.dims, dtype=np.int64)) * numpy_helper.helper.tensor_dtype_to_np_dtype(
                    t.data_type).itemsize
    return total


def _graphs(graph):
    import onnx

    yield graph
    for n in graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _graphs(g)


def _casts(proto) -> int:
    return sum(1 for g in _graphs(proto.graph) for n in g.node if n.op_type == "Cast")


def _convert(tool: str, proto, model_factory, tolerance: float, feeds):
    """(output proto, seconds). ``model_factory()`` gives a fresh ir.Model of the fp32 model."""
    import onnx
    from gcomp.passes.precision import policy

    fresh = onnx.ModelProto.FromString(proto.SerializeToString())
    if tool.startswith("gcomp"):
        import onnx_ir as ir
        from gcomp.passes.precision.mixed import ConvertPrecision

        from gcomp.runtime import pass_context

        precision = tool.split()[1]
        model = model_factory()
        context = dataclasses.replace(pass_context(), inputs=lambda _model, _path: dict(feeds))
        step = ConvertPrecision(precision=precision, tolerance=tolerance, context=context)
        t0 = time.perf_counter()
        step(model)
        seconds = time.perf_counter() - t0
        return ir.to_proto(model), seconds
    block = {"op_block_list": sorted(policy.SENSITIVE)} if tool.endswith("+block") else {}
    if tool.startswith("occ"):
        from onnxconverter_common import float16 as occ

        fn = occ.convert_float_to_float16
    else:
        from onnxruntime.transformers import float16 as ort_fp16

        fn = ort_fp16.convert_float_to_float16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        out = fn(fresh, keep_io_types=True, **block)
        seconds = time.perf_counter() - t0
    return out, seconds


def _evaluate(out_proto, feeds, reference, low: str) -> dict[str, Any]:
    import onnx
    import onnx_ir as ir

    from gcomp.passes.precision.accuracy import BOUNDS
    from gcomp.verify import emulate

    row: dict[str, Any] = {}
    try:
        onnx.checker.check_model(out_proto, full_check=True)
        row["checker"] = "ok"
    except Exception as e:  # noqa: BLE001  (a peer's invalid model is a result, not a crash)
        row["checker"] = str(e).strip().splitlines()[0][:90]
    try:
        model = ir.from_proto(out_proto)
        for g in model.graphs():
            g.sort()
        rows = emulate.compare(reference, emulate.emulate(model, feeds), low)
        row["error"] = max(r.scaled_error for r in rows)
        row["nonfinite"] = sum(r.nan + r.inf - r.reference_nan - r.reference_inf for r in rows)
        row["cosine"] = min((r.cosine for r in rows if r.cosine is not None), default=None)
        row["rel_l2"] = max((r.rel_l2 for r in rows if r.rel_l2 is not None), default=None)
        misses = [f"{r.name}: {why}" for r in rows for why in [r.miss(BOUNDS[low], low)] if why]
        row["signal"] = misses[0] if misses else "ok"
    except Exception as e:  # noqa: BLE001  (an emulation failure is a result)
        row["error"] = None
        row["failure"] = str(e).strip().splitlines()[0][:120]
    return row


def run(names: list[str], tools: list[str], cache: Path, repeat: int, tolerance: float) -> list[dict[str, Any]]:
    import onnx_ir as ir
    from gcomp.passes.precision.mixed import calibrate

    from gcomp.runtime import pass_context
    from gcomp.verify.precision import calibration_feeds

    runtime = pass_context().runtime
    results = []
    for name in names:
        model, shapes = _load(name, cache)
        proto = ir.to_proto(model)
        data = proto.SerializeToString()
        feeds = calibration_feeds(model, input_shapes=shapes)
        _, reference = calibrate(model, runtime, feeds)
        fp32_bytes = _float_bytes_proto(proto)

        def factory(data=data):
            import onnx

            return ir.from_proto(onnx.ModelProto.FromString(data))

        for tool in tools:
            print(f"{name}: {tool} ...", file=sys.stderr)
            row: dict[str, Any] = {"model": name, "tool": tool}
            try:
                times = []
                for _ in range(repeat):
                    out, seconds = _convert(tool, proto, factory, tolerance, feeds)
                    times.append(seconds)
                row["seconds"] = statistics.median(times)
                row["casts"] = _casts(out)
                row["bytes_ratio"] = _float_bytes_proto(out) / fp32_bytes if fp32_bytes else None
                row.update(_evaluate(out, feeds, reference, "bf16" if tool == "gcomp bf16" else "fp16"))
            except Exception as e:  # noqa: BLE001  (a tool failure is a result)
                row["failure"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else ''}"
            results.append(row)
    return results


def markdown(results: list[dict[str, Any]], tolerance: float) -> str:
    lines = [
        "# fp16/bf16 conversion: gcomp vs onnxconverter-common (occ) and ORT's float16 tool (ort)",
        "",
        "Same O1-optimized fp32 model for every tool, keep_io_types=True. error = max|a-e| / max(1, max|e|)",
        "with `a` evaluated in emulated fp16/bf16 (overflow to inf), `e` the fp32 model. `+block`: the peer",
        f"told to keep gcomp's precision-sensitive ops fp32. gcomp auto: tolerance {tolerance:g}.",
        "",
        "| model | tool | Casts | float bytes | error | cosine | rel-l2 | NaN/Inf | checker | convert s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in results:
        if r.get("casts") is None:
            lines.append(f"| {r['model']} | {r['tool']} | failed: {r.get('failure', '?')} | | | | | | | |")
            continue
        err = "failed" if r.get("error") is None else f"{r['error']:.2g}"
        cos = "-" if r.get("cosine") is None else f"{r['cosine']:.6f}"
        rel = "-" if r.get("rel_l2") is None else f"{r['rel_l2']:.2g}"
        lines.append(
            f"| {r['model']} | {r['tool']} | {r['casts']} | {r['bytes_ratio']:.3f} | {err} | {cos} | {rel} | "
            f"{r.get('nonfinite', '?')} | {r.get('checker', '?')} | {r['seconds']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="comma-separated (default: zoo + torch_*)")
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--big", action="store_true", help="add the BERT-base export")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--tolerance", type=float, default=1e-2)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/gcomp-bench-cache/precision"))
    parser.add_argument("--md", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.models:
        names = [m.strip() for m in args.models.split(",") if m.strip()]
    else:
        names = list(ZOO) + list(TORCH) + (list(BIG) if args.big else [])
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        names = [n for n in names if n in ZOO or (args.cache / n).exists()]
        print("note: torch/transformers missing: exported models skipped unless cached", file=sys.stderr)
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    results = run(names, tools, args.cache, args.repeat, args.tolerance)
    text = markdown(results, args.tolerance)
    print(text)
    if args.md:
        args.md.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    bad = [r for r in results if r["tool"].startswith("gcomp")
           and (r.get("error") is None or r.get("nonfinite") or r.get("signal") != "ok")]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
