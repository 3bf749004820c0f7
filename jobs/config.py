"""The typed study configuration: YAML file + dotted ``key=value`` overrides -> ``StudyConfig``.

Dicts exist only at the YAML boundary (``load_config``); everything after it is frozen dataclasses.
Every problem in a file and its overrides is collected and reported at once, each naming its dotted
key, so a user fixes a config in one round trip instead of one error per run.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from jobs.errors import ConfigError

MODEL_NAMES = ("Llama", "Llama-Instruct", "Qwen", "Qwen-Instruct", "Mistral", "Mistral-Instruct")
PRUNING_CONFIG_NAMES = ("best_acc", "best_ppl")
ZERO_SHOT_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
PPL_DATASETS = ("wikitext2", "ptb")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj")


@dataclass(frozen=True)
class StudySettings:
    """Which pairs the study covers and where it reads and writes."""

    results_root: str = "results"
    models: tuple[str, ...] = MODEL_NAMES
    pruning_configs: tuple[str, ...] = PRUNING_CONFIG_NAMES
    # Where each pruned checkpoint lives; {results_root}, {model}, {config} are filled in.
    pruned_model_path: str = "{results_root}/for_finetuning/{model}/{config}"
    # Pickled checkpoints run code when loaded: list the pairs ("Llama/best_acc"), models ("Llama")
    # or "*" whose pickles you trust.
    allow_pickle: tuple[str, ...] = ()


@dataclass(frozen=True)
class DataSettings:
    """Training data and the local copies of the evaluation datasets."""

    # Alpaca-format JSON or JSONL: instruction, input, output.
    train_path: str = "data/alpaca_data_cleaned.json"
    # Folder with one sub-folder per dataset in the real schemas (see README: "Evaluation data").
    eval_data_dir: str = "data/eval"


@dataclass(frozen=True)
class FinetuneSettings:
    """LLM-Pruner's LoRA recovery recipe; every default is that recipe's value."""

    prompt_template: str = "alpaca"
    cutoff_len: int = 256
    train_on_inputs: bool = False
    add_eos_token: bool = True
    val_set_size: int = 2000
    seed: int = 42
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = LORA_TARGETS
    num_epochs: float = 2.0
    learning_rate: float = 1e-4
    batch_size: int = 64  # sequences per optimizer step = micro_batch_size x accumulation x world size
    micro_batch_size: int = 4
    warmup_steps: int = 100  # clamped to a tenth of the run when the run is shorter
    logging_steps: int = 10
    eval_steps: int = 100
    precision: str = "auto"  # auto: bf16 where the GPU has it, else fp32; or bf16, fp16, fp32
    max_steps: int = -1  # > 0 caps the optimizer steps (smoke runs); -1 runs num_epochs
    group_by_length: bool = False


@dataclass(frozen=True)
class EvaluateSettings:
    """Perplexity the LLM-Pruner way plus lm-eval zero-shot tasks."""

    ppl_datasets: tuple[str, ...] = PPL_DATASETS
    ppl_seq_len: int = 128
    ppl_batch_size: int = 8
    ppl_add_bos: bool = False
    tasks: tuple[str, ...] = ZERO_SHOT_TASKS
    batch_size: int = 16
    limit: int = 0  # > 0 evaluates only the first N documents of each task (smoke runs)
    precision: str = "auto"


@dataclass(frozen=True)
class StageResources:
    """What one task of a stage asks the scheduler for."""

    nodes: int = 1
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    mem_gb: int = 64
    time_min: int = 720
    partition: str = ""
    account: str = ""
    qos: str = ""


@dataclass(frozen=True)
class ResourceSettings:
    finetune: StageResources = StageResources()
    evaluate: StageResources = StageResources(time_min=120)
    compare: StageResources = StageResources(gpus_per_node=0, cpus_per_task=2, mem_gb=8, time_min=30)


@dataclass(frozen=True)
class ExecutorSettings:
    kind: str = "auto"  # auto: slurm where sbatch is on PATH, else local
    array_parallelism: int = 12  # SLURM's %N cap on concurrently running tasks of one array
    local_workers: int = 2  # processes the local executor runs tasks in
    slurm_template: str = "slurm_templates/default.yaml"


@dataclass(frozen=True)
class StudyConfig:
    study: StudySettings = StudySettings()
    data: DataSettings = DataSettings()
    finetune: FinetuneSettings = FinetuneSettings()
    evaluate: EvaluateSettings = EvaluateSettings()
    resources: ResourceSettings = ResourceSettings()
    executor: ExecutorSettings = ExecutorSettings()
    # The file it came from, so relative paths resolve against the directory the user ran from.
    source: str = field(default="", metadata={"internal": True})


CHOICES = {
    "executor.kind": ("auto", "local", "slurm"),
    "finetune.precision": ("auto", "bf16", "fp16", "fp32"),
    "evaluate.precision": ("auto", "bf16", "fp16", "fp32"),
    "finetune.prompt_template": ("alpaca",),
}
ELEMENT_CHOICES = {
    "study.models": MODEL_NAMES,
    "study.pruning_configs": PRUNING_CONFIG_NAMES,
    "evaluate.tasks": ZERO_SHOT_TASKS,
    "evaluate.ppl_datasets": PPL_DATASETS,
}


def did_you_mean(name: str, valid: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f'; did you mean "{close[0]}"?' if close else ""


def load_config(config_file: str | Path | None, overrides: typing.Sequence[str] = ()) -> StudyConfig:
    """Read the YAML file, apply ``a.b=value`` overrides, validate everything, return the config."""
    raw: dict[str, Any] = {}
    problems: list[str] = []
    where = str(config_file) if config_file else "defaults"
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass --config-file with a file from configs/")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            at = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigError(f"{path}{at}: malformed YAML ({problem}); fix the syntax there") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        raw = loaded or {}
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key or not all(key.split(".")):
            problems.append(f"override {override!r}: expected dotted.key=value, e.g. finetune.learning_rate=2e-4")
            continue
        try:
            parsed = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:
            parsed = value
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(f"override {override!r}: {part} is not a section")
                break
            node = child
        else:
            node[leaf] = parsed
    config = _build(StudyConfig, raw, "", problems)
    problems.extend(_check_semantics(config))
    if problems:
        listing = "; ".join(problems)
        raise ConfigError(f"{where}: {len(problems)} problem(s): {listing}")
    # Data paths may name {results_root}, so a study's inputs can live inside its own root.
    root = config.study.results_root
    data = dataclasses.replace(config.data, train_path=config.data.train_path.replace("{results_root}", root),
                               eval_data_dir=config.data.eval_data_dir.replace("{results_root}", root))
    return dataclasses.replace(config, data=data, source=str(config_file or ""))


def config_from_dict(raw: dict[str, Any]) -> StudyConfig:
    """Rebuild a resolved config saved with ``dataclasses.asdict`` (e.g. in a manifest)."""
    problems: list[str] = []
    data = {key: value for key, value in raw.items() if key != "source"}
    config = _build(StudyConfig, data, "", problems)
    if problems:
        raise ConfigError(f"saved config: {'; '.join(problems)}")
    return dataclasses.replace(config, source=raw.get("source", ""))


def _build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    """Turn a dict into ``cls``, appending every type or key problem to ``problems``."""
    if not isinstance(raw, dict):
        problems.append(f"{prefix or 'top level'}: expected a mapping, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    public = [f.name for f in fields(cls) if not f.metadata.get("internal")]
    values: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in public:
            problems.append(f"unknown key {dotted}{did_you_mean(str(key), public)} (valid: {', '.join(public)})")
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = _build(hint, value, f"{dotted}.", problems)
        else:
            converted = _convert(value, hint, dotted, problems)
            if converted is not _INVALID:
                values[key] = converted
    return cls(**values)


_INVALID = object()


def _convert(value: Any, hint: Any, dotted: str, problems: list[str]) -> Any:
    origin = typing.get_origin(hint)
    if origin is tuple:
        items = value if isinstance(value, list) else [value] if isinstance(value, str) else None
        if items is None:
            problems.append(f"{dotted}: expected a list, got {value!r}")
            return _INVALID
        converted = [_convert(item, typing.get_args(hint)[0], dotted, problems) for item in items]
        return _INVALID if _INVALID in converted else tuple(converted)
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads 1e-4 (no dot) as a string; users write learning rates that way.
        try:
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    problems.append(f"{dotted}: expected {hint.__name__}, got {value!r} ({type(value).__name__})")
    return _INVALID


def _check_semantics(config: StudyConfig) -> list[str]:
    problems = []
    for dotted, valid in CHOICES.items():
        value = _get(config, dotted)
        if value not in valid:
            problems.append(f"{dotted}: {value!r} is not one of {', '.join(valid)}{did_you_mean(value, valid)}")
    for dotted, valid in ELEMENT_CHOICES.items():
        for value in _get(config, dotted):
            if value not in valid:
                problems.append(f"{dotted}: unknown name {value!r}{did_you_mean(value, valid)} (valid: {', '.join(valid)})")
    tune = config.finetune
    for dotted in ("finetune.cutoff_len", "finetune.lora_r", "finetune.batch_size", "finetune.micro_batch_size",
                   "finetune.logging_steps", "finetune.eval_steps", "evaluate.ppl_seq_len", "evaluate.ppl_batch_size",
                   "evaluate.batch_size", "executor.array_parallelism", "executor.local_workers"):
        if _get(config, dotted) < 1:
            problems.append(f"{dotted}: must be at least 1, got {_get(config, dotted)}")
    if tune.batch_size % tune.micro_batch_size:
        problems.append(f"finetune.batch_size {tune.batch_size} is not a multiple of finetune.micro_batch_size "
                        f"{tune.micro_batch_size}; pick sizes that divide")
    if not 0 <= tune.lora_dropout < 1:
        problems.append(f"finetune.lora_dropout: must be in [0, 1), got {tune.lora_dropout}")
    if tune.learning_rate <= 0 or tune.num_epochs <= 0:
        problems.append("finetune.learning_rate and finetune.num_epochs must be positive")
    for stage in ("finetune", "evaluate", "compare"):
        resources: StageResources = getattr(config.resources, stage)
        if resources.nodes < 1 or resources.gpus_per_node < 0 or resources.time_min < 1:
            problems.append(f"resources.{stage}: nodes >= 1, gpus_per_node >= 0 and time_min >= 1 are required")
    if not config.study.models or not config.study.pruning_configs:
        problems.append("study.models and study.pruning_configs must each name at least one entry")
    return problems


def _get(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def iter_fields(cls: type = StudyConfig, prefix: str = "") -> typing.Iterator[tuple[str, Any, Any]]:
    """(dotted key, type, default) of every leaf setting; the README's config reference comes from it."""
    instance = cls()
    hints = typing.get_type_hints(cls)
    for item in fields(cls):
        if item.metadata.get("internal"):
            continue
        hint = hints[item.name]
        if dataclasses.is_dataclass(hint):
            yield from _iter_instance(getattr(instance, item.name), f"{prefix}{item.name}.")
        else:
            yield f"{prefix}{item.name}", hint, getattr(instance, item.name)


def _iter_instance(instance: Any, prefix: str) -> typing.Iterator[tuple[str, Any, Any]]:
    hints = typing.get_type_hints(type(instance))
    for item in fields(instance):
        value = getattr(instance, item.name)
        if dataclasses.is_dataclass(value):
            yield from _iter_instance(value, f"{prefix}{item.name}.")
        else:
            yield f"{prefix}{item.name}", hints[item.name], value
