"""The study report: ``<results_root>/REPORT.md`` with its plots in ``<results_root>/report_plots/``.

Written by the compare job and by ``python launch.py report`` (from the results tree, no SLURM, no torch).
One section per research question of the study, each stating the numbers it rests on and how many pairs:

1. which pruning config (best_acc, best_ppl) recovers better;
2. how much of the pruning loss LoRA recovers (needs ``study.reference_results``, the unpruned models' scores;
   without them only the before -> after change is reported);
3. how the accuracy/perplexity trade-off moves;
4. whether the architectures differ;
5. Instruct vs Base.

The text never claims more than the numbers carry: a difference within 2 standard errors (lm-eval's per-task
stderr) is called not significant, a study whose accuracies sit at chance level says so first, and every
missing pair is listed with its reason.
"""
from __future__ import annotations

import json
import math
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from jobs.config import StudyConfig
from jobs.state import atomic_write_text
from jobs.study import Pair, StudyPaths
from workers.compare import SIGNIFICANCE_SE, Comparison, Scores, combined_stderr, significant

REPORT_FILE = "REPORT.md"
PLOTS_DIR = "report_plots"
# Accuracy of guessing at random (ARC has 3-5 choices, mostly 4); a study at this level has no findings.
CHANCE = {"boolq": 0.5, "piqa": 0.5, "winogrande": 0.5, "hellaswag": 0.25, "arc_easy": 0.25,
          "arc_challenge": 0.25, "openbookqa": 0.25}


def family(model: str) -> str:
    return model.removesuffix("-Instruct")


def variant(model: str) -> str:
    return "Instruct" if model.endswith("-Instruct") else "Base"


def load_reference(path: str) -> tuple[dict[str, Any] | None, str | None]:
    """The unpruned models' scores from ``study.reference_results`` (None, problem) when absent or unreadable.

    Format: {"<model>": {"ppl": {"wikitext2": ..., "ptb": ...}, "tasks": {"boolq": ..., ...}, "average": ...}};
    ``average`` defaults to the mean of the tasks when all seven are given.
    """
    if not path:
        return None, None
    try:
        raw = json.loads(Path(path).read_text())
        reference = {}
        for model, entry in raw.items():
            tasks = {name: float(value) for name, value in (entry.get("tasks") or {}).items()}
            average = entry.get("average")
            if average is None and set(CHANCE) <= set(tasks):
                average = sum(tasks[name] for name in CHANCE) / len(CHANCE)
            reference[model] = {"ppl": {name: float(value) for name, value in (entry.get("ppl") or {}).items()},
                                "tasks": tasks, "average": None if average is None else float(average)}
        return reference, None
    except (OSError, ValueError, TypeError, AttributeError) as error:
        return None, (f"study.reference_results {path} could not be read ({type(error).__name__}: {error}); "
                      "expected {\"<model>\": {\"ppl\": {...}, \"tasks\": {...}}}")


def _pm(change: float, stderr: float | None, scale: float = 100.0, unit: str = " pts") -> str:
    """'+1.2 ± 0.8 pts' (and 'n.s.' when within the significance threshold)."""
    text = f"{scale * change:+.1f}" + (f" ± {scale * stderr:.1f}" if stderr is not None else "") + unit
    return text + (" (n.s.)" if significant(change, stderr) is False else "")


def _pct(before: float, after: float) -> float:
    return 100.0 * (after - before) / before if before else math.nan


def _gain(item: Comparison) -> tuple[float, float | None]:
    return (item.after.average - item.before.average,
            combined_stderr(item.before.average_stderr, item.after.average_stderr))


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda index: values[index])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3:
        return None
    rx, ry = _ranks(xs), _ranks(ys)
    if len(set(rx)) < 2 or len(set(ry)) < 2:
        return None
    return statistics.correlation(rx, ry)


def _at_chance(scores: Scores) -> bool:
    chance = sum(CHANCE.get(name, 0.25) for name in scores.tasks) / max(len(scores.tasks), 1)
    stderr = scores.average_stderr
    return abs(scores.average - chance) <= (SIGNIFICANCE_SE * stderr if stderr is not None else 0.02)


def _ppl_name(comparisons: list[Comparison]) -> str | None:
    common = set.intersection(*(set(item.before.ppl) & set(item.after.ppl) for item in comparisons)) \
        if comparisons else set()
    return "wikitext2" if "wikitext2" in common else (sorted(common)[0] if common else None)


def section_measured(comparisons: list[Comparison], ppl_name: str | None) -> list[str]:
    sample = comparisons[0].after
    limits = sorted({item.after.limit or 0 for item in comparisons})
    docs = "every document of each task" if limits == [0] else \
        f"the first {', '.join(str(limit) for limit in limits if limit)} documents of each task (evaluate.limit)"
    errors = [task.stderr for item in comparisons for task in item.after.tasks.values() if task.stderr is not None]
    typical = f" A single task's standard error is about ±{100 * statistics.median(errors):.1f} points here." \
        if errors else ""
    metrics = ", ".join(f"{name} ({task.metric})" for name, task in sample.tasks.items())
    versions = ", ".join(f"{name} {version}" for name, version in sample.task_versions)
    lines = ["## What was measured", "",
             f"- **Perplexity (PPL)** is LLM-Pruner's token perplexity: each split joined with `\\n\\n`, tokenized "
             f"once, cut into non-overlapping windows of {sample.ppl_seq_len} tokens (tail dropped), BOS "
             f"{'on every window' if sample.ppl_add_bos else 'only where the tokenizer puts it, at the start'}, "
             "exp of the mean token NLL. Lower is better. The plots use "
             f"{ppl_name or 'no perplexity (none in common)'}.",
             f"- **Zero-shot accuracy** comes from lm-eval {sample.lm_eval_version}'s own task definitions, 0-shot, "
             f"on {docs}: {metrics}; task versions {versions or 'not recorded'}. The average is over the "
             f"{len(sample.tasks)} tasks.{typical}",
             f"- **Significance**: a difference is called significant only when it exceeds {SIGNIFICANCE_SE:g} "
             "standard errors. The average's stderr is sqrt(sum of the task stderrs²)/7; a change's stderr is "
             "sqrt(before² + after²), conservative because both runs score the same documents. Smaller "
             "differences are marked (n.s.) and not read as findings."]
    if any(item.after.wikitext_word_ppl is not None for item in comparisons):
        lines.append("- **lm-eval wikitext** (word and byte perplexity of whole articles, rolling windows) is a "
                     "different quantity from the token PPL above: per word, not per token, on document-level "
                     "text. It is listed in each pair's comparison_report.txt and never mixed with the token PPL.")
    return lines + [""]


def section_results(comparisons: list[Comparison], ppl_name: str | None, plots: dict[str, Path | None]) -> list[str]:
    lines = ["## Results", "", f"| pair | {ppl_name or 'ppl'} before → after (change) | avg acc before → after | "
             "change ± stderr |", "|---|---|---|---|"]
    for item in comparisons:
        ppl = (f"{item.before.ppl[ppl_name]:.2f} → {item.after.ppl[ppl_name]:.2f} "
               f"({_pct(item.before.ppl[ppl_name], item.after.ppl[ppl_name]):+.1f}%)") if ppl_name else "-"
        lines.append(f"| {item.pair.label} | {ppl} | {item.before.average:.4f} → {item.after.average:.4f} | "
                     f"{_pm(*_gain(item))} |")
    lines.append("")
    for key, caption in (("acc_vs_ppl", "Accuracy vs perplexity, each pair's arrow from pruned to pruned + LoRA"),
                         ("heatmap", "Per-task accuracy change (points), pairs × tasks")):
        if plots.get(key):
            lines += [f"![{caption}]({PLOTS_DIR}/{plots[key].name})", "", f"*{caption}.*", ""]
    return lines


def section_configs(comparisons: list[Comparison], ppl_name: str | None, plot: Path | None) -> list[str]:
    lines = ["## 1. Which pruning config recovers better: best_acc or best_ppl?", ""]
    by_pair = {item.pair: item for item in comparisons}
    models = [m for m in dict.fromkeys(i.pair.model for i in comparisons)
              if Pair(m, "best_acc") in by_pair and Pair(m, "best_ppl") in by_pair]
    if not models:
        return lines + ["No model has both configs compared, so the configs cannot be compared.", ""]
    lines += ["| model | gain best_acc | gain best_ppl | best_acc − best_ppl | avg acc after (acc / ppl) | "
              f"{ppl_name} after (acc / ppl) |", "|---|---|---|---|---|---|"]
    more = sig_more = fewer = sig_fewer = higher_after = sig_higher = lower_ppl = 0
    for model in models:
        acc, ppl = by_pair[Pair(model, "best_acc")], by_pair[Pair(model, "best_ppl")]
        (gain_a, se_a), (gain_p, se_p) = _gain(acc), _gain(ppl)
        difference, stderr = gain_a - gain_p, combined_stderr(se_a, se_p)
        more, fewer = more + (difference > 0), fewer + (difference < 0)
        sig_more += difference > 0 and bool(significant(difference, stderr))
        sig_fewer += difference < 0 and bool(significant(difference, stderr))
        after_difference = acc.after.average - ppl.after.average
        higher_after += after_difference > 0
        sig_higher += after_difference > 0 and bool(significant(
            after_difference, combined_stderr(acc.after.average_stderr, ppl.after.average_stderr)))
        ppl_text = "-"
        if ppl_name:
            lower_ppl += acc.after.ppl[ppl_name] < ppl.after.ppl[ppl_name]
            ppl_text = f"{acc.after.ppl[ppl_name]:.2f} / {ppl.after.ppl[ppl_name]:.2f}"
        lines.append(f"| {model} | {_pm(gain_a, se_a)} | {_pm(gain_p, se_p)} | {_pm(difference, stderr)} | "
                     f"{acc.after.average:.4f} / {ppl.after.average:.4f} | {ppl_text} |")
    n = len(models)
    lines += ["", f"Based on {n} model(s) with both configs compared. best_acc gained more average accuracy from "
              f"LoRA in {more} of {n} ({sig_more} beyond {SIGNIFICANCE_SE:g} stderr), best_ppl in {fewer} of {n} "
              f"({sig_fewer} beyond {SIGNIFICANCE_SE:g} stderr). After finetuning, best_acc has the higher average "
              f"accuracy in {higher_after} of {n} ({sig_higher} significantly)"
              + (f" and the lower {ppl_name} perplexity in {lower_ppl} of {n}." if ppl_name else ".")]
    if sig_more + sig_fewer == 0:
        lines.append("No model shows a significant difference in recovery between the two configs.")
    if plot:
        lines += ["", f"![best_acc vs best_ppl after finetuning]({PLOTS_DIR}/{plot.name})"]
    return lines + [""]


def section_recovery(comparisons: list[Comparison], ppl_name: str | None, reference: dict[str, Any] | None,
                     problem: str | None) -> list[str]:
    lines = ["## 2. How much of the pruning loss does LoRA recover?", ""]
    if reference is None:
        gains = [_gain(item) for item in comparisons]
        up = sum(1 for change, se in gains if change > 0 and significant(change, se))
        down = sum(1 for change, se in gains if change < 0 and significant(change, se))
        ppl_down = sum(1 for item in comparisons if ppl_name and item.after.ppl[ppl_name] < item.before.ppl[ppl_name])
        lines += [problem or "No scores of the unpruned models were given (`study.reference_results`), so the "
                  "pruning loss is unknown and recovery is reported only as the before → after change.", "",
                  f"Over {len(comparisons)} pair(s): average accuracy rose significantly in {up}, fell significantly "
                  f"in {down}, and changed within {SIGNIFICANCE_SE:g} stderr in {len(comparisons) - up - down}"
                  + (f"; {ppl_name} perplexity fell in {ppl_down} of {len(comparisons)}." if ppl_name else ".")
                  + " The per-pair changes are in the Results table.", ""]
        return lines
    lines += ["Recovered share = (after − pruned) / (unpruned − pruned): accuracy on its own scale, perplexity on a "
              "log scale. It is left out (–) where pruning cost no measurable accuracy (loss within "
              f"{SIGNIFICANCE_SE:g} stderr of the pruned model's score) or raised no perplexity.", "",
              f"| pair | avg acc unpruned → pruned → +LoRA | recovered | {ppl_name} unpruned → pruned → +LoRA | "
              "recovered |", "|---|---|---|---|---|"]
    shares, ppl_shares, without = [], [], []
    for item in comparisons:
        ref = reference.get(item.pair.model)
        if not ref:
            without.append(item.pair.label)
            continue
        acc_text = share_text = ppl_text = ppl_share = "–"
        if ref["average"] is not None:
            loss = ref["average"] - item.before.average
            acc_text = f"{ref['average']:.4f} → {item.before.average:.4f} → {item.after.average:.4f}"
            if significant(loss, item.before.average_stderr) and loss > 0:
                share = 100 * (item.after.average - item.before.average) / loss
                shares.append(share)
                share_text = f"{share:.0f}%"
        reference_ppl = ref["ppl"].get(ppl_name) if ppl_name else None
        if reference_ppl:
            before, after = item.before.ppl[ppl_name], item.after.ppl[ppl_name]
            ppl_text = f"{reference_ppl:.2f} → {before:.2f} → {after:.2f}"
            if before > reference_ppl:
                value = 100 * (math.log(before) - math.log(after)) / (math.log(before) - math.log(reference_ppl))
                ppl_shares.append(value)
                ppl_share = f"{value:.0f}%"
        lines.append(f"| {item.pair.label} | {acc_text} | {share_text} | {ppl_text} | {ppl_share} |")
    lines.append("")
    if shares:
        lines.append(f"Median recovered share of the accuracy loss: {statistics.median(shares):.0f}% over "
                     f"{len(shares)} pair(s) with a measurable loss (range {min(shares):.0f}% to {max(shares):.0f}%).")
    else:
        lines.append("No pair lost measurable accuracy to pruning, so no recovered share of accuracy is computed.")
    if ppl_shares:
        lines.append(f"Median recovered share of the {ppl_name} perplexity increase: {statistics.median(ppl_shares):.0f}%"
                     f" over {len(ppl_shares)} pair(s).")
    if without:
        lines.append(f"No unpruned scores for: {', '.join(without)}.")
    return lines + [""]


def section_tradeoff(comparisons: list[Comparison], ppl_name: str | None) -> list[str]:
    lines = ["## 3. How does the accuracy/perplexity trade-off move?", ""]
    if not ppl_name:
        return lines + ["No perplexity dataset is common to every pair; the trade-off is not computed.", ""]
    both = ppl_only = acc_only = neither = 0
    for item in comparisons:
        change, se = _gain(item)
        acc_up = change > 0 and bool(significant(change, se))
        ppl_down = item.after.ppl[ppl_name] < item.before.ppl[ppl_name]
        both, ppl_only = both + (acc_up and ppl_down), ppl_only + (ppl_down and not acc_up)
        acc_only, neither = acc_only + (acc_up and not ppl_down), neither + (not acc_up and not ppl_down)
    changes = [_pct(item.before.ppl[ppl_name], item.after.ppl[ppl_name]) for item in comparisons]
    n = len(comparisons)
    lines += [f"Over {n} pair(s): {ppl_name} perplexity fell and average accuracy rose significantly in {both}; "
              f"perplexity fell without a significant accuracy gain in {ppl_only}; accuracy rose significantly "
              f"while perplexity did not fall in {acc_only}; neither improved in {neither}. Median perplexity "
              f"change {statistics.median(changes):+.1f}% (range {min(changes):+.1f}% to {max(changes):+.1f}%)."]
    threshold = 1.96 / math.sqrt(n - 1) if n > 1 else math.nan
    for label, scores in (("before", [item.before for item in comparisons]), ("after", [item.after for item in comparisons])):
        rho = spearman([s.ppl[ppl_name] for s in scores], [s.average for s in scores])
        if rho is None:
            continue
        verdict = "distinguishable from no relation" if abs(rho) > threshold else "not distinguishable from no relation"
        lines.append(f"Rank correlation of {ppl_name} perplexity with average accuracy {label} finetuning: "
                     f"Spearman ρ = {rho:+.2f} over {n} pairs ({verdict}; |ρ| must exceed about {threshold:.2f} "
                     "at this n).")
    return lines + ["", "The arrows in the accuracy-vs-perplexity plot above show each pair's move.", ""]


def section_architectures(comparisons: list[Comparison], ppl_name: str | None, plot: Path | None) -> list[str]:
    lines = ["## 4. Do the architectures differ?", ""]
    families = list(dict.fromkeys(family(item.pair.model) for item in comparisons))
    rows = []
    lines += ["| architecture | pairs | avg acc before → after | mean gain ± stderr | "
              f"mean {ppl_name or 'ppl'} change |", "|---|---|---|---|---|"]
    for name in families:
        members = [item for item in comparisons if family(item.pair.model) == name]
        gains = [_gain(item) for item in members]
        mean = sum(change for change, _ in gains) / len(gains)
        errors = [se for _, se in gains]
        stderr = None if None in errors else math.sqrt(sum(se ** 2 for se in errors)) / len(errors)
        ppl_change = statistics.mean(_pct(i.before.ppl[ppl_name], i.after.ppl[ppl_name]) for i in members) \
            if ppl_name else math.nan
        rows.append((name, mean, stderr))
        lines.append(f"| {name} | {len(members)} | {statistics.mean(i.before.average for i in members):.4f} → "
                     f"{statistics.mean(i.after.average for i in members):.4f} | {_pm(mean, stderr)} | "
                     f"{ppl_change:+.1f}% |")
    lines.append("")
    if len(rows) < 2:
        lines.append("Only one architecture is compared; there is nothing to contrast.")
    else:
        best, worst = max(rows, key=lambda row: row[1]), min(rows, key=lambda row: row[1])
        difference, stderr = best[1] - worst[1], combined_stderr(best[2], worst[2])
        lines.append(f"Largest mean accuracy gain: {best[0]} ({_pm(best[1], best[2])}); smallest: {worst[0]} "
                     f"({_pm(worst[1], worst[2])}); their difference is {_pm(difference, stderr)}"
                     + (", not significant." if significant(difference, stderr) is False else "."))
        sizes = [sum(1 for item in comparisons if family(item.pair.model) == row[0]) for row in rows]
        count = str(min(sizes)) if min(sizes) == max(sizes) else f"{min(sizes)} to {max(sizes)}"
        lines.append(f"Each architecture mean rests on {count} pairs; with so few, a difference "
                     "between architectures can also come from the pruning configs or variants each one has.")
    if plot:
        lines += ["", f"![By architecture]({PLOTS_DIR}/{plot.name})"]
    return lines + [""]


def section_instruct(comparisons: list[Comparison], plot: Path | None) -> list[str]:
    lines = ["## 5. Instruct vs Base", ""]
    by_pair = {item.pair: item for item in comparisons}
    matches = [(item, by_pair[Pair(f"{item.pair.model}-Instruct", item.pair.config)]) for item in comparisons
               if variant(item.pair.model) == "Base" and Pair(f"{item.pair.model}-Instruct", item.pair.config) in by_pair]
    if not matches:
        return lines + ["No Base model has its Instruct counterpart compared with the same config.", ""]
    lines += ["| architecture / config | gain Base | gain Instruct | Instruct − Base | avg acc after (Base / Instruct) |",
              "|---|---|---|---|---|"]
    larger = sig = 0
    for base, instruct in matches:
        (gain_b, se_b), (gain_i, se_i) = _gain(base), _gain(instruct)
        difference, stderr = gain_i - gain_b, combined_stderr(se_b, se_i)
        larger += difference > 0
        sig += bool(significant(difference, stderr))
        lines.append(f"| {base.pair.model} / {base.pair.config} | {_pm(gain_b, se_b)} | {_pm(gain_i, se_i)} | "
                     f"{_pm(difference, stderr)} | {base.after.average:.4f} / {instruct.after.average:.4f} |")
    lines += ["", f"Based on {len(matches)} Base/Instruct match(es): the Instruct model gained more average accuracy "
              f"in {larger} of {len(matches)}; {sig} of the {len(matches)} differences exceed {SIGNIFICANCE_SE:g} stderr."]
    if plot:
        lines += ["", f"![Base vs Instruct]({PLOTS_DIR}/{plot.name})"]
    return lines + [""]


def write_report(config: StudyConfig, pairs: list[Pair], comparisons: list[Comparison],
                 missing: list[tuple[Pair, str]]) -> Path:
    """Render the plots and REPORT.md for the study; returns REPORT.md's path."""
    from workers import report_plots

    root = StudyPaths(config).root
    plots_dir = root / PLOTS_DIR
    reference, problem = load_reference(config.study.reference_results)
    ppl_name = _ppl_name(comparisons)
    plots: dict[str, Path | None] = {}
    if comparisons and ppl_name:
        plots["acc_vs_ppl"] = report_plots.acc_vs_ppl(comparisons, ppl_name, reference, plots_dir / "acc_vs_ppl.png")
        plots["configs"] = report_plots.best_acc_vs_best_ppl(comparisons, ppl_name, plots_dir / "best_acc_vs_best_ppl.png")
        plots["architectures"] = report_plots.by_architecture(comparisons, ppl_name, plots_dir / "by_architecture.png")
    if comparisons:
        tasks = list(dict.fromkeys(name for item in comparisons for name in item.before.tasks))
        plots["heatmap"] = report_plots.task_delta_heatmap(comparisons, tasks, plots_dir / "task_delta_heatmap.png")
        plots["instruct"] = report_plots.base_vs_instruct(comparisons, plots_dir / "base_vs_instruct.png")
    for stale in plots_dir.glob("*.png") if plots_dir.is_dir() else ():  # a plot this run did not draw
        if stale not in plots.values():
            stale.unlink()
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# PruneTune study report", "",
             f"Generated {stamp} from `{root}` (`python launch.py report` writes it again). "
             f"{len(comparisons)} of {len(pairs)} pair(s) compared; {len(missing)} missing (listed at the end).", ""]
    evaluations = [scores for item in comparisons for scores in (item.before, item.after)]
    at_chance = sum(1 for scores in evaluations if _at_chance(scores))
    if at_chance:
        chance = sum(CHANCE.get(name, 0.25) for name in comparisons[0].after.tasks) / len(comparisons[0].after.tasks)
        lines += [(f"> **Every evaluation scores at chance level** (average accuracy within {SIGNIFICANCE_SE:g} stderr "
                   f"of random guessing, about {chance:.3f}). The comparisons below are computed, but they describe "
                   "noise, not the models: there are no findings in this study's accuracies."
                   if at_chance == len(evaluations) else
                   f"> **{at_chance} of {len(evaluations)} evaluations score at chance level** (average accuracy "
                   f"within {SIGNIFICANCE_SE:g} stderr of random guessing, about {chance:.3f})"
                   + ("; a few of this many evaluations land beyond 2 stderr by luck alone, so treat this study's "
                      "accuracy comparisons as noise." if 2 * at_chance >= len(evaluations) else
                      "; accuracy comparisons involving them describe noise.")), ""]
    if problem:
        lines += [f"> {problem}", ""]
    if not comparisons:
        lines += ["No pair has both evaluations yet, so there is nothing to compare.", ""]
    else:
        lines += section_measured(comparisons, ppl_name)
        lines += section_results(comparisons, ppl_name, plots)
        questions = [section_configs(comparisons, ppl_name, plots.get("configs")),
                     section_recovery(comparisons, ppl_name, reference, problem),
                     section_tradeoff(comparisons, ppl_name),
                     section_architectures(comparisons, ppl_name, plots.get("architectures")),
                     section_instruct(comparisons, plots.get("instruct"))]
        for section in questions:
            if 2 * at_chance >= len(evaluations):  # under each heading, where a reader who skips lands
                section[2:2] = ["*Accuracies at chance level (see the note at the top): the accuracy numbers "
                                "below are computed, not findings.*", ""]
            lines += section
    lines += ["## Missing pairs", ""]
    lines += [f"- {pair.label}: {reason}" for pair, reason in missing] or ["None: every pair of the study is compared."]
    lines += ["", "Per-pair details: `finetuned_evaluation/<model>/<config>_finetuned/comparison_report.txt`; every "
              "number for papers: `summary.csv`; the study table: `SUMMARY.md`.", ""]
    path = root / REPORT_FILE
    atomic_write_text(path, "\n".join(lines))
    return path
