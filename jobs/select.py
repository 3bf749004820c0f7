"""Step 1 of a study: pick ``best_acc`` and ``best_ppl`` of each model from a pruning parameter search.

    python launch.py select --search prune_search.csv                 # link the winners (default)
    python launch.py select --search prune_log/ --mode copy           # copy them instead (says how much)

The search holds one row per pruned candidate (README: "Step 1: select"):

    model            one of the study's models, e.g. Llama or Qwen-Instruct
    candidate        the candidate's id; also its checkpoint path when ``path`` is absent
    path             optional: the checkpoint (Hugging Face folder or LLM-Pruner pickle), relative to the
                     file the row came from
    acc              average zero-shot accuracy, a fraction in [0, 1]
    ppl              perplexity (lower is better); ``inf`` is allowed for a diverged candidate
    params           optional: the pruning parameters (JSON rows: an object; CSV: every other column)
    metrics_source   optional: how acc and ppl were obtained; carried into selection_info.json and SUMMARY.md

as CSV (header row), JSON lines (one object per line; a JSON list works too) or a folder of per-candidate
JSON files (``*.json``, one object each). For each model, ``best_acc`` is the highest ``acc`` (ties: lower
``ppl``, then the smaller candidate id) and ``best_ppl`` the lowest ``ppl`` (ties: higher ``acc``, then the
smaller candidate id). Each winner is materialised in ``<results_root>/for_finetuning/<Model>/<config>/``
as per-file symlinks (``--mode symlink``, the default) or a copy (``--mode copy``), with
``selection_info.json``; ``for_finetuning/SUMMARY.md`` tabulates the selections.

Everything is validated before anything is written: bad input is one ``InputError`` line and no file.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.checkpoints import find_checkpoint
from jobs.config import MODEL_NAMES, StudyConfig, did_you_mean
from jobs.errors import InputError
from jobs.json_rows import json_rows
from jobs.state import atomic_write_json, atomic_write_text, sha256_of
from jobs.study import Pair, StudyPaths

log = logging.getLogger("prunetune")

REQUIRED_COLUMNS = ("model", "candidate", "acc", "ppl")
OPTIONAL_COLUMNS = ("path", "params", "metrics_source")
MODES = ("symlink", "copy")
# Written into a selected folder by PruneTune itself; never taken from a candidate's folder.
OWN_ENTRIES = ("selection_info.json", "baseline_evaluation", "DONE.json")
TIE_BREAK = {
    "best_acc": "highest acc; ties: lower ppl, then the smaller candidate id",
    "best_ppl": "lowest ppl; ties: higher acc, then the smaller candidate id",
}


@dataclass(frozen=True)
class Candidate:
    """One row of the search."""

    model: str
    candidate: str
    acc: float
    ppl: float
    path: Path  # resolved checkpoint location
    params: dict[str, Any] = field(default_factory=dict)
    metrics_source: str = ""
    where: str = ""  # "file row N", for messages

    def brief(self) -> dict[str, Any]:
        return {"candidate": self.candidate, "acc": self.acc, "ppl": self.ppl, "params": self.params,
                "checkpoint": str(self.path)}


@dataclass(frozen=True)
class Search:
    source: Path
    sha256: str
    file_format: str  # csv | jsonl | json folder
    candidates: tuple[Candidate, ...]


@dataclass(frozen=True)
class Selection:
    pair: Pair
    winner: Candidate
    runner_up: Candidate | None
    checkpoint_format: str  # hf | converted | pickle
    destination: Path
    entries: tuple[tuple[str, Path], ...]  # (name in destination, source path)
    state: str = "new"  # new | unchanged


# ------------------------------------------------------------------------------------- reading


def read_search(source: str | Path) -> Search:
    """Parse a search file or folder into candidates; every problem raises one InputError line."""
    source = Path(source)
    if source.is_dir():
        files = sorted(source.glob("*.json"))
        if not files:
            raise InputError(f"search folder {source} has no *.json files; give --search a CSV or JSON lines "
                             "file, or a folder of per-candidate JSON files")
        rows = [(f"{path}", _load_json_object(path), path.parent) for path in files]
        digest = hashlib.sha256("".join(f"{path.name}\0{sha256_of(path)}\n" for path in files).encode()).hexdigest()
        file_format = "folder of JSON files"
    elif source.is_file():
        text = _read_text(source)
        base = source.parent
        if source.suffix.lower() == ".csv":
            rows = [(f"{source} row {number}", row, base) for number, row in _csv_rows(source, text)]
            file_format = "csv"
        else:
            hint = "a JSON lines search holds one candidate object per line"
            rows = [(f"{source} {where}", row, base) for where, row in json_rows(source, text, hint)]
            file_format = "json lines"
        digest = sha256_of(source)
    else:
        raise InputError(f"--search {source} does not exist; give the pruning search's CSV / JSON lines file or "
                         "its folder of per-candidate JSON files")
    if not rows:
        raise InputError(f"search {source} has no rows; it needs one row per pruned candidate "
                         f"({', '.join(REQUIRED_COLUMNS)})")
    candidates = [_candidate(where, row, base) for where, row, base in rows]
    seen: dict[tuple[str, str], str] = {}
    for candidate in candidates:
        key = (candidate.model, candidate.candidate)
        if key in seen:
            raise InputError(f"{candidate.where}: candidate {candidate.candidate!r} of {candidate.model} appears "
                             f"twice (also {seen[key]}); give each candidate its own id")
        seen[key] = candidate.where
    return Search(source, digest, file_format, tuple(candidates))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"search file {path} cannot be read as UTF-8 text ({error})") from None


def _load_json_object(path: Path) -> dict[str, Any]:
    try:
        row = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise InputError(f"{path} line {error.lineno}: malformed JSON ({error.msg}); each file holds one "
                         "candidate object") from None
    if not isinstance(row, dict):
        raise InputError(f"{path}: expected one JSON object per candidate file, got {type(row).__name__}")
    return row


def _csv_rows(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(text.splitlines())
    header = [name.strip().lower() for name in reader.fieldnames or []]
    _require_columns(str(path), header)
    rows = []
    for number, raw in enumerate(reader, start=2):  # row 1 is the header
        row = {key.strip().lower(): (value or "").strip() for key, value in raw.items() if key is not None}
        params = {key: _scalar(value) for key, value in row.items()
                  if key not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS and value != ""}
        if row.get("params"):
            try:
                params.update(json.loads(row["params"]))
            except (json.JSONDecodeError, TypeError, ValueError):
                raise InputError(f"{path} row {number}: params {row['params']!r} is not a JSON object; write the "
                                 "parameters as their own columns or as JSON") from None
        known = {key: value for key, value in row.items() if key in REQUIRED_COLUMNS + OPTIONAL_COLUMNS}
        rows.append((number, {**known, "params": params}))
    return rows


def _require_columns(where: str, names: list[str]) -> None:
    missing = [column for column in REQUIRED_COLUMNS if column not in names]
    if missing:
        raise InputError(f"{where}: missing column(s) {', '.join(missing)} (found: {', '.join(names) or 'none'}); "
                         f"every candidate needs {', '.join(REQUIRED_COLUMNS)} (README: Step 1: select)")


def _scalar(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _candidate(where: str, row: Any, base: Path) -> Candidate:
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected an object with {', '.join(REQUIRED_COLUMNS)}, got {type(row).__name__}")
    row = {str(key).strip().lower(): value for key, value in row.items()}
    _require_columns(where, list(row))
    model = str(row["model"]).strip()
    if model not in MODEL_NAMES:
        raise InputError(f"{where}: unknown model {model!r}{did_you_mean(model, MODEL_NAMES)} "
                         f"(valid: {', '.join(MODEL_NAMES)})")
    name = str(row["candidate"]).strip()
    if not name:
        raise InputError(f"{where}: empty candidate; give each candidate an id or its checkpoint folder")
    acc, ppl = _number(where, "acc", row["acc"]), _number(where, "ppl", row["ppl"])
    if not 0 <= acc <= 1 or math.isinf(acc):
        raise InputError(f"{where}: acc {row['acc']!r} is not a fraction in [0, 1]; give the average zero-shot "
                         "accuracy as a fraction (59.46% -> 0.5946)")
    if ppl <= 0:
        raise InputError(f"{where}: ppl {row['ppl']!r} must be positive")
    params = row.get("params") or {}
    if not isinstance(params, dict):
        raise InputError(f"{where}: params must be an object of pruning parameters, got {params!r}")
    extra = {key: value for key, value in row.items() if key not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS}
    location = Path(str(row.get("path") or name)).expanduser()
    path = location if location.is_absolute() else base / location
    return Candidate(model, name, acc, ppl, Path(os.path.abspath(path)), {**params, **extra},
                     str(row.get("metrics_source") or ""), where)


def _number(where: str, column: str, value: Any) -> float:
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{where}: {column} {value!r} is not a number") from None
    if math.isnan(number):
        raise InputError(f"{where}: {column} is NaN; drop the row or give the measured value")
    return number


# ------------------------------------------------------------------------------------- choosing


def rank(candidates: list[Candidate], pruning_config: str) -> list[Candidate]:
    """Candidates best first, by the criterion and tie-break of ``pruning_config`` (see ``TIE_BREAK``)."""
    if pruning_config == "best_acc":
        return sorted(candidates, key=lambda c: (-c.acc, c.ppl, c.candidate))
    return sorted(candidates, key=lambda c: (c.ppl, -c.acc, c.candidate))


def plan_selection(config: StudyConfig, search: Search, mode: str) -> list[Selection]:
    """Choose every pair's winner and check that it can be materialised; writes nothing."""
    if mode not in MODES:
        raise InputError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
    by_model: dict[str, list[Candidate]] = {}
    for candidate in search.candidates:
        by_model.setdefault(candidate.model, []).append(candidate)
    outside = sorted(set(by_model) - set(config.study.models))
    if outside:
        log.info("select: ignoring %s (in the search, not in study.models)", ", ".join(outside))
    missing = [model for model in config.study.models if model not in by_model]
    if missing:
        raise InputError(f"search {search.source} has no candidate for {', '.join(missing)}; add their rows or "
                         f"leave them out of study.models (found: {', '.join(sorted(by_model)) or 'none'})")
    paths = StudyPaths(config)
    selections = []
    for model in config.study.models:
        for pruning_config in config.study.pruning_configs:
            ordered = rank(by_model[model], pruning_config)
            winner = ordered[0]
            pair = Pair(model, pruning_config)
            if not winner.path.exists():
                raise InputError(f"{winner.where}: checkpoint {winner.path} of {model} candidate "
                                 f"{winner.candidate!r} (selected as {pruning_config}) does not exist; fix its path "
                                 "column (relative paths start at the search file's folder)")
            checkpoint_format, location = find_checkpoint(winner.path)
            if location.is_file():
                entries = ((location.name, location),)
            else:
                entries = tuple((child.name, child) for child in sorted(location.iterdir())
                                if child.name not in OWN_ENTRIES)
            destination = paths.pruned_model(pair)
            selection = Selection(pair, winner, ordered[1] if len(ordered) > 1 else None, checkpoint_format,
                                  destination, entries)
            state = _existing_state(selection, mode)
            selections.append(dataclasses.replace(selection, state=state))
    return selections


def _existing_state(selection: Selection, mode: str) -> str:
    """"new" (nothing there, or an empty folder), "unchanged", or raise: something else is there."""
    destination = selection.destination
    if not destination.exists() and not destination.is_symlink():
        return "new"
    if destination.is_dir() and not destination.is_symlink() and not any(destination.iterdir()):
        return "new"
    problem = _difference(selection, mode)
    if problem:
        raise InputError(f"{destination} ({selection.pair.label}) already exists with different content "
                         f"({problem}); move it away, or select into another study.results_root")
    return "unchanged"


def _difference(selection: Selection, mode: str) -> str:
    destination = selection.destination
    if destination.is_symlink() or not destination.is_dir():
        return "it is not a folder PruneTune made"
    try:
        info = json.loads((destination / "selection_info.json").read_text())
    except (OSError, ValueError):
        return "no selection_info.json"
    if info.get("candidate") != selection.winner.candidate or info.get("checkpoint") != str(selection.winner.path):
        return f"it holds candidate {info.get('candidate')!r}, the search selects {selection.winner.candidate!r}"
    if info.get("materialised_as") != mode:
        return f"it was made with --mode {info.get('materialised_as')}"
    present = {child.name for child in destination.iterdir()} - set(OWN_ENTRIES)
    expected = {name for name, _ in selection.entries}
    if present != expected:
        return f"files differ: {', '.join(sorted(present ^ expected))}"
    for name, source in selection.entries:
        target = destination / name
        if mode == "symlink" and (not target.is_symlink() or Path(os.readlink(target)) != source):
            return f"{name} does not link to {source}"
    return ""


# ------------------------------------------------------------------------------------- writing


def materialise(selection: Selection, search: Search, mode: str) -> None:
    """Create the pair's folder next to its final place, then rename it there (a crash leaves no half)."""
    destination = selection.destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.parent / f".{destination.name}.selecting-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        for name, source in selection.entries:
            if mode == "symlink":
                os.symlink(source, staging / name, target_is_directory=source.is_dir())
            elif source.is_dir():
                shutil.copytree(source, staging / name)
            else:
                shutil.copy2(source, staging / name)
        atomic_write_json(staging / "selection_info.json", selection_record(selection, search, mode))
        if destination.is_dir():
            destination.rmdir()  # empty (checked when planning)
        os.rename(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


FORMAT_NAMES = {"pickle": "llm-pruner pickle", "hf": "huggingface", "converted": "converted llm-pruner pickle"}


def selection_record(selection: Selection, search: Search, mode: str) -> dict[str, Any]:
    winner = selection.winner
    return {
        "model": selection.pair.model,
        "pruning_config": selection.pair.config,
        "candidate": winner.candidate,
        "params": winner.params,
        "acc": winner.acc,
        "ppl": winner.ppl,
        "metrics_source": winner.metrics_source,
        "criterion": TIE_BREAK[selection.pair.config],
        "runner_up": selection.runner_up.brief() if selection.runner_up else None,
        "checkpoint": str(winner.path),
        "format": FORMAT_NAMES.get(selection.checkpoint_format, selection.checkpoint_format),
        "materialised_as": mode,
        "search": {"path": str(search.source.resolve()), "sha256": search.sha256, "format": search.file_format,
                   "candidates": len(search.candidates), "row": winner.where},
        "selected_by": "launch.py select",
        "selected_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def bytes_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(child.stat().st_size for child in path.rglob("*") if child.is_file())


def summary_markdown(selections: list[Selection], search: Search, mode: str) -> str:
    """``for_finetuning/SUMMARY.md``: the selections as a tree (like the study's notes) and as a table."""
    synthetic = sorted({s.winner.metrics_source for s in selections if s.winner.metrics_source})
    lines = ["# Pruned checkpoints selected for finetuning", "",
             f"Search: `{search.source}` ({search.file_format}, {len(search.candidates)} candidates, "
             f"sha256 `{search.sha256[:16]}`), selected by `launch.py select --mode {mode}`.",
             f"best_acc: {TIE_BREAK['best_acc']}. best_ppl: {TIE_BREAK['best_ppl']}.", ""]
    if synthetic:
        lines += [f"Where ACC and PPL come from (the search's metrics_source): {'; '.join(synthetic)}.", ""]
    lines += ["```", "for_finetuning/"]
    models = list(dict.fromkeys(s.pair.model for s in selections))
    for model_number, model in enumerate(models):
        last_model = model_number == len(models) - 1
        lines.append(f"{'└──' if last_model else '├──'} {model}/")
        own = [s for s in selections if s.pair.model == model]
        for number, selection in enumerate(own):
            branch = "└──" if number == len(own) - 1 else "├──"
            label = f"{selection.pair.config}/"
            lines.append(f"{'    ' if last_model else '│   '}{branch} {label:<10} # ACC: {selection.winner.acc:.4f}, "
                         f"PPL: {selection.winner.ppl:.2f}  ({selection.winner.candidate})")
    lines += ["```", "",
              "| model | config | candidate | ACC | PPL | pruning parameters | runner-up (ACC, PPL) | format |",
              "|---|---|---|---|---|---|---|---|"]
    for selection in selections:
        winner, second = selection.winner, selection.runner_up
        params = ", ".join(f"{key}={value}" for key, value in winner.params.items()) or "-"
        runner = f"{second.candidate} ({second.acc:.4f}, {second.ppl:.2f})" if second else "-"
        lines.append(f"| {selection.pair.model} | {selection.pair.config} | {winner.candidate} | {winner.acc:.4f} | "
                     f"{winner.ppl:.2f} | {params} | {runner} | {selection.checkpoint_format} |")
    return "\n".join(lines) + "\n"


def select(config: StudyConfig, search_path: str | Path, mode: str = "symlink", dry_run: bool = False) -> int:
    """``launch.py select``: read, choose, check every destination, then write. Returns the exit code."""
    search = read_search(search_path)
    selections = plan_selection(config, search, mode)
    summary = summary_markdown(selections, search, mode)
    if mode == "copy" and not dry_run:
        total = sum(bytes_of(source) for s in selections if s.state == "new" for _, source in s.entries)
        log.info("select: copying %.1f GB of checkpoints (use --mode symlink to link them instead)", total / 1e9)
    if not dry_run:
        for selection in selections:
            if selection.state == "new":
                materialise(selection, search, mode)
        atomic_write_text(summary_path(config), summary)
    new = sum(1 for selection in selections if selection.state == "new")
    print(summary, flush=True)
    if dry_run:
        print(f"dry run: {new} pair(s) would be selected into {summary_path(config).parent}; nothing written")
    else:
        print(f"{new} pair(s) selected, {len(selections) - new} already in place ({mode}); "
              f"summary: {summary_path(config)}\nnext: python launch.py check", flush=True)
    return 0


def summary_path(config: StudyConfig) -> Path:
    return Path(config.study.results_root) / "for_finetuning" / "SUMMARY.md"
