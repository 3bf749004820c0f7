"""Evaluation: PPL windowing and arithmetic by hand, lm-eval metric mapping, and a real end-to-end run."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from jobs.config import DataSettings, EvaluateSettings, StudyConfig, StudySettings, ZERO_SHOT_TASKS
from jobs.errors import InputError
from jobs.state import DONE_MARKER, is_done, mark_done
from jobs.study import Pair, StudyPaths
from workers import zero_shot
from workers.eval_data_demo import write_demo_eval_data
from workers.perplexity import compute_perplexity, load_ppl_texts, window_token_ids

# ---------------------------------------------------------------- perplexity by hand

ALPHABET = "ab\n"  # ids 1, 2, 3; id 0 is BOS
VOCAB = 4
# Fixed "model": the logits for the next token depend only on the current token.
TABLE = [[0.0, 1.0, 2.0, 0.5], [0.0, 2.0, 0.0, 1.0], [0.0, 0.3, 0.2, 3.0], [0.0, 1.0, 1.5, 0.1]]


class TableModel(torch.nn.Module):
    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=torch.tensor(TABLE)[input_ids])


class CharTokenizer:
    """One token per character; the default adds one BOS at the very start, like Llama's."""

    bos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = True, verbose: bool = True) -> dict[str, list[int]]:
        ids = [ALPHABET.index(char) + 1 for char in text]
        return {"input_ids": ([0] if add_special_tokens else []) + ids}


def hand_nll(current: int, following: int) -> float:
    row = TABLE[current]
    return math.log(sum(math.exp(value) for value in row)) - row[following]


def test_window_token_ids_cuts_non_overlapping_windows_and_drops_the_tail() -> None:
    windows = window_token_ids(torch.arange(10), 4)
    assert windows.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert window_token_ids(torch.arange(3), 4).shape == (0, 4)


def test_perplexity_matches_a_hand_computation_llm_pruner_way() -> None:
    # "ab" + "\n\n" + "ba" -> BOS a b \n \n b a = [0, 1, 2, 3, 3, 2, 1]; windows of 3: [0,1,2] [3,3,2]; tail [1] dropped
    result = compute_perplexity(TableModel(), CharTokenizer(), ["ab", "ba"], seq_len=3, batch_size=1, add_bos=False,
                                device="cpu")
    nlls = [hand_nll(0, 1), hand_nll(1, 2), hand_nll(3, 3), hand_nll(3, 2)]
    assert result["n_windows"] == 2 and result["n_tokens"] == 4 and result["n_text_tokens"] == 7
    assert result["nll_mean"] == pytest.approx(sum(nlls) / 4)
    assert result["ppl"] == pytest.approx(math.exp(sum(nlls) / 4))
    assert result["add_bos"] is False and result["seq_len"] == 3


def test_perplexity_with_bos_prepends_it_to_every_window_and_never_scores_it() -> None:
    # text without special tokens: a b \n \n b a = [1, 2, 3, 3, 2, 1]; 2 text tokens per window: [0,1,2] [0,3,3] [0,2,1]
    result = compute_perplexity(TableModel(), CharTokenizer(), ["ab", "ba"], seq_len=3, batch_size=2, add_bos=True,
                                device="cpu")
    nlls = [hand_nll(0, 1), hand_nll(1, 2), hand_nll(0, 3), hand_nll(3, 3), hand_nll(0, 2), hand_nll(2, 1)]
    assert result["n_windows"] == 3 and result["n_tokens"] == 6
    assert result["ppl"] == pytest.approx(math.exp(sum(nlls) / 6))


def test_too_short_text_and_missing_file_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="fewer than one window"):
        compute_perplexity(TableModel(), CharTokenizer(), ["ab"], seq_len=8, batch_size=1, add_bos=False, device="cpu")
    with pytest.raises(InputError, match=r"ptb.*ptb/validation\.jsonl.*sentence"):
        load_ppl_texts(tmp_path, "ptb")


# ---------------------------------------------------------------- lm-eval mapping


def test_summary_uses_llm_pruner_headline_metric_per_task() -> None:
    results = {"results": {}, "versions": {}, "n-samples": {}}
    for number, task in enumerate(ZERO_SHOT_TASKS):
        acc, acc_norm = 0.1 * number, 0.1 * number + 0.05
        metrics = {"alias": task, "acc,none": acc, "acc_stderr,none": 0.01}
        if task not in ("boolq", "winogrande"):  # lm-eval computes no acc_norm for these two
            metrics |= {"acc_norm,none": acc_norm, "acc_norm_stderr,none": "N/A"}
        results["results"][task] = metrics
        results["versions"][task] = 2.0 if task == "boolq" else 1.0
        results["n-samples"][task] = {"original": 40, "effective": 8}
    summary = zero_shot.summarize_results(results, ZERO_SHOT_TASKS)
    expected_metric = {"boolq": "acc", "piqa": "acc", "hellaswag": "acc_norm", "winogrande": "acc",
                       "arc_easy": "acc", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}
    values = []
    for number, task in enumerate(ZERO_SHOT_TASKS):
        entry = summary["tasks"][task]
        assert entry["metric"] == expected_metric[task]
        value = 0.1 * number + (0.05 if expected_metric[task] == "acc_norm" else 0.0)
        assert entry["value"] == pytest.approx(value)
        values.append(value)
        assert entry["acc"] == pytest.approx(0.1 * number) and entry["acc_stderr"] == 0.01
        assert entry["acc_norm_stderr"] is None  # "N/A" is not a number
        assert entry["n_samples"] == 8
    assert summary["tasks"]["boolq"]["acc_norm"] is None and summary["tasks"]["boolq"]["version"] == 2.0
    assert summary["average"] == pytest.approx(sum(values) / 7)


def test_override_reuses_the_builtin_yaml_and_changes_only_the_data_location(tmp_path: Path) -> None:
    builtin = Path("/site/lm_eval/tasks")
    arc = zero_shot.override_config("arc_challenge", tmp_path / "a.jsonl", builtin, tmp_path / "cache")
    assert arc["include"] == str(builtin / "arc/arc_challenge.yaml") and arc["task"] == "arc_challenge"
    assert arc["dataset_path"] == "json" and arc["dataset_name"] is None
    assert arc["dataset_kwargs"]["data_files"] == {"test": str(tmp_path / "a.jsonl")}
    assert arc["training_split"] is None and arc["validation_split"] is None
    boolq = zero_shot.override_config("boolq", tmp_path / "b.jsonl", builtin, tmp_path / "cache")
    assert list(boolq["dataset_kwargs"]["data_files"]) == ["validation"] and "validation_split" not in boolq


def test_generated_tasks_differ_from_lm_evals_own_only_in_where_the_data_is(tmp_path: Path) -> None:
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    write_demo_eval_data(tmp_path, docs_per_task=2, ppl_text_lines=5)
    manager = zero_shot.task_manager_for(tmp_path, ZERO_SHOT_TASKS)
    assert sorted(manager.all_subtasks) == sorted(ZERO_SHOT_TASKS)  # real names, nothing else indexed
    builtin_dir = Path(lm_eval.tasks.__file__).parent
    for task in ZERO_SHOT_TASKS:
        ours = manager.task_index[task].cfg
        theirs = load_yaml(builtin_dir / zero_shot.TASK_SOURCES[task].builtin_yaml, resolve_func=False)
        changed = {key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key)}
        assert changed <= {"dataset_path", "dataset_name", "dataset_kwargs", "training_split", "validation_split",
                           "num_fewshot"}, task
        assert ours["doc_to_choice"] == theirs["doc_to_choice"] and ours["metric_list"] == theirs["metric_list"]


def test_missing_or_malformed_task_files_are_all_reported_at_once(tmp_path: Path) -> None:
    write_demo_eval_data(tmp_path, docs_per_task=2, ppl_text_lines=5)
    (tmp_path / "piqa" / "validation.jsonl").unlink()
    (tmp_path / "boolq" / "validation.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(InputError) as error:
        zero_shot.check_zero_shot_data(tmp_path, ZERO_SHOT_TASKS)
    message = str(error.value)
    assert "piqa/validation.jsonl does not exist" in message and "boolq" in message and "passage" in message
    assert "\n" not in message


# ---------------------------------------------------------------- end to end on a tiny Llama

PAIR = Pair("Llama", "best_acc")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> StudyConfig:
    from tests.tiny_assets import build_tiny_llama, build_tiny_tokenizer

    root = tmp_path_factory.mktemp("evaluate")
    tokenizer = build_tiny_tokenizer(root / "tokenizer")
    build_tiny_llama(root / "models" / PAIR.model / PAIR.config, tokenizer)
    write_demo_eval_data(root / "eval", seed=1, docs_per_task=12, ppl_text_lines=60)
    return StudyConfig(
        study=StudySettings(results_root=str(root / "results"), models=(PAIR.model,), pruning_configs=(PAIR.config,),
                            pruned_model_path=str(root / "models" / "{model}" / "{config}")),
        data=DataSettings(eval_data_dir=str(root / "eval")),
        evaluate=EvaluateSettings(limit=6, batch_size=8, ppl_batch_size=8))


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> None:
    # Two torch threads on a busy 2-core box run a tiny model ~10x slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def check_results(folder: Path) -> tuple[dict, dict]:
    assert is_done(folder, verify_checksums=True)
    assert set(json.loads((folder / DONE_MARKER).read_text())["files"]) == {"ppl_results.json",
                                                                           "evaluation_results.json"}
    ppl = json.loads((folder / "ppl_results.json").read_text())
    for dataset in ("wikitext2", "ptb"):
        assert math.isfinite(ppl[dataset]["ppl"]) and ppl[dataset]["ppl"] > 1
        assert ppl[dataset]["n_windows"] >= 3 and ppl[dataset]["seq_len"] == 128
    evaluation = json.loads((folder / "evaluation_results.json").read_text())
    assert list(evaluation["tasks"]) == list(ZERO_SHOT_TASKS)
    for task, entry in evaluation["tasks"].items():
        assert 0 <= entry["value"] <= 1 and entry["value"] == entry[entry["metric"]]
        assert entry["n_samples"] == 6 and entry["version"] is not None
        for key in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
            assert entry[key] is None or math.isfinite(entry[key])
    assert 0 <= evaluation["average"] <= 1 and evaluation["lm_eval_version"] and evaluation["limit"] == 6
    return ppl, evaluation


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft vs transformers 5
def test_evaluate_pruned_then_finetuned_end_to_end(study: StudyConfig) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from workers import evaluate

    paths = StudyPaths(study)
    with pytest.raises(InputError, match="no finished LoRA adapter"):
        evaluate.run(study, PAIR, "finetuned")

    evaluate.run(study, PAIR, "pruned")
    baseline_ppl, baseline = check_results(paths.baseline_eval_dir(PAIR))
    assert baseline["adapter_path"] is None
    marker = paths.baseline_eval_dir(PAIR) / DONE_MARKER
    stamp = marker.stat().st_mtime_ns
    evaluate.run(study, PAIR, "pruned")  # done: skipped without touching anything
    assert marker.stat().st_mtime_ns == stamp

    model = AutoModelForCausalLM.from_pretrained(paths.pruned_model(PAIR))
    adapted = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:  # zero at init: a fresh adapter would change nothing
                parameter.normal_(std=0.5)
    adapter_dir = paths.finetuned_dir(PAIR)
    adapted.save_pretrained(adapter_dir)
    mark_done(adapter_dir, ["adapter_config.json", "adapter_model.safetensors"])

    evaluate.run(study, PAIR, "finetuned")
    tuned_ppl, tuned = check_results(paths.finetuned_eval_dir(PAIR))
    assert tuned["adapter_path"] == str(adapter_dir)
    assert tuned_ppl["wikitext2"]["ppl"] != pytest.approx(baseline_ppl["wikitext2"]["ppl"])
    assert tuned_ppl["ptb"]["ppl"] != pytest.approx(baseline_ppl["ptb"]["ppl"])


def test_missing_eval_data_fails_before_loading_the_model(study: StudyConfig, tmp_path: Path) -> None:
    from workers import evaluate

    broken = replace(study, study=replace(study.study, results_root=str(tmp_path / "results"),
                                          pruned_model_path=str(tmp_path / "no-model")),
                     data=replace(study.data, eval_data_dir=str(tmp_path / "empty")))
    with pytest.raises(InputError, match=r"wikitext2.*wikitext2/test\.jsonl"):
        evaluate.run(broken, PAIR, "pruned")


def test_evaluation_resumes_per_task_after_a_crash(study: StudyConfig, tmp_path: Path, monkeypatch) -> None:
    """A crash during the third task keeps the perplexities and the first two tasks; the rerun computes only
    the rest, and the results equal an uninterrupted run's."""
    from workers import evaluate

    import shutil

    # The baseline is cached beside the model: a copy of the model starts with no baseline.
    shutil.copytree(StudyPaths(study).pruned_model(PAIR), tmp_path / "models" / PAIR.model / PAIR.config,
                    ignore=shutil.ignore_patterns("baseline_evaluation"))
    fresh = replace(study, study=replace(study.study, results_root=str(tmp_path / "results"),
                                         pruned_model_path=str(tmp_path / "models" / "{model}" / "{config}")))
    folder = StudyPaths(fresh).baseline_eval_dir(PAIR)
    computed: list[str] = []
    crashes = [ZERO_SHOT_TASKS[2]]  # once
    real_zero_shot, real_ppl = evaluate.evaluate_zero_shot, evaluate.dataset_perplexity

    def zero_shot(model, tokenizer, data, tasks, *args):
        computed.append(tasks[0])
        if tasks[0] in crashes:
            crashes.remove(tasks[0])
            raise RuntimeError("injected crash")
        return real_zero_shot(model, tokenizer, data, tasks, *args)

    def perplexity(model, tokenizer, data, dataset, *args):
        computed.append(dataset)
        return real_ppl(model, tokenizer, data, dataset, *args)

    monkeypatch.setattr(evaluate, "evaluate_zero_shot", zero_shot)
    monkeypatch.setattr(evaluate, "dataset_perplexity", perplexity)
    with pytest.raises(RuntimeError, match="injected crash"):
        evaluate.run(fresh, PAIR, "pruned")
    assert not is_done(folder) and not (folder / "evaluation_results.json").exists()
    assert computed == ["wikitext2", "ptb", *ZERO_SHOT_TASKS[:3]]
    computed.clear()
    evaluate.run(fresh, PAIR, "pruned")
    assert computed == list(ZERO_SHOT_TASKS[2:])  # nothing finished before the crash is done twice
    _, resumed = check_results(folder)
    assert not (folder / evaluate.PARTIAL_DIR).exists()
    _, whole = check_results(StudyPaths(study).baseline_eval_dir(PAIR))  # the uninterrupted run of the test above
    assert {task: entry["value"] for task, entry in resumed["tasks"].items()} == \
        {task: entry["value"] for task, entry in whole["tasks"].items()}
    assert resumed["average"] == pytest.approx(whole["average"])
