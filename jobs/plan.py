"""The pure plan of a study: which task arrays to submit and how they depend on each other.

The same plan runs on SLURM and on the local executor. Every stage is an array (a single pair is an
array of one). Dependencies follow SLURM's vocabulary:

* ``aftercorr``: task *i* of this array waits for task *i* of the other to succeed, so each pair is
  evaluated as soon as its own finetune ends; if that finetune fails, the dependent is cancelled.
* ``afterany``: the task waits until every task of the other array has ended, whatever the outcome;
  the compare job uses it so that it also reports studies where some pairs failed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from jobs.cache import baseline_is_current, evaluation_is_current
from jobs.config import StageResources, StudyConfig
from jobs.state import is_done
from jobs.study import Pair, StudyPaths

STAGES = ("finetune", "evaluate", "compare", "all")


@dataclass(frozen=True)
class Dependency:
    array: str
    kind: str  # "aftercorr" or "afterany"


@dataclass(frozen=True)
class TaskArray:
    """One submission: ``worker`` runs once per pair (compare: once, for the whole study)."""

    name: str
    worker: str  # finetune | evaluate_pruned | evaluate_finetuned | compare
    pairs: tuple[Pair, ...]
    resources: StageResources
    depends_on: tuple[Dependency, ...] = ()

    @property
    def size(self) -> int:
        return 1 if self.worker == "compare" else len(self.pairs)

    def tasks(self, config: StudyConfig) -> list["TaskSpec"]:
        """One spec per array index, in index order."""
        if self.worker == "compare":
            return [TaskSpec(self.name, 0, self.worker, config, None, self.pairs)]
        return [TaskSpec(self.name, index, self.worker, config, pair, (pair,))
                for index, pair in enumerate(self.pairs)]


@dataclass(frozen=True)
class TaskSpec:
    """Everything one array task needs; pickled by the executor and run by ``workers.entry``."""

    array: str
    index: int
    worker: str
    config: StudyConfig
    pair: Pair | None
    pairs: tuple[Pair, ...]

    @property
    def label(self) -> str:
        return f"{self.array}[{self.index}] {self.pair.label if self.pair else 'study'}"


@dataclass(frozen=True)
class Plan:
    arrays: tuple[TaskArray, ...]
    # Pairs left out, with the reason (already done, nothing to evaluate yet, ...), for the printout.
    skipped: tuple[tuple[str, Pair, str], ...] = field(default=())

    def array(self, name: str) -> TaskArray:
        return next(array for array in self.arrays if array.name == name)

    @property
    def names(self) -> list[str]:
        return [array.name for array in self.arrays]


def build_plan(config: StudyConfig, pairs: list[Pair], stage: str, report_pairs: list[Pair] | None = None) -> Plan:
    """Turn the selected pairs and stage into arrays; pairs whose outputs are done are left out.

    ``report_pairs`` are the pairs the compare job reports on (default: ``pairs``); a resubmission
    reruns a few pairs but reports the whole study again.
    """
    paths = StudyPaths(config)
    resources = config.resources
    arrays: list[TaskArray] = []
    skipped: list[tuple[str, Pair, str]] = []

    def done(folder: Path, array_name: str, pair: Pair, current: bool | None = None) -> bool:
        if is_done(folder) if current is None else current:
            skipped.append((array_name, pair, f"done ({folder})"))
            return True
        return False

    to_finetune: list[Pair] = []
    if stage in ("finetune", "all"):
        to_finetune = [pair for pair in pairs if not done(paths.finetuned_dir(pair), "finetune", pair)]
        if to_finetune:
            arrays.append(TaskArray("finetune", "finetune", tuple(to_finetune), resources.finetune))

    if stage in ("evaluate", "all"):
        # A cached baseline counts only when its key (model files + evaluation settings, jobs/cache.py) matches.
        baseline = [pair for pair in pairs if not done(paths.baseline_eval_dir(pair), "evaluate_pruned", pair,
                                                       baseline_is_current(config, pair))]
        if baseline:
            arrays.append(TaskArray("evaluate_pruned", "evaluate_pruned", tuple(baseline), resources.evaluate))
        # Index i of this array waits on index i of the finetune array, so both hold the same pairs
        # in the same order.
        if to_finetune:
            arrays.append(TaskArray("evaluate_finetuned", "evaluate_finetuned", tuple(to_finetune),
                                    resources.evaluate, (Dependency("finetune", "aftercorr"),)))
        ready = []
        for pair in pairs:
            # Complete but made with other evaluation settings counts as not done (it would compare unlike numbers).
            folder = paths.finetuned_eval_dir(pair)
            if pair in to_finetune or done(folder, "evaluate_finetuned", pair, evaluation_is_current(config, folder)):
                continue
            if is_done(paths.finetuned_dir(pair)):
                ready.append(pair)
            else:
                skipped.append(("evaluate_finetuned", pair, "no finished adapter yet (run --stage finetune)"))
        if ready:
            arrays.append(TaskArray("evaluate_finetuned_ready", "evaluate_finetuned", tuple(ready),
                                    resources.evaluate))

    if stage in ("compare", "all"):
        evals = tuple(Dependency(array.name, "afterany") for array in arrays if array.worker.startswith("evaluate"))
        arrays.append(TaskArray("compare", "compare", tuple(report_pairs or pairs), resources.compare, evals))

    return Plan(tuple(arrays), tuple(skipped))


def describe(plan: Plan) -> str:
    """The plan as the user reads it before anything runs."""
    if not plan.arrays:
        return "nothing to do: every selected pair is complete"
    lines = []
    for array in plan.arrays:
        after = ", ".join(f"{dep.kind}:{dep.array}" for dep in array.depends_on) or "-"
        subject = f"{len(array.pairs)} pair(s)" if array.worker == "compare" else \
            ", ".join(pair.label for pair in array.pairs)
        lines.append(f"{array.name:<26} {array.size:>3} task(s)  after {after:<34} {subject}")
    for array_name, pair, reason in plan.skipped:
        lines.append(f"  skipped {array_name} {pair.label}: {reason}")
    return "\n".join(lines)
