"""`launch.py demo`: the whole path of a real study on tiny stand-ins, with the local executor.

1. write a small pruning search (3 candidates per model, synthetic ACC/PPL) and the data;
2. ``select`` best_acc and best_ppl per model (symlinks into ``<results_root>/for_finetuning``);
3. ``check`` the study (checklist and cost estimate);
4. finetune, evaluate and compare, as ``launch.py --batch-all --stage all`` does.
"""
from __future__ import annotations

import logging
import time

from jobs.check import check_study
from jobs.commands import run_study
from jobs.config import load_config
from jobs.select import select
from jobs.study import select_pairs

log = logging.getLogger("prunetune")


def run_demo(config_file: str, overrides: list[str]) -> int:
    config = load_config(config_file, [*overrides, "executor.kind=local"])
    started = time.monotonic()
    # Imported here: generating models needs torch, which the rest of the launcher never loads.
    from workers.demo_inputs import write_demo_search
    search = write_demo_search(config)
    log.info("demo inputs ready in %.1fs", time.monotonic() - started)
    select(config, search, mode="symlink")
    pairs = select_pairs(config)
    code = check_study(config, pairs, "all", "local")
    if code:
        return code
    code = run_study(config, pairs, "all", "local", dry_run=False)
    log.info("demo finished in %.1fs (exit code %d)", time.monotonic() - started, code)
    return code
