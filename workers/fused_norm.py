"""RMSNorm through PyTorch's fused kernel while evaluating: the same numbers, a fraction of the memory traffic.

Llama, Qwen2/3 and Mistral normalize with the same few lines in transformers: upcast to fp32, mean of squares,
``rsqrt``, downcast, times the weight. Eager PyTorch runs that as about seven elementwise kernels, each reading
and writing the whole activation; on an H100, forward-only scoring of a 6.7B model spent ~15% of its time there
(65 norms per forward pass). ``torch.nn.functional.rms_norm`` computes the same thing in fp32 in one kernel and
returns the input dtype; multiplying by the weight afterwards keeps transformers' order of rounding (normalized
value rounded to the model dtype, then times the weight). Only float rounding inside the reduction differs.

Used by the ``prunetune`` lm-eval backend and by the perplexity worker; training never uses it (the packed
training path compiles its own fused kernels). A module is left alone when its class is not one of these
standard norms, or when something (an accelerate device-map hook) already replaced its ``forward``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.nn import functional

STANDARD_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})


def _fused(module: torch.nn.Module):
    shape, eps, weight = (module.weight.shape[-1],), module.variance_epsilon, module.weight

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        return weight * functional.rms_norm(hidden_states, shape, eps=eps)

    return forward


@contextlib.contextmanager
def fused_rms_norms(model: torch.nn.Module) -> Iterator[int]:
    """Inside the block the model's standard RMSNorm modules run the fused kernel; yields how many were swapped."""
    swapped = [module for module in model.modules()
               if type(module).__name__ in STANDARD_NORMS and "forward" not in module.__dict__
               and isinstance(getattr(module, "variance_epsilon", None), float)
               and isinstance(getattr(module, "weight", None), torch.Tensor)]
    for module in swapped:
        module.forward = _fused(module)
    try:
        yield len(swapped)
    finally:
        for module in swapped:
            del module.forward
