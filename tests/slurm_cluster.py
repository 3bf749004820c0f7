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
# Its own state folder and ports, so a cluster a developer runs by hand on the defaults is left alone; the
# environment may move them so that two test runs on one machine do not share a cluster.
STATE_DIR = os.environ.get("PRUNETUNE_TEST_SLURM_STATE_DIR", "/tmp/prunetune-slurm-tests")
PORT_BASE = os.environ.get("PRUNETUNE_TEST_SLURM_PORT_BASE", "17817")
# The two-node cluster (nodes in network namespaces) is a cluster of its own beside the single-node one, so
# both can run at once: its own folder and ports (the slurmds listen inside their namespaces).
MULTI_STATE_DIR = os.environ.get("PRUNETUNE_TEST_SLURM_MULTI_STATE_DIR", "/tmp/prunetune-slurm-tests-2node")
MULTI_PORT_BASE = os.environ.get("PRUNETUNE_TEST_SLURM_MULTI_PORT_BASE", "17917")


def cluster_unavailable(nodes: int = 1) -> str | None:
    """Why the cluster cannot run here, or None."""
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root"
    if not shutil.which("slurmctld") or not shutil.which("sacct"):
        return "SLURM is not installed (bash scripts/local_slurm.sh install)"
    if nodes > 1 and not all(shutil.which(tool) for tool in ("ip", "nsenter", "unshare")):
        return "a multi-node local cluster needs ip, nsenter and unshare"
    return None


def cluster_environment(state_dir: str = STATE_DIR, port_base: str = PORT_BASE) -> dict[str, str]:
    return {**os.environ, "LOCAL_SLURM_STATE_DIR": state_dir, "LOCAL_SLURM_PORT_BASE": port_base}


def start_cluster(state_dir: str = STATE_DIR, port_base: str = PORT_BASE, nodes: int = 1) -> str:
    """Start the cluster; returns the SLURM_CONF path."""
    result = subprocess.run(["bash", str(SCRIPT), "start", "--nodes", str(nodes), "--state-dir", state_dir],
                            env=cluster_environment(state_dir, port_base), capture_output=True, text=True, timeout=180)
    if result.returncode:
        raise RuntimeError(f"local SLURM did not start:\n{result.stderr[-3000:]}")
    for line in result.stdout.splitlines():
        if line.startswith("export SLURM_CONF="):
            return line.split("=", 1)[1].strip().strip("'\"")
    raise RuntimeError(f"no SLURM_CONF in {result.stdout!r}")


def stop_cluster(state_dir: str = STATE_DIR, port_base: str = PORT_BASE) -> None:
    subprocess.run(["bash", str(SCRIPT), "stop", "--state-dir", state_dir],
                   env=cluster_environment(state_dir, port_base), capture_output=True, text=True, timeout=180)


def node_command(command: str, node: str, state_dir: str = MULTI_STATE_DIR,
                 port_base: str = MULTI_PORT_BASE) -> None:
    """``crash-node`` or ``restart-node`` of a multi-node cluster."""
    result = subprocess.run(["bash", str(SCRIPT), command, node, "--state-dir", state_dir],
                            env=cluster_environment(state_dir, port_base), capture_output=True, text=True, timeout=120)
    if result.returncode:
        raise RuntimeError(f"local_slurm.sh {command} {node} failed:\n{result.stderr[-3000:]}")


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


def wait_for_study(root: Path, timeout: float = 900, interval: float = 2.0):
    """The status rows of the study in ``root`` once none of its tasks is queued or running any more."""
    from jobs.manifest import load_manifest
    from jobs.monitor import collect

    manifest = load_manifest(root)
    config = manifest.study_config()

    def settled():
        rows, _ = collect(manifest, config)
        return None if any(row.active for row in rows) else rows
    return wait_until(settled, timeout, interval=interval, what="the study's tasks to end")
