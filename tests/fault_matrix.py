"""The fault matrix of issue 6 on the real local SLURM: cause each fault, drive the study to completion, tabulate.

One scenario per fault of the issue's table (the cancel scenario covers a running and a pending index), each a
tiny study in its own results root on one shared cluster (tests/fault_study.py drives and measures it). A
scenario causes its fault at a point it observes, then lets SLURM requeue the task or runs ONE
``launch.py resubmit``, and ``measure`` checks the end state. ``run_matrix`` runs the node-down scenario alone
(it takes the only node down), then the others side by side; ``render_table`` prints the table.
tests/test_faults.py and benchmarks/fault_matrix.py call them.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from jobs.study import Pair
from tests.fault_study import (CHECKPOINT_STEPS, POLL_S, FaultStudy, Outcome, fault_cluster, measure, node_name,
                               prepare_inputs, queue_state, sacct_runs, slurm)
from tests.slurm_cluster import wait_until

__all__ = ["SCENARIOS", "fault_cluster", "render_table", "run_matrix"]


# ------------------------------------------------------------------------------------------- the faults
# Each scenario submits its study, causes its fault and returns its row(s); ``measure`` checks the rest.


def start_training(study: FaultStudy, checkpoints: int = 1) -> tuple[Pair, str]:
    """Submit; wait until the first pair's finetune has ``checkpoints`` valid checkpoints and trains past them."""
    pair = study.pairs[0]
    study.submit()
    task = study.task(pair)
    study.wait_queue_state(task, {"RUNNING"})
    study.wait_mid_training(pair, checkpoints)
    return pair, task


def kill_worker(study: FaultStudy, pair: Pair) -> float:
    pid = study.worker_pid(pair)
    fault_at = time.time()
    os.kill(pid, signal.SIGKILL)
    study.note(f"kill -9 {pid}")
    return fault_at


def newest_checkpoint(study: FaultStudy, pair: Pair) -> int:
    """Once the run is gone: it may have completed one more checkpoint between the fault and its end."""
    return study.checkpoints(pair)[-1]


def worker_killed(study: FaultStudy) -> list[Outcome]:
    """kill -9 of the finetune's python process after a checkpoint: FAILED, the evaluation that waited on it
    is cancelled by SLURM, one resubmit resumes from the checkpoint."""
    pair, _ = start_training(study)
    fault_at = kill_worker(study, pair)
    study.settle()
    outcome = Outcome("worker killed (kill -9) mid-training", "kill -9 <pid from the task log>")
    state = study.states()[(pair, "evaluate_finetuned")]
    if state != "CANCELLED":
        outcome.problems.append(f"its evaluation is {state}, not CANCELLED")
    resume = newest_checkpoint(study, pair)
    study.resubmit()
    return [measure(study, outcome, pair, fault_at, max_resubmits=1, bound=CHECKPOINT_STEPS, resumed_from=resume)]


def index_cancelled(study: FaultStudy) -> list[Outcome]:
    """Two pairs, one task at a time: index 1 cancelled while PENDING, index 0 while RUNNING; one resubmit."""
    running, pending = study.pairs
    study.submit()
    study.wait_queue_state(study.task(running), {"RUNNING"})
    study.wait_queue_state(study.task(pending), {"PENDING"})
    pending_at = time.time()
    slurm("scancel", study.task(pending))
    study.note(f"scancel {study.task(pending)} (pending)")
    study.wait_mid_training(running)
    running_at = time.time()
    slurm("scancel", study.task(running))
    study.note(f"scancel {study.task(running)} (running)")
    study.settle()
    resume = newest_checkpoint(study, running)
    study.resubmit()
    first = measure(study, Outcome("index cancelled while running", "scancel <array>_0 after a checkpoint"),
                    running, running_at, max_resubmits=1, bound=CHECKPOINT_STEPS, resumed_from=resume)
    second = measure(study, Outcome("index cancelled while pending", "scancel <array>_1 while PENDING"),
                     pending, pending_at, max_resubmits=1, bound=0, resumed_from=None)
    return [first, second]


def preemption(study: FaultStudy) -> list[Outcome]:
    """``scontrol requeue`` mid-training: SLURM runs the task again by itself, resumed from the last checkpoint."""
    pair, task = start_training(study)
    fault_at = time.time()
    slurm("scontrol", "requeue", task)
    study.note(f"scontrol requeue {task}")
    outcome = Outcome("preemption", "scontrol requeue <job> after a checkpoint")
    # Which checkpoint is newest when the requeued run starts is not known here; the bound on steps redone
    # and its "resuming from" line show it did not start over.
    return [measure(study, outcome, pair, fault_at, max_resubmits=0, bound=CHECKPOINT_STEPS)]


TIME_LIMIT = ("resources.finetune.time_min=2", "executor.signal_delay_s=30", "finetune.checkpoint_steps=8",
              "finetune.max_requeues=8")
# SLURM sends the warning signal between 30 and 90 s after the start (it may send it up to 60 s early). A run of
# about 4 minutes of training is signalled mid-training however fast this machine is; its steps are counted from
# a short timed run first, since the fixed 48 steps used before, meant to outlast 90 s, took 26 s on a faster VM.
# The timed run's first step is slow (start-up): timed over 4 steps, a step looked twice as long as it was.
TIME_LIMIT_TRAIN_S = 240
CALIBRATION_STEPS = 12


def steps_lasting(study: FaultStudy, seconds: float) -> int:
    """Optimizer steps of ``study``'s finetune that take about ``seconds`` here, from a finetune of
    CALIBRATION_STEPS steps submitted the same way (a SLURM task of its own, in a results root of its own). Its
    time includes the first step's start-up, so a step looks slower than it is: the count errs low, and runs stay
    short on a slow machine."""
    calibration = FaultStudy(study.root.with_name(study.root.name + "_calibration"), study.search,
                             overrides=(f"finetune.max_steps={CALIBRATION_STEPS}", "finetune.checkpoint_steps=0",
                                        "finetune.val_set_size=0"))
    pair = calibration.pairs[0]
    calibration.launch("select", "--search", str(calibration.search))
    calibration.launch("--model", pair.model, "--config", pair.config, "--stage", "finetune")
    calibration.settle()
    metrics = json.loads((calibration.paths.finetuned_dir(pair) / "finetuning_config.json").read_text())["metrics"]
    per_step = metrics["train_runtime_s"] / metrics["optimizer_steps"]
    steps = max(CALIBRATION_STEPS, math.ceil(seconds / per_step))
    study.note(f"calibration: {per_step:.2f} s a step -> {steps} steps for about {seconds:.0f} s")
    return steps


def time_limit(study: FaultStudy) -> list[Outcome]:
    """--time=2 with the warning signal 30 s before it, and about 4 minutes of steps: SLURM signals between 30 and
    90 s, the finetune checkpoints at the end of that step and requeues itself, and a later run finishes (each run
    that trains past its own warning requeues again, up to finetune.max_requeues)."""
    pair = study.pairs[0]
    study.override(f"finetune.max_steps={steps_lasting(study, TIME_LIMIT_TRAIN_S)}")
    study.submit()
    task = study.task(pair)
    study.settle()
    runs = sacct_runs(task)
    outcome = Outcome("time limit", "--time=2, USR2 30 s before (executor.signal_delay_s)")
    if len(runs) < 2:
        outcome.problems.append(f"the task never reached its time limit ({len(runs)} run); make it train longer")
    fault_at = runs[0][2] if runs and runs[0][2] else time.time()  # the end of the signalled run
    return [measure(study, outcome, pair, fault_at, max_resubmits=0, bound=8)]


def corrupt_checkpoint(study: FaultStudy) -> list[Outcome]:
    """kill -9 after two checkpoints, truncate the newest one's largest file, resubmit once: the rerun skips the
    broken checkpoint (its COMPLETE.json no longer matches) and resumes from the one before."""
    pair, _ = start_training(study, checkpoints=2)
    fault_at = kill_worker(study, pair)
    study.settle()
    steps = study.checkpoints(pair)
    newest = study.paths.finetuned_dir(pair) / "checkpoints" / f"checkpoint-{steps[-1]}"
    victim = max((path for path in newest.rglob("*") if path.is_file() and path.name != "COMPLETE.json"),
                 key=lambda path: path.stat().st_size)
    with victim.open("r+b") as stream:
        stream.truncate(victim.stat().st_size // 2)
    study.note(f"truncated {victim.relative_to(study.root)} to half")
    study.resubmit()
    outcome = Outcome("corrupt latest checkpoint", "kill -9, truncate the newest checkpoint's largest file")
    # The broken checkpoint costs its own interval on top of the usual bound.
    return [measure(study, outcome, pair, fault_at, max_resubmits=1, bound=2 * CHECKPOINT_STEPS,
                    resumed_from=steps[-2])]


def node_down(study: FaultStudy) -> list[Outcome]:
    """``scontrol update nodename=<n> state=down`` mid-training, ``state=resume`` once the task left the node; one
    resubmit where SLURM did not requeue the task itself."""
    node = node_name()
    pair, task = start_training(study)
    fault_at = time.time()
    slurm("scontrol", "update", f"nodename={node}", "state=down", "reason=fault-test")
    study.note(f"node {node} down")
    try:
        wait_until(lambda: queue_state(task) != "RUNNING", 120, POLL_S, f"{task} off the node")
    finally:
        resume_node(node)
        study.note(f"node {node} {slurm('sinfo', '-h', '-n', node, '-o', '%T').strip()}")
    resume = None
    if queue_state(task) is None:
        study.settle()
        resume = newest_checkpoint(study, pair)
        study.resubmit()
    outcome = Outcome("node down mid-run", "scontrol update nodename=<n> state=down, then state=resume")
    return [measure(study, outcome, pair, fault_at, max_resubmits=1, bound=CHECKPOINT_STEPS, resumed_from=resume)]


def resume_node(node: str) -> None:
    """``state=resume``; with ReturnToService=2 the node may be back already (its slurmd answered within
    milliseconds), and SLURM then refuses the resume as an invalid transition from IDLE: nothing left to do."""
    refused = subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], capture_output=True,
                             text=True, timeout=60)
    if refused.returncode and "down" in slurm("sinfo", "-h", "-n", node, "-o", "%T").lower():
        raise RuntimeError(f"node {node} stays down: {refused.stderr.strip()}")


def disk_full(study: FaultStudy) -> list[Outcome]:
    """The finetuned tree on a small tmpfs, filled up after the first checkpoint: the finetune fails writing; the
    mount is grown (remount) and the study resubmitted once."""
    mount = study.root / "finetuned"
    mount.mkdir(parents=True)
    slurm("mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount))
    ballast = mount / "ballast.fill"
    try:
        pair, _ = start_training(study)
        fault_at = time.time()
        fill(ballast)
        study.note(f"filled {mount}")
        study.settle()
        slurm("mount", "-o", "remount,size=128m", str(mount))
        study.note(f"grew {mount} to 128m")
        resume = newest_checkpoint(study, pair)
        study.resubmit()
        study.settle()
        ballast.unlink()
        outcome = Outcome("disk full while writing results", "tmpfs under finetuned/ filled, then remount,size=")
        return [measure(study, outcome, pair, fault_at, max_resubmits=1, bound=CHECKPOINT_STEPS,
                        resumed_from=resume)]
    finally:
        study.cancel_everything()  # nothing may still write there when it goes
        ballast.unlink(missing_ok=True)
        subprocess.run(["umount", "--lazy", str(mount)], capture_output=True)


def fill(path: Path) -> None:
    """Write ``path`` until the file system is full (ENOSPC); unbuffered, so closing it cannot fail again."""
    handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for size in (1 << 20, 1 << 12):
            with contextlib.suppress(OSError):
                while os.write(handle, b"\0" * size):
                    pass
    finally:
        os.close(handle)


def eval_dependency(study: FaultStudy) -> list[Outcome]:
    """A finetune that fails at once (a file where its output folder goes): SLURM cancels the evaluation that
    waits on it; the file removed, one resubmit runs the finetune and its evaluation."""
    pair = study.pairs[0]
    blocker = study.paths.finetuned_dir(pair)
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a folder: the finetune cannot write its outputs here\n")
    study.submit()
    study.settle()
    outcome = Outcome("eval dependency on a failed finetune", "finetune fails; its evaluation cancelled")
    state = study.states()
    if (state[(pair, "finetune")], state[(pair, "evaluate_finetuned")]) != ("FAILED", "CANCELLED"):
        outcome.problems.append(f"finetune {state[(pair, 'finetune')]}, evaluation "
                                f"{state[(pair, 'evaluate_finetuned')]} (expected FAILED, CANCELLED)")
    fault_at = max(end for _, _, end in sacct_runs(study.task(pair)) if end is not None)
    blocker.unlink()
    study.resubmit()
    return [measure(study, outcome, pair, fault_at, max_resubmits=1, bound=None, worker="evaluate_finetuned")]


@dataclass(frozen=True)
class Scenario:
    name: str
    run: Callable[[FaultStudy], list[Outcome]]
    faults: tuple[str, ...]  # the rows it returns, named as in the issue's table
    configs: tuple[str, ...] = ("best_acc",)
    overrides: tuple[str, ...] = ()
    parallelism: int = 2
    alone: bool = False  # stops the only node: nothing else may run meanwhile


SCENARIOS = (
    Scenario("node_down", node_down, ("node down mid-run",), alone=True),
    # The longest, so the first of the side-by-side ones.
    Scenario("time_limit", time_limit, ("time limit",), overrides=TIME_LIMIT),
    Scenario("worker_killed", worker_killed, ("worker killed (kill -9) mid-training",)),
    Scenario("index_cancelled", index_cancelled, ("index cancelled while running", "index cancelled while pending"),
             configs=("best_acc", "best_ppl"), parallelism=1),
    Scenario("preemption", preemption, ("preemption",)),
    Scenario("corrupt_checkpoint", corrupt_checkpoint, ("corrupt latest checkpoint",)),
    Scenario("disk_full", disk_full, ("disk full while writing results",)),
    Scenario("eval_dependency", eval_dependency, ("eval dependency on a failed finetune",)),
)


def run_scenario(scenario: Scenario, base: Path, search: Path) -> list[Outcome]:
    study = FaultStudy(base / scenario.name, search, scenario.configs, scenario.overrides, scenario.parallelism)
    study.watch()
    try:
        outcomes = scenario.run(study)
    except Exception as error:  # one scenario's failure is a row of the table, not the end of the matrix
        study.cancel_everything()
        outcomes = [Outcome(fault, "", problems=[f"{type(error).__name__}: {error}"]) for fault in scenario.faults]
    finally:
        study.unwatch()
    for outcome in outcomes:
        if not outcome.recovered:
            outcome.problems += study.log
    return outcomes


# The rows in the order of the issue's table.
ISSUE_ORDER = ("worker_killed", "index_cancelled", "preemption", "time_limit", "corrupt_checkpoint", "node_down",
               "disk_full", "eval_dependency")


def run_matrix(base: Path, names: tuple[str, ...] = (), workers: int = 3) -> list[Outcome]:
    """Every scenario (or those named): the node-down ones alone first, then the others ``workers`` at a time."""
    search = prepare_inputs(base / "inputs")
    chosen = [scenario for scenario in SCENARIOS if not names or scenario.name in names]
    rows = {scenario.name: run_scenario(scenario, base, search) for scenario in chosen if scenario.alone}
    side_by_side = [scenario for scenario in chosen if not scenario.alone]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        rows.update(zip([scenario.name for scenario in side_by_side],
                        pool.map(lambda scenario: run_scenario(scenario, base, search), side_by_side)))
    return [outcome for name in ISSUE_ORDER if name in rows for outcome in rows[name]]


def render_table(outcomes: list[Outcome]) -> str:
    header = "| fault | how | recovered | attempts | resubmits | steps redone (bound) | recover s | done s |"
    lines = [header, "|---|---|---|---:|---:|---:|---:|---:|"]
    for row in outcomes:
        redone = "-" if row.steps_redone is None else f"{row.steps_redone} (<= {row.bound})"
        lines.append(f"| {row.fault} | {row.how} | {'yes' if row.recovered else 'NO'} | {row.attempts} | "
                     f"{row.resubmits} | {redone} | {_seconds(row.recover_s)} | {_seconds(row.done_s)} |")
    lines.append("\nattempts: runs of the affected task (the finetune; for the dependency row, the evaluation), over "
                 "requeues and resubmits. steps redone: optimizer steps trained twice. recover s: fault -> the "
                 "affected task's next start. done s: fault -> study complete.")
    for row in outcomes:
        if row.problems:
            lines.append(f"\n{row.fault}:\n  " + "\n  ".join(row.problems))
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"

