"""Padding-free LoRA training: packed batches, token-balanced steps, variable-length attention, chunked loss.

The LLM-Pruner recipe pads micro-batches of 4 sequences to the longest and runs 16 of them per optimizer
step; most of that time goes to padding, the 128k-vocabulary logits and unfused small kernels. This module
keeps the recipe's semantics (the same examples, 64 sequences per optimizer step, prompt tokens masked,
the same LoRA targets) and changes only how the work is laid out:

- ``PackingCollator`` concatenates a micro-batch's sequences into one row with no padding: position ids
  restart at 0 for each sequence, each sequence's first label is -100 (so no token is trained to predict
  the next sequence), and ``cu_seq_lens_q/k`` mark the boundaries for variable-length attention.
- ``PackedStepSampler`` cuts the shuffled examples into steps of exactly ``sequences_per_step`` sequences
  and spreads each step over ``world_size x micro_batches`` micro-batches balanced by tokens, not by
  sequences (longest-first into the lightest bin), so every rank does the same work.
- ``prepare_model_for_packing`` registers the variable-length attention (flash-attention's varlen kernel
  that ships inside PyTorch on CUDA; an SDPA block-diagonal mask elsewhere), makes the causal LM compute
  its loss with ``linear_cross_entropy`` (chunked, so the fp32 logits of a 128k vocabulary never exist
  all at once, and only for positions that have a target), and optionally compiles each decoder layer
  (regional ``torch.compile``: one compile serves all layers).

Loss normalisation. ``linear_cross_entropy`` returns sum(token losses) x ``scale``. The causal LM divides
by ``num_items_in_batch`` when the caller passes it (the transformers 5 Trainer does: the number of target
tokens in the whole optimizer step over all ranks), else by this micro-batch's own target count. With the
Trainer that is a token mean over the 64-sequence step, which is what our padded worker already computes
with transformers 5 and does not depend on how the step is cut into micro-batches. LLM-Pruner itself ran
transformers 4.2x, which averaged per micro-batch and then over the 16 accumulation steps; that mean
depends on the micro-batch split, so a packed run cannot reproduce it and does not try.

Everything imports and runs on CPU (the tests use the SDPA fallback); nothing here needs a CUDA-only package.
"""
from __future__ import annotations

import logging
import math
import random
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ATTENTION_NAME = "prunetune_varlen"  # our entry in transformers' AttentionInterface


# ---- collator -------------------------------------------------------------------------------------

@dataclass
class PackingCollator:
    """Concatenate tokenized examples into one padding-free row of shape [1, tokens].

    ``max_length`` is the largest sequence length the attention kernel must expect; passing a fixed
    bound (the cutoff length) instead of each batch's own maximum keeps compiled code from
    recompiling for every new maximum. ``pad_to_multiple_of`` appends one filler segment of
    ``pad_token_id`` with no targets (its own attention segment), for callers that want aligned shapes.
    """

    max_length: int = 256
    pad_token_id: int = 0
    pad_to_multiple_of: int | None = None
    target_positions: bool = True  # also return where targets are, so the loss needs no device sync to find them

    def __call__(self, items: Sequence[dict[str, Sequence[int]]]) -> dict[str, Any]:
        input_ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        bounds = [0]
        for item in items:
            ids = list(item["input_ids"])
            if not ids:
                continue
            if len(ids) > self.max_length:
                raise ValueError(f"a sequence of {len(ids)} tokens is longer than the packing bound max_length="
                                 f"{self.max_length}; build the collator with max_length=cutoff_len")
            item_labels = list(item.get("labels", ids))
            item_labels[0] = IGNORE_INDEX  # the previous sequence's last token must not learn to predict it
            input_ids += ids
            labels += item_labels
            positions += range(len(ids))
            bounds.append(bounds[-1] + len(ids))
        if self.pad_to_multiple_of and len(input_ids) % self.pad_to_multiple_of:
            filler = self.pad_to_multiple_of - len(input_ids) % self.pad_to_multiple_of
            input_ids += [self.pad_token_id] * filler
            labels += [IGNORE_INDEX] * filler
            positions += range(filler)
            bounds.append(bounds[-1] + filler)
        cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
        batch = {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "cu_seq_lens_q": cu_seqlens,
            "cu_seq_lens_k": cu_seqlens,
            "max_length_q": self.max_length,
            "max_length_k": self.max_length,
        }
        if self.target_positions:  # position t predicts labels[t + 1]
            batch["target_positions"] = torch.tensor(
                [t for t in range(len(labels) - 1) if labels[t + 1] != IGNORE_INDEX], dtype=torch.long)
        return batch


# ---- token-balanced steps -------------------------------------------------------------------------

def balance_by_tokens(lengths: Sequence[int], indices: Sequence[int], bins: int) -> list[list[int]]:
    """Split ``indices`` into ``bins`` groups of near-equal total length: longest first into the lightest.

    Each group is returned in the original order of ``indices``. The heaviest group exceeds the mean by
    less than the longest single sequence.
    """
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    if len(indices) < bins:
        raise ValueError(f"{len(indices)} sequences cannot fill {bins} micro-batches; use fewer micro-batches or ranks")
    rank_of = {index: place for place, index in enumerate(indices)}
    groups: list[list[int]] = [[] for _ in range(bins)]
    loads = [0] * bins
    for index in sorted(indices, key=lambda i: (-lengths[i], rank_of[i])):
        lightest = min(range(bins), key=lambda b: (loads[b], len(groups[b]), b))
        groups[lightest].append(index)
        loads[lightest] += lengths[index]
    return [sorted(group, key=rank_of.__getitem__) for group in groups]


def plan_steps(lengths: Sequence[int], sequences_per_step: int, world_size: int, micro_batches: int,
               seed: int, epoch: int = 0) -> list[list[list[int]]]:
    """One epoch's optimizer steps: ``steps[s][b]`` lists the examples of micro-batch ``b`` of step ``s``.

    Examples are shuffled with ``seed`` and ``epoch``, cut into steps of ``sequences_per_step``, and each
    step is split into ``world_size x micro_batches`` token-balanced micro-batches; micro-batch ``b`` goes
    to rank ``b % world_size``. A last step too short to give every micro-batch a sequence is dropped
    (at most ``world_size x micro_batches - 1`` examples an epoch).
    """
    order = list(range(len(lengths)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    bins = world_size * micro_batches
    steps = []
    for start in range(0, len(order), sequences_per_step):
        chunk = order[start:start + sequences_per_step]
        if len(chunk) < bins:
            log.warning("dropping the last %d example(s) of epoch %d: too few for %d micro-batches",
                        len(chunk), epoch, bins)
            break
        steps.append(balance_by_tokens(lengths, chunk, bins))
    return steps


def micro_batches_for_budget(lengths: Sequence[int], sequences_per_step: int, world_size: int, max_tokens: int,
                             seed: int, epochs: int = 1) -> int:
    """The fewest micro-batches per rank and step that keep every micro-batch within ``max_tokens``."""
    if max(lengths, default=0) > max_tokens:
        raise ValueError(f"max_tokens {max_tokens} is below the longest sequence ({max(lengths)} tokens)")
    ceiling = max(1, math.ceil(sequences_per_step / world_size))
    for micro in range(1, ceiling + 1):
        fits = all(sum(lengths[i] for i in group) <= max_tokens
                   for epoch in range(max(1, epochs))
                   for step in plan_steps(lengths, sequences_per_step, world_size, micro, seed, epoch)
                   for group in step)
        if fits:
            return micro
    return ceiling


def group_in_order(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Consecutive examples packed into groups of at most ``max_tokens`` tokens (evaluation batches).

    The order is kept, so an evaluation pass is deterministic; each group is one packed micro-batch whose
    loss is its own target-token mean.
    """
    groups: list[list[int]] = []
    load = max_tokens + 1
    for index, length in enumerate(lengths):
        if length > max_tokens:
            raise ValueError(f"example {index} has {length} tokens, more than max_tokens={max_tokens}")
        if load + length > max_tokens:
            groups.append([])
            load = 0
        groups[-1].append(index)
        load += length
    return groups


class PackedStepSampler(torch.utils.data.Sampler[list[int]]):
    """Batch sampler yielding packed micro-batches (lists of example indices), step after step.

    Within a step the order is micro-batch-major then rank (``b = micro * world_size + rank``), which is
    how accelerate's ``BatchSamplerShard`` deals batches round-robin to ranks; a loop without accelerate
    takes ``batches[rank::world_size]`` of each step. Every rank gets ``micro_batches`` micro-batches per
    step, so a fixed ``gradient_accumulation_steps = micro_batches`` holds exactly one step's 64 sequences.
    Call ``set_epoch`` each epoch for a fresh shuffle.
    """

    def __init__(self, lengths: Sequence[int], sequences_per_step: int = 64, world_size: int = 1,
                 micro_batches: int = 1, seed: int = 0) -> None:
        self.lengths = list(lengths)
        self.sequences_per_step = sequences_per_step
        self.world_size = world_size
        self.micro_batches = micro_batches
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def steps(self) -> list[list[list[int]]]:
        return plan_steps(self.lengths, self.sequences_per_step, self.world_size, self.micro_batches,
                          self.seed, self.epoch)

    def __iter__(self) -> Iterator[list[int]]:
        for step in self.steps():
            yield from step

    def __len__(self) -> int:
        full, rest = divmod(len(self.lengths), self.sequences_per_step)
        bins = self.world_size * self.micro_batches
        return (full + (rest >= bins)) * bins


# ---- chunked linear + cross-entropy ---------------------------------------------------------------

def _chunk_loss_and_grad(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                         need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed cross-entropy of one chunk (times ``scale``) and its gradient w.r.t. ``hidden``.

    Logits are computed in the weight's precision and upcast to fp32, as transformers' loss does.
    """
    logits = (hidden @ weight.t()).float()
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, targets[:, None]).squeeze(1)
    loss = (lse - picked).sum() * scale
    if not need_grad:
        return loss, None
    probs = torch.exp(logits - lse[:, None])
    probs.scatter_add_(1, targets[:, None], torch.full_like(picked[:, None], -1.0))
    grad = (probs * scale).to(weight.dtype) @ weight
    return loss, grad


_compiled_chunk = None


def _chunk_fn(compiled: bool):
    global _compiled_chunk
    if not compiled:
        return _chunk_loss_and_grad
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_chunk_loss_and_grad, dynamic=True)
    return _compiled_chunk


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss and input gradient in one pass over vocabulary chunks; the (frozen) weight gets no gradient."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: float,
                chunk_size: int, compiled: bool) -> torch.Tensor:
        fn = _chunk_fn(compiled)
        need_grad = hidden.requires_grad
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if need_grad else None
        # a device tensor: no recompile per value, and no host-to-device copy that would wait for the GPU
        scale_t = (scale.to(device=hidden.device, dtype=torch.float32) if torch.is_tensor(scale)
                   else hidden.new_full((), scale, dtype=torch.float32))
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                part = slice(start, start + chunk_size)
                chunk_loss, chunk_grad = fn(hidden[part].to(weight.dtype), weight, targets[part], scale_t, need_grad)
                loss += chunk_loss
                if grad is not None:
                    grad[part] = chunk_grad
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        grad_hidden = None if grad is None else grad * grad_loss.to(grad.dtype)
        return grad_hidden, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         scale: float | torch.Tensor = 1.0, chunk_size: int = 4096, compiled: bool = False,
                         target_positions: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Causal-LM loss ``sum(CE(hidden[t] @ weight.T, labels[t+1])) * scale`` and the number of targets.

    ``hidden`` is [batch, tokens, dim] (the decoder's final normed output), ``labels`` [batch, tokens] with
    -100 where nothing is predicted. Only positions with a target go through the head, ``chunk_size`` rows
    at a time, so peak extra memory is ``chunk_size x vocab`` fp32 values instead of ``tokens x vocab``.
    The gradient w.r.t. ``hidden`` is computed during the forward pass (the head is frozen under LoRA), so
    backward costs nothing more. ``target_positions`` (indices into the flattened ``[batch * (tokens - 1)]``
    positions, as ``PackingCollator`` gives them) saves the device sync of finding them here.
    """
    targets = labels[:, 1:].reshape(-1)
    rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    if target_positions is None:
        keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    else:
        keep = target_positions.to(device=hidden.device, dtype=torch.long)
    count = int(keep.numel())
    if count == 0:
        return hidden.sum() * 0.0, 0
    loss = _LinearCrossEntropy.apply(rows.index_select(0, keep), weight, targets.index_select(0, keep), scale,
                                     chunk_size, compiled)
    return loss, count


# ---- variable-length attention --------------------------------------------------------------------

def _flash_available() -> bool:
    return torch.cuda.is_available() and hasattr(torch.ops.aten, "_flash_attention_forward")


if hasattr(torch, "library") and hasattr(torch.library, "custom_op"):
    @torch.library.custom_op("prunetune::varlen_attn", mutates_args=())
    def _varlen_attn(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_length: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = torch.ops.aten._flash_attention_forward(
            query, key, value, cu_seqlens, cu_seqlens, max_length, max_length, 0.0, True, False, scale=scale)[:2]
        return out, lse

    @_varlen_attn.register_fake
    def _(query, key, value, cu_seqlens, max_length, scale):
        return torch.empty_like(query), query.new_empty((query.shape[1], query.shape[0]), dtype=torch.float32)

    @torch.library.custom_op("prunetune::varlen_attn_backward", mutates_args=())
    def _varlen_attn_backward(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, max_length: int,
                              scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        seed = torch.zeros((2,), dtype=torch.uint64, device=query.device)  # read only with dropout > 0
        offset = torch.empty(0, device=query.device)
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad_out.contiguous(), query, key, value, out, lse, cu_seqlens, cu_seqlens, max_length, max_length,
            0.0, True, seed, offset, scale=scale)
        return dq, dk, dv

    @_varlen_attn_backward.register_fake
    def _(grad_out, query, key, value, out, lse, cu_seqlens, max_length, scale):
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)

    def _setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        query, key, value, cu_seqlens, max_length, scale = inputs
        out, lse = output
        ctx.save_for_backward(query, key, value, out, lse, cu_seqlens)
        ctx.max_length, ctx.scale = max_length, scale

    def _backward(ctx: Any, grad_out: torch.Tensor, grad_lse: torch.Tensor) -> tuple[Any, ...]:
        query, key, value, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = _varlen_attn_backward(grad_out, query, key, value, out, lse, cu_seqlens, ctx.max_length,
                                           ctx.scale)
        return dq, dk, dv, None, None, None

    _varlen_attn.register_autograd(_backward, setup_context=_setup)
else:  # pragma: no cover - torch < 2.4
    _varlen_attn = None

_FLASH_GQA: bool | None = None  # learned on first use: whether the varlen kernel takes fewer KV heads


def probe_flash_gqa(device: torch.device) -> bool:
    """Whether the varlen kernel takes fewer KV heads than query heads (forward and backward); cached."""
    global _FLASH_GQA
    if _FLASH_GQA is None:
        try:
            q = torch.randn(16, 4, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
            kv = torch.randn(16, 2, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
            cu = torch.tensor([0, 9, 16], dtype=torch.int32, device=device)
            _varlen_attn(q, kv, kv, cu, 16, 0.125)[0].sum().backward()
            _FLASH_GQA = True
        except RuntimeError as error:
            log.info("varlen flash attention takes no GQA here (%s); repeating KV heads", error)
            _FLASH_GQA = False
    return _FLASH_GQA


def _flash_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                  max_length: int, scale: float) -> torch.Tensor:
    groups = query.shape[1] // key.shape[1]
    if groups > 1 and not probe_flash_gqa(query.device):
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return _varlen_attn(query, key, value, cu_seqlens, max_length, scale)[0]


def _block_causal_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """Reference path (CPU, fp32): SDPA with a block-diagonal causal mask, [tokens, heads, dim] layout."""
    tokens = query.shape[0]
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    segment = torch.searchsorted(cu_seqlens[1:].to(torch.long), torch.arange(tokens, device=query.device),
                                 right=True)
    position = torch.arange(tokens, device=query.device)
    mask = (segment[:, None] == segment[None, :]) & (position[:, None] >= position[None, :])
    out = F.scaled_dot_product_attention(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1),
                                         attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function for packed rows: ``query`` [1, heads, tokens, dim] -> [1, tokens, heads, dim].

    Sequence boundaries come from ``cu_seq_lens_q`` (the collator's); without them the row is one causal
    sequence. Flash-attention's varlen kernel (inside PyTorch) on CUDA in bf16/fp16, else SDPA with a
    block-diagonal causal mask.
    """
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects one packed row per micro-batch, got batch size {query.shape[0]}; "
                         "use PackingCollator")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    tokens = query.shape[2]
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, tokens], dtype=torch.int32, device=query.device)
        max_length = tokens
    else:
        cu_seqlens = cu_seqlens.to(device=query.device, dtype=torch.int32)
        max_length = int(kwargs.get("max_length_q") or tokens)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [tokens, heads, dim]
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _varlen_attn is not None and _flash_available():
        out = _flash_varlen(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, max_length, scale)
    else:
        out = _block_causal_sdpa(q, k, v, cu_seqlens, scale)
    return out.unsqueeze(0), None


def register_varlen_attention() -> str:
    """Register ``varlen_attention_forward`` with transformers (no mask is built for it); returns its name."""
    from transformers import AttentionInterface
    AttentionInterface.register(ATTENTION_NAME, varlen_attention_forward)
    return ATTENTION_NAME


# ---- model set-up ---------------------------------------------------------------------------------

def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The ``*ForCausalLM`` inside a peft wrapper (LoRA layers are injected in place, so it holds them)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(inner, "get_decoder") or inner.get_output_embeddings() is None:
        raise ValueError(f"{type(inner).__name__} is not a causal LM with a decoder and an output head")
    return inner


def packed_causal_lm_forward(self: torch.nn.Module, input_ids: torch.Tensor | None = None,
                             labels: torch.Tensor | None = None, num_items_in_batch: Any = None,
                             **kwargs: Any) -> Any:
    """Replacement ``forward`` for a causal LM: packed batches with labels get the chunked loss.

    Anything else (no labels, or no ``cu_seq_lens_q``) goes to the model's own forward, which then sees
    one row as one sequence: padded batches of several rows are refused by the attention, so evaluation
    batches must be packed too (``group_in_order``). The returned output carries the loss and no logits.
    """
    target_positions = kwargs.pop("target_positions", None)
    if labels is None or kwargs.get("cu_seq_lens_q") is None:
        return self._prunetune_original_forward(input_ids=input_ids, labels=labels,
                                                **({} if num_items_in_batch is None else
                                                   {"num_items_in_batch": num_items_in_batch}), **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast
    for unused in ("attention_mask", "return_dict", "use_cache", "output_attentions", "output_hidden_states",
                   "logits_to_keep"):
        kwargs.pop(unused, None)
    outputs = self.get_decoder()(input_ids=input_ids, use_cache=False, **kwargs)
    hidden = outputs[0]
    settings = self._prunetune_loss
    # 1 / (target count): a device tensor stays on the device (reading it would make the CPU wait for the GPU)
    if torch.is_tensor(num_items_in_batch):
        scale = 1.0 / num_items_in_batch.sum().to(torch.float32).clamp_min(1)
    elif num_items_in_batch is not None:
        scale = 1.0 / max(float(num_items_in_batch), 1.0)
    elif target_positions is not None:
        scale = 1.0 / max(int(target_positions.numel()), 1)
    else:
        scale = 1.0 / (labels[:, 1:] != IGNORE_INDEX).sum().to(torch.float32).clamp_min(1)
    loss, _ = linear_cross_entropy(hidden, self.get_output_embeddings().weight, labels, scale=scale,
                                   chunk_size=settings["chunk_size"], compiled=settings["compiled"],
                                   target_positions=target_positions)
    return CausalLMOutputWithPast(loss=loss)


@dataclass(frozen=True)
class PackingSetup:
    """What ``prepare_model_for_packing`` turned on, for the run's records."""

    attention: str  # "flash-varlen" (CUDA) or "sdpa-block-mask" (fallback)
    compiled_layers: int
    loss: str


def prepare_model_for_packing(model: torch.nn.Module, compile_layers: bool = False, chunk_size: int = 4096,
                              compile_loss: bool | None = None, lora_inputs_in_autocast: bool = True) -> PackingSetup:
    """Set ``model`` (peft-wrapped or plain causal LM) up for batches from ``PackingCollator``.

    - attention: our variable-length function (transformers then builds no mask);
    - loss: the causal LM's ``forward`` computes ``linear_cross_entropy`` for packed batches;
    - ``compile_layers``: ``torch.compile`` each decoder layer with dynamic shapes (one compile serves
      all layers, since they share code; packed micro-batches vary in length);
    - ``lora_inputs_in_autocast``: LoRA layers take their input as it comes (bf16) instead of peft's copy
      upcast to the fp32 adapter dtype; under ``torch.autocast`` (the Trainer's ``bf16=True``) the LoRA
      matmuls run in bf16 either way, so only the copy (time and saved memory) goes away. Switch it off
      when training reduced-precision weights without autocast.
    Call after ``get_peft_model`` and before the optimizer or Trainer is built. Idempotent.
    """
    lm = causal_lm(model)
    name = register_varlen_attention()
    if hasattr(lm, "set_attn_implementation"):
        try:
            lm.set_attn_implementation(name)
        except (ValueError, ImportError) as error:  # older transformers check names against their own list
            log.debug("set_attn_implementation refused %s (%s); setting the config directly", name, error)
            lm.config._attn_implementation = name
    else:
        lm.config._attn_implementation = name
    lm.config.use_cache = False
    compile_loss = compile_layers if compile_loss is None else compile_loss
    lm._prunetune_loss = {"chunk_size": chunk_size, "compiled": bool(compile_loss)}
    if not hasattr(lm, "_prunetune_original_forward"):
        lm._prunetune_original_forward = lm.forward
        lm.forward = types.MethodType(packed_causal_lm_forward, lm)
    if lora_inputs_in_autocast:
        for module in lm.modules():
            if hasattr(module, "lora_A") and hasattr(module, "_cast_input_dtype"):
                module.cast_input_dtype_enabled = False
    device = next(lm.parameters()).device
    if device.type == "cuda" and _flash_available():
        probe_flash_gqa(device)  # decided here, outside compiled code
    compiled = 0
    if compile_layers:
        import torch._dynamo
        layers = lm.get_decoder().layers
        # layers share code, so one graph serves them all; room in case guards tell some apart
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * len(layers))
        for layer in layers:
            layer.compile(dynamic=True)
            compiled += 1
    on_cuda = next(lm.parameters()).is_cuda and _flash_available()
    return PackingSetup(attention="flash-varlen" if on_cuda else "sdpa-block-mask", compiled_layers=compiled,
                        loss=f"chunked linear cross-entropy, {chunk_size} rows a chunk"
                             + (", compiled" if compile_loss else ""))
