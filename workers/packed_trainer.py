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
from workers.packed_model import prepare_model_for_packing
from workers.packing import PackedStepSampler, PackingCollator, group_in_order, micro_batches_for_budget


@dataclass
class PackedData:
    sampler: PackedStepSampler
    collator: PackingCollator
    eval_batches: list[list[int]]
    micro_batches: int  # per rank and optimizer step: the Trainer's gradient_accumulation_steps
    steps_per_epoch: int


def prepare_packing(model: torch.nn.Module, train_set: list[dict], val_set: list[dict], pad_token_id: int,
                    tune: FinetuneSettings, world_size: int, compile_layers: bool) -> PackedData:
    """Wire the model for packed batches and plan the steps; call after get_peft_model."""
    prepare_model_for_packing(model, compile_layers=compile_layers)
    lengths = [len(item["input_ids"]) for item in train_set]
    budget = max(tune.packing_max_tokens, max(lengths, default=1))
    micro = micro_batches_for_budget(lengths, tune.batch_size, world_size, max_tokens=budget, seed=tune.seed,
                                     epochs=max(1, math.ceil(tune.num_epochs)))
    sampler = PackedStepSampler(lengths, tune.batch_size, world_size, micro, seed=tune.seed)
    collator = PackingCollator(max_length=tune.cutoff_len, pad_token_id=pad_token_id)
    eval_batches = group_in_order([len(item["input_ids"]) for item in val_set], budget) if val_set else []
    return PackedData(sampler, collator, eval_batches, micro, max(1, len(sampler) // (world_size * micro)))


class PackedTrainer(LoraTrainer):
    """A Trainer whose loaders yield packed rows; everything else (optimizer, DeepSpeed, logging) is its own.

    It also spares the CPU the Trainer's walks over the whole model, which on a GPU left it idle between steps.
    A pruned 8B model under peft has about 2,700 modules and 740 parameter tensors, and the Trainer walks them
    all to count parameters for its FLOP estimate and to set train mode (each micro-batch), and to clip and
    zero gradients (each step): about 45 ms of Python per optimizer step on the 2-core dev VM, for the 448
    LoRA tensors that have gradients. Here each of those touches only what it needs; what is computed stays
    the same (the same norm, FLOP count, modes and zeroed gradients). ``packing=off`` keeps the Trainer's
    defaults: it is the LLM-Pruner reference, speed included.
    """

    def __init__(self, *args: Any, packing: PackedData, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.packing = packing
        self.trainable = [param for param in self.model.parameters() if param.requires_grad]
        self.flop_parameters: int | None = None
        TrainModeOnce.install(self.model)
        self.add_callback(_SamplerEpoch(packing.sampler))
        self.add_callback(_ZeroTrainableGrads(self))

    def get_train_dataloader(self) -> DataLoader:
        # One worker packs the next micro-batches while this process launches the current one.
        loader = DataLoader(self.train_dataset, batch_sampler=self.packing.sampler, collate_fn=self.packing.collator,
                            pin_memory=torch.cuda.is_available(), num_workers=1, persistent_workers=True,
                            prefetch_factor=4)
        return self.accelerator.prepare(loader)

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        if self.flop_parameters is None:  # the Trainer's formula, with the parameter count taken once
            self.flop_parameters = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs["input_ids"].numel() * self.flop_parameters

    def _clip_grad_norm(self, model: torch.nn.Module) -> Any:
        if self.is_deepspeed_enabled:
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_(self.trainable, self.args.max_grad_norm)

    def get_eval_dataloader(self, eval_dataset: Any = None) -> DataLoader:
        # Padded rows are refused by the variable-length attention: evaluation is packed too.
        loader = DataLoader(eval_dataset if eval_dataset is not None else self.eval_dataset,
                            batch_sampler=self.packing.eval_batches, collate_fn=self.packing.collator)
        return self.accelerator.prepare(loader)


class TrainModeOnce:
    """``model.train()`` that walks the module tree only when the mode changes.

    The Trainer calls ``model.train()`` before every micro-batch. Installed on the model the Trainer was given,
    this catches every whole-model mode change: ``model.eval()`` and ``train()`` call it, and so do the DDP and
    DeepSpeed wrappers, whose own ``train`` walks down to it. A mode set on a submodule directly would go unseen;
    neither the Trainer nor this worker does that.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.walk, self.mode = model, model.train, None

    @classmethod
    def install(cls, model: torch.nn.Module) -> None:
        model.train = cls(model)  # an instance attribute: Module.eval() and the wrappers' walks call it

    def __call__(self, mode: bool = True) -> torch.nn.Module:
        if mode != self.mode or self.model.training != mode:
            self.walk(mode)
            self.mode = mode
        return self.model


class _ZeroTrainableGrads(TrainerCallback):
    """Zero only the LoRA gradients after each step: the Trainer's ``model.zero_grad()`` walks every parameter.

    Without DeepSpeed only: its engine keeps gradients of its own and zeroes them in its own ``zero_grad``.
    """

    def __init__(self, trainer: PackedTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer.is_deepspeed_enabled:
            return
        trainable = self.trainer.trainable

        def zero_grad(set_to_none: bool = True) -> None:
            for param in trainable:
                if param.grad is None:
                    continue
                if set_to_none:
                    param.grad = None
                else:
                    param.grad.detach_().zero_()
        self.trainer.model_wrapped.zero_grad = zero_grad  # the wrapper the training loop calls, after wrapping


class _SamplerEpoch(TrainerCallback):
    """A new shuffle each epoch: accelerate's loader wrapper does not pass the epoch to a batch sampler."""

    def __init__(self, sampler: PackedStepSampler) -> None:
        self.sampler = sampler

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.sampler.set_epoch(int(state.epoch or 0))
