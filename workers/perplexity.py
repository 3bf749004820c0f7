"""Perplexity the LLM-Pruner way (``LLMPruner/evaluator/ppl.py``), on local copies of the datasets.

Recipe: the split's texts are joined with "\\n\\n" and tokenized ONCE; the ids are cut into
non-overlapping windows of ``seq_len`` tokens, the tail that does not fill a window is dropped;
windows go through the model ``batch_size`` at a time; every window's shifted token NLL
(reduction none, computed in float32) is concatenated over all windows; ppl = exp(mean NLL).
Each window therefore scores ``seq_len - 1`` tokens: its first token has no context.

``add_bos`` chooses how BOS is handled:
  False (LLM-Pruner exactly): the joined text is tokenized with the tokenizer's default special
        tokens, so a Llama tokenizer puts ONE BOS at the very start of the first window and none
        elsewhere; a tokenizer without a BOS (Qwen) adds nothing.
  True: the text is tokenized without special tokens, cut into windows of ``seq_len - 1`` text
        tokens, and BOS is prepended to every window (window length stays ``seq_len``); predicting
        BOS is never scored, so each window still scores ``seq_len - 1`` tokens.
Both knobs and the counts are recorded with the result.

The texts come from ``data.eval_source`` (``jobs/eval_data.py``); as local files, JSON lines in the real schemas:
  <eval_data_dir>/wikitext2/test.jsonl   {"text": ...}      wikitext-2-raw-v1, test split
  <eval_data_dir>/ptb/validation.jsonl   {"sentence": ...}  ptb_text_only/penn_treebank, validation split
lm-eval's ``wikitext`` task (word/byte perplexity of whole articles) is a different quantity; see
``workers.zero_shot.evaluate_lm_eval_wikitext``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from jobs.config import DataSettings
from jobs.errors import InputError
from jobs.eval_data import EVAL_DATASETS, location
from workers.eval_sources import as_data, load_rows
from workers.fused_norm import fused_rms_norms

JOINER = "\n\n"
METHOD = ("LLM-Pruner PPLMetric: texts joined with \\n\\n, tokenized once, non-overlapping windows of seq_len, "
          "tail dropped, ppl = exp(mean token NLL)")


def load_ppl_texts(source: DataSettings | Path | str, dataset: str) -> list[str]:
    """The text field of every row of the dataset's evaluated split, in order (local file, mirror or cache)."""
    field = EVAL_DATASETS[dataset].fields[0]
    return [row[field] for row in load_rows(as_data(source), dataset)]


def window_token_ids(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len`` tokens from 1-D ``ids``, tail dropped: [n_windows, seq_len]."""
    n_windows = ids.numel() // seq_len
    return ids[: n_windows * seq_len].reshape(n_windows, seq_len)


def token_nll(logits: torch.Tensor, windows: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """Flat NLL of predicting token t+1 from logits at t, for every window (reduction none, float32).

    ``chunk`` windows at a time are upcast: a 128k vocabulary makes fp32 logits 64 MB per 128-token window.
    """
    parts = []
    for start in range(0, windows.size(0), chunk):
        shift_logits = logits[start:start + chunk, :-1, :].float()
        shift_labels = windows[start:start + chunk, 1:]
        parts.append(torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)),
                                                       shift_labels.reshape(-1), reduction="none"))
    return torch.cat(parts)


def _windows_for(tokenizer: PreTrainedTokenizerBase, text: str, seq_len: int, add_bos: bool
                 ) -> tuple[torch.Tensor, int]:
    """The [n_windows, seq_len] ids to score, and how many tokens the tokenizer produced for the text."""
    if not add_bos:
        ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)
        return window_token_ids(ids, seq_len), ids.numel()
    if tokenizer.bos_token_id is None:
        raise InputError(f"evaluate.ppl_add_bos is true but the tokenizer {type(tokenizer).__name__} has no BOS "
                         "token; set evaluate.ppl_add_bos=false")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    text_windows = window_token_ids(ids, seq_len - 1)
    bos = torch.full((text_windows.size(0), 1), tokenizer.bos_token_id, dtype=torch.long)
    return torch.cat([bos, text_windows], dim=1), ids.numel()


@torch.no_grad()
def compute_perplexity(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], seq_len: int,
                       batch_size: int, add_bos: bool, device: torch.device | str) -> dict[str, Any]:
    """Perplexity of ``model`` on ``texts`` by the recipe in the module docstring."""
    windows, n_text_tokens = _windows_for(tokenizer, JOINER.join(texts), seq_len, add_bos)
    if windows.size(0) == 0:
        raise InputError(f"the texts give {n_text_tokens} tokens, fewer than one window of {seq_len}; "
                         "use a longer split or a smaller evaluate.ppl_seq_len")
    was_training = model.training
    model.eval()
    nlls = []
    try:
        with fused_rms_norms(model):
            for start in range(0, windows.size(0), batch_size):
                batch = windows[start:start + batch_size].to(device)
                nlls.append(token_nll(model(input_ids=batch).logits, batch).cpu())
    finally:
        model.train(was_training)
    nll = torch.cat(nlls)
    nll_mean = nll.mean().item()
    return {"ppl": math.exp(nll_mean), "nll_mean": nll_mean, "n_windows": windows.size(0),
            "n_tokens": nll.numel(), "n_text_tokens": n_text_tokens, "seq_len": seq_len, "batch_size": batch_size,
            "add_bos": add_bos,
            "tokenization": ("BOS + seq_len-1 text tokens per window" if add_bos else
                             "joined text tokenized once with the tokenizer's default special tokens")}


def dataset_perplexity(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, source: DataSettings | Path,
                       dataset: str, seq_len: int, batch_size: int, add_bos: bool,
                       device: torch.device | str) -> dict[str, Any]:
    """Load one dataset and compute its perplexity; the result names where the texts came from."""
    data = as_data(source)
    texts = load_ppl_texts(data, dataset)
    try:
        result = compute_perplexity(model, tokenizer, texts, seq_len, batch_size, add_bos, device)
    except InputError as error:
        raise InputError(f"perplexity dataset {dataset}: {error}") from None
    spec = EVAL_DATASETS[dataset]
    return {**result, "metric": "token perplexity (LLM-Pruner)", "eval_source": data.eval_source,
            "data_location": str(location(data, spec)), "source": spec.description, "n_texts": len(texts)}
