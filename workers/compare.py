"""Compare recipe: before/after reports per pair, the study summary, and the study report.

For each pair with both evaluations: ``comparison_report.txt`` (PPL before/after with change and change %,
each task's accuracy before/after/change with its standard error, the average change, the tasks that gained
most and least) and ``comparison.json`` with the same numbers, beside the finetuned evaluation. For the study:
``SUMMARY.md`` (every pair, best_acc vs best_ppl after finetuning, the pairs missing and why), ``summary.csv``
(one row per pair, every number, for papers) and ``REPORT.md`` with its plots (``workers.report``).

A pair is compared only when both evaluations are complete AND were made the same way (same evaluation digest:
settings and data; same lm-eval and task versions); otherwise it is listed as missing with the reason, never
dropped. Needs no torch: ``launch.py report`` runs it on the login node.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.config import StudyConfig
from jobs.state import atomic_write_json, atomic_write_text, is_done
from jobs.study import Pair, StudyPaths

log = logging.getLogger(__name__)

EVALUATION_FILE = "evaluation_results.json"
PPL_FILE = "ppl_results.json"
# |change| must exceed this many standard errors to be called a difference (about 95 %).
SIGNIFICANCE_SE = 2.0


@dataclass(frozen=True)
class TaskScore:
    metric: str  # acc or acc_norm, as LLM-Pruner reports the task
    value: float
    stderr: float | None
    n: int | None  # documents evaluated


@dataclass(frozen=True)
class Scores:
    """One evaluation of one model, as read back from its results folder."""

    ppl: dict[str, float]
    tasks: dict[str, TaskScore]
    average: float
    wikitext_word_ppl: float | None = None  # lm-eval's wikitext task, when it was run
    wikitext_byte_ppl: float | None = None
    digest: str | None = None
    lm_eval_version: str | None = None
    task_versions: tuple[tuple[str, Any], ...] = ()
    ppl_seq_len: int | None = None
    ppl_add_bos: bool | None = None
    limit: int | None = None

    @property
    def average_stderr(self) -> float | None:
        """Standard error of the mean of the task accuracies, tasks taken as independent."""
        errors = [task.stderr for task in self.tasks.values()]
        if not errors or any(error is None for error in errors):
            return None
        return math.sqrt(sum(error ** 2 for error in errors)) / len(errors)


def load_scores(folder: Path) -> Scores | None:
    """The scores in an evaluation folder, or None when it is not complete."""
    if not is_done(folder):
        return None
    ppl_data = json.loads((folder / PPL_FILE).read_text())
    evaluation = json.loads((folder / EVALUATION_FILE).read_text())
    settings = ppl_data.get("settings", {})
    ppl = {name: float(ppl_data[name]["ppl"]) for name in settings.get("datasets", [])}
    tasks = {name: TaskScore(entry["metric"], float(entry["value"]), entry.get(f"{entry['metric']}_stderr"),
                             entry.get("n_samples"))
             for name, entry in evaluation["tasks"].items()}
    wikitext = ppl_data.get("lm_eval_wikitext") or {}
    return Scores(ppl, tasks, float(evaluation["average"]), wikitext.get("word_perplexity"),
                  wikitext.get("byte_perplexity"), evaluation.get("evaluation_digest"),
                  evaluation.get("lm_eval_version"), tuple(sorted((evaluation.get("task_versions") or {}).items())),
                  settings.get("seq_len"), settings.get("add_bos"), evaluation.get("limit"))


def incompatibility(before: Scores, after: Scores) -> str | None:
    """Why the two evaluations cannot be compared (made differently), or None."""
    if before.digest and after.digest and before.digest != after.digest:
        return (f"evaluated with different settings or data before ({before.digest[:12]}) and after "
                f"({after.digest[:12]}) finetuning; the plan re-evaluates a stale baseline by itself, a finetuned "
                "evaluation only without its DONE.json: delete the stale one's DONE.json, run --stage evaluate")
    if before.lm_eval_version != after.lm_eval_version or before.task_versions != after.task_versions:
        return (f"evaluated with different lm-eval or task versions (before {before.lm_eval_version}, after "
                f"{after.lm_eval_version}); delete the older evaluation's DONE.json and run --stage evaluate")
    return None


def combined_stderr(*errors: float | None) -> float | None:
    return None if any(error is None for error in errors) else math.sqrt(sum(error ** 2 for error in errors))


def significant(change: float, stderr: float | None) -> bool | None:
    """Whether |change| exceeds SIGNIFICANCE_SE standard errors (None when the error is unknown)."""
    return None if stderr is None else abs(change) > SIGNIFICANCE_SE * stderr


@dataclass(frozen=True)
class Comparison:
    pair: Pair
    before: Scores
    after: Scores

    def as_dict(self) -> dict[str, Any]:
        ppl = {name: _change(self.before.ppl[name], self.after.ppl[name])
               for name in self.before.ppl if name in self.after.ppl}
        if self.before.wikitext_word_ppl is not None and self.after.wikitext_word_ppl is not None:
            ppl["lm_eval_wikitext_word"] = _change(self.before.wikitext_word_ppl, self.after.wikitext_word_ppl)
            ppl["lm_eval_wikitext_byte"] = _change(self.before.wikitext_byte_ppl, self.after.wikitext_byte_ppl)
        tasks = {}
        for name, before in self.before.tasks.items():
            after = self.after.tasks.get(name)
            if after is None:
                continue
            stderr = combined_stderr(before.stderr, after.stderr)
            tasks[name] = {"metric": before.metric, **_change(before.value, after.value),
                           "stderr_before": before.stderr, "stderr_after": after.stderr, "stderr_change": stderr,
                           "significant": significant(after.value - before.value, stderr), "n": after.n}
        ranked = sorted(tasks, key=lambda name: tasks[name]["change"])
        average_stderr = combined_stderr(self.before.average_stderr, self.after.average_stderr)
        average = {**_change(self.before.average, self.after.average), "stderr_before": self.before.average_stderr,
                   "stderr_after": self.after.average_stderr, "stderr_change": average_stderr,
                   "significant": significant(self.after.average - self.before.average, average_stderr)}
        return {"model": self.pair.model, "pruning_config": self.pair.config, "ppl": ppl, "tasks": tasks,
                "average": average, "largest_gain": ranked[-1] if ranked else None,
                "smallest_gain": ranked[0] if ranked else None,
                "settings": {"ppl_seq_len": self.after.ppl_seq_len, "ppl_add_bos": self.after.ppl_add_bos,
                             "limit": self.after.limit, "lm_eval_version": self.after.lm_eval_version,
                             "evaluation_digest": self.after.digest,
                             "significance": f"|change| > {SIGNIFICANCE_SE:g} x stderr, stderr = "
                                             "sqrt(stderr_before^2 + stderr_after^2)"}}


def _change(before: float, after: float) -> dict[str, float]:
    change = after - before
    return {"before": before, "after": after, "change": change,
            "change_pct": 100.0 * change / before if before else float("nan")}


def _flag(row: dict[str, Any]) -> str:
    return {True: "", False: "  (n.s.)", None: ""}[row.get("significant")]


def render_pair_report(comparison: Comparison) -> str:
    data = comparison.as_dict()
    settings = data["settings"]
    docs = f"the first {settings['limit']} documents of each task" if settings["limit"] else "every document"
    lines = [f"PruneTune comparison: {comparison.pair.label} (pruned -> pruned + LoRA)", "",
             f"Perplexity: LLM-Pruner token perplexity, windows of {settings['ppl_seq_len']} tokens, BOS "
             f"{'on every window' if settings['ppl_add_bos'] else 'only at the start'}; lower is better.",
             f"Zero-shot: lm-eval {settings['lm_eval_version']}, 0-shot, {docs}; higher is better.", "",
             f"{'perplexity':<24}{'before':>12}{'after':>12}{'change':>12}{'change %':>10}"]
    for name, row in data["ppl"].items():
        label = {"lm_eval_wikitext_word": "lm-eval wikitext word", "lm_eval_wikitext_byte": "lm-eval wikitext byte"
                 }.get(name, name)
        lines.append(f"{label:<24}{row['before']:>12.2f}{row['after']:>12.2f}{row['change']:>+12.2f}"
                     f"{row['change_pct']:>+9.1f}%")
    if "lm_eval_wikitext_word" in data["ppl"]:
        lines.append("  (lm-eval wikitext: word/byte perplexity of whole articles, not comparable with the rows above)")
    lines += ["", f"{'zero-shot task':<16}{'metric':>9}{'before':>10}{'after':>10}{'change':>10}{'stderr':>9}"]
    for name, row in data["tasks"].items():
        stderr = f"{row['stderr_change']:>9.4f}" if row["stderr_change"] is not None else f"{'-':>9}"
        lines.append(f"{name:<16}{row['metric']:>9}{row['before']:>10.4f}{row['after']:>10.4f}{row['change']:>+10.4f}"
                     f"{stderr}{_flag(row)}")
    average = data["average"]
    stderr = f"{average['stderr_change']:>9.4f}" if average["stderr_change"] is not None else f"{'-':>9}"
    lines += [f"{'average':<16}{'':>9}{average['before']:>10.4f}{average['after']:>10.4f}{average['change']:>+10.4f}"
              f"{stderr}{_flag(average)}", ""]
    if data["largest_gain"]:
        lines += [f"largest gain:  {data['largest_gain']} ({data['tasks'][data['largest_gain']]['change']:+.4f})",
                  f"smallest gain: {data['smallest_gain']} ({data['tasks'][data['smallest_gain']]['change']:+.4f})"]
    lines += ["", f"stderr: standard error of the change, sqrt(before^2 + after^2) from lm-eval's per-task stderr; "
                  f"(n.s.): |change| <= {SIGNIFICANCE_SE:g} stderr, not a significant difference.", ""]
    return "\n".join(lines)


def _fmt(value: float | None, digits: int) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def csv_rows(comparisons: list[Comparison], missing: list[tuple[Pair, str]], pairs: list[Pair],
             reference: dict[str, Any] | None = None) -> list[dict[str, str]]:
    """One row per pair of the study (missing pairs too, with the reason): every number, for papers."""
    ppl_names = list(dict.fromkeys(name for item in comparisons for name in item.as_dict()["ppl"]))
    task_names = list(dict.fromkeys(name for item in comparisons for name in item.before.tasks))
    by_pair = {item.pair: item for item in comparisons}
    reasons = dict(missing)
    rows = []
    for pair in pairs:
        family, variant = pair.model.removesuffix("-Instruct"), "Instruct" if pair.model.endswith("-Instruct") else "Base"
        row = {"model": pair.model, "family": family, "variant": variant, "pruning_config": pair.config,
               "status": "compared" if pair in by_pair else "missing", "reason": reasons.get(pair, "")}
        data = by_pair[pair].as_dict() if pair in by_pair else {"ppl": {}, "tasks": {}, "average": {}, "settings": {}}
        for name in ppl_names:
            entry = data["ppl"].get(name, {})
            for key in ("before", "after", "change", "change_pct"):
                row[f"{name}_ppl_{key}"] = _fmt(entry.get(key), 4)
        for name in task_names:
            entry = data["tasks"].get(name, {})
            row[f"{name}_metric"] = entry.get("metric", "")
            for key in ("before", "after", "change", "stderr_before", "stderr_after"):
                row[f"{name}_{key}"] = _fmt(entry.get(key), 4)
        for key in ("before", "after", "change", "stderr_change"):
            row[f"avg_acc_{key}"] = _fmt(data["average"].get(key), 4)
        if reference is not None:
            ref = reference.get(pair.model) or {}
            row["avg_acc_unpruned"] = _fmt(ref.get("average"), 4)
        row["docs_per_task"] = str(data["settings"].get("limit") or ("all" if pair in by_pair else ""))
        row["lm_eval_version"] = data["settings"].get("lm_eval_version") or ""
        rows.append(row)
    return rows


def render_summary(comparisons: list[Comparison], missing: list[tuple[Pair, str]]) -> str:
    """The study table as Markdown: every compared pair, best_acc vs best_ppl, and what is missing."""
    ppl_names = sorted({name for item in comparisons for name in item.after.ppl})
    header = ["model", "config"] + [f"{name} ppl before -> after" for name in ppl_names] + \
             ["avg acc before", "avg acc after", "avg acc change"]
    markdown = ["# Study summary", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for item in comparisons:
        change = item.after.average - item.before.average
        stderr = combined_stderr(item.before.average_stderr, item.after.average_stderr)
        flag = " (n.s.)" if significant(change, stderr) is False else ""
        markdown.append("| " + " | ".join(
            [item.pair.model, item.pair.config]
            + [f"{item.before.ppl.get(name, math.nan):.2f} -> {item.after.ppl.get(name, math.nan):.2f}"
               for name in ppl_names]
            + [f"{item.before.average:.4f}", f"{item.after.average:.4f}", f"{change:+.4f}{flag}"]) + " |")
    markdown += ["", "## best_acc vs best_ppl after finetuning", "",
                 "| model | best_acc avg acc | best_ppl avg acc | higher avg acc |", "|---|---|---|---|"]
    by_pair = {item.pair: item for item in comparisons}
    for model in dict.fromkeys(item.pair.model for item in comparisons):
        acc, ppl = by_pair.get(Pair(model, "best_acc")), by_pair.get(Pair(model, "best_ppl"))
        if acc and ppl:
            difference = acc.after.average - ppl.after.average
            stderr = combined_stderr(acc.after.average_stderr, ppl.after.average_stderr)
            better = "best_acc" if difference >= 0 else "best_ppl"
            if significant(difference, stderr) is False:
                better = f"neither (difference {difference:+.4f} within {SIGNIFICANCE_SE:g} stderr)"
            markdown.append(f"| {model} | {acc.after.average:.4f} | {ppl.after.average:.4f} | {better} |")
    markdown += ["", "(n.s.): the change is within 2 standard errors (lm-eval's per-task stderr), not significant. "
                 "REPORT.md answers the research questions with plots; summary.csv has every number.",
                 "", f"Pairs compared: {len(comparisons)}. Missing: {len(missing)}."]
    markdown += [f"- {pair.label}: {reason}" for pair, reason in missing]
    return "\n".join(markdown) + "\n"


def render_csv(rows: list[dict[str, str]]) -> str:
    stream = io.StringIO()
    columns = list(dict.fromkeys(key for row in rows for key in row))
    writer = csv.DictWriter(stream, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    return stream.getvalue()


def collect(config: StudyConfig, pairs: tuple[Pair, ...] | list[Pair]
            ) -> tuple[list[Comparison], list[tuple[Pair, str]]]:
    """Every pair's comparison, or the reason it has none."""
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
        problem = incompatibility(before, after)
        if problem:
            missing.append((pair, problem))
            continue
        comparisons.append(Comparison(pair, before, after))
    return comparisons, missing


def run(config: StudyConfig, pairs: tuple[Pair, ...] | list[Pair]) -> Path:
    """Write every pair's comparison and the study's SUMMARY.md, summary.csv and REPORT.md; returns REPORT.md."""
    from workers import report

    paths = StudyPaths(config)
    comparisons, missing = collect(config, pairs)
    for comparison in comparisons:
        folder = paths.finetuned_eval_dir(comparison.pair)
        atomic_write_text(folder / "comparison_report.txt", render_pair_report(comparison))
        atomic_write_json(folder / "comparison.json", comparison.as_dict())
    reference, _ = report.load_reference(config.study.reference_results)
    atomic_write_text(paths.study_summary(), render_summary(comparisons, missing))
    atomic_write_text(paths.root / "summary.csv", render_csv(csv_rows(comparisons, missing, list(pairs), reference)))
    written = report.write_report(config, list(pairs), comparisons, missing)
    log.info("compared %d pair(s); %d missing; summary in %s, report in %s", len(comparisons), len(missing),
             paths.study_summary(), written)
    return written
