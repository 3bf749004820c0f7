"""`launch.py demo`: make the tiny stand-in study, then run it end to end with the local executor."""
from __future__ import annotations

import logging
import time

from jobs.commands import run_study
from jobs.config import load_config
from jobs.study import select_pairs

log = logging.getLogger("prunetune")


def run_demo(config_file: str, overrides: list[str]) -> int:
    config = load_config(config_file, [*overrides, "executor.kind=local"])
    started = time.monotonic()
    # Imported here: generating models needs torch, which the rest of the launcher never loads.
    from workers.demo_inputs import generate_demo_inputs
    generate_demo_inputs(config)
    log.info("demo inputs ready in %.1fs", time.monotonic() - started)
    code = run_study(config, select_pairs(config), "all", "local", dry_run=False)
    log.info("demo finished in %.1fs (exit code %d)", time.monotonic() - started, code)
    return code
