#!/usr/bin/env python3
"""PruneTune: LoRA-finetune, evaluate and compare a batch of pruned LLMs, on SLURM or on this machine.

    python launch.py demo                                   # the whole tiny study, locally (start here)
    python launch.py --batch-all --stage all                # all 12 pairs: finetune, evaluate, compare
    python launch.py --model Llama --config best_acc --stage finetune      # one pair (an array of one)
    python launch.py --batch-all --stage all --dry-run finetune.learning_rate=2e-4
    python launch.py status [--watch]                       # one table: pair x stage, from one sacct call
    python launch.py resubmit [--indices 3,7] [--stage finetune|evaluate|all]   # only what failed
    python launch.py cancel [--indices 3,7]

Overrides are dotted config keys (``section.key=value``) applied on top of --config-file.
"""
from __future__ import annotations

import argparse
import logging
import sys
import traceback

from jobs.errors import UserError
from jobs.plan import STAGES


def study_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--batch-all", action="store_true", help="every (model, config) pair of the study")
    which.add_argument("--model", help="one model, e.g. Llama or Qwen-Instruct (needs --config)")
    parser.add_argument("--config", dest="pruning_config", help="the pruning config of that model: best_acc or best_ppl")
    parser.add_argument("--stage", choices=STAGES, default="all", help="what to run (default: all)")
    add_common(parser)
    return parser


def demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch.py demo", description="Generate tiny stand-in models and data, then run the whole 12-pair "
        "study on them with the local executor. Re-running skips what is complete.")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    parser.add_argument("--config-file", default="configs/demo.yaml", help="default: %(default)s")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return parser


def monitor_parser(command: str) -> argparse.ArgumentParser:
    descriptions = {
        "status": "Show every pair x stage of a submitted study: SLURM state, elapsed, exit code, node, log, "
                  "and step/loss/ETA of running finetunes. One sacct call per poll.",
        "resubmit": "Resubmit only the failed or incomplete pairs (FAILED, TIMEOUT, NODE_FAIL, OUT_OF_MEMORY, "
                    "CANCELLED, PREEMPTED, or COMPLETED without complete outputs) as new arrays, with their "
                    "evaluations and a new compare job. Complete pairs are never rerun.",
        "cancel": "Cancel the queued and running tasks of the study (or only those of --indices).",
    }
    parser = argparse.ArgumentParser(prog=f"launch.py {command}", description=descriptions[command])
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides; study.results_root=<root> picks the study")
    parser.add_argument("--config-file", default="configs/study.yaml", help="where the results root comes from")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    if command == "status":
        parser.add_argument("--watch", action="store_true", help="poll until nothing is queued or running "
                            "(every 30 s at most, backing off to 5 min)")
    if command in ("resubmit", "cancel"):
        parser.add_argument("--indices", type=parse_indices, default=None,
                            help="pair indices as shown by status, e.g. 3,7 or 0-5 (default: every failed one)")
    if command == "resubmit":
        parser.add_argument("--stage", choices=("finetune", "evaluate", "all"), default="all",
                            help="which failures count (default: all)")
        parser.add_argument("--dry-run", action="store_true", help="print what would be resubmitted")
    return parser


def parse_indices(text: str) -> list[int]:
    try:
        from jobs.slurm import expand_ranges
        return expand_ranges(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected indices like 3,7 or 0-5") from None


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    parser.add_argument("--config-file", default="configs/study.yaml", help="study config (default: %(default)s)")
    parser.add_argument("--executor", choices=("auto", "local", "slurm"), default=None,
                        help="auto (default): SLURM where sbatch is on PATH, else this machine")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; run and submit nothing")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    debug = "--debug" in argv
    try:
        if argv[:1] == ["demo"]:
            from jobs.demo import run_demo
            args = demo_parser().parse_args(argv[1:])
            return run_demo(args.config_file, args.overrides)
        from jobs.config import load_config
        if argv[:1] and argv[0] in ("status", "resubmit", "cancel"):
            from jobs import monitor
            args = monitor_parser(argv[0]).parse_args(argv[1:])
            root = load_config(args.config_file, args.overrides).study.results_root
            if argv[0] == "status":
                return monitor.status(root, watch=args.watch)
            if argv[0] == "resubmit":
                return monitor.resubmit(root, args.indices, args.stage, args.dry_run)
            return monitor.cancel(root, args.indices)
        args = study_parser().parse_args(argv)
        from jobs.commands import run_study
        from jobs.study import select_pairs
        overrides = list(args.overrides) + ([f"executor.kind={args.executor}"] if args.executor else [])
        config = load_config(args.config_file, overrides)
        pairs = select_pairs(config, args.model, args.pruning_config)
        return run_study(config, pairs, args.stage, config.executor.kind, args.dry_run)
    except UserError as error:
        if debug:
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
