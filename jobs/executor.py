"""The local executor: runs a plan on this machine (``jobs/slurm.py`` submits the same plan to SLURM).

Local runs execute the same plan, arrays and dependencies as SLURM, in a small pool of worker
processes. The processes are reused from task to task, so torch, transformers and lm-eval are imported
once per process rather than once per task (several seconds each on a small machine); submitit's
LocalExecutor would start a fresh interpreter per task.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import shutil
import subprocess
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.config import StudyConfig
from jobs.plan import Plan, TaskArray, TaskSpec
from jobs.study import StudyPaths

log = logging.getLogger("prunetune")

SUCCEEDED, FAILED, CANCELLED = "COMPLETED", "FAILED", "CANCELLED"


def resolve_kind(kind: str) -> str:
    if kind == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    return kind


@dataclass
class TaskOutcome:
    spec: TaskSpec
    state: str
    seconds: float = 0.0
    error: str = ""


# ---------------------------------------------------------------------------------------- local


def visible_gpus() -> list[str]:
    """The GPUs this machine shows (``CUDA_VISIBLE_DEVICES`` when set, else nvidia-smi's indices), without torch."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip() and gpu.strip() != "-1"]
    if not shutil.which("nvidia-smi"):
        return []
    try:
        indices = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in indices.splitlines() if line.strip()]


def gpu_slots(workers: int, gpus: list[str]) -> list[str | None]:
    """One GPU per worker process, round robin; ``None`` for each on a machine without GPUs."""
    return [gpus[index % len(gpus)] if gpus else None for index in range(workers)]


def start_pool(context: Any, threads: int, gpus: list[str | None]) -> ProcessPoolExecutor:
    """A pool of ``len(gpus)`` processes; each takes one entry of ``gpus`` as it starts (see ``gpu_slots``)."""
    slots = context.Queue()
    for gpu in gpus:
        slots.put(gpu)
    return ProcessPoolExecutor(len(gpus), mp_context=context, initializer=_init_worker_process,
                               initargs=(threads, slots))


def _init_worker_process(threads: int, slots: Any) -> None:
    # Set before torch is imported in this process; N processes x N threads would oversubscribe.
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(threads)
    # Each process its own GPU: a task is one rank on cuda:0 of what it sees, and two tasks on one GPU would share
    # (or run out of) its memory.
    try:
        gpu = slots.get(timeout=10)
    except queue.Empty:
        gpu = None
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu


def _run_logged(spec: TaskSpec, log_path: str) -> tuple[bool, float, str]:
    """Run one task in a pool process with its stdout/stderr appended to the task's log file."""
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "a") as stream:
        os.dup2(stream.fileno(), 1)
        os.dup2(stream.fileno(), 2)
        try:
            from workers.entry import run_task
            run_task(spec)
            ok, error = True, ""
        except BaseException as exception:  # the task fails; the pool process lives on
            traceback.print_exc()
            ok, error = False, f"{type(exception).__name__}: {exception}".splitlines()[0][:300]
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
    return ok, time.monotonic() - started, error


class LocalRunner:
    """Runs a plan's arrays in ``workers`` processes, honouring aftercorr/afterany dependencies."""

    def __init__(self, config: StudyConfig, workers: int) -> None:
        self.config = config
        self.paths = StudyPaths(config)
        self.workers = workers
        self._display: TaskDisplay | None = None

    def run(self, plan: Plan) -> list[TaskOutcome]:
        arrays = {array.name: array for array in plan.arrays}
        specs = {name: array.tasks(self.config) for name, array in arrays.items()}
        pending = [spec for name in arrays for spec in specs[name]]
        outcomes: dict[tuple[str, int], TaskOutcome] = {}
        running: dict[Future, TaskSpec] = {}
        total = len(pending)
        self._display = TaskDisplay.open(total)  # a live bar on a terminal; None in logs and pipes
        threads = max(1, (os.cpu_count() or 1) // self.workers)
        context = multiprocessing.get_context("spawn")
        gpus = gpu_slots(self.workers, visible_gpus())
        if gpus[0] is not None:
            log.info("local executor: %d processes on GPU(s) %s", self.workers, ", ".join(map(str, gpus)))
        pool = start_pool(context, threads, gpus)
        try:
            while pending or running:
                for spec in list(pending):
                    if len(running) >= self.workers * 2:
                        break  # keep the queue short so a cancel decision is taken late, with facts
                    verdict = self._readiness(spec, arrays[spec.array], specs, outcomes)
                    if verdict == "wait":
                        continue
                    pending.remove(spec)
                    if verdict == "cancel":
                        outcome = TaskOutcome(spec, CANCELLED, error="its dependency did not succeed")
                        outcomes[(spec.array, spec.index)] = outcome
                        self._report(len(outcomes), total, outcome)
                    else:
                        log_path = str(self.paths.task_log(spec.array, spec.pair))
                        running[pool.submit(_run_logged, spec, log_path)] = spec
                if not running:
                    if pending and all(self._readiness(spec, arrays[spec.array], specs, outcomes) == "wait"
                                       for spec in pending):
                        raise RuntimeError("local plan is stuck: tasks wait on dependencies that never run")
                    continue
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                broken = False
                for future in finished:
                    spec = running.pop(future)
                    try:
                        ok, seconds, error = future.result()
                        outcome = TaskOutcome(spec, SUCCEEDED if ok else FAILED, seconds, error)
                    except BrokenProcessPool:
                        broken = True
                        outcome = TaskOutcome(spec, FAILED, error="worker process died (killed or out of memory)")
                    outcomes[(spec.array, spec.index)] = outcome
                    self._report(len(outcomes), total, outcome)
                if broken:
                    # Every task still queued in the dead pool fails with it; run them again.
                    for future, spec in list(running.items()):
                        pending.append(spec)
                        running.pop(future)
                    pool.shutdown(wait=False, cancel_futures=True)
                    pool = start_pool(context, threads, gpus)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if self._display:
                self._display.close()
        return list(outcomes.values())

    @staticmethod
    def _readiness(spec: TaskSpec, array: TaskArray, specs: dict[str, list[TaskSpec]],
                   outcomes: dict[tuple[str, int], TaskOutcome]) -> str:
        for dependency in array.depends_on:
            if dependency.array not in specs:
                continue
            if dependency.kind == "aftercorr":
                outcome = outcomes.get((dependency.array, spec.index))
                if outcome is None:
                    return "wait"
                if outcome.state != SUCCEEDED:
                    return "cancel"
            elif any((dependency.array, other.index) not in outcomes for other in specs[dependency.array]):
                return "wait"
        return "ready"

    def _report(self, count: int, total: int, outcome: TaskOutcome) -> None:
        spec = outcome.spec
        line = f"[{count:>3}/{total}] {outcome.state:<9} {spec.label} ({outcome.seconds:.1f}s)"
        if outcome.state != SUCCEEDED:
            line += f": {outcome.error} — log: {self.paths.task_log(spec.array, spec.pair)}"
        if self._display:
            self._display.finished(line, outcome.state == SUCCEEDED)
        else:
            log.info(line)


class TaskDisplay:
    """A progress bar (rich) while a local plan runs on a terminal; finished tasks print above it."""

    def __init__(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("[bold]tasks"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.description}"), console=Console(stderr=True), transient=True)
        self.task = self.progress.add_task("", total=total)
        self.progress.start()

    @classmethod
    def open(cls, total: int) -> "TaskDisplay | None":
        interactive = sys.stdout.isatty() and sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
        return cls(total) if interactive and total else None

    def finished(self, line: str, ok: bool) -> None:
        self.progress.console.print(line, style=None if ok else "red", markup=False, highlight=False)
        self.progress.update(self.task, advance=1, description=line.split("] ", 1)[-1][:60])

    def close(self) -> None:
        self.progress.stop()
