"""The GPU check of issue 20, run here on the CPU: bench/gpu/tvm_bundle.py prepares the
bundle (tiny ResNet-18 and BERT-base configurations, llvm artifacts, fp32 and fp16) and
bench/gpu/torch_vs_tvm.py, unpacked from it, builds the torch modules with other random
weights than the artifacts were compiled with, makes the artifacts' weights from them
(bench/gpu/weight_map.py) and compares, in a process where neither gcomp nor TVM's
compiler can be imported (as on the GPU machine).

weight_map's recipes are also tested alone: transposed, cut, packed, BatchNorm-folded and
cast weights are found and replayed, and what no parameter gives is refused in one line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench" / "gpu"))

import weight_map  # bench/gpu is no package: imported from its folder

SITECUSTOMIZE = """\
import os, sys
for _name in os.environ.get("GCOMP_TEST_HIDE", "").split(","):
    if _name:
        sys.modules[_name] = None
"""
# Runs the check script as __main__, then reports whether TVM's compiler library was mapped.
RUNNER = """\
import json, runpy, sys
sys.argv = sys.argv[1:]
code = 0
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    code = e.code
maps = open("/proc/self/maps").read()
print(json.dumps({"compiler_mapped": "libtvm_compiler" in maps}), file=sys.stderr)
sys.exit(code)
"""


# -- weight_map alone --------------------------------------------------------------


def _params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = {f"{n}.weight": rng.standard_normal((4, 6)).astype(np.float32) for n in ("q", "k", "v")}
    p["pos.weight"] = rng.standard_normal((10, 6)).astype(np.float32)
    p["conv.weight"] = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    p.update({f"bn.{k}": rng.uniform(0.5, 1.5, 3).astype(np.float32)
              for k in ("weight", "bias", "running_mean", "running_var")})
    return p


def _weights(p: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """What a compiler makes of ``p``: packed transposes, a cut, an HWIO BN-folded kernel,
    an fp16 cast, an index constant."""
    scale = p["bn.weight"] / np.sqrt(p["bn.running_var"] + np.float32(1e-5))
    folded = p["conv.weight"] * scale[:, None, None, None]
    return [("weight_0", np.concatenate([p["q.weight"].T, p["k.weight"].T, p["v.weight"].T], axis=1)),
            ("weight_1", p["pos.weight"][:3].reshape(1, 3, 6)),
            ("weight_2", folded.transpose(2, 3, 1, 0).copy()),
            ("weight_3", (p["bn.bias"] - p["bn.running_mean"] * scale).reshape(1, 1, 1, 3)),
            ("weight_4", p["k.weight"].T.astype(np.float16)),
            ("weight_5", np.arange(6, dtype=np.int64).reshape(2, 3))]


def test_derive_finds_each_recipe_and_produce_replays_it_for_other_weights():
    p = _params(0)
    pairs = [{"conv": "conv", "bn": "bn", "eps": 1e-5}]
    recipes = weight_map.derive(_weights(p), p, pairs)
    by_name = {r["name"]: r for r in recipes}
    assert by_name["weight_0"]["axis"] == 1
    assert [part["param"] for part in by_name["weight_0"]["parts"]] == ["q.weight", "k.weight", "v.weight"]
    assert by_name["weight_1"]["parts"][0] == {"param": "pos.weight", "shape": [10, 6], "perm": [0, 1], "count": 18}
    assert by_name["weight_2"]["parts"][0]["fold"]["what"] == "weight"
    assert by_name["weight_2"]["parts"][0]["perm"] == [2, 3, 1, 0]
    assert by_name["weight_3"]["parts"][0]["fold"]["what"] == "bias"
    assert by_name["weight_4"]["dtype"] == "float16" and by_name["weight_4"]["parts"][0]["perm"] == [1, 0]
    assert by_name["weight_5"]["carried"] is True
    other = _params(1)  # another module of the same architecture
    made = weight_map.produce(recipes, other, {"weight_5": np.arange(6, dtype=np.int64)})
    for name, want in _weights(other):
        assert made[name].dtype == want.dtype and made[name].shape == want.shape
        np.testing.assert_allclose(made[name].astype(np.float64), want.astype(np.float64), rtol=1e-6, atol=1e-7)


def test_a_weight_no_parameter_gives_is_refused_in_one_line():
    p = _params(0)
    stray = np.full((4, 6), 0.5, np.float32)
    with pytest.raises(weight_map.MapError) as e:
        weight_map.derive([("weight_0", p["q.weight"].T.copy()), ("weight_1", stray)], p)
    assert str(e.value).startswith("weight_1 (float32 [4, 6]): no parameter of the module gives it")
    assert "\n" not in str(e.value)


def test_produce_refuses_a_parameter_the_module_lacks_or_shapes_otherwise():
    p = _params(0)
    recipes = weight_map.derive([("weight_0", p["q.weight"].T.copy())], p)
    with pytest.raises(weight_map.MapError, match=r"^the module has no parameter q.weight"):
        weight_map.produce(recipes, {"k.weight": p["k.weight"]})
    with pytest.raises(weight_map.MapError, match=r"^parameter q.weight is \[6, 4\] in the module, the recipe "):
        weight_map.produce(recipes, {"q.weight": p["q.weight"].T.copy()})


# -- the whole check on the CPU ------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """The unpacked tiny llvm bundle (fp32 and fp16 at batch 2 for both models)."""
    pytest.importorskip("tvm")
    pytest.importorskip("torch", reason="needs torch==2.13.0 (the test extra installs it)")
    pytest.importorskip("transformers", reason="needs transformers (the test extra installs it)")
    out = tmp_path_factory.mktemp("gpu-check")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu" / "tvm_bundle.py"), str(out), "--tiny",
                           "--target", "llvm", "--batches", "2"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()
    summary = json.loads(last[-2])
    assert summary["bytes"] < summary["limit_bytes"] == 64 * 2**20
    assert last[-1].endswith("python gcomp-tvm-bundle/gpu_check/torch_vs_tvm.py --out torch-vs-tvm")
    with tarfile.open(out / "gpu-check.tar.gz") as tar:
        tar.extractall(out / "unpacked", filter="data")
    root = out / "unpacked" / "gcomp-tvm-bundle"
    for name in summary["artifacts"]:  # the weights stay here: recipes travel instead
        assert not (root / "artifacts" / name / "weights.safetensors").exists()
        assert (root / "artifacts" / name / "weight-recipes.json").is_file()
    return root


def _check(root: Path, tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    """Run the bundle's check script with gcomp and TVM's compiler hidden (as on the GPU machine)."""
    shim = tmp_path / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (shim / "runner.py").write_text(RUNNER)
    out = tmp_path / "results"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(shim), "GCOMP_TEST_HIDE": "tvm,gcomp,models",
           "TVM_NUM_THREADS": "2", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(shim / "runner.py"), str(root / "gpu_check" / "torch_vs_tvm.py"),
                           "--device", "cpu", "--compile-backend", "eager", "--iters", "2", "--out", str(out),
                           *args], capture_output=True, text=True, check=False, cwd=tmp_path, env=env)
    doc = json.loads((out / "torch_vs_tvm.json").read_text()) if (out / "torch_vs_tvm.json").is_file() else None
    return proc, doc


@pytest.mark.slow
def test_cpu_check_makes_the_weights_from_the_module_and_matches_torch(bundle, tmp_path):
    proc, doc = _check(bundle, tmp_path, "--seed", "1")  # not the weights the artifacts were compiled with
    assert json.loads(proc.stderr.strip().splitlines()[-1]) == {"compiler_mapped": False}
    rows = doc["rows"]
    assert {(r["model"], r["precision"], r["batch"]) for r in rows} == {
        (m, p, 2) for m in ("resnet18", "bert_base") for p in ("fp32", "fp16")}
    for r in rows:
        assert "error" not in r, r
        assert r["tvm_ms"] > 0 and r["eager_ms"] > 0 and r["compile_ms"] > 0
        for name, e in r["outputs"].items():
            if r["precision"] == "fp32":
                assert r["ok"] and e["max_abs"] <= 1e-4, (r["model"], name, e)
            else:  # fp16 arithmetic; a wrong weight would be far off
                assert e["cosine"] >= 0.999, (r["model"], name, e)
    assert proc.returncode == (0 if all(r["ok"] for r in rows) else 1), proc.stderr
    table = (tmp_path / "results" / "torch_vs_tvm.md").read_text()
    assert table.startswith("| model | precision | batch | TVM CPU ms | torch eager ms | torch.compile ms "
                            "| TVM vs compile |\n")
    assert sum(line.startswith(("| resnet18 |", "| bert_base |")) for line in table.split("\n\n")[0].splitlines()) == 4


@pytest.mark.slow
def test_cpu_check_fails_when_a_recipe_is_wrong_or_a_parameter_is_missing(bundle, tmp_path):
    root = tmp_path / "bundle"
    shutil.copytree(bundle, root)
    manifest = json.loads((root / "gpu_check" / "manifest.json").read_text())
    manifest["artifacts"] = [a for a in manifest["artifacts"] if a["precision"] == "fp32"]
    (root / "gpu_check" / "manifest.json").write_text(json.dumps(manifest))
    bert = root / "artifacts" / "bert_base-fp32-b2" / "weight-recipes.json"
    recipes = json.loads(bert.read_text())
    packed = next(r for r in recipes if r.get("axis") == 1)  # Q, K, V side by side: swap Q and V
    packed["parts"][0], packed["parts"][2] = packed["parts"][2], packed["parts"][0]
    bert.write_text(json.dumps(recipes))
    resnet = root / "artifacts" / "resnet18-fp32-b2" / "weight-recipes.json"
    recipes = json.loads(resnet.read_text())
    part = next(p for r in recipes if not r.get("carried") for p in r["parts"] if "param" in p)
    part["param"] = "model.no_such.weight"
    resnet.write_text(json.dumps(recipes))
    proc, doc = _check(root, tmp_path)
    assert proc.returncode == 1
    rows = {r["model"]: r for r in doc["rows"]}
    assert rows["resnet18"]["error"] == ("MapError: the module has no parameter model.no_such.weight "
                                         "(a weight's recipe needs it)")
    assert rows["bert_base"]["ok"] is False and rows["bert_base"]["outputs"]["last_hidden_state"]["max_abs"] > 1e-2
    assert proc.stderr.splitlines()[-2] == ("torch_vs_tvm: 2 artifact(s) failed or differ from torch fp32: "
                                            "resnet18 fp32 b2, bert_base fp32 b2")


def test_cpu_check_refuses_a_device_the_artifacts_are_not_for(tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"target": "llvm", "models": {}, "artifacts": []}))
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu" / "torch_vs_tvm.py"), "--manifest",
                           str(manifest), "--device", "cuda"], capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr == "torch_vs_tvm: --device cuda: the bundle's artifacts are for llvm\n"
