"""The finetune worker's padding-free path: the Trainer fed packed micro-batches (``workers/packing.py``).

The recipe stays the same: the same examples, ``finetune.batch_size`` (64) sequences per optimizer step
over all ranks, prompt tokens masked, the same LoRA targets. What changes is the layout: each micro-batch
is one row of up to ``finetune.packing_max_tokens`` real tokens (no padding), variable-length attention
keeps sequences apart, the loss is chunked, and each step's 64 sequences are spread over ranks and
micro-batches by tokens. ``benchmarks/lora_throughput.py`` measures what this buys on a GPU; the loss is
the token mean over the whole step (``num_items_in_batch``), as the padded transformers 5 path computes it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import TrainerCallback

from jobs.config import FinetuneSettings
from workers.lora_trainer import LoraTrainer
from workers.packed_model import PackingSetup, prepare_model_for_packing
from workers.packing import PackedStepSampler, PackingCollator, group_in_order, micro_batches_for_budget

GRADIENT_AS_BUCKET_VIEW = True  # DDP's option for the packed path; benchmarks/finetune_worker_gpu.py compares both
GROUP_LORA = True  # LoRA targets sharing an input run as one group where allowed; the benchmark compares both


@dataclass
class PackedData:
    sampler: PackedStepSampler
    collator: PackingCollator
    eval_batches: list[list[int]]
    micro_batches: int  # per rank and optimizer step: the Trainer's gradient_accumulation_steps
    steps_per_epoch: int
    setup: PackingSetup  # what the model side turned on, for the run's record


def prepare_packing(model: torch.nn.Module, train_set: list[dict], val_set: list[dict], pad_token_id: int,
                    tune: FinetuneSettings, world_size: int, compile_layers: bool,
                    group_lora: bool = True) -> PackedData:
    """Wire the model for packed batches and plan the steps; call after get_peft_model."""
    setup = prepare_model_for_packing(model, compile_layers=compile_layers, group_lora=group_lora and GROUP_LORA)
    lengths = [len(item["input_ids"]) for item in train_set]
    budget = max(tune.packing_max_tokens, max(lengths, default=1))
    micro = micro_batches_for_budget(lengths, tune.batch_size, world_size, max_tokens=budget, seed=tune.seed,
                                     epochs=max(1, math.ceil(tune.num_epochs)))
    sampler = PackedStepSampler(lengths, tune.batch_size, world_size, micro, seed=tune.seed)
    collator = PackingCollator(max_length=tune.cutoff_len, pad_token_id=pad_token_id)
    eval_batches = group_in_order([len(item["input_ids"]) for item in val_set], budget) if val_set else []
    return PackedData(sampler, collator, eval_batches, micro, max(1, len(sampler) // (world_size * micro)), setup)


class PackedTrainer(LoraTrainer):
    """A Trainer whose loaders yield packed rows; everything else (optimizer, DeepSpeed, logging) is its own."""

    def __init__(self, *args: Any, packing: PackedData, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.packing = packing
        self.add_callback(_SamplerEpoch(packing.sampler))

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        # Under DDP the LoRA gradients then live in the all-reduce buckets instead of being copied out of them
        # after every backward, one copy call per trainable tensor (448 for a 32-layer model). Training is the
        # same (same losses); on 2 H200s the copies cost 13-17% of the steady throughput (benchmarks/RESULTS.md).
        if getattr(self.accelerator, "ddp_handler", None) is None:
            from accelerate.utils import DistributedDataParallelKwargs
            self.accelerator.ddp_handler = DistributedDataParallelKwargs()
        self.accelerator.ddp_handler.gradient_as_bucket_view = GRADIENT_AS_BUCKET_VIEW

    def get_train_dataloader(self) -> DataLoader:
        loader = DataLoader(self.train_dataset, batch_sampler=self.packing.sampler, collate_fn=self.packing.collator,
                            pin_memory=torch.cuda.is_available())
        return self.accelerator.prepare(loader)

    def get_eval_dataloader(self, eval_dataset: Any = None) -> DataLoader:
        # Padded rows are refused by the variable-length attention: evaluation is packed too.
        loader = DataLoader(eval_dataset if eval_dataset is not None else self.eval_dataset,
                            batch_sampler=self.packing.eval_batches, collate_fn=self.packing.collator)
        return self.accelerator.prepare(loader)


class _SamplerEpoch(TrainerCallback):
    """A new shuffle each epoch: accelerate's loader wrapper does not pass the epoch to a batch sampler."""

    def __init__(self, sampler: PackedStepSampler) -> None:
        self.sampler = sampler

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.sampler.set_epoch(int(state.epoch or 0))
