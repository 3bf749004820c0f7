"""The finetune worker's padding-free path: the Trainer fed packed micro-batches (``workers/packing.py``).

The recipe stays the same: the same examples, ``finetune.batch_size`` (64) sequences per optimizer step
over all ranks, prompt tokens masked, the same LoRA targets. What changes is the layout: each micro-batch
is one row of up to ``finetune.packing_max_tokens`` real tokens (no padding), variable-length attention
keeps sequences apart, the loss is chunked, and each step's 64 sequences are spread over ranks and
micro-batches by tokens. ``benchmarks/lora_throughput.py`` measures what this buys on a GPU; the loss is
the token mean over the whole step (``num_items_in_batch``), as the padded transformers 5 path computes it.
With ``finetune.cuda_graphs=on`` each training micro-batch runs as a CUDA graph (``workers/captured_steps.py``).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import TrainerCallback

from jobs.config import FinetuneSettings
from workers.captured_steps import CapturedMicroBatches, FlatGradients
from workers.lora_trainer import LoraTrainer
from workers.packed_model import PackingSetup, causal_lm, prepare_model_for_packing
from workers.packing import PackedStepSampler, PackingCollator, group_in_order, micro_batches_for_budget

GRADIENT_AS_BUCKET_VIEW = True  # DDP's option for the packed path; benchmarks/finetune_worker_gpu.py compares both
GROUP_LORA = True  # LoRA targets sharing an input run as one group where allowed; the benchmark compares both
CAPTURE_PAD_MULTIPLE: int | None = None  # captured micro-batches pad to it (None: the cutoff); the benchmark varies it


@dataclass
class PackedData:
    sampler: PackedStepSampler
    collator: PackingCollator
    eval_batches: list[list[int]]
    micro_batches: int  # per rank and optimizer step: the Trainer's gradient_accumulation_steps
    steps_per_epoch: int
    setup: PackingSetup  # what the model side turned on, for the run's record
    eval_collator: PackingCollator
    cuda_graphs: bool = False  # training micro-batches run as CUDA graphs (workers/captured_steps.py)


def prepare_packing(model: torch.nn.Module, train_set: list[dict], val_set: list[dict], pad_token_id: int,
                    tune: FinetuneSettings, world_size: int, compile_layers: bool,
                    group_lora: bool = True) -> PackedData:
    """Wire the model for packed batches and plan the steps; call after get_peft_model.

    With ``finetune.cuda_graphs=on`` training micro-batches are padded to a multiple of the cutoff and to a
    fixed count of segments (one step's sequences and a filler), so that their shapes depend on the token
    count only; evaluation batches are not captured and stay unpadded.
    """
    setup = prepare_model_for_packing(model, compile_layers=compile_layers, group_lora=group_lora and GROUP_LORA)
    lengths = [len(item["input_ids"]) for item in train_set]
    budget = max(tune.packing_max_tokens, max(lengths, default=1))
    micro = micro_batches_for_budget(lengths, tune.batch_size, world_size, max_tokens=budget, seed=tune.seed,
                                     epochs=max(1, math.ceil(tune.num_epochs)))
    sampler = PackedStepSampler(lengths, tune.batch_size, world_size, micro, seed=tune.seed)
    eval_collator = PackingCollator(max_length=tune.cutoff_len, pad_token_id=pad_token_id)
    graphs = tune.cuda_graphs == "on"
    collator = captured_collator(tune, pad_token_id) if graphs else eval_collator
    eval_batches = group_in_order([len(item["input_ids"]) for item in val_set], budget) if val_set else []
    return PackedData(sampler, collator, eval_batches, micro, max(1, len(sampler) // (world_size * micro)), setup,
                      eval_collator, graphs)


def captured_collator(tune: FinetuneSettings, pad_token_id: int) -> PackingCollator:
    """The training collator under ``finetune.cuda_graphs=on``: lengths padded to a multiple of the cutoff; a
    micro-batch holds at most one step's sequences, and the filler is one segment. No target positions: their
    count varies, and the graphs score every position."""
    return PackingCollator(max_length=tune.cutoff_len, pad_token_id=pad_token_id,
                           pad_to_multiple_of=CAPTURE_PAD_MULTIPLE or tune.cutoff_len, segments=tune.batch_size + 1,
                           target_positions=False)


class PackedTrainer(LoraTrainer):
    """A Trainer whose loaders yield packed rows; everything else (optimizer, DeepSpeed, logging) is its own."""

    def __init__(self, *args: Any, packing: PackedData, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.packing = packing
        self.captured: CapturedMicroBatches | None = None  # made at the first training micro-batch
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

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        if not self.packing.cuda_graphs:
            return super().training_step(model, inputs, num_items_in_batch)
        # Past DDP's wrapper: its hooks would have to run at every replay. The ranks' gradients are averaged below.
        module = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        if self.captured is None:
            self.captured = self._capture_setup(model, module)
        if not module.training:
            module.train()
        inputs = self._prepare_inputs(inputs)
        inputs["num_items_in_batch"] = torch.as_tensor(num_items_in_batch, device=inputs["input_ids"].device)
        loss = self.captured(inputs)
        if self.accelerator.sync_gradients:
            self.captured.grads.average_over_ranks()
        return loss

    def _capture_setup(self, model: torch.nn.Module, module: torch.nn.Module) -> CapturedMicroBatches:
        if self.is_deepspeed_enabled:
            raise RuntimeError("finetune.cuda_graphs=on runs without DeepSpeed (finetune.deepspeed=none)")
        if not self.model_accepts_loss_kwargs:  # the loss must be normalised by the step's target count
            raise RuntimeError(f"finetune.cuda_graphs=on: {type(module).__name__}.forward takes no num_items_in_batch")
        grads = FlatGradients([param for param in module.parameters() if param.requires_grad])
        model.zero_grad = grads.zero  # the Trainer's zero_grad after each step would set the gradients to None
        return CapturedMicroBatches(functools.partial(self._captured_loss, module), grads,
                                    causal_lm(module)._prunetune_loss, capture=torch.cuda.is_available())

    def _captured_loss(self, module: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        inputs = {key: value for key, value in batch.items() if key != "num_items_in_batch"}
        with self.compute_loss_context_manager():
            return self.compute_loss(module, inputs, num_items_in_batch=batch["num_items_in_batch"])

    def get_train_dataloader(self) -> DataLoader:
        loader = DataLoader(self.train_dataset, batch_sampler=self.packing.sampler, collate_fn=self.packing.collator,
                            pin_memory=torch.cuda.is_available())
        return self.accelerator.prepare(loader)

    def get_eval_dataloader(self, eval_dataset: Any = None) -> DataLoader:
        # Padded rows are refused by the variable-length attention: evaluation is packed too.
        loader = DataLoader(eval_dataset if eval_dataset is not None else self.eval_dataset,
                            batch_sampler=self.packing.eval_batches, collate_fn=self.packing.eval_collator)
        return self.accelerator.prepare(loader)


class _SamplerEpoch(TrainerCallback):
    """A new shuffle each epoch: accelerate's loader wrapper does not pass the epoch to a batch sampler."""

    def __init__(self, sampler: PackedStepSampler) -> None:
        self.sampler = sampler

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.sampler.set_epoch(int(state.epoch or 0))
