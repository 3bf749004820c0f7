"""Compare recipe: before/after reports per pair and the study summary.

For each pair with both evaluations: ``comparison_report.txt`` (PPL before/after with change and
change %, each task's accuracy change, the average change, the tasks that gained most and least) and
``comparison.json`` with the same numbers, beside the finetuned evaluation. For the study:
``SUMMARY.md`` (every pair, best_acc vs best_ppl after finetuning, the pairs missing and why) and
``summary.csv``. Pairs without results are listed as missing, never dropped. Needs no torch.
"""
from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from jobs.config import StudyConfig
from jobs.state import atomic_write_json, atomic_write_text, is_done
from jobs.study import Pair, StudyPaths

log = logging.getLogger(__name__)

EVALUATION_FILE = "evaluation_results.json"
PPL_FILE = "ppl_results.json"


@dataclass(frozen=True)
class Scores:
    """One evaluation of one model: perplexity per dataset, headline accuracy per task, their average."""

    ppl: dict[str, float]
    tasks: dict[str, float]
    average: float


@dataclass(frozen=True)
class Comparison:
    pair: Pair
    before: Scores
    after: Scores

    def as_dict(self) -> dict:
        ppl = {name: _change(self.before.ppl[name], self.after.ppl[name])
               for name in self.before.ppl if name in self.after.ppl}
        tasks = {name: _change(self.before.tasks[name], self.after.tasks[name])
                 for name in self.before.tasks if name in self.after.tasks}
        ranked = sorted(tasks, key=lambda name: tasks[name]["change"])
        return {"model": self.pair.model, "pruning_config": self.pair.config, "ppl": ppl, "tasks": tasks,
                "average": _change(self.before.average, self.after.average),
                "largest_gain": ranked[-1] if ranked else None, "smallest_gain": ranked[0] if ranked else None}


def _change(before: float, after: float) -> dict[str, float]:
    change = after - before
    return {"before": before, "after": after, "change": change,
            "change_pct": 100.0 * change / before if before else float("nan")}


def load_scores(folder: Path) -> Scores | None:
    """The scores in an evaluation folder, or None when it is not complete."""
    if not is_done(folder):
        return None
    ppl_data = json.loads((folder / PPL_FILE).read_text())
    evaluation = json.loads((folder / EVALUATION_FILE).read_text())
    ppl = {name: float(ppl_data[name]["ppl"]) for name in ppl_data["settings"]["datasets"]}
    tasks = {name: float(entry["value"]) for name, entry in evaluation["tasks"].items()}
    return Scores(ppl, tasks, float(evaluation["average"]))


def render_pair_report(comparison: Comparison) -> str:
    data = comparison.as_dict()
    lines = [f"PruneTune comparison: {comparison.pair.label} (pruned -> pruned + LoRA)", "",
             f"{'perplexity':<16}{'before':>12}{'after':>12}{'change':>12}{'change %':>10}"]
    for name, row in data["ppl"].items():
        lines.append(f"{name:<16}{row['before']:>12.2f}{row['after']:>12.2f}{row['change']:>+12.2f}"
                     f"{row['change_pct']:>+9.1f}%")
    lines += ["", f"{'zero-shot task':<16}{'before':>12}{'after':>12}{'change':>12}"]
    for name, row in data["tasks"].items():
        lines.append(f"{name:<16}{row['before']:>12.4f}{row['after']:>12.4f}{row['change']:>+12.4f}")
    average = data["average"]
    lines += [f"{'average':<16}{average['before']:>12.4f}{average['after']:>12.4f}{average['change']:>+12.4f}", "",
              f"largest gain:  {data['largest_gain']} ({data['tasks'][data['largest_gain']]['change']:+.4f})",
              f"smallest gain: {data['smallest_gain']} ({data['tasks'][data['smallest_gain']]['change']:+.4f})", ""]
    return "\n".join(lines)


def render_summary(comparisons: list[Comparison], missing: list[tuple[Pair, str]]) -> tuple[str, str]:
    """The study table as Markdown and CSV."""
    ppl_names = sorted({name for item in comparisons for name in item.after.ppl})
    header = ["model", "config"] + [f"{name} ppl before" for name in ppl_names] + \
             [f"{name} ppl after" for name in ppl_names] + ["avg acc before", "avg acc after", "avg acc change"]
    rows = []
    for item in comparisons:
        rows.append([item.pair.model, item.pair.config]
                    + [f"{item.before.ppl.get(name, float('nan')):.2f}" for name in ppl_names]
                    + [f"{item.after.ppl.get(name, float('nan')):.2f}" for name in ppl_names]
                    + [f"{item.before.average:.4f}", f"{item.after.average:.4f}",
                       f"{item.after.average - item.before.average:+.4f}"])
    markdown = ["# Study summary", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    markdown += ["| " + " | ".join(row) + " |" for row in rows]
    markdown += ["", "## best_acc vs best_ppl after finetuning", "",
                 "| model | best_acc avg acc | best_ppl avg acc | better by avg acc |", "|---|---|---|---|"]
    by_pair = {item.pair: item for item in comparisons}
    for model in dict.fromkeys(item.pair.model for item in comparisons):
        acc, ppl = by_pair.get(Pair(model, "best_acc")), by_pair.get(Pair(model, "best_ppl"))
        if acc and ppl:
            better = "best_acc" if acc.after.average >= ppl.after.average else "best_ppl"
            markdown.append(f"| {model} | {acc.after.average:.4f} | {ppl.after.average:.4f} | {better} |")
    markdown += ["", f"Pairs compared: {len(comparisons)}. Missing: {len(missing)}."]
    markdown += [f"- {pair.label}: {reason}" for pair, reason in missing]
    stream = io.StringIO()
    writer = csv.writer(stream)
    writer.writerow(header)
    writer.writerows(rows)
    return "\n".join(markdown) + "\n", stream.getvalue()


def run(config: StudyConfig, pairs: tuple[Pair, ...]) -> None:
    paths = StudyPaths(config)
    comparisons: list[Comparison] = []
    missing: list[tuple[Pair, str]] = []
    for pair in pairs:
        before = load_scores(paths.baseline_eval_dir(pair))
        after = load_scores(paths.finetuned_eval_dir(pair))
        if before is None or after is None:
            which = " and ".join(name for name, scores in (("before", before), ("after", after)) if scores is None)
            missing.append((pair, f"no complete evaluation {which} finetuning"))
            continue
        comparison = Comparison(pair, before, after)
        folder = paths.finetuned_eval_dir(pair)
        atomic_write_text(folder / "comparison_report.txt", render_pair_report(comparison))
        atomic_write_json(folder / "comparison.json", comparison.as_dict())
        comparisons.append(comparison)
    markdown, table = render_summary(comparisons, missing)
    atomic_write_text(paths.study_summary(), markdown)
    atomic_write_text(paths.root / "summary.csv", table)
    log.info("compared %d pair(s); %d missing; summary in %s", len(comparisons), len(missing), paths.study_summary())
