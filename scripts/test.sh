#!/usr/bin/env bash
# Install everything the tests need on a fresh machine, then run the whole suite.
# pytest's exit code is the script's: 5 (no tests collected) fails like any other.
set -euo pipefail
GCOMP_EXTRAS="test" source "$(dirname "$0")/_venv.sh"
set +e
.venv/bin/python -m pytest --durations=15 "$@"
code=$?
set -e
if [ "$code" -eq 5 ]; then
  echo "test.sh: pytest collected no tests: failing" >&2
fi
exit "$code"
