# Sourced by the scripts: make .venv (Python >= 3.10) and install gcomp into it with the given extras.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel 2>&1 | grep -v "^WARNING: Location" || true
if [ -n "${GCOMP_EXTRAS:-}" ]; then
  .venv/bin/python -m pip install -q -e ".[${GCOMP_EXTRAS}]"
else
  .venv/bin/python -m pip install -q -e .
fi
