"""What the scheduler runs for one array task: pick the stage's recipe and run it.

This module stays import-light (no torch at import time) because submitit unpickles a reference to
``run_task`` on the login node's side too; the recipes are imported inside the task.
"""
from __future__ import annotations

import logging
import os
import sys
import time

from jobs.plan import TaskSpec

log = logging.getLogger("prunetune.task")


def prepare_task_environment() -> None:
    """Logging to stderr (the task log), offline Hub settings and a thread count that fits the task."""
    root = logging.getLogger()
    if not any(getattr(handler, "_prunetune", False) for handler in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._prunetune = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    # Offline by design: a missing local file must fail at once, not after minutes of Hub retries.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # torch sizes its thread pool by the machine's cores, not by what SLURM gave this task; on a
    # shared node that oversubscribes the CPUs. Set before torch is imported.
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = cpus


def run_task(spec: TaskSpec) -> str:
    """Run one task; raises on failure so the executor records it as failed."""
    prepare_task_environment()
    started = time.monotonic()
    # Every rank of a multi-GPU finetune runs this; one start/done line per task is enough.
    level = logging.INFO if os.environ.get("SLURM_PROCID", os.environ.get("RANK", "0")) == "0" else logging.DEBUG
    log.log(level, "start %s (pid %d, host %s)", spec.label, os.getpid(), os.uname().nodename)
    if spec.worker == "finetune":
        from workers import finetune
        finetune.run(spec.config, spec.pair)
    elif spec.worker == "evaluate_pruned":
        from workers import evaluate
        evaluate.run(spec.config, spec.pair, target="pruned")
    elif spec.worker == "evaluate_finetuned":
        from workers import evaluate
        evaluate.run(spec.config, spec.pair, target="finetuned")
    elif spec.worker == "compare":
        from workers import compare
        compare.run(spec.config, spec.pairs)
    else:
        raise ValueError(f"unknown worker {spec.worker!r}")
    elapsed = time.monotonic() - started
    log.log(level, "done %s in %.1fs", spec.label, elapsed)
    return f"{spec.label} ok in {elapsed:.1f}s"


class TaskRunner:
    """``run_task`` as submitit's checkpointable callable: on SLURM's warning signal (preemption or the time
    limit coming), submitit calls ``checkpoint`` and requeues the job with the same task. The task itself
    resumes: a finetune from its newest checkpoint (it saves one on the signal first, see
    workers/checkpointing.py), an evaluation from the results it already wrote."""

    def __call__(self, spec: TaskSpec) -> str:
        return run_task(spec)

    def checkpoint(self, spec: TaskSpec):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, spec)
