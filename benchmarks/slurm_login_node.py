#!/usr/bin/env python3
"""Login-node costs on the real local SLURM: submission time, status poll time and sacct calls per
poll (12-pair study and a 1,000-index array), and the time from a failure to a complete study with
`launch.py resubmit`.

    .venv/bin/python benchmarks/slurm_login_node.py          # as root; starts its own local cluster

sacct/squeue calls are counted by putting counting wrappers first on PATH (they log, then exec the
real command), so the numbers are what PruneTune really asked of the scheduler.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.slurm_cluster import cluster_unavailable, start_cluster, stop_cluster, wait_until  # noqa: E402

RESOURCES = [f"resources.{stage}.{key}={value}" for stage in ("finetune", "evaluate", "compare")
             for key, value in (("cpus_per_task", 1), ("gpus_per_node", 0), ("mem_gb", 1), ("time_min", 15))]


def counting_path(folder: Path) -> tuple[dict[str, str], Path]:
    """PATH with sacct/squeue/sbatch wrappers that append their name to a log before running."""
    calls = folder / "calls.log"
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("sacct", "squeue", "sbatch", "scancel"):
        real = shutil.which(name)
        wrapper = bin_dir / name
        wrapper.write_text(f"#!/bin/sh\necho {name} >> '{calls}'\nexec '{real}' \"$@\"\n")
        wrapper.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, calls


def count_calls(calls: Path) -> dict[str, int]:
    names = calls.read_text().split() if calls.exists() else []
    calls.unlink(missing_ok=True)
    return {name: names.count(name) for name in sorted(set(names))}


def launch(env: dict[str, str], *args: str) -> tuple[float, subprocess.CompletedProcess]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "launch.py", *args], cwd=REPO, env=env, capture_output=True, text=True)
    return time.monotonic() - started, result


def main() -> int:
    reason = cluster_unavailable()
    if reason:
        print(f"cannot run: {reason}")
        return 2
    os.environ["SLURM_CONF"] = start_cluster()
    work = Path(tempfile.mkdtemp(prefix="prunetune-slurm-bench-"))
    env, calls = counting_path(work)
    try:
        root = work / "study"
        args = ["--config-file", "configs/demo.yaml", f"study.results_root={root}", "executor.kind=slurm",
                "executor.array_parallelism=4", "evaluate.limit=10", *RESOURCES]
        from jobs.config import load_config
        from workers.demo_inputs import generate_demo_inputs
        generate_demo_inputs(load_config(REPO / "configs" / "demo.yaml", [a for a in args if "=" in a and not a.startswith("-")]))

        seconds, dry = launch(env, "--batch-all", "--stage", "all", "--dry-run", *args)
        print(f"dry run (12 pairs, 4 sbatch scripts rendered): {seconds:.2f} s, rc {dry.returncode}, "
              f"scheduler calls {count_calls(calls)}")
        seconds, submitted = launch(env, "--batch-all", "--stage", "all", *args)
        print(f"submit 12-pair study (4 arrays, 37 tasks): {seconds:.2f} s, rc {submitted.returncode}, "
              f"scheduler calls {count_calls(calls)}")
        polls = []
        for _ in range(5):
            seconds, status = launch(env, "status", *args)
            polls.append((seconds, count_calls(calls)))
        print(f"status poll, 12-pair study mid-run: median {statistics.median(s for s, _ in polls):.2f} s; "
              f"calls per poll {[c for _, c in polls]}")

        started = time.monotonic()
        wait_until(settled_for(env, args), 1800, interval=5, what="the 12-pair study")
        print(f"12-pair study on the local cluster (2 cores, 8 declared CPUs): complete "
              f"{time.monotonic() - started:.0f} s after the last poll above")

        # A 1,000-index array: one sacct call for the whole array, parsed by PruneTune's parser.
        from jobs import slurm
        output = subprocess.run(["sbatch", "--parsable", "--array=0-999%50", "-c1", "--mem=10M", "-o", "/dev/null",
                                 "--wrap", "sleep 1"], env=env, capture_output=True, text=True, check=True)
        array = output.stdout.strip().split(";")[0]
        time.sleep(3)  # let accounting record the array
        count_calls(calls)
        timings = []
        for _ in range(5):
            started = time.monotonic()
            os.environ["PATH"] = env["PATH"]
            states, source = slurm.query_states([array])
            timings.append(time.monotonic() - started)
            time.sleep(1)
        print(f"status of a 1,000-index array (PruneTune's query_states, in-process): median "
              f"{statistics.median(timings):.3f} s, {len(states)} task states, calls {count_calls(calls)} "
              f"for 5 polls (source {source})")
        subprocess.run(["scancel", array], env=env)

        # Failure -> resubmit -> complete, on a 2-pair study with one broken checkpoint.
        failing = work / "failing"
        fargs = [a if not a.startswith("study.results_root=") else f"study.results_root={failing}" for a in args]
        fargs += ["study.models=[Qwen]"]
        generate_demo_inputs(load_config(REPO / "configs" / "demo.yaml", [a for a in fargs if "=" in a and not a.startswith("-")]))
        weights = failing / "for_finetuning" / "Qwen" / "best_acc" / "model.safetensors"
        good = weights.read_bytes()
        weights.write_bytes(b"broken")
        launch(env, "--batch-all", "--stage", "all", *fargs)

        def failed():
            _, result = launch(env, "status", *fargs)
            return "FAILED" in result.stdout
        wait_until(failed, 600, interval=2, what="the injected failure")
        failed_at = time.monotonic()
        wait_until(settled_for(env, fargs), 600, interval=2, what="the failing study to settle")
        weights.write_bytes(good)
        resubmit_started = time.monotonic()
        seconds, again = launch(env, "resubmit", *fargs)
        wait_until(settled_for(env, fargs), 900, interval=2, what="the resubmitted study")
        _, final = launch(env, "status", *fargs)
        complete = "not submitted" not in final.stdout and "FAILED" not in final.stdout.split("states:")[-1]
        print(f"failure -> complete: resubmit took {seconds:.2f} s; study complete {time.monotonic() - resubmit_started:.0f} s "
              f"after resubmit ({time.monotonic() - failed_at:.0f} s after the failure was seen, including the "
              f"time to fix the checkpoint); final states: {final.stdout.strip().splitlines()[-1]}; complete={complete}")
    finally:
        stop_cluster()
    return 0


def settled_for(env, args):
    def check():
        result = subprocess.run([sys.executable, "launch.py", "status", *args], cwd=REPO, env=env,
                                capture_output=True, text=True)
        lines = [line for line in result.stdout.splitlines() if line.startswith("states:")]
        return lines and "PENDING" not in lines[0] and "RUNNING" not in lines[0]
    return check


if __name__ == "__main__":
    sys.exit(main())
