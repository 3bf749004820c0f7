"""Alpaca prompts and their tokenization for LoRA recovery, following LLM-Pruner's (and alpaca-lora's) recipe.

``tokenize_example`` turns one {instruction, input, output} row into model inputs whose labels cover the
response (and EOS) only, unless ``train_on_inputs`` asks to learn the prompt too.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from jobs.errors import InputError
from jobs.json_rows import json_rows

if TYPE_CHECKING:  # the login node's `check` reads the data with this module: no transformers import
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # torch's cross-entropy skips this label

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
REQUIRED_FIELDS = ("instruction", "output")


def build_prompt(instruction: str, input: str = "", output: str = "") -> str:
    """The Alpaca prompt; an empty ``input`` picks the no-input wording, as Alpaca's own code does."""
    template = ALPACA_WITH_INPUT if input else ALPACA_NO_INPUT
    return template.format(instruction=instruction, input=input) + output


def tokenize_example(example: dict[str, str], tokenizer: PreTrainedTokenizerBase, cutoff_len: int,
                     train_on_inputs: bool, add_eos_token: bool) -> dict[str, list[int]]:
    """Tokenize prompt + output for causal-LM training: input_ids, attention_mask and labels.

    Full text is truncated at ``cutoff_len`` tokens; EOS is appended when ``add_eos_token``, the text
    does not already end in it, and there is room. With ``train_on_inputs`` False the prompt's tokens
    are labelled -100, so the loss covers the response and its EOS only.

    Prompt length: LLM-Pruner tokenizes the prompt with EOS appended and subtracts 1 for that EOS.
    Here the prompt is tokenized without appending EOS, so nothing needs subtracting: the same count
    in the ordinary case, and still right when the prompt itself is cut at ``cutoff_len`` (where the
    "-1" labels one prompt token). An EOS the tokenizer adds on its own is dropped from the count, since
    the prompt text never ends in one. The prompt goes through the same tokenizer call as the full
    text, so BOS is counted the same way in both; the template ends in a newline, so BPE and
    SentencePiece tokenizers do not merge across the prompt/response boundary.
    """
    instruction, input_text = example["instruction"], example.get("input") or ""
    full = _tokenize(tokenizer, build_prompt(instruction, input_text, example["output"]), cutoff_len)
    input_ids, attention_mask = full["input_ids"], full["attention_mask"]
    if add_eos_token and input_ids[-1:] != [tokenizer.eos_token_id] and len(input_ids) < cutoff_len:
        input_ids = input_ids + [tokenizer.eos_token_id]
        attention_mask = attention_mask + [1]
    labels = list(input_ids)
    if not train_on_inputs:
        prompt_ids = _tokenize(tokenizer, build_prompt(instruction, input_text), cutoff_len)["input_ids"]
        if prompt_ids[-1:] == [tokenizer.eos_token_id]:
            prompt_ids = prompt_ids[:-1]  # added by the tokenizer's own template, not part of the prompt
        prompt_len = min(len(prompt_ids), len(labels))
        labels = [IGNORE_INDEX] * prompt_len + labels[prompt_len:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _tokenize(tokenizer: PreTrainedTokenizerBase, text: str, cutoff_len: int) -> dict[str, list[int]]:
    encoded = tokenizer(text, truncation=True, max_length=cutoff_len, padding=False, return_tensors=None)
    return {"input_ids": list(encoded["input_ids"]), "attention_mask": list(encoded["attention_mask"])}


def load_alpaca_examples(path: str | Path) -> list[dict[str, str]]:
    """Read Alpaca rows from a JSON list or JSONL file; ``input`` may be missing (treated as empty)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"training data {path} does not exist; set data.train_path to an Alpaca JSON/JSONL file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"training data {path} cannot be read as UTF-8 text ({error}); "
                         "point data.train_path at an Alpaca JSON/JSONL file") from None
    rows = json_rows(path, text, "a JSONL file holds one complete object per line, a JSON file one list of objects")
    if not rows:
        raise InputError(f"training data {path} has no rows; it needs a list of "
                         "{instruction, input, output} objects")
    examples = []
    for place, row in rows:
        where = f"{path} {place}"
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected an object with instruction/input/output, got {type(row).__name__}")
        missing = [name for name in REQUIRED_FIELDS if name not in row]
        if missing:
            raise InputError(f"{where}: missing field(s) {', '.join(missing)}; every row needs instruction and "
                             "output (input is optional)")
        values = {"instruction": row["instruction"], "input": row.get("input") or "", "output": row["output"]}
        wrong = [name for name, value in values.items() if not isinstance(value, str)]
        if wrong:
            raise InputError(f"{where}: field(s) {', '.join(wrong)} must be text; fix the row or drop it")
        examples.append(values)
    return examples
