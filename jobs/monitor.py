"""status, resubmit and cancel for a study submitted to SLURM (read from its manifest).

One poll is one sacct call for every array of the study (``--duplicates``: every run of a task SLURM
requeued, e.g. after a NODE_FAIL; the newest run is the task's state). What counts as finished comes from the
results tree (done markers), not from SLURM alone: a COMPLETED task whose outputs are missing is
shown as "incomplete" and resubmitted like a failure.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from jobs import slurm
from jobs.config import StudyConfig, settings_of, with_overrides
from jobs.errors import InputError
from jobs.manifest import Manifest, load_manifest
from jobs.plan import build_plan, describe
from jobs.state import is_done
from jobs.study import Pair, StudyPaths, select_pairs

log = logging.getLogger("prunetune")

PAIR_STAGES = ("finetune", "evaluate_pruned", "evaluate_finetuned")
MIN_WATCH_INTERVAL_S = 30.0


@dataclass(frozen=True)
class Row:
    index: int  # the pair's place in the study (stable across attempts; what --indices takes)
    pair: Pair | None  # None for the study-level compare job
    stage: str
    state: str  # SLURM state, or done / incomplete / not submitted
    done: bool
    active: bool
    task: str = ""
    attempt: int = 0
    elapsed: str = ""
    exit_code: str = ""
    nodes: str = ""
    log: str = ""
    progress: str = ""
    restarts: int = 0  # runs of this task before the newest that SLURM requeued (same task id, same attempt)
    requeued_after: str = ""  # how the run before the newest ended (NODE_FAIL, PREEMPTED, REQUEUED, ...)

    @property
    def state_text(self) -> str:
        """The state, plus how SLURM requeued the task when it did: ``PENDING (requeued after NODE_FAIL)``."""
        if not self.restarts:
            return self.state
        cause = "" if self.requeued_after == "REQUEUED" else f" after {self.requeued_after}"
        if self.active:
            return f"{self.state} (requeued{cause})"
        return f"{self.state} ({self.restarts} requeue{'s' if self.restarts > 1 else ''})"


def output_dir(paths: StudyPaths, pair: Pair, stage: str) -> Path:
    return {"finetune": paths.finetuned_dir, "evaluate_pruned": paths.baseline_eval_dir,
            "evaluate_finetuned": paths.finetuned_eval_dir}[stage](pair)


def collect(manifest: Manifest, config: StudyConfig) -> tuple[list[Row], str]:
    """Every pair x stage of the study with its newest task's state; one sacct call."""
    paths = StudyPaths(config)
    latest = manifest.latest_tasks()
    states, source = slurm.query_states(manifest.job_ids())
    seen_jobs = {job for job, _ in states}
    rows = []
    pairs = select_pairs(config)
    targets = [(index, pair, stage) for index, pair in enumerate(pairs) for stage in PAIR_STAGES]
    targets.append((len(pairs), None, "compare"))
    for index, pair, stage in targets:
        done = is_done(output_dir(paths, pair, stage)) if pair else paths.study_summary().is_file()
        entry = latest.get((pair.slug if pair else "study", stage))
        if entry is None:
            rows.append(Row(index, pair, stage, "done" if done else "not submitted", done, False))
            continue
        array, task_index, attempt = entry
        task = states.get((array.job_id, task_index))
        meta = states.get((array.job_id, None))
        if task is None and meta is not None and meta.state in slurm.ACTIVE_STATES:
            # For about a second after submission sacct knows only the array's own record ("123|PENDING"), not
            # its tasks, although they may be running already; that is not a cancelled task.
            task = meta
        if task is None:
            # A pending array task cancelled (by scancel or a failed dependency) leaves no record.
            # Neither sacct nor squeue knows it: it is not queued or running, and only a task cancelled
            # while pending leaves no accounting record. Without sacct (squeue fallback) we cannot tell.
            state = "CANCELLED" if array.job_id in seen_jobs or source.startswith("sacct") else "UNKNOWN"
            task = slurm.TaskState(state)
        state = task.state
        if state == "COMPLETED" and not done:
            state = "incomplete"
        progress = read_progress(paths, pair) if pair and stage == "finetune" and state == "RUNNING" else ""
        rows.append(Row(index, pair, stage, state, done, task.state in slurm.ACTIVE_STATES,
                        slurm.task_id(array.job_id, task_index), attempt, task.elapsed, task.exit_code, task.nodes,
                        str(slurm.log_path(config, array.job_id, task_index)), progress, task.restarts,
                        task.requeued_after))
    return rows, source


def read_progress(paths: StudyPaths, pair: Pair) -> str:
    """step/total, last loss and ETA from the small file the finetune worker rewrites as it trains."""
    try:
        data = json.loads((paths.finetuned_dir(pair) / "progress.json").read_text())
    except (OSError, ValueError):
        return ""
    eta = data.get("eta_s")
    eta_text = f" eta {int(eta) // 60}m{int(eta) % 60:02d}s" if isinstance(eta, (int, float)) else ""
    loss = data.get("loss")
    loss_text = f" loss {loss:.4f}" if isinstance(loss, (int, float)) else ""
    return f"step {data.get('step')}/{data.get('total')}{loss_text}{eta_text}"


def render(rows: list[Row], source: str) -> str:
    # A multi-node task's node list (sacct's compressed form, e.g. gpu[03-04,07]) can be long: widen, never cut.
    width = max([10, *(len(row.nodes) for row in rows)])
    state_width = max([14, *(len(row.state_text) for row in rows)])
    header = f"{'#':>3} {'pair':<28} {'stage':<19} {'state':<{state_width}} {'task':<12} {'try':>3} {'elapsed':>10} " \
             f"{'exit':<5} {'nodes':<{width}} progress / log"
    lines = [header, "-" * len(header)]
    for row in rows:
        label = row.pair.label if row.pair else "(study)"
        detail = row.progress or (row.log if row.task else "")
        lines.append(f"{row.index:>3} {label:<28} {row.stage:<19} {row.state_text:<{state_width}} {row.task:<12} "
                     f"{row.attempt or '':>3} {row.elapsed:>10} {row.exit_code:<5} {row.nodes:<{width}} {detail}")
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.state] = counts.get(row.state, 0) + 1
    lines.append("states: " + ", ".join(f"{state} {count}" for state, count in sorted(counts.items()))
                 + f" (from {source})")
    return "\n".join(lines)


def status(results_root: str, watch: bool = False, interval: float = MIN_WATCH_INTERVAL_S) -> int:
    manifest = load_manifest(results_root)
    config = manifest.study_config()
    interval = max(interval, MIN_WATCH_INTERVAL_S)
    while True:
        rows, source = collect(manifest, config)
        print(render(rows, source), flush=True)
        if not watch or not any(row.active for row in rows):
            return 0
        # Back off: a long study needs no 30 s polling hours in; the scheduler thanks you.
        time.sleep(interval)
        interval = min(interval * 1.5, 300.0)


def needs_rerun(row: Row) -> bool:
    return not row.done and not row.active and row.state != "not submitted" or row.state == "incomplete"


# What a resubmission may change: where and how its tasks run, never what they compute, so that every pair of a
# study keeps the recipe it was submitted with.
RESUBMIT_OVERRIDABLE = ("resources.", "executor.")


def resubmit(results_root: str, indices: list[int] | None, stage: str, dry_run: bool = False,
             overrides: list[str] | None = None) -> int:
    manifest = load_manifest(results_root)
    config = manifest.study_config()
    changes = [item for item in overrides or () if not item.startswith("study.results_root=")]
    if changes:  # the submission's own overrides may be repeated; only resources and executor may differ
        updated = with_overrides(config, changes, "resubmit overrides")
        before, after = settings_of(config), settings_of(updated)
        refused = sorted(key for key in after if after[key] != before[key] and not key.startswith(RESUBMIT_OVERRIDABLE))
        if refused:
            raise InputError(f"resubmit: {', '.join(f'{key}={after[key]!r}' for key in refused)} differs from the "
                             "submitted study; a resubmission may change only resources.* and executor.* (e.g. "
                             "resources.finetune.mem_gb=128 after OUT_OF_MEMORY), so start a new study (another "
                             "study.results_root) to change the recipe")
        changes = [key for key in after if after[key] != before[key]]
        config = updated
    pairs = select_pairs(config)
    if indices:
        bad = [index for index in indices if not 0 <= index < len(pairs)]
        if bad:
            raise InputError(f"--indices {','.join(map(str, bad))}: out of range; this study has indices "
                             f"0-{len(pairs) - 1} (see `launch.py status`)")
    rows, _ = collect(manifest, config)
    stages = {"finetune": {"finetune"}, "evaluate": {"evaluate_pruned", "evaluate_finetuned"},
              "all": set(PAIR_STAGES)}[stage]
    by_pair: dict[int, list[Row]] = {}
    for row in rows:
        if row.pair is not None:
            by_pair.setdefault(row.index, []).append(row)
    if indices:
        chosen = sorted(set(indices))
    else:
        chosen = [index for index, pair_rows in by_pair.items()
                  if any(needs_rerun(row) for row in pair_rows if row.stage in stages)]
    # A task SLURM requeued is queued again under its own id: resubmitting it would make a second writer. sacct's
    # newest record says so once accounting has the new run; the controller (one squeue) knows at once.
    queued = slurm.queued_tasks(manifest.job_ids())
    # Dependents of failed tasks that SLURM left waiting forever (clusters without kill_invalid_depend): cancelled
    # below, so they do not keep their pair busy.
    stuck = [task for task, (state, reason) in queued.items()
             if state == "PENDING" and "DependencyNeverSatisfied" in reason]
    busy = [index for index in chosen
            if any((row.active or row.task in queued) and row.task not in stuck for row in by_pair[index])]
    if busy:
        log.warning("not resubmitting pairs still queued or running: %s", ", ".join(map(str, busy)))
    chosen = [index for index in chosen if index not in busy]
    if not chosen:
        print("nothing to resubmit: every pair is complete, queued or running")
        return 0
    if stuck and not dry_run:
        slurm.cancel(stuck)
        log.info("cancelled %d task(s) whose dependency can never be satisfied: %s", len(stuck), " ".join(stuck))
    plan = build_plan(config, [pairs[index] for index in chosen], "all", report_pairs=pairs)
    print(f"resubmitting indices {','.join(map(str, chosen))}:\n{describe(plan)}", flush=True)
    submitted = slurm.submit_plan(config, plan, dry_run=dry_run)
    if not dry_run:
        reason = f"resubmit of indices {','.join(map(str, chosen))} ({stage})"
        manifest.add_attempt(submitted, reason + (f" with new {', '.join(changes)}" if changes else ""))
        if changes:  # later status and resubmissions use the resources that were last asked for
            manifest.config = dataclasses.asdict(config)
        manifest.save()
    for array in submitted:
        print(f"{array.name}: job {array.job_id} ({len(array.pairs) or 1} task(s))")
    return 0


def cancel(results_root: str, indices: list[int] | None) -> int:
    manifest = load_manifest(results_root)
    config = manifest.study_config()
    rows, _ = collect(manifest, config)
    if indices:
        valid = {row.index for row in rows}
        bad = [index for index in indices if index not in valid]
        if bad:
            raise InputError(f"--indices {','.join(map(str, bad))}: out of range (see `launch.py status`)")
    targets = [row.task for row in rows if row.active and (not indices or row.index in indices)]
    slurm.cancel(sorted(set(targets)))
    print(f"cancelled {len(set(targets))} task(s)" + (f": {' '.join(sorted(set(targets)))}" if targets else ""))
    return 0

