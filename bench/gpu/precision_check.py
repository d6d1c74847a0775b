"""Real fp16 on a GPU vs gcomp's emulated fp16: does the emulator predict the hardware?

Two phases, because the GPU machine has PyTorch+CUDA but not gcomp's dependencies:

1. ``prepare`` (here, with gcomp installed)::

       .venv/bin/python bench/gpu/precision_check.py prepare bench/gpu/precision_data

   converts the zoo models (transformer, cnn, mlp, large_activations) with
   ``convert-precision`` fp16 (transformer and large_activations also bf16), plus ORT's
   float16 tool's naive conversion of large_activations, and writes per case: ``model.onnx`` (the fp16 model), ``feeds.npz``,
   ``reference.npz`` (fp32 original on ORT) and ``emulated.npz`` (gcomp's emulator).

2. ``run`` (on the GPU machine: needs only onnx, numpy, torch)::

       python bench/gpu/precision_check.py run bench/gpu/precision_data

   executes each fp16 model *for real* with PyTorch on CUDA (a small ONNX interpreter: each
   op in the dtype the model declares, so fp16 ops run fp16 kernels — cuBLAS with fp32
   accumulation, as the emulator assumes), and prints per output: the GPU's error against
   fp32, the emulator's error against fp32, the GPU-vs-emulator difference in units of
   fp16 ulps at the output's scale (max(1, max|e|)), and NaN/Inf counts of both. Expected: equal NaN/Inf counts
   (overflow reproduced) and differences of a few ulps (accumulation order only).

Without CUDA the run phase uses the CPU (a dry run: torch's CPU fp16 kernels) and says so.
"""

from __future__ import annotations

import dataclasses

import json
import sys
from pathlib import Path

import numpy as np

CASES = ("transformer", "cnn", "mlp", "large_activations", "large_activations_ort_tool",
         "transformer_bf16", "large_activations_bf16")


def prepare(out: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(repo))
    import onnx_ir as ir
    from gcomp.passes.precision.mixed import ConvertPrecision, calibrate

    import gcomp
    from gcomp.runtime import pass_context
    from gcomp.verify import emulate
    from gcomp.verify.precision import calibration_feeds
    from models import build, large_activations

    context = pass_context()

    for case in CASES:
        name = case.removesuffix("_ort_tool").removesuffix("_bf16")
        model = large_activations.build() if name == "large_activations" else build(name)
        model = gcomp.optimize(model, "O1", verify=False).model
        feeds = calibration_feeds(model)
        _, reference = calibrate(model, context.runtime, feeds)
        if case.endswith("_ort_tool"):
            from onnxruntime.transformers import float16 as ort_fp16

            proto = ort_fp16.convert_float_to_float16(ir.to_proto(model), keep_io_types=True)
            model = ir.from_proto(proto)
            for g in model.graphs():
                g.sort()
        else:
            fixed = dataclasses.replace(context, inputs=lambda _model, _path: dict(feeds))
            step = ConvertPrecision(precision="bf16" if case.endswith("_bf16") else "fp16", context=fixed)
            step(model)
        emulated = emulate.emulate(model, feeds)
        folder = out / case
        folder.mkdir(parents=True, exist_ok=True)
        ir.save(model, folder / "model.onnx")
        np.savez(folder / "feeds.npz", **feeds)
        np.savez(folder / "reference.npz", **reference)
        np.savez(folder / "emulated.npz", **{k: np.asarray(v) for k, v in emulated.items()})
        print(f"prepared {folder}")


# ------------------------------------------------------------------ a small ONNX interpreter


def _attrs(node):
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _ops(torch):
    F = torch.nn.functional
    dtypes = {1: torch.float32, 10: torch.float16, 16: torch.bfloat16, 7: torch.int64, 6: torch.int32, 9: torch.bool}

    def reduce_mean(x, axes=None, keepdims=1, **_):
        return x.mean(dim=tuple(axes), keepdim=bool(keepdims))

    def reshape(x, shape, **_):
        shape = [int(s) for s in shape.tolist()]
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return x.reshape(shape)

    def gemm(a, b, c=None, alpha=1.0, beta=1.0, transA=0, transB=0, **_):
        a = a.T if transA else a
        b = b.T if transB else b
        y = alpha * (a @ b)
        return y if c is None else y + beta * c

    def conv(x, w, b=None, dilations=(1, 1), group=1, pads=(0, 0, 0, 0), strides=(1, 1), **_):
        n = len(pads) // 2
        if list(pads[:n]) != list(pads[n:]):
            x = F.pad(x, [p for i in reversed(range(n)) for p in (pads[i], pads[i + n])])
            pads = [0] * (2 * n)
        return F.conv2d(x, w, b, stride=tuple(strides), padding=tuple(pads[:n]), dilation=tuple(dilations),
                        groups=group)

    def max_pool(x, kernel_shape, strides=None, pads=(0, 0, 0, 0), ceil_mode=0, **_):
        n = len(kernel_shape)
        return F.max_pool2d(x, tuple(kernel_shape), tuple(strides or kernel_shape), tuple(pads[:n]),
                            ceil_mode=bool(ceil_mode))

    def batch_norm(x, scale, bias, mean, var, epsilon=1e-5, **_):
        return F.batch_norm(x, mean, var, scale, bias, False, 0.0, epsilon)

    def unsqueeze(x, axes, **_):
        for a in sorted(int(v) for v in axes.tolist()):
            x = x.unsqueeze(a if a >= 0 else a + x.dim() + 1)
        return x

    return {
        "Add": lambda a, b, **_: a + b, "Sub": lambda a, b, **_: a - b, "Mul": lambda a, b, **_: a * b,
        "Div": lambda a, b, **_: a / b, "Pow": lambda a, b, **_: torch.pow(a, b.to(a.dtype)),
        "Sqrt": lambda x, **_: torch.sqrt(x), "Erf": lambda x, **_: torch.erf(x), "Exp": lambda x, **_: torch.exp(x),
        "Tanh": lambda x, **_: torch.tanh(x), "Relu": lambda x, **_: torch.relu(x),
        "MatMul": lambda a, b, **_: a @ b, "Gemm": gemm, "Conv": conv, "MaxPool": max_pool,
        "BatchNormalization": batch_norm, "ReduceMean": reduce_mean,
        "GlobalAveragePool": lambda x, **_: x.mean(dim=(2, 3), keepdim=True),
        "Flatten": lambda x, axis=1, **_: x.reshape(int(np.prod(x.shape[:axis])), -1),
        "Softmax": lambda x, axis=-1, **_: torch.softmax(x, dim=axis),
        "Reshape": reshape, "Transpose": lambda x, perm, **_: x.permute(*perm),
        "Cast": lambda x, to, **_: x.to(dtypes[to]), "Identity": lambda x, **_: x,
        "Shape": lambda x, **_: torch.tensor(list(x.shape), dtype=torch.int64, device=x.device),
        "Gather": lambda x, i, axis=0, **_: torch.index_select(
            x, axis, torch.where(i < 0, i + x.shape[axis], i).reshape(-1)).reshape(
            tuple(x.shape[:axis]) + tuple(i.shape) + tuple(x.shape[axis + 1:])),
        "Unsqueeze": unsqueeze,
        "Range": lambda s, l, d, **_: torch.arange(s.item(), l.item(), d.item(), device=s.device, dtype=s.dtype),
    }


def _tensor(torch, array: np.ndarray, device: str):
    if array.dtype.name == "bfloat16":  # ml_dtypes: same bits as torch.bfloat16
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16).to(device)
    return torch.from_numpy(array.copy()).to(device)


def execute(model_path: Path, feeds: dict, device: str) -> dict:
    import onnx
    import torch
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    ops = _ops(torch)
    env = {}
    for t in model.graph.initializer:
        env[t.name] = _tensor(torch, numpy_helper.to_array(t), device)
    declared = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    to_np = {1: np.float32, 10: np.float16}
    for k, v in feeds.items():
        env[k] = torch.from_numpy(np.asarray(v).astype(to_np.get(declared.get(k), np.asarray(v).dtype))).to(device)
    pending = list(model.graph.node)
    with torch.no_grad():
        while pending:  # dependency order (a peer's output may be unsorted)
            progress = False
            for node in list(pending):
                if all(not i or i in env for i in node.input):
                    args = [env[i] if i else None for i in node.input]
                    if node.op_type == "Constant":
                        out = _tensor(torch, numpy_helper.to_array(node.attribute[0].t), device)
                    else:
                        out = ops[node.op_type](*args, **_attrs(node))
                    env[node.output[0]] = out
                    pending.remove(node)
                    progress = True
            if not progress:
                raise RuntimeError(f"cannot run node {pending[0].op_type} {pending[0].name}")
    return {o.name: env[o.name].float().cpu().numpy() for o in model.graph.output}


def _ort_cpu(model_path: Path, feeds: dict) -> dict | None:
    try:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.log_severity_level = 4
        sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(None, feeds)))
    except Exception:  # noqa: BLE001  (no ORT, or no kernel: bf16 on the CPU)
        return None


def run(folder: Path) -> int:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {torch.cuda.get_device_name(0) if device == 'cuda' else 'CPU (dry run, no CUDA)'}; "
          f"torch {torch.__version__}")
    rows = []
    for case in CASES:
        path = folder / case
        if not path.exists():
            continue
        feeds = dict(np.load(path / "feeds.npz"))
        reference = dict(np.load(path / "reference.npz"))
        emulated = dict(np.load(path / "emulated.npz"))
        real = execute(path / "model.onnx", feeds, device)
        ort_out = _ort_cpu(path / "model.onnx", feeds)
        for name, e in reference.items():
            e = e.astype(np.float64)
            scale = max(1.0, float(np.abs(e[np.isfinite(e)]).max(initial=0.0)))
            r = real[name].astype(np.float64)
            m = emulated[name].astype(np.float64)
            finite = np.isfinite(r) & np.isfinite(m) & np.isfinite(e)
            # ulp at the output's scale (fp16: 10 fraction bits, bf16: 7): differences near
            # zero are judged on that scale too
            bits = 7 if case.endswith("_bf16") else 10
            ulp = 2.0 ** (np.floor(np.log2(scale)) - bits)
            rows.append({
                "case": case, "output": name,
                "gpu_error": float(np.abs(r - e)[finite].max(initial=0.0)) / scale,
                "emulator_error": float(np.abs(m - e)[finite].max(initial=0.0)) / scale,
                "gpu_vs_emulator_max_ulps": float(np.abs(r - m)[finite].max(initial=0.0)) / ulp,
                "gpu_nonfinite": int((~np.isfinite(r)).sum()), "emulator_nonfinite": int((~np.isfinite(m)).sum()),
                # ORT on the CPU, for contrast: it upcasts fp16 ops (and has no bf16 kernels)
                "ort_cpu_error": None if ort_out is None else
                float(np.abs(ort_out[name].astype(np.float64) - e)[np.isfinite(e)].max(initial=0.0)) / scale,
            })
    print(f"{'case':28} {'output':18} {'gpu err':>9} {'emu err':>9} {'gpu-emu ulps':>12} "
          f"{'nonfinite gpu/emu':>18} {'ORT CPU err':>11}")
    for r in rows:
        ort_err = "n/a" if r["ort_cpu_error"] is None else f"{r['ort_cpu_error']:.2e}"
        print(f"{r['case']:28} {r['output'][:18]:18} {r['gpu_error']:9.2e} {r['emulator_error']:9.2e} "
              f"{r['gpu_vs_emulator_max_ulps']:12.1f} {r['gpu_nonfinite']:>9}/{r['emulator_nonfinite']:<8} {ort_err:>11}")
    print("JSON " + json.dumps({"device": device, "rows": rows}))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in ("prepare", "run"):
        print(__doc__)
        return 2
    folder = Path(args[1])
    if args[0] == "prepare":
        prepare(folder)
        return 0
    return run(folder)


if __name__ == "__main__":
    raise SystemExit(main())
