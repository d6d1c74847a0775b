"""GPU-machine check for the profile report's environment and GPU-memory fields (issue 7).

The lent GPU machine has PyTorch with CUDA but no onnxruntime-gpu and no TVM, so
``gcomp profile --device cuda`` cannot run there. What can be checked: gcomp's
environment block lists the GPU (name, memory) from nvidia-smi, and
``gcomp.perf.gpu_memory_of_process`` sees memory this process holds on the GPU
(allocated here with PyTorch), which is what a CUDA profile records as ``gpu_peak_bytes``.

    python bench/gpu/profile_env_check.py      # prints a JSON verdict, exits 1 on a failed check
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> int:
    import torch

    from gcomp.perf import environment, gpu_memory_of_process

    env = environment()
    before = gpu_memory_of_process()
    block = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")  # 256 MiB held by this process
    torch.cuda.synchronize()
    held = gpu_memory_of_process()
    del block
    verdict = {
        "gpus": env["gpu"],
        "cpu_features": env["cpu_features"],
        "held_before_bytes": before,
        "held_with_256MiB_bytes": held,
        "gpu_listed": bool(env["gpu"]) and all(g.get("memory_bytes", 0) > 0 for g in env["gpu"]),
        "memory_seen": held is not None and held >= 256 << 20,
    }
    print(json.dumps(verdict, indent=2))
    return 0 if verdict["gpu_listed"] and verdict["memory_seen"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
