"""Zero-shot accuracy through lm-eval's REAL built-in task definitions, reading local copies of the data.

For each task we write a small YAML that ``include:``s lm-eval's own task file by absolute path, so
prompt, choices, target, preprocessing (hellaswag's ``process_docs``, winogrande's functions) and
metrics are lm-eval's; only where the data comes from changes:

    include: <site-packages>/lm_eval/tasks/super_glue/boolq/default.yaml
    task: boolq                   # the real name, so results keep it
    dataset_path: json            # datasets' packaged JSON builder: local files, no Hub
    dataset_name: null
    dataset_kwargs: {data_files: {validation: <eval_data_dir>/boolq/validation.jsonl},
                     cache_dir: <per-process temp dir>}
    training_split: null          # the local copy holds only the evaluated split, and
    validation_split: null        #   (test-split tasks) lm-eval would otherwise index the missing ones
    num_fewshot: 0                # zero-shot, as LLM-Pruner reports

Nothing here touches the network: "json" is datasets' packaged builder and the files are local (the
task entry point also sets HF_HUB_OFFLINE / HF_DATASETS_OFFLINE before anything imports them).

The YAMLs go into a per-process temp dir indexed by ``TaskManager(include_path=..., include_defaults=False)``:
indexing lm-eval's ~15,000 built-in tasks takes ~20 s, our seven files take ~10 ms; without the
built-ins in the index our tasks keep their real names without a clash.

Local files (JSON lines in the real datasets' schemas; the split is the one lm-eval evaluates):
    boolq/validation.jsonl       super_glue boolq: question, passage, idx, label (0/1)
    piqa/validation.jsonl        goal, sol1, sol2, label (0/1)
    hellaswag/validation.jsonl   ind, activity_label, ctx_a, ctx_b, ctx, endings, source_id, split,
                                 split_type, label ("0".."3", a string)
    winogrande/validation.jsonl  winogrande_xl: sentence (one "_"), option1, option2, answer ("1"/"2")
    arc_easy/test.jsonl, arc_challenge/test.jsonl
                                 id, question, choices {text: [...], label: [...]}, answerKey
    openbookqa/test.jsonl        openbookqa main: id, question_stem, choices {text, label}, answerKey

Headline metric per task as LLM-Pruner reports it: acc for boolq, piqa, winogrande, arc_easy;
acc_norm for hellaswag, arc_challenge, openbookqa; ``average`` is the mean of the headline metrics.
"""
from __future__ import annotations

import atexit
import contextlib
import importlib.metadata
import json
import logging
import math
import numbers
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml
from transformers import PreTrainedTokenizerBase

from jobs.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskSource:
    builtin_yaml: str  # relative to lm_eval/tasks
    data_file: str  # relative to eval_data_dir
    split: str  # the split lm-eval evaluates for this task
    metric: str  # LLM-Pruner's headline metric
    fields: tuple[str, ...]  # what lm-eval's prompt and preprocessing read
    schema: str


TASK_SOURCES = {
    "boolq": TaskSource("super_glue/boolq/default.yaml", "boolq/validation.jsonl", "validation", "acc",
                        ("question", "passage", "label"), "super_glue boolq validation"),
    "piqa": TaskSource("piqa/piqa.yaml", "piqa/validation.jsonl", "validation", "acc",
                       ("goal", "sol1", "sol2", "label"), "piqa validation"),
    "hellaswag": TaskSource("hellaswag/hellaswag.yaml", "hellaswag/validation.jsonl", "validation", "acc_norm",
                            ("activity_label", "ctx_a", "ctx_b", "endings", "label"), "hellaswag validation"),
    "winogrande": TaskSource("winogrande/default.yaml", "winogrande/validation.jsonl", "validation", "acc",
                             ("sentence", "option1", "option2", "answer"), "winogrande_xl validation"),
    "arc_easy": TaskSource("arc/arc_easy.yaml", "arc_easy/test.jsonl", "test", "acc",
                           ("question", "choices", "answerKey"), "ai2_arc ARC-Easy test"),
    "arc_challenge": TaskSource("arc/arc_challenge.yaml", "arc_challenge/test.jsonl", "test", "acc_norm",
                                ("question", "choices", "answerKey"), "ai2_arc ARC-Challenge test"),
    "openbookqa": TaskSource("openbookqa/openbookqa.yaml", "openbookqa/test.jsonl", "test", "acc_norm",
                             ("question_stem", "choices", "answerKey"), "openbookqa main test"),
}
HEADLINE_METRIC = {task: source.metric for task, source in TASK_SOURCES.items()}

# Warnings lm-eval repeats on every evaluation about things we do on purpose; all others are kept.
KNOWN_NOISE = (
    "is defined, but aggregation is not",  # boolq's built-in metric_list relies on the default (mean)
    "is defined, but higher_is_better is not",
    "`pretrained` model kwarg is not of type `str`",  # we pass our loaded model on purpose
    "Passed an already-initialized model through `pretrained`",
)


def check_zero_shot_data(eval_data_dir: Path, tasks: tuple[str, ...] | list[str]) -> dict[str, Path]:
    """Every task's local file, checked for existence and its first row's fields; all problems at once."""
    files, problems = {}, []
    for task in tasks:
        source = TASK_SOURCES[task]
        path = Path(eval_data_dir).resolve() / source.data_file
        files[task] = path
        if not path.is_file():
            problems.append(f"{task}: {path} does not exist (want JSON lines of the {source.schema} split: "
                            f"{', '.join(source.fields)})")
            continue
        with path.open() as stream:
            first = stream.readline()
        try:
            row = json.loads(first)
            missing = [name for name in source.fields if name not in row]
        except ValueError:
            row, missing = None, list(source.fields)
        if not isinstance(row, dict) or missing:
            problems.append(f"{task}: the first row of {path} lacks {', '.join(missing)} ({source.schema} schema)")
    if problems:
        raise InputError(f"zero-shot data under {eval_data_dir}: {'; '.join(problems)}; fix the files or set "
                         "data.eval_data_dir")
    return files


_WORK_DIR: Path | None = None
_TASK_MANAGERS: dict[tuple[str, tuple[str, ...]], Any] = {}


def _work_dir() -> Path:
    """One temp dir per process for generated YAMLs and the datasets cache, removed at exit.

    The datasets Arrow cache lives here, not in ~/.cache: node-local, never shared between
    concurrent jobs on a network file system, and reused by every evaluation of this process.
    """
    global _WORK_DIR
    if _WORK_DIR is None:
        _WORK_DIR = Path(tempfile.mkdtemp(prefix="prunetune-lmeval-"))
        atexit.register(shutil.rmtree, _WORK_DIR, ignore_errors=True)
    return _WORK_DIR


def override_config(task: str, data_file: Path, builtin_dir: Path, cache_dir: Path) -> dict[str, Any]:
    """The YAML content that reuses lm-eval's task ``task`` with only its data location changed."""
    source = TASK_SOURCES[task]
    config: dict[str, Any] = {
        "include": str(builtin_dir / source.builtin_yaml),
        "task": task,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {source.split: str(data_file)}, "cache_dir": str(cache_dir)},
        "training_split": None,
        "num_fewshot": 0,
    }
    if source.split == "test":
        config["validation_split"] = None
    return config


def task_manager_for(eval_data_dir: Path, tasks: tuple[str, ...]) -> Any:
    """A TaskManager that knows only our override tasks; built once per process and data folder."""
    import lm_eval.tasks

    key = (str(Path(eval_data_dir).resolve()), tuple(tasks))
    if key not in _TASK_MANAGERS:
        files = check_zero_shot_data(eval_data_dir, tasks)
        folder = Path(tempfile.mkdtemp(prefix="tasks-", dir=_work_dir()))
        builtin_dir = Path(lm_eval.tasks.__file__).parent
        moved = [source.builtin_yaml for task, source in TASK_SOURCES.items()
                 if task in tasks and not (builtin_dir / source.builtin_yaml).is_file()]
        if moved:
            raise RuntimeError(f"lm-eval {importlib.metadata.version('lm_eval')} in {builtin_dir} lacks the task "
                               f"files {', '.join(moved)}; install the lm-eval version pinned for PruneTune")
        for task in tasks:
            config = override_config(task, files[task], builtin_dir, _work_dir() / "datasets")
            header = f"# PruneTune: lm-eval's built-in {task}, reading {files[task]}\n"
            (folder / f"{task}.yaml").write_text(header + yaml.safe_dump(config, sort_keys=False))
        manager = lm_eval.tasks.TaskManager(include_path=str(folder), include_defaults=False)
        # lm-eval skips a YAML it cannot parse with a DEBUG line only; say so loudly instead.
        unindexed = [task for task in tasks if task not in manager.all_subtasks]
        if unindexed:
            raise RuntimeError(f"lm-eval could not read the generated task files for {', '.join(unindexed)} in "
                               f"{folder}; load one with lm_eval.tasks._yaml_loader.load_yaml to see why")
        _TASK_MANAGERS[key] = manager
        log.info("lm-eval %s tasks %s: built-in definitions, data from %s (generated in %s)",
                 importlib.metadata.version("lm_eval"), ", ".join(tasks), eval_data_dir, folder)
    return _TASK_MANAGERS[key]


class _DropKnownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in KNOWN_NOISE)


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval at WARNING minus known noise, fewer progress bars, no environment probe.

    ``simple_evaluate`` ends by recording its environment: torch's collect_env runs ``pip list`` and
    more in subprocesses (1-2 s per evaluation, longer on a shared file system) and ``git describe``
    prints "fatal: ..." outside a repository. We record the versions that matter ourselves.
    """
    import datasets
    import lm_eval.api.task
    import lm_eval.evaluator

    with contextlib.ExitStack() as stack:
        root = logging.getLogger("lm_eval")
        stack.callback(root.setLevel, root.level)
        root.setLevel(logging.WARNING)
        noise = _DropKnownNoise()
        for name in ("lm_eval.api.task", "lm_eval.models.huggingface"):
            logger = logging.getLogger(name)
            logger.addFilter(noise)
            stack.callback(logger.removeFilter, noise)
        if not datasets.utils.are_progress_bars_disabled():
            datasets.disable_progress_bars()
            stack.callback(datasets.enable_progress_bars)
        replacements = [(lm_eval.evaluator, "add_env_info", lambda storage: None),
                        (lm_eval.evaluator, "get_git_commit_hash", lambda: None),
                        # one bar per task while building prompts; the bar over model requests stays
                        (lm_eval.api.task, "tqdm", lambda iterable, **kwargs: iterable)]
        for owner, name, replacement in replacements:
            if hasattr(owner, name):
                stack.enter_context(_patched(owner, name, replacement))
        yield


@contextlib.contextmanager
def _patched(owner: Any, name: str, replacement: Any) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _number(value: Any) -> float | None:
    """lm-eval writes "N/A" where a stderr cannot be computed; keep numbers only."""
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else None


def summarize_results(results: dict[str, Any], tasks: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Per task: the headline metric and its value, acc, acc_norm and their stderr; the average."""
    summary: dict[str, Any] = {}
    for task in tasks:
        metrics = results["results"][task]
        metric = HEADLINE_METRIC[task]
        value = _number(metrics.get(f"{metric},none"))
        if value is None:
            raise ValueError(f"lm-eval gave no {metric} for {task}: {sorted(metrics)}")
        summary[task] = {
            "metric": metric,
            "value": value,
            "acc": _number(metrics.get("acc,none")),
            "acc_stderr": _number(metrics.get("acc_stderr,none")),
            "acc_norm": _number(metrics.get("acc_norm,none")),
            "acc_norm_stderr": _number(metrics.get("acc_norm_stderr,none")),
            "n_samples": results.get("n-samples", {}).get(task, {}).get("effective"),
            "version": results.get("versions", {}).get(task),
        }
    average = sum(entry["value"] for entry in summary.values()) / len(summary) if summary else math.nan
    return {"tasks": summary, "average": average, "average_over": list(tasks)}


def evaluate_zero_shot(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, eval_data_dir: Path,
                       tasks: tuple[str, ...] | list[str], batch_size: int, limit: int) -> dict[str, Any]:
    """Run the tasks 0-shot on the already-loaded ``model``; ``limit`` > 0 keeps the first N docs per task."""
    tasks = tuple(tasks)
    check_zero_shot_data(eval_data_dir, tasks)
    import lm_eval.evaluator
    from lm_eval.models.huggingface import HFLM

    started = time.monotonic()
    manager = task_manager_for(eval_data_dir, tasks)
    with _quiet_lm_eval():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = lm_eval.evaluator.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=0,
                                                    limit=limit or None, task_manager=manager, log_samples=False)
    summary = summarize_results(results, tasks)
    files = {task: str(Path(eval_data_dir).resolve() / TASK_SOURCES[task].data_file) for task in tasks}
    for task in tasks:
        summary["tasks"][task]["data_file"] = files[task]
        summary["tasks"][task]["split"] = TASK_SOURCES[task].split
    return {**summary, "lm_eval_version": importlib.metadata.version("lm_eval"), "num_fewshot": 0,
            "limit": limit or None, "batch_size": batch_size, "wall_time_s": round(time.monotonic() - started, 3)}
