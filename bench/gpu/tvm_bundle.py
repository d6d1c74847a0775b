"""Build, on a CPU machine, the bundle that checks TVM's CUDA path on a lent GPU (issue 20).

The lent GPU machine has Python 3.12, NumPy and PyTorch but no TVM, and at most 64 MiB
travels with a run. This script compiles small models (gcomp's zoo builders at test
sizes: every op family the zoo has) for ``cuda`` at ``--cuda-arch`` with the weights in
``weights.safetensors``, and packs them with ``gcomp bundle --python 3.12`` (it needs nvcc
here, see README's TVM artifacts, and pip's network for the cp312 tvm_ffi wheel):

    python bench/gpu/tvm_bundle.py OUT_DIR [--cuda-arch sm_90]

On the GPU machine (from OUT_DIR): one JSON line per artifact; exit 1 if any fails:

    tar xzf bundle.tar.gz && PYTHONPATH=gcomp-tvm-bundle python \\
        gcomp-tvm-bundle/gcomp_tvm_runtime.py gcomp-tvm-bundle/artifacts/* --check
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

# The zoo at the sizes tests/test_tvm_backend.py compiles in seconds.
MODELS = {
    "mlp": {},
    "cnn": {"size": 16},
    "transformer": {"layers": 1, "hidden": 64, "heads": 2, "ffn": 128, "vocab": 100},
    "resnet18": {"size": 32, "num_classes": 10},
}


def gcomp(*args: object) -> dict:
    proc = subprocess.run([sys.executable, "-m", "gcomp", *map(str, args), "--json"], capture_output=True, text=True,
                          check=False, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"gcomp {' '.join(map(str, args))}: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def main() -> int:
    import models
    from gcomp import io

    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--cuda-arch", default="sm_90")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    folders = []
    for name, size in MODELS.items():
        model = a.out / f"{name}.onnx"
        io.save(models.build(name, **size), model)
        folder = a.out / f"{name}.cuda"
        doc = gcomp("compile", model, "--target", "cuda", "--cuda-arch", a.cuda_arch, "--weights", "separate",
                    "-o", folder)
        if (doc.get("artifact") or {}).get("cuda_code") != "fatbin":
            raise SystemExit(f"{name}: no nvcc found, the artifact holds CUDA C source (see README)")
        folders.append(folder)
    doc = gcomp("bundle", *folders, "-o", a.out / "bundle.tar.gz", "--python", "3.12")
    print(json.dumps({"bundle": doc["output"], "bytes": doc["bytes"], "artifacts": doc["artifacts"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
