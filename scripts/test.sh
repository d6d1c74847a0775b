#!/usr/bin/env bash
# Install everything the tests need on a fresh machine, then run the whole suite.
# pytest's exit code is the script's: 5 (no tests collected) fails like any other.
set -euo pipefail
# Every extra (the test extra holds gcomp[all]). On a Linux x86_64 machine with an NVIDIA GPU
# (the driver's device files, as gcomp's backends/_device.py checks), ONNX Runtime's GPU build
# replaces the plain one so the CUDA tests run; GCOMP_ORT=onnxruntime (or another build)
# chooses instead.
if [ -z "${GCOMP_ORT:-}" ] && [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] \
   && { [ -e /dev/nvidia0 ] || [ -e /dev/nvidiactl ]; }; then
  export GCOMP_ORT=onnxruntime-gpu
fi
GCOMP_EXTRAS="test" source "$(dirname "$0")/_venv.sh"
# Headless Chromium for the HTML report test (tests/test_html_report.py): Debian's package,
# installed only when missing; without apt (or when it fails) that test skips, naming chromium.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo -n"; fi
    echo "installing chromium (for the HTML report test) ..." >&2
    if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium; } \
         > .venv/chromium-install.log 2>&1; then
      echo "could not install chromium (see .venv/chromium-install.log): the browser test will be skipped" >&2
    fi
  else
    echo "no apt-get: chromium not installed; the browser test will be skipped" >&2
  fi
fi
set +e
.venv/bin/python -m pytest --durations=15 "$@"
code=$?
set -e
if [ "$code" -eq 5 ]; then
  echo "test.sh: pytest collected no tests: failing" >&2
fi
exit "$code"
