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
- ``prepare_model_for_packing`` (in ``workers/packed_model.py``) registers the variable-length attention (flash-attention's varlen kernel
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


# ---- collator -------------------------------------------------------------------------------------

@dataclass
class PackingCollator:
    """Concatenate tokenized examples into one padding-free row of shape [1, tokens].

    ``max_length`` is the largest sequence length the attention kernel must expect; passing a fixed
    bound (the cutoff length) instead of each batch's own maximum keeps compiled code from
    recompiling for every new maximum. ``pad_to_multiple_of`` appends filler of ``pad_token_id`` with
    no targets, in segments of at most ``max_length`` tokens of their own, for callers that want aligned
    shapes. ``segments`` pads the sequence boundaries with empty segments to ``segments`` + 1 entries, so
    that micro-batches differ in their token count only (``workers/captured_steps.py``: one graph per shape).
    """

    max_length: int = 256
    pad_token_id: int = 0
    pad_to_multiple_of: int | None = None
    segments: int | None = None
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
        filler = -len(input_ids) % self.pad_to_multiple_of if self.pad_to_multiple_of else 0
        while filler:  # the attention kernel is told no segment is longer than max_length
            piece = min(filler, self.max_length)
            input_ids += [self.pad_token_id] * piece
            labels += [IGNORE_INDEX] * piece
            positions += range(piece)
            bounds.append(bounds[-1] + piece)
            filler -= piece
        if self.segments is not None:
            if len(bounds) - 1 > self.segments:
                raise ValueError(f"a micro-batch of {len(bounds) - 1} segments (sequences and filler) is more than "
                                 f"the collator's segments={self.segments}")
            bounds += [bounds[-1]] * (self.segments + 1 - len(bounds))
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
