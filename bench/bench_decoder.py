"""Decoder LLMs with a KV cache: gcomp against ONNX Runtime GenAI's model builder, token rate
and greedy agreement.

Usage (from the repository root)::

    .venv/bin/pip install -e '.[export]'                         # torch, transformers
    .venv/bin/pip install --no-deps onnxruntime-genai==0.18.0    # the peer's model builder
    .venv/bin/python bench/bench_decoder.py --md bench/LLM.md --json bench/decoder_results.json

(``--no-deps``: the builder needs ``onnxruntime``, which the venv has already, as the plain
or the GPU build; letting pip add the plain one beside the GPU build breaks both.)

Two models, built here (``models/decoder.py``), both Llama-style (RMSNorm, rotary
embeddings, SwiGLU, grouped-query attention), exported with the TorchScript exporter with
a KV cache (``past_key_values.*`` -> ``present.*``):

* ``trained``: a byte-level model (4 layers, 128 wide, 2 KV heads for 4 query heads)
  trained here for ``--steps`` AdamW steps on the Python standard library's sources, so
  its predictions are meaningful. Accuracy on ``--prompts`` held-out windows of 256 bytes:
  next-byte top-1 agreement with fp32 at every position (teacher forcing) and the held-out
  loss (nats per byte); greedy continuations (``--gen`` tokens after the first 64 bytes):
  the share of tokens equal to fp32's and the mean position of the first divergence (a
  small model's greedy continuations soon repeat, so agreement there is a weak measure).
* ``base``: random weights at ~125 M parameters (vocabulary 32000, 12 layers, 768 wide,
  12 heads, 4 KV heads, MLP 2048). Speed: batch 1, a ``--prompt``-token prompt, then
  ``--tokens`` decoding steps of one token; ms per decoded token (the mean of the steps'
  session.run times in one round; min and median over rounds), decode tokens/s (from the
  median) and the prompt's step (prefill, median).

Variants: ``fp32`` (the export on ONNX Runtime), ``gcomp-O3`` (``gcomp optimize -O3``),
``gcomp-int4`` (``gcomp optimize -O3 --quantize int4 --calibration C --inputs ONE_TOKEN
--metric tokens --tolerance 0.05``: MatMul weights in MatMulNBits (accuracy level 4), the
embedding in GatherBlockQuantized, at most 5 % of the calibration sequences' next tokens
changed (teacher forced); the speed gate times one decoding step), ``gcomp-int4-all`` (the
same with ``--tolerance 1``: every weight quantized, no accuracy bound, as the builder
does: the speed peer of ``genai-int4``), ``gcomp-O3+rotary`` / ``gcomp-int4-all+rotary``
(the same with ``--set rotary_in_attention=1``: Q and K rotated inside GroupQueryAttention
for any batch size, the builder's own contract, exact at batch 1 as here), ``genai-fp32`` / ``genai-int4`` (ONNX
Runtime GenAI 0.18's model builder, ``-e cpu -p fp32|int4``, from the same weights saved as
a Hugging Face folder; its graphs use GroupQueryAttention with rotary inside, packed
MatMulNBits and SkipSimplifiedLayerNormalization). Every variant runs on ONNX Runtime's
CPU provider (``ORT_ENABLE_ALL``, ``--threads`` threads), through the same greedy loop
(``models.decoder.greedy``), timed in a fresh process that imports only ONNX Runtime and
numpy, the variants interleaved round by round. This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE = {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
        "num_attention_heads": 12, "num_key_value_heads": 4, "max_position_embeddings": 1024}
CALIBRATION_SAMPLES = 8
WINDOW = 256  # held-out bytes per accuracy prompt: scored position by position, greedy after the first 64
TOKEN_BUDGET = 0.05  # gcomp-int4: at most 5 % of the calibration sequences' next tokens may change
ROTARY_IN = ("--set", "rotary_in_attention=1")


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "decoder")
    p.add_argument("--steps", type=int, default=600, help="training steps of the trained model")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--gen", type=int, default=64, help="greedy tokens per accuracy prompt")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens before decoding (speed)")
    p.add_argument("--tokens", type=int, default=32, help="decoded tokens per timed round")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--spin", action="store_true",
                   help="let ONNX Runtime's intra-op threads spin between runs (its default); off here: with every "
                        "variant's session in one process, the threads of the one that just ran spin on the cores "
                        "the next one needs (2 cores: medians 10-20 %% above the minimum, bimodal)")
    p.add_argument("--models", default="trained,base")
    p.add_argument("--json", type=Path)
    p.add_argument("--md", type=Path)
    p.add_argument("--remeasure", action="store_true",
                   help="measure the variants built by an earlier run again (no training, no building)")
    p.add_argument("--rebuild-gcomp", action="store_true",
                   help="keep an earlier run's export, samples and GenAI models; build gcomp's variants again")
    p.add_argument("--time-manifest", type=Path, help=argparse.SUPPRESS)  # the timing subprocess
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- building
def _dims(config) -> dict:
    return {k: getattr(config, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                           "num_attention_heads", "num_key_value_heads")}


def _feeds(ids, config, past_len: int = 0, rng=None):
    """One cache step's feeds: ``ids`` after ``past_len`` cached positions (random cache)."""
    import numpy as np

    from models.decoder import cache_names, step_feeds

    head_dim = config.hidden_size // config.num_attention_heads
    rng = rng or np.random.default_rng(0)
    cache = {n: rng.standard_normal((1, config.num_key_value_heads, past_len, head_dim)).astype(np.float32)
             for n in cache_names(config)}
    return step_feeds(ids, config, cache)


def _gcomp(src: Path, out: Path, *args: str) -> str:
    """``gcomp optimize`` in a fresh process; returns '' or its error line."""
    cmd = [sys.executable, "-m", "gcomp", "optimize", str(src), "-o", str(out), "-q", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    return "" if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["failed"])[-1]


def _genai(hf: Path, out: Path, precision: str) -> str:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(out.parent / "genai-cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    return "" if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["failed"])[-1]


def build(name: str, args) -> dict:
    """The variants of one model: {variant: path or error}, the model's dims, facts."""
    import numpy as np

    from models import decoder

    folder = args.out / name
    folder.mkdir(parents=True, exist_ok=True)
    facts: dict = {}
    if name == "trained":
        t0 = time.perf_counter()
        model, stats = decoder.train(steps=args.steps)
        facts["training"] = dict(stats, wall_s=round(time.perf_counter() - t0, 1))
        text = np.frombuffer(decoder.corpus(), np.uint8).astype(np.int64)
        held = text[int(len(text) * 0.95):]
        starts = np.linspace(0, len(held) - 200, CALIBRATION_SAMPLES + args.prompts).astype(int)
        prompts = [held[s:s + WINDOW][None] for s in starts]
    else:
        model = decoder.build("llama", config=BASE)
        rng = np.random.default_rng(1)
        prompts = [rng.integers(0, BASE["vocab_size"], (1, args.prompt)) for _ in range(CALIBRATION_SAMPLES + 1)]
    facts["parameters"] = sum(p.numel() for p in model.parameters())
    path = decoder.export("llama", folder, cache=True, model=model, name=name, check=False)
    calib = folder / "calibration"
    calib.mkdir(exist_ok=True)
    for i, ids in enumerate(prompts[:CALIBRATION_SAMPLES]):
        np.savez(calib / f"sample_{i}.npz", **_feeds(ids, model.config))
    one_token = folder / "one_token.npz"
    np.savez(one_token, **_feeds(prompts[-1][:, :1], model.config, past_len=args.prompt))
    hf = decoder.save_hf(model, folder / "hf")
    variants = {"fp32": str(path)}
    _build_variants(folder, path, hf, variants, facts, gcomp_only=False)
    held_prompts = [p.tolist() for p in prompts[CALIBRATION_SAMPLES:]] if name == "trained" else []
    return {"name": name, "variants": variants, "dims": _dims(model.config), "facts": facts,
            "prompts": held_prompts, "speed_prompt": prompts[-1].tolist()}


def rebuild_gcomp(run: dict, args) -> dict:
    """An earlier run's manifest with gcomp's variants built again from its export and samples."""
    folder = args.out / run["name"]
    path = Path(run["variants"]["fp32"])
    _build_variants(folder, path, folder / "hf", run["variants"], run["facts"], gcomp_only=True)
    return run


def _build_variants(folder: Path, path: Path, hf: Path, variants: dict, facts: dict, *, gcomp_only: bool) -> None:
    calib, one_token = folder / "calibration", folder / "one_token.npz"
    int4 = ("-O", "3", "--quantize", "int4", "--calibration", str(calib), "--inputs", str(one_token))
    for label, out, run in (
        ("gcomp-O3", folder / "gcomp_o3.onnx", lambda o: _gcomp(path, o, "-O", "3")),
        ("gcomp-int4", folder / "gcomp_int4.onnx",
         lambda o: _gcomp(path, o, *int4, "--metric", "tokens", "--tolerance", str(TOKEN_BUDGET))),
        # Every weight quantized, as GenAI's builder does (no accuracy bound): the speed peer.
        ("gcomp-int4-all", folder / "gcomp_int4_all.onnx",
         lambda o: _gcomp(path, o, *int4, "--metric", "tokens", "--tolerance", "1")),
        # The same two with Q/K rotated inside GroupQueryAttention for any batch size, the
        # builder's contract (a left-padded batch's first prompt rotated from row 0's positions).
        ("gcomp-O3+rotary", folder / "gcomp_o3_rotary.onnx",
         lambda o: _gcomp(path, o, "-O", "3", *ROTARY_IN)),
        ("gcomp-int4-all+rotary", folder / "gcomp_int4_all_rotary.onnx",
         lambda o: _gcomp(path, o, *int4, "--metric", "tokens", "--tolerance", "1", *ROTARY_IN)),
        ("genai-fp32", folder / "genai_fp32", lambda o: _genai(hf, o, "fp32")),
        ("genai-int4", folder / "genai_int4", lambda o: _genai(hf, o, "int4")),
    ):
        if gcomp_only and not label.startswith("gcomp"):
            continue
        t0 = time.perf_counter()
        error = run(out)
        target = out / "model.onnx" if out.suffix != ".onnx" else out
        variants[label] = {"error": error} if error else str(target)
        facts.setdefault("build_s", {})[label] = round(time.perf_counter() - t0, 1)
    # GenAI last, as built; gcomp's variants in their order before them
    order = ["fp32", "gcomp-O3", "gcomp-O3+rotary", "gcomp-int4", "gcomp-int4-all", "gcomp-int4-all+rotary",
             "genai-fp32", "genai-int4"]
    ordered = {k: variants[k] for k in order if k in variants}
    variants.clear()
    variants.update(ordered)
    facts["file_mb"] = {k: round(_size(Path(v)) / 1e6, 2) for k, v in variants.items() if isinstance(v, str)}


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith(path.name)) \
        if path.exists() else 0


# ----------------------------------------------------------------------------- measuring
def measure(manifest: dict, args) -> dict:
    """In a process with ONNX Runtime and numpy only: accuracy (trained) and token rate."""
    import types

    import numpy as np
    import onnxruntime as ort

    from models.decoder import greedy

    config = types.SimpleNamespace(**manifest["dims"])
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if args.spin else "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sessions = {k: ort.InferenceSession(v, so, providers=["CPUExecutionProvider"])
                for k, v in manifest["variants"].items() if isinstance(v, str)}
    result: dict = {}
    if manifest["prompts"]:
        texts = [np.array(p) for p in manifest["prompts"]]
        reference = [greedy(sessions["fp32"], t[:, :64], args.gen, config) for t in texts]
        forced_ref = [_forced(sessions["fp32"], t, config) for t in texts]
        for k, sess in sessions.items():
            agree, first, top1, loss, margins = [], [], [], [], []
            for t, ref, (ref_logits, _) in zip(texts, reference, forced_ref):
                got = greedy(sess, t[:, :64], args.gen, config)
                first.append(next((j for j, (a, b) in enumerate(zip(got, ref)) if a != b), args.gen))
                agree.append(sum(a == b for a, b in zip(got, ref)) / args.gen)
                logits, nll = _forced(sess, t, config)
                changed = logits.argmax(-1) != ref_logits.argmax(-1)
                top1.append(float(np.mean(~changed)))
                loss.append(nll)
                top2 = np.sort(ref_logits[changed], axis=-1)[:, -2:]
                margins.extend((top2[:, 1] - top2[:, 0]).tolist())
            result.setdefault("accuracy", {})[k] = {
                "agree": float(np.mean(agree)), "first_divergence": float(np.mean(first)),
                "top1_agree": float(np.mean(top1)), "heldout_loss": float(np.mean(loss)),
                "flips": len(margins), "flip_margins": _quantiles(margins),
                "distinct_greedy_tokens": len({tok for g in reference for tok in g})}
    prompt = np.array(manifest["speed_prompt"])
    times = {k: [] for k in sessions}
    prefill = {k: [] for k in sessions}
    for r in range(args.rounds + 1):
        for k, sess in sessions.items():
            steps: list[float] = []
            greedy(sess, prompt, args.tokens + 1, config, timings=steps)
            if r:  # round 0 warms up; the prompt's step is not a decoding step
                times[k].append(float(np.mean(steps[1:])) * 1e3)
                prefill[k].append(steps[0] * 1e3)
    base = np.array(times["fp32"])
    for k, t in times.items():
        t = np.array(t)
        ratio = base / t
        result.setdefault("speed", {})[k] = {
            "ms_min": float(t.min()), "ms_median": float(np.median(t)), "tokens_per_s": float(1e3 / np.median(t)),
            "prefill_ms_median": float(np.median(prefill[k])), "speedup_min": float(base.min() / t.min()),
            "speedup_median": float(np.median(base) / np.median(t)),
            "ratio_p10": float(np.percentile(ratio, 10)), "ratio_p90": float(np.percentile(ratio, 90))}
    return result


def _quantiles(values: list[float]) -> dict:
    import numpy as np

    if not values:
        return {}
    v = np.array(values)
    return {"median": float(np.median(v)), "p90": float(np.percentile(v, 90)), "max": float(v.max())}


def _forced(session, text, config):
    """Teacher forcing: the logits of every position of ``text`` in one step (no past), and
    the mean negative log-likelihood of each next byte (nats)."""
    import numpy as np

    from models.decoder import step_feeds

    names = {i.name for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    feeds = {k: v for k, v in step_feeds(text, config).items() if k in names}
    logits = dict(zip(outputs, session.run(None, feeds)))["logits"][0]
    z = logits[:-1] - logits[:-1].max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = float(-logp[np.arange(text.shape[1] - 1), text[0, 1:]].mean())
    return logits, nll


# ----------------------------------------------------------------------------- report
def markdown(runs: list[dict], machine: dict, argv: list[str]) -> str:
    lines = ["# Decoder LLMs: gcomp against ONNX Runtime GenAI's model builder", "",
             f"`.venv/bin/python bench/bench_decoder.py {' '.join(argv)}`", "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores; onnxruntime {machine['onnxruntime']}, "
             f"onnxruntime-genai {machine['genai']}; {machine['threads']} intra-op threads, "
             f"{'spinning' if machine.get('spin') else 'not spinning'} between runs. Load average at "
             f"start {machine['loadavg_start']}, at end {machine.get('loadavg_end')}.", ""]
    for run in runs:
        f = run["facts"]
        lines += [f"## {run['name']}: {f['parameters'] / 1e6:.1f} M parameters", ""]
        if "training" in f:
            t = f["training"]
            lines += [f"Trained {t['steps']} steps in {t['wall_s']} s: train loss {t['train_loss']:.3f}, "
                      f"held-out {t['heldout_loss']:.3f} nats/byte.", ""]
        acc = run["result"].get("accuracy", {}).get("fp32")
        if acc:
            window = len(run["prompts"][0][0])
            lines += [f"Accuracy on {len(run['prompts'])} held-out windows of {window} bytes: next-byte top-1 "
                      f"agreement with fp32 at every position (teacher forcing) and held-out loss; greedy "
                      f"continuations of their first 64 bytes ({acc['distinct_greedy_tokens']} distinct bytes "
                      "in fp32's), agreement with fp32 and the first divergence.", ""]
        lines += ["| variant | decode tokens/s | ms / token (min / median) | vs fp32 (min / median, p10-p90) "
                  "| prefill ms | top-1 agreement | held-out loss | greedy agreement | first divergence | file MB "
                  "| build s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for k, v in run["variants"].items():
            if not isinstance(v, str):
                lines.append(f"| {k} | not built: {v['error']} | — | — | — | — | — | — | — | — "
                             f"| {f['build_s'].get(k, '—')} |")
                continue
            s = run["result"]["speed"][k]
            a = run["result"].get("accuracy", {}).get(k)
            acc = (f"{100 * a['top1_agree']:.2f} %", f"{a['heldout_loss']:.4f}", f"{100 * a['agree']:.1f} %",
                   f"{a['first_divergence']:.1f}") if a else ("—",) * 4
            lines.append(f"| {k} | {s.get('tokens_per_s', 0):.1f} | {s['ms_min']:.2f} / {s['ms_median']:.2f} "
                         f"| {s['speedup_min']:.2f}x / {s['speedup_median']:.2f}x ({s['ratio_p10']:.2f}-"
                         f"{s['ratio_p90']:.2f}) | {s.get('prefill_ms_median', 0):.1f} | {' | '.join(acc)} "
                         f"| {f['file_mb'].get(k, '—')} | {f.get('build_s', {}).get(k, '—')} |")
        lines.append("")
        margins = [(k, a) for k, a in run["result"].get("accuracy", {}).items() if a.get("flips")]
        if margins:
            lines += ["fp32's margin (top-1 minus top-2 logit) at the positions whose next token changed:", "",
                      "| variant | changed positions | margin median | p90 | max |", "|---|---:|---:|---:|---:|"]
            lines += [f"| {k} | {a['flips']} | {a['flip_margins']['median']:.3f} | {a['flip_margins']['p90']:.3f} "
                      f"| {a['flip_margins']['max']:.3f} |" for k, a in margins]
            lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _args(argv)
    if args.time_manifest:
        manifest = json.loads(args.time_manifest.read_text())
        print(json.dumps(measure(manifest, args)))
        return 0
    import onnxruntime

    try:
        import onnxruntime_genai

        genai = onnxruntime_genai.__version__
    except ImportError:
        genai = "not installed"
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "onnxruntime": onnxruntime.__version__, "genai": genai, "threads": args.threads, "spin": args.spin,
               "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    runs = []
    for name in args.models.split(","):
        manifest = args.out / name / "manifest.json"
        if args.remeasure:
            run = json.loads(manifest.read_text())
        elif args.rebuild_gcomp:
            run = rebuild_gcomp(json.loads(manifest.read_text()), args)
        else:
            run = build(name, args)
        manifest.write_text(json.dumps(run))
        proc = subprocess.run([sys.executable, __file__, "--time-manifest", str(manifest), "--threads",
                               str(args.threads), "--rounds", str(args.rounds), "--tokens", str(args.tokens),
                               "--gen", str(args.gen), *(["--spin"] if args.spin else [])], capture_output=True, text=True, timeout=7200)
        if proc.returncode:
            raise SystemExit(f"timing {name} failed: {proc.stderr.strip()[-2000:]}")
        run["result"] = json.loads(proc.stdout.strip().splitlines()[-1])
        runs.append(run)
        print(markdown([run], machine, argv))
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "args": argv, "runs": runs}, indent=1))
    if args.md:
        args.md.write_text(markdown(runs, machine, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
