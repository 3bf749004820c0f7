"""The manifest of a SLURM study: what was submitted, when, as which job ids, with which config.

``<results_root>/manifest.json`` lets ``status``, ``resubmit`` and ``cancel`` work days later from any
shell. Each submission (the first, then every resubmit) is one attempt; its arrays map array
indices to pairs. It is rewritten atomically after every change.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.config import StudyConfig, config_from_dict
from jobs.errors import InputError
from jobs.slurm import SubmittedArray
from jobs.state import atomic_write_json

MANIFEST_NAME = "manifest.json"


@dataclass
class Attempt:
    number: int
    submitted_at: str
    reason: str
    arrays: list[SubmittedArray]


@dataclass
class Manifest:
    results_root: str
    config: dict[str, Any]
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return Path(self.results_root) / MANIFEST_NAME

    def study_config(self) -> StudyConfig:
        return config_from_dict(self.config)

    def add_attempt(self, arrays: list[SubmittedArray], reason: str) -> Attempt:
        attempt = Attempt(len(self.attempts) + 1, datetime.datetime.now().isoformat(timespec="seconds"),
                          reason, arrays)
        self.attempts.append(attempt)
        return attempt

    def save(self) -> None:
        atomic_write_json(self.path, dataclasses.asdict(self))

    def latest_tasks(self) -> dict[tuple[str, str], tuple[SubmittedArray, int | None, int]]:
        """{(pair slug or "study", worker): (array, index, attempt)} of the newest task per pair and stage."""
        latest: dict[tuple[str, str], tuple[SubmittedArray, int | None, int]] = {}
        for attempt in self.attempts:
            for array in attempt.arrays:
                if array.worker == "compare":
                    latest[("study", "compare")] = (array, None, attempt.number)
                    continue
                single = len(array.pairs) == 1
                for index, slug in enumerate(array.pairs):
                    latest[(slug, array.worker)] = (array, None if single else index, attempt.number)
        return latest

    def job_ids(self) -> list[str]:
        return sorted({array.job_id for attempt in self.attempts for array in attempt.arrays})


def new_manifest(config: StudyConfig) -> Manifest:
    return Manifest(config.study.results_root, dataclasses.asdict(config))


def load_manifest(results_root: str | Path) -> Manifest:
    path = Path(results_root) / MANIFEST_NAME
    if not path.is_file():
        raise InputError(f"no manifest at {path}: nothing was submitted to SLURM with this results root; "
                         "submit first (--executor slurm) or pass study.results_root=<the study's root>")
    try:
        data = json.loads(path.read_text())
        attempts = [Attempt(item["number"], item["submitted_at"], item["reason"],
                            [SubmittedArray(**{**array, "pairs": tuple(array["pairs"]),
                                               "depends_on": tuple(array["depends_on"])})
                             for array in item["arrays"]]) for item in data["attempts"]]
        return Manifest(data["results_root"], data["config"], attempts)
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(f"{path} is not a PruneTune manifest ({error}); restore it or resubmit the study") from None
