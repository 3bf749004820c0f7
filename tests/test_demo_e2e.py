"""The README's demo, end to end through the local executor: every file of the results tree, every
metric a finite number from a real run, and a re-run that skips what is complete."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from jobs.config import MODEL_NAMES, PRUNING_CONFIG_NAMES, ZERO_SHOT_TASKS, load_config
from jobs.state import is_done
from jobs.study import Pair, StudyPaths

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    run = subprocess.run([sys.executable, "launch.py", "demo", f"study.results_root={root}"], cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    config = load_config(REPO / "configs" / "demo.yaml", [f"study.results_root={root}"])
    return config, run


def all_pairs():
    return [Pair(model, config) for model in MODEL_NAMES for config in PRUNING_CONFIG_NAMES]


def finite(value):
    return isinstance(value, float) and math.isfinite(value)


@pytest.mark.parametrize("pair", all_pairs(), ids=lambda pair: pair.slug)
def test_results_tree_of_each_pair(demo, pair):
    config, _ = demo
    paths = StudyPaths(config)
    adapter = paths.finetuned_dir(pair)
    for name in ("adapter_model.safetensors", "adapter_config.json", "finetuning_config.json", "training_log.txt"):
        assert (adapter / name).is_file(), name
    assert is_done(adapter, verify_checksums=True)
    record = json.loads((adapter / "finetuning_config.json").read_text())
    metrics = record["metrics"]
    assert metrics["last_train_loss"] < metrics["first_train_loss"]  # LoRA learned on the training data
    lora_b = [tensor for key, tensor in load_file(adapter / "adapter_model.safetensors").items() if "lora_B" in key]
    assert lora_b and max(float(tensor.abs().max()) for tensor in lora_b) > 0  # B starts at zero
    assert record["settings"]["lora_r"] == 8 and record["settings"]["cutoff_len"] == 256

    before, after = paths.baseline_eval_dir(pair), paths.finetuned_eval_dir(pair)
    for folder in (before, after):
        assert is_done(folder, verify_checksums=True)
        ppl = json.loads((folder / "ppl_results.json").read_text())
        assert finite(ppl["wikitext2"]["ppl"]) and ppl["wikitext2"]["ppl"] > 1 and finite(ppl["ptb"]["ppl"])
        scores = json.loads((folder / "evaluation_results.json").read_text())
        assert set(scores["tasks"]) == set(ZERO_SHOT_TASKS)
        for task, entry in scores["tasks"].items():
            assert finite(entry["value"]) and 0 <= entry["value"] <= 1, task
            assert entry["metric"] == ("acc_norm" if task in ("hellaswag", "arc_challenge", "openbookqa") else "acc")
        assert finite(scores["average"])
        assert math.isclose(scores["average"], sum(e["value"] for e in scores["tasks"].values()) / 7)
    # The adapter is really applied when evaluating after finetuning.
    ppl_before = json.loads((before / "ppl_results.json").read_text())["wikitext2"]["ppl"]
    ppl_after = json.loads((after / "ppl_results.json").read_text())["wikitext2"]["ppl"]
    assert ppl_before != ppl_after
    report = (after / "comparison_report.txt").read_text()
    assert "wikitext2" in report and "largest gain" in report
    comparison = json.loads((after / "comparison.json").read_text())
    assert math.isclose(comparison["ppl"]["wikitext2"]["after"], ppl_after)


def test_study_summary(demo):
    config, run = demo
    summary = StudyPaths(config).study_summary().read_text()
    assert "Pairs compared: 12. Missing: 0." in summary
    assert summary in run.stdout  # printed at the end of the demo
    assert len((Path(config.study.results_root) / "summary.csv").read_text().splitlines()) == 13


def test_pickled_checkpoint_was_used(demo):
    config, _ = demo
    pickled = StudyPaths(config).pruned_model(Pair("Llama", "best_ppl")) / "pytorch_model.bin"
    assert pickled.is_file()
    record = json.loads((StudyPaths(config).finetuned_dir(Pair("Llama", "best_ppl")) / "finetuning_config.json").read_text())
    assert "pickle" in json.dumps(record["base_model"])


def test_rerun_skips_complete_pairs(demo):
    config, _ = demo
    rerun = subprocess.run([sys.executable, "launch.py", "demo", f"study.results_root={config.study.results_root}"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "skipped finetune Llama/best_acc: done" in rerun.stdout
    assert "all 1 task(s) completed" in rerun.stdout  # only the compare job runs again


def test_no_temporary_files_left(demo):
    config, _ = demo
    leftovers = [path for path in Path(config.study.results_root).rglob("*") if path.name.endswith(".tmp")]
    assert leftovers == []
