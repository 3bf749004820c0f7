#!/usr/bin/env bash
# Install what the tests need, then run the test suite (CI runs exactly this: .ci/run).
#   bash scripts/test.sh [pytest arguments ...]      e.g. -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
exec "${PRUNETUNE_VENV:-.venv}/bin/python" -m pytest "$@"
