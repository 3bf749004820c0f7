"""The study report's plots (matplotlib, Agg backend, PNG): one function per figure, each returns its path.

Every figure shows only compared pairs (the report lists the missing ones) and is drawn for a reader: PPL on a
log axis, one colour per architecture, one marker per pruning config, Base solid and Instruct dashed, legends
outside the data. Imports matplotlib only (no torch).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter, NullLocator  # noqa: E402

from workers.compare import Comparison, combined_stderr  # noqa: E402

FAMILY_COLOURS = {"Llama": "#1f77b4", "Qwen": "#d62728", "Mistral": "#2ca02c"}
EXTRA_COLOURS = ["#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
CONFIG_MARKERS = {"best_acc": "o", "best_ppl": "s"}
DPI = 130


def family(model: str) -> str:
    return model.removesuffix("-Instruct")


def variant(model: str) -> str:
    return "Instruct" if model.endswith("-Instruct") else "Base"


def colour(name: str, families: list[str]) -> str:
    if name in FAMILY_COLOURS:
        return FAMILY_COLOURS[name]
    others = [item for item in families if item not in FAMILY_COLOURS]
    return EXTRA_COLOURS[others.index(name) % len(EXTRA_COLOURS)] if name in others else "#333333"


def _families(comparisons: list[Comparison]) -> list[str]:
    return list(dict.fromkeys(family(item.pair.model) for item in comparisons))


def _log_axis(axis: plt.Axes, which: str) -> None:
    """A log axis labelled with plain numbers (5, 10, 20, 50 ...), not 10^1 and 2x10^1.

    Call after plotting: a range narrower than a factor of 3 gets evenly spaced ticks (990, 1000, 1010, ...),
    since 1-2-5 ticks would leave it with one label or none.
    """
    target = axis.xaxis if which == "x" else axis.yaxis
    (axis.set_xscale if which == "x" else axis.set_yscale)("log")
    low, high = axis.get_xlim() if which == "x" else axis.get_ylim()
    narrow = high / low < 3
    target.set_major_locator(MaxNLocator(nbins=6) if narrow else LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    target.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    target.set_minor_formatter(NullFormatter())
    if narrow:
        target.set_minor_locator(NullLocator())


def _save(figure: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return path


def acc_vs_ppl(comparisons: list[Comparison], ppl_name: str, reference: dict[str, Any] | None, path: Path) -> Path:
    """Average accuracy against perplexity, an arrow from before to after finetuning for every pair."""
    families = _families(comparisons)
    figure, axis = plt.subplots(figsize=(8.5, 5.5))
    for item in comparisons:
        model, config = item.pair.model, item.pair.config
        tint = colour(family(model), families)
        marker = CONFIG_MARKERS.get(config, "D")
        style = "--" if variant(model) == "Instruct" else "-"
        x0, y0 = item.before.ppl[ppl_name], item.before.average
        x1, y1 = item.after.ppl[ppl_name], item.after.average
        axis.annotate("", xy=(x1, y1), xytext=(x0, y0),
                      arrowprops={"arrowstyle": "-|>", "color": tint, "lw": 1.4, "linestyle": style,
                                  "shrinkA": 4, "shrinkB": 5, "alpha": 0.9})
        axis.plot([x0], [y0], marker=marker, markersize=8, markerfacecolor="white", markeredgecolor=tint,
                  markeredgewidth=1.6, linestyle="none")
        axis.plot([x1], [y1], marker=marker, markersize=8, color=tint, linestyle="none")
    if reference:
        for model, entry in reference.items():
            value = (entry.get("ppl") or {}).get(ppl_name)
            if value and entry.get("average") is not None and family(model) in families:
                tint = colour(family(model), families)
                axis.plot([value], [entry["average"]], marker="*", markersize=15, linestyle="none", color=tint,
                          markerfacecolor="white" if variant(model) == "Instruct" else tint,
                          markeredgecolor=tint if variant(model) == "Instruct" else "black", markeredgewidth=1.0)
    _log_axis(axis, "x")
    axis.set_xlabel(f"{ppl_name} perplexity (LLM-Pruner token PPL, log scale; lower is better)")
    axis.set_ylabel("average zero-shot accuracy (7 tasks; higher is better)")
    axis.set_title("Accuracy vs perplexity: pruned (hollow) -> pruned + LoRA (filled)")
    axis.grid(True, which="both", alpha=0.3)
    handles = [Line2D([], [], color=colour(name, families), lw=3, label=name) for name in families]
    handles += [Line2D([], [], marker=marker, color="black", markerfacecolor="white", linestyle="none",
                       markersize=8, label=config) for config, marker in CONFIG_MARKERS.items()]
    handles += [Line2D([], [], color="black", linestyle="-", label="Base"),
                Line2D([], [], color="black", linestyle="--", label="Instruct")]
    if reference:
        handles.append(Line2D([], [], marker="*", color="grey", markeredgecolor="black", linestyle="none",
                              markersize=12, label="unpruned (Instruct hollow)"))
    axis.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(figure, path)


def task_delta_heatmap(comparisons: list[Comparison], tasks: list[str], path: Path) -> Path:
    """Pairs x tasks: change of each task's accuracy (points); not significant ones in parentheses."""
    columns = tasks + ["average"]
    rows, labels, faint = [], [], []
    for item in comparisons:
        data = item.as_dict()
        values, weak = [], []
        for task in tasks:
            entry = data["tasks"].get(task)
            values.append(100 * entry["change"] if entry else math.nan)
            weak.append(bool(entry) and entry["significant"] is False)
        values.append(100 * data["average"]["change"])
        weak.append(data["average"]["significant"] is False)
        rows.append(values)
        faint.append(weak)
        labels.append(f"{item.pair.model} / {item.pair.config}")
    finite = [abs(value) for row in rows for value in row if not math.isnan(value)]
    limit = max(max(finite, default=1.0), 0.5)
    figure, axis = plt.subplots(figsize=(1.05 * len(columns) + 3.2, 0.42 * len(rows) + 1.8))
    image = axis.imshow(rows, cmap="RdBu", norm=TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit), aspect="auto")
    axis.set_xticks(range(len(columns)), [name.replace("_", "\n") for name in columns])
    axis.set_yticks(range(len(rows)), labels)
    axis.axvline(len(tasks) - 0.5, color="black", lw=1.2)
    for row_index, row in enumerate(rows):
        for column_index, value in enumerate(row):
            if math.isnan(value):
                continue
            strong = abs(value) > 0.6 * limit
            text = f"({value:+.1f})" if faint[row_index][column_index] else f"{value:+.1f}"
            axis.text(column_index, row_index, text, ha="center", va="center", fontsize=8,
                      color="white" if strong else "black")
    bar = figure.colorbar(image, ax=axis, fraction=0.04, pad=0.02)
    bar.set_label("accuracy change after - before (points)")
    axis.set_title("Per-task change from LoRA finetuning\n(in parentheses: within 2 stderr, not significant)")
    return _save(figure, path)


def _bar_pairs(axis: plt.Axes, groups: list[str], series: dict[str, list[float | None]],
               errors: dict[str, list[float | None]], colours: dict[str, str], hatches: dict[str, str]) -> None:
    width = 0.8 / max(len(series), 1)
    for offset, (name, values) in enumerate(series.items()):
        xs = [index - 0.4 + width * (offset + 0.5) for index in range(len(groups))]
        heights = [value if value is not None else math.nan for value in values]
        yerr = [error if error is not None else 0.0 for error in errors.get(name, [None] * len(values))]
        axis.bar(xs, heights, width * 0.92, yerr=yerr, capsize=3, color=colours[name], hatch=hatches.get(name, ""),
                 edgecolor="black", linewidth=0.6, label=name)
    axis.set_xticks(range(len(groups)), groups, rotation=20, ha="right")
    axis.grid(True, axis="y", alpha=0.3)


def best_acc_vs_best_ppl(comparisons: list[Comparison], ppl_name: str, path: Path) -> Path | None:
    """Per model: best_acc next to best_ppl, before (hollow) and after (filled) finetuning, accuracy and PPL."""
    by_pair = {(item.pair.model, item.pair.config): item for item in comparisons}
    models = [model for model in dict.fromkeys(item.pair.model for item in comparisons)
              if (model, "best_acc") in by_pair and (model, "best_ppl") in by_pair]
    if not models:
        return None
    colours = {"best_acc": "#4c72b0", "best_ppl": "#dd8452"}
    figure, (left, right) = plt.subplots(1, 2, figsize=(max(10.0, 1.4 * len(models) + 6), 4.6))
    for offset, config in ((-0.15, "best_acc"), (0.15, "best_ppl")):
        tint, marker = colours[config], CONFIG_MARKERS[config]
        for index, model in enumerate(models):
            item, x = by_pair[(model, config)], index + offset
            for axis, before, after, error in ((left, item.before.average, item.after.average,
                                                item.after.average_stderr),
                                               (right, item.before.ppl[ppl_name], item.after.ppl[ppl_name], None)):
                # Before a little left of after, joined by a thin line: the error bar is the after point's alone.
                axis.plot([x - 0.05, x + 0.05], [before, after], color=tint, lw=1.0, alpha=0.7)
                axis.plot([x - 0.05], [before], marker=marker, markersize=7, markerfacecolor="white",
                          markeredgecolor=tint, markeredgewidth=1.5, linestyle="none")
                axis.errorbar([x + 0.05], [after], yerr=[error] if error is not None else None, marker=marker,
                              markersize=7, color=tint, capsize=3, linestyle="none")
    for axis in (left, right):
        axis.set_xticks(range(len(models)), models, rotation=20, ha="right")
        axis.set_xlim(-0.6, len(models) - 0.4)
        axis.grid(True, axis="y", alpha=0.3)
    left.set_ylabel("average accuracy (7 tasks)")
    left.set_title("Average zero-shot accuracy (higher is better)")
    _log_axis(right, "y")
    right.set_ylabel(f"{ppl_name} perplexity (log scale)")
    right.set_title("Perplexity (lower is better)")
    handles = [Line2D([], [], marker=CONFIG_MARKERS[config], color=tint, linestyle="none", markersize=8, label=config)
               for config, tint in colours.items()]
    handles += [Line2D([], [], marker="o", color="black", markerfacecolor="white", linestyle="none", label="pruned"),
                Line2D([], [], marker="o", color="black", linestyle="none", label="pruned + LoRA (±1 stderr)")]
    right.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    figure.suptitle("best_acc vs best_ppl, before and after finetuning")
    figure.tight_layout()
    return _save(figure, path)


def base_vs_instruct(comparisons: list[Comparison], path: Path) -> Path | None:
    """Per architecture and config: the accuracy gain from LoRA of the Base and of the Instruct model."""
    by_pair = {(item.pair.model, item.pair.config): item for item in comparisons}
    groups, base, instruct, base_err, instruct_err = [], [], [], [], []
    for item in comparisons:
        model, config = item.pair.model, item.pair.config
        if variant(model) != "Base" or (f"{model}-Instruct", config) not in by_pair:
            continue
        other = by_pair[(f"{model}-Instruct", config)]
        groups.append(f"{model} / {config}")
        base.append(item.after.average - item.before.average)
        instruct.append(other.after.average - other.before.average)
        base_err.append(combined_stderr(item.before.average_stderr, item.after.average_stderr))
        instruct_err.append(combined_stderr(other.before.average_stderr, other.after.average_stderr))
    if not groups:
        return None
    scale = 100.0
    figure, axis = plt.subplots(figsize=(max(7.0, 1.3 * len(groups) + 3), 4.4))
    _bar_pairs(axis, groups, {"Base": [scale * v for v in base], "Instruct": [scale * v for v in instruct]},
               {"Base": [scale * e if e is not None else None for e in base_err],
                "Instruct": [scale * e if e is not None else None for e in instruct_err]},
               {"Base": "#8da0cb", "Instruct": "#fc8d62"}, {"Instruct": "//"})
    axis.axhline(0, color="black", lw=0.8)
    axis.set_ylabel("avg accuracy change from LoRA (points; bar: 1 stderr)")
    axis.set_title("Base vs Instruct: accuracy gained by LoRA finetuning")
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(figure, path)


def by_architecture(comparisons: list[Comparison], ppl_name: str, path: Path) -> Path:
    """Per architecture: every pair's accuracy change and perplexity change, with the architecture's mean."""
    families = _families(comparisons)
    figure, (left, right) = plt.subplots(1, 2, figsize=(10.0, 4.4))
    for index, name in enumerate(families):
        members = [item for item in comparisons if family(item.pair.model) == name]
        gains = [100 * (item.after.average - item.before.average) for item in members]
        ppl_changes = [100 * (item.after.ppl[ppl_name] - item.before.ppl[ppl_name]) / item.before.ppl[ppl_name]
                       for item in members]
        for axis, values in ((left, gains), (right, ppl_changes)):
            for offset, (item, value) in enumerate(zip(members, values)):
                x = index + (offset - (len(members) - 1) / 2) * 0.12
                axis.plot([x], [value], marker=CONFIG_MARKERS.get(item.pair.config, "D"), markersize=7,
                          linestyle="none", color=colour(name, families),
                          markerfacecolor="white" if variant(item.pair.model) == "Instruct" else colour(name, families))
            mean = sum(values) / len(values)
            axis.plot([index - 0.3, index + 0.3], [mean, mean], color="black", lw=2)
    for axis in (left, right):
        axis.set_xticks(range(len(families)), families)
        axis.axhline(0, color="grey", lw=0.8)
        axis.grid(True, axis="y", alpha=0.3)
        axis.set_xlim(-0.6, len(families) - 0.4)
    left.set_ylabel("avg accuracy change (points)")
    left.set_title("Accuracy gained by LoRA (higher is better)")
    right.set_ylabel(f"{ppl_name} perplexity change (%)")
    right.set_title("Perplexity change (lower is better)")
    handles = [Line2D([], [], marker=marker, color="black", linestyle="none", label=config)
               for config, marker in CONFIG_MARKERS.items()]
    handles += [Line2D([], [], marker="o", color="black", linestyle="none", label="Base (filled)"),
                Line2D([], [], marker="o", color="black", markerfacecolor="white", linestyle="none",
                       label="Instruct (hollow)"),
                Line2D([], [], color="black", lw=2, label="architecture mean")]
    right.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    figure.suptitle("By architecture (each point is one pair)")
    figure.tight_layout()
    return _save(figure, path)

