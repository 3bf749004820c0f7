"""`launch.py check`: a checklist with the fix of every failure, the cost estimate, and the quick subset every
submission runs. Good and broken studies; the SLURM checks against a real local cluster (marked ``slurm``)."""
from __future__ import annotations

import functools
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import check as check_module
from jobs import check_slurm
from jobs import cost, throughput_figures
from jobs.check import deepspeed_problems
from jobs.check_findings import FAIL, OK, StudyFacts
from jobs.check_slurm import Partition, _stage_fits_partition, parse_gres, parse_sinfo, parse_time_limit
from jobs.config import load_config
from jobs.plan import build_plan
from jobs.study import Pair, select_pairs
from workers.eval_data_demo import write_demo_eval_data

REPO = Path(__file__).resolve().parent.parent


def write_safetensors(path: Path, shapes: dict[str, list[int]]) -> None:
    """A valid safetensors file of zeros (float32)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4
        for dimension in shape:
            size *= dimension
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"\0" * offset)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tests.tiny_assets import build_tiny_tokenizer
    folder = tmp_path_factory.mktemp("tokenizer")
    build_tiny_tokenizer(folder)
    return folder


def make_study(tmp_path: Path, tokenizer_dir: Path) -> tuple[list[str], Path]:
    """A Llama-only study (2 pairs): a Hugging Face folder with a tokenizer, an opted-in pickle, data."""
    root = tmp_path / "results"
    hf = root / "for_finetuning" / "Llama" / "best_acc"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text("{}")
    write_safetensors(hf / "model.safetensors", {"embed": [100, 16], "mlp": [16, 64]})
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, hf / name)
    pickled = root / "for_finetuning" / "Llama" / "best_ppl"
    pickled.mkdir(parents=True)
    import torch
    torch.save({"model": {"weight": torch.zeros(10, 20)}, "tokenizer": None}, pickled / "pytorch_model.bin")
    train = tmp_path / "train.json"
    train.write_text(json.dumps([{"instruction": f"Repeat {i}.", "input": "red green" if i % 2 else "",
                                  "output": f"red green {i}."} for i in range(40)]))
    write_demo_eval_data(tmp_path / "eval", seed=0, docs_per_task=10, ppl_text_lines=30)
    args = ["--executor", "local", f"study.results_root={root}", "study.models=[Llama]",
            "study.allow_pickle=[Llama/best_ppl]", f"data.train_path={train}",
            f"data.eval_data_dir={tmp_path / 'eval'}"]
    return args, root


def launch(*args, env=None):
    return subprocess.run([sys.executable, str(REPO / "launch.py"), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env)


def rows(output: str, status: str) -> list[str]:
    return [line.strip() for line in output.splitlines() if line.strip().startswith(status + " ")]


def test_good_study_passes_with_checklist_and_cost(tmp_path, tokenizer_dir):
    args, root = make_study(tmp_path, tokenizer_dir)
    before = sorted(root.rglob("*"))
    result = launch("check", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert not rows(out, FAIL), out
    for check in ("checkpoints", "tokenizers", "training data", "evaluation data", "batch"):
        assert any(row.split(None, 1)[1].startswith(check) for row in rows(out, OK)), (check, out)
    assert "1 LLM-Pruner pickle(s) opted in (Llama/best_ppl)" in out
    assert "36 train rows x 2 epoch(s)" in out  # 40 rows minus a validation split of 4
    assert "cost estimate" in out and "ready to submit" in out
    assert sorted(root.rglob("*")) == before  # check writes nothing


def test_broken_study_lists_every_failure_with_its_fix(tmp_path, tokenizer_dir):
    args, root = make_study(tmp_path, tokenizer_dir)
    (root / "for_finetuning/Llama/best_acc/tokenizer.json").unlink()
    train = tmp_path / "train.json"
    train.write_text(json.dumps([{"instruction": "Say hi.", "input": ""}]))  # no output field
    (tmp_path / "eval" / "piqa" / "validation.jsonl").unlink()
    result = launch("check", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    failures = rows(result.stdout, FAIL)
    assert len(failures) == 3, result.stdout
    assert any("no tokenizer in" in row for row in failures)
    assert any("missing field(s) output" in row for row in failures)
    assert any("evaluation data missing offline" in row and "piqa" in row for row in failures)
    lines = result.stdout.splitlines()
    for index, line in enumerate(lines):  # the line after each FAIL row says how to fix it
        if line.strip().startswith(FAIL + " "):
            assert lines[index + 1].strip().startswith("fix:"), lines[index + 1]
    assert "fix the FAIL rows" in result.stdout


def test_pickle_without_opt_in_fails_with_the_fix(tmp_path, tokenizer_dir):
    args, _ = make_study(tmp_path, tokenizer_dir)
    args = [arg for arg in args if not arg.startswith("study.allow_pickle")]
    result = launch("check", *args)
    assert result.returncode == 2
    assert any("pickled checkpoint" in row for row in rows(result.stdout, FAIL))
    assert "fix: if you trust it, add study.allow_pickle=[Llama/best_ppl]" in result.stdout


def test_submission_runs_the_quick_subset(tmp_path, tokenizer_dir):
    args, root = make_study(tmp_path, tokenizer_dir)
    (root / "for_finetuning/Llama/best_acc/tokenizer.json").unlink()  # only `check` loads tokenizers
    assert launch("--batch-all", "--stage", "all", "--dry-run", *args).returncode == 0
    (tmp_path / "eval" / "boolq" / "validation.jsonl").unlink()
    result = launch("--batch-all", "--stage", "all", "--dry-run", *args)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "evaluation data missing offline" in result.stderr and "boolq" in result.stderr


def test_slurm_unreachable_is_a_failure(tmp_path, tokenizer_dir):
    args, _ = make_study(tmp_path, tokenizer_dir)
    args = [arg if arg != "local" else "slurm" for arg in args]
    result = launch("check", *args, env={**os.environ, "PATH": str(tmp_path / "empty-bin")})
    assert result.returncode == 2
    assert any("sinfo not found" in row for row in rows(result.stdout, FAIL)), result.stdout


def test_sinfo_parsing():
    text = ("gpu*|up|1-00:00:00|4|gpu:a100:4(S:0-1)|64|512000\n"
            "gpu*|up|1-00:00:00|2|gpu:a100:8|128|1024000\n"
            "cpu|up|2:00:00|10|(null)|32|128000\n"
            "debug|down|30:00|1|gpu:2|8|16000\n")
    partitions, default = parse_sinfo(text)
    assert default == "gpu"
    gpu = partitions["gpu"]
    assert (gpu.nodes, gpu.gpus_per_node, gpu.gpu_types, gpu.cpus_per_node) == (6, 8, {"a100"}, 128)
    assert gpu.time_limit_min == 24 * 60 and partitions["cpu"].gpus_per_node == 0
    assert not partitions["debug"].up and partitions["debug"].time_limit_min == 30
    assert parse_time_limit("infinite") == float("inf") and parse_time_limit("2-03:04:00") == 2 * 1440 + 184
    assert parse_gres("gpu:h100:4(S:0-1),gpu:a100:2") == (4, {"h100", "a100"})


def test_partition_limits_each_fail_with_a_fix(monkeypatch):
    monkeypatch.setattr(check_slurm, "sbatch_test_only", lambda config, array: "")
    facts = StudyFacts(partitions={"gpu": Partition("gpu", True, 480, 2, 4, {"h100"}, 32, 256000)},
                       default_partition="gpu")
    config = load_config(None, ["resources.finetune.time_min=720", "resources.finetune.gpus_per_node=8",
                                "resources.finetune.mem_gb=512"])
    array = build_plan(config, select_pairs(config), "finetune").arrays[0]
    findings = _stage_fits_partition(config, "finetune", array, facts)
    details = " ".join(finding.detail + " " + finding.fix for finding in findings)
    assert all(finding.status == FAIL for finding in findings) and len(findings) == 3
    assert "exceeds the partition's limit 8:00:00" in details
    assert "lower resources.finetune.time_min to <= 480" in details
    assert "gpus_per_node 8 but its nodes have 4 GPU(s)" in details and "mem_gb 512" in details
    unknown = load_config(None, ["resources.finetune.partition=gpus"])
    findings = _stage_fits_partition(unknown, "finetune", array, facts)
    assert findings[0].status == FAIL and 'did you mean "gpu"' in findings[0].detail


def test_deepspeed_problems_name_the_key_and_the_fix():
    config = load_config(None, ["resources.finetune.gpus_per_node=2"])
    assert deepspeed_problems({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}},
                              config) == []
    problems = deepspeed_problems({"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 16,
                                   "zero_optimization": {"stage": 4}}, config)
    text = " ".join(problem + " " + fix for problem, fix in problems)
    assert "train_micro_batch_size_per_gpu is 8, but the study runs 4" in text
    assert "gradient_accumulation_steps is 16, but the study runs 8" in text  # 64 = 4 x 8 x 2 GPUs
    assert "zero_optimization.stage 4" in text and 'set train_micro_batch_size_per_gpu to "auto"' in text


RESULTS = """# Measured results

## LoRA throughput (issue: speed)
- Card: NVIDIA H100 80GB HBM3
- Model: llama3-8b-pruned (6.72B parameters)

| variant | micro-batches/rank | tok/s | tok/s/GPU | MFU |
|---|---|---|---|---|
| recipe | 16 x 4 | 9,000 | 4,500 | 20% |
| compiled@8192 | 3 | 30000 | 15000 | 55% |
| packed@4096 | - | OOM | - | - |

## Evaluation
| model | GPU | stage | tokens/s |
|---|---|---|---|
| Qwen-0.5B | A100 | lm-eval zero-shot | 40k |
| Llama-3-8B | A100 | perplexity | 20k |
"""


def test_results_parser_finds_stage_gpu_size_and_per_gpu_throughput():
    figures = throughput_figures.parse_results(RESULTS)
    assert [(f.stage, f.gpu, f.params_b, f.tokens_per_s) for f in figures] == [
        ("finetune", "h100", 6.72, 4500.0), ("finetune", "h100", 6.72, 15000.0),
        ("evaluate", "a100", 0.5, 40000.0), ("evaluate", "a100", 8.0, 20000.0)]
    assert [figure.recipe for figure in figures] == [True, False, False, False]
    # the packed path's figure for a packed study, the recipe's for a study that trains on the recipe path
    assert throughput_figures.pick_figure(figures, "finetune", "h100", 7.0).tokens_per_s == 15000
    slowest = throughput_figures.pick_figure(figures, "finetune", "h100", 7.0, recipe=True)
    assert slowest.tokens_per_s == 4500 and "line 9" in slowest.cite()
    assert throughput_figures.pick_figure(figures, "evaluate", "a100", 7.0).params_b == 8.0  # the nearest size
    assert throughput_figures.pick_figure(figures, "finetune", "a100", 7.0) is None  # no figure for that GPU: none applies
    assert throughput_figures.parse_results("# nothing measured yet\n") == []
    # the card named first is the one measured; later mentions point elsewhere
    assert throughput_figures.normalise_gpu("- Card: one NVIDIA H100 80GB - Model: as in the H200 section") == "h100"
    assert throughput_figures.normalise_gpu("NVIDIA GH200 480GB") == "gh200"
    assert throughput_figures.normalise_gpu("- Machine: 2 x NVIDIA H200, 32 CPU cores") == "h200"
    assert throughput_figures.normalise_gpu("- Machine: the 2-core dev VM (CPU), as against the H100 runs") == "cpu"
    assert throughput_figures.normalise_gpu("2 cores, no GPU") == "cpu"
    assert throughput_figures.parse_size_b("- Commit: 9b71ea5 - Model: as above") is None
    assert throughput_figures.parse_size_b("Llama-3-8B, 6.72B parameters") == 6.72
    assert throughput_figures.parse_size_b("a 135M model") == 0.135


def test_figures_of_another_gpu_count_or_path_count_only_when_none_other_applies():
    results = """## Finetune worker on H200s (6.72B parameters)

| run | GPUs | tok/s | per GPU |
|---|---|---|---|
| ours | 1 | 18,000 | 18,000 |
| ours | 4 | 48,000 | 12,000 |
| LLM-Pruner layout, `packing=off` | 1 | 2,500 | 2,500 |
"""
    figures = throughput_figures.parse_results(results)
    assert [(figure.tokens_per_s, figure.gpus, figure.recipe) for figure in figures] == [
        (18000, 1, False), (12000, 4, False), (2500, 1, True)]
    pick = functools.partial(throughput_figures.pick_figure, figures, "finetune", "h200", 6.7)
    assert pick(gpus=1).tokens_per_s == 18000  # not the four-GPU run's slower share
    assert pick(gpus=4).tokens_per_s == 12000
    assert pick(gpus=2).tokens_per_s == 12000  # no two-GPU figure: the slowest of the others
    assert pick(gpus=4, recipe=True).tokens_per_s == 2500  # no four-GPU recipe figure: the recipe's one-GPU figure
    assert len(throughput_figures.candidates(figures, "finetune", "h200", 6.7, gpus=2)) == 2


def test_a_table_marked_as_not_a_cost_figure_is_left_out():
    results = """## Diagnostics on an H100 (6.72B parameters)

A stand-in for one rank of four, at micro-batches no study uses (not a cost figure):

| run | tok/s |
|---|---|
| packed, 2,816 tokens a micro-batch | 7,770 |

The worker at its defaults:

| run | tok/s |
|---|---|
| packed LoRA finetune | 15,186 |
"""
    figures = throughput_figures.parse_results(results)
    assert [(figure.tokens_per_s, figure.line) for figure in figures] == [(15186, 13)]
    assert throughput_figures.pick_figure(figures, "finetune", "h100", 6.7).tokens_per_s == 15186


def test_the_repositorys_own_results_file_parses():
    text = (REPO / "benchmarks" / "RESULTS.md").read_text()
    figures = throughput_figures.parse_results(text)
    if "tok/s" in text:
        assert figures and all(figure.tokens_per_s > 0 and figure.stage for figure in figures)


def test_parameters_are_counted_from_headers(tmp_path):
    write_safetensors(tmp_path / "model.safetensors", {"a": [10, 20], "b": [5]})
    (tmp_path / "config.json").write_text("{}")
    assert cost.count_parameters("hf", tmp_path) == 205
    import torch
    torch.save({"model": {"w": torch.zeros(30, 10, dtype=torch.bfloat16)}}, tmp_path / "pruned.bin")
    assert cost.count_parameters("pickle", tmp_path / "pruned.bin") == 300
    (tmp_path / "broken.bin").write_bytes(b"not a zip")
    assert cost.count_parameters("pickle", tmp_path / "broken.bin") is None


def test_estimate_warns_when_a_stage_does_not_fit_its_time(tmp_path, tokenizer_dir, monkeypatch):
    args, _ = make_study(tmp_path, tokenizer_dir)
    overrides = [arg for arg in args if "=" in arg]
    results = tmp_path / "RESULTS.md"
    results.write_text(RESULTS.replace("4,500", "0.001").replace("| 15000 |", "| 0.002 |"))
    monkeypatch.setattr(cost, "RESULTS_FILE", results)
    monkeypatch.setattr(cost, "gpu_type", lambda config, kind, facts: ("h100", "test"))
    config = load_config(None, overrides)
    plan = build_plan(config, select_pairs(config), "all")
    facts = StudyFacts()
    check_module.collect_findings(config, plan, "local", deep=True, with_slurm=False, facts=facts)
    estimate = cost.estimate(config, plan, "local", facts)
    finetune = next(entry for entry in estimate.stages if entry.stage == "finetune")
    assert finetune.tokens[Pair("Llama", "best_acc")] > 0
    warning = next(f for f in estimate.findings if f.check == "time limit" and "finetune" in f.detail)
    assert warning.status == "warn" and "raise resources.finetune.time_min" in warning.fix
    text = cost.render_estimate(estimate)
    assert "line 10" in text and "NO" in text  # the packed path's figure: the study packs on GPUs
    evaluate = next(f for f in estimate.findings if f.check == "time limit" and "evaluate" in f.detail)
    assert evaluate.status in ("skip", "ok", "warn")


def test_template_presets_sit_beneath_the_study_config(tmp_path):
    template = tmp_path / "cluster.yaml"
    template.write_text("# Used by: tests\nsetup: [module load cuda]\nresources:\n  finetune: {partition: gpu, "
                        "account: proj, time_min: 1440}\n  evaluate: {partition: gpu}\n")
    config = load_config(None, [f"executor.slurm_template={template}", "resources.finetune.time_min=600"])
    assert (config.resources.finetune.partition, config.resources.finetune.account) == ("gpu", "proj")
    assert config.resources.finetune.time_min == 600  # the study's own value wins
    assert (config.resources.evaluate.partition, config.resources.evaluate.time_min) == ("gpu", 120)
    template.write_text("resources:\n  finetune: {partitio: gpu}\n")
    with pytest.raises(Exception, match="resources.finetune must be one of"):
        load_config(None, [f"executor.slurm_template={template}"])


# ------------------------------------------------------------------------------------ real SLURM

CHECK_STATE_DIR = "/tmp/prunetune-slurm-check"  # its own cluster, so other test runs' clusters are left alone
CHECK_PORT_BASE = "18817"


@pytest.fixture(scope="module")
def cluster():
    from tests.slurm_cluster import SCRIPT, cluster_unavailable
    reason = cluster_unavailable()
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "LOCAL_SLURM_STATE_DIR": CHECK_STATE_DIR, "LOCAL_SLURM_PORT_BASE": CHECK_PORT_BASE}
    started = subprocess.run(["bash", str(SCRIPT), "start", "--state-dir", CHECK_STATE_DIR], env=env,
                             capture_output=True, text=True, timeout=240)
    assert started.returncode == 0, started.stderr[-3000:]
    conf = next(line.split("=", 1)[1].strip().strip("'\"") for line in started.stdout.splitlines()
                if line.startswith("export SLURM_CONF="))
    yield {**os.environ, "SLURM_CONF": conf}
    subprocess.run(["bash", str(SCRIPT), "stop", "--state-dir", CHECK_STATE_DIR], env=env, capture_output=True,
                   text=True, timeout=240)


def slurm_args(args: list[str]) -> list[str]:
    resources = [f"resources.{stage}.{key}={value}" for stage in ("finetune", "evaluate", "compare")
                 for key, value in (("cpus_per_task", 1), ("gpus_per_node", 0), ("mem_gb", 1), ("time_min", 15))]
    return [arg if arg != "local" else "slurm" for arg in args] + resources


@pytest.mark.slurm
def test_check_against_a_real_cluster(cluster, tmp_path, tokenizer_dir):
    args, _ = make_study(tmp_path, tokenizer_dir)
    good = launch("check", *slurm_args(args), env=cluster)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "sinfo answers: partitions debug (default debug)" in good.stdout
    assert sum("sbatch --test-only accepts it" in row for row in rows(good.stdout, OK)) == 3  # one per stage

    too_many = launch("check", *slurm_args(args), "resources.finetune.gpus_per_node=16", env=cluster)
    assert too_many.returncode == 2
    assert any("gpus_per_node 16 but its nodes have 4 GPU(s)" in row for row in rows(too_many.stdout, FAIL))
    typo = launch("check", *slurm_args(args), "resources.evaluate.partition=debg", env=cluster)
    assert any('partition \'debg\' does not exist; did you mean "debug"' in row for row in rows(typo.stdout, FAIL))


@pytest.mark.slurm
def test_submission_refuses_a_request_the_cluster_cannot_run(cluster, tmp_path, tokenizer_dir):
    args, root = make_study(tmp_path, tokenizer_dir)
    result = launch("--batch-all", "--stage", "all", *slurm_args(args), "resources.finetune.partition=gpu",
                    env=cluster)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "partition 'gpu' does not exist" in result.stderr
    assert not (root / "manifest.json").exists()
