"""Alpaca prompt building, label masking and data loading, on a real (tiny) byte-level BPE tokenizer."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
from tokenizers import processors

from jobs.errors import InputError
from tests.tiny_assets import build_tiny_tokenizer
from workers.prompts import IGNORE_INDEX, build_prompt, load_alpaca_examples, tokenize_example

WITH_INPUT = {"instruction": "Add the two numbers.", "input": "two and three", "output": "five"}
NO_INPUT = {"instruction": "Name the colour of the sky.", "input": "", "output": "blue"}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def test_prompt_wording_matches_alpaca() -> None:
    assert build_prompt("Do it.", "this", "done") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nDo it.\n\n### Input:\nthis\n\n### Response:\ndone")
    assert build_prompt("Do it.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nDo it.\n\n### Response:\n")


def test_tokenizer_adds_bos_like_llama(tokenizer) -> None:
    assert ids(tokenizer, "hello")[0] == tokenizer.bos_token_id


@pytest.mark.parametrize("example", [WITH_INPUT, NO_INPUT], ids=["with_input", "no_input"])
def test_prompt_masked_response_and_eos_labelled(tokenizer, example: dict[str, str]) -> None:
    prompt = build_prompt(example["instruction"], example["input"])
    prompt_ids = ids(tokenizer, prompt)
    full_ids = ids(tokenizer, prompt + example["output"])
    item = tokenize_example(example, tokenizer, cutoff_len=256, train_on_inputs=False, add_eos_token=True)

    assert item["input_ids"] == full_ids + [tokenizer.eos_token_id]
    assert item["attention_mask"] == [1] * len(item["input_ids"])
    assert item["input_ids"][:len(prompt_ids)] == prompt_ids  # BOS counted the same way in both
    assert item["labels"][:len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    response_and_eos = item["input_ids"][len(prompt_ids):]
    assert item["labels"][len(prompt_ids):] == response_and_eos
    assert tokenizer.decode(response_and_eos[:-1]) == example["output"]
    assert response_and_eos[-1] == tokenizer.eos_token_id


def test_no_eos_when_disabled(tokenizer) -> None:
    item = tokenize_example(WITH_INPUT, tokenizer, cutoff_len=256, train_on_inputs=False, add_eos_token=False)
    prompt_len = len(ids(tokenizer, build_prompt(WITH_INPUT["instruction"], WITH_INPUT["input"])))
    assert item["input_ids"][-1] != tokenizer.eos_token_id
    assert tokenizer.decode(item["labels"][prompt_len:]) == WITH_INPUT["output"]
    assert set(item["labels"][:prompt_len]) == {IGNORE_INDEX}


def test_train_on_inputs_labels_everything(tokenizer) -> None:
    item = tokenize_example(WITH_INPUT, tokenizer, cutoff_len=256, train_on_inputs=True, add_eos_token=True)
    assert item["labels"] == item["input_ids"]
    assert IGNORE_INDEX not in item["labels"]


def test_truncation_inside_the_response_drops_eos(tokenizer) -> None:
    example = {**NO_INPUT, "output": "one two three four five six seven eight nine ten"}
    prompt_len = len(ids(tokenizer, build_prompt(example["instruction"])))
    cutoff = prompt_len + 3
    item = tokenize_example(example, tokenizer, cutoff_len=cutoff, train_on_inputs=False, add_eos_token=True)
    assert len(item["input_ids"]) == len(item["labels"]) == len(item["attention_mask"]) == cutoff
    assert tokenizer.eos_token_id not in item["input_ids"]  # no room left for it
    assert item["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert item["labels"][prompt_len:] == item["input_ids"][prompt_len:]


def test_truncation_one_short_of_cutoff_still_fits_eos(tokenizer) -> None:
    full_len = len(ids(tokenizer, build_prompt(NO_INPUT["instruction"], "", NO_INPUT["output"])))
    item = tokenize_example(NO_INPUT, tokenizer, cutoff_len=full_len + 1, train_on_inputs=False, add_eos_token=True)
    assert len(item["input_ids"]) == full_len + 1
    assert item["input_ids"][-1] == item["labels"][-1] == tokenizer.eos_token_id


def test_truncation_inside_the_prompt_masks_everything(tokenizer) -> None:
    item = tokenize_example(WITH_INPUT, tokenizer, cutoff_len=10, train_on_inputs=False, add_eos_token=True)
    assert len(item["input_ids"]) == 10
    assert item["labels"] == [IGNORE_INDEX] * 10  # LLM-Pruner's "-1 for EOS" would have labelled one prompt token


def test_eos_added_by_the_tokenizer_is_not_counted_as_prompt(tokenizer) -> None:
    eos_appending = copy.deepcopy(tokenizer)  # like Llama-2 tokenizers saved with add_eos_token=True
    eos_appending.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tokenizer.bos_token_id), ("</s>", tokenizer.eos_token_id)])
    item = tokenize_example(WITH_INPUT, eos_appending, cutoff_len=256, train_on_inputs=False, add_eos_token=True)
    plain = tokenize_example(WITH_INPUT, tokenizer, cutoff_len=256, train_on_inputs=False, add_eos_token=True)
    assert item == plain  # one EOS at the end, and the response's first token still labelled


def test_load_json_and_jsonl(tmp_path: Path) -> None:
    rows = [WITH_INPUT, {"instruction": "Say hi.", "output": "hi"}]
    json_path, jsonl_path = tmp_path / "data.json", tmp_path / "data.jsonl"
    json_path.write_text(json.dumps(rows))
    jsonl_path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    expected = [WITH_INPUT, {"instruction": "Say hi.", "input": "", "output": "hi"}]
    assert load_alpaca_examples(json_path) == expected
    assert load_alpaca_examples(jsonl_path) == expected


@pytest.mark.parametrize(("content", "message"), [
    (None, "does not exist"),
    ('[{"instruction": "a", "output": "b"}, {"instruction": "c"}]', "row 2: missing field(s) output"),
    ('{"instruction": "a", "output": "b"}\n\n{"output": "d"}\n', "line 3: missing field(s) instruction"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": \n', "line 2: malformed JSON"),
    ('[{"instruction": "a", "output": 3}]', "row 1: field(s) output must be text"),
    ("[]", "has no rows"),
])
def test_bad_data_names_file_row_and_fix(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "train.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=re.escape(message)) as caught:
        load_alpaca_examples(path)
    assert str(path) in str(caught.value)
    assert ";" in str(caught.value)  # what is wrong; how to fix it
