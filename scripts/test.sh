#!/usr/bin/env bash
# Install what the tests need, then run the test suite (CI runs exactly this: .ci/run).
#   bash scripts/test.sh [pytest arguments ...]      e.g. -m "not slurm and not slow"
# As root on Debian it also installs the SLURM daemons (munge, slurmctld, slurmd, slurmdbd, MariaDB);
# the tests marked `slurm` start private clusters with scripts/local_slurm.sh (one node on loopback; two
# nodes in network namespaces for tests/test_multinode.py) and stop them afterwards. Without root they are skipped, with the reason shown.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  bash scripts/local_slurm.sh install
fi
exec "${PRUNETUNE_VENV:-.venv}/bin/python" -m pytest "$@"
