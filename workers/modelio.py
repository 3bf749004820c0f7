"""Loading pruned checkpoints: Hugging Face folders, converted pickles (no unpickling), or LLM-Pruner pickles
with an opt-in."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.initialization import no_init_weights
from transformers.utils import logging as transformers_logging

from jobs.checkpoints import SHAPES_FILE, convert_command, find_checkpoint
from jobs.errors import InputError
from jobs.state import read_json

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
    """Load the model and tokenizer of one pruned checkpoint, ready for training or evaluation.

    A converted pickle (``launch.py convert``) is preferred over the pickle and needs no opt-in; a pickle
    itself loads only with ``allow_pickle`` (``study.allow_pickle``), because unpickling runs code from it.
    """
    kind, location = find_checkpoint(path)
    if kind == "hf":
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(location)
    elif kind == "converted":
        model = load_converted(location).to(dtype)
        tokenizer = AutoTokenizer.from_pretrained(location)
    else:
        if not allow_pickle:
            raise InputError(f"{location} is a pickled checkpoint, and loading a pickle runs code from it; "
                             "if you trust it, add its model or pair to study.allow_pickle, or convert it once to "
                             f"safetensors: {convert_command(path=location)}")
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


def load_converted(folder: Path) -> PreTrainedModel:
    """Rebuild a pruned model from ``config.json``, resize its layers to ``pruned_shapes.json``, then load the
    tensors from ``model.safetensors`` (``workers/convert.py``). Nothing is unpickled."""
    config = AutoConfig.from_pretrained(folder)
    shapes = read_json(folder / SHAPES_FILE)["tensors"]
    # Every weight is overwritten from safetensors below (strict), so skip the random init: for an 8B-class
    # model it is most of the loading time. init_weights is what ties embeddings; tie them here instead.
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    for name, shape in shapes.items():
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        current = getattr(module, leaf, None)
        if not isinstance(current, torch.Tensor) or list(current.shape) == list(shape):
            continue
        # Pruned: this layer is narrower than config.json says. The values come from safetensors below.
        resized = torch.empty(shape, dtype=current.dtype)
        if isinstance(current, torch.nn.Parameter):
            setattr(module, leaf, torch.nn.Parameter(resized, requires_grad=current.requires_grad))
        else:
            module.register_buffer(leaf, resized)
        if isinstance(module, torch.nn.Linear) and leaf == "weight":
            module.out_features, module.in_features = shape
    _fit_attention_heads(model)
    missing, unexpected = load_model(model, str(folder / "model.safetensors"), strict=True)
    if missing or unexpected:
        raise InputError(f"{folder}/model.safetensors does not match its config (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}); convert the pickle again")
    return model.eval()


def _fit_attention_heads(model: PreTrainedModel) -> None:
    """Head pruning leaves fewer query and key/value heads per layer; attention repeats key/value heads by the
    ratio it computed from config.json, so set it from each layer's own projections."""
    for module in model.modules():
        q_proj, k_proj = getattr(module, "q_proj", None), getattr(module, "k_proj", None)
        head_dim = getattr(module, "head_dim", None)
        if not (isinstance(q_proj, torch.nn.Linear) and isinstance(k_proj, torch.nn.Linear) and head_dim):
            continue
        heads, kv_heads = q_proj.out_features // head_dim, k_proj.out_features // head_dim
        if hasattr(module, "num_key_value_groups") and kv_heads:
            module.num_key_value_groups = heads // kv_heads
        for attribute, value in (("num_heads", heads), ("num_key_value_heads", kv_heads)):
            if hasattr(module, attribute):
                setattr(module, attribute, value)
