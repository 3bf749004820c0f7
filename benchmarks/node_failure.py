#!/usr/bin/env python3
"""Node failure on the real two-node local SLURM: how long from a node crash to the study complete again.

    .venv/bin/python benchmarks/node_failure.py      # as root; starts (or reuses) the two-node test cluster

A one-pair tiny study (finetune on 2 nodes = 2 gloo ranks, 54 optimizer steps with a checkpoint every 3;
both evaluations; compare) is submitted; once the finetune is past its first checkpoint, node2 is
crashed (``local_slurm.sh crash-node``: SIGKILL to everything in its namespace). Nobody resubmits: SLURM
requeues the NODE_FAIL'd task itself (jobs stay requeueable, SLURM's default), and it resumes from its last
checkpoint. Measured through ``launch.py status``, as a user would see it: the NODE_FAIL, the task
requeued (PENDING again under the same id), ``restart-node node2`` at that moment, the task running again,
and every task of the study done.

Cluster: PRUNETUNE_TEST_SLURM_MULTI_STATE_DIR / PRUNETUNE_TEST_SLURM_MULTI_PORT_BASE (tests/slurm_cluster.py).
The detection time follows the cluster's MessageTimeout=2 / SlurmdTimeout=4 (scripts/local_slurm.sh).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jobs.manifest import load_manifest  # noqa: E402
from jobs.monitor import collect  # noqa: E402
from jobs.study import Pair, StudyPaths  # noqa: E402
from tests.slurm_cluster import (MULTI_PORT_BASE, MULTI_STATE_DIR, cluster_unavailable, launch,  # noqa: E402
                                 node_command, start_cluster, stop_cluster, wait_until)
from tests.test_multinode import build_assets, crash_study_args, finetune_step  # noqa: E402

PAIR = Pair("Llama", "best_acc")


def rows_of(root: Path):
    manifest = load_manifest(root)
    return collect(manifest, manifest.study_config())[0]


def main() -> int:
    reason = cluster_unavailable(nodes=2)
    if reason:
        print(f"cannot run: {reason}")
        return 2
    started = time.monotonic()
    os.environ["SLURM_CONF"] = start_cluster(MULTI_STATE_DIR, MULTI_PORT_BASE, nodes=2)
    print(f"two-node cluster up in {time.monotonic() - started:.1f} s ({MULTI_STATE_DIR})")
    try:
        with tempfile.TemporaryDirectory(prefix="prunetune-node-failure-") as scratch:
            return measure(Path(scratch))
    finally:
        stop_cluster(MULTI_STATE_DIR, MULTI_PORT_BASE)


def measure(scratch: Path) -> int:
    root = scratch / "study"
    args = crash_study_args(root, build_assets(scratch / "assets"))
    submitted = launch("--batch-all", "--stage", "all", *args)
    if submitted.returncode:
        print(submitted.stderr)
        return 1
    manifest = load_manifest(root)
    folder = StudyPaths(manifest.study_config()).finetuned_dir(PAIR)
    finetune_job = next(array.job_id for array in manifest.attempts[0].arrays if array.name == "finetune")

    wait_until(lambda: finetune_step(folder) >= 4, 300, interval=0.1, what="the finetune to pass its first checkpoint")
    crashed = time.monotonic()
    node_command("crash-node", "node2")

    def seen(pattern: str) -> float:
        """Seconds from the crash until the finetune's state in `launch.py status` matches ``pattern``."""
        wait_until(lambda: re.search(rf" finetune +{pattern} ", launch("status", *args).stdout), 600, interval=0.5,
                   what=f"status to show {pattern}")
        return time.monotonic() - crashed
    detected = seen(r"(NODE_FAIL|PENDING \(requeued after NODE_FAIL\))")  # newest record NODE_FAIL for a few s
    requeued = seen(r"PENDING \(requeued after NODE_FAIL\)")
    at_step = finetune_step(folder)  # node2 is down: the requeued run cannot start yet, this is the crashed run's last step
    node_command("restart-node", "node2")
    back = time.monotonic() - crashed
    running = seen(r"RUNNING \(requeued after NODE_FAIL\)")
    rows = wait_until(lambda: (lambda rows: None if any(row.active for row in rows) else rows)(rows_of(root)),
                      600, interval=0.5, what="the study to end")
    complete = time.monotonic() - crashed
    if not all(row.done for row in rows):
        print("study did not complete:", [(row.stage, row.state, row.log) for row in rows if not row.done])
        return 1
    runs = subprocess.run(["sacct", "-X", "-n", "-P", "--duplicates", "-o", "JobID,State,Elapsed", "-j",
                           finetune_job], capture_output=True, text=True, check=True).stdout.split()
    record = json.loads((folder / "finetuning_config.json").read_text())
    resumed = record["derived"]["resumed_from_step"]
    finetune_row = next(row for row in rows if row.stage == "finetune")
    print(f"crash of node2 at finetune step {at_step} of 54 (checkpoint every 3 steps)")
    print(f"NODE_FAIL in `launch.py status`: {detected:.1f} s after the crash")
    print(f"requeued by SLURM (PENDING, same task id) in status: {requeued:.1f} s after the crash")
    print(f"node2 idle again (restart-node): {back:.1f} s after the crash")
    print(f"the requeued run RUNNING in status: {running:.1f} s after the crash")
    print(f"study complete again: {complete:.1f} s after the crash, without `resubmit` "
          f"(manifest attempts: {len(load_manifest(root).attempts)})")
    print(f"finetune runs (sacct --duplicates): {' '.join(runs)}; status: {finetune_row.state_text}, "
          f"resumed from step {resumed} ({at_step - resumed} step(s) done twice), "
          f"SLURM restart count {record['derived']['slurm_restart_count']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
