#!/usr/bin/env bash
# Install PruneTune's Python environment into .venv (idempotent; re-running installs only what changed).
#   bash scripts/setup.sh            # what the demo needs
#   bash scripts/setup.sh --test     # plus the test tools
# torch is pinned and installed FIRST: installed later, as a dependency of transformers/peft/lm-eval,
# pip would pick the newest CUDA build (several GB) even on a CPU-only machine.
set -euo pipefail
cd "$(dirname "$0")/.."

requirements=requirements.txt
if [[ "${1:-}" == "--test" ]]; then requirements=requirements-test.txt; fi
venv="${PRUNETUNE_VENV:-.venv}"
python="${PYTHON:-python3}"

if [[ ! -x "$venv/bin/python" ]]; then
  if ! "$python" -m venv "$venv" 2>/dev/null; then
    # Debian's python3 ships venv separately.
    if command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      rm -rf "$venv"; "$python" -m venv "$venv"
    else
      echo "error: '$python -m venv' failed; install python3-venv (Debian) or set PYTHON=<a python 3.11>" >&2
      exit 2
    fi
  fi
fi

stamp="$venv/.prunetune-installed"
want="$(cat requirements.txt requirements-test.txt constraints.txt | sha256sum | cut -c1-16)-$requirements"
if [[ -f "$stamp" ]] && grep -qxF "$want" "$stamp"; then
  exit 0
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
echo "setup: installing torch==2.13.0, then $requirements into $venv ..." >&2
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -r "$requirements" -c constraints.txt
echo "$want" >> "$stamp"
echo "setup: done" >&2
