"""Resumable finetunes: checkpoints that are never half-read, and a clean stop on SLURM's warning signal.

A finetune that dies (crash, ``kill -9``, node failure, preemption, time limit) must restart from its last
good checkpoint, not from step 0, and must never resume from a checkpoint that was still being written.

- The Trainer writes ``checkpoint-<step>/`` (adapter, optimizer, scheduler, RNG states of every rank, trainer
  state with the data position) every ``finetune.checkpoint_minutes`` (or ``finetune.checkpoint_steps``).
  Time, not steps, is the default: a save costs about 0.6 s for the 6.7B shape on one H200 under ZeRO-2
  (7 s before ``workers/lora_trainer.py`` stopped copying the whole model to CPU), and a step 0.3-0.6 s, so a
  fixed step interval is either costly on fast cards or loses much work on slow ones. The Trainer writes the
  folder in place, so ``CheckpointMarker`` completes it afterwards with ``COMPLETE.json`` (every file's size
  and sha256, written atomically, after all ranks have written their part). A folder without a valid
  marker — killed mid-write, truncated, edited — is never resumed from (``latest_valid_checkpoint``).
- ``StopOnSignal`` turns SLURM's warning signal (USR2 — submitit's choice, because NCCL uses USR1; sent
  ``executor.signal_delay_s`` before the time limit, or by a preempting scheduler) into "save at the end of
  this optimizer step and stop". Saving inside the signal handler could catch the optimizer half-way
  through a step, and on several ranks each would stop at a different step; instead the handler only sets a
  flag, and ranks agree at each step end (one tiny all-reduce) so all stop at the same step (on GPUs the
  step after the signal: the agreement is read one step late, so that it never makes the CPU wait for the GPU).
  After the save, the previous handler (submitit's) requeues the job, bounded by ``finetune.max_requeues``.
- The lines of ``training_log.txt`` travel inside each checkpoint, so a resumed run's log is whole.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import TrainerCallback

from jobs.state import atomic_write_json, sha256_of

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"  # under the pair's finetuned folder
MARKER = "COMPLETE.json"
LOG_LINES = "training_log_lines.json"  # our log so far, restored on resume
_STEP = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_steps(folder: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint folder under ``folder``, newest first."""
    if not folder.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in folder.iterdir()
             if path.is_dir() and (match := _STEP.match(path.name))]
    return sorted(found, reverse=True)


def marker_problem(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from, or None when its marker vouches for every file."""
    marker = checkpoint / MARKER
    try:
        recorded = json.loads(marker.read_text())["files"]
    except FileNotFoundError:
        return "no COMPLETE.json (written only after every file is saved: the save did not finish)"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"unreadable {MARKER} ({error})"
    for name, expected in recorded.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {expected['bytes']} were written"
        if sha256_of(path) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def latest_valid_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint whose marker checks out; older or broken ones are reported and skipped."""
    for step, path in checkpoint_steps(folder):
        problem = marker_problem(path)
        if problem is None:
            return path
        log.warning("not resuming from %s: %s", path, problem)
    return None


def discard_unusable(folder: Path, keep: Path | None) -> None:
    """Delete checkpoints that cannot be resumed from or are newer than ``keep`` (rank 0, before training), so
    the Trainer's rotation never counts a broken folder as one of the checkpoints it keeps."""
    keep_step = step_of(keep) if keep else -1
    for step, path in checkpoint_steps(folder):
        if step > keep_step or (step < keep_step and marker_problem(path) is not None):
            log.warning("removing unusable checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)


# How a run survives, not what it trains: changing these between attempts keeps the checkpoints.
OPERATIONAL_SETTINGS = ("checkpoint_steps", "checkpoint_minutes", "keep_checkpoints", "max_requeues", "compile")


def recipe_key(settings: Any, world_size: int, model_path: Path, train_path: str, packed: bool) -> str:
    """What a checkpoint must have been trained with to be resumed: the same recipe, data, model and ranks
    (a ZeRO optimizer state is sharded per rank, and a changed recipe would silently mix two runs)."""
    recipe = {key: value for key, value in dataclasses.asdict(settings).items() if key not in OPERATIONAL_SETTINGS}
    text = json.dumps([recipe, world_size, str(model_path), str(train_path), packed], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def choose_resume(folder: Path, key: str) -> Path | None:
    """Rank 0, before training: the checkpoint to resume from (None: start fresh), after removing the ones
    that can never be resumed from."""
    resume = latest_valid_checkpoint(folder)
    if resume is not None and read_log_lines(resume).get("key") != key:
        log.warning("%s was written with other settings, data, model or rank count; starting fresh", resume)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    discard_unusable(folder, resume)
    return resume


def step_of(checkpoint: Path | None) -> int:
    return int(_STEP.match(checkpoint.name).group(1)) if checkpoint else 0


def write_marker(checkpoint: Path) -> None:
    files = {}
    for path in sorted(checkpoint.rglob("*")):
        if path.is_file() and path.name != MARKER:
            files[str(path.relative_to(checkpoint))] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    atomic_write_json(checkpoint / MARKER, {"files": files})


def read_log_lines(checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads((checkpoint / LOG_LINES).read_text())
    except (OSError, ValueError):
        return {}


class CheckpointMarker(TrainerCallback):
    """After every Trainer save: the log so far, then ``COMPLETE.json`` once all ranks have written."""

    def __init__(self, folder: Path, is_main: bool, log_state: Callable[[], dict[str, Any]]) -> None:
        self.folder = folder
        self.is_main = is_main
        self.log_state = log_state  # the LogLines callback's lines and losses, saved with each checkpoint

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        checkpoint = self.folder / f"checkpoint-{state.global_step}"
        _barrier()  # every rank's optimizer shard and RNG state is on disk before the marker vouches for them
        if self.is_main and checkpoint.is_dir():
            atomic_write_json(checkpoint / LOG_LINES, self.log_state())
            write_marker(checkpoint)
            log.info("checkpoint %s saved", checkpoint.name)
        _barrier()


class StopOnSignal(TrainerCallback):
    """Save and stop at the end of the optimizer step during which a signal arrived (on GPUs, of the step after:
    see ``AcrossRanks``): SLURM's warning signal (then hand it to submitit, which requeues) or SIGTERM
    (``scancel``, a requeue from outside, a node being drained: submitit would ignore it until SIGKILL comes,
    KillWait later, so the steps since the last checkpoint would be lost). Also save when ``every_minutes``
    have passed since the last save (rank 0's clock decides, so ranks agree)."""

    def __init__(self, every_minutes: float = 0.0) -> None:
        self.signal_number = _preemption_signal()
        self.received = False  # the warning signal: stop, save and requeue
        self.terminated = False  # SIGTERM: stop and save; the scheduler decides what happens next
        self.previous: dict[int, Any] = {}
        self.every_s = every_minutes * 60
        self.last_save = time.monotonic()
        self.across_ranks = AcrossRanks()

    def install(self) -> "StopOnSignal":
        self.previous[self.signal_number] = signal.signal(self.signal_number, self._note)
        self.previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._note)
        return self

    def uninstall(self) -> None:
        for number, handler in self.previous.items():
            if handler is not None:
                signal.signal(number, handler)
        self.previous = {}

    def _note(self, signum: int, frame: Any) -> None:
        # Acted on at the next step end; see the module docstring for why not here.
        if signum == self.signal_number:
            self.received = True
        else:
            self.terminated = True

    @property
    def stopped(self) -> bool:
        return self.received or self.terminated

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        due = bool(self.every_s) and time.monotonic() - self.last_save >= self.every_s and _rank() == 0
        # One small all-reduce per optimizer step, so every rank stops (or saves) at the same step.
        warned, terminated, due = self.across_ranks.exchange(self.received, self.terminated, due)
        self.received, self.terminated = warned, terminated
        if due or warned or terminated:
            control.should_save = True
        if warned or terminated:
            control.should_training_stop = True
            name = signal.Signals(self.signal_number if warned else signal.SIGTERM).name
            log.warning("%s: saving a checkpoint at step %d and stopping", name, state.global_step)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.last_save = time.monotonic()

    def hand_over(self) -> None:
        """Give the warning signal to the handler that was there before us: under submitit, it requeues the job
        (rank 0) and exits; elsewhere (local executor) the task just fails and a rerun resumes."""
        previous = self.previous.get(self.signal_number)
        self.uninstall()
        if callable(previous):
            previous(self.signal_number, None)


def _preemption_signal() -> int:
    # submitit reads the same variable, so both agree on which signal means "preempted or timing out".
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal, f"SIG{name}", signal.SIGUSR2)


class AcrossRanks:
    """Flags that are true when they are true on any rank: one tiny all-reduce per optimizer step.

    Over NCCL (GPUs) each call returns the answer to the previous call (``one_step_late``): reading it at once
    would make the CPU wait for the GPU at every step end, leaving the GPU idle while the next step is
    launched. Every rank gets the same reduced values at the same call, so all ranks still act at the same
    step, one step after the flag was raised. Over gloo (CPU), and in one process without a group, the
    answer comes at once.
    """

    def __init__(self, one_step_late: bool | None = None) -> None:
        self.one_step_late = one_step_late  # None: over NCCL only
        self.pending: tuple[torch.Tensor, Any] | None = None  # the last call's answer, on its way to the CPU

    def exchange(self, *flags: bool) -> tuple[bool, ...]:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return flags
        on_gpu = torch.distributed.get_backend() == "nccl"
        answer = _reduce_max(flags, on_gpu)
        if not (on_gpu if self.one_step_late is None else self.one_step_late):
            return _read(answer)
        previous, self.pending = self.pending, answer
        return _read(previous) if previous else tuple(False for _ in flags)


def _reduce_max(flags: tuple[bool, ...], on_gpu: bool) -> tuple[torch.Tensor, Any]:
    """Start the all-reduce; the answer lands in CPU memory, with an event that says when (None: already there)."""
    values = torch.tensor([1.0 if flag else 0.0 for flag in flags])
    if not on_gpu:
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
        return values, None
    # pinned memory and non-blocking copies both ways: a pageable copy would wait for the GPU
    on_device = values.pin_memory().to("cuda", non_blocking=True)
    torch.distributed.all_reduce(on_device, op=torch.distributed.ReduceOp.MAX)
    answer = torch.empty(len(flags), pin_memory=True)
    answer.copy_(on_device, non_blocking=True)
    arrived = torch.cuda.Event()
    arrived.record()
    return answer, arrived


def _read(answer: tuple[torch.Tensor, Any]) -> tuple[bool, ...]:
    values, arrived = answer
    if arrived is not None:
        arrived.synchronize()  # one step late, done long ago unless the CPU runs over a step ahead of the GPU
    return tuple(bool(value) for value in values.tolist())


def _rank() -> int:
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_rank() if initialized else 0


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
