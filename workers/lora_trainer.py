"""The Trainer both finetune paths use: transformers' own, without two costs it adds to LoRA under DeepSpeed.

- **Checkpoints.** Under DeepSpeed ZeRO-0/1/2, ``Trainer.save_model`` asks accelerate for the model's state
  dict, and accelerate copies every tensor of the model into CPU memory first (13 GB for a 6.7B model, on
  every rank of the node at once), only for peft to keep the adapter's few MB of it. Here peft reads the
  adapter from the model directly: ZeRO-2 keeps whole parameters on every rank, so they are the trained
  ones. ZeRO-3 shards parameters, so it keeps the Trainer's own path, which gathers them.
- **Gradient norm.** Under DeepSpeed, accelerate and the Trainer read each step's gradient norm into a Python
  float, which makes the CPU wait for the GPU once per optimizer step and leaves the GPU idle while the next
  step is launched. Here the norm stays a device tensor; the Trainer reads it when it writes a log line
  (every ``finetune.logging_steps``), as it already does without DeepSpeed.

Neither changes what is trained or saved: the same adapter weights go into each checkpoint, and the
same norm goes into the log.
"""
from __future__ import annotations

from typing import Any

import torch
from peft import PeftModel
from transformers import Trainer


class LoraTrainer(Trainer):
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not (self.is_deepspeed_enabled and isinstance(self.model, PeftModel) and _zero_stage(self) < 3):
            return super().save_model(output_dir, _internal_call)
        if self.args.should_save:  # no state_dict: peft's save_pretrained takes only its adapter, from the model
            self._save(output_dir or self.args.output_dir)

    def _clip_grad_norm(self, model: torch.nn.Module) -> Any:
        if self.is_deepspeed_enabled:  # DeepSpeed has clipped already; accelerate would hand its norm over as a float
            return self.deepspeed.get_global_grad_norm()
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
        if self.is_deepspeed_enabled and torch.is_tensor(grad_norm):
            return grad_norm  # logging calls .item() on it at its own steps
        return super()._get_grad_norm(model, grad_norm)


def _zero_stage(trainer: Trainer) -> int:
    """The DeepSpeed engine's ZeRO stage, read as the Trainer reads it."""
    return int(trainer.deepspeed.config.get("zero_optimization", {}).get("stage", 0))
