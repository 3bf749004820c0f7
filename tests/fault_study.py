"""Driving and measuring one study of the fault matrix (tests/fault_matrix.py) on the real local SLURM.

``FaultStudy`` is one scenario's tiny study in its own results root: the demo's Qwen stand-in (one pair, two for
the cancel scenario), a short finetune that logs every step and checkpoints every few steps, and a small
evaluation, submitted with ``launch.py`` like a user would. It waits for what a scenario needs (a task RUNNING
or PENDING, a valid checkpoint on disk and a step past it), never for a fixed time, and watches progress.json.

``measure`` settles the study after a fault and fills its ``Outcome``:
  attempts     runs of the affected task: SLURM's records of it (``sacct --duplicates`` keeps one per requeue)
               that started, over every submission
  steps redone optimizer steps trained twice: for each run after the first, the highest step seen before it
               minus the step it resumed from (its "resuming from ...checkpoint-<step>" line, else its first
               step - 1), from the task logs and from the progress.json watcher, the larger of the two
  recover_s    seconds from the fault to the start of the affected task's next run (SLURM's Start time)
  done_s       seconds from the fault to the whole study complete
  recovered    every pair and the compare job done, each DONE.json's checksums valid, no partial file under the
               results root (no *.tmp, no staging, partial or checkpoint folder left), at most the scenario's
               resubmits, the affected finetune resumed from a checkpoint (the expected one where it is known)
               and steps redone within the bound
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from jobs.config import load_config
from jobs.manifest import load_manifest
from jobs.monitor import collect
from jobs.state import DONE_MARKER, is_done
from jobs.study import Pair, StudyPaths, select_pairs
from tests.slurm_cluster import REPO, start_cluster, stop_cluster, wait_until

# A cluster of its own (state folder and ports), so the matrix never shares one with tests/test_slurm.py or with
# another engineer's run on the same machine.
STATE_DIR = os.environ.get("PRUNETUNE_TEST_SLURM_STATE_DIR", "/tmp/prunetune-slurm-faults")
PORT_BASE = os.environ.get("PRUNETUNE_TEST_SLURM_PORT_BASE", "20817")

CHECKPOINT_STEPS = 3
# 64 sequences per optimizer step (4 x 16 accumulation), as the demo: 0.4-3 s a step on the 2-core machines seen,
# long enough for the harness (polling every 0.2 s) to act between two steps; MAX_STEPS keeps a run short.
MAX_STEPS = 12
TUNE = [f"finetune.max_steps={MAX_STEPS}", f"finetune.checkpoint_steps={CHECKPOINT_STEPS}", "finetune.logging_steps=1",
        "finetune.eval_steps=1000", "finetune.warmup_steps=0", "finetune.max_requeues=3"]
EVALUATE = ["evaluate.limit=10", "evaluate.tasks=[boolq]", "evaluate.ppl_datasets=[wikitext2]",
            "evaluate.batch_size=16"]
RESOURCES = [f"resources.{stage}.{key}={value}" for stage in ("finetune", "evaluate", "compare")
             for key, value in (("cpus_per_task", 1), ("gpus_per_node", 0), ("mem_gb", 1), ("time_min", 15))]
POLL_S = 0.2
SETTLE_TIMEOUT_S = 600
STEP_LINE = re.compile(r": step (\d+)/(\d+) ")
RESUME_LINE = re.compile(r"resum(?:ed|ing) from \S*checkpoint-(\d+)")
# entry.py's "start finetune[0] Qwen/best_acc (pid 123, host vm)"
START_LINE = re.compile(r"start \S+ (\S+) \(pid (\d+), host (\S+)\)")


# ------------------------------------------------------------------------------------------- cluster


@contextlib.contextmanager
def fault_cluster(state_dir: str = STATE_DIR, port_base: str = PORT_BASE) -> Iterator[str]:
    """A running local SLURM for the matrix (SLURM_CONF exported to this process); stopped at the end."""
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = start_cluster(state_dir, port_base)
    try:
        yield os.environ["SLURM_CONF"]
    finally:
        stop_cluster(state_dir, port_base)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


def slurm(*command: str, check: bool = True) -> str:
    result = subprocess.run(list(command), capture_output=True, text=True, timeout=60)
    if check and result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed: {(result.stderr or result.stdout).strip()}")
    return result.stdout


def node_name() -> str:
    return slurm("sinfo", "-h", "-N", "-o", "%N").split()[0]


def queue_state(task: str) -> str | None:
    """squeue's state of one task (array element or plain job), None once it left the queue."""
    text = slurm("squeue", "-h", "-r", "-o", "%i %T", check=False)
    for line in text.splitlines():
        job, _, state = line.partition(" ")
        if job == task:
            return state.strip()
    return None


def sacct_runs(task: str) -> list[tuple[str, float | None, float | None]]:
    """Every run of one task as (state, start, end) in epoch seconds, requeued runs included (--duplicates).

    A task cancelled while pending has a record too, with Start = End = the cancel time but no node: not a run.
    """
    text = slurm("sacct", "-D", "-X", "-n", "-P", "--format=JobID,State,Start,End,NodeList", "-j", task,
                 check=False)
    runs = []
    for line in text.splitlines():
        job, state, start, end, nodes = line.split("|")
        if job == task and nodes not in ("", "None assigned"):
            runs.append((state.split()[0], _epoch(start), _epoch(end)))
    return runs


def _epoch(stamp: str) -> float | None:
    try:
        return datetime.datetime.fromisoformat(stamp).timestamp()
    except ValueError:  # Unknown / None: not started or not ended
        return None


# ------------------------------------------------------------------------------------------- inputs


def prepare_inputs(folder: Path) -> Path:
    """The demo's data, evaluation files and Qwen candidates, generated once for every scenario; the search file."""
    config = load_config(REPO / "configs" / "demo.yaml", [f"study.results_root={folder}", "study.models=[Qwen]"])
    from workers.demo_inputs import write_demo_search
    return write_demo_search(config)


# ------------------------------------------------------------------------------------------- one study


@dataclass
class Outcome:
    fault: str
    how: str
    recovered: bool = False
    attempts: int = 0
    resubmits: int = 0
    steps_redone: int | None = None
    bound: int | None = None
    recover_s: float | None = None
    done_s: float | None = None
    problems: list[str] = field(default_factory=list)


class FaultStudy:
    """One scenario's study: its own results root, submitted to the shared cluster through launch.py."""

    def __init__(self, root: Path, search: Path, configs: tuple[str, ...] = ("best_acc",),
                 overrides: tuple[str, ...] = (), parallelism: int = 2) -> None:
        inputs = search.parent
        self.root = root
        self.search = search
        self.overrides = [f"study.results_root={root}", "study.models=[Qwen]",
                          f"study.pruning_configs=[{', '.join(configs)}]",
                          f"data.train_path={inputs / 'alpaca_demo.json'}",
                          f"data.eval_data_dir={inputs / 'eval_data'}",
                          "executor.kind=slurm", f"executor.array_parallelism={parallelism}",
                          *TUNE, *EVALUATE, *RESOURCES, *overrides]
        self.config = load_config(REPO / "configs" / "demo.yaml", self.overrides)
        self.paths = StudyPaths(self.config)
        self.pairs = select_pairs(self.config)
        self.resubmits = 0
        self.log: list[str] = []  # what the harness did, with times, for a failed scenario's report
        self.lock = threading.Lock()
        self.seen: dict[Pair, list[tuple[int, int]]] = {pair: [] for pair in self.pairs}  # (pid, step) per write
        self.stop_watching = threading.Event()

    def override(self, *overrides: str) -> None:
        """More overrides, before anything is submitted: what a scenario measured first (a step count)."""
        self.overrides += overrides
        self.config = load_config(REPO / "configs" / "demo.yaml", self.overrides)
        self.paths = StudyPaths(self.config)
        self.pairs = select_pairs(self.config)

    # ---- driving the study ----------------------------------------------------------------------
    def note(self, text: str) -> None:
        self.log.append(f"{time.strftime('%H:%M:%S')} {text}")

    def launch(self, *args: str) -> str:
        result = subprocess.run([sys.executable, str(REPO / "launch.py"), *args, "--config-file", "configs/demo.yaml",
                                 *self.overrides], cwd=REPO, capture_output=True, text=True, timeout=300)
        self.note(f"launch.py {' '.join(args[:2])} -> {result.returncode}")
        if result.returncode:
            raise RuntimeError(f"launch.py {' '.join(args)} failed ({result.returncode}): {result.stderr[-2000:]}")
        return result.stdout

    def submit(self) -> None:
        self.launch("select", "--search", str(self.search))  # links the pruned models into this root
        self.launch("--batch-all", "--stage", "all")

    def resubmit(self) -> str:
        self.resubmits += 1
        return self.launch("resubmit")

    def tasks(self, pair: Pair, worker: str = "finetune") -> list[str]:
        """The SLURM task ids that ran ``worker`` for ``pair``, over every submission, oldest first."""
        found = []
        for attempt in load_manifest(self.root).attempts:
            for array in attempt.arrays:
                if array.worker == worker and pair.slug in array.pairs:
                    index = array.pairs.index(pair.slug)
                    found.append(array.job_id if len(array.pairs) == 1 else f"{array.job_id}_{index}")
        return found

    def task(self, pair: Pair, worker: str = "finetune") -> str:
        return self.tasks(pair, worker)[-1]

    def wait_queue_state(self, task: str, states: set[str], timeout: float = 300) -> str:
        def reached() -> str | None:
            state = queue_state(task) or "gone"
            return state if state in states else None
        return wait_until(reached, timeout, POLL_S, f"{task} to be {'/'.join(sorted(states))}")

    def settle(self, timeout: float = SETTLE_TIMEOUT_S):
        """Wait until no task of the study is queued or running; the monitor's rows."""
        manifest = load_manifest(self.root)

        def settled():
            rows, _ = collect(manifest, self.config)
            return None if any(row.active for row in rows) else rows
        return wait_until(settled, timeout, 2, f"{self.root.name}'s tasks to end")

    def states(self) -> dict[tuple[Pair | None, str], str]:
        """{(pair, stage): state} as ``launch.py status`` shows them."""
        return {(row.pair, row.stage): row.state for row in collect(load_manifest(self.root), self.config)[0]}

    def all_done(self) -> bool:
        rows, _ = collect(load_manifest(self.root), self.config)
        return all(row.done for row in rows)

    # ---- what the finetune is doing -------------------------------------------------------------
    def step(self, pair: Pair) -> int:
        """The last step the running finetune reported in progress.json (0 before its first)."""
        try:
            return int(json.loads((self.paths.finetuned_dir(pair) / "progress.json").read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def checkpoints(self, pair: Pair) -> list[int]:
        """Steps of the checkpoints whose COMPLETE.json lists files of the sizes on disk, oldest first (the worker
        also checks their hashes; sizes are enough to tell finished from half-written while polling)."""
        steps = []
        for marker in (self.paths.finetuned_dir(pair) / "checkpoints").glob("checkpoint-*/COMPLETE.json"):
            try:
                files = json.loads(marker.read_text())["files"]
                if all((marker.parent / name).stat().st_size == entry["bytes"] for name, entry in files.items()):
                    steps.append(int(marker.parent.name.rpartition("-")[2]))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return sorted(steps)

    def wait_mid_training(self, pair: Pair, checkpoints: int = 1, timeout: float = 300) -> tuple[int, int]:
        """Wait until ``checkpoints`` valid checkpoints exist and training went past the newest; (newest, step)."""
        def ready():
            steps = self.checkpoints(pair)
            step = self.step(pair)
            return len(steps) >= checkpoints and step > steps[-1] and (steps[-1], step)
        found = wait_until(ready, timeout, POLL_S, f"{pair.label}: {checkpoints} checkpoint(s) and a step past them")
        self.note(f"{pair.label}: checkpoints {self.checkpoints(pair)}, at step {found[1]}")
        return found

    def worker_pid(self, pair: Pair) -> int:
        """The pid of the running finetune, from its task log's "start <label> (pid N, host H)" line."""
        task = self.task(pair)
        text = self.task_log(task)
        pids = [int(match[2]) for match in START_LINE.finditer(text) if match[1] == pair.label]
        if not pids:
            raise RuntimeError(f"no start line for {pair.label} in the log of {task}")
        return pids[-1]

    def task_log(self, task: str) -> str:
        folder = self.paths.logs_dir() / "submitit" / task
        return "".join(path.read_text(errors="replace") for path in sorted(folder.glob(f"{task}_0_log.*")))

    # ---- measuring ------------------------------------------------------------------------------
    def runs(self, pair: Pair, worker: str = "finetune") -> list[tuple[str, float | None, float | None]]:
        return [run for task in self.tasks(pair, worker) for run in sacct_runs(task) if run[1] is not None]

    def steps_redone(self, pair: Pair) -> tuple[int, list[int]]:
        """(optimizer steps trained twice, the checkpoint steps runs said they resumed from).

        Two lower bounds, the larger wins: the task logs, exact but only of each task's newest run (SLURM truncates
        a requeued task's log), and what the watcher saw in progress.json while every run trained."""
        from_logs, resumed = [], []
        for task in self.tasks(pair):
            for run in self.task_log(task).split(f" {pair.label} (pid ")[1:]:  # entry.py's start line opens a run
                resume = [int(match[1]) for match in RESUME_LINE.finditer(run)]
                resumed += resume
                from_logs.append((resume[0] if resume else None,
                                  [int(match[1]) for match in STEP_LINE.finditer(run)]))
        with self.lock:
            seen = list(self.seen[pair])
        from_watch: list[tuple[int | None, list[int]]] = []
        for index, (pid, step) in enumerate(seen):
            if index == 0 or pid != seen[index - 1][0]:
                from_watch.append((None, []))
            from_watch[-1][1].append(step)
        return max(redone_of(from_logs), redone_of(from_watch)), resumed

    # ---- watching progress.json -----------------------------------------------------------------
    def watch(self) -> None:
        """Record every write of each pair's progress.json with the pid of the run that wrote it, until ``unwatch``."""
        threading.Thread(target=self._watch, name=f"watch-{self.root.name}", daemon=True).start()

    def unwatch(self) -> None:
        self.stop_watching.set()

    def _watch(self) -> None:
        stamps: dict[Pair, int] = {}
        while not self.stop_watching.wait(POLL_S):
            for pair in self.pairs:
                path = self.paths.finetuned_dir(pair) / "progress.json"
                try:
                    stamp = path.stat().st_mtime_ns
                    if stamps.get(pair) == stamp:
                        continue
                    stamps[pair] = stamp
                    step = int(json.loads(path.read_text())["step"])
                    pid = self.worker_pid(pair)
                except (OSError, ValueError, KeyError, TypeError, RuntimeError):
                    continue
                with self.lock:
                    self.seen[pair].append((pid, step))

    def leftovers(self) -> list[str]:
        """Partial results under the root: temporary files, staging/scratch/checkpoint folders, bad DONE markers."""
        problems = [f"temporary file {path}" for path in self.root.rglob("*.tmp")]
        for name in (".adapter_staging", ".trainer_scratch", "checkpoints", ".partial"):
            problems += [f"left-over folder {path}" for path in self.root.rglob(name) if path.is_dir()]
        for marker in self.root.rglob(DONE_MARKER):
            if not is_done(marker.parent, verify_checksums=True):
                problems.append(f"{marker} does not match its files")
        for pair in self.pairs:
            for folder in (self.paths.finetuned_dir(pair), self.paths.baseline_eval_dir(pair),
                           self.paths.finetuned_eval_dir(pair)):
                if not is_done(folder, verify_checksums=True):
                    problems.append(f"{folder} is not done")
        if not self.paths.study_summary().is_file():
            problems.append("no SUMMARY.md (the compare job did not finish)")
        return problems

    def cancel_everything(self) -> None:
        """After a failed scenario: nothing of it may keep running into the next one."""
        with contextlib.suppress(Exception):
            subprocess.run([sys.executable, str(REPO / "launch.py"), "cancel", f"study.results_root={self.root}"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)


def redone_of(runs: list[tuple[int | None, list[int]]]) -> int:
    """Steps trained twice over consecutive runs of one finetune, each (the step it resumed from, or None when
    unknown: its first logged step - 1; the steps it logged)."""
    redone, highest = 0, 0
    for index, (resume, steps) in enumerate(runs):
        if not steps:
            continue
        start = resume if resume is not None else steps[0] - 1
        if index:
            redone += max(0, highest - start)
        highest = max(highest, *steps)
    return redone


def measure(study: FaultStudy, outcome: Outcome, pair: Pair, fault_at: float, *, max_resubmits: int,
            bound: int | None, resumed_from: int | None = None, worker: str = "finetune") -> Outcome:
    """Settle the study, then fill ``outcome`` for ``pair``'s ``worker`` after a fault at ``fault_at`` (epoch s).

    A finetune with a bound must have resumed from a checkpoint (from ``resumed_from`` when given); bound 0 means
    the fault came before it trained (nothing to resume)."""
    must_resume = bool(bound)
    study.settle()
    done_at = time.time()
    runs = study.runs(pair, worker)
    outcome.attempts = len(runs)
    outcome.resubmits = study.resubmits
    later = [start for _, start, _ in runs if start is not None and start >= int(fault_at)]
    outcome.recover_s = round(later[0] - fault_at, 1) if later else None
    outcome.done_s = round(done_at - fault_at, 1)
    outcome.bound = bound
    problems = outcome.problems
    if worker == "finetune":
        redone, resumed = study.steps_redone(pair)
        outcome.steps_redone = redone
        if bound is not None and redone > bound:
            problems.append(f"{redone} steps redone, more than {bound}")
        if resumed_from is not None and resumed_from not in resumed:
            problems.append(f"expected a run resumed from checkpoint-{resumed_from}; runs resumed from {resumed}")
        if must_resume and not resumed:
            problems.append("no run resumed from a checkpoint")
    if study.resubmits > max_resubmits:
        problems.append(f"{study.resubmits} resubmits (at most {max_resubmits})")
    if not study.all_done():
        rows, _ = collect(load_manifest(study.root), study.config)
        problems.append("not complete: " + ", ".join(f"{row.pair.label if row.pair else 'study'} {row.stage} "
                                                     f"{row.state}" for row in rows if not row.done))
    problems += study.leftovers()
    outcome.recovered = not problems
    return outcome
