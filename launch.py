#!/usr/bin/env python3
"""PruneTune: LoRA-finetune, evaluate and compare a batch of pruned LLMs, on SLURM or on this machine.

    python launch.py demo                                   # the whole tiny study, locally (start here)
    python launch.py --batch-all --stage all                # all 12 pairs: finetune, evaluate, compare
    python launch.py --model Llama --config best_acc --stage finetune      # one pair (an array of one)
    python launch.py --batch-all --stage all --dry-run finetune.learning_rate=2e-4

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
        args = study_parser().parse_args(argv)
        from jobs.commands import run_study
        from jobs.config import load_config
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
