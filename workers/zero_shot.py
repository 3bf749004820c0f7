"""Zero-shot accuracy through lm-eval's REAL built-in task definitions, reading the data offline.

For each task we write a small YAML that ``include:``s lm-eval's own task file by absolute path, so
prompt, choices, target, preprocessing (hellaswag's ``process_docs``, winogrande's functions) and
metrics are lm-eval's; only where the data comes from changes, by ``data.eval_source`` (jobs/eval_data.py):

    include: <site-packages>/lm_eval/tasks/super_glue/boolq/default.yaml
    task: boolq                   # the real name, so results keep it
    # local_files: datasets' packaged JSON builder on <eval_data_dir>/boolq/validation.jsonl
    dataset_path: json
    dataset_name: null
    dataset_kwargs: {data_files: {validation: <eval_data_dir>/boolq/validation.jsonl},
                     cache_dir: <per-process temp dir>}
    # hub_mirror: dataset_path: <hub_mirror_dir>/aps/super_glue (dataset_name stays lm-eval's: boolq)
    # hf_cache:   dataset_path stays aps/super_glue, read from HF_DATASETS_CACHE with the Hub switched off
    training_split: null          # only the evaluated split is needed, and
    validation_split: null        #   (test-split tasks) lm-eval would otherwise index the missing ones
    num_fewshot: 0                # zero-shot, as LLM-Pruner reports

Nothing here touches the network: every source is checked on the file system first (a missing dataset
fails in milliseconds, naming where to put it) and lm-eval runs inside ``offline_hub()``.

The YAMLs go into a per-process temp dir indexed by ``TaskManager(include_path=..., include_defaults=False)``:
indexing lm-eval's ~15,000 built-in tasks takes ~20 s, our seven files take ~10 ms; without the
built-ins in the index our tasks keep their real names without a clash.

``evaluate.backend`` picks who scores the requests lm-eval builds: ``prunetune`` (``workers.fast_lm``, our
registered lm-eval model class: each shared context computed once, the same numbers up to float rounding) or
``hf`` (lm-eval's HFLM). Either way lm-eval owns the tasks, prompts, metrics and aggregation.

Headline metric per task as LLM-Pruner reports it: acc for boolq, piqa, winogrande, arc_easy;
acc_norm for hellaswag, arc_challenge, openbookqa; ``average`` is the mean of the headline metrics.
``evaluate_lm_eval_wikitext`` runs lm-eval's ``wikitext`` task the same way: word and byte perplexity of
whole articles (rolling loglikelihood), NOT the LLM-Pruner token perplexity of ``workers.perplexity``.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import logging
import math
import numbers
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml
from transformers import PreTrainedTokenizerBase

from jobs.config import DataSettings, EvaluateSettings
from jobs.errors import InputError
from jobs.eval_data import EVAL_DATASETS, EvalDataset, location, missing_eval_data, require_eval_data
from workers.eval_sources import as_data, offline_hub, work_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskSource:
    builtin_yaml: str  # relative to lm_eval/tasks
    metric: str  # LLM-Pruner's headline metric ("" for a perplexity task)
    dataset: str  # the key of its data in jobs.eval_data.EVAL_DATASETS

    @property
    def data(self) -> EvalDataset:
        return EVAL_DATASETS[self.dataset]

    @property
    def split(self) -> str:
        return self.data.split

    @property
    def data_file(self) -> str:
        return self.data.local_file


TASK_SOURCES = {
    "boolq": TaskSource("super_glue/boolq/default.yaml", "acc", "boolq"),
    "piqa": TaskSource("piqa/piqa.yaml", "acc", "piqa"),
    "hellaswag": TaskSource("hellaswag/hellaswag.yaml", "acc_norm", "hellaswag"),
    "winogrande": TaskSource("winogrande/default.yaml", "acc", "winogrande"),
    "arc_easy": TaskSource("arc/arc_easy.yaml", "acc", "arc_easy"),
    "arc_challenge": TaskSource("arc/arc_challenge.yaml", "acc_norm", "arc_challenge"),
    "openbookqa": TaskSource("openbookqa/openbookqa.yaml", "acc_norm", "openbookqa"),
}
# lm-eval's own wikitext task (document-level word/byte perplexity); run only with evaluate.lm_eval_wikitext.
WIKITEXT_TASK = "wikitext"
WIKITEXT_SOURCE = TaskSource("wikitext/wikitext.yaml", "", "lm_eval_wikitext")
HEADLINE_METRIC = {task: source.metric for task, source in TASK_SOURCES.items()}

# Warnings lm-eval repeats on every evaluation about things we do on purpose; all others are kept.
KNOWN_NOISE = (
    "is defined, but aggregation is not",  # boolq's built-in metric_list relies on the default (mean)
    "is defined, but higher_is_better is not",
    "`pretrained` model kwarg is not of type `str`",  # we pass our loaded model on purpose
    "Passed an already-initialized model through `pretrained`",
)


def _source_of(task: str) -> TaskSource:
    return WIKITEXT_SOURCE if task == WIKITEXT_TASK else TASK_SOURCES[task]


def check_zero_shot_data(source: DataSettings | Path | str, tasks: tuple[str, ...] | list[str]) -> dict[str, Path]:
    """Every task's data is where ``data.eval_source`` reads it (local files: with the fields in the first row).

    All problems are reported at once, in milliseconds, before anything is loaded. Returns task -> location.
    """
    data = as_data(source)
    names = [_source_of(task).dataset for task in tasks]
    files = {task: location(data, _source_of(task).data).resolve() for task in tasks}
    if data.eval_source != "local_files":
        require_eval_data(data, names)
        return files
    problems = missing_eval_data(data, names)
    for task, path in files.items():
        spec = _source_of(task).data
        if not path.is_file():
            continue
        with path.open() as stream:
            first = stream.readline()
        try:
            row = json.loads(first)
            missing = [name for name in spec.fields if name not in row]
        except ValueError:
            row, missing = None, list(spec.fields)
        if not isinstance(row, dict) or missing:
            problems.append(f"{task}: the first row of {path} lacks {', '.join(missing)} ({spec.description} schema)")
    if problems:
        raise InputError(f"zero-shot data under {data.eval_data_dir}: {'; '.join(problems)}; fix the files, set "
                         "data.eval_data_dir, or set data.eval_source to hub_mirror or hf_cache")
    return files


_TASK_MANAGERS: dict[tuple[str, tuple[str, ...]], Any] = {}


def override_config(task: str, source: DataSettings | Path, builtin_dir: Path, cache_dir: Path) -> dict[str, Any]:
    """The YAML content that reuses lm-eval's task ``task`` with only its data location changed.

    ``source`` is the data settings, or (local files) the path of the task's JSON-lines file itself.
    """
    spec = _source_of(task)
    config: dict[str, Any] = {"include": str(builtin_dir / spec.builtin_yaml), "task": task}
    data = source if isinstance(source, DataSettings) else None
    if data is None or data.eval_source == "local_files":
        data_file = Path(source) if data is None else location(data, spec.data).resolve()
        config |= {"dataset_path": "json", "dataset_name": None,
                   "dataset_kwargs": {"data_files": {spec.split: str(data_file)}, "cache_dir": str(cache_dir)}}
    elif data.eval_source == "hub_mirror":
        config |= {"dataset_path": str(location(data, spec.data).resolve()),
                   "dataset_kwargs": {"cache_dir": str(cache_dir)}}
    # hf_cache: lm-eval's own dataset_path and dataset_name, read from the cache with the Hub switched off.
    config |= {"training_split": None, "num_fewshot": 0}
    if spec.split == "test":
        config["validation_split"] = None
    return config


def task_manager_for(source: DataSettings | Path, tasks: tuple[str, ...]) -> Any:
    """A TaskManager that knows only our override tasks; built once per process and data location."""
    import lm_eval.tasks

    data = as_data(source)
    key = (repr((data.eval_source, str(Path(data.eval_data_dir).resolve()), data.hub_mirror_dir)), tuple(tasks))
    if key not in _TASK_MANAGERS:
        files = check_zero_shot_data(data, tasks)
        folder = Path(tempfile.mkdtemp(prefix="tasks-", dir=work_dir()))
        builtin_dir = Path(lm_eval.tasks.__file__).parent
        moved = [_source_of(task).builtin_yaml for task in tasks
                 if not (builtin_dir / _source_of(task).builtin_yaml).is_file()]
        if moved:
            raise RuntimeError(f"lm-eval {importlib.metadata.version('lm_eval')} in {builtin_dir} lacks the task "
                               f"files {', '.join(moved)}; install the lm-eval version pinned for PruneTune")
        for task in tasks:
            config = override_config(task, data, builtin_dir, work_dir() / "datasets")
            header = f"# PruneTune: lm-eval's built-in {task}, reading {files[task]} ({data.eval_source})\n"
            (folder / f"{task}.yaml").write_text(header + yaml.safe_dump(config, sort_keys=False))
        manager = lm_eval.tasks.TaskManager(include_path=str(folder), include_defaults=False)
        # lm-eval skips a YAML it cannot parse with a DEBUG line only; say so loudly instead.
        unindexed = [task for task in tasks if task not in manager.all_subtasks]
        if unindexed:
            raise RuntimeError(f"lm-eval could not read the generated task files for {', '.join(unindexed)} in "
                               f"{folder}; load one with lm_eval.tasks._yaml_loader.load_yaml to see why")
        _TASK_MANAGERS[key] = manager
        log.info("lm-eval %s tasks %s: built-in definitions, data from %s (generated in %s)",
                 importlib.metadata.version("lm_eval"), ", ".join(tasks), data.eval_source, folder)
    return _TASK_MANAGERS[key]


class _DropKnownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in KNOWN_NOISE)


@functools.lru_cache(maxsize=256)
def _compiled_template(template: str) -> Any:
    import lm_eval.utils

    return lm_eval.utils.env.from_string(template)


def _apply_template(template: str, doc: dict) -> str:
    """lm-eval's ``utils.apply_template`` (the same jinja environment, the same rendering), compiled once."""
    return _compiled_template(template).render(**doc)


@contextlib.contextmanager
def lm_eval_session() -> Iterator[None]:
    """lm-eval at WARNING minus known noise, fewer progress bars, no environment probe, templates compiled once.

    ``simple_evaluate`` ends by recording its environment: torch's collect_env runs ``pip list`` and
    more in subprocesses (1-2 s per evaluation, longer on a shared file system) and ``git describe``
    prints "fatal: ..." outside a repository. We record the versions that matter ourselves.
    lm-eval compiles a task's jinja template again for every doc, several times per doc (text, target,
    choices): for HellaSwag's 10,042 docs that was ~40% of lm-eval's own time; the rendered text is unchanged.
    """
    import datasets
    import lm_eval.api.task
    import lm_eval.evaluator
    import lm_eval.utils

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
                        (lm_eval.api.task, "tqdm", lambda iterable, **kwargs: iterable),
                        (lm_eval.utils, "apply_template", _apply_template)]
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


def _run_lm_eval(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: DataSettings,
                 tasks: tuple[str, ...], batch_size: int, limit: int, backend: str
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """lm-eval's results, and which backend scored them (``fallback``: why prunetune used HFLM's scoring)."""
    import lm_eval.evaluator
    from lm_eval.models.huggingface import HFLM

    from workers.fast_lm import PruneTuneLM

    manager = task_manager_for(data, tasks)
    try:
        with lm_eval_session(), offline_hub():
            lm = {"hf": HFLM, "prunetune": PruneTuneLM}[backend](pretrained=model, tokenizer=tokenizer,
                                                                 batch_size=batch_size)
            results = lm_eval.evaluator.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=0,
                                                        limit=limit or None, task_manager=manager, log_samples=False)
            return results, {"backend": backend, "backend_fallback": getattr(lm, "fallback", None)}
    except (FileNotFoundError, ConnectionError, ValueError) as error:
        if data.eval_source == "local_files" or "dataset" not in str(error).lower():
            raise
        first = str(error).splitlines()[0][:200]
        raise InputError(f"lm-eval could not read {', '.join(tasks)} from {data.eval_source} ({first}); check that "
                         "the copies are complete (README: Evaluation data)") from None


def evaluate_zero_shot(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, source: DataSettings | Path,
                       tasks: tuple[str, ...] | list[str], batch_size: int, limit: int,
                       backend: str = EvaluateSettings.backend) -> dict[str, Any]:
    """Run the tasks 0-shot on the already-loaded ``model``; ``limit`` > 0 keeps the first N docs per task.

    ``backend``: ``prunetune`` (``workers.fast_lm``) or ``hf`` (lm-eval's HFLM) scores the requests.
    """
    tasks, data = tuple(tasks), as_data(source)
    files = check_zero_shot_data(data, tasks)
    started = time.monotonic()
    results, scorer = _run_lm_eval(model, tokenizer, data, tasks, batch_size, limit, backend)
    summary = summarize_results(results, tasks)
    for task in tasks:
        summary["tasks"][task]["data_location"] = str(files[task])
        summary["tasks"][task]["split"] = TASK_SOURCES[task].split
    return {**summary, "eval_source": data.eval_source, "lm_eval_version": importlib.metadata.version("lm_eval"),
            "num_fewshot": 0, "limit": limit or None, "batch_size": batch_size, **scorer,
            "wall_time_s": round(time.monotonic() - started, 3)}


def evaluate_lm_eval_wikitext(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, source: DataSettings | Path,
                              batch_size: int, limit: int, backend: str = EvaluateSettings.backend) -> dict[str, Any]:
    """lm-eval's own ``wikitext`` task: word perplexity, byte perplexity and bits per byte of whole articles."""
    data = as_data(source)
    files = check_zero_shot_data(data, (WIKITEXT_TASK,))
    started = time.monotonic()
    results, scorer = _run_lm_eval(model, tokenizer, data, (WIKITEXT_TASK,), batch_size, limit, backend)
    metrics = results["results"][WIKITEXT_TASK]
    return {"metric": "lm-eval wikitext: word/byte perplexity of whole documents (rolling loglikelihood); not "
                      "comparable with the LLM-Pruner token perplexity",
            **{name: _number(metrics.get(f"{name},none")) for name in ("word_perplexity", "byte_perplexity",
                                                                       "bits_per_byte")},
            "task": WIKITEXT_TASK, "version": results.get("versions", {}).get(WIKITEXT_TASK),
            "n_documents": results.get("n-samples", {}).get(WIKITEXT_TASK, {}).get("effective"),
            "limit": limit or None, "eval_source": data.eval_source, "data_location": str(files[WIKITEXT_TASK]),
            "lm_eval_version": importlib.metadata.version("lm_eval"), **scorer,
            "wall_time_s": round(time.monotonic() - started, 3)}
