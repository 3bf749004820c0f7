#!/usr/bin/env python3
"""The fault matrix of issue 6 outside pytest: every fault on the real local SLURM, then the table.

    .venv/bin/python benchmarks/fault_matrix.py                        # as root; starts and stops its own cluster
    .venv/bin/python benchmarks/fault_matrix.py --only preemption,time_limit --workers 1

The cluster's state folder and ports come from PRUNETUNE_TEST_SLURM_STATE_DIR / PRUNETUNE_TEST_SLURM_PORT_BASE
(default /tmp/prunetune-slurm-faults, 20817). What each fault is and how it is measured: tests/fault_matrix.py.
Exit code 0 when every fault recovered, 1 otherwise.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.fault_matrix import SCENARIOS, fault_cluster, render_table, run_matrix  # noqa: E402
from tests.slurm_cluster import cluster_unavailable  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated scenarios: " +
                        ", ".join(scenario.name for scenario in SCENARIOS))
    parser.add_argument("--workers", type=int, default=3, help="scenarios run side by side (default: %(default)s)")
    parser.add_argument("--keep", metavar="DIR", help="write the studies here and keep them (default: a temporary "
                        "folder, deleted)")
    args = parser.parse_args()
    names = tuple(name for name in args.only.split(",") if name)
    unknown = sorted(set(names) - {scenario.name for scenario in SCENARIOS})
    if unknown:
        parser.error(f"--only {','.join(unknown)}: unknown scenario")
    reason = cluster_unavailable()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="prunetune-faults-"))
    started = time.monotonic()
    try:
        with fault_cluster():
            outcomes = run_matrix(base, names, args.workers)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(render_table(outcomes))
    print(f"\n{len(outcomes)} fault(s), {sum(row.recovered for row in outcomes)} recovered, "
          f"matrix wall time {time.monotonic() - started:.0f} s")
    return 0 if all(row.recovered for row in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
