#!/usr/bin/env bash
# Install everything, then run the demo study end to end: 12 tiny pruned stand-ins, LoRA-finetuned,
# evaluated before and after, compared; the study summary is printed at the end.
#   bash scripts/demo.sh [key=value overrides ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PRUNETUNE_VENV:-.venv}/bin/python" launch.py demo "$@"
