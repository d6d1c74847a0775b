"""gcomp's TVM artifacts against PyTorch on one device: outputs checked, both timed (issue 20).

Runs where the bundle of ``bench/gpu/tvm_bundle.py`` is unpacked (the GPU machine: Python,
NumPy, torch and transformers; no TVM, no gcomp)::

    tar xzf gpu-check.tar.gz && python gcomp-tvm-bundle/gpu_check/torch_vs_tvm.py --out results

For every model of the bundle's ``manifest.json`` it builds the torch module with
``export_torch.py`` (the same builder, seed and configuration the artifacts were
exported from), makes each artifact's weights from that module's parameters with the
recipes stored beside the artifact (``weight_map.py``: the weights never travel), runs the
artifact on TVM's runtime alone and compares its outputs with the module's in fp32 on the
same device (TF32 off): fp32 artifacts within ``allclose(rtol=1e-3, atol=1e-4)``, fp16
ones by gcomp's fp16 bar (cosine >= 0.999, relative L2 <= 0.01). Then it times, per
artifact (precision x batch), TVM (the artifact's default dlight schedules), torch eager
and ``torch.compile`` (``dynamic=False``) in the same precision, median of ``--iters``
runs after warm-up, each run synchronized. ``torch.compile`` comes last and stops once
``--budget-s`` seconds have passed (its rows then say so), so the whole run stays in
the GPU machine's five minutes.

Writes ``OUT/torch_vs_tvm.md`` (the timing table ``| model | precision | batch | TVM CUDA
ms | torch eager ms | torch.compile ms | TVM vs compile |`` and the accuracy table) and
``OUT/torch_vs_tvm.json``, after every row, so a run cut short leaves what it measured.
Exit 1 when an artifact fails to run or to match, 2 on misuse; one line each.

``--device cpu`` runs the same path on the CPU with a bundle of ``llvm`` artifacts (the
test suite's tiny check), ``--seed`` builds the module with other random weights than
the artifacts were compiled with (so outputs match only if the weights truly come from
the module), ``--compile-backend eager`` makes ``torch.compile`` trace without code
generation (fast, for tests).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main"]

HERE = Path(__file__).resolve().parent
FP32_RTOL, FP32_ATOL = 1e-3, 1e-4
FP16_COSINE, FP16_REL_L2 = 0.999, 0.01
HEADER = ("| model | precision | batch | TVM {dev} ms | torch eager ms | torch.compile ms | TVM vs compile |\n"
          "|---|---|---|---|---|---|---|\n")


class CheckError(Exception):
    """Why the check cannot go on, in one line."""


def _helpers() -> tuple[Any, Any, Any]:
    """(the artifact loader, weight_map, export_torch): beside this file in a bundle, from
    gcomp and models/ in the repository."""
    sys.path.insert(0, str(HERE))
    if (HERE.parent / "gcomp_tvm_runtime.py").is_file():
        sys.path.insert(0, str(HERE.parent))
        import export_torch
        import gcomp_tvm_runtime as loader
    else:
        sys.path.insert(0, str(HERE.parents[1]))
        from gcomp.backends.tvm import artifact as loader

        from models import export_torch
    import weight_map

    return loader, weight_map, export_torch


# -- measuring ---------------------------------------------------------------------


def _median_ms(fn, sync, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def _errors(got: np.ndarray, want: np.ndarray) -> dict:
    g, w = got.astype(np.float64).reshape(-1), want.astype(np.float64).reshape(-1)
    norm = float(np.linalg.norm(w)) or 1.0
    denom = float(np.linalg.norm(g)) * norm
    return {"max_abs": float(np.max(np.abs(g - w))) if w.size else 0.0,
            "rel_l2": float(np.linalg.norm(g - w)) / norm,
            "cosine": float(g @ w) / denom if denom else 1.0,
            "finite": bool(np.isfinite(g).all())}


def _within(got: np.ndarray, want: np.ndarray, precision: str) -> bool:
    e = _errors(got, want)
    if not e["finite"] or got.shape != want.shape:
        return False
    if precision == "fp32":
        return bool(np.allclose(got, want, rtol=FP32_RTOL, atol=FP32_ATOL))
    return e["cosine"] >= FP16_COSINE and e["rel_l2"] <= FP16_REL_L2


# -- one model -----------------------------------------------------------------------


class Model:
    """The torch module of one manifest model on the device, its inputs and fp32 outputs."""

    def __init__(self, torch, export_torch, weight_map, name: str, entry: dict, batch: int, device, seed) -> None:
        self.torch, self.name, self.device = torch, name, device
        spec = export_torch.EXPORTERS[entry["builder"]](
            seed=entry["seed"] if seed is None else seed, batch=batch, **entry.get("kwargs", {}))
        self.module = spec.module.eval()
        self.params = weight_map.module_params(self.module)  # on the CPU, before moving
        self.module.to(device)
        self.input_names, self.output_names, self.args = spec.input_names, spec.output_names, spec.args
        self._half = None

    def feeds(self, batch: int) -> dict[str, np.ndarray]:
        return {n: a[:batch].numpy() for n, a in zip(self.input_names, self.args)}

    def inputs(self, batch: int, precision: str) -> list:
        half = precision == "fp16"
        return [(a[:batch].half() if half and a.is_floating_point() else a[:batch]).to(self.device)
                for a in self.args]

    def module_in(self, precision: str):
        if precision == "fp32":
            return self.module
        if self._half is None:
            self._half = copy.deepcopy(self.module).half().eval()
        return self._half

    def outputs(self, module, inputs: list) -> list[np.ndarray]:
        with self.torch.no_grad():
            out = module(*inputs)
        out = out if isinstance(out, (tuple, list)) else [out]
        return [o.detach().float().cpu().numpy() for o in out]

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()


def _tvm_run(loader, weight_map, model: Model, run: dict, root: Path, iters: tuple[int, int]) -> dict:
    """Load one artifact, give it the module's weights, check and time it."""
    folder = root / run["artifact"]
    art = loader.load(folder)
    recipes = json.loads((folder / "weight-recipes.json").read_text())
    carried = {}
    if (folder / "carried.safetensors").is_file():
        carried = {n: np.frombuffer(b, d).reshape(s) for n, d, s, b in
                   loader.read_safetensors(folder / "carried.safetensors")}
    made = weight_map.produce(recipes, model.params, carried)
    names = (art.meta.get("weights") or {}).get("names", [])
    weights = [art.machine.tensor(made[n]) for n in names]
    dtypes = {i["name"]: i["dtype"] for i in art.meta["inputs"] if i.get("dtype")}
    args = loader.input_tensors(art.machine, art.input_names, dtypes, model.feeds(run["batch"])) + weights
    got = art.outputs(art.machine.main(*args))
    ms = _median_ms(lambda: art.machine.main(*args), art.machine.sync, *iters)
    return {"outputs": got, "tvm_ms": ms}


def _check_run(ctx: dict, model: Model, run: dict) -> dict:
    """One row: the artifact's outputs against torch fp32, TVM and torch eager timed."""
    batch, precision = run["batch"], run["precision"]
    ref = model.outputs(model.module, model.inputs(batch, "fp32"))
    row = {"model": model.name, "precision": precision, "batch": batch, "artifact": run["artifact"]}
    try:
        tvm = _tvm_run(ctx["loader"], ctx["weight_map"], model, run, ctx["root"], ctx["iters"])
    except Exception as e:  # noqa: BLE001 - any failure of one artifact is its row's one line
        return {**row, "ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    got = [tvm["outputs"][n] for n in model.output_names]
    half = model.outputs(model.module_in(precision), model.inputs(batch, precision))
    row["outputs"] = {n: {**_errors(g, r), "shape": list(g.shape), "torch_same_precision": _errors(h, r)}
                      for n, g, r, h in zip(model.output_names, got, ref, half)}
    row["ok"] = all(_within(g, r, precision) for g, r in zip(got, ref))
    row["tvm_ms"] = tvm["tvm_ms"]
    module, inputs = model.module_in(precision), model.inputs(batch, precision)
    with model.torch.no_grad():
        row["eager_ms"] = _median_ms(lambda: module(*inputs), model.sync, *ctx["iters"])
    return row


def _compile_row(ctx: dict, model: Model, row: dict) -> None:
    """torch.compile's time for a row, or why it was not measured."""
    if time.monotonic() - ctx["start"] > ctx["budget_s"]:
        row["compile_note"] = "not measured: time budget spent"
        return
    torch, precision = model.torch, row["precision"]
    key = (model.name, precision)
    if key not in ctx["compiled"]:
        ctx["compiled"][key] = torch.compile(model.module_in(precision), backend=ctx["backend"], dynamic=False)
    compiled, inputs = ctx["compiled"][key], model.inputs(row["batch"], precision)
    try:
        with torch.no_grad():
            t0 = time.perf_counter()
            compiled(*inputs)
            model.sync()
            row["compile_first_call_s"] = time.perf_counter() - t0
            row["compile_ms"] = _median_ms(lambda: compiled(*inputs), model.sync, *ctx["iters"])
    except Exception as e:  # noqa: BLE001 - a compile failure is a row's note, not the check's end
        row["compile_note"] = f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"


# -- the report ----------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _table(rows: list[dict], device: str) -> str:
    lines = [HEADER.format(dev="CUDA" if device == "cuda" else device.upper())]
    for r in rows:
        tvm, eager, comp = r.get("tvm_ms"), r.get("eager_ms"), r.get("compile_ms")
        ratio = f"{comp / tvm:.2f}x" if tvm and comp else "—"
        lines.append(f"| {r['model']} | {r['precision']} | {r['batch']} | {_ms(tvm)} | {_ms(eager)} | {_ms(comp)} "
                     f"| {ratio} |\n")
    lines.append("\nTVM vs compile: torch.compile's time over TVM's (above 1: TVM is faster).\n")
    notes = [f"- {r['model']} {r['precision']} b{r['batch']}: {r.get('error') or r.get('compile_note')}\n"
             for r in rows if r.get("error") or r.get("compile_note")]
    lines += ["\n", *notes] if notes else []
    lines.append("\n| model | precision | batch | output | max abs err vs torch fp32 | rel L2 | cosine "
                 "| torch same precision rel L2 | within |\n|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        for name, e in (r.get("outputs") or {}).items():
            lines.append(f"| {r['model']} | {r['precision']} | {r['batch']} | {name} | {e['max_abs']:.3g} "
                         f"| {e['rel_l2']:.3g} | {e['cosine']:.6f} | {e['torch_same_precision']['rel_l2']:.3g} "
                         f"| {'yes' if r['ok'] else 'NO'} |\n")
    return "".join(lines)


def _write(out: Path, rows: list[dict], env: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    doc = {**env, "rows": rows, "ok": all(r.get("ok") for r in rows)}
    for path, text in ((out / "torch_vs_tvm.json", json.dumps(doc, indent=1)),
                       (out / "torch_vs_tvm.md", _table(rows, env["device"]))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)


# -- the run -------------------------------------------------------------------------


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="torch_vs_tvm.py", description=__doc__.splitlines()[0])
    p.add_argument("--manifest", type=Path, default=HERE / "manifest.json")
    p.add_argument("--out", type=Path, default=Path("torch-vs-tvm"))
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: the artifacts' (cuda for cuda artifacts, cpu for llvm)")
    p.add_argument("--seed", type=int, default=None, help="build the modules with this seed (default: the manifest's)")
    p.add_argument("--iters", type=int, default=None, help="timed runs per measurement (default: 50 cuda, 5 cpu)")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--budget-s", type=float, default=240.0,
                   help="start no torch.compile measurement after this many seconds")
    return p.parse_args(argv)


def _setup(a: argparse.Namespace) -> tuple[dict, Any, Any]:
    """(the manifest, torch, the device), the device checked against the artifacts."""
    try:
        manifest = json.loads(a.manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckError(f"{a.manifest}: not a readable manifest: {e}") from None
    target = manifest["target"]
    a.device = a.device or ("cuda" if target == "cuda" else "cpu")
    if (a.device == "cuda") != (target == "cuda"):
        raise CheckError(f"--device {a.device}: the bundle's artifacts are for {target}")
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        raise CheckError("--device cuda: torch sees no CUDA GPU")
    # the reference is fp32 proper: no TF32 in matrix products or convolutions
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return manifest, torch, torch.device(a.device)


def _environment(torch, device) -> dict:
    env = {"device": device.type, "torch": torch.__version__, "python": sys.version.split()[0]}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def _run(a: argparse.Namespace) -> int:
    manifest, torch, device = _setup(a)
    loader, weight_map, export_torch = _helpers()
    iters = a.iters or (50 if device.type == "cuda" else 5)
    ctx = {"loader": loader, "weight_map": weight_map, "root": a.manifest.resolve().parent.parent,
           "iters": (max(1, iters // 5), iters), "start": time.monotonic(), "budget_s": a.budget_s,
           "backend": a.compile_backend, "compiled": {}}
    env = {**_environment(torch, device), "compile_backend": a.compile_backend, "iters": iters}
    rows, models = [], {}
    for name, entry in manifest["models"].items():
        runs = [r for r in manifest["artifacts"] if r["model"] == name]
        models[name] = Model(torch, export_torch, weight_map, name, entry, max(r["batch"] for r in runs), device,
                             a.seed)
        for run in runs:
            rows.append(_check_run(ctx, models[name], run))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "outputs"}), flush=True)
            _write(a.out, rows, env)
        gc.collect()
    # torch.compile last, the fp16 rows and the largest batch first (BERT-base fp16 is the floor)
    for row in sorted(rows, key=lambda r: (r["precision"] != "fp16", -r["batch"])):
        if "tvm_ms" in row:
            _compile_row(ctx, models[row["model"]], row)
            _write(a.out, rows, env)
    env["wall_s"] = time.monotonic() - ctx["start"]
    _write(a.out, rows, env)
    print(f"wrote {a.out / 'torch_vs_tvm.md'} and .json ({env['wall_s']:.1f} s)", flush=True)
    bad = [f"{r['model']} {r['precision']} b{r['batch']}" for r in rows if not r.get("ok")]
    if bad:
        print(f"torch_vs_tvm: {len(bad)} artifact(s) failed or differ from torch fp32: {', '.join(bad)}",
              file=sys.stderr)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    a = _parse(argv)
    try:
        return _run(a)
    except CheckError as e:
        print(f"torch_vs_tvm: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
