"""What each launch.py command does, on top of config, plan and executor."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from jobs.checkpoints import find_checkpoint
from jobs.config import StudyConfig
from jobs.errors import InputError
from jobs.executor import SUCCEEDED, LocalRunner, resolve_kind
from jobs.plan import Plan, build_plan, describe
from jobs.study import Pair, StudyPaths, pickle_allowed

log = logging.getLogger("prunetune")

# The local copies of the evaluation datasets, in their real schemas (README: "Evaluation data").
EVAL_DATA_FILES = {
    "wikitext2": "wikitext2/test.jsonl",
    "ptb": "ptb/validation.jsonl",
    "boolq": "boolq/validation.jsonl",
    "piqa": "piqa/validation.jsonl",
    "hellaswag": "hellaswag/validation.jsonl",
    "winogrande": "winogrande/validation.jsonl",
    "arc_easy": "arc_easy/test.jsonl",
    "arc_challenge": "arc_challenge/test.jsonl",
    "openbookqa": "openbookqa/test.jsonl",
}


def check_inputs(config: StudyConfig, plan: Plan) -> None:
    """Fail with one line before anything runs when an input the plan needs is missing or unusable."""
    paths = StudyPaths(config)
    workers = {array.worker for array in plan.arrays}
    model_pairs = {pair for array in plan.arrays if array.worker != "compare" for pair in array.pairs}
    for pair in sorted(model_pairs):
        kind, location = find_checkpoint(paths.pruned_model(pair))
        if kind == "pickle" and not pickle_allowed(config, pair):
            raise InputError(f"{location} ({pair.label}) is a pickled checkpoint, and loading a pickle runs code "
                             f"from it; if you trust it, add study.allow_pickle=[{pair.label}] (or list the model)")
    if "finetune" in workers and not Path(config.data.train_path).is_file():
        raise InputError(f"training data {config.data.train_path} does not exist; set data.train_path to an "
                         "alpaca-format JSON/JSONL file (instruction, input, output)")
    if workers & {"evaluate_pruned", "evaluate_finetuned"}:
        wanted = [*config.evaluate.ppl_datasets, *config.evaluate.tasks]
        root = Path(config.data.eval_data_dir)
        missing = [f"{name} ({root / EVAL_DATA_FILES[name]})" for name in wanted
                   if not (root / EVAL_DATA_FILES[name]).is_file()]
        if missing:
            raise InputError(f"evaluation data missing offline: {', '.join(missing)}; put the files there in the "
                             "datasets' real schemas (README: Evaluation data) or set data.eval_data_dir")


def check_results_root(config: StudyConfig) -> None:
    root = Path(config.study.results_root)
    existing = next((parent for parent in (root, *root.parents) if parent.exists()), Path("."))
    if not os.access(existing, os.W_OK):
        raise InputError(f"results root {root} is not writable ({existing} denies writing); "
                         "set study.results_root to a folder you can write")


def run_study(config: StudyConfig, pairs: list[Pair], stage: str, executor: str, dry_run: bool) -> int:
    """Plan, check, then run locally or submit to SLURM. Returns the process exit code."""
    plan = build_plan(config, pairs, stage)
    kind = resolve_kind(executor)
    check_inputs(config, plan)
    check_results_root(config)
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
