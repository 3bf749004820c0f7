"""launch.py on bad input: one clear line, exit code 2, nothing written; the login path stays light."""
import subprocess
import sys
from pathlib import Path

import pytest
from tests.cli_helpers import assert_one_line_error

REPO = Path(__file__).resolve().parent.parent


def launch(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "launch.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def study(tmp_path):
    """A study root with one Hugging Face-looking folder and one pickle-looking file, no weights loaded."""
    root = tmp_path / "results"
    hf = root / "for_finetuning" / "Llama" / "best_acc"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"\0")
    pickled = root / "for_finetuning" / "Llama" / "best_ppl"
    pickled.mkdir(parents=True)
    (pickled / "pytorch_model.bin").write_bytes(b"\0")
    train = tmp_path / "train.json"
    train.write_text("[]")
    return ["--executor", "local", f"study.results_root={root}", f"data.train_path={train}"], root


def tree(root):
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


def test_unknown_model_suggests(study):
    args, root = study
    before = tree(root)
    assert_one_line_error(launch("--model", "Lama", "--config", "best_acc", "--stage", "finetune", *args),
                          "--model 'Lama'", 'did you mean "Llama"')
    assert tree(root) == before


def test_unknown_config_suggests(study):
    args, _ = study
    assert_one_line_error(launch("--model", "Llama", "--config", "bestacc", *args), 'did you mean "best_acc"')


def test_missing_model_folder(study):
    args, root = study
    before = tree(root)
    assert_one_line_error(launch("--model", "Qwen", "--config", "best_acc", "--stage", "finetune", *args),
                          "Qwen/best_acc", "does not exist", "study.pruned_model_path")
    assert tree(root) == before


def test_empty_model_folder(study):
    args, root = study
    (root / "for_finetuning" / "Qwen" / "best_acc").mkdir(parents=True)
    assert_one_line_error(launch("--model", "Qwen", "--config", "best_acc", "--stage", "finetune", *args),
                          "is empty")


def test_pickle_needs_opt_in(study):
    args, root = study
    before = tree(root)
    assert_one_line_error(launch("--model", "Llama", "--config", "best_ppl", "--stage", "finetune", *args),
                          "pickled checkpoint", "study.allow_pickle=[Llama/best_ppl]")
    assert tree(root) == before


def test_malformed_yaml(study, tmp_path):
    args, _ = study
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: [unclosed\n")
    assert_one_line_error(launch("--batch-all", "--config-file", str(bad), *args), "bad.yaml line", "malformed YAML")


def test_unknown_key_lists_valid_ones(study):
    args, _ = study
    assert_one_line_error(launch("--batch-all", *args, "finetune.lr=1"), "unknown key finetune.lr",
                          "valid: prompt_template")


def test_missing_training_data(study, tmp_path):
    args, _ = study
    assert_one_line_error(launch("--model", "Llama", "--config", "best_acc", "--stage", "finetune", *args,
                                 f"data.train_path={tmp_path / 'nope.json'}"), "training data", "does not exist")


def test_dry_run_prints_plan_and_writes_nothing(study):
    args, root = study
    before = tree(root)
    result = launch("--model", "Llama", "--config", "best_acc", "--stage", "finetune", "--dry-run", *args)
    assert result.returncode == 0, result.stderr
    assert "finetune" in result.stdout and "Llama/best_acc" in result.stdout
    assert tree(root) == before


def test_login_side_never_imports_torch(study):
    args, _ = study
    code = ("import sys, launch; code = launch.main(sys.argv[1:]); "
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'lm_eval', 'deepspeed') if m in sys.modules]; "
            "print('HEAVY', heavy); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code, "--model", "Llama", "--config", "best_acc", "--stage",
                             "finetune", "--dry-run", *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout
