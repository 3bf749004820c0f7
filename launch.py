#!/usr/bin/env python3
"""PruneTune: LoRA-finetune, evaluate and compare a batch of pruned LLMs, on SLURM or on this machine.

    python launch.py demo                                   # the whole tiny study, locally (start here)
    python launch.py select --search prune_search.csv       # step 1: best_acc/best_ppl of each model
    python launch.py check                                  # step 2: validate the study, estimate its cost
    python launch.py --batch-all --stage all                # all 12 pairs: finetune, evaluate, compare
    python launch.py --model Llama --config best_acc --stage finetune      # one pair (an array of one)
    python launch.py --batch-all --stage all --dry-run finetune.learning_rate=2e-4
    python launch.py status [--watch]                       # one table: pair x stage, from one sacct call
    python launch.py resubmit [--indices 3,7] [--stage finetune|evaluate|all]   # only what failed
    python launch.py cancel [--indices 3,7]
    python launch.py report                                 # REPORT.md + plots, SUMMARY.md, summary.csv from the results tree
    python launch.py convert --model Llama --config best_ppl --allow-pickle   # an LLM-Pruner pickle -> safetensors, once

Overrides are dotted config keys (``section.key=value``) applied on top of --config-file.
"""
from __future__ import annotations

import argparse
import logging
import sys
import traceback

from jobs.errors import UserError
from jobs.plan import STAGES


def new_parser(prog: str, description: str, config_default: str = "configs/study.yaml",
               config_help: str = "study config (default: %(default)s)",
               overrides_help: str = "dotted config overrides", **kwargs) -> argparse.ArgumentParser:
    """A command's parser with what every command takes: overrides, --config-file and --debug."""
    parser = argparse.ArgumentParser(prog=prog, description=description, **kwargs)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    parser.add_argument("--config-file", default=config_default, help=config_help)
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return parser


def add_pair_selection(parser: argparse.ArgumentParser, required: bool, batch_help: str, stage_help: str) -> None:
    which = parser.add_mutually_exclusive_group(required=required)
    which.add_argument("--batch-all", action="store_true", help=batch_help)
    which.add_argument("--model", help="one model, e.g. Llama or Qwen-Instruct (needs --config)")
    parser.add_argument("--config", dest="pruning_config", help="the pruning config of that model: best_acc or best_ppl")
    parser.add_argument("--stage", choices=STAGES, default="all", help=stage_help)
    parser.add_argument("--executor", choices=("auto", "local", "slurm"), default=None,
                        help="auto (default): SLURM where sbatch is on PATH, else this machine")


def study_parser() -> argparse.ArgumentParser:
    parser = new_parser("launch.py", __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pair_selection(parser, True, "every (model, config) pair of the study", "what to run (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; run and submit nothing")
    return parser


def demo_parser() -> argparse.ArgumentParser:
    return new_parser("launch.py demo", "Generate tiny stand-in models and data, then run the whole 12-pair "
                      "study on them with the local executor. Re-running skips what is complete.",
                      config_default="configs/demo.yaml", config_help="default: %(default)s")


def select_parser() -> argparse.ArgumentParser:
    parser = new_parser(
        "launch.py select", "Step 1: read a pruning search (CSV, JSON lines, or a folder of "
        "per-candidate JSON files; columns model, candidate, acc, ppl, optional path, params, metrics_source), "
        "pick best_acc (highest acc) and best_ppl (lowest ppl) of each model, and materialise them in "
        "<results_root>/for_finetuning/<Model>/<config>/ with selection_info.json, plus for_finetuning/SUMMARY.md. "
        "Bad input writes nothing.")
    parser.add_argument("--search", required=True, help="the search results: a .csv, .jsonl file or a folder of .json")
    parser.add_argument("--mode", choices=("symlink", "copy"), default="symlink",
                        help="link each checkpoint file (default) or copy it (says how many GB first)")
    parser.add_argument("--dry-run", action="store_true", help="print the selection; write nothing")
    return parser


def report_parser() -> argparse.ArgumentParser:
    return new_parser(
        "launch.py report", "Write the study report again from the results tree, on this machine "
        "(no SLURM, no GPU, no torch): every pair's comparison_report.txt and comparison.json, SUMMARY.md, "
        "summary.csv and REPORT.md with its plots in <results_root>/report_plots/. Pairs without both evaluations "
        "are listed as missing.", overrides_help="dotted config overrides, e.g. study.reference_results=unpruned.json")


def convert_parser() -> argparse.ArgumentParser:
    parser = new_parser(
        "launch.py convert", "Convert an LLM-Pruner pickle (torch.save of a whole pruned model) once into "
        "converted/ beside it: model.safetensors, config.json, pruned_shapes.json (every layer's shape) and the "
        "tokenizer. Later runs prefer that folder and load it without unpickling anything, so they need no "
        "study.allow_pickle. The conversion itself unpickles the file, which runs code from it: it needs "
        "--allow-pickle or the pair in study.allow_pickle. Loads the whole model into CPU memory.")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="the pair's model, e.g. Llama (needs --config)")
    which.add_argument("--path", help="a pickle file, or a folder holding one (instead of --model/--config)")
    parser.add_argument("--config", dest="pruning_config", help="the pair's pruning config: best_acc or best_ppl")
    parser.add_argument("--allow-pickle", action="store_true", help="I trust this pickle: unpickle it to convert it")
    return parser


def check_parser() -> argparse.ArgumentParser:
    parser = new_parser(
        "launch.py check", "Step 2: validate the study on this (login) node without loading "
        "weights: checkpoints and their format, tokenizers, training and evaluation data, batch and DeepSpeed "
        "arithmetic, and with SLURM the partition's GPUs, CPUs, memory and time limit (sinfo, sbatch --test-only). "
        "Prints a checklist with the fix for each failure and the study's cost estimate (tokens, GPU-hours, "
        "time per task against the time limit). Exit code 2 when a check fails. Every submission runs the quick "
        "part of these checks by itself.")
    add_pair_selection(parser, False, "every pair of the study (the default)",
                       "what the submission would run (default: all)")
    return parser


def monitor_parser(command: str) -> argparse.ArgumentParser:
    descriptions = {
        "status": "Show every pair x stage of a submitted study: SLURM state, elapsed, exit code, node, log, "
                  "and step/loss/ETA of running finetunes. One sacct call per poll.",
        "resubmit": "Resubmit only the failed or incomplete pairs (FAILED, TIMEOUT, NODE_FAIL, OUT_OF_MEMORY, "
                    "CANCELLED, PREEMPTED, or COMPLETED without complete outputs) as new arrays, with their "
                    "evaluations and a new compare job. Complete pairs are never rerun. Overrides may change "
                    "resources.* and executor.* (e.g. more memory after OUT_OF_MEMORY), never the recipe.",
        "cancel": "Cancel the queued and running tasks of the study (or only those of --indices).",
    }
    parser = new_parser(f"launch.py {command}", descriptions[command], config_help="where the results root comes from",
                        overrides_help="dotted config overrides; study.results_root=<root> picks the study")
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


# Subcommands (the first argument); anything else is a study submission. The README's command reference is
# generated from these parsers (python -m jobs.reference).
COMMANDS = ("demo", "select", "check", "status", "resubmit", "cancel", "report", "convert")


def command_parser(command: str) -> argparse.ArgumentParser:
    """The parser of one subcommand, or of the study submission itself for ""."""
    factories = {"": study_parser, "demo": demo_parser, "select": select_parser, "check": check_parser,
                 "report": report_parser, "convert": convert_parser}
    return factories[command]() if command in factories else monitor_parser(command)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    debug = "--debug" in argv
    try:
        if argv[:1] == ["demo"]:
            from jobs.demo import run_demo
            args = demo_parser().parse_args(argv[1:])
            return run_demo(args.config_file, args.overrides)
        from jobs.config import load_config
        if argv[:1] == ["select"]:
            from jobs.select import select
            args = select_parser().parse_args(argv[1:])
            return select(load_config(args.config_file, args.overrides), args.search, args.mode, args.dry_run)
        if argv[:1] == ["report"]:
            from jobs.report_command import write_study_report
            args = report_parser().parse_args(argv[1:])
            return write_study_report(load_config(args.config_file, args.overrides))
        if argv[:1] == ["convert"]:
            from jobs.commands import pickle_to_convert
            args = convert_parser().parse_args(argv[1:])
            kind, source = pickle_to_convert(load_config(args.config_file, args.overrides), args.model,
                                             args.pruning_config, args.path, args.allow_pickle)
            if kind == "converted":
                print(f"already converted: {source} (delete it to convert again)")
                return 0
            from workers.convert import convert_pickle  # torch: only this command loads it on the login node
            print(f"converted {source} -> {convert_pickle(source)}; later runs load it without unpickling")
            return 0
        if argv[:1] == ["check"]:
            from jobs.check import check_study
            from jobs.study import select_pairs
            args = check_parser().parse_args(argv[1:])
            overrides = list(args.overrides) + ([f"executor.kind={args.executor}"] if args.executor else [])
            config = load_config(args.config_file, overrides)
            pairs = select_pairs(config, args.model, args.pruning_config)
            return check_study(config, pairs, args.stage, config.executor.kind)
        if argv[:1] and argv[0] in ("status", "resubmit", "cancel"):
            from jobs import monitor
            args = monitor_parser(argv[0]).parse_args(argv[1:])
            root = load_config(args.config_file, args.overrides).study.results_root
            if argv[0] == "status":
                return monitor.status(root, watch=args.watch)
            if argv[0] == "resubmit":
                return monitor.resubmit(root, args.indices, args.stage, args.dry_run, list(args.overrides))
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
