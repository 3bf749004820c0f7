"""Throughput figures read from ``benchmarks/RESULTS.md`` for the cost estimate.

The file is prose plus Markdown tables; a table with a tokens/s column is a figure source. Each row
becomes a ``Figure`` (GPU type, model size, stage, tokens/s per GPU, GPU count, whether it measured
LLM-Pruner's recipe path, the line it came from), and ``pick_figure`` chooses the one for the same GPU type,
the path the study trains on, its GPUs per task and the nearest model size.

A table measured at settings no study trains with (a diagnostic: an unusual micro-batch size, an experimental
option) is left out when the text before it says ``not a cost figure``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

GPU_NAMES = ("gh200", "h200", "h100", "a100", "a10g", "a10", "a6000", "a40", "l40s", "l40", "l4", "v100", "t4",
             "mi300", "mi250", "4090", "3090")

# A row (or its throughput column) naming LLM-Pruner's recipe path: "recipe", "packing=off", "LLM-Pruner layout"
RECIPE = re.compile(r"\brecipe\b|packing\s*=\s*off|llm-pruner", re.IGNORECASE)
NOT_A_COST_FIGURE = re.compile(r"not\s+a\s+cost\s+figure", re.IGNORECASE)


@dataclass(frozen=True)
class Figure:
    """One throughput figure from benchmarks/RESULTS.md."""

    line: int
    stage: str  # finetune | evaluate
    gpu: str | None
    params_b: float | None
    tokens_per_s: float  # per GPU
    text: str
    recipe: bool = False  # LLM-Pruner's padded recipe path (finetune.packing=off), not the packed default
    gpus: float | None = None  # GPUs the run used, where the table says

    def cite(self) -> str:
        size = f", {self.params_b:g}B" if self.params_b else ""
        return (f"benchmarks/RESULTS.md line {self.line} ({self.gpu or 'GPU type not given'}{size}): "
                f"{self.tokens_per_s:,.0f} tokens/s per GPU")


def normalise_gpu(text: str) -> str | None:
    """The device the text names first: a GPU type ("Card: H100 ... as in the H200 section" is an H100), or "cpu"
    ("2-core VM, no GPU"; "2 x H200, 32 CPU cores" is an H200)."""
    lowered = text.lower()
    found = [(match.start(), -len(name), name) for name in GPU_NAMES
             if (match := re.search(r"\s*".join(name), lowered))]  # "H 100" too
    found += [(match.start(), 0, "cpu") for match in [re.search(r"\bcpu\b|no gpu", lowered)] if match]
    return min(found)[2] if found else None  # at one place the longer name: "gh200" over "h200", "a10g" over "a10"


def parse_size_b(text: str, bare_numbers: bool = False) -> float | None:
    """Model size in billions of parameters: "Llama-3-8B", "6.72B parameters", "135M"; with ``bare_numbers``
    (a size column) also "6.7e9" or "6,738,415,616"."""
    size = r"(?<![\w.])(\d+(?:\.\d+)?)\s*([bBmM])(?!\w)"  # not inside a word: commit "9b71ea5" is no size
    match = re.search(size + r"\s*param", text) or re.search(size, text)  # "6.72B parameters" over "8b" in a name
    if match:
        return float(match.group(1)) / (1000 if match.group(2).lower() == "m" else 1)
    match = re.search(r"\d[\d,]*(?:\.\d+)?(?:e\d+)?", text) if bare_numbers else None
    if match:
        number = float(match.group(0).replace(",", ""))
        if number > 1e5:
            return number / 1e9
    return None


def _number(text: str) -> float | None:
    match = re.search(r"(\d[\d,]*(?:\.\d+)?)\s*([kKmM]?)", text)
    if not match:
        return None
    value = float(match.group(1).replace(",", ""))
    return value * {"k": 1e3, "m": 1e6}.get(match.group(2).lower(), 1)


def _stage_of(text: str) -> str | None:
    lowered = text.lower()
    if re.search(r"lora|finetun|fine-tun|train", lowered):
        return "finetune"
    if re.search(r"eval|perplex|\bppl\b|zero.?shot|lm.?eval|inference|forward", lowered):
        return "evaluate"
    return None


def parse_results(text: str) -> list[Figure]:
    """Every markdown table row that has a tokens-per-second column, with its stage, GPU and model size.

    Columns are found by their headers: throughput (``tok/s/GPU`` or ``tokens/s per GPU`` first, else
    ``tokens/s``, ``tok/s``, ``throughput``), model size (``model``, ``size``, ``params``), GPU (``gpu``,
    ``device``, ``card``), GPU count (``gpus``) and stage (``stage``, ``task``, ``workload``). What a row
    does not say is read from the text between the nearest heading and the table (e.g. "- Card: H100",
    "- Model: 6.72B parameters", "LoRA throughput"). A total throughput with a GPU count column is divided
    by that count. Rows without a positive number in the throughput column (OOM, errors) are skipped.
    """
    figures: list[Figure] = []
    context = ""
    header: list[str] | None = None
    excluded = False  # the table the text leads to is a diagnostic, not a cost figure
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("#"):
            context, header, excluded = stripped, None, False
            continue
        if not stripped.startswith("|"):
            if header is not None:  # a table ended: its context ends with it
                header, excluded = None, False
            context += " " + stripped
            excluded = excluded or bool(NOT_A_COST_FIGURE.search(stripped))
            continue
        cells = [cell.strip() for cell in stripped.strip("|").split("|")]
        if header is None:
            header = [cell.lower() for cell in cells]
            continue
        if all(re.fullmatch(r":?-+:?", cell) for cell in cells if cell):
            continue
        figure = None if excluded else _figure(number, header, cells, context, stripped)
        if figure:
            figures.append(figure)
    return figures


def _figure(number: int, header: list[str], cells: list[str], context: str, raw: str) -> Figure | None:
    def column(pattern: str) -> int | None:
        return next((index for index, name in enumerate(header) if re.search(pattern, name) and index < len(cells)),
                    None)

    per_gpu = column(r"tok(en)?s?\s*/\s*s.*(gpu|card)|tokens? per s.*gpu|throughput.*(per|/)\s*gpu")
    throughput = per_gpu if per_gpu is not None else column(r"tok(en)?s?\s*/\s*s|tokens? per s|throughput")
    if throughput is None:
        return None
    value = _number(cells[throughput])
    if not value:
        return None
    others = " ".join(cell for index, cell in enumerate(cells) if index != throughput)
    stage_column = column(r"^(stage|task|workload|what|phase|benchmark|run)")
    stage = _stage_of(cells[stage_column]) if stage_column is not None else None
    stage = stage or _stage_of(others) or _stage_of(context) or _stage_of(header[throughput])
    if stage is None:
        return None
    gpu_column = column(r"^(gpu|device|hardware|card|machine|accelerator)")
    gpu = normalise_gpu(cells[gpu_column]) if gpu_column is not None else None
    gpu = gpu or normalise_gpu(others) or normalise_gpu(context)
    size_column = column(r"^(model|size|param|checkpoint)")
    params = parse_size_b(cells[size_column], bare_numbers=True) if size_column is not None else None
    params = params or parse_size_b(others) or parse_size_b(context)
    count_column = column(r"^(#\s*)?gpus$|gpu count|num.*gpus|n_gpus|world")
    count = _number(cells[count_column]) if count_column is not None else None
    count = count if count and count >= 1 else None
    if per_gpu is None and count:
        value /= count
    return Figure(number, stage, gpu, params, value, raw, recipe=bool(RECIPE.search(f"{others} {header[throughput]}")),
                  gpus=count)


def candidates(figures: list[Figure], stage: str, gpu: str | None, params_b: float | None,
               recipe: bool = False, gpus: int | None = None) -> list[Figure]:
    """The figures that apply: this stage on this GPU type, at the nearest model size; none when none applies.

    ``recipe``: the study trains on LLM-Pruner's padded path, several times slower than the packed one; figures
    of the other path count only when this path has none. ``gpus``: GPUs per task; figures of runs on another
    GPU count (per GPU, a four-GPU run is slower) count only when none other is left.
    """
    same = [figure for figure in figures if figure.stage == stage and gpu and figure.gpu == gpu]
    if not same:
        return []
    same = [figure for figure in same if figure.recipe == recipe] or same
    same = [figure for figure in same if not gpus or figure.gpus in (None, gpus)] or same
    sized = [figure for figure in same if figure.params_b]
    if params_b and sized:
        nearest = min(abs(math.log(figure.params_b / params_b)) for figure in sized)
        same = [figure for figure in sized if abs(math.log(figure.params_b / params_b)) == nearest]
    return same


def pick_figure(figures: list[Figure], stage: str, gpu: str | None, params_b: float | None,
                recipe: bool = False, gpus: int | None = None) -> Figure | None:
    """The slowest of ``candidates`` (variants of one benchmark), so that a time estimate errs long; or None."""
    return min(candidates(figures, stage, gpu, params_b, recipe, gpus), key=lambda figure: figure.tokens_per_s,
               default=None)
