# Sourced by the scripts: make .venv (Python >= 3.10) and install gcomp into it with the
# extras in GCOMP_EXTRAS (none: the core) and the ONNX Runtime build in GCOMP_ORT.
# pip's output goes to .venv/install.log, shown only on failure.
#
# ONNX Runtime: gcomp's core depends on the plain build, `onnxruntime`. GCOMP_ORT names the
# build wanted instead (onnxruntime-gpu: scripts/test.sh asks for it on a Linux x86_64
# machine with an NVIDIA GPU); unset, the venv keeps the one build it has, else gets the
# plain one. Two builds install into the same `onnxruntime` folder and must never meet,
# and pip cannot swap one for the other: installing gcomp adds the plain build beside any
# other, so then both are uninstalled and the wanted one installed alone.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
target="."
if [ -n "${GCOMP_EXTRAS:-}" ]; then
  target=".[${GCOMP_EXTRAS}]"
fi

# The ONNX Runtime builds installed in .venv, one a line (gcomp/deps.py, run from the
# source tree: it needs only the standard library).
ort_builds() {
  .venv/bin/python -m gcomp.deps
}

# Each step with `|| return 1`: errexit does not hold inside a function called from `if`.
install_gcomp() {
  local builds want
  .venv/bin/python -m pip install --upgrade pip setuptools wheel || return 1
  builds="$(ort_builds)" || return 1
  want="${GCOMP_ORT:-}"
  if [ -z "$want" ]; then
    want="onnxruntime"
    if [ -n "$builds" ] && [ "$(printf '%s\n' "$builds" | wc -l)" -eq 1 ]; then want="$builds"; fi
  fi
  if [ -n "$builds" ] && [ "$builds" != "$want" ]; then
    # shellcheck disable=SC2086  # one distribution name a word
    .venv/bin/python -m pip uninstall -y $builds || return 1
  fi
  .venv/bin/python -m pip install -e "$target" || return 1
  if [ "$want" != "onnxruntime" ]; then
    .venv/bin/python -m pip uninstall -y onnxruntime "$want" || return 1
    .venv/bin/python -m pip install "$want>=1.20" || return 1
  fi
  echo "ONNX Runtime build: $(ort_builds | paste -sd ' ')"
}

echo "installing gcomp ($target) into .venv ..." >&2
if ! install_gcomp > .venv/install.log 2>&1; then
  tail -n 40 .venv/install.log >&2
  echo "installation failed: see .venv/install.log" >&2
  exit 1
fi
