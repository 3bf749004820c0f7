"""Where each evaluation dataset comes from, and a check that it is there, in milliseconds and offline.

Nothing is downloaded at run time. ``data.eval_source`` picks one of three places:

* ``local_files``: ``data.eval_data_dir/<file>``, JSON lines in the real dataset's schema (README table).
* ``hub_mirror``: ``data.hub_mirror_dir/<Hub repo id>``, a copy of the dataset repo laid out as on the Hub
  (``huggingface-cli download <repo> --repo-type dataset --local-dir <mirror>/<repo>``); it is read with
  ``datasets.load_dataset(<that folder>, <config>)``.
* ``hf_cache``: the datasets cache (``HF_DATASETS_CACHE``, default ``~/.cache/huggingface/datasets``) with the
  dataset already in it (``datasets.load_dataset(<repo>, <config>)`` run once where the Hub is reachable).

The Hub repos are the ones lm-eval 0.4.13's task files name (``tests/test_eval_fidelity.py`` checks that they
still are); for perplexity, where LLM-Pruner's ``wikitext`` and ``ptb_text_only`` now live on the Hub.
``missing_eval_data`` only looks at the file system, so a missing dataset fails before any model loads and
before datasets could spend ~25 s retrying the Hub; it imports nothing heavy and runs on the login node.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from jobs.config import DataSettings, EvaluateSettings
from jobs.errors import InputError

EVAL_SOURCES = ("local_files", "hub_mirror", "hf_cache")


@dataclass(frozen=True)
class EvalDataset:
    """One evaluation dataset: its local file and schema, and the Hub repo, config and split it copies."""

    name: str
    local_file: str  # relative to data.eval_data_dir
    fields: tuple[str, ...]  # what PruneTune or lm-eval's task reads from each row
    hub_repo: str
    hub_config: str | None
    split: str  # the split that is evaluated
    description: str

    @property
    def hub_label(self) -> str:
        return f"{self.hub_repo}" + (f" ({self.hub_config})" if self.hub_config else "")


EVAL_DATASETS = {item.name: item for item in (
    EvalDataset("wikitext2", "wikitext2/test.jsonl", ("text",), "Salesforce/wikitext", "wikitext-2-raw-v1",
                "test", "wikitext-2-raw-v1 test split"),
    EvalDataset("ptb", "ptb/validation.jsonl", ("sentence",), "ptb-text-only/ptb_text_only", "penn_treebank",
                "validation", "ptb_text_only (penn_treebank) validation split"),
    EvalDataset("boolq", "boolq/validation.jsonl", ("question", "passage", "label"), "aps/super_glue", "boolq",
                "validation", "super_glue boolq validation"),
    EvalDataset("piqa", "piqa/validation.jsonl", ("goal", "sol1", "sol2", "label"), "baber/piqa", None,
                "validation", "piqa validation"),
    EvalDataset("hellaswag", "hellaswag/validation.jsonl", ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
                "Rowan/hellaswag", None, "validation", "hellaswag validation"),
    EvalDataset("winogrande", "winogrande/validation.jsonl", ("sentence", "option1", "option2", "answer"),
                "allenai/winogrande", "winogrande_xl", "validation", "winogrande_xl validation"),
    EvalDataset("arc_easy", "arc_easy/test.jsonl", ("question", "choices", "answerKey"), "allenai/ai2_arc",
                "ARC-Easy", "test", "ai2_arc ARC-Easy test"),
    EvalDataset("arc_challenge", "arc_challenge/test.jsonl", ("question", "choices", "answerKey"), "allenai/ai2_arc",
                "ARC-Challenge", "test", "ai2_arc ARC-Challenge test"),
    EvalDataset("openbookqa", "openbookqa/test.jsonl", ("question_stem", "choices", "answerKey"),
                "allenai/openbookqa", "main", "test", "openbookqa main test"),
    # lm-eval's own `wikitext` task: whole Wikipedia articles, scored as word/byte perplexity.
    EvalDataset("lm_eval_wikitext", "wikitext_document_level/test.jsonl", ("page",),
                "EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", "test",
                "wikitext_document_level wikitext-2-raw-v1 test split (one row per article)"),
)}


def wanted_datasets(settings: EvaluateSettings) -> list[str]:
    """The datasets an evaluation with these settings reads, in the order it reads them."""
    return [*settings.ppl_datasets, *settings.tasks, *(["lm_eval_wikitext"] if settings.lm_eval_wikitext else [])]


def hf_datasets_cache() -> Path:
    """The datasets cache the way ``datasets.config`` resolves it, without importing datasets."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "datasets"


def _snake(name: str) -> str:
    """``datasets.naming.camelcase_to_snakecase``: the cache folder of a repo uses it on the dataset's name."""
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"([a-z\d])([A-Z])", r"\1_\2", name).lower()


def cache_folder(dataset: EvalDataset) -> Path:
    """Where ``datasets`` keeps the prepared Arrow files of the repo: <cache>/<namespace>___<name>/<config>."""
    namespace, _, name = dataset.hub_repo.rpartition("/")
    folder = hf_datasets_cache() / "___".join(part for part in (namespace, _snake(name)) if part)
    return folder / dataset.hub_config if dataset.hub_config else folder


def location(data: DataSettings, dataset: EvalDataset) -> Path:
    """The file or folder the dataset is read from under ``data.eval_source``."""
    if data.eval_source == "local_files":
        return Path(data.eval_data_dir) / dataset.local_file
    if data.eval_source == "hub_mirror":
        return Path(data.hub_mirror_dir) / dataset.hub_repo
    if data.eval_source == "hf_cache":
        return cache_folder(dataset)
    raise ValueError(f"data.eval_source {data.eval_source!r} is not one of {', '.join(EVAL_SOURCES)}")


def _mirror_has_config(folder: Path, config: str | None) -> bool:
    """A mirrored repo holds the config as a sub-folder or declares it in its README's ``configs:`` block."""
    if not folder.is_dir() or not any(folder.iterdir()):
        return False
    if config is None or (folder / config).is_dir():
        return True
    readme = folder / "README.md"
    return readme.is_file() and re.search(rf"config_name:\s*['\"]?{re.escape(config)}['\"]?\s*$",
                                          readme.read_text(errors="replace"), re.MULTILINE) is not None


def missing_one(data: DataSettings, name: str) -> str | None:
    """None when dataset ``name`` is where ``data.eval_source`` says; else what is missing and how to put it there."""
    dataset = EVAL_DATASETS[name]
    where = location(data, dataset)
    if data.eval_source == "local_files":
        if where.is_file():
            return None
        return (f"{name}: {where} does not exist (want JSON lines of the {dataset.description}: "
                f"{', '.join(dataset.fields)})")
    if data.eval_source == "hub_mirror":
        if _mirror_has_config(where, dataset.hub_config):
            return None
        return (f"{name}: the Hub dataset {dataset.hub_label} is not mirrored in {where} (copy the repo there where "
                f"the Hub is reachable: huggingface-cli download {dataset.hub_repo} --repo-type dataset "
                f"--local-dir {where})")
    if any(where.glob("*/*/dataset_info.json") if dataset.hub_config else where.glob("*/*/*/dataset_info.json")):
        return None
    config = f", {dataset.hub_config!r}" if dataset.hub_config else ""
    return (f"{name}: {dataset.hub_label} is not in the datasets cache ({where} is missing; put it there with "
            f"HF_DATASETS_CACHE={hf_datasets_cache()} python -c \"import datasets; "
            f"datasets.load_dataset('{dataset.hub_repo}'{config})\" where the Hub is reachable)")


def missing_eval_data(data: DataSettings, names: list[str] | tuple[str, ...]) -> list[str]:
    """One problem line per dataset that is not where ``data.eval_source`` reads it (empty when all are)."""
    return [problem for problem in (missing_one(data, name) for name in names) if problem]


def require_eval_data(data: DataSettings, names: list[str] | tuple[str, ...]) -> None:
    """Raise one InputError naming every missing dataset, where it should be and how to put it there."""
    problems = missing_eval_data(data, names)
    if problems:
        other = {"local_files": "hub_mirror or hf_cache", "hub_mirror": "local_files or hf_cache",
                 "hf_cache": "local_files or hub_mirror"}[data.eval_source]
        raise InputError(f"evaluation data missing offline ({data.eval_source}): {'; '.join(problems)}; "
                         f"or set data.eval_source to {other}")
