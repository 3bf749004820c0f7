"""Loading pruned checkpoints (Hugging Face folders, or LLM-Pruner pickles with an opt-in)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from jobs.checkpoints import find_checkpoint
from jobs.errors import InputError

log = logging.getLogger(__name__)
# Task logs are files: a progress bar per weight shard is noise there.
transformers_logging.disable_progress_bar()


def resolve_dtype(precision: str) -> torch.dtype:
    """'auto' is bf16 on a GPU that has it and fp32 elsewhere (CPU fp16/bf16 matmuls are slow or inexact)."""
    if precision == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def load_pruned_model(path: Path, allow_pickle: bool, dtype: torch.dtype = torch.float32
                      ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the model and tokenizer of one pruned checkpoint, ready for training or evaluation."""
    kind, location = find_checkpoint(path)
    if kind == "hf":
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(location)
    else:
        if not allow_pickle:
            raise InputError(f"{location} is a pickled checkpoint, and loading a pickle runs code from it; "
                             f"if you trust it, add its model or pair to study.allow_pickle")
        log.warning("loading pickled checkpoint %s (opted in by study.allow_pickle)", location)
        checkpoint = torch.load(location, map_location="cpu", weights_only=False)
        if not isinstance(checkpoint, dict) or "model" not in checkpoint or "tokenizer" not in checkpoint:
            raise InputError(f"{location} is not an LLM-Pruner checkpoint (a dict with 'model' and 'tokenizer')")
        model, tokenizer = checkpoint["model"], checkpoint["tokenizer"]
        model = model.to(dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
