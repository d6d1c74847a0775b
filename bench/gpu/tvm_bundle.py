"""Prepare, on a CPU machine, everything the GPU check of issue 20 needs, in one archive.

    nice -n 19 python bench/gpu/tvm_bundle.py OUT_DIR [--cuda-arch sm_90]

One command: exports ResNet-18 and BERT-base (``models/export_torch.py``: ``resnet18`` at
224x224, ``bert_base`` at sequence 128, seed 0), converts each to fp16 (``gcomp optimize
--precision fp16``), compiles fp32 and fp16 at batch 1 and 8 for ``cuda`` at
``--cuda-arch`` with ``--weights separate`` (artifacts have static shapes: one per batch),
and for each artifact derives the recipes that make its weights from the torch module's
parameters (``weight_map.py``, checked bit for bit here) in place of the weights, which
stay here (BERT-base's 440 MB cannot travel). The zoo's mlp, cnn and transformer travel
too, with their weights and ``check.npz`` (ONNX Runtime's outputs), for the loader's own
``--check``. ``gcomp bundle --python 3.12`` packs the artifacts with TVM's runtime; the
check script (``torch_vs_tvm.py``), ``weight_map.py``, ``export_torch.py`` (+
``export_subgraphs.py``, which it imports) and ``manifest.json`` join them under
``gcomp-tvm-bundle/gpu_check/``. The archive ``OUT_DIR/gpu-check.tar.gz`` must stay under
64 MiB (exit 1 otherwise); the last line printed is the command to run on the GPU machine.

It needs nvcc here (see README's TVM artifacts) and, for ``--python 3.12`` when this
Python is another, pip's network or ``--wheel`` for the cp312 tvm_ffi wheel.

``--tiny --target llvm`` prepares the same bundle from tiny configurations of both models
for this CPU (``llvm`` artifacts, this Python's tvm_ffi): the test suite runs the check
script on it with ``--device cpu``. ``--batches`` and ``--precisions`` narrow the set.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

LIMIT_BYTES = 64 * 2**20
SEED = 0
# builder of models/export_torch.py and its keyword arguments (besides seed and batch)
MODELS = {
    "resnet18": {"builder": "resnet18", "kwargs": {"image_size": 224}},
    "bert_base": {"builder": "bert_base", "kwargs": {"seq": 128}},
}
TINY = {
    "resnet18": {"builder": "resnet18",
                 "kwargs": {"image_size": 32, "hidden_sizes": [8, 16, 16, 32], "embedding_size": 8, "num_labels": 10}},
    "bert_base": {"builder": "bert_base",
                  "kwargs": {"seq": 16, "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
                             "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}},
}
# The zoo at the sizes tests/test_tvm_backend.py compiles in seconds: every op family it has.
ZOO = {"mlp": {}, "cnn": {"size": 16}, "transformer": {"layers": 1, "hidden": 64, "heads": 2, "ffn": 128, "vocab": 100}}
GPU_FILES = [HERE / "torch_vs_tvm.py", HERE / "weight_map.py", REPO / "models" / "export_torch.py",
             REPO / "models" / "export_subgraphs.py"]


def gcomp(*args: object) -> dict:
    proc = subprocess.run([sys.executable, "-m", "gcomp", *map(str, args), "--json"], capture_output=True, text=True,
                          check=False, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"gcomp {' '.join(map(str, args[:2]))}: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def compile_one(model: Path, folder: Path, a: argparse.Namespace, shapes: dict) -> None:
    """``gcomp compile`` with the weights kept out of ``model.so``; CUDA code must be a fatbin."""
    extra = ["--cuda-arch", a.cuda_arch] if a.target == "cuda" else []
    for name, shape in shapes.items():
        extra += ["--input-shape", f"{name}={','.join(map(str, shape))}"]
    doc = gcomp("compile", model, "--target", a.target, *extra, "--weights", "separate", "-o", folder)
    if a.target == "cuda" and (doc.get("artifact") or {}).get("cuda_code") != "fatbin":
        raise SystemExit(f"{model.name}: no nvcc found, the artifact holds CUDA C source (see README)")


def recipes_for(folder: Path, params: dict, pairs: list) -> None:
    """Replace the artifact's weights with the recipes that make them from the module's
    parameters (and the carried constants, if any); refuses a weight no recipe makes."""
    import numpy as np
    import weight_map
    from gcomp.backends.tvm import artifact

    weights = [(n, np.frombuffer(b, d).reshape(s)) for n, d, s, b in
               artifact.read_safetensors(folder / artifact.WEIGHTS_FILE)]
    try:
        recipes = weight_map.derive(weights, params, pairs)
    except weight_map.MapError as e:
        raise SystemExit(f"{folder.name}: {e}") from None
    carried = {r["name"]: dict(weights)[r["name"]] for r in recipes if r.get("carried")}
    if carried:
        artifact.write_safetensors(folder / "carried.safetensors", carried)
    (folder / "weight-recipes.json").write_text(json.dumps(recipes), encoding="utf-8")
    for name in (artifact.WEIGHTS_FILE, artifact.CHECK_FILE):
        (folder / name).unlink(missing_ok=True)


def prepare_model(name: str, entry: dict, a: argparse.Namespace, work: Path) -> list[dict]:
    """Export one model, its fp16 form, and compile an artifact per precision and batch."""
    import weight_map

    from models import export_torch

    onnx = export_torch.export(entry["builder"], work / name, seed=SEED, config=entry["kwargs"], check=False)
    sources = {"fp32": onnx}
    if "fp16" in a.precisions:
        sources["fp16"] = onnx.with_name(f"{name}.fp16.onnx")
        gcomp("optimize", onnx, "-o", sources["fp16"], "--precision", "fp16")
    spec = export_torch.EXPORTERS[entry["builder"]](seed=SEED, batch=1, **entry["kwargs"])
    params, pairs = weight_map.module_params(spec.module), weight_map.conv_bn_pairs(spec.module)
    runs = []
    for precision in a.precisions:
        for batch in a.batches:
            folder = work / "artifacts" / f"{name}-{precision}-b{batch}"
            shapes = {n: (batch, *arg.shape[1:]) for n, arg in zip(spec.input_names, spec.args)}
            print(f"compiling {folder.name}", flush=True)
            compile_one(sources[precision], folder, a, shapes)
            recipes_for(folder, params, pairs)
            runs.append({"artifact": f"artifacts/{folder.name}", "model": name, "precision": precision,
                         "batch": batch})
    return runs


def zoo_artifacts(a: argparse.Namespace, work: Path) -> list[Path]:
    import models
    from gcomp import io

    folders = []
    for name, size in ZOO.items():
        model = work / f"zoo-{name}.onnx"
        io.save(models.build(name, **size), model)
        folder = work / "artifacts" / f"zoo-{name}"
        compile_one(model, folder, a, {})
        folders.append(folder)
    return folders


def pack(core: Path, out: Path, manifest: dict) -> int:
    """``core`` (gcomp bundle's archive) plus ``gpu_check/``, written to ``out``; its size."""
    partial = out.with_name(out.name + ".partial")
    with tarfile.open(core) as src, tarfile.open(partial, "w:gz", compresslevel=6) as dst:
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
        for path in GPU_FILES:
            dst.add(path, f"gcomp-tvm-bundle/gpu_check/{path.name}")
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
            dst.add(Path(tmp) / "manifest.json", "gcomp-tvm-bundle/gpu_check/manifest.json")
    partial.replace(out)
    return out.stat().st_size


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--cuda-arch", default="sm_90")
    p.add_argument("--target", choices=("cuda", "llvm"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny configurations of both models (for tests)")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default: 1,8)")
    p.add_argument("--precisions", default="fp32,fp16", help="comma-separated, of fp32 and fp16")
    p.add_argument("--python", default=None, help="the GPU machine's Python (default: 3.12 for cuda, this one for llvm)")
    p.add_argument("--wheel", action="append", default=[], help="a wheel for gcomp bundle (e.g. the cp312 tvm_ffi)")
    a = p.parse_args(argv)
    a.batches = [int(b) for b in a.batches.split(",")]
    a.precisions = a.precisions.split(",")
    if set(a.precisions) - {"fp32", "fp16"} or min(a.batches) < 1:
        p.error("--precisions takes fp32 and fp16; --batches positive integers")
    a.python = a.python or ("3.12" if a.target == "cuda" else None)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    work = a.out / "work"
    shutil.rmtree(work, ignore_errors=True)
    entries = TINY if a.tiny else MODELS
    runs = [run for name, entry in entries.items() for run in prepare_model(name, entry, a, work)]
    folders = [work / r["artifact"] for r in runs] + ([] if a.tiny else zoo_artifacts(a, work))
    core = work / "core.tar.gz"
    python = ["--python", a.python] if a.python else []
    gcomp("bundle", *folders, "-o", core, *python, *[x for w in a.wheel for x in ("--wheel", w)])
    manifest = {"target": a.target, "cuda_arch": a.cuda_arch if a.target == "cuda" else None,
                "models": {n: {**e, "seed": SEED} for n, e in entries.items()}, "artifacts": runs}
    out = a.out / "gpu-check.tar.gz"
    size = pack(core, out, manifest)
    print(json.dumps({"bundle": str(out), "bytes": size, "limit_bytes": LIMIT_BYTES,
                      "artifacts": [f.name for f in folders]}))
    if size >= LIMIT_BYTES:
        print(f"{out}: {size} bytes, over the 64 MiB a GPU run can carry", file=sys.stderr)
        return 1
    zoo = " && python gcomp-tvm-bundle/gcomp_tvm_runtime.py gcomp-tvm-bundle/artifacts/zoo-* --check" * (not a.tiny)
    print(f"on the GPU machine: tar xzf {out.name}{zoo} && "
          "python gcomp-tvm-bundle/gpu_check/torch_vs_tvm.py --out torch-vs-tvm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
