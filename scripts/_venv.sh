# Sourced by the scripts: make .venv (Python >= 3.10) and install gcomp into it with the
# extras in GCOMP_EXTRAS. pip's output goes to .venv/install.log, shown only on failure.
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
echo "installing gcomp ($target) into .venv ..." >&2
if ! { .venv/bin/python -m pip install --upgrade pip setuptools wheel \
       && .venv/bin/python -m pip install -e "$target"; } > .venv/install.log 2>&1; then
  tail -n 40 .venv/install.log >&2
  echo "installation failed: see .venv/install.log" >&2
  exit 1
fi
