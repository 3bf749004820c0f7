"""The evaluation speed-ups change no number: batched tokenizing, templates compiled once, fused RMSNorm,
perplexity upcast in chunks. Each is compared with the code it replaces, on tiny local models and data."""
from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from jobs.config import ZERO_SHOT_TASKS
from tests.test_eval_fidelity import one_thread  # noqa: F401 (autouse: one torch thread)
from tests.test_fast_lm import lms, tiny  # noqa: F401 (the module fixture: tiny model, tokenizer, data)
from workers import fast_lm, zero_shot
from workers.fused_norm import fused_rms_norms
from workers.perplexity import token_nll


def task_pairs(data: Any) -> list[tuple[str, str]]:
    """Every (context, continuation) lm-eval builds for our seven tasks on the tiny data."""
    with zero_shot.lm_eval_session(), zero_shot.offline_hub():
        tasks = zero_shot.task_manager_for(data, ZERO_SHOT_TASKS).load(list(ZERO_SHOT_TASKS))["tasks"]
        pairs = []
        for task in tasks.values():
            task.build_all_requests(limit=None)
            pairs += [instance.args for instance in task.instances]
    return pairs


EDGE_CASES = [("Question: is it?  ", "yes"),  # trailing spaces move to the continuation
              ("", "a whole text"),  # empty context: the prefix token is the context
              ("<s> starts with the BOS text", " end"),  # tok_encode adds no BOS to it
              ("same context", " one"), ("same context", " two"), ("same context", " one")]


def tokenized(lm: Any, pairs: list[tuple[str, str]], ours: bool) -> list[tuple[Any, list[int], list[int]]]:
    """What ``_loglikelihood_tokens`` receives from our loglikelihood, or from lm-eval's own."""
    seen: list[tuple[Any, list[int], list[int]]] = []
    lm._loglikelihood_tokens = lambda requests, **kwargs: seen.extend(requests) or [(0.0, False)] * len(requests)
    instances = [SimpleNamespace(args=pair) for pair in pairs]
    if ours:
        lm.loglikelihood(instances, disable_tqdm=True)
    else:
        super(fast_lm.PruneTuneLM, lm).loglikelihood(instances, disable_tqdm=True)
    return seen


@pytest.mark.parametrize("add_bos_token", [None, True, False])
def test_batched_tokenizing_gives_lm_evals_tokens(tiny: dict[str, Any], add_bos_token: bool | None) -> None:
    pairs = task_pairs(tiny["data"]) + EDGE_CASES
    ours = lms(tiny["model"], tiny["tokenizer"], add_bos_token=add_bos_token)[1]
    theirs = lms(tiny["model"], tiny["tokenizer"], add_bos_token=add_bos_token)[1]
    mine, expected = tokenized(ours, pairs, ours=True), tokenized(theirs, pairs, ours=False)
    assert len(mine) == len(pairs) > 250
    assert [(strings, list(context), list(continuation)) for strings, context, continuation in mine] == \
        [(strings, list(context), list(continuation)) for strings, context, continuation in expected]


def test_a_tokenizing_difference_hands_the_call_back_to_lm_eval(tiny: dict[str, Any], caplog: Any) -> None:
    pairs = task_pairs(tiny["data"])[:50]
    lm = lms(tiny["model"], tiny["tokenizer"])[1]
    expected = tokenized(lms(tiny["model"], tiny["tokenizer"])[1], pairs, ours=False)
    lm._encode_pairs = lambda given: [(context[:-1] or context, continuation)
                                      for context, continuation in (lm._encode_pair(*pair) for pair in given)]
    with caplog.at_level(logging.WARNING, logger=fast_lm.__name__):
        assert tokenized(lm, pairs, ours=True) == expected
    assert "batched tokenizing differs" in caplog.text


def test_templates_compiled_once_render_what_lm_eval_renders() -> None:
    import lm_eval.utils

    docs = [{"query": "A man sits. He", "label": 2, "choices": ["x", "y"]}, {"query": "Q?", "label": 0, "choices": []}]
    for template in ("{{query}}", "{{label}}", "{{choices}}", "Question: {{query}}\nAnswer:", "{{query|trim}}"):
        for doc in docs:
            assert zero_shot._apply_template(template, doc) == lm_eval.utils.apply_template(template, doc)
    with zero_shot.lm_eval_session():
        assert lm_eval.utils.apply_template is zero_shot._apply_template
    assert lm_eval.utils.apply_template is not zero_shot._apply_template


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norms_match_transformers_and_are_put_back(tiny: dict[str, Any], dtype: torch.dtype) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["folder"], dtype=dtype).eval()
    ids = torch.randint(4, model.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(2))
    norms = [module for module in model.modules() if type(module).__name__ == "LlamaRMSNorm"]
    hidden = torch.randn(3, 17, model.config.hidden_size, dtype=dtype, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected_norm, expected_logits = norms[0](hidden), model(ids).logits.float()
        with fused_rms_norms(model) as swapped:
            assert swapped == len(norms) == 2 * model.config.num_hidden_layers + 1
            fused_norm, fused_logits = norms[0](hidden), model(ids).logits.float()
        assert all("forward" not in module.__dict__ for module in norms)
    if dtype == torch.float32:
        torch.testing.assert_close(fused_norm, expected_norm, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fused_logits, expected_logits, rtol=1e-5, atol=1e-5)
    else:  # the normalized value and the product are rounded to bf16 in transformers' order: at most one ulp
        assert (fused_norm.float() - expected_norm.float()).abs().max() <= 2 ** -7 * expected_norm.float().abs().max()
        assert (fused_logits - expected_logits).abs().max() < 0.1


def test_a_norm_whose_forward_was_replaced_is_left_alone(tiny: dict[str, Any]) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["folder"]).eval()
    hooked = model.model.norm
    hooked.forward = lambda hidden: hidden  # what an accelerate device-map hook does to a module
    with fused_rms_norms(model) as swapped:
        assert swapped == 2 * model.config.num_hidden_layers and hooked.forward(torch.ones(2)).tolist() == [1, 1]


def test_perplexity_nll_upcast_in_chunks_equals_all_at_once() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(11, 9, 50, generator=generator).to(torch.bfloat16)
    windows = torch.randint(0, 50, (11, 9), generator=generator)
    whole = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, 50), windows[:, 1:].reshape(-1),
                                              reduction="none")
    for chunk in (1, 4, 8, 64):
        assert torch.equal(token_nll(logits, windows, chunk=chunk), whole)
