#!/usr/bin/env bash
# Set up gcomp on a fresh machine and run its main job on the default model:
# optimize models/default.onnx with pipeline O3 (cleanup, folding and fusion for ONNX
# Runtime on the CPU), verify it on ONNX Runtime, print the before/after table and write
# out/default.opt.onnx with an HTML, a Markdown and a JSON report.
set -euo pipefail
GCOMP_EXTRAS="" source "$(dirname "$0")/_venv.sh"
mkdir -p out
.venv/bin/gcomp optimize models/default.onnx -o out/default.opt.onnx -O 3 \
  --report out/default.report.html "$@"
.venv/bin/gcomp optimize models/default.onnx -o out/default.opt.onnx -O 3 -q \
  --report out/default.report.md "$@"
.venv/bin/gcomp optimize models/default.onnx -o out/default.opt.onnx -O 3 -q \
  --report out/default.report.json "$@"
echo "reports: out/default.report.html, out/default.report.md, out/default.report.json"
