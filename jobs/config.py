"""The typed study configuration: YAML file + dotted ``key=value`` overrides -> ``StudyConfig``.

Dicts exist only at the YAML boundary (``load_config``); everything after it is frozen dataclasses.
Every problem in a file and its overrides is collected and reported at once, each naming its dotted
key, so a user fixes a config in one round trip instead of one error per run.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import re
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
# finetune.deepspeed: auto, none, or the name of a file in configs/deepspeed/ (a user may add their own there).
DEEPSPEED_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"
DEEPSPEED_CHOICES = ("auto", "none", *sorted(path.stem for path in DEEPSPEED_CONFIG_DIR.glob("*.yaml")))


@dataclass(frozen=True)
class StudySettings:
    """Which pairs the study covers and where it reads and writes."""

    results_root: str = "results"  # where every output of the study goes (README: Results tree)
    models: tuple[str, ...] = MODEL_NAMES  # the study's models, in the order of indices and reports
    # best_acc: highest zero-shot accuracy; best_ppl: lowest perplexity.
    pruning_configs: tuple[str, ...] = PRUNING_CONFIG_NAMES
    # Where each pruned checkpoint lives; {results_root}, {model}, {config} are filled in.
    pruned_model_path: str = "{results_root}/for_finetuning/{model}/{config}"
    # Pickled checkpoints run code when loaded: list the pairs ("Llama/best_acc"), models ("Llama")
    # or "*" whose pickles you trust.
    allow_pickle: tuple[str, ...] = ()
    # Optional JSON of the UNPRUNED models' scores, so the study report can say how much of the pruning loss
    # LoRA recovers: {"Llama": {"ppl": {"wikitext2": 6.1, "ptb": 10.6}, "tasks": {"boolq": 0.81, ...}}, ...}.
    reference_results: str = ""


@dataclass(frozen=True)
class DataSettings:
    """Training data and the local copies of the evaluation datasets."""

    # Alpaca-format JSON or JSONL: instruction, input, output.
    train_path: str = "data/alpaca_data_cleaned.json"
    # Folder with one sub-folder per dataset in the real schemas (see README: "Evaluation data").
    eval_data_dir: str = "data/eval"
    # Where the evaluation datasets come from, never downloaded: local_files (eval_data_dir), hub_mirror
    # (hub_mirror_dir/<Hub repo id>, e.g. <mirror>/aps/super_glue, laid out like the Hub repos) or hf_cache
    # (datasets already in HF_DATASETS_CACHE).
    eval_source: str = "local_files"
    hub_mirror_dir: str = ""  # with eval_source=hub_mirror: the folder that holds the mirrored Hub dataset repos


@dataclass(frozen=True)
class FinetuneSettings:
    """LLM-Pruner's LoRA recovery recipe; every default is that recipe's value."""

    prompt_template: str = "alpaca"  # the Alpaca prompt, with and without an input, as LLM-Pruner
    cutoff_len: int = 256  # tokens per example; a longer prompt + response is cut
    train_on_inputs: bool = False  # false: prompt tokens are masked (-100), the loss covers the response
    add_eos_token: bool = True  # append EOS to each example when there is room
    val_set_size: int = 2000  # examples held out for validation (at most a tenth of the data)
    seed: int = 42  # data shuffle and LoRA initialisation
    lora_r: int = 8  # LoRA rank
    lora_alpha: int = 16  # LoRA scale = lora_alpha / lora_r
    lora_dropout: float = 0.05  # dropout on the LoRA branch's input
    # Linear layers that get LoRA; ones a pruned model lacks are skipped.
    lora_target_modules: tuple[str, ...] = LORA_TARGETS
    num_epochs: float = 2.0  # passes over the training examples
    learning_rate: float = 1e-4  # peak learning rate, reached after warmup_steps
    batch_size: int = 64  # sequences per optimizer step = micro_batch_size x accumulation x world size
    # Sequences per forward/backward on one GPU; lower it on CUDA OOM (the step stays batch_size).
    micro_batch_size: int = 4
    warmup_steps: int = 100  # clamped to a tenth of the run when the run is shorter
    logging_steps: int = 10  # optimizer steps between loss lines in the log
    eval_steps: int = 100  # optimizer steps between validation passes
    precision: str = "auto"  # auto: bf16 where the GPU has it, else fp32; or bf16, fp16, fp32
    max_steps: int = -1  # > 0 caps the optimizer steps (smoke runs); -1 runs num_epochs
    group_by_length: bool = False  # batch examples of similar length together
    # Padding-free packed micro-batches (workers/packed_trainer.py): same examples, loss and 64 sequences per
    # step, laid out as rows of up to packing_max_tokens real tokens. auto: on GPUs; off on CPU (the demo).
    packing: str = "auto"
    packing_max_tokens: int = 8192  # per micro-batch row; 8,192 fits an 8B-class model on an 80 GB card
    # torch.compile the packed path's decoder layers and loss (Inductor). auto: on GPUs, where it pays for its
    # minute or so of compiling at each start, unless pruning left the layers in more than 4 shapes (each shape
    # compiles apart); on: always, CPU too; off: eager (to rule compile out when debugging).
    # Changes speed, not the recipe: a checkpoint resumes whatever this says. Needs packing (auto or on); never
    # under ZeRO-3 (zero3, zero3_offload), whose hooks gather each module's parameters as it runs.
    compile: str = "auto"
    # Each training micro-batch (forward, loss, backward) as one CUDA graph: its thousands of kernels launch at
    # once, for small micro-batches (several GPUs), where launching them one by one bounds a step. Micro-batches
    # are padded to a multiple of cutoff_len tokens with a filler that has no targets (one graph per padded
    # length). Same recipe and loss. Needs packing and finetune.deepspeed=none (DeepSpeed's hooks cannot replay);
    # several ranks average their gradients once per step, as DDP does. off: never.
    cuda_graphs: str = "off"
    # DeepSpeed ZeRO config from configs/deepspeed/ (zero2, zero3, zero3_offload) or none. auto: zero2 on GPUs or
    # with several ranks, none for one CPU process (nothing to shard; DeepSpeed would only slow the demo's start).
    deepspeed: str = "auto"
    # Minutes between resumable checkpoints (adapter, optimizer, scheduler, RNG, data position) in
    # <finetuned>/checkpoints/; a crash, preemption or time limit redoes at most this much work. 0: none.
    checkpoint_minutes: float = 10.0
    checkpoint_steps: int = 0  # > 0: also a checkpoint every this many optimizer steps
    keep_checkpoints: bool = False  # false: delete the checkpoints once the adapter is saved and marked done
    # Times a finetune may requeue itself after SLURM's warning signal (preemption or time limit) before it
    # fails and waits for `launch.py resubmit`.
    max_requeues: int = 3


@dataclass(frozen=True)
class EvaluateSettings:
    """Perplexity the LLM-Pruner way plus lm-eval zero-shot tasks."""

    ppl_datasets: tuple[str, ...] = PPL_DATASETS  # perplexity datasets
    ppl_seq_len: int = 128  # tokens per perplexity window (LLM-Pruner: 128)
    ppl_batch_size: int = 64  # perplexity windows per forward pass (fp32 logits are upcast 8 windows at a time)
    ppl_add_bos: bool = False  # false: one BOS at the start of the text, as LLM-Pruner; true: BOS in every window
    tasks: tuple[str, ...] = ZERO_SHOT_TASKS  # lm-eval zero-shot tasks
    batch_size: int = 16  # lm-eval batch size: rows per pass for hf (prunetune fills each pass with up to 16k tokens)
    # Who scores lm-eval's loglikelihood requests: prunetune (workers/fast_lm.py: each shared context computed once,
    # LM head only where read; the same numbers as hf up to float rounding) or hf (lm-eval's own HFLM).
    backend: str = "prunetune"
    limit: int = 0  # > 0 evaluates only the first N documents of each task (smoke runs)
    precision: str = "auto"  # auto: bf16 where the GPU has it, else fp32; or bf16, fp16, fp32
    # Merge the LoRA adapter into the weights before evaluating (faster); false evaluates it through peft, unmerged.
    merge_adapter: bool = False
    # Also lm-eval's own `wikitext` task: word/byte perplexity of whole documents, a DIFFERENT quantity from the
    # LLM-Pruner token perplexity above (needs wikitext_document_level/test.jsonl, or its Hub repo).
    lm_eval_wikitext: bool = False


@dataclass(frozen=True)
class StageResources:
    """What one task of a stage asks the scheduler for."""

    nodes: int = 1  # nodes per task
    gpus_per_node: int = 1  # GPUs per node (a finetune runs one rank per GPU); 0 runs on CPU
    cpus_per_task: int = 8  # CPU cores per SLURM task (--cpus-per-task)
    mem_gb: int = 64  # host memory per node in GB (--mem)
    time_min: int = 720  # time limit in minutes (--time); `launch.py check` estimates what a stage needs
    partition: str = ""  # SLURM partition; empty: the template's preset, else the cluster's default
    account: str = ""  # SLURM account; empty: the template's preset, else none
    qos: str = ""  # SLURM qos; empty: the template's preset, else the account's default


@dataclass(frozen=True)
class ResourceSettings:
    """What each stage's tasks ask SLURM for, on top of the presets of executor.slurm_template."""

    finetune: StageResources = StageResources()
    evaluate: StageResources = StageResources(time_min=120)
    compare: StageResources = StageResources(gpus_per_node=0, cpus_per_task=2, mem_gb=8, time_min=30)


@dataclass(frozen=True)
class ExecutorSettings:
    """Where the tasks run: SLURM or this machine."""

    kind: str = "auto"  # auto: slurm where sbatch is on PATH, else local
    array_parallelism: int = 12  # SLURM's %N cap on concurrently running tasks of one array
    local_workers: int = 2  # processes the local executor runs tasks in
    slurm_template: str = "slurm_templates/default.yaml"  # the cluster's preset: set-up lines and per-stage resources
    # Seconds before the time limit at which SLURM sends USR2, so a finetune checkpoints and requeues itself.
    # SLURM may send it up to 60 s early; keep it well under resources.*.time_min for short test limits.
    signal_delay_s: int = 120


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
    "finetune.packing": ("auto", "on", "off"),
    "finetune.compile": ("auto", "on", "off"),
    "finetune.cuda_graphs": ("off", "on"),
    "data.eval_source": ("local_files", "hub_mirror", "hf_cache"),
    "evaluate.backend": ("prunetune", "hf"),
    "finetune.deepspeed": DEEPSPEED_CHOICES,
}
ELEMENT_CHOICES = {
    "study.models": MODEL_NAMES,
    "study.pruning_configs": PRUNING_CONFIG_NAMES,
    "evaluate.tasks": ZERO_SHOT_TASKS,
    "evaluate.ppl_datasets": PPL_DATASETS,
}


# Partition, account and qos names as SLURM spells them (a comma separates alternatives).
SLURM_NAME = re.compile(r"^[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*$")


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
    _apply_overrides(raw, overrides, problems)
    from jobs.slurm_template import with_template_resources  # the cluster's presets, beneath this config
    config = _build(StudyConfig, with_template_resources(raw), "", problems)
    problems.extend(_check_semantics(config))
    if problems:
        listing = "; ".join(problems)
        raise ConfigError(f"{where}: {len(problems)} problem(s): {listing}")
    # Data paths may name {results_root}, so a study's inputs can live inside its own root.
    root = config.study.results_root
    data = dataclasses.replace(config.data, train_path=config.data.train_path.replace("{results_root}", root),
                               eval_data_dir=config.data.eval_data_dir.replace("{results_root}", root),
                               hub_mirror_dir=config.data.hub_mirror_dir.replace("{results_root}", root))
    return dataclasses.replace(config, data=data, source=str(config_file or ""))


def _apply_overrides(raw: dict[str, Any], overrides: typing.Sequence[str], problems: list[str]) -> None:
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


def with_overrides(config: StudyConfig, overrides: typing.Sequence[str], where: str) -> StudyConfig:
    """``config`` with dotted ``key=value`` overrides applied and everything checked again."""
    # Through JSON, as a manifest stores it: tuples become the lists the YAML boundary expects.
    raw = json.loads(json.dumps(dataclasses.asdict(config)))
    raw.pop("source", None)
    problems: list[str] = []
    _apply_overrides(raw, overrides, problems)
    updated = _build(StudyConfig, raw, "", problems)
    problems.extend(_check_semantics(updated) if not problems else [])
    if problems:
        raise ConfigError(f"{where}: {len(problems)} problem(s): {'; '.join(problems)}")
    return dataclasses.replace(updated, source=config.source)


def config_from_dict(raw: dict[str, Any]) -> StudyConfig:
    """Rebuild a resolved config saved with ``dataclasses.asdict`` (e.g. in a manifest)."""
    problems: list[str] = []
    data = {key: value for key, value in raw.items() if key != "source"}
    config = _build(StudyConfig, data, "", problems)
    if problems:
        raise ConfigError(f"saved config: {'; '.join(problems)}")
    return dataclasses.replace(config, source=raw.get("source", ""))


def _build(cls: type, raw: Any, prefix: str, problems: list[str], base: Any = None) -> Any:
    """Turn a dict into ``cls``, appending every type or key problem to ``problems``.

    Keys the dict leaves out keep ``base``'s values (the enclosing default, e.g. resources.evaluate's
    time_min=120), not the class's own defaults.
    """
    base = base if base is not None else cls()
    if not isinstance(raw, dict):
        problems.append(f"{prefix or 'top level'}: expected a mapping, got {raw!r}")
        return base
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
            values[key] = _build(hint, value, f"{dotted}.", problems, getattr(base, key))
        else:
            converted = _convert(value, hint, dotted, problems)
            if converted is not _INVALID:
                values[key] = converted
    return dataclasses.replace(base, **values)


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
    if hint is str and isinstance(value, bool):
        return "on" if value else "off"  # YAML 1.1 reads on/off/yes/no as booleans; switches are spelled on/off
    if hint is str and isinstance(value, (int, float)):
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
    for dotted in ("finetune.cutoff_len", "finetune.lora_r", "finetune.packing_max_tokens", "finetune.batch_size",
                   "finetune.micro_batch_size",
                   "finetune.logging_steps", "finetune.eval_steps", "evaluate.ppl_seq_len", "evaluate.ppl_batch_size",
                   "evaluate.batch_size", "executor.array_parallelism", "executor.local_workers"):
        if _get(config, dotted) < 1:
            problems.append(f"{dotted}: must be at least 1, got {_get(config, dotted)}")
    if tune.batch_size % tune.micro_batch_size:
        problems.append(f"finetune.batch_size {tune.batch_size} is not a multiple of finetune.micro_batch_size "
                        f"{tune.micro_batch_size}; pick sizes that divide")
    finetune_ranks = config.resources.finetune.nodes * max(config.resources.finetune.gpus_per_node, 1)
    if finetune_ranks > 1 and tune.batch_size % (tune.micro_batch_size * finetune_ranks):
        problems.append(f"finetune.batch_size {tune.batch_size} is not a multiple of finetune.micro_batch_size x "
                        f"ranks ({tune.micro_batch_size} x {finetune_ranks}, ranks = resources.finetune.nodes x "
                        "gpus_per_node); pick sizes that divide, so every optimizer step sees batch_size sequences")
    for dotted in ("finetune.checkpoint_steps", "finetune.checkpoint_minutes", "finetune.max_requeues",
                   "executor.signal_delay_s"):
        if _get(config, dotted) < 0:
            problems.append(f"{dotted}: must be 0 or more, got {_get(config, dotted)}")
    if tune.compile == "on" and tune.deepspeed.startswith("zero3"):
        problems.append(f"finetune.compile is on but finetune.deepspeed is {tune.deepspeed}: ZeRO-3's hooks gather "
                        "each module's parameters as it runs, which compiled layers cannot take in; set "
                        "finetune.compile=auto (eager under ZeRO-3), or finetune.deepspeed=zero2")
    if tune.compile == "on" and tune.packing == "off":
        problems.append("finetune.compile is on but finetune.packing is off: only the packed path is compiled "
                        "(the recipe path runs as LLM-Pruner's); set finetune.packing=on, or finetune.compile=auto")
    if tune.cuda_graphs == "on" and tune.packing == "off":
        problems.append("finetune.cuda_graphs is on but finetune.packing is off: CUDA graphs replay the packed path's "
                        "micro-batches; set finetune.packing=auto, or finetune.cuda_graphs=off")
    if tune.cuda_graphs == "on" and tune.deepspeed != "none":
        problems.append(f"finetune.cuda_graphs is on but finetune.deepspeed is {tune.deepspeed} (zero2 on GPUs when "
                        "auto): DeepSpeed's gradient hooks cannot be replayed from a CUDA graph; set "
                        "finetune.deepspeed=none (the ranks then average gradients as DDP does), or "
                        "finetune.cuda_graphs=off")
    if not 0 <= tune.lora_dropout < 1:
        problems.append(f"finetune.lora_dropout: must be in [0, 1), got {tune.lora_dropout}")
    if tune.learning_rate <= 0 or tune.num_epochs <= 0:
        problems.append("finetune.learning_rate and finetune.num_epochs must be positive")
    for stage in ("finetune", "evaluate", "compare"):
        resources: StageResources = getattr(config.resources, stage)
        if resources.nodes < 1 or resources.gpus_per_node < 0 or resources.time_min < 1:
            problems.append(f"resources.{stage}: nodes >= 1, gpus_per_node >= 0 and time_min >= 1 are required")
        for key in ("partition", "account", "qos"):  # each becomes an #SBATCH line: a newline there would add lines
            value = getattr(resources, key)
            if value and not SLURM_NAME.match(value):
                problems.append(f"resources.{stage}.{key}: {value!r} is not a SLURM name (letters, digits, . _ - "
                                "only; commas between alternatives)")
    if not config.study.models or not config.study.pruning_configs:
        problems.append("study.models and study.pruning_configs must each name at least one entry")
    if config.data.eval_source == "hub_mirror" and not config.data.hub_mirror_dir:
        problems.append("data.eval_source is hub_mirror but data.hub_mirror_dir is empty; set it to the folder "
                        "holding the mirrored Hub dataset repos (e.g. <mirror>/aps/super_glue)")
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


def settings_of(config: StudyConfig) -> dict[str, Any]:
    """{dotted key: value} of every leaf setting of ``config`` (internal fields left out)."""
    return {key: value for item in fields(config) if not item.metadata.get("internal")
            for key, _, value in _iter_instance(getattr(config, item.name), f"{item.name}.")}


def _iter_instance(instance: Any, prefix: str) -> typing.Iterator[tuple[str, Any, Any]]:
    hints = typing.get_type_hints(type(instance))
    for item in fields(instance):
        value = getattr(instance, item.name)
        if dataclasses.is_dataclass(value):
            yield from _iter_instance(value, f"{prefix}{item.name}.")
        else:
            yield f"{prefix}{item.name}", hints[item.name], value
