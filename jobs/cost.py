"""The cost estimate ``launch.py check`` prints: tokens per stage, GPU-hours and wall time per task.

* Finetune tokens per pair = training examples x epochs x the mean tokenized length of the Alpaca prompt
  plus response (cut at ``finetune.cutoff_len``, plus EOS), measured with the checkpoint's own
  ``tokenizer.json`` on up to ``SAMPLE`` evenly spaced rows. Validation passes add forward-only tokens.
* Evaluation tokens per run = the perplexity windows (from a tokenized prefix of each file, scaled) plus
  the zero-shot requests: documents x choices x (context + choice) tokens, estimated from sampled rows.
* Seconds = tokens / (tokens per second per GPU x GPUs per task), at the figure of
  ``benchmarks/RESULTS.md`` for the same GPU type and the nearest model size; the estimate names the
  line it used, or says that none applies. Forward-only work (evaluation, validation) is counted at a
  third of a training token when only a training figure exists.

Model sizes come from checkpoint headers (safetensors) or the tensor storages listed in a torch zip file,
never from loading weights.
"""
from __future__ import annotations

import json
import math
import pickletools
import re
import shutil
import struct
import subprocess
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.check_findings import OK, SKIP, STAGE_OF_WORKER, WARN, Finding, StudyFacts
from jobs.check_slurm import format_minutes
from jobs.throughput_figures import candidates, normalise_gpu, parse_results, pick_figure
from jobs.config import StudyConfig
from jobs.eval_data import EVAL_DATASETS
from jobs.plan import Plan
from jobs.state import sha256_of
from jobs.study import Pair

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_FILE = REPO_ROOT / "benchmarks" / "RESULTS.md"
SAMPLE = 2000  # training rows tokenized per tokenizer
EVAL_SAMPLE = 200  # zero-shot rows tokenized per task
PPL_PREFIX_CHARS = 200_000  # perplexity text tokenized per file; the rest is scaled by characters
FORWARD_SHARE = 1 / 3  # a forward pass costs about a third of forward + backward
CHARS_PER_TOKEN = 4.0  # only when no tokenizer.json is at hand



# ------------------------------------------------------------------------------------ model sizes


DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}
STORAGE_BYTES = {"Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2, "Char": 1,
                 "Byte": 1, "Bool": 1}


def count_parameters(kind: str, location: Path) -> int | None:
    """Parameters of a checkpoint from its headers alone; None when the files do not tell."""
    try:
        if kind == "pickle":
            return _torch_zip_parameters(location)
        index = location / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return sum(_safetensors_parameters(location / shard) for shard in shards)
        if (location / "model.safetensors").is_file():
            return _safetensors_parameters(location / "model.safetensors")
        if (location / "pytorch_model.bin").is_file():
            return _torch_zip_parameters(location / "pytorch_model.bin")
    except (OSError, ValueError, KeyError, TypeError, struct.error, zipfile.BadZipFile):
        return None
    return None


def _safetensors_parameters(path: Path) -> int:
    with path.open("rb") as stream:
        (size,) = struct.unpack("<Q", stream.read(8))
        if size > 100_000_000:
            raise ValueError("not a safetensors header")
        header = json.loads(stream.read(size))
    return sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")


def _torch_zip_parameters(path: Path) -> int | None:
    """Bytes of a torch.save zip's storages over the element size of its most common storage type.

    The pickle is only disassembled (``pickletools``), never executed.
    """
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        storage_bytes = sum(archive.getinfo(name).file_size for name in names if re.search(r"/data/\d+$", name))
        pickle_name = next(name for name in names if name.endswith("data.pkl"))
        kinds: dict[str, int] = {}
        strings: list[str] = []
        for opcode, argument, _ in pickletools.genops(archive.read(pickle_name)):
            if opcode.name == "GLOBAL":
                strings.append(str(argument).replace("\n", " "))
            elif opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
                strings.append(str(argument))
        for index, text in enumerate(strings):
            match = re.fullmatch(r"torch (\w+)Storage", text) or (
                text == "torch" and index + 1 < len(strings) and re.fullmatch(r"(\w+)Storage", strings[index + 1]))
            if match:
                kinds[match.group(1)] = kinds.get(match.group(1), 0) + 1
    if not kinds or not storage_bytes:
        return None
    dominant = max(kinds, key=lambda name: kinds[name])
    return storage_bytes // STORAGE_BYTES.get(dominant, 2)


# ------------------------------------------------------------------------------------ token counts


class TokenCounter:
    """Token counts with each tokenizer.json loaded once; a character estimate where there is none."""

    def __init__(self) -> None:
        self._loaded: dict[str, Any] = {}  # by the file's sha256
        self._digests: dict[Path, str] = {}
        self.memo: dict[tuple[str, str], Any] = {}  # (purpose, tokenizer key) -> a count computed once

    def key(self, tokenizer_file: Path | None) -> str:
        """One key per distinct tokenizer content (best_acc/best_ppl and Instruct variants share files)."""
        if tokenizer_file is None:
            return "chars"
        if tokenizer_file not in self._digests:
            self._digests[tokenizer_file] = sha256_of(tokenizer_file)
        return self._digests[tokenizer_file]

    def lengths(self, tokenizer_file: Path | None, texts: list[str], add_special_tokens: bool = True) -> list[int]:
        if tokenizer_file is None:
            return [max(1, round(len(text) / CHARS_PER_TOKEN)) for text in texts]
        key = self.key(tokenizer_file)
        if key not in self._loaded:
            from tokenizers import Tokenizer
            self._loaded[key] = Tokenizer.from_file(str(tokenizer_file))
        encodings = self._loaded[key].encode_batch(texts, add_special_tokens=add_special_tokens)
        return [len(encoding.ids) for encoding in encodings]


def _evenly(items: list[Any], count: int) -> list[Any]:
    if len(items) <= count:
        return list(items)
    step = len(items) / count
    return [items[int(index * step)] for index in range(count)]


def finetune_tokens(config: StudyConfig, examples: list[dict[str, str]], tokenizer: Path | None,
                    counter: TokenCounter) -> dict[str, float]:
    """Training and validation token counts of one finetune task (see the module docstring)."""
    from workers.prompts import build_prompt  # json-only module; no transformers import

    tune = config.finetune
    resources = config.resources.finetune
    world = resources.nodes * max(resources.gpus_per_node, 1)
    sample = _evenly(examples, SAMPLE)
    texts = [build_prompt(example["instruction"], example["input"], example["output"]) for example in sample]
    lengths = [min(length + (1 if tune.add_eos_token else 0), tune.cutoff_len)
               for length in counter.lengths(tokenizer, texts)]
    mean = sum(lengths) / len(lengths)
    n = len(examples)
    val = 0 if tune.val_set_size <= 0 or n < 10 else min(tune.val_set_size, max(1, n // 10))
    train = n - val
    accumulation = max(1, tune.batch_size // tune.micro_batch_size // world)
    steps_per_epoch = max(1, math.ceil(math.ceil(math.ceil(train / tune.micro_batch_size) / world) / accumulation))
    if tune.max_steps > 0:
        steps = tune.max_steps
        sequences = min(steps * tune.batch_size, train * tune.num_epochs)
    else:
        steps = math.ceil(tune.num_epochs * steps_per_epoch)
        sequences = train * tune.num_epochs
    evaluations = steps // tune.eval_steps if val else 0
    return {"rows": n, "train": train, "val": val, "epochs": tune.num_epochs, "mean_len": mean,
            "sampled": len(sample), "steps": steps, "train_tokens": sequences * mean,
            "val_tokens": evaluations * val * mean, "evaluations": evaluations}


CHOICE_FIELDS = {"piqa": ("sol1", "sol2"), "winogrande": ("option1", "option2"), "hellaswag": ("endings",),
                 "arc_easy": ("choices",), "arc_challenge": ("choices",), "openbookqa": ("choices",)}


def _choices(task: str, row: dict[str, Any]) -> list[str]:
    if task == "boolq":
        return ["yes", "no"]
    values: list[str] = []
    for name in CHOICE_FIELDS.get(task, ()):
        value = row.get(name)
        if isinstance(value, dict):
            values += [str(text) for text in value.get("text", [])]
        elif isinstance(value, list):
            values += [str(text) for text in value]
        elif value is not None:
            values.append(str(value))
    return values or ["", ""]


def _context(task: str, row: dict[str, Any]) -> str:
    skip = set(CHOICE_FIELDS.get(task, ())) | {"label", "answer", "answerKey", "idx", "id", "ind", "source_id",
                                                "split", "split_type"}
    return " ".join(str(value) for key, value in row.items() if key not in skip and isinstance(value, str))


def evaluation_tokens(config: StudyConfig, rows: dict[str, list[dict[str, Any]]], tokenizer: Path | None,
                      counter: TokenCounter) -> dict[str, float]:
    """Forward tokens of one evaluation run (perplexity windows + zero-shot requests), estimated."""
    settings = config.evaluate
    tokens: dict[str, float] = {}
    for name in settings.ppl_datasets:
        field_name = EVAL_DATASETS[name].fields[0]
        text = "\n\n".join(str(row.get(field_name, "")) for row in rows.get(name, []))
        prefix = text[:PPL_PREFIX_CHARS]
        counted = counter.lengths(tokenizer, [prefix])[0] if prefix else 0
        total = counted * (len(text) / len(prefix)) if prefix else 0
        tokens[name] = (total // settings.ppl_seq_len) * settings.ppl_seq_len
    for task in settings.tasks:
        documents = rows.get(task, [])
        if settings.limit > 0:
            documents = documents[:settings.limit]
        if not documents:
            tokens[task] = 0
            continue
        sample = _evenly(documents, EVAL_SAMPLE)
        contexts = counter.lengths(tokenizer, [_context(task, row) for row in sample])
        choices = [_choices(task, row) for row in sample]
        choice_lengths = iter(counter.lengths(tokenizer, [text for row in choices for text in row],
                                              add_special_tokens=False))
        per_document = [context * len(row) + sum(next(choice_lengths) for _ in row)
                        for context, row in zip(contexts, choices)]
        tokens[task] = len(documents) * sum(per_document) / len(per_document)
    return tokens


# ------------------------------------------------------------------------------------ the estimate


@dataclass
class StageEstimate:
    stage: str
    tasks: int
    gpus_per_task: int
    time_min: int
    tokens: dict[Pair, float] = field(default_factory=dict)  # per task; training-equivalent for finetune
    seconds: dict[Pair, float] = field(default_factory=dict)  # per task, where a figure applies
    figures: dict[str, dict[Pair, float | None]] = field(default_factory=dict)  # citation -> {pair: billions}
    notes: list[str] = field(default_factory=list)


@dataclass
class Estimate:
    gpu: str | None
    gpu_source: str
    stages: list[StageEstimate]
    findings: list[Finding]
    notes: list[str]


def gpu_type(config: StudyConfig, kind: str, facts: StudyFacts) -> tuple[str | None, str]:
    """The finetune stage's GPU type, and where that came from."""
    if kind == "slurm":
        name = config.resources.finetune.partition or facts.default_partition
        partition = facts.partitions.get(name)
        if partition is None:
            return None, "unknown (partition not found)"
        if not partition.gpu_types:
            return None, f"unknown: partition {name}'s gres names no GPU type"
        gpu = sorted(partition.gpu_types)[0]
        return normalise_gpu(gpu) or gpu, f"partition {name}'s gres ({', '.join(sorted(partition.gpu_types))})"
    if config.resources.finetune.gpus_per_node == 0 or not shutil.which("nvidia-smi"):
        return "cpu", "this machine (local executor, no GPU)"
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None, "unknown (nvidia-smi failed)"
    return normalise_gpu(names), f"this machine ({names.splitlines()[0].strip() if names.strip() else 'nvidia-smi'})"


def estimate(config: StudyConfig, plan: Plan, kind: str, facts: StudyFacts) -> Estimate:
    gpu, gpu_source = gpu_type(config, kind, facts)
    # The worker's packing=auto packs on GPUs only; figures of the path it takes, not of the other
    recipe_path = config.finetune.packing == "off" or (config.finetune.packing == "auto" and gpu == "cpu")
    notes: list[str] = []
    if RESULTS_FILE.is_file():
        figures = parse_results(RESULTS_FILE.read_text(encoding="utf-8", errors="replace"))
        if not figures:
            notes.append(f"{RESULTS_FILE.name} has no table with a tokens/s column: token counts only")
    else:
        figures = []
        notes.append("benchmarks/RESULTS.md is missing: token counts only")
    counter = TokenCounter()
    sizes = {pair: count_parameters(*facts.checkpoints[pair]) for pair in facts.checkpoints}
    stages: dict[str, StageEstimate] = {}
    for array in plan.arrays:
        stage = STAGE_OF_WORKER[array.worker]
        resources = getattr(config.resources, stage)
        entry = stages.setdefault(stage, StageEstimate(stage, 0, max(resources.gpus_per_node, 1) * resources.nodes,
                                                       resources.time_min))
        entry.tasks += array.size
        if stage == "compare":
            continue
        for pair in array.pairs:
            if pair not in facts.checkpoints:
                continue
            tokenizer = facts.tokenizers.get(pair)
            if stage == "finetune":
                if facts.train_examples is None:
                    continue
                memo = ("finetune", counter.key(tokenizer))
                if memo not in counter.memo:
                    counter.memo[memo] = finetune_tokens(config, facts.train_examples, tokenizer, counter)
                counts = counter.memo[memo]
                work = counts["train_tokens"] + counts["val_tokens"] * FORWARD_SHARE
                entry.tokens[pair] = counts["train_tokens"]
                if not entry.notes:
                    entry.notes.append(
                        f"{counts['train']:,} train rows x {counts['epochs']:g} epoch(s) x mean "
                        f"{counts['mean_len']:.0f} tokens (of {counts['sampled']:,} sampled rows, cut at "
                        f"{config.finetune.cutoff_len}); {counts['steps']:,} optimizer steps; validation: "
                        f"{counts['evaluations']} pass(es) over {counts['val']:,} rows")
            else:
                memo = ("evaluate", counter.key(tokenizer))
                if memo not in counter.memo:
                    counter.memo[memo] = evaluation_tokens(config, facts.eval_rows, tokenizer, counter)
                counts = counter.memo[memo]
                work = sum(counts.values())
                entry.tokens[pair] = work
                if not entry.notes:
                    entry.notes.append("tokens per run (estimated): " + ", ".join(
                        f"{name} {human(value)}" for name, value in counts.items()))
            if tokenizer is None:
                entry.notes.append(f"{pair.label}: no tokenizer.json at hand; counted at {CHARS_PER_TOKEN:g} "
                                   "characters per token")
            params_b = sizes.get(pair) / 1e9 if sizes.get(pair) else None
            share, figure_stage = 1.0, stage
            choice = dict(gpus=entry.gpus_per_task, recipe=stage == "finetune" and recipe_path)
            figure = pick_figure(figures, stage, gpu, params_b, **choice)
            if figure is None and stage == "evaluate":  # our evaluation is forward passes on the packed path
                share, figure_stage = FORWARD_SHARE, "finetune"
                figure = pick_figure(figures, figure_stage, gpu, params_b, **choice)
            if figure is None:
                continue
            seconds = work * share / (figure.tokens_per_s * entry.gpus_per_task)
            entry.seconds[pair] = seconds
            peers = len(candidates(figures, figure_stage, gpu, params_b, **choice))
            cited = figure.cite() + (f" (the slowest of {peers} figures at that size)" if peers > 1 else "") + \
                (" x 3 (forward only)" if share != 1.0 else "")
            entry.figures.setdefault(cited, {})[pair] = params_b
    findings = []
    for entry in stages.values():
        if entry.stage == "compare" or not entry.tokens:
            continue
        if not entry.seconds:
            findings.append(Finding("time limit", SKIP, f"{entry.stage}: no {entry.stage} throughput for GPU type "
                                    f"{gpu or 'unknown'} in benchmarks/RESULTS.md; time not estimated"))
            continue
        longest = max(entry.seconds.values()) / 60
        if longest > entry.time_min:
            findings.append(Finding(
                "time limit", WARN, f"{entry.stage}: about {format_duration(longest * 60)} per task, more than "
                f"resources.{entry.stage}.time_min {entry.time_min} ({format_minutes(entry.time_min)})",
                f"raise resources.{entry.stage}.time_min to >= {math.ceil(longest * 1.2)} (estimate + 20%) or give "
                "each task more GPUs"))
        else:
            findings.append(Finding("time limit", OK, f"{entry.stage}: about {format_duration(longest * 60)} per "
                                    f"task fits resources.{entry.stage}.time_min {entry.time_min} "
                                    f"({100 * longest / entry.time_min:.0f}%)"))
    return Estimate(gpu, gpu_source, list(stages.values()), findings, notes)


def human(count: float) -> str:
    """12,345,678 -> 12.3M; 45,600 -> 45.6k; 6,720,000,000 -> 6.7B."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if count >= size:
            return f"{count / size:.1f}{suffix}"
    return f"{count:.0f}"


def format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes = seconds / 60
    if minutes < 60:
        return f"{minutes:.0f}m"
    return f"{int(minutes // 60)}h{int(minutes % 60):02d}m"


def render_estimate(result: Estimate, parallelism: int | None = None) -> str:
    lines = [f"cost estimate (GPU type {result.gpu or 'unknown'}, from {result.gpu_source})",
             f"  {'stage':<9} {'tasks':>5} {'tokens/task':>12} {'GPU-hours':>10} {'time/task':>10} "
             f"{'time limit':>11}  fits"]
    total_hours = 0.0
    for entry in result.stages:
        if entry.stage == "compare":
            lines.append(f"  {'compare':<9} {entry.tasks:>5} {'-':>12} {'-':>10} {'-':>10} "
                         f"{format_minutes(entry.time_min):>11}  -")
            continue
        tokens = sum(entry.tokens.values()) / len(entry.tokens) if entry.tokens else 0
        token_text = human(tokens) if entry.tokens else "?"
        if entry.seconds:
            hours = sum(entry.seconds.values()) * entry.gpus_per_task / 3600
            scale = entry.tasks / len(entry.seconds)
            hours *= scale
            total_hours += hours
            longest = max(entry.seconds.values())
            fits = "yes" if longest <= entry.time_min * 60 else "NO"
            lines.append(f"  {entry.stage:<9} {entry.tasks:>5} {token_text:>12} {hours:>10.3g} "
                         f"{format_duration(longest):>10} {format_minutes(entry.time_min):>11}  {fits}")
        else:
            lines.append(f"  {entry.stage:<9} {entry.tasks:>5} {token_text:>12} {'?':>10} {'?':>10} "
                         f"{format_minutes(entry.time_min):>11}  ?")
    for entry in result.stages:
        for note in entry.notes:
            lines.append(f"  {entry.stage}: {note}")
        for citation, served in entry.figures.items():
            sizes = sorted(size for size in served.values() if size)
            span = (human(sizes[0] * 1e9) if sizes[0] == sizes[-1] else
                    f"{human(sizes[0] * 1e9)}-{human(sizes[-1] * 1e9)}") if sizes else "unknown"
            lines.append(f"  {entry.stage} throughput: {citation}; used for {len(served)} checkpoint(s) of "
                         f"{span} parameters")
        if entry.stage != "compare" and entry.tokens and not entry.seconds:
            lines.append(f"  {entry.stage} throughput: no figure in benchmarks/RESULTS.md applies to GPU type "
                         f"{result.gpu or 'unknown'}; GPU-hours and time not estimated")
    lines += [f"  {note}" for note in result.notes]
    if total_hours:
        lines.append(f"  whole study: about {total_hours:.2g} GPU-hours")
    return "\n".join(lines)
