"""``prunetune``: an lm-eval model class that scores loglikelihood requests faster than lm-eval's ``hf`` backend.

lm-eval stays authoritative: tasks, prompts, tokenization (``TemplateLM._encode_pair``, BOS/prefix handling,
left truncation), metrics and aggregation are all lm-eval's. This class subclasses ``HFLM`` and replaces only
``_loglikelihood_tokens``, the step that turns (context tokens, continuation tokens) into
(sum of continuation log-probs, is-greedy). ``loglikelihood_rolling`` (lm-eval's ``wikitext``) is HFLM's and
feeds its windows through the same fast step; ``generate_until`` is HFLM's (none of our tasks generate).

Why it is faster than HFLM (which runs one padded row ``context + continuation[:-1]`` per request):
- **Shared contexts are computed once.** Requests with the same context tokens (HellaSwag's 4 endings, the
  choices of ARC, OBQA, PIQA, BoolQ's " yes"/" no") become ONE row: the context, then every distinct
  continuation after it, with a tree mask (a continuation token sees the context and its own earlier tokens,
  never another continuation) and position ids that restart after the context for each continuation.
  HellaSwag, most of the work, drops from about 4 x (context + ending) tokens to context + 4 x ending.
- **Little padding, large matmuls.** Rows (one per context) are sorted by length and cut into batches of at
  most ``max_tokens`` padded tokens (default 16,384 on a GPU), so a forward pass sees many thousands of tokens
  of nearly equal rows instead of ``batch_size`` rows.
- **Less overhead around the model.** Requests are tokenized in batches with lm-eval's exact rules (each
  distinct string once; the first requests of every call are checked against lm-eval's own encoding);
  RMSNorm runs PyTorch's fused kernel (``workers.fused_norm``); attention skips cuDNN's per-shape planning;
  the next batch is laid out while the GPU runs the current one.
- **The LM head only where it is read.** The decoder returns hidden states; the LM head and an fp32
  log-softmax run only at the positions that predict a continuation token, in chunks of about 1 GB, instead
  of full-vocabulary logits (128k for Llama-3) at every position.

Why the numbers are lm-eval's: every continuation token attends to exactly the tokens, at exactly the
positions, that it attends to in HFLM's row (the tree mask removes only the other continuations, which come
after the context, and padding); the log-prob of token j is read from the position that precedes it, as HFLM
does; ``is_greedy`` is the argmax test HFLM makes; results come back in the original order. Numerically the
only difference is float rounding (another attention kernel, other matmul shapes); log-probs are taken in
fp32 from the model's logits, as HFLM does with ``softmax_dtype=float32`` (HFLM's default takes them in the
model's dtype, so in bf16 it rounds each log-prob and their sum to bf16). ``tests/test_fast_lm.py`` checks on
tiny fp32 models that every request's log-likelihood matches HFLM within 1e-4 with the same is-greedy flag
and every task score is identical, through peft and merged. At run time the first call also compares one
real group against HFLM's own computation and falls back to HFLM's scoring, with a warning, if they
disagree (an unusual head, a prompt-tuning adapter; to 1e-3 per token in fp32, in bf16/fp16 only gross
errors, 0.5 per token) or if the attention implementation cannot take a custom 4-D mask (only ``sdpa`` and
``eager`` can); ``fallback`` then says why.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from workers.fused_norm import fused_rms_norms

log = logging.getLogger(__name__)

Request = tuple[Any, list[int], list[int]]  # ((context, continuation) strings or None, context ids, continuation ids)
EncodingKey = tuple[str, bool | None]  # a string and its add_special_tokens (None: the tokenizer's default)

GPU_MAX_TOKENS = 16384  # padded tokens per forward: big matmuls; a 7B model's activations stay a few GB
CPU_MAX_TOKENS = 2048
HEAD_CHUNK_ELEMENTS = 2**28  # positions x vocabulary per LM-head chunk: 1 GB of fp32 logits
# Per-token log-prob agreement the first-call check asks of HFLM's own computation: float rounding only.
CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
HALF_CHECK_TOLERANCE = 0.5  # bf16/fp16: kernel and shape differences compound over the layers
ENCODING_CHECKS = 32  # requests per loglikelihood call also encoded lm-eval's way, to compare


@dataclass
class Group:
    """One row: a context, then every distinct continuation scored after it."""

    context: tuple[int, ...]
    continuations: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def length(self) -> int:
        """Row tokens: the context and each continuation but its last token (that one is only predicted)."""
        return len(self.context) + sum(len(cont) - 1 for cont in self.continuations)


def group_requests(requests: list[Request], max_length: int) -> tuple[list[Group], list[tuple[int, int]]]:
    """Requests grouped by their context as HFLM feeds it; for each request: (its group, its continuation)."""
    index: dict[tuple[int, ...], int] = {}
    groups: list[Group] = []
    slots: list[dict[tuple[int, ...], int]] = []
    where = []
    for _, context, continuation in requests:
        if not context or not continuation or len(continuation) > max_length:
            raise ValueError(f"a loglikelihood request needs a context and 1 to {max_length} continuation tokens, "
                             f"got {len(context)} and {len(continuation)}")
        # HFLM's left truncation: the last max_length + 1 tokens of context + continuation (continuation whole).
        whole = (list(context) + list(continuation))[-(max_length + 1):]
        key = tuple(whole[:len(whole) - len(continuation)])
        if key not in index:
            index[key] = len(groups)
            groups.append(Group(key))
            slots.append({})
        number, cont = index[key], tuple(continuation)
        if cont not in slots[number]:
            slots[number][cont] = len(groups[number].continuations)
            groups[number].continuations.append(cont)
        where.append((number, slots[number][cont]))
    return groups, where


@dataclass(frozen=True)
class Layout:
    """A batch of groups as right-padded rows, and the positions whose next-token log-prob is read."""

    input_ids: torch.Tensor  # [rows, length]
    position_ids: torch.Tensor  # [rows, length]: the context 0..c-1, each continuation again from c
    segments: torch.Tensor  # [rows, length]: 0 context, k + 1 continuation k, -1 padding
    rows: torch.Tensor  # [scored]: row and column of each position whose prediction is read
    columns: torch.Tensor
    targets: torch.Tensor  # [scored]: the continuation token predicted there
    counts: list[int]  # scored positions per continuation, group after group, in order


@dataclass(frozen=True)
class Scored:
    """One batch's per-token log-probs and greedy flags, still on the device until ``collect``."""

    logprobs: torch.Tensor  # [scored]
    greedy: torch.Tensor  # [scored]
    counts: list[int]  # scored positions per continuation, in order

    def collect(self) -> list[tuple[float, bool]]:
        """(sum of log-probs, all greedy) per continuation; waits for the device."""
        values, flags = self.logprobs.tolist(), self.greedy.tolist()
        results, start = [], 0
        for count in self.counts:
            results.append((sum(values[start:start + count]), all(flags[start:start + count])))
            start += count
        return results


def layout(groups: list[Group], pad_id: int) -> Layout:
    length = max(group.length for group in groups)
    ids, positions, segments = [], [], []
    rows: list[int] = []
    columns: list[int] = []
    targets: list[int] = []
    counts: list[int] = []
    for row, group in enumerate(groups):
        start = len(group.context)
        tokens, position, segment = list(group.context), list(range(start)), [0] * start
        for number, cont in enumerate(group.continuations, start=1):
            offset = len(tokens)
            tokens += cont[:-1]
            position += range(start, start + len(cont) - 1)
            segment += [number] * (len(cont) - 1)
            # token j of the continuation is predicted at the last context token (j = 0), else at token j - 1
            columns += [start - 1, *range(offset, offset + len(cont) - 1)]
            rows += [row] * len(cont)
            targets += cont
            counts.append(len(cont))
        padding = length - len(tokens)
        ids.append(tokens + [pad_id] * padding)
        positions.append(position + [0] * padding)
        segments.append(segment + [-1] * padding)

    def tensor(values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long)

    return Layout(tensor(ids), tensor(positions), tensor(segments), tensor(rows), tensor(columns), tensor(targets),
                  counts)


def tree_mask(position_ids: torch.Tensor, segments: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """[rows, 1, length, length], True where a query may attend to a key.

    A context token sees the earlier context; a continuation token sees the whole context and its own earlier
    tokens, never another continuation; padding sees nothing real (it sees itself, so no row is empty).
    ``window``: a sliding-window model's limit on how far back a query sees, as transformers applies it.
    """
    query_position, key_position = position_ids[:, :, None], position_ids[:, None, :]
    query_segment, key_segment = segments[:, :, None], segments[:, None, :]
    mask = (key_position <= query_position) & ((key_segment == 0) | (key_segment == query_segment))
    if window:
        mask &= (query_position - key_position) < window
    return mask[:, None]


def _attention_kernels(device: Any) -> contextlib.AbstractContextManager:
    """On CUDA, SDPA without cuDNN attention: cuDNN plans every new shape it sees, and nearly every batch here
    has a new one (rows x longest row). Leaving it out took HellaSwag's full set from 45.4 to 41.2 s on an
    H100 (benchmarks/RESULTS.md); the flash and memory-efficient kernels need no plan."""
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@register_model("prunetune")
class PruneTuneLM(HFLM):
    """HFLM with shared-context, head-on-demand loglikelihood scoring (see the module docstring).

    ``max_tokens``: padded tokens per forward pass (default 16,384 on a GPU, 2,048 on a CPU); halved on a
    CUDA out-of-memory error. Everything else is HFLM's, e.g. ``PruneTuneLM(pretrained=model, tokenizer=tok)``,
    or ``simple_evaluate(model="prunetune", model_args="pretrained=<folder>")`` once this module is imported.
    """

    def __init__(self, *args: Any, max_tokens: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_tokens = int(max_tokens) if max_tokens else (
            GPU_MAX_TOKENS if torch.device(self.device).type == "cuda" else CPU_MAX_TOKENS)
        self.fallback: str | None = None  # why HFLM's own scoring is used instead, if it is
        self._checked = self._warned = False
        self._parts: tuple[torch.nn.Module, torch.nn.Module] | None = None
        self._eager = False
        self._window: int | None = None
        self._softcap: float | None = None

    # ---------------------------------------------------------------- set-up and the first-call check

    def _prepare(self) -> str | None:
        """Finds the decoder and LM head; returns why this model cannot take the fast path, if it cannot."""
        if self.backend != "causal":
            return f"{self.backend} models are scored by HFLM"
        model = self.model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: LoRA layers inside
        config = base.config
        implementation = getattr(config, "_attn_implementation", None)
        if implementation not in ("sdpa", "eager"):
            return f"attention implementation {implementation!r} takes no custom 4-D mask (sdpa and eager do)"
        for name in ("logit_scale", "logits_scaling"):
            if getattr(config, name, None) not in (None, 1, 1.0):
                return f"the model scales its logits ({name})"
        layer_types = set(getattr(config, "layer_types", None) or [])
        if len(layer_types) > 1:
            return f"mixed attention layers {sorted(layer_types)}"
        self._window = None if layer_types == {"full_attention"} else getattr(config, "sliding_window", None)
        self._softcap = getattr(config, "final_logit_softcapping", None)
        self._eager = implementation == "eager"
        self._parts = (base.get_decoder(), base.get_output_embeddings())
        return None

    def _check(self, groups: list[Group]) -> str | None:
        """Scores one real group both ways: ours and HFLM's own (one causal row per request, full logits)."""
        probe = min(groups, key=lambda group: (-len(group.continuations), group.length))
        ours = self._score([probe])
        dtype = self._parts[1].weight.dtype
        tolerance = CHECK_TOLERANCE.get(dtype, HALF_CHECK_TOLERANCE)
        for cont, (logprob, greedy) in zip(probe.continuations, ours):
            row = torch.tensor([list(probe.context) + list(cont[:-1])], device=self.device)
            logits = torch.log_softmax(self._model_call(row)[0, -len(cont):].float(), dim=-1)
            target = torch.tensor(cont, device=self.device)
            theirs = logits.gather(1, target[:, None]).sum().item()
            if abs(theirs - logprob) > tolerance * len(cont):
                return (f"the first-call check disagreed with HFLM on a {len(cont)}-token continuation: "
                        f"{logprob:.6g} vs {theirs:.6g} ({str(dtype).removeprefix('torch.')})")
        return None

    # ---------------------------------------------------------------- tokenizing

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """lm-eval's ``TemplateLM.loglikelihood`` with its tokenizing batched: one tokenizer call per kind.

        lm-eval encodes each request with two ``tokenizer.encode`` calls (context + continuation, and context)
        and decodes the BOS token again for each; for HellaSwag's 40,168 requests that was ~30% of lm-eval's
        own time. Here every distinct string is encoded once, in batches (a fast tokenizer runs them in
        parallel), with exactly ``_encode_pair``'s and ``tok_encode``'s rules; the first requests of every call
        are also encoded lm-eval's way and compared, and any difference hands the call back to lm-eval.
        """
        if self.backend != "causal" or getattr(self, "enable_thinking", False) or not requests:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        pairs = [request.args for request in requests]
        encoded = self._encode_pairs(pairs)
        for (context, continuation), mine in zip(pairs[:ENCODING_CHECKS], encoded):
            theirs = self._encode_pair(context, continuation) if context else None
            if theirs is not None and tuple(map(list, mine)) != tuple(map(list, theirs)):
                log.warning("prunetune backend: batched tokenizing differs from lm-eval's on %r; using lm-eval's",
                            (context[-40:], continuation[:40]))
                return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        return self._loglikelihood_tokens([(pair, context, continuation)
                                           for pair, (context, continuation) in zip(pairs, encoded)],
                                          disable_tqdm=disable_tqdm)

    def _encode_pairs(self, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """(context ids, continuation ids) of every pair, as lm-eval's loglikelihood makes them."""
        bos = self.tokenizer.decode(self.prefix_token_id)
        default = None if self.add_bos_token is None else bool(self.add_bos_token)  # None: the tokenizer's own

        def key(text: str) -> EncodingKey:  # tok_encode: no special tokens for a string that starts with the BOS text
            return text, (False if text.startswith(bos) else default)

        plans: list[tuple[EncodingKey | None, EncodingKey]] = []
        for context, continuation in pairs:
            if not context:  # lm-eval: the prefix token (BOS/EOS) is the context
                plans.append((None, (continuation, False)))
                continue
            spaces = len(context) - len(context.rstrip())
            if spaces:  # trailing spaces move to the continuation, as _encode_pair does
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            plans.append((key(context), key(context + continuation)))
        wanted = dict.fromkeys(text for plan in plans for text in plan if text is not None)
        ids: dict[EncodingKey, list[int]] = {}
        for setting in (None, True, False):
            texts = [text for text, value in wanted if value is setting]
            if texts:
                kwargs = {} if setting is None else {"add_special_tokens": setting}
                ids.update(zip(((text, setting) for text in texts), self.tokenizer(texts, **kwargs)["input_ids"]))
        encoded = []
        for context, whole in plans:
            if context is None:
                tokens = ids[whole]
                encoded.append(([self.prefix_token_id], tokens) if self.prefix_token_id != tokens[0]
                               else (tokens[:1], tokens[1:]))
            else:
                context_ids = ids[context]
                encoded.append((context_ids, ids[whole][len(context_ids):]))
        return encoded

    # ---------------------------------------------------------------- scoring

    def _score(self, groups: list[Group]) -> list[tuple[float, bool]]:
        """(sum of log-probs, is greedy) of every continuation of ``groups``, group after group."""
        return self._launch(groups).collect()

    def _launch(self, groups: list[Group]) -> Scored:
        """Queues the forward pass of ``groups`` on the device; ``collect()`` on the result waits for it.

        Nothing here reads a device value back, so the caller can lay out the next batch on the CPU while the
        GPU works on this one.
        """
        decoder, head = self._parts
        batch = layout(groups, self.tokenizer.pad_token_id or 0)
        device = self.device
        mask = tree_mask(batch.position_ids.to(device), batch.segments.to(device), self._window)
        dtype = head.weight.dtype
        if self._eager:  # eager attention adds its mask to the scores
            mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, torch.finfo(dtype).min)
        targets = batch.targets.to(device)
        logprobs, greedy = [], []
        with (torch.no_grad(), fused_rms_norms(decoder), _attention_kernels(device),
              torch.autocast(device_type=torch.device(device).type, dtype=self.mixed_precision_dtype,
                             enabled=self.mixed_precision_dtype is not None)):
            hidden = decoder(input_ids=batch.input_ids.to(device), attention_mask=mask,
                             position_ids=batch.position_ids.to(device), use_cache=False).last_hidden_state
            picked = hidden[batch.rows.to(device), batch.columns.to(device)]
            del hidden
            chunk = max(1, HEAD_CHUNK_ELEMENTS // head.weight.shape[0])
            for start in range(0, picked.shape[0], chunk):
                logits = head(picked[start:start + chunk]).float()
                if self._softcap:
                    logits = torch.tanh(logits / self._softcap) * self._softcap
                target = targets[start:start + chunk]
                logprobs.append(logits.gather(1, target[:, None])[:, 0] - torch.logsumexp(logits, dim=-1))
                greedy.append(logits.argmax(dim=-1) == target)
        return Scored(torch.cat(logprobs), torch.cat(greedy), batch.counts)

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        if not requests:
            return []
        if self._parts is None and self.fallback is None:
            self.fallback = self._prepare()
        groups, where = group_requests(requests, self.max_length) if self.fallback is None else ([], [])
        if self.fallback is None and not self._checked:
            self._checked = True
            self.fallback = self._check(groups)
        if self.fallback is not None:
            if not self._warned:
                log.warning("prunetune backend: using HFLM's scoring: %s", self.fallback)
                self._warned = True
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

        requests_in = [0] * len(groups)
        for number, _ in where:
            requests_in[number] += 1
        # longest first, like HFLM: an out-of-memory error shows at once; equal lengths batch together
        order = sorted(range(len(groups)), key=lambda number: -groups[number].length)
        answers: list[list[tuple[float, bool]]] = [[] for _ in groups]
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                   desc="Running loglikelihood requests (prunetune)")

        def finish(chosen: list[int], scored: Scored) -> None:
            in_order = iter(scored.collect())
            for number in chosen:
                answers[number] = [next(in_order) for _ in groups[number].continuations]
            bar.update(sum(requests_in[number] for number in chosen))

        done, pending = 0, None  # pending: the batch on the device, collected after the next one is queued
        while done < len(order):
            longest = groups[order[done]].length
            chosen = order[done:done + max(1, self.max_tokens // longest)]
            try:
                launched = (chosen, self._launch([groups[number] for number in chosen]))
            except torch.cuda.OutOfMemoryError:
                if len(chosen) == 1:
                    raise
                self.max_tokens //= 2
                log.warning("prunetune backend: out of GPU memory; %d tokens per forward pass from now on",
                            self.max_tokens)
                torch.cuda.empty_cache()
                continue
            if pending is not None:
                finish(*pending)
            pending = launched
            done += len(chosen)
        if pending is not None:
            finish(*pending)
        bar.close()

        results = []
        for (strings, _, _), (number, slot) in zip(requests, where):
            answer = answers[number][slot]
            results.append(answer)
            if strings is not None:  # rolling windows come without strings; HFLM caches their sum itself
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return results
