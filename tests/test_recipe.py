"""Recipes (``gcomp optimize --config``), ``--dry-run`` and ``--save-config``, run as the
real command in a subprocess: what a recipe sets, what the command line overrides, where
its paths point, how a bad one is refused, and that a saved recipe gives the same plan."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "models" / "default.onnx"

PLUGIN = '''
from typing import Annotated

import onnx_ir as ir

import gcomp


@gcomp.register_pass("{name}")
class Touch(ir.passes.InPlacePass):
    """Change nothing (a plugin pass with an option)."""

    def __init__(self, *, {name_}_level: Annotated[int, "unused"] = 1):
        super().__init__()

    def call(self, model):
        return ir.passes.PassResult(model, modified=False)
'''


def gcomp(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gcomp", *map(str, args)], capture_output=True, text=True, check=False,
                          cwd=cwd, timeout=300)


def plugin(path: Path, name: str) -> Path:
    path.write_text(PLUGIN.format(name=name, name_=name.replace("-", "_")))
    return path


def plan(proc) -> list[str]:
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "gcomp optimize: dry run, nothing written"
    return lines


def line(lines: list[str], label: str) -> str:
    found = [entry for entry in lines if entry.startswith(label)]
    assert len(found) == 1, (label, lines)
    return found[0]


def pass_names(lines: list[str]) -> list[str]:
    """The passes of a plan in order of first appearance (a stage's head line is not one)."""
    names = []
    start = lines.index(next(entry for entry in lines if entry.startswith("passes, in order")))
    for entry in lines[start + 1:]:
        if not entry.startswith("  "):
            break
        text = re.sub(r"^\s*\d+\. ", "", entry).strip()  # "  3. name" or "        name"
        name = text.split(" ", 1)[0].rstrip(",")
        if not text.startswith(("repeated until", "in order:")) and name not in names:
            names.append(name)
    return names


def test_dry_run_shows_every_setting_of_a_recipe_and_writes_nothing(tmp_path):
    sub = tmp_path / "recipes"
    sub.mkdir()
    (tmp_path / "out").mkdir()
    (sub / "r.toml").write_text('''
level = 2
target = "ort-cpu"
target-opset = 18
precision = "fp16"
keep-io-types = false
inputs = "data/x.npz"
static = true
verify-timeout = 30
max-tensor-bytes = 1048576
bisect = false
strict = true
external-data = true
report = "md"
profile = true
profile-iters = 5
pass-errors = true
backend = "auto"

[set]
cse_size_limit = 3
block_ops = ["Softmax", "Exp"]

[input-shapes]
input_ids = [1, 16]
''')
    lines = plan(gcomp("optimize", DEFAULT, "-o", "out/m.onnx", "--config", "recipes/r.toml", "--dry-run",
                       cwd=tmp_path))
    assert line(lines, "output") == "output        out/m.onnx"
    assert line(lines, "report") == "report        out/m.report.md"
    assert line(lines, "pipeline") == "pipeline      O2; target ort-cpu; target opset 18"
    assert "upgrade-opset (target_opset=18)" in lines[lines.index(next(x for x in lines if "upgrade" in x))]
    assert sum("cse (cse_size_limit=3)" in x for x in lines) == 2  # both stages running cse
    assert any(x.strip().endswith("fuse (target=ort-cpu)") for x in lines)
    assert any("convert-precision (precision=fp16, block_ops=Softmax,Exp, keep_io_types=false)" in x for x in lines)
    names = pass_names(lines)  # --static fixes dims first; precision converts after the pipeline
    assert names[0] == "static-shapes" and names[-1] == "convert-precision"
    assert line(lines, "precision") == "precision     fp16; fp32 inputs and outputs converted too"
    assert line(lines, "inputs") == "inputs        recipes/data/x.npz"  # relative to the recipe's folder
    assert line(lines, "input shapes") == "input shapes  input_ids=1,16"
    assert line(lines, "static").startswith("static        yes")
    assert line(lines, "verification") == ("verification  on ONNX Runtime, optimizations off; bisect off; strict on; "
                                           "timeout 30 s; tensors up to 1.0 MiB")
    assert line(lines, "external data") == "external data yes"
    assert line(lines, "measurements") == ("measurements  profiles on (5 runs each); per-pass errors on; "
                                           "per-pass latency off; backend choice on")
    assert list((tmp_path / "out").iterdir()) == []


def test_recipe_quantization_settings_and_json_recipes(tmp_path):
    (tmp_path / "cal").mkdir()
    (tmp_path / "q.json").write_text(json.dumps({
        "quantize": "int8", "calibration": "cal", "metric": "top1", "tolerance": 0.05, "speed-gate": False,
        "set": {"per_channel": False},
    }))
    lines = plan(gcomp("optimize", DEFAULT, "-o", tmp_path / "q.onnx", "--config", tmp_path / "q.json", "--dry-run"))
    assert line(lines, "quantization") == (f"quantization  int8 for ort-cpu; budget top1 within 0.05 per output, "
                                           f"measured on {tmp_path / 'cal'}; speed gate off")
    assert line(lines, "pipeline").startswith("pipeline      O2;")  # --quantize's default level
    assert any(x.startswith("   6. quantize-static (per_channel=false, target=ort-cpu)") for x in lines)
    assert not (tmp_path / "q.onnx").exists()


def test_command_line_overrides_the_recipe_and_adds_to_its_lists(tmp_path):
    plugin(tmp_path / "a.py", "touch-a")
    plugin(tmp_path / "b.py", "touch-b")
    (tmp_path / "r.toml").write_text('''
level = 3
passes = "O2,touch-a"
plugins = ["a.py"]
verify = false

[set]
cse_size_limit = 3
max_fold_bytes = 4096

[input-shapes]
input_ids = "1,8"
attention_mask = [1, 8]
''')
    lines = plan(gcomp("optimize", DEFAULT, "-o", tmp_path / "o.onnx", "--config", tmp_path / "r.toml", "--dry-run",
                       "--passes", "O1,touch-a,touch-b", "--plugin", tmp_path / "b.py", "--set", "cse_size_limit=5",
                       "--input-shape", "input_ids=2,4", "--verify"))
    assert line(lines, "pipeline").startswith("pipeline      O1,touch-a,touch-b;")
    assert pass_names(lines)[-2:] == ["touch-a", "touch-b"]  # the recipe's plugin and the command line's
    assert any(x.strip() == "cse (cse_size_limit=5)" for x in lines)
    assert any(x.strip() == "fold-constants (max_fold_bytes=4096)" for x in lines)  # kept from the recipe
    assert line(lines, "input shapes") == "input shapes  input_ids=2,4, attention_mask=1,8"
    assert line(lines, "verification").startswith("verification  on ONNX Runtime")


def test_a_recipe_runs_with_its_paths_relative_to_its_folder(tmp_path, small_model):
    model = tmp_path / "m.onnx"
    onnx.save(small_model, model)
    sub = tmp_path / "team" / "recipes"
    sub.mkdir(parents=True)
    np.savez(sub / "x.npz", x=np.ones((3, 4), np.float32))
    (sub / "r.toml").write_text('level = 0\ninputs = "x.npz"\nreport = "json"\n')
    proc = gcomp("optimize", "m.onnx", "-o", "m.o0.onnx", "--config", sub / "r.toml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "m.o0.report.json").read_text())
    assert doc["pipeline"] == "O0"
    assert doc["verification"]["status"] == "passed"
    assert doc["verification"]["inputs"]["x"]["shape"] == [3, 4]  # the recipe's inputs, not generated ones
    assert len(onnx.load(tmp_path / "m.o0.onnx").graph.node) == len(small_model.graph.node)


BAD = [
    ("targett = 'ort-cpu'", "unknown option 'targett' (did you mean 'target'?)"),
    ("target-opset = 'x'", "target-opset: expected an integer, got a string"),
    ("target-opset = 0", "target-opset: 0 is not in the range"),
    ("quantize = 'int3'", "quantize: 'int3' is not one of"),
    ("target = 'ort-gpu'", "target: unknown target 'ort-gpu'"),
    ("level = 7", "level: unknown pipeline or pass '7'"),
    ("verify = 'yes'", "verify: expected true or false, got a string"),
    ("tolerance = true", "tolerance: expected a number, got a boolean"),
    ("[set]\ncse_size_limt = 3",
     "set.cse_size_limt: no pass in this pipeline has that option (did you mean 'cse_size_limit'?)"),
    ("[set]\ncse_size_limit = true", "set.cse_size_limit: expected int, got a boolean"),
    ("set = 3", "set: expected a table"),
    ("[input-shapes]\nx = [1, -2]", "input-shapes.x: dims must be non-negative"),
    ("output = 'x.onnx'", "output: not a recipe option"),
    ("plugins = [1]", "plugins: expected a list of strings"),
    ("level = ", "not valid TOML"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_a_bad_recipe_is_one_line_naming_the_file_and_key(tmp_path, text, message):
    recipe = tmp_path / "team.toml"
    recipe.write_text(text + "\n")
    proc = gcomp("optimize", DEFAULT, "-o", tmp_path / "o.onnx", "--config", recipe)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"gcomp: error: {recipe}: ") and message in lines[0], lines[0]
    assert not (tmp_path / "o.onnx").exists()


def test_bad_json_recipe_and_missing_or_foreign_files(tmp_path):
    (tmp_path / "r.json").write_text('{"static": 1}')
    proc = gcomp("optimize", DEFAULT, "-o", tmp_path / "o.onnx", "--config", tmp_path / "r.json")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"gcomp: error: {tmp_path / 'r.json'}: static: expected true or false, got an integer (1)")
    for path, why in ((tmp_path / "none.toml", "no such file"), (tmp_path / "r.yaml", "a recipe is a .toml or .json")):
        proc = gcomp("optimize", DEFAULT, "-o", tmp_path / "o.onnx", "--config", path)
        assert proc.returncode == 2 and proc.stderr.strip() == f"gcomp: error: --config {path}: {why}" + (
            " file" if why.startswith("a recipe") else ""), proc.stderr


ROUND_TRIPS = {
    "precision": ["-O", "3", "--target-opset", "18", "--precision", "fp16", "--no-keep-io-types", "--set",
                  "block_ops=Softmax,Exp", "--set", "cse_size_limit=7", "--input-shape", "input_ids=1,16",
                  "--inputs", "data/x.npz", "--report", "reports/r.html", "--no-bisect", "--plugin", "p.py",
                  "--passes", "O3,touch-p", "--static", "--external-data", "--profile-iters", "4", "--no-profile",
                  "--pass-errors"],
    "quantize": ["--quantize", "int8", "--calibration", "data", "--metric", "rel-l2", "--tolerance", "0.03",
                 "--no-speed-gate", "--set", "per_channel=false", "--report", "json", "--no-verify", "--strict",
                 "--verify-timeout", "12.5", "--max-tensor-bytes", "1000", "--pass-latency", "--explain-fusion",
                 "--backend", "auto", "--target", "ort-cpu", "--provider", "cpu", "--provider-option",
                 "arena_extend_strategy=kSameAsRequested"],
}


def test_the_round_trips_give_every_recipe_key():
    """Each option of ``gcomp optimize`` that a recipe holds is saved and loaded by a round trip below."""
    from gcomp.cli.optimize import optimize
    from gcomp.cli.recipe import recipe_keys

    given = {flag for flags in ROUND_TRIPS.values() for flag in flags if flag.startswith("-")}
    missing = [key for key, option in recipe_keys(optimize).items()
               if not given & {*option.opts, *option.secondary_opts}]
    assert missing == []
    assert {"level", "set", "input-shapes", "plugins", "passes", "target"} <= set(recipe_keys(optimize))
    assert not {"output", "quiet", "verbose", "json", "dry-run", "config", "save-config"} & set(recipe_keys(optimize))


@pytest.mark.parametrize("suffix", [".toml", ".json"])
@pytest.mark.parametrize("flags", list(ROUND_TRIPS), ids=list(ROUND_TRIPS))
def test_a_saved_recipe_gives_the_same_plan(tmp_path, flags, suffix):
    for folder in ("data", "reports", "recipes"):
        (tmp_path / folder).mkdir()
    plugin(tmp_path / "p.py", "touch-p")
    saved = Path("recipes") / f"saved{suffix}"
    first = gcomp("optimize", DEFAULT, "-o", "out.onnx", *ROUND_TRIPS[flags], "--dry-run", "--save-config", saved,
                  cwd=tmp_path)
    expected = plan(first)
    again = gcomp("optimize", DEFAULT, "-o", "out.onnx", "--config", saved, "--dry-run", cwd=tmp_path)
    assert plan(again) == expected
    assert again.stderr == ""
    text = (tmp_path / saved).read_text()
    doc = json.loads(text) if suffix == ".json" else _tomllib().loads(text)
    assert "verify-timeout" in doc if flags == "quantize" else "verify-timeout" not in doc  # only what was given
    if flags == "precision":  # paths relative to the recipe's folder; lists and tables as TOML/JSON values
        assert doc["inputs"] == "../data/x.npz" and doc["plugins"] == ["../p.py"]
        assert doc["set"] == {"block_ops": ["Softmax", "Exp"], "cse_size_limit": 7}
        assert doc["input-shapes"] == {"input_ids": [1, 16]} and doc["level"] == 3
    else:
        assert doc["report"] == "json" and doc["calibration"] == "../data"
        assert doc["provider-option"] == ["arena_extend_strategy=kSameAsRequested"]  # a repeatable flag: a list
    assert not (tmp_path / "out.onnx").exists() and list((tmp_path / "reports").iterdir()) == []


def _tomllib():
    try:
        import tomllib
    except ModuleNotFoundError:
        import tomli as tomllib
    return tomllib


def test_save_config_while_running_records_what_the_run_used(tmp_path, small_model):
    model = tmp_path / "m.onnx"
    onnx.save(small_model, model)
    first = gcomp("optimize", model, "-o", tmp_path / "a.onnx", "-O", "2", "--set", "cse_size_limit=2",
                  "--input-shape", "x=5,4", "--save-config", tmp_path / "r.toml", "--json")
    assert first.returncode == 0, first.stderr
    again = gcomp("optimize", model, "-o", tmp_path / "b.onnx", "--config", tmp_path / "r.toml", "--json")
    assert again.returncode == 0, again.stderr
    a, b = json.loads(first.stdout), json.loads(again.stdout)
    assert (a["pipeline"], a["options"]) == (b["pipeline"], b["options"]) == ("O2", {"cse_size_limit": 2})
    assert a["verification"]["inputs"] == b["verification"]["inputs"] == {"x": {"shape": [5, 4], "dtype": "float32"}}
    assert [p["name"] for p in a["passes"]] == [p["name"] for p in b["passes"]]


def test_save_config_never_overwrites_the_model_or_output(tmp_path, small_model):
    model = tmp_path / "m.onnx"
    onnx.save(small_model, model)
    before = model.read_bytes()
    cases = [(model, "refusing to write over the input model"), (tmp_path / "o.onnx", "refusing to write over -o's"),
             (tmp_path / "r.yaml", "a recipe is a .toml or .json file"),
             (tmp_path / "missing" / "r.toml", "does not exist")]
    for path, why in cases:
        proc = gcomp("optimize", model, "-o", tmp_path / "o.onnx", "--save-config", path)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(f"gcomp: error: --save-config {path}: ") and why in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert model.read_bytes() == before
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "r.yaml").exists()
    # options the pipeline refuses make no plan, so no recipe either
    proc = gcomp("optimize", model, "-o", tmp_path / "o.onnx", "-O", "1", "--target", "ort-cpu",
                 "--save-config", tmp_path / "r.toml")
    assert proc.returncode == 2 and "unknown option(s) target for this pipeline" in proc.stderr
    assert not (tmp_path / "r.toml").exists()


@pytest.mark.slow
def test_the_dry_run_lists_the_passes_the_run_executes(tmp_path):
    flags = ["-O", "3", "--precision", "fp16", "--static", "--input-shape", "input_ids=1,16", "--set",
             "cse_size_limit=4"]
    lines = plan(gcomp("optimize", DEFAULT, "-o", tmp_path / "o.onnx", *flags, "--dry-run"))
    run = gcomp("optimize", DEFAULT, "-o", tmp_path / "o.onnx", *flags, "--json")
    assert run.returncode == 0, run.stderr
    executed = []
    for p in json.loads(run.stdout)["passes"]:
        if p["name"] not in executed:
            executed.append(p["name"])
    assert pass_names(lines) == executed
