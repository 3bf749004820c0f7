"""The vocabulary of `launch.py check`: checklist rows and the facts the checks gather on the way."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.errors import UserError
from jobs.study import Pair

if TYPE_CHECKING:
    from jobs.check_slurm import Partition

OK, WARN, SKIP, FAIL = "ok", "warn", "skip", "FAIL"

STAGE_OF_WORKER = {"finetune": "finetune", "evaluate_pruned": "evaluate", "evaluate_finetuned": "evaluate",
                   "compare": "compare"}


@dataclass(frozen=True)
class Finding:
    """One line of the checklist."""

    check: str
    status: str  # ok | warn | skip | FAIL
    detail: str
    fix: str = ""

    def message(self) -> str:
        return f"{self.detail}; {self.fix}" if self.fix else self.detail


def _from_error(check: str, error: UserError) -> Finding:
    """Split an InputError's one line ("what is wrong; how to fix it") into a checklist row."""
    detail, _, fix = str(error).partition("; ")
    return Finding(check, FAIL, detail, fix)


@dataclass
class StudyFacts:
    """What the checks learn on the way, for the cost estimate (so nothing is read twice)."""

    checkpoints: dict[Pair, tuple[str, Path]] = field(default_factory=dict)  # pair -> (format, location)
    tokenizers: dict[Pair, Path] = field(default_factory=dict)  # pair -> tokenizer.json that counts its tokens
    train_examples: list[dict[str, str]] | None = None
    eval_rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    partitions: dict[str, "Partition"] = field(default_factory=dict)
    default_partition: str = ""
