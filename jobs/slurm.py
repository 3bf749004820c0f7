"""The one module that talks to SLURM: submission through submitit, and sacct/squeue/scancel.

Submission and ``--dry-run`` build the executor with the same function (``make_executor``); the dry
run renders the sbatch text with submitit's own renderer instead of calling ``sbatch``. Status for a
whole study is ONE ``sacct`` call over every array job id of the study (``squeue`` only when sacct
fails), because schedulers ban tools that poll per task.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from jobs.config import StudyConfig
from jobs.errors import UserError
from jobs.plan import Plan, TaskArray
from jobs.slurm_template import setup_lines
from jobs.study import StudyPaths

log = logging.getLogger("prunetune")

# SLURM states after which a task will not run again by itself.
FAILED_STATES = {"FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "CANCELLED", "PREEMPTED", "BOOT_FAIL",
                 "DEADLINE", "REVOKED"}
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "RESIZING", "SUSPENDED", "COMPLETING", "CONFIGURING",
                 "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED"}
# Submit orders the runs of a requeued task: SLURM stamps each requeued run with a new submit time.
SACCT_FIELDS = ("JobID", "State", "ExitCode", "Elapsed", "NodeList", "Start", "End", "Submit")


class SlurmError(UserError):
    """A SLURM command failed; the message carries its output."""


@dataclass(frozen=True)
class SubmittedArray:
    name: str
    worker: str
    job_id: str  # the array job id; a one-task array is a plain job in SLURM's eyes
    pairs: tuple[str, ...]  # pair slugs by array index (empty for compare)
    depends_on: tuple[str, ...]  # rendered dependency clauses, e.g. aftercorr:1234
    sbatch_file: str = ""


@dataclass(frozen=True)
class TaskState:
    state: str
    exit_code: str = ""
    elapsed: str = ""
    nodes: str = ""
    restarts: int = 0  # earlier runs of the same task id that SLURM requeued (NODE_FAIL, preemption, ...)
    requeued_after: str = ""  # how the run before this one ended, when restarts > 0


def make_executor(config: StudyConfig, array: TaskArray, dependency: str):
    """The submitit executor for one array: resources from config, set-up lines from the template."""
    import submitit

    resources = array.resources
    # max_num_timeout bounds submitit's requeues after time-outs; workers/finetune.py bounds preemptions alike.
    # python: submitit writes it into the job's command line as is; quoted, a venv path with spaces still works.
    executor = submitit.SlurmExecutor(folder=str(StudyPaths(config).logs_dir() / "submitit" / "%j"),
                                      max_num_timeout=config.finetune.max_requeues, python=shlex.quote(sys.executable))
    optional = {key: value for key, value in (("partition", resources.partition), ("account", resources.account),
                                              ("qos", resources.qos)) if value}
    if resources.gpus_per_node:
        optional["gpus_per_node"] = resources.gpus_per_node
    # A finetune runs one rank per GPU, each its own SLURM task (workers/distributed.py); other stages use one task.
    ranks_per_node = resources.gpus_per_node if array.worker == "finetune" and resources.gpus_per_node > 0 else 1
    executor.update_parameters(
        job_name=f"prunetune-{array.name}", time=resources.time_min, nodes=resources.nodes,
        ntasks_per_node=ranks_per_node,
        cpus_per_task=resources.cpus_per_task, mem=f"{resources.mem_gb}GB",
        array_parallelism=config.executor.array_parallelism, setup=setup_lines(config),
        signal_delay_s=config.executor.signal_delay_s,
        additional_parameters=submission_flags(dependency), **optional)
    return executor


def submission_flags(dependency: str) -> dict[str, object]:
    """sbatch flags submitit has no parameter for: the dependency.

    Jobs stay requeueable (SLURM's default): a finetune requeues itself on the warning signal (preemption,
    time limit) and resumes from its checkpoint, a preempting scheduler with PreemptMode=REQUEUE can put it
    back in the queue instead of cancelling it, and after a NODE_FAIL SLURM requeues the same task, which
    resumes from its last checkpoint. One writer is kept because ``resubmit`` only reruns tasks whose newest
    record is a final failure: a task SLURM requeued is PENDING or RUNNING again, never resubmitted beside it.
    (``--no-requeue`` would turn every preemption into a cancellation.)
    """
    return {"dependency": dependency} if dependency else {}


def render_dependency(array: TaskArray, submitted: dict[str, SubmittedArray], plan: Plan) -> str:
    clauses = []
    for dependency in array.depends_on:
        if dependency.array not in submitted:
            continue
        kind = dependency.kind
        # submitit submits a one-task array as a plain job, for which aftercorr means afterok.
        if kind == "aftercorr" and plan.array(dependency.array).size == 1:
            kind = "afterok"
        clauses.append(f"{kind}:{submitted[dependency.array].job_id}")
    return ",".join(clauses)


def submit_plan(config: StudyConfig, plan: Plan, dry_run: bool = False) -> list[SubmittedArray]:
    """Submit every array in plan order, chaining dependencies by job id; or render them (dry run)."""
    from workers.entry import TaskRunner  # import-light: the worker modules load inside the job

    submitted: dict[str, SubmittedArray] = {}
    dry_run_dir = StudyPaths(config).logs_dir() / "dry_run"
    for array in plan.arrays:
        dependency = render_dependency(array, submitted, plan)
        executor = make_executor(config, array, dependency)
        pairs = tuple(pair.slug for pair in array.pairs) if array.worker != "compare" else ()
        if dry_run:
            text = render_sbatch(executor, array.size)
            path = dry_run_dir / f"{array.name}.sbatch"
            from jobs.state import atomic_write_text
            atomic_write_text(path, text)
            job_id = f"JOBID_{array.name}"  # a placeholder sbatch would reject: nothing real is submitted
            submitted[array.name] = SubmittedArray(array.name, array.worker, job_id, pairs,
                                                   tuple(dependency.split(",")) if dependency else (), str(path))
            continue
        try:
            jobs = executor.map_array(TaskRunner(), array.tasks(config))
        except Exception as error:  # submitit raises FailedSubmissionError with sbatch's message
            reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            # The arrays already in the queue would run outside any manifest: take them back out.
            earlier = [item.job_id for item in submitted.values()]
            if earlier:
                try:
                    cancel(earlier)
                except SlurmError as cancel_error:
                    reason += f"; cancelling the arrays already submitted ({', '.join(earlier)}) failed too: " \
                              f"{cancel_error}"
                else:
                    reason += f"; the arrays already submitted ({', '.join(earlier)}) were cancelled"
            raise SlurmError(f"submitting {array.name} failed: {reason}") from error
        job_id = jobs[0].job_id.split("_")[0]
        submission = Path(executor.folder.parent) / job_id
        submitted[array.name] = SubmittedArray(array.name, array.worker, job_id, pairs,
                                               tuple(dependency.split(",")) if dependency else (),
                                               str(submission))
    return list(submitted.values())


def render_sbatch(executor, size: int) -> str:
    """What submitit would hand to sbatch for an array of ``size`` tasks."""
    import submitit.slurm.slurm as submitit_slurm

    parameters = dict(executor.parameters)
    if size > 1:
        parameters["map_count"] = size
    return submitit_slurm._make_sbatch_string(command=executor._submitit_command_str, folder=executor.folder,
                                              **parameters)


def submitted_script(array: SubmittedArray) -> str:
    """The sbatch text submitit wrote for a submitted array (kept in its log folder)."""
    folder = Path(array.sbatch_file)
    for candidate in sorted(folder.glob("*_submission.sh")):
        return candidate.read_text()
    raise FileNotFoundError(f"no submission file in {folder}")


# ------------------------------------------------------------------------------------ state


def _run(command: list[str], timeout: float = 60) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SlurmError(f"{command[0]} not found; run this on a SLURM login node (or start "
                         "scripts/local_slurm.sh)") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{shlex.join(command)} did not answer in {timeout:.0f} s; is slurmctld up?") from None
    if result.returncode:
        raise SlurmError(f"{shlex.join(command)} failed: {(result.stderr or result.stdout).strip()[:300]}")
    return result.stdout


_TASK_ID = re.compile(r"^(?P<job>\d+)(?:_(?P<index>\d+)|_\[(?P<ranges>[^\]]+)\])?$")


def parse_sacct(text: str) -> dict[tuple[str, int | None], TaskState]:
    """``sacct -X -n -P --duplicates`` lines -> {(array job id, index or None for a plain job): newest run}.

    A pending array shows as one line ``123_[2-11%4]``: every index in its ranges is PENDING. A task SLURM
    requeued (after NODE_FAIL, a preemption, or its own requeue on the warning signal) keeps its id and has
    one line per run: the newest (latest Submit, then the later line) is its state, so a task requeued after
    NODE_FAIL is PENDING or RUNNING, not failed. ``restarts`` counts the runs before it.
    """
    runs: dict[tuple[str, int | None], list[tuple[str, int, TaskState]]] = {}
    from_ranges: dict[tuple[str, int | None], tuple[str, int, TaskState]] = {}
    for order, line in enumerate(text.splitlines()):
        fields = line.split("|")
        if len(fields) < 5:
            continue
        job_id, state, exit_code, elapsed, nodes = fields[:5]
        submit = fields[7].strip() if len(fields) > 7 else ""
        match = _TASK_ID.match(job_id.strip())
        if not match:
            continue
        run = (submit, order, TaskState(state.split()[0] if state else "UNKNOWN", exit_code, elapsed,
                                        "" if nodes in ("None assigned", "") else nodes))
        if match["ranges"]:
            for index in expand_ranges(match["ranges"]):
                from_ranges[(match["job"], index)] = run
        else:
            runs.setdefault((match["job"], int(match["index"]) if match["index"] else None), []).append(run)
    for key, run in from_ranges.items():  # an index with a record of its own has left the pending range
        runs.setdefault(key, [run])
    states = {}
    for key, found in runs.items():
        found.sort(key=lambda run: (run[0], run[1]))
        newest = found[-1][2]
        if len(found) > 1:
            newest = dataclasses.replace(newest, restarts=len(found) - 1, requeued_after=found[-2][2].state)
        states[key] = newest
    return states


def expand_ranges(text: str) -> list[int]:
    indices = []
    for part in text.split("%")[0].split(","):
        low, _, high = part.partition("-")
        indices.extend(range(int(low), int(high or low) + 1))
    return indices


def query_states(job_ids: list[str]) -> tuple[dict[tuple[str, int | None], TaskState], str]:
    """States of every task of these arrays in one sacct call (every run of a requeued task: --duplicates).
    Returns (states, source).

    Jobs sacct does not know yet (accounting lags the controller by a moment after submission) and
    every job when sacct fails are asked of squeue, which knows the queued and running ones.
    """
    if not job_ids:
        return {}, "none"
    try:
        text = _run(["sacct", "-X", "-n", "-P", "--duplicates", "--format=" + ",".join(SACCT_FIELDS),
                     "-j", ",".join(job_ids)])
        states, source = parse_sacct(text), "sacct"
    except SlurmError as error:
        log.warning("sacct failed (%s); falling back to squeue, which knows only queued and running tasks", error)
        states, source = {}, "squeue"
    unknown = sorted(set(job_ids) - {job for job, _ in states})
    if unknown:
        try:
            text = _run(["squeue", "-h", "-r", "-o", "%i|%T|-|%M|%N|-|-|%V", "-j", ",".join(unknown)])
            states.update(parse_sacct(text))
        except SlurmError as error:  # "Invalid job id": the controller has forgotten them too
            log.debug("squeue knows none of %s (%s)", unknown, error)
        source += "+squeue" if source == "sacct" else ""
    return states, source


def queued_tasks(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """{task id: (state, reason)} of the tasks of these arrays the controller still queues or runs.

    ``resubmit`` asks this besides sacct: in the seconds between a NODE_FAIL and accounting's record of
    SLURM's requeue, sacct's newest record is the NODE_FAIL, while the controller already has the task pending.
    A COMPLETING task is left out: it has ended and only its clean-up runs (a requeued one is PENDING at once).
    """
    if not job_ids:
        return {}
    try:
        text = _run(["squeue", "-h", "-r", "-o", "%i|%T|%r", "-j", ",".join(job_ids)])
    except SlurmError as error:  # "Invalid job id": the controller has forgotten every one of them
        log.debug("squeue knows none of %s (%s)", job_ids, error)
        return {}
    queued = {}
    for line in text.splitlines():
        task, _, rest = line.partition("|")
        state, _, reason = rest.partition("|")
        if task and state and state.strip() != "COMPLETING":
            queued[task.strip()] = (state.strip(), reason.strip())
    return queued


def cancel(task_ids: list[str]) -> None:
    if task_ids:
        _run(["scancel", *task_ids])


def task_id(job_id: str, index: int | None) -> str:
    return job_id if index is None else f"{job_id}_{index}"


def log_path(config: StudyConfig, job_id: str, index: int | None) -> Path:
    """submitit's stdout file of one task (its folder pattern is logs/submitit/%j)."""
    full = task_id(job_id, index)
    return StudyPaths(config).logs_dir() / "submitit" / full / f"{full}_0_log.out"
