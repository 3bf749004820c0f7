"""Evaluate one pair: the pruned model itself ("pruned") or the pruned model + its LoRA adapter ("finetuned").

Setup → cache check (pruned: ``jobs.cache``) → perplexity (``workers.perplexity``: wikitext2, ptb the LLM-Pruner
way; optionally lm-eval's own ``wikitext``) → zero-shot (``workers.zero_shot``: lm-eval's built-in tasks) →
save → done marker. Each perplexity and each zero-shot task is kept in ``.partial/`` as soon as it is computed,
so a requeued or rerun evaluation redoes only what was not finished.

Writes into ``baseline_eval_dir(pair)`` (pruned) or ``finetuned_eval_dir(pair)`` (finetuned):
    ppl_results.json         {"wikitext2": {ppl, nll_mean, n_windows, ...}, "ptb": {...}, "settings": {...},
                              "lm_eval_wikitext": {word_perplexity, byte_perplexity, ...} when asked for}
    evaluation_results.json  {"tasks": {task: {metric, value, acc, acc_norm, *_stderr, ...}}, "average", ...}
    DONE.json                both files' sizes and checksums, the evaluation digest, and (pruned) the cache key
The adapter is applied through peft, unmerged by default (what is measured is exactly what was trained);
``evaluate.merge_adapter`` merges it into the weights first (same numbers within float rounding, faster).
The baseline is skipped when its DONE marker holds the current cache key (model files + evaluation settings);
with any other key it is evaluated again. Raises ``InputError`` for a missing model, adapter or dataset (checked
before the model is loaded, in milliseconds).
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from jobs.cache import (CACHE_FIELD, EVALUATION_FIELD, baseline_key, evaluation_identity, evaluation_is_current,
                         recorded_cache)
from jobs.config import StudyConfig
from jobs.errors import InputError
from jobs.eval_data import require_eval_data, wanted_datasets
from jobs.state import DONE_MARKER, atomic_write_json, clear_done, is_done, mark_done, read_json
from jobs.study import Pair, StudyPaths, pickle_allowed
from workers.modelio import load_pruned_model, resolve_dtype
from workers.perplexity import METHOD, dataset_perplexity
from workers.zero_shot import check_zero_shot_data, evaluate_lm_eval_wikitext, evaluate_zero_shot

log = logging.getLogger(__name__)

TARGETS = ("pruned", "finetuned")
PPL_FILE = "ppl_results.json"
EVAL_FILE = "evaluation_results.json"
PARTIAL_DIR = ".partial"


def run(config: StudyConfig, pair: Pair, target: str) -> None:
    """Evaluate ``pair`` as ``target`` ("pruned" or "finetuned") and write its results folder."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    paths = StudyPaths(config)
    settings = config.evaluate
    output_dir = paths.baseline_eval_dir(pair) if target == "pruned" else paths.finetuned_eval_dir(pair)
    adapter_dir = paths.finetuned_dir(pair) if target == "finetuned" else None
    if adapter_dir is None and _baseline_cached(config, pair):
        return
    if adapter_dir is not None and is_done(output_dir):
        if evaluation_is_current(config, output_dir):
            log.info("%s %s: already evaluated in %s, skipping", pair.label, target, output_dir)
            return
        log.info("%s %s: the evaluation in %s used other settings; evaluating again", pair.label, target, output_dir)
        clear_done(output_dir)
    if adapter_dir is not None and not (is_done(adapter_dir) and (adapter_dir / "adapter_config.json").is_file()):
        raise InputError(f"{pair.label}: no finished LoRA adapter in {adapter_dir}; run the finetune stage for "
                         "this pair first")
    require_eval_data(config.data, wanted_datasets(settings))  # every source, in ms, before the model loads
    check_zero_shot_data(config.data, settings.tasks)

    started = time.monotonic()
    cache = baseline_key(config, pair) if adapter_dir is None else None
    identity = cache.evaluation if cache else evaluation_identity(config)
    files = cache.files if cache else identity.files
    log.info("%s %s: hashed %d model and data file(s), %.2f GB, in %.1fs (cache key %s)", pair.label, target,
             len(files), sum(entry["bytes"] for entry in files.values()) / 1e9, time.monotonic() - started,
             cache.key[:12] if cache else "-")
    model_path = paths.pruned_model(pair)
    dtype = resolve_dtype(settings.precision)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_pruned_model(model_path, pickle_allowed(config, pair), dtype)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
        if settings.merge_adapter:
            model = model.merge_and_unload()
    model.to(device).eval()
    log.info("%s %s: evaluating %s%s on %s (%s)", pair.label, target, model_path,
             f" + adapter {adapter_dir} ({'merged' if settings.merge_adapter else 'unmerged, through peft'})"
             if adapter_dir else "", device, str(dtype).removeprefix("torch."))
    about = {"pair": pair.label, "target": target, "model_path": str(model_path),
             "adapter_path": str(adapter_dir) if adapter_dir else None,
             "adapter_merged": settings.merge_adapter if adapter_dir else None, "device": str(device),
             "dtype": str(dtype).removeprefix("torch."), "evaluation_digest": identity.digest}

    partial = PartialResults(output_dir / PARTIAL_DIR, identity.digest)
    ppl_started = time.monotonic()
    ppl: dict[str, Any] = {}
    for dataset in settings.ppl_datasets:
        dataset_started = time.monotonic()
        ppl[dataset] = partial.get_or_compute(f"ppl-{dataset}", lambda: dataset_perplexity(
            model, tokenizer, config.data, dataset, settings.ppl_seq_len, settings.ppl_batch_size,
            settings.ppl_add_bos, device))
        log.info("%s %s: %s ppl %.3f (%d windows of %d, %.1fs)", pair.label, target, dataset, ppl[dataset]["ppl"],
                 ppl[dataset]["n_windows"], settings.ppl_seq_len, time.monotonic() - dataset_started)
    if settings.lm_eval_wikitext:
        ppl["lm_eval_wikitext"] = partial.get_or_compute("lm_eval_wikitext", lambda: evaluate_lm_eval_wikitext(
            model, tokenizer, config.data, settings.batch_size, settings.limit, settings.backend))
        log.info("%s %s: lm-eval wikitext word perplexity %.3f, byte perplexity %.4f (a different quantity from "
                 "the token perplexity above)", pair.label, target, ppl["lm_eval_wikitext"]["word_perplexity"],
                 ppl["lm_eval_wikitext"]["byte_perplexity"])
    ppl["settings"] = {"method": METHOD, "datasets": list(settings.ppl_datasets), "seq_len": settings.ppl_seq_len,
                       "batch_size": settings.ppl_batch_size, "add_bos": settings.ppl_add_bos,
                       "joiner": "\\n\\n", "tail": "dropped", "lm_eval_wikitext": settings.lm_eval_wikitext,
                       "eval_source": config.data.eval_source, **about,
                       "wall_time_s": round(time.monotonic() - ppl_started, 3)}
    atomic_write_json(output_dir / PPL_FILE, ppl)

    zero_shot = zero_shot_by_task(partial, model, tokenizer, config, pair, target)
    log.info("%s %s: zero-shot average %.4f over %d tasks (%.1fs)", pair.label, target, zero_shot["average"],
             len(zero_shot["tasks"]), zero_shot["wall_time_s"])
    task_versions = {task: entry["version"] for task, entry in zero_shot["tasks"].items()}
    atomic_write_json(output_dir / EVAL_FILE, {**zero_shot, "task_versions": task_versions, **about,
                                               "evaluation_settings": identity.settings})

    wall_time = round(time.monotonic() - started, 3)
    extra: dict[str, Any] = {"wall_time_s": wall_time, **about, "lm_eval_version": zero_shot["lm_eval_version"],
                             "task_versions": task_versions}
    if cache is not None:
        extra[CACHE_FIELD] = cache.as_record()
    else:
        extra[EVALUATION_FIELD] = {"digest": identity.digest, "settings": identity.settings, "files": identity.files}
    mark_done(output_dir, [PPL_FILE, EVAL_FILE], extra=extra)
    partial.discard()
    log.info("%s %s: wrote %s in %.1fs", pair.label, target, output_dir, wall_time)


def zero_shot_by_task(partial: PartialResults, model: Any, tokenizer: Any, config: StudyConfig, pair: Pair,
                      target: str) -> dict[str, Any]:
    """The zero-shot tasks one at a time, each kept as soon as it is scored, merged as one lm-eval run reports."""
    settings = config.evaluate
    runs = {}
    for task in settings.tasks:
        runs[task] = partial.get_or_compute(f"task-{task}", lambda: evaluate_zero_shot(
            model, tokenizer, config.data, (task,), settings.batch_size, settings.limit, settings.backend))
        entry = runs[task]["tasks"][task]
        log.info("%s %s: %s %s %.4f (%s docs)", pair.label, target, task, entry["metric"], entry["value"],
                 entry["n_samples"])
    merged = {**runs[settings.tasks[-1]], "tasks": {task: runs[task]["tasks"][task] for task in settings.tasks},
              "average_over": list(settings.tasks),
              "wall_time_s": round(sum(run["wall_time_s"] for run in runs.values()), 3)}
    merged["average"] = sum(entry["value"] for entry in merged["tasks"].values()) / len(merged["tasks"])
    return merged


class PartialResults:
    """Each perplexity and each zero-shot task's result, kept (atomically) as soon as it exists, so a crash or
    requeue during HellaSwag does not redo BoolQ. A part made with other settings or another model (the
    evaluation digest differs) is recomputed. Removed once the results are marked done."""

    def __init__(self, folder: Path, digest: str) -> None:
        self.folder, self.digest = folder, digest

    def get_or_compute(self, name: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        path = self.folder / f"{name}.json"
        try:
            saved = json.loads(path.read_text())
            if saved.get("digest") == self.digest:
                log.info("%s: kept from an earlier attempt (%s)", name, path)
                return saved["result"]
        except (OSError, ValueError, AttributeError):
            pass  # none yet, or unreadable: compute it
        result = compute()
        atomic_write_json(path, {"digest": self.digest, "result": result})
        return result

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _baseline_cached(config: StudyConfig, pair: Pair) -> bool:
    """True (and the marker refreshed) when the baseline on disk was made with the current cache key.

    A complete baseline with another key (changed model files or settings) is cleared, to be evaluated again.
    """
    folder = StudyPaths(config).baseline_eval_dir(pair)
    if not is_done(folder):
        return False
    recorded = recorded_cache(folder)
    started = time.monotonic()
    current = baseline_key(config, pair, recorded)  # hashes only the files whose size or mtime changed
    if recorded is not None and current.key == recorded["key"]:
        if current.files != recorded.get("files"):  # copied or touched, same content: let the plan see it again
            marker = read_json(folder / DONE_MARKER)
            kept = {key: value for key, value in marker.items() if key != "files"}
            mark_done(folder, list(marker["files"]), extra={**kept, CACHE_FIELD: current.as_record()})
        log.info("%s pruned: cached baseline in %s matches key %s (checked in %.1fs), skipping", pair.label, folder,
                 current.key[:12], time.monotonic() - started)
        return True
    why = "was written before cache keys" if recorded is None else \
        "used other settings or data" if recorded.get("evaluation_digest") != current.evaluation.digest else \
        "was made from other model files"
    log.info("%s pruned: the baseline in %s %s; evaluating again", pair.label, folder, why)
    clear_done(folder)
    return False
