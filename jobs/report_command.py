"""``launch.py report``: the study report written again from the results tree, on the login node.

It runs the compare recipe itself (``workers.compare``, which needs matplotlib but never torch): every pair's
comparison, ``SUMMARY.md``, ``summary.csv`` and ``REPORT.md`` with its plots. No SLURM, no GPU.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from jobs.config import StudyConfig
from jobs.errors import InputError
from jobs.study import StudyPaths, select_pairs

log = logging.getLogger("prunetune")


def write_study_report(config: StudyConfig) -> int:
    """Write the report of every pair of the study; exit code 0 (missing pairs are listed, not an error)."""
    root = Path(config.study.results_root)
    if not root.is_dir():
        raise InputError(f"results root {root} does not exist; pass study.results_root=<root> (or the study's "
                         "--config-file) to point at a study's results")
    from workers import compare, report

    _, problem = report.load_reference(config.study.reference_results)
    if problem:
        raise InputError(problem)
    started = time.monotonic()
    pairs = select_pairs(config)
    written = compare.run(config, pairs)
    summary = StudyPaths(config).study_summary()
    counts = next((line for line in summary.read_text().splitlines() if line.startswith("Pairs compared:")), "")
    print(f"{counts} Wrote {written}, {summary}, {root / 'summary.csv'} and the plots in "
          f"{root / report.PLOTS_DIR} ({time.monotonic() - started:.1f}s).")
    return 0
