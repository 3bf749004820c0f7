"""The ``prunetune`` lm-eval backend (workers/fast_lm.py) against lm-eval's own HFLM, on tiny fp32 models.

Real lm-eval, real tasks (our seven, and lm-eval's ``wikitext`` for the rolling path) on tiny local data:
every request's log-likelihood within 1e-4 of HFLM's, the same is-greedy flag, identical task scores, through
peft and merged; plus the layout by hand, truncation, eager attention and the fallback to HFLM's scoring.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

from jobs.config import ZERO_SHOT_TASKS, DataSettings
from workers import fast_lm, zero_shot
from workers.eval_data_demo import write_demo_eval_data
from tests.test_eval_fidelity import one_thread  # noqa: F401,E402 (autouse: one torch thread)

TOLERANCE = 1e-4  # fp32: different kernels and shapes round differently, nothing more


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.tiny_assets import build_tiny_llama, build_tiny_tokenizer

    root = tmp_path_factory.mktemp("fast_lm")
    tokenizer = build_tiny_tokenizer(root / "tokenizer")
    folder = build_tiny_llama(root / "model", tokenizer, seed=5)
    write_demo_eval_data(root / "eval", seed=4, docs_per_task=12, ppl_text_lines=40)
    adapted = get_peft_model(AutoModelForCausalLM.from_pretrained(folder),
                             LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:  # zero at init: a fresh adapter would change nothing
                parameter.normal_(std=0.3)
    return {"tokenizer": tokenizer, "model": AutoModelForCausalLM.from_pretrained(folder).eval(),
            "adapted": adapted.eval(), "folder": folder, "data": DataSettings(eval_data_dir=str(root / "eval"))}


def run_tasks(lm: Any, data: DataSettings, tasks: tuple[str, ...]) -> dict[str, Any]:
    import lm_eval.evaluator

    with zero_shot.lm_eval_session(), zero_shot.offline_hub():
        return lm_eval.evaluator.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=0,
                                                 task_manager=zero_shot.task_manager_for(data, tasks),
                                                 log_samples=True)


def per_request(results: dict[str, Any], task: str) -> dict[tuple[int, int], tuple[float, bool]]:
    """(doc, request index) -> (log-likelihood, is greedy), from lm-eval's logged samples."""
    return {(sample["doc_id"], number): tuple(response[0])
            for sample in results["samples"][task] for number, response in enumerate(sample["resps"])}


def lms(model: torch.nn.Module, tokenizer: Any, **kwargs: Any) -> tuple[Any, fast_lm.PruneTuneLM]:
    from lm_eval.models.huggingface import HFLM

    return (HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, **kwargs),
            fast_lm.PruneTuneLM(pretrained=model, tokenizer=tokenizer, batch_size=8, **kwargs))


# ---------------------------------------------------------------- the layout, by hand


def test_one_row_per_context_with_a_tree_mask() -> None:
    requests = [(None, [1, 2, 3], [4, 5]), (None, [1, 2, 3], [6]), (None, [1, 2, 3], [7, 8, 9]),
                (None, [1, 2, 3], [4, 5]), (None, [9, 9], [4])]
    groups, where = fast_lm.group_requests(requests, max_length=100)
    assert [group.context for group in groups] == [(1, 2, 3), (9, 9)]
    assert where == [(0, 0), (0, 1), (0, 2), (0, 0), (1, 0)]  # the repeated request is scored once
    batch = fast_lm.layout(groups, pad_id=0)
    # row 0: context 1 2 3, then [4] (of 4 5), nothing (of 6), [7 8] (of 7 8 9); row 1 padded
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 7, 8], [9, 9, 0, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 3, 4], [0, 1, 0, 0, 0, 0]]
    assert batch.segments.tolist() == [[0, 0, 0, 1, 3, 3], [0, 0, -1, -1, -1, -1]]
    # each continuation token is read where HFLM reads it: the last context token, then its own previous token
    assert list(zip(batch.rows.tolist(), batch.columns.tolist(), batch.targets.tolist())) == [
        (0, 2, 4), (0, 3, 5), (0, 2, 6), (0, 2, 7), (0, 4, 8), (0, 5, 9), (1, 1, 4)]
    assert batch.counts == [2, 1, 3, 1]
    mask = fast_lm.tree_mask(batch.position_ids, batch.segments)[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                    [1, 1, 1, 1, 0, 0],  # 4 (of 4 5) sees the context and itself
                    [1, 1, 1, 0, 1, 0],  # 7 (of 7 8 9) does not see 4
                    [1, 1, 1, 0, 1, 1]]
    assert fast_lm.tree_mask(batch.position_ids, batch.segments)[1, 0, :2].int().tolist() == [[1, 0, 0, 0, 0, 0],
                                                                                          [1, 1, 0, 0, 0, 0]]


# ---------------------------------------------------------------- equivalence with HFLM through lm-eval


def test_every_request_and_every_score_match_hflm(tiny: dict[str, Any]) -> None:
    tasks = (*ZERO_SHOT_TASKS, zero_shot.WIKITEXT_TASK)  # wikitext: loglikelihood_rolling through our scoring
    hf, ours = (run_tasks(lm, tiny["data"], tasks) for lm in lms(tiny["model"], tiny["tokenizer"]))
    worst, requests, greedy = 0.0, 0, 0
    for task in ZERO_SHOT_TASKS:
        theirs, mine = per_request(hf, task), per_request(ours, task)
        assert theirs.keys() == mine.keys() and theirs
        for key, (logprob, is_greedy) in theirs.items():
            worst = max(worst, abs(mine[key][0] - logprob))
            assert mine[key][1] == is_greedy, (task, key)
            greedy += is_greedy
        requests += len(theirs)
        assert ours["results"][task] == hf["results"][task], task  # acc, acc_norm and their stderr, exactly
    wikitext = {name: (hf["results"]["wikitext"][f"{name},none"], ours["results"]["wikitext"][f"{name},none"])
                for name in ("word_perplexity", "byte_perplexity")}
    print(f"\n{requests} requests: max |Δ log-likelihood| {worst:.2e}, {greedy} greedy; wikitext {wikitext}")
    assert worst < TOLERANCE and requests > 250
    for theirs, mine in wikitext.values():
        assert mine == pytest.approx(theirs, rel=1e-6)


def test_adapter_through_peft_and_merged_give_hflms_scores(tiny: dict[str, Any]) -> None:
    tokenizer, adapted = tiny["tokenizer"], tiny["adapted"]
    scores = {backend: zero_shot.evaluate_zero_shot(adapted, tokenizer, tiny["data"], ZERO_SHOT_TASKS, 8, 0,
                                                    backend=backend) for backend in ("hf", "prunetune")}
    assert scores["prunetune"]["backend"] == "prunetune" and scores["prunetune"]["backend_fallback"] is None
    assert scores["hf"]["backend"] == "hf"
    merged = zero_shot.evaluate_zero_shot(adapted.merge_and_unload(), tokenizer, tiny["data"], ZERO_SHOT_TASKS, 8, 0)
    assert merged["backend"] == "prunetune"
    plain = zero_shot.evaluate_zero_shot(tiny["model"], tokenizer, tiny["data"], ZERO_SHOT_TASKS, 8, 0)
    for task in ZERO_SHOT_TASKS:
        expected = {key: scores["hf"]["tasks"][task][key] for key in ("acc", "acc_norm")}
        assert {key: scores["prunetune"]["tasks"][task][key] for key in expected} == expected, task
        assert {key: merged["tasks"][task][key] for key in expected} == expected, task
    assert any(plain["tasks"][task]["acc"] != merged["tasks"][task]["acc"] for task in ZERO_SHOT_TASKS)


# ---------------------------------------------------------------- token-level cases lm-eval's tasks rarely reach


def greedy_requests(model: torch.nn.Module, count: int, context_length: int) -> list[fast_lm.Request]:
    """Contexts sharing a prefix, each with continuations the model predicts greedily and ones it does not."""
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    requests = []
    for _ in range(count):
        context = torch.randint(4, vocab, (context_length,), generator=generator).tolist()
        row = list(context)
        with torch.no_grad():
            for _ in range(3):
                row.append(int(model(torch.tensor([row])).logits[0, -1].argmax()))
        greedy = row[context_length:]
        requests += [(None, context, greedy), (None, context, greedy[:1]), (None, context, [greedy[0], 7, 9]),
                     (None, context[:4], greedy)]
    return requests


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_greedy_flags_truncation_and_both_attention_kinds(tiny: dict[str, Any], attention: str) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["folder"], attn_implementation=attention).eval()
    requests = greedy_requests(model, count=3, context_length=20)
    for max_length in (512, 16):  # 16: contexts are cut from the left, as HFLM cuts them
        hf, ours = lms(model, tiny["tokenizer"], max_length=max_length)
        theirs = hf._loglikelihood_tokens(requests, disable_tqdm=True)
        mine = ours._loglikelihood_tokens(requests, disable_tqdm=True)
        assert ours.fallback is None
        assert [flag for _, flag in mine] == [flag for _, flag in theirs]
        assert max(abs(a - b) for (a, _), (b, _) in zip(mine, theirs)) < TOLERANCE
        if max_length == 512:  # the greedy continuations (3 tokens and 1 token) of the 3 contexts
            assert sum(flag for _, flag in mine) >= 6


def test_a_wrong_fast_path_falls_back_to_hflms_scoring(tiny: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    requests = greedy_requests(tiny["model"], count=2, context_length=12)
    hf, ours = lms(tiny["model"], tiny["tokenizer"])
    expected = hf._loglikelihood_tokens(requests, disable_tqdm=True)
    # a mask that lets continuations see each other: the first-call check must notice
    monkeypatch.setattr(fast_lm, "tree_mask", lambda positions, segments, window=None: torch.ones(
        segments.shape[0], 1, segments.shape[1], segments.shape[1], dtype=torch.bool).tril())
    assert ours._loglikelihood_tokens(requests, disable_tqdm=True) == expected
    assert ours.fallback and "disagreed with HFLM" in ours.fallback

    flash = lms(tiny["model"], tiny["tokenizer"])[1]
    monkeypatch.setattr(tiny["model"].config, "_attn_implementation", "flash_attention_2")
    assert "flash_attention_2" in flash._prepare()  # HFLM would score it (needs a GPU with flash-attn here)
