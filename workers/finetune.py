"""LoRA recovery finetune of one pruned checkpoint: LLM-Pruner's recipe, setup -> train -> save.

Features:
- Skips at once when the pair's finetuned folder is already done (``DONE.json`` valid).
- Loads the pruned model (Hugging Face folder, or an LLM-Pruner pickle when ``study.allow_pickle`` trusts it).
- Alpaca data (JSON or JSONL), seeded validation split clamped for tiny data, prompt tokens masked
  out of the loss unless ``finetune.train_on_inputs``.
- LoRA on the ``finetune.lora_target_modules`` the model actually has; transformers ``Trainer`` with
  gradient accumulation sized so one optimizer step sees ``finetune.batch_size`` sequences over all ranks.
- One rank per SLURM task (``workers/distributed.py`` sets up ranks and process group, no launcher);
  DeepSpeed ZeRO from ``configs/deepspeed/<finetune.deepspeed>.yaml`` with its "auto" values filled from
  this recipe. ``finetune.deepspeed=auto`` means ZeRO-2 on GPUs or with several ranks, and no DeepSpeed
  for one CPU process (the demo), where it would shard nothing and only cost start-up time.
- Warmup clamped to a tenth of the run for short runs; bf16/fp16 on GPU as configured, fp32 on CPU.
- Resumable (``workers/checkpointing.py``): a checkpoint every ``finetune.checkpoint_minutes`` (or
  ``finetune.checkpoint_steps``) and on SLURM's warning signal; a rerun or requeue resumes from the newest
  complete one made with the same recipe, so a crash redoes at most one checkpoint interval. The checkpoints
  go once the adapter is done.
- Writes, on rank 0 only (other ranks log warnings only) and atomically: ``adapter_model.safetensors`` and
  ``adapter_config.json``, ``finetuning_config.json`` (every setting, the derived values and the resolved
  DeepSpeed config, versions, git sha, times, metrics), ``training_log.txt`` (one line per logging step,
  eval losses, runtime and real-token throughput), then ``DONE.json`` last.

Raises ``InputError`` for a missing or malformed checkpoint or training file, or a model with none of
the LoRA target modules.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import math
import os
import random
import shutil
import subprocess
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import (DataCollatorForSeq2Seq, PreTrainedModel, PrinterCallback, TrainerCallback,
                          TrainingArguments, set_seed)

from jobs.checkpoints import find_checkpoint
from jobs.config import FinetuneSettings, StudyConfig
from jobs.errors import InputError
from jobs.state import atomic_write_json, atomic_write_text, clear_done, is_done, mark_done
from jobs.study import Pair, StudyPaths, pickle_allowed
from workers import checkpointing, distributed
from workers.lora_trainer import LoraTrainer
from workers.modelio import load_pruned_model, resolve_dtype
from workers.packed_model import layer_shape_count
from workers.packed_trainer import PackedTrainer, prepare_packing
from workers.prompts import load_alpaca_examples, tokenize_example

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
CONFIG_FILE = "finetuning_config.json"
LOG_FILE = "training_log.txt"
REPO_DIR = Path(__file__).resolve().parents[1]


def run(config: StudyConfig, pair: Pair) -> None:
    """Finetune ``pair``'s pruned model with LoRA and save the adapter and its records."""
    paths = StudyPaths(config)
    out_dir = paths.finetuned_dir(pair)
    if is_done(out_dir):
        log.info("%s: finetune already done in %s; skipping", pair.label, out_dir)
        return
    run_info = distributed.setup(config.finetune.deepspeed, on_gpu=torch.cuda.is_available())
    stop = checkpointing.StopOnSignal(config.finetune.checkpoint_minutes).install()
    try:
        _finetune(config, pair, out_dir, run_info, stop)
    finally:
        stop.uninstall()
        distributed.teardown()  # the local executor runs its next task in this same process


class TrainingInterrupted(RuntimeError):
    """Stopped by a signal (SLURM's warning, or SIGTERM) after saving a checkpoint; the next attempt resumes from it."""


def slurm_restarts() -> int:
    """How many times SLURM has requeued this job (0 outside SLURM or on the first run)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def _hand_over_signal(config: StudyConfig, pair: Pair, stop: checkpointing.StopOnSignal, step: int) -> None:
    restarts = slurm_restarts()
    resume_hint = f"`launch.py resubmit` resumes it from checkpoint-{step}"
    if not stop.received:  # SIGTERM only: cancelled, or requeued from outside; nothing for us to requeue
        raise TrainingInterrupted(f"{pair.label}: terminated at step {step} after saving checkpoint-{step}; a "
                                  f"requeue or {resume_hint}")
    if restarts >= config.finetune.max_requeues:
        raise TrainingInterrupted(f"{pair.label}: stopped at step {step} by the warning signal after {restarts} "
                                  f"requeues (finetune.max_requeues); {resume_hint}")
    log.warning("%s: checkpoint-%d saved; handing the signal to the scheduler to requeue (%d of %d requeues used)",
                pair.label, step, restarts, config.finetune.max_requeues)
    stop.hand_over()  # under submitit, rank 0 requeues the job here and exits
    raise TrainingInterrupted(f"{pair.label}: stopped at step {step} by the warning signal; {resume_hint}")


def _finetune(config: StudyConfig, pair: Pair, out_dir: Path, run_info: distributed.DistributedRun,
              stop: checkpointing.StopOnSignal) -> None:
    paths = StudyPaths(config)
    tune = config.finetune
    started = _now()
    rank, world_size = run_info.ranks.rank, run_info.ranks.world_size
    on_gpu = torch.cuda.is_available()
    if rank == 0:
        clear_done(out_dir)  # a stale marker must not vouch for files this run is about to replace

    # ---- setup: model, data, LoRA ---------------------------------------------------------------
    model_path = paths.pruned_model(pair)
    model_format, _ = find_checkpoint(model_path)
    # Reduced precision on CPU is slow or inexact, so CPU runs train in fp32 whatever is configured.
    dtype = resolve_dtype(tune.precision) if on_gpu else torch.float32
    model, tokenizer = load_pruned_model(model_path, pickle_allowed(config, pair), dtype)
    model.config.use_cache = False  # the KV cache only costs memory in training

    examples = load_alpaca_examples(config.data.train_path)
    val_size = clamp_val_size(tune.val_set_size, len(examples))
    order = list(range(len(examples)))
    random.Random(tune.seed).shuffle(order)
    tokenized = [tokenize_example(examples[i], tokenizer, tune.cutoff_len, tune.train_on_inputs, tune.add_eos_token)
                 for i in order]
    val_set, train_set = tokenized[:val_size], tokenized[val_size:]
    train_tokens_per_epoch = sum(len(item["input_ids"]) for item in train_set)  # real tokens; padding comes later

    targets = lora_targets(model, tune.lora_target_modules, model_path)
    set_seed(tune.seed)  # LoRA A matrices are initialised randomly
    lora = LoraConfig(r=tune.lora_r, lora_alpha=tune.lora_alpha, lora_dropout=tune.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft 0.21 calls transformers 5's deprecated alias; nothing for us to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(model, lora)
    trainable, total = (sum(p.numel() for p in model.parameters() if p.requires_grad),
                        sum(p.numel() for p in model.parameters()))

    # 64 sequences per optimizer step = 4 per micro-batch x 16 accumulation steps x 1 rank (the defaults).
    accumulation = max(1, tune.batch_size // tune.micro_batch_size // world_size)
    total_steps = optimizer_steps(len(train_set), tune, accumulation, world_size)
    deepspeed_raw = distributed.load_deepspeed_config(run_info.deepspeed) if run_info.deepspeed else None
    packing = None
    if tune.packing == "on" or (tune.packing == "auto" and on_gpu):
        # Same 64 sequences per step, laid out as padding-free rows: accumulation = packed rows per rank.
        sharded, shapes = shards_parameters(deepspeed_raw), layer_shape_count(model)
        compile_layers = compiles_layers(tune.compile, on_gpu, sharded, shapes)
        if not compile_layers and compiles_layers(tune.compile, on_gpu, sharded=False, layer_shapes=1):
            log.info("%s: the decoder layers run eagerly: %s", pair.label,
                     "ZeRO-3 shards the parameters" if sharded else
                     f"they come in {shapes} shapes, and compiling each would take about as long as it saves "
                     "(finetune.compile=on compiles them anyway)")
        packing = prepare_packing(model, train_set, val_set, tokenizer.pad_token_id, tune, world_size,
                                  compile_layers=compile_layers, group_lora=not sharded)
        accumulation = packing.micro_batches
        total_steps = tune.max_steps if tune.max_steps > 0 else math.ceil(tune.num_epochs * packing.steps_per_epoch)
    warmup = min(tune.warmup_steps, total_steps // 10)  # only bites when the run is < 10 x warmup steps
    log.info("%s: %d train / %d val examples, LoRA on %s (%d of %d parameters trainable), %d optimizer steps "
             "of %d sequences (%d x %d accumulation x %d ranks), warmup %d, %s on %s, DeepSpeed %s",
             pair.label, len(train_set), len(val_set), ",".join(targets), trainable, total, total_steps,
             tune.micro_batch_size * accumulation * world_size, tune.micro_batch_size, accumulation, world_size,
             warmup, str(dtype).removeprefix("torch."), "GPU" if on_gpu else "CPU", run_info.deepspeed or "off")
    if packing:
        log.info("%s: packed micro-batches of up to %d tokens, %d per rank and step (%d steps per epoch), %s",
                 pair.label, tune.packing_max_tokens, packing.micro_batches, packing.steps_per_epoch,
                 f"{packing.setup.compiled_layers} layers compiled (the first step compiles them)"
                 if packing.setup.compiled_layers else "eager (finetune.compile)")

    deepspeed_config = None
    if deepspeed_raw is not None:
        # The Trainer's AdamW defaults (LLM-Pruner keeps them) for configs that name DeepSpeed's optimizer.
        defaults = TrainingArguments
        deepspeed_config = distributed.resolve_deepspeed_config(
            deepspeed_raw,
            distributed.auto_values(
                micro_batch_size=1 if packing else tune.micro_batch_size, accumulation=accumulation, world_size=world_size,
                learning_rate=tune.learning_rate, dtype=dtype, hidden_size=model.get_input_embeddings().embedding_dim,
                warmup_steps=warmup, total_steps=total_steps, max_grad_norm=defaults.max_grad_norm,
                betas=(defaults.adam_beta1, defaults.adam_beta2), eps=defaults.adam_epsilon,
                weight_decay=defaults.weight_decay),
            where=f"configs/deepspeed/{run_info.deepspeed}.yaml")

    # ---- resume: the newest checkpoint whose marker checks out and that this same recipe wrote ----------
    checkpoints = out_dir / checkpointing.CHECKPOINTS
    resume_key = checkpointing.recipe_key(tune, world_size, model_path, config.data.train_path, bool(packing))
    resume = distributed.from_rank0(
        lambda: checkpointing.choose_resume(checkpoints, resume_key) if rank == 0 else None)
    resumed_step = checkpointing.step_of(resume)

    args = TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=1 if packing else tune.micro_batch_size,  # packed: one row per micro-batch
        per_device_eval_batch_size=1 if packing else tune.micro_batch_size,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=tune.num_epochs,
        max_steps=tune.max_steps if tune.max_steps > 0 else -1,
        learning_rate=tune.learning_rate,
        warmup_steps=warmup,
        logging_steps=tune.logging_steps,
        eval_strategy="steps" if val_set else "no",
        eval_steps=tune.eval_steps if val_set else None,
        save_strategy="steps" if tune.checkpoint_steps else "no",
        save_steps=tune.checkpoint_steps or None,
        save_total_limit=2,  # the newest may be the one a crash broke; the one before it is then resumed from
        bf16=on_gpu and dtype == torch.bfloat16,
        fp16=on_gpu and dtype == torch.float16,
        use_cpu=not on_gpu,
        seed=tune.seed,
        train_sampling_strategy="group_by_length" if tune.group_by_length else "random",
        remove_unused_columns=False,  # items hold exactly the model's inputs: input_ids, attention_mask, labels
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False if world_size > 1 else None,
        deepspeed=deepspeed_config,
        accelerator_config=_accelerator_config(run_info, non_blocking=bool(packing) and on_gpu),
        # The Trainer checks each micro-batch's loss for NaN/inf to keep it out of the logged mean, a wait for the
        # GPU per micro-batch. The packed path logs the loss as it is (a NaN shows); packing=off keeps the default.
        logging_nan_inf_filter=packing is None,
        report_to=[],
        disable_tqdm=True,  # progress goes to our log, one line per logging step
    )
    one_gpu_per_rank(args, world_size, pair)
    progress = LogLines(pair.label, out_dir / "progress.json" if rank == 0 else None)
    if resume:
        progress.restore(checkpointing.read_log_lines(resume))
        progress.lines.append(f"resumed from {resume.name} (SLURM restart count {slurm_restarts()})")
        log.info("%s: resuming from %s", pair.label, resume)
    marker = checkpointing.CheckpointMarker(checkpoints, rank == 0, lambda: {**progress.state(), "key": resume_key})
    trainer_class, extra = (LoraTrainer, {}) if packing is None else (PackedTrainer, {"packing": packing})
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=val_set or None,
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True),
        callbacks=[progress, marker, stop],
        **extra,
    )
    trainer.remove_callback(PrinterCallback)  # disable_tqdm swaps the progress bar for print(); LogLines logs instead

    # ---- train ----------------------------------------------------------------------------------
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if stop.stopped and trainer.state.global_step < trainer.state.max_steps:
        _hand_over_signal(config, pair, stop, trainer.state.global_step)
    if trainer.state.max_steps != total_steps:
        log.warning("%s: Trainer ran %d optimizer steps, planned %d", pair.label, trainer.state.max_steps, total_steps)
    runtime = result.metrics["train_runtime"]  # this attempt's
    train_tokens = round(train_tokens_per_epoch * trainer.state.epoch)
    steps_done = trainer.state.global_step
    attempt_tokens = round(train_tokens * (steps_done - resumed_step) / steps_done) if steps_done else 0
    metrics = {
        "first_train_loss": progress.train_losses[0] if progress.train_losses else None,
        "last_train_loss": progress.train_losses[-1] if progress.train_losses else None,
        # The Trainer's mean only covers the steps since a resume; the logged losses cover the whole run.
        "mean_train_loss": result.training_loss if not resume else
        sum(progress.train_losses) / len(progress.train_losses) if progress.train_losses else None,
        "last_eval_loss": progress.eval_losses[-1] if progress.eval_losses else None,
        "optimizer_steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_runtime_s": runtime,  # the Trainer's, evaluations during training included
        "train_tokens": train_tokens,
        "train_tokens_per_s": attempt_tokens / runtime if runtime else None,  # this attempt's steps and time
    }
    captured = getattr(trainer, "captured", None)
    if captured is not None:  # finetune.cuda_graphs: how many graphs, and how long capturing them took
        metrics["cuda_graphs"] = {"graphs": len(captured.graphs), "capture_s": round(captured.capture_s, 1)}
    # ZeRO-3 shards parameters: gather the LoRA weights (on every rank: it is collective) to read and save them.
    lora_parameters = [param for name, param in model.named_parameters() if "lora_" in name]
    with distributed.gathered(lora_parameters):
        metrics["lora_b_max_abs"] = lora_b_max_abs(model)  # LoRA B starts at zero: > 0 proves the adapter trained
        if rank == 0:
            save_adapter(model, out_dir)
    tokens_per_s = metrics["train_tokens_per_s"] or 0.0
    progress.lines += [f"train_runtime_s {runtime:.2f}",
                       f"train_tokens {train_tokens} (non-pad) train_tokens_per_s {tokens_per_s:.1f}",
                       f"train_loss initial {metrics['first_train_loss']} final {metrics['last_train_loss']}"]
    log.info("%s: trained %d steps in %.1f s (%.0f tokens/s), loss %s -> %s", pair.label, trainer.state.global_step,
             runtime, tokens_per_s, metrics["first_train_loss"], metrics["last_train_loss"])

    # ---- save (rank 0): records, then the done marker (the adapter is saved above) ----------------
    if rank != 0:
        return
    (out_dir / "progress.json").unlink(missing_ok=True)  # only meaningful while training runs
    record = {
        "pair": pair.label,
        "settings": dataclasses.asdict(tune),
        "derived": {
            "world_size": world_size,
            "gradient_accumulation_steps": accumulation,
            "sequences_per_optimizer_step": tune.batch_size if packing else
            tune.micro_batch_size * accumulation * world_size,
            "packed_rows_per_rank_and_step": packing.micro_batches if packing else None,
            "packed_model": dataclasses.asdict(packing.setup) if packing else None,
            "warmup_steps_used": warmup,
            "total_optimizer_steps": total_steps,
            "train_examples": len(train_set),
            "val_examples": len(val_set),
            "lora_target_modules_used": targets,
            "trainable_parameters": trainable,
            "total_parameters": total,
            "dtype": str(dtype).removeprefix("torch."),
            "device": "cuda" if on_gpu else "cpu",
            "deepspeed": run_info.deepspeed or "none",
            "deepspeed_config": deepspeed_config,
            "process_group_backend": run_info.backend,
            "checkpoint_steps": tune.checkpoint_steps,
            "checkpoint_minutes": tune.checkpoint_minutes,
            "resumed_from_step": resumed_step,
            "slurm_restart_count": slurm_restarts(),
        },
        "base_model": {"path": str(model_path), "format": model_format},
        "train_path": str(config.data.train_path),
        "versions": {name: importlib.metadata.version(name)
                     for name in ("torch", "transformers", "peft", "accelerate",
                                  *(("deepspeed",) if run_info.deepspeed else ()))},
        "git_sha": git_sha(),
        "started_at": started,
        "finished_at": _now(),
        "metrics": metrics,
    }
    atomic_write_json(out_dir / CONFIG_FILE, record)
    atomic_write_text(out_dir / LOG_FILE, "\n".join(progress.lines) + "\n")
    mark_done(out_dir, [*ADAPTER_FILES, CONFIG_FILE, LOG_FILE])
    if not tune.keep_checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)  # only a resume needs them, and the adapter is done
    log.info("%s: adapter and records saved in %s", pair.label, out_dir)


def one_gpu_per_rank(args: TrainingArguments, world_size: int, pair: Pair) -> None:
    """Keep a lone rank on its one GPU when the machine shows it several.

    Without a process group the Trainer counts every visible GPU and wraps the model in ``nn.DataParallel``: its
    loader batch becomes the micro-batch times the GPU count, split over them, so an optimizer step sees that many
    times ``finetune.batch_size`` sequences; the packed path fails outright (``expected mat1 and mat2 to have the
    same dtype``, seen on a 4-GPU machine). More GPUs are used by more ranks (``resources.finetune.gpus_per_node``),
    each a process of its own.
    """
    if world_size == 1 and args.n_gpu > 1:
        log.warning("%s: %d GPUs are visible and this finetune is one rank, so it uses cuda:0 alone; more GPUs "
                    "train as more ranks (resources.finetune.gpus_per_node on SLURM)", pair.label, args.n_gpu)
        args._n_gpu = 1  # the Trainer's own switch (it sets the same for model-parallel models)


def _accelerator_config(run_info: distributed.DistributedRun, non_blocking: bool) -> dict[str, bool] | None:
    config = {}
    if run_info.configured_state:
        config["use_configured_state"] = True  # the accelerate state workers/distributed.py made (see its docstring)
    if non_blocking:
        # Batches come from pinned memory; a blocking copy would make the CPU wait for the GPU every micro-batch.
        # Only on the packed path: packing=off stays LLM-Pruner's recipe on the Trainer's defaults.
        config["non_blocking"] = True
    return config or None


def clamp_val_size(requested: int, n_examples: int) -> int:
    """Validation examples to hold out: ``requested``, but at most a tenth of the data (at least 1 once there
    are 10 rows), and none below 10 rows, so tiny smoke datasets still leave most rows for training."""
    if requested <= 0 or n_examples < 10:
        return 0
    return min(requested, max(1, n_examples // 10))


def shards_parameters(deepspeed_config: dict[str, Any] | None) -> bool:
    """Whether a DeepSpeed config (as loaded, or None for no DeepSpeed) shards the parameters (ZeRO stage 3)."""
    return deepspeed_config is not None and int(deepspeed_config.get("zero_optimization", {}).get("stage", 0)) == 3


# ``finetune.compile=auto`` compiles a decoder of at most this many distinct layer shapes. Uniform structured
# pruning gives 2 or 3 (pruned layers, and the unpruned first and last ones); a per-layer search can give one per
# layer. Each shape is one more compile: 6 shapes took 3.3-3.8 x one shape's time on the CPU, and on an H200 the
# first step's compile took 83-99 s (benchmarks/RESULTS.md). Compiled steps run about 1.6 x faster (the issue's
# H100 figures), some 6-8 minutes of a one-GPU pair's finetune, less with more GPUs: past a few shapes the
# compiles cost what they save. An estimate from those figures, not a GPU measurement.
AUTO_COMPILE_MAX_LAYER_SHAPES = 4


def compiles_layers(compile_setting: str, on_gpu: bool, sharded: bool, layer_shapes: int) -> bool:
    """Whether the packed path compiles its decoder layers: ``finetune.compile`` on, or auto on a GPU with at
    most ``AUTO_COMPILE_MAX_LAYER_SHAPES`` distinct layer shapes.

    Never under ZeRO-3 (``sharded``): its hooks gather a module's parameters when that module runs, and compiled
    layers would trace them, recompiling up to Dynamo's limit. LoRA groups are off there too: a group would read
    parameters that only their own module's hook gathers.
    """
    if sharded or compile_setting == "off":
        return False
    return compile_setting == "on" or (on_gpu and layer_shapes <= AUTO_COMPILE_MAX_LAYER_SHAPES)


def optimizer_steps(n_train: int, tune: FinetuneSettings, accumulation: int, world_size: int) -> int:
    """Optimizer steps the Trainer will take, computed the way it does (a partial accumulation counts)."""
    if tune.max_steps > 0:
        return tune.max_steps
    batches_per_rank = math.ceil(math.ceil(n_train / tune.micro_batch_size) / world_size)
    steps_per_epoch = max(1, math.ceil(batches_per_rank / accumulation))
    return math.ceil(tune.num_epochs * steps_per_epoch)


def lora_targets(model: PreTrainedModel, wanted: tuple[str, ...], model_path: Path) -> list[str]:
    """The configured LoRA targets that name linear layers of this model (pruned models may lack some)."""
    present = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    targets = [name for name in wanted if name in present]
    if not targets:
        raise InputError(f"{model_path}: none of finetune.lora_target_modules ({', '.join(wanted)}) is a linear "
                         f"layer of this model (it has {', '.join(sorted(present))}); set finetune.lora_target_modules")
    missing = sorted(set(wanted) - set(targets))
    if missing:
        log.warning("%s has no %s layers; LoRA goes on %s only", model_path, ", ".join(missing), ", ".join(targets))
    return targets


def lora_b_max_abs(model: torch.nn.Module) -> float:
    # one read from the GPU, not one per matrix (224 waits at the 6.7B shape's 32 layers)
    values = [param.detach().abs().max().float() for name, param in model.named_parameters() if "lora_B" in name]
    return torch.stack(values).max().item() if values else 0.0


def save_adapter(model: torch.nn.Module, out_dir: Path) -> None:
    """save_pretrained into a temporary folder beside the outputs, then rename the adapter files into place."""
    staging = out_dir / ".adapter_staging"
    shutil.rmtree(staging, ignore_errors=True)
    # save_embedding_layers=False: "auto" may look the base model up on the Hub, and embeddings are never targeted.
    model.save_pretrained(str(staging), save_embedding_layers=False)
    umask = os.umask(0)
    os.umask(umask)
    for name in ADAPTER_FILES:
        os.chmod(staging / name, 0o666 & ~umask)  # safetensors writes 0600; results follow the user's umask
        os.replace(staging / name, out_dir / name)
    shutil.rmtree(staging, ignore_errors=True)


class LogLines(TrainerCallback):
    """One plain line per Trainer log event, kept for ``training_log.txt`` and sent to our logger."""

    def __init__(self, label: str, progress_file: Path | None = None) -> None:
        self.label = label
        self.progress_file = progress_file  # read by `launch.py status` for step/total, loss and ETA
        self.started = time.monotonic()
        self.lines: list[str] = []
        self.train_losses: list[float] = []
        self.eval_losses: list[float] = []
        self.first_step = 0  # a resumed run's ETA counts only the steps this attempt has done

    def state(self) -> dict[str, list]:
        return {"lines": self.lines, "train_losses": self.train_losses, "eval_losses": self.eval_losses}

    def restore(self, saved: dict[str, list]) -> None:
        self.lines = list(saved.get("lines", []))
        self.train_losses = [float(value) for value in saved.get("train_losses", [])]
        self.eval_losses = [float(value) for value in saved.get("eval_losses", [])]

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.started, self.first_step = time.monotonic(), state.global_step

    def on_log(self, args: TrainingArguments, state: Any, control: Any, logs: dict[str, float] | None = None,
               **kwargs: Any) -> None:
        logs = logs or {}
        where = f"step {state.global_step}/{state.max_steps} epoch {state.epoch or 0:.2f}"
        if "loss" in logs:
            self.train_losses.append(float(logs["loss"]))
            line = f"{where} loss {logs['loss']:.4f} learning_rate {logs.get('learning_rate', float('nan')):.3e}"
        elif "eval_loss" in logs:
            self.eval_losses.append(float(logs["eval_loss"]))
            line = f"{where} eval_loss {logs['eval_loss']:.4f}"
        else:
            return  # the end-of-training summary; run() writes its own
        self.lines.append(line)
        log.info("%s: %s", self.label, line)
        if self.progress_file is not None and state.global_step:
            elapsed = time.monotonic() - self.started
            remaining = max(state.max_steps - state.global_step, 0)
            done_here = max(state.global_step - self.first_step, 1)
            atomic_write_json(self.progress_file, {
                "step": state.global_step, "total": state.max_steps,
                "loss": self.train_losses[-1] if self.train_losses else None,
                "eta_s": round(elapsed / done_here * remaining, 1), "updated_at": _now()})


def git_sha() -> str | None:
    """The commit of the code that ran, when it runs from a git checkout."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = done.stdout.strip()
    return sha if done.returncode == 0 and sha else None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
