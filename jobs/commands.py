"""What each launch.py command does, on top of config, plan and executor."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from jobs.check import require_ready
from jobs.checkpoints import convert_command, find_checkpoint
from jobs.config import StudyConfig
from jobs.errors import InputError
from jobs.executor import SUCCEEDED, LocalRunner, resolve_kind
from jobs.plan import Plan, build_plan, describe
from jobs.study import Pair, StudyPaths, pickle_allowed, select_pairs

log = logging.getLogger("prunetune")


def run_study(config: StudyConfig, pairs: list[Pair], stage: str, executor: str, dry_run: bool) -> int:
    """Plan, check, then run locally or submit to SLURM. Returns the process exit code."""
    plan = build_plan(config, pairs, stage)
    kind = resolve_kind(executor)
    require_ready(config, plan, kind, dry_run)  # the quick part of `launch.py check`; one line and exit 2 on failure
    print(f"plan ({kind} executor, results in {config.study.results_root}):\n{describe(plan)}", flush=True)
    if not plan.arrays or (dry_run and kind == "local"):
        return 0
    if kind == "slurm":
        return submit_study(config, plan, dry_run)
    outcomes = LocalRunner(config, config.executor.local_workers).run(plan)
    failed = [outcome for outcome in outcomes if outcome.state != SUCCEEDED]
    summary = StudyPaths(config).study_summary()
    if summary.is_file() and any(array.worker == "compare" for array in plan.arrays):
        print("\n" + summary.read_text())
    if failed:
        print(f"{len(failed)} of {len(outcomes)} task(s) did not complete:")
        for outcome in failed:
            print(f"  {outcome.state:<9} {outcome.spec.label}: {outcome.error}")
        print("fix the cause and run the same command again: completed pairs are skipped")
        return 1
    print(f"all {len(outcomes)} task(s) completed")
    return 0


def submit_study(config: StudyConfig, plan: Plan, dry_run: bool) -> int:
    """Submit the plan to SLURM and record it in the study's manifest (or render it, for a dry run)."""
    from jobs import slurm
    from jobs.manifest import load_manifest, new_manifest

    started = time.monotonic()
    submitted = slurm.submit_plan(config, plan, dry_run=dry_run)
    if dry_run:
        for array in submitted:
            print(f"{array.name}: would submit {array.sbatch_file}")
        return 0
    manifest_path = Path(config.study.results_root) / "manifest.json"
    manifest = load_manifest(config.study.results_root) if manifest_path.is_file() else new_manifest(config)
    manifest.config = new_manifest(config).config  # the newest submission's settings rule from now on
    manifest.add_attempt(submitted, "submit")
    manifest.save()
    for array in submitted:
        after = f" after {','.join(array.depends_on)}" if array.depends_on else ""
        print(f"{array.name}: job {array.job_id} ({len(array.pairs) or 1} task(s)){after}")
    print(f"submitted in {time.monotonic() - started:.1f}s; manifest {manifest.path}; "
          f"watch with: python launch.py status study.results_root={config.study.results_root}")
    return 0


def pickle_to_convert(config: StudyConfig, model: str | None, pruning_config: str | None, path: str | None,
                      allow_pickle: bool) -> tuple[str, Path]:
    """("pickle", the file ``launch.py convert`` may unpickle: found and opted in), or ("converted", its folder)
    when that is done already; bad input is one line and exit code 2."""
    if path is None:
        pair = select_pairs(config, model, pruning_config)[0]
        kind, location = find_checkpoint(StudyPaths(config).pruned_model(pair))
        label, trusted = pair.label, allow_pickle or pickle_allowed(config, pair)
    else:
        if pruning_config is not None:
            raise InputError("--config goes with --model, not with --path; pass one of them")
        kind, location = find_checkpoint(Path(path))
        label, trusted = "", allow_pickle
    if kind == "converted":
        return kind, location
    if kind != "pickle":
        raise InputError(f"{location} is a Hugging Face folder, not a pickle; it needs no conversion")
    if not trusted:
        raise InputError(f"converting {location} unpickles it, which runs code from it; if you trust it, run "
                         f"{convert_command(label, location)}")
    return kind, location
