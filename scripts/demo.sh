#!/usr/bin/env bash
# Set up gcomp on a fresh machine and run its main job on the default model:
# optimize models/default.onnx with pipeline O1, verify it on ONNX Runtime,
# print the before/after table and write out/default.opt.onnx and a report.
set -euo pipefail
GCOMP_EXTRAS="" source "$(dirname "$0")/_venv.sh"
mkdir -p out
.venv/bin/gcomp optimize models/default.onnx -o out/default.opt.onnx -O 1 \
  --report out/default.report.md "$@"
.venv/bin/gcomp optimize models/default.onnx -o out/default.opt.onnx -O 1 -q \
  --report out/default.report.json "$@"
echo "reports: out/default.report.md, out/default.report.json"
