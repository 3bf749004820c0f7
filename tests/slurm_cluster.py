"""Helpers for tests on the real local SLURM cluster (scripts/local_slurm.sh)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "local_slurm.sh"
STATE_DIR = "/tmp/prunetune-slurm-tests"
# Its own ports, so a cluster a developer runs by hand on the defaults is left alone.
PORT_BASE = "17817"


def cluster_unavailable() -> str | None:
    """Why the cluster cannot run here, or None."""
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root"
    if not shutil.which("slurmctld") or not shutil.which("sacct"):
        return "SLURM is not installed (bash scripts/local_slurm.sh install)"
    return None


def cluster_environment() -> dict[str, str]:
    return {**os.environ, "LOCAL_SLURM_STATE_DIR": STATE_DIR, "LOCAL_SLURM_PORT_BASE": PORT_BASE}


def start_cluster() -> str:
    """Start the cluster; returns the SLURM_CONF path."""
    result = subprocess.run(["bash", str(SCRIPT), "start", "--state-dir", STATE_DIR], env=cluster_environment(),
                            capture_output=True, text=True, timeout=180)
    if result.returncode:
        raise RuntimeError(f"local SLURM did not start:\n{result.stderr[-3000:]}")
    for line in result.stdout.splitlines():
        if line.startswith("export SLURM_CONF="):
            return line.split("=", 1)[1].strip().strip("'\"")
    raise RuntimeError(f"no SLURM_CONF in {result.stdout!r}")


def stop_cluster() -> None:
    subprocess.run(["bash", str(SCRIPT), "stop", "--state-dir", STATE_DIR], env=cluster_environment(),
                   capture_output=True, text=True, timeout=180)


def launch(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch.py"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def wait_until(predicate, timeout: float, interval: float = 1.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def sacct_times(job_ids: list[str]) -> dict[str, tuple[str, str, str]]:
    """{task id: (state, start, end)} straight from sacct, for checking dependency order."""
    output = subprocess.run(["sacct", "-X", "-n", "-P", "--format=JobID,State,Start,End", "-j", ",".join(job_ids)],
                            capture_output=True, text=True, check=True).stdout
    rows = {}
    for line in output.splitlines():
        job, state, start, end = line.split("|")
        rows[job] = (state.split()[0], start, end)
    return rows
