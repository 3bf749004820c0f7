"""Evaluation you can trust: every data source gives the same numbers and fails fast when data is missing, the
adapter merged or not gives the same numbers, a non-uniform LLM-Pruner pickle scores what a hand-rolled forward
scores, and the baseline cache is reused exactly when its key (model files + settings) matches."""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from jobs.cache import baseline_is_current, evaluation_is_current, recorded_cache
from jobs.config import DataSettings, EvaluateSettings, StudyConfig, StudySettings
from jobs.errors import InputError
from jobs.eval_data import EVAL_DATASETS
from jobs.plan import build_plan
from jobs.state import mark_done, read_json
from jobs.study import Pair, StudyPaths
from workers import zero_shot
from workers.eval_data_demo import write_demo_eval_data

UNIFORM, PICKLED = Pair("Llama", "best_acc"), Pair("Llama", "best_ppl")
TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


# ---------------------------------------------------------------- fixtures: tiny models and three data sources


def write_hub_mirror(local_dir: Path, mirror: Path) -> None:
    """The local files laid out like their Hub repos: <repo>/<config>/<split>-00000-of-00001.parquet + README."""
    import datasets

    configs: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for spec in EVAL_DATASETS.values():
        rows = [json.loads(line) for line in (local_dir / spec.local_file).read_text().splitlines() if line.strip()]
        folder = spec.hub_config or "data"
        target = mirror / spec.hub_repo / folder / f"{spec.split}-00000-of-00001.parquet"
        target.parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(rows).to_parquet(str(target))
        configs[spec.hub_repo].append((spec.hub_config or "default", folder, spec.split))
    for repo, entries in configs.items():
        lines = ["---", "configs:"]
        for config, folder, split in entries:
            lines += [f"- config_name: {config}", "  data_files:", f"  - split: {split}", f"    path: {folder}/{split}-*"]
        (mirror / repo / "README.md").write_text("\n".join(lines + ["---", ""]))


def write_hf_cache(mirror: Path, cache: Path) -> None:
    """A datasets cache as ``load_dataset(<repo>, <config>)`` leaves it: <namespace>___<name>/<config>/<v>/<hash>."""
    import datasets

    with zero_shot.offline_hub():
        for spec in EVAL_DATASETS.values():
            datasets.load_dataset(str(mirror / spec.hub_repo), spec.hub_config, split=spec.split, cache_dir=str(cache))
    for repo in {spec.hub_repo for spec in EVAL_DATASETS.values()}:
        namespace, name = repo.split("/")
        (cache / name).rename(cache / f"{namespace}___{name}")


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_assets import build_tiny_llama, build_tiny_tokenizer
    from workers.demo_inputs import prune_unevenly
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("fidelity")
    tokenizer = build_tiny_tokenizer(root / "tokenizer")
    build_tiny_llama(root / "models" / UNIFORM.model / UNIFORM.config, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(build_tiny_llama(root / "scratch", tokenizer, seed=3))
    prune_unevenly(model, [96, 40])  # intermediate 128 -> 96 and 40: the config no longer describes the layers
    pickled = root / "models" / PICKLED.model / PICKLED.config
    pickled.mkdir(parents=True)
    torch.save({"model": model, "tokenizer": tokenizer}, pickled / "pytorch_model.bin")
    write_demo_eval_data(root / "eval", seed=2, docs_per_task=8, ppl_text_lines=40)
    write_hub_mirror(root / "eval", root / "mirror")
    write_hf_cache(root / "mirror", root / "hf_cache")
    return root


def study(root: Path, results: str, **evaluate: object) -> StudyConfig:
    return StudyConfig(
        study=StudySettings(results_root=str(root / results), models=(UNIFORM.model,),
                            pruning_configs=(UNIFORM.config, PICKLED.config),
                            pruned_model_path=str(root / "models" / "{model}" / "{config}"),
                            allow_pickle=(PICKLED.label,)),
        data=DataSettings(eval_data_dir=str(root / "eval")),
        evaluate=EvaluateSettings(**{"limit": 4, "batch_size": 8, "ppl_batch_size": 8, **evaluate}))


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a busy 2-core box run a tiny model slower than one
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def hf_cache(assets: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point both PruneTune's check and datasets (which read the variable at import) at the test's cache."""
    import datasets

    monkeypatch.setenv("HF_DATASETS_CACHE", str(assets / "hf_cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", assets / "hf_cache")
    return assets / "hf_cache"


# ---------------------------------------------------------------- data sources


def test_hub_repos_are_the_ones_lm_evals_task_files_name() -> None:
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    builtin = Path(lm_eval.tasks.__file__).parent
    sources = {**zero_shot.TASK_SOURCES, zero_shot.WIKITEXT_TASK: zero_shot.WIKITEXT_SOURCE}
    for task, source in sources.items():
        config = load_yaml(builtin / source.builtin_yaml, resolve_func=False)
        spec = EVAL_DATASETS[source.dataset]
        assert (config["dataset_path"], config.get("dataset_name")) == (spec.hub_repo, spec.hub_config), task
        assert (config.get("test_split") or config["validation_split"]) == spec.split, task


def test_every_source_gives_the_same_numbers(assets: Path, hf_cache: Path) -> None:
    from workers.modelio import load_pruned_model
    from workers.perplexity import dataset_perplexity

    model, tokenizer = load_pruned_model(assets / "models" / "Llama" / "best_acc", False)
    results = {}
    for source in ("local_files", "hub_mirror", "hf_cache"):
        data = DataSettings(eval_data_dir=str(assets / "eval"), eval_source=source,
                            hub_mirror_dir=str(assets / "mirror"))
        ppl = dataset_perplexity(model, tokenizer, data, "wikitext2", 64, 8, False, "cpu")
        scores = zero_shot.evaluate_zero_shot(model, tokenizer, data, TASKS, batch_size=8, limit=4)
        wikitext = zero_shot.evaluate_lm_eval_wikitext(model, tokenizer, data, batch_size=8, limit=2)
        results[source] = (ppl["ppl"], {task: entry["value"] for task, entry in scores["tasks"].items()},
                           wikitext["word_perplexity"])
        assert scores["eval_source"] == source and ppl["eval_source"] == source
    assert results["hub_mirror"] == results["local_files"] == results["hf_cache"]


@pytest.mark.parametrize("source", ["local_files", "hub_mirror", "hf_cache"])
def test_missing_data_fails_in_milliseconds_naming_the_dataset_and_where_to_put_it(
        assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str) -> None:
    import datasets

    from workers import evaluate

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty_cache")
    config = study(assets, "unused")
    config = replace(config, study=replace(config.study, results_root=str(tmp_path / "results")),
                     data=DataSettings(eval_data_dir=str(tmp_path / "no_eval"), eval_source=source,
                                       hub_mirror_dir=str(tmp_path / "no_mirror")))
    started = time.monotonic()
    with pytest.raises(InputError) as error:
        evaluate.run(config, UNIFORM, "pruned")
    elapsed = time.monotonic() - started
    message = str(error.value)
    print(f"\n{source}: missing data reported in {elapsed * 1000:.1f} ms")
    assert elapsed < 2.0 and "\n" not in message
    expected = {"local_files": ["boolq/validation.jsonl", "does not exist"],
                "hub_mirror": ["aps/super_glue", "huggingface-cli download aps/super_glue", str(tmp_path / "no_mirror")],
                "hf_cache": ["aps___super_glue/boolq", "not in the datasets cache", "load_dataset('aps/super_glue'"]}
    for fragment in ["wikitext2", "boolq", *expected[source]]:
        assert fragment in message


# ---------------------------------------------------------------- merged vs unmerged adapter, non-uniform pickle


def make_adapter(root: Path, config: StudyConfig, pair: Pair) -> None:
    """A LoRA adapter with non-zero B (a fresh one changes nothing) on every projection of the pruned model."""
    from peft import LoraConfig, get_peft_model

    from workers.modelio import load_pruned_model

    model, _ = load_pruned_model(StudyPaths(config).pruned_model(pair), True)
    adapted = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj",
                                                                                   "up_proj", "down_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.3)
    folder = StudyPaths(config).finetuned_dir(pair)
    adapted.save_pretrained(folder)
    mark_done(folder, ["adapter_config.json", "adapter_model.safetensors"])


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_merged_and_unmerged_adapter_give_the_same_numbers(assets: Path) -> None:
    from workers import evaluate

    unmerged, merged = study(assets, "unmerged"), study(assets, "merged", merge_adapter=True)
    make_adapter(assets, unmerged, PICKLED)  # LoRA on layers of different widths
    shutil.copytree(StudyPaths(unmerged).finetuned_dir(PICKLED), StudyPaths(merged).finetuned_dir(PICKLED))
    outputs = []
    for config in (unmerged, merged):
        evaluate.run(config, PICKLED, "finetuned")
        folder = StudyPaths(config).finetuned_eval_dir(PICKLED)
        outputs.append((read_json(folder / "ppl_results.json"), read_json(folder / "evaluation_results.json")))
    (ppl_a, eval_a), (ppl_b, eval_b) = outputs
    assert eval_a["adapter_merged"] is False and eval_b["adapter_merged"] is True
    ppl_diff = max(abs(ppl_a[name]["ppl"] - ppl_b[name]["ppl"]) / ppl_a[name]["ppl"] for name in ("wikitext2", "ptb"))
    acc_diff = max(abs(eval_a["tasks"][task]["value"] - eval_b["tasks"][task]["value"]) for task in TASKS)
    # The logits themselves: merged and unmerged agree to float rounding, and the adapter does change the model.
    from peft import PeftModel

    from workers.modelio import load_pruned_model

    base, _ = load_pruned_model(StudyPaths(unmerged).pruned_model(PICKLED), True)
    ids = torch.arange(64).remainder(base.config.vocab_size)[None]
    with torch.no_grad():
        plain = base.eval()(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, str(StudyPaths(unmerged).finetuned_dir(PICKLED))).eval()
        through_peft = adapted(input_ids=ids).logits
        merged_logits = adapted.merge_and_unload()(input_ids=ids).logits
    logit_diff = (through_peft - merged_logits).abs().max().item()
    print(f"\nmerged vs unmerged: max relative PPL difference {ppl_diff:.2e}, max accuracy difference {acc_diff}, "
          f"max logit difference {logit_diff:.2e} (adapter effect {(through_peft - plain).abs().max().item():.2f})")
    assert ppl_diff < 1e-5 and acc_diff == 0 and logit_diff < 1e-4
    assert (through_peft - plain).abs().max().item() > 0.1
    assert eval_a["evaluation_digest"] == eval_b["evaluation_digest"]
    # The finetuned evaluation records its digest too: still current for a merge or batch-size change, not for
    # a change of the numbers' settings (what a finetuned-evaluation plan check would use).
    folder = StudyPaths(unmerged).finetuned_eval_dir(PICKLED)
    assert evaluation_is_current(merged, folder) and evaluation_is_current(replace(
        unmerged, evaluate=replace(unmerged.evaluate, batch_size=2)), folder)
    assert not evaluation_is_current(replace(unmerged, evaluate=replace(unmerged.evaluate, ppl_add_bos=True)), folder)


def hand_rolled_llama_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Llama's forward written out from the weights alone: every layer uses the widths its tensors have."""
    config, weights = model.config, {name: tensor.detach().float() for name, tensor in model.state_dict().items()}
    batch, length = ids.shape
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    inverse = 1.0 / config.rope_parameters["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(length).float(), inverse)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rotate(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([-x[..., head_dim // 2:], x[..., :head_dim // 2]], -1)

    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)

    causal = torch.full((length, length), float("-inf")).triu(1)
    hidden = weights["model.embed_tokens.weight"][ids]
    for layer in range(config.num_hidden_layers):
        w = {name.removeprefix(f"model.layers.{layer}."): tensor for name, tensor in weights.items()
             if name.startswith(f"model.layers.{layer}.")}
        x = rms(hidden, w["input_layernorm.weight"])
        q, k, v = ((x @ w[f"self_attn.{name}_proj.weight"].T).view(batch, length, -1, head_dim).transpose(1, 2)
                   for name in "qkv")
        q, k = q * cos + rotate(q) * sin, k * cos + rotate(k) * sin
        k, v = (tensor.repeat_interleave(heads // kv_heads, dim=1) for tensor in (k, v))
        attention = ((q @ k.transpose(-1, -2)) / math.sqrt(head_dim) + causal).softmax(-1) @ v
        hidden = hidden + attention.transpose(1, 2).reshape(batch, length, -1) @ w["self_attn.o_proj.weight"].T
        x = rms(hidden, w["post_attention_layernorm.weight"])
        gate, up = x @ w["mlp.gate_proj.weight"].T, x @ w["mlp.up_proj.weight"].T
        hidden = hidden + (torch.nn.functional.silu(gate) * up) @ w["mlp.down_proj.weight"].T
    return rms(hidden, weights["model.norm.weight"]) @ weights["lm_head.weight"].T


def test_non_uniform_pickle_scores_what_a_hand_rolled_forward_scores(assets: Path) -> None:
    from workers import evaluate
    from workers.perplexity import load_ppl_texts

    config = study(assets, "pickle", ppl_seq_len=64)
    evaluate.run(config, PICKLED, "pruned")
    result = read_json(StudyPaths(config).baseline_eval_dir(PICKLED) / "ppl_results.json")["wikitext2"]

    checkpoint = torch.load(assets / "models" / "Llama" / "best_ppl" / "pytorch_model.bin", weights_only=False)
    model, tokenizer = checkpoint["model"].eval(), checkpoint["tokenizer"]
    widths = [layer.mlp.gate_proj.weight.shape[0] for layer in model.model.layers]
    assert widths == [96, 40] and model.config.intermediate_size == 128
    # LLM-Pruner's PPLMetric, transcribed: join, tokenize once, non-overlapping windows, tail dropped.
    ids = tokenizer("\n\n".join(load_ppl_texts(assets / "eval", "wikitext2")), return_tensors="pt").input_ids[0]
    windows = ids[: ids.numel() // 64 * 64].view(-1, 64)
    with torch.no_grad():
        logits = hand_rolled_llama_logits(model, windows)
        nll = -logits[:, :-1].log_softmax(-1).gather(-1, windows[:, 1:, None]).squeeze(-1)
        own_loss = model(input_ids=windows, labels=windows).loss  # HF's loss: mean over the same tokens
    assert result["n_windows"] == windows.shape[0] and result["n_tokens"] == nll.numel()
    assert result["ppl"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(own_loss.item()), rel=1e-5)


# ---------------------------------------------------------------- the baseline cache


def test_baseline_is_reused_across_studies_and_rerun_when_a_setting_or_model_file_changes(assets: Path) -> None:
    from workers import evaluate

    first = study(assets, "study_a")
    evaluate.run(first, UNIFORM, "pruned")
    folder = StudyPaths(first).baseline_eval_dir(UNIFORM)
    record = recorded_cache(folder)
    assert record and set(record["settings"]) >= {"ppl_seq_len", "ppl_add_bos", "tasks", "limit", "precision"}
    assert any(name.startswith("model/") for name in record["files"]) and \
        any(name.startswith("data/boolq/") for name in record["files"])

    # Another study (other results root) over the same checkpoint: nothing to evaluate, the worker skips.
    second = study(assets, "study_b")
    assert baseline_is_current(second, UNIFORM)
    assert "evaluate_pruned" not in build_plan(second, [UNIFORM], "evaluate").names
    stamp = (folder / "DONE.json").stat().st_mtime_ns
    evaluate.run(second, UNIFORM, "pruned")
    assert (folder / "DONE.json").stat().st_mtime_ns == stamp

    # A setting that changes the numbers: planned again, and the worker evaluates with it.
    longer = study(assets, "study_c", ppl_seq_len=64)
    assert not baseline_is_current(longer, UNIFORM)
    assert build_plan(longer, [UNIFORM], "evaluate").array("evaluate_pruned").pairs == (UNIFORM,)
    assert baseline_is_current(study(assets, "study_d", batch_size=4, ppl_batch_size=2), UNIFORM)  # speed only
    evaluate.run(longer, UNIFORM, "pruned")
    assert read_json(folder / "ppl_results.json")["wikitext2"]["seq_len"] == 64
    assert baseline_is_current(longer, UNIFORM) and not baseline_is_current(first, UNIFORM)

    # A model file touched with the same bytes: planned (the login node only stats), skipped by the worker
    # (it hashes), which refreshes the record so the next plan sees the baseline again.
    weights = StudyPaths(longer).pruned_model(UNIFORM) / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert not baseline_is_current(longer, UNIFORM)
    evaluated = read_json(folder / "ppl_results.json")["settings"]["wall_time_s"]
    evaluate.run(longer, UNIFORM, "pruned")
    assert read_json(folder / "ppl_results.json")["settings"]["wall_time_s"] == evaluated  # not evaluated again
    assert baseline_is_current(longer, UNIFORM)

    # A model file whose bytes change: stale for the plan and for the worker.
    config_file = StudyPaths(longer).pruned_model(UNIFORM) / "generation_config.json"
    config_file.write_text(config_file.read_text().replace("{", '{\n  "_note": "edited",', 1))
    assert not baseline_is_current(longer, UNIFORM)
    assert recorded_cache(folder)["key"] != _key_after_rehash(longer)


def _key_after_rehash(config: StudyConfig) -> str:
    from jobs.cache import baseline_key

    return baseline_key(config, UNIFORM, recorded_cache(StudyPaths(config).baseline_eval_dir(UNIFORM))).key
