"""Reading evaluation rows from the place ``data.eval_source`` names (``jobs/eval_data.py``), offline.

Local files are JSON lines read here; a Hub mirror folder or the datasets cache is read with
``datasets.load_dataset`` inside ``offline_hub()``, so a dataset that is not there fails at once instead of
datasets retrying the Hub for ~25 s. Every problem is an ``InputError`` naming the dataset and where to put it.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from jobs.config import DataSettings
from jobs.errors import InputError
from jobs.eval_data import EVAL_DATASETS, location, require_eval_data


_WORK_DIR: Path | None = None


def work_dir() -> Path:
    """One temp dir per process (generated task YAMLs, the Arrow cache of local files and mirrors), removed at exit.

    The Arrow cache lives here, not in ~/.cache: node-local, never shared between concurrent jobs on a network
    file system, and reused by every evaluation of this process.
    """
    global _WORK_DIR
    if _WORK_DIR is None:
        _WORK_DIR = Path(tempfile.mkdtemp(prefix="prunetune-lmeval-"))
        atexit.register(shutil.rmtree, _WORK_DIR, ignore_errors=True)
    return _WORK_DIR


@contextlib.contextmanager
def offline_hub() -> Iterator[None]:
    """Hub access off for datasets and huggingface_hub, whatever the environment said when they were imported,
    and no progress bar per split in the task log."""
    import datasets
    import huggingface_hub.constants

    saved = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    bars = not datasets.utils.are_progress_bars_disabled()
    if bars:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved
        if bars:
            datasets.enable_progress_bars()


def as_data(source: DataSettings | Path | str) -> DataSettings:
    """A folder of local files stands for ``DataSettings(eval_data_dir=folder)`` (the tests' and tools' shorthand)."""
    return source if isinstance(source, DataSettings) else DataSettings(eval_data_dir=str(source))


def read_jsonl(path: Path, fields: tuple[str, ...], description: str) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file; a row lacking one of ``fields`` is an InputError naming its line."""
    rows = []
    with path.open() as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or any(name not in row for name in fields):
                    raise ValueError
            except ValueError:
                wanted = ", ".join(f'"{name}"' for name in fields)
                raise InputError(f"{path} line {number}: expected a JSON object with {wanted} ({description} "
                                 "schema)") from None
            rows.append(row)
    return rows


def load_rows(data: DataSettings, name: str) -> list[dict[str, Any]]:
    """Every row of dataset ``name``'s evaluated split, from wherever ``data.eval_source`` says it is."""
    require_eval_data(data, [name])
    dataset = EVAL_DATASETS[name]
    where = location(data, dataset)
    if data.eval_source == "local_files":
        return read_jsonl(where, dataset.fields, dataset.description)
    import datasets

    path = str(where) if data.eval_source == "hub_mirror" else dataset.hub_repo
    # A mirror's Arrow files go to this process's temp dir; hf_cache reads the user's cache, where the data is.
    kwargs = {"cache_dir": str(work_dir() / "datasets")} if data.eval_source == "hub_mirror" else {}
    try:
        with offline_hub():
            loaded = datasets.load_dataset(path, dataset.hub_config, split=dataset.split, **kwargs)
    except Exception as error:  # datasets raises many types (ValueError, FileNotFoundError, ConnectionError, ...)
        first = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise InputError(f"{name}: could not read the {dataset.split} split of {dataset.hub_label} from "
                         f"{where} ({first}); check that it is a complete copy of the Hub dataset") from None
    missing = [field for field in dataset.fields if field not in loaded.column_names]
    if missing:
        raise InputError(f"{name}: {where} has no column {', '.join(missing)} ({dataset.description} schema)")
    return list(loaded)
