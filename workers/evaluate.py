"""Evaluate one pair: the pruned model itself ("pruned") or the pruned model + its LoRA adapter ("finetuned").

Setup → perplexity (``workers.perplexity``: wikitext2, ptb the LLM-Pruner way) → zero-shot
(``workers.zero_shot``: lm-eval's built-in tasks on local data) → save → done marker.

Writes into ``baseline_eval_dir(pair)`` (pruned) or ``finetuned_eval_dir(pair)`` (finetuned):
    ppl_results.json         {"wikitext2": {ppl, nll_mean, n_windows, ...}, "ptb": {...}, "settings": {...}}
    evaluation_results.json  {"tasks": {task: {metric, value, acc, acc_norm, *_stderr, ...}}, "average", ...}
    DONE.json                both files' sizes and checksums
The adapter is applied unmerged (``PeftModel.from_pretrained``): what is measured is exactly what was trained.
Skips at once when the output folder is already done. Raises ``InputError`` for a missing model, adapter or
evaluation file (checked before the model is loaded).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from jobs.config import StudyConfig
from jobs.errors import InputError
from jobs.state import atomic_write_json, is_done, mark_done
from jobs.study import Pair, StudyPaths, pickle_allowed
from workers.modelio import load_pruned_model, resolve_dtype
from workers.perplexity import dataset_perplexity, load_ppl_texts
from workers.zero_shot import check_zero_shot_data, evaluate_zero_shot

log = logging.getLogger(__name__)

TARGETS = ("pruned", "finetuned")
PPL_FILE = "ppl_results.json"
EVAL_FILE = "evaluation_results.json"


def run(config: StudyConfig, pair: Pair, target: str) -> None:
    """Evaluate ``pair`` as ``target`` ("pruned" or "finetuned") and write its results folder."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    paths = StudyPaths(config)
    settings = config.evaluate
    output_dir = paths.baseline_eval_dir(pair) if target == "pruned" else paths.finetuned_eval_dir(pair)
    if is_done(output_dir):
        log.info("%s %s: already evaluated in %s, skipping", pair.label, target, output_dir)
        return
    adapter_dir = paths.finetuned_dir(pair) if target == "finetuned" else None
    if adapter_dir is not None and not (is_done(adapter_dir) and (adapter_dir / "adapter_config.json").is_file()):
        raise InputError(f"{pair.label}: no finished LoRA adapter in {adapter_dir}; run the finetune stage for "
                         "this pair first")
    eval_data_dir = Path(config.data.eval_data_dir)
    for dataset in settings.ppl_datasets:
        load_ppl_texts(eval_data_dir, dataset)  # fail on a missing file now, not after loading the model
    check_zero_shot_data(eval_data_dir, settings.tasks)

    started = time.monotonic()
    model_path = paths.pruned_model(pair)
    dtype = resolve_dtype(settings.precision)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_pruned_model(model_path, pickle_allowed(config, pair), dtype)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.to(device).eval()
    log.info("%s %s: evaluating %s%s on %s (%s)", pair.label, target, model_path,
             f" + adapter {adapter_dir}" if adapter_dir else "", device, str(dtype).removeprefix("torch."))
    about = {"pair": pair.label, "target": target, "model_path": str(model_path),
             "adapter_path": str(adapter_dir) if adapter_dir else None, "device": str(device),
             "dtype": str(dtype).removeprefix("torch.")}

    ppl_started = time.monotonic()
    ppl: dict[str, Any] = {}
    for dataset in settings.ppl_datasets:
        dataset_started = time.monotonic()
        ppl[dataset] = dataset_perplexity(model, tokenizer, eval_data_dir, dataset, settings.ppl_seq_len,
                                          settings.ppl_batch_size, settings.ppl_add_bos, device)
        log.info("%s %s: %s ppl %.3f (%d windows of %d, %.1fs)", pair.label, target, dataset, ppl[dataset]["ppl"],
                 ppl[dataset]["n_windows"], settings.ppl_seq_len, time.monotonic() - dataset_started)
    ppl["settings"] = {"method": "LLM-Pruner PPLMetric: joined with \\n\\n, tokenized once, non-overlapping "
                                 "windows, tail dropped, exp(mean token NLL)",
                       "datasets": list(settings.ppl_datasets), "seq_len": settings.ppl_seq_len,
                       "batch_size": settings.ppl_batch_size, "add_bos": settings.ppl_add_bos,
                       **about, "wall_time_s": round(time.monotonic() - ppl_started, 3)}
    atomic_write_json(output_dir / PPL_FILE, ppl)

    zero_shot = evaluate_zero_shot(model, tokenizer, eval_data_dir, settings.tasks, settings.batch_size,
                                   settings.limit)
    for task, entry in zero_shot["tasks"].items():
        log.info("%s %s: %s %s %.4f (%s docs)", pair.label, target, task, entry["metric"], entry["value"],
                 entry["n_samples"])
    log.info("%s %s: zero-shot average %.4f over %d tasks (%.1fs)", pair.label, target, zero_shot["average"],
             len(zero_shot["tasks"]), zero_shot["wall_time_s"])
    task_versions = {task: entry["version"] for task, entry in zero_shot["tasks"].items()}
    atomic_write_json(output_dir / EVAL_FILE, {**zero_shot, "task_versions": task_versions, **about})

    wall_time = round(time.monotonic() - started, 3)
    mark_done(output_dir, [PPL_FILE, EVAL_FILE], extra={"wall_time_s": wall_time, **about})
    log.info("%s %s: wrote %s in %.1fs", pair.label, target, output_dir, wall_time)
