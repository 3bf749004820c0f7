"""The baseline cache key: evaluate each pruned model once, reuse the result until something that matters changes.

The baseline (pre-finetune) evaluation of a pruned model lives beside the model and is shared by every study
that points at it. It is reused only when its ``DONE.json`` records the same key as the current study computes:

    key = sha256({"evaluation": evaluation digest, "model": {file: sha256 of its content}})
    evaluation digest = sha256({"settings": what changes the numbers, "data": {file: sha256}})

*What changes the numbers* (``evaluation_settings``): the perplexity knobs (datasets, seq_len, BOS), the tasks,
``limit``, ``num_fewshot``, ``precision`` (as configured: ``auto`` is resolved on the compute node), lm-eval's
wikitext on/off, where the data comes from, and ``RECIPE_VERSION``, bumped when PruneTune's evaluation code
changes what it measures. Batch sizes are left out: they change speed, not the numbers (up to float rounding).
The lm-eval version is left out too: the login node cannot know which lm-eval the compute environment has.
The workers record it with the results, and the compare job refuses to compare a pair whose two evaluations
used different lm-eval or task versions or evaluation digests.

*Content hashes without reading tens of GB on the login node*: a full SHA-256 of every model and data file is
computed once, on the compute node (reading the files costs about what loading the model does), and recorded in
the marker with each file's size and mtime. The plan (login node) only stats the files: a file whose size and
mtime match the record reuses the recorded hash; any other file (changed, or merely copied or touched) makes the
plan schedule the evaluation again, and the worker, which hashes, either finds the same key and skips in seconds
(refreshing the record) or evaluates. So a content change is never missed, and a harmless touch costs one quick
task. Sampling only the first and last MB of each file would be cheaper but misses re-pruned weights of the same
shapes, whose bytes differ only in the middle of the file.

Pure file-system code: no torch, runs on the login node (``jobs/plan.py``) and in the worker
(``workers/evaluate.py``), which both call ``baseline_key``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.checkpoints import find_checkpoint
from jobs.config import StudyConfig
from jobs.errors import InputError
from jobs.eval_data import EVAL_DATASETS, location, wanted_datasets
from jobs.state import DONE_MARKER, is_done, sha256_of
from jobs.study import Pair, StudyPaths

RECIPE_VERSION = 1
CACHE_FIELD = "cache"  # the key's entry in a baseline's DONE.json
EVALUATION_FIELD = "evaluation"  # a finetuned evaluation's DONE.json: its evaluation digest and data files
# Files in a checkpoint folder that say something about the model but do not change what it computes.
NOT_MODEL_FILES = ("selection_info.json",)


@dataclass(frozen=True)
class EvaluationIdentity:
    """What an evaluation measured with: settings, data file hashes, and their digest."""

    settings: dict[str, Any]
    files: dict[str, dict[str, Any]]  # "data/<dataset>/<file>" -> {bytes, mtime_ns, sha256}
    digest: str


@dataclass(frozen=True)
class CacheKey:
    key: str
    evaluation: EvaluationIdentity
    files: dict[str, dict[str, Any]]  # model and data files -> {bytes, mtime_ns, sha256}

    def as_record(self) -> dict[str, Any]:
        return {"key": self.key, "evaluation_digest": self.evaluation.digest,
                "settings": self.evaluation.settings, "files": self.files}


def evaluation_settings(config: StudyConfig) -> dict[str, Any]:
    """The evaluation settings that change the numbers (see the module docstring for what is left out)."""
    settings = config.evaluate
    return {"recipe_version": RECIPE_VERSION, "ppl_datasets": list(settings.ppl_datasets),
            "ppl_seq_len": settings.ppl_seq_len, "ppl_add_bos": settings.ppl_add_bos, "tasks": list(settings.tasks),
            "limit": settings.limit, "num_fewshot": 0, "precision": settings.precision,
            "lm_eval_wikitext": settings.lm_eval_wikitext, "eval_source": config.data.eval_source}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _files_under(folder: Path) -> list[Path]:
    """Regular files below ``folder`` (links followed), hidden entries and lock files left out, sorted."""
    return sorted(path for path in folder.rglob("*") if path.is_file() and not path.name.endswith(".lock")
                  and not any(part.startswith(".") for part in path.relative_to(folder).parts))


def model_files(config: StudyConfig, pair: Pair) -> dict[str, Path]:
    """The files that make up the pair's checkpoint: "model/<name>" -> path."""
    kind, where = find_checkpoint(StudyPaths(config).pruned_model(pair))
    if kind == "pickle":
        return {f"model/{where.name}": where}
    return {f"model/{path.relative_to(where)}": path for path in _files_under(where)
            if path.relative_to(where).parts[0] not in ("baseline_evaluation", *NOT_MODEL_FILES)}


def data_files(config: StudyConfig) -> dict[str, Path]:
    """The files each evaluation dataset is read from: "data/<dataset>/<name>" -> path (missing ones left out)."""
    files: dict[str, Path] = {}
    for name in wanted_datasets(config.evaluate):
        dataset = EVAL_DATASETS[name]
        where = location(config.data, dataset)
        if where.is_file():
            files[f"data/{name}/{where.name}"] = where
            continue
        if not where.is_dir():
            continue
        # A mirrored repo holds every config; only the evaluated one (and the README that declares it) counts.
        if config.data.eval_source == "hub_mirror" and dataset.hub_config and (where / dataset.hub_config).is_dir():
            chosen = _files_under(where / dataset.hub_config) + [path for path in [where / "README.md"] if path.is_file()]
        else:
            chosen = _files_under(where)
        files.update({f"data/{name}/{path.relative_to(where)}": path for path in chosen})
    return files


def fingerprint(files: dict[str, Path], recorded: dict[str, Any] | None, hash_files: bool
                ) -> dict[str, dict[str, Any]] | None:
    """{name: {bytes, mtime_ns, sha256}}; a file whose size and mtime match ``recorded`` reuses its hash.

    Any other file is hashed when ``hash_files``; without it (login node) the answer is None: unknown.
    """
    recorded = recorded or {}
    result = {}
    for name, path in sorted(files.items()):
        stat = path.stat()
        entry = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        previous = recorded.get(name) or {}
        if previous.get("bytes") == entry["bytes"] and previous.get("mtime_ns") == entry["mtime_ns"] \
                and previous.get("sha256"):
            entry["sha256"] = previous["sha256"]
        elif hash_files:
            entry["sha256"] = sha256_of(path)
        else:
            return None
        result[name] = entry
    return result


def evaluation_identity(config: StudyConfig, recorded_files: dict[str, Any] | None = None,
                        hash_files: bool = True) -> EvaluationIdentity | None:
    """Settings plus data hashes; None when ``hash_files`` is off and a data file's hash is not on record."""
    files = fingerprint(data_files(config), recorded_files, hash_files)
    if files is None:
        return None
    settings = evaluation_settings(config)
    digest = _digest({"settings": settings, "data": {name: entry["sha256"] for name, entry in files.items()}})
    return EvaluationIdentity(settings, files, digest)


def baseline_key(config: StudyConfig, pair: Pair, recorded: dict[str, Any] | None = None,
                 hash_files: bool = True) -> CacheKey | None:
    """The cache key of the pair's baseline evaluation under ``config`` (None: unknown without hashing).

    ``recorded`` is the ``cache`` record of an earlier marker; its hashes are reused for unchanged files.
    """
    files_on_record = (recorded or {}).get("files")
    evaluation = evaluation_identity(config, files_on_record, hash_files)
    model = fingerprint(model_files(config, pair), files_on_record, hash_files)
    if evaluation is None or model is None:
        return None
    key = _digest({"evaluation": evaluation.digest, "model": {name: entry["sha256"] for name, entry in model.items()}})
    return CacheKey(key, evaluation, {**model, **evaluation.files})


def recorded_cache(folder: Path) -> dict[str, Any] | None:
    """The cache record in ``folder``'s DONE marker, or None (no marker, or one written before keys existed)."""
    try:
        record = json.loads((folder / DONE_MARKER).read_text()).get(CACHE_FIELD)
    except (OSError, ValueError, AttributeError):
        return None
    return record if isinstance(record, dict) and record.get("key") else None


def baseline_is_current(config: StudyConfig, pair: Pair) -> bool:
    """True when the pair's baseline evaluation is complete and its key matches ``config`` (stat only, fast)."""
    folder = StudyPaths(config).baseline_eval_dir(pair)
    recorded = recorded_cache(folder) if is_done(folder) else None
    if recorded is None:
        return False
    try:
        current = baseline_key(config, pair, recorded, hash_files=False)
    except (InputError, OSError):  # the checkpoint is gone or unreadable: the plan's checks report it
        return False
    return current is not None and current.key == recorded["key"]


def evaluation_is_current(config: StudyConfig, folder: Path) -> bool:
    """True when ``folder`` holds a complete evaluation made with ``config``'s evaluation digest (stat only).

    For a finetuned evaluation, whose plan check today is only ``is_done``: a changed setting leaves it
    complete but stale, and the compare job then reports the pair as evaluated differently before and after.
    """
    if not is_done(folder):
        return False
    try:
        marker = json.loads((folder / DONE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    record = marker.get(EVALUATION_FIELD) or marker.get(CACHE_FIELD) or {}
    digest = record.get("digest") or record.get("evaluation_digest")
    current = evaluation_identity(config, record.get("files"), hash_files=False)
    return bool(digest) and current is not None and current.digest == digest
